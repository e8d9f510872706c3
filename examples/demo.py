"""`make demo`: serve the embedded model and run a real experiment through the client over gRPC.

Starts `farscope serve` (the console script's code) in a child process on a free loopback port, runs
the experiment below written only against the public client API, prints the results, stops the server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import farscope

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
EIFFEL = "The Eiffel Tower is located in the city of"
PATCH_LAYER = 20
STEER_LAYER = 10


def experiment(model: farscope.RemoteModel) -> None:
    tok = model.tokenizer
    mary, john = tok(" Mary")["input_ids"][0], tok(" John")["input_ids"][0]

    # IOI: clean, corrupted, and corrupted with the clean layer-20 last-position residual patched in:
    # three invokes batched into one forward pass, the patch flowing from invoke 0 to invoke 2.
    with model.trace() as tracer:
        with tracer.invoke(CLEAN):
            clean_resid = model.model.layers[PATCH_LAYER].output[:, -1]
            clean = model.lm_head.output[:, -1].save()
        with tracer.invoke(CORRUPTED):
            corrupted = model.lm_head.output[:, -1].save()
        with tracer.invoke(CORRUPTED):
            model.model.layers[PATCH_LAYER].output[:, -1] = clean_resid
            patched = model.lm_head.output[:, -1].save()
    print(f"IOI logit difference ' Mary' - ' John' (smollm2-135m, {model.architecture}):")
    for name, logits in (("clean", clean), ("corrupted", corrupted), (f"patched @ layer {PATCH_LAYER}", patched)):
        print(f"  {name:<20} {(logits[0, mary] - logits[0, john]).item():+.3f}")

    # Steering: a "Rome - Paris" vector (difference of layer-10 residuals, ActAdd style), added at
    # every position of layer 10.
    with model.trace() as tracer:
        with tracer.invoke(" Rome Rome Rome"):
            rome = model.model.layers[STEER_LAYER].output[0, -1].save()
        with tracer.invoke(" Paris Paris Paris"):
            paris = model.model.layers[STEER_LAYER].output[0, -1].save()
    steer = 2.0 * (rome.value - paris.value)
    with model.trace(EIFFEL):
        plain = torch.softmax(model.lm_head.output[0, -1], -1).topk(5).save()
    with model.trace(EIFFEL):
        model.model.layers[STEER_LAYER].output[:, :] += steer
        steered = torch.softmax(model.lm_head.output[0, -1], -1).topk(5).save()
    print(f"\nTop-5 next tokens for {EIFFEL!r}:")
    for name, top in (("plain", plain), (f"steered (Rome-Paris @ layer {STEER_LAYER})", steered)):
        tokens = ", ".join(f"{tok.decode(int(i))!r} {p:.3f}" for p, i in zip(top.values, top.indices, strict=True))
        print(f"  {name:<36} {tokens}")

    # Two recipes, with pictures: the logit lens, and the IOI residual-stream patching sweep.
    from farscope import recipes

    lens = recipes.logit_lens(model, EIFFEL, k=5)
    paris_layers = [layer for layer in range(lens.probs.shape[0]) if lens.top_tokens[layer][-1][0] == " Paris"]
    print(f"\nLogit lens on {EIFFEL!r}: ' Paris' is top-1 at layers {paris_layers}")
    sweep = recipes.activation_patching(
        model, CLEAN, CORRUPTED, lambda logits: logits[0, -1, mary] - logits[0, -1, john], component="resid")
    best = [int(sweep.effect[layer].abs().argmax()) for layer in range(sweep.effect.shape[0])]
    print(f"IOI resid patching (denoising, {sweep.effect.shape[0]} layers x {sweep.effect.shape[1]} positions): "
          f"largest effect at position {best[0]} ({sweep.tokens[best[0]]!r}) in layer 0, "
          f"{best[-1]} ({sweep.tokens[best[-1]]!r}) in the last layer")
    out = Path(os.environ.get("FARSCOPE_DEMO_DIR", "demo-output"))
    for name, result in (("logit_lens.png", lens), ("ioi_resid_patching.png", sweep)):
        print(f"  wrote {result.plot(out / name)}")


def _start_server() -> tuple[subprocess.Popen, str]:
    # Auth off, which the server allows only on loopback: the demo's client is this process.
    command = [sys.executable, "-m", "farscope.server.cli", "serve", "--no-auth", "--port", "0",
               "--log-level", "WARNING", "--torch-threads", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    deadline = time.monotonic() + 600  # the first start converts the GGUF file (~30 s)
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"farscope serve exited with code {process.wait()}")
        if line.startswith("farscope: serving"):
            print(line.strip())
            return process, line.rsplit(" ", 1)[1].strip()
    process.kill()
    raise TimeoutError("farscope serve did not start")


def main() -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    process, address = _start_server()
    try:
        with farscope.RemoteModel("smollm2-135m", address=address) as model:
            experiment(model)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    print("\nserver stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
