"""The NNsight half of bench/overhead.py; runs inside bench/.nnsight-venv, never imported by farscope.

Loads the same converted weights as the farscope server (a local safetensors directory), then times,
interleaved in this one process: a plain forward, and NNsight traces saving every layer's output.
Prints one JSON object on the last line of stdout; everything else goes to stderr.

This has to be a real file: NNsight reads the source of a `with model.trace(...)` block.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable


def interleaved(variants: dict[str, Callable[[], object]], repeat: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each variant; one call of each per round, the order rotating every round."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeat):
        gc.collect()
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--repeat", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args()

    import nnsight
    import torch
    import transformers
    from nnsight.modeling.transformers import TransformersModel

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    transformers.utils.logging.disable_progress_bar()

    # NNsight 0.8's LanguageModel is a deprecated alias of this, pinned to the same task.
    lm = TransformersModel(args.model_dir, task="text-generation", dispatch=True, dtype=torch.float32)
    model = lm._module  # the plain transformers model NNsight wraps, for the reference forward
    model.eval()
    input_ids = lm.tokenizer(args.prompt, return_tensors="pt").input_ids
    layers = model.config.num_hidden_layers

    def plain() -> object:
        with torch.no_grad():
            return model(input_ids)

    def trace_all() -> list:
        with lm.trace(args.prompt):
            saved = nnsight.save([lm.model.layers[i].output for i in range(layers)])
        return saved

    def trace_all_no_grad() -> list:
        with torch.no_grad(), lm.trace(args.prompt):
            saved = nnsight.save([lm.model.layers[i].output for i in range(layers)])
        return saved

    # Correctness first: the traced values are the layer outputs of a plain forward, taken with plain
    # hooks (HF's hidden_states[-1] is after the final norm, not the last layer's output).
    outputs: list = []
    handles = [layer.register_forward_hook(lambda _m, _a, out: outputs.append(out))
               for layer in model.get_decoder().layers]
    with torch.no_grad():
        reference = model(input_ids)
    for handle in handles:
        handle.remove()
    saved = trace_all()
    max_diff = max(float((saved[i] - outputs[i]).abs().max()) for i in range(layers))

    times = interleaved(
        {"plain": plain, "trace_all": trace_all, "trace_all_no_grad": trace_all_no_grad},
        args.repeat, args.warmup,
    )
    print(json.dumps({
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "nnsight": nnsight.__version__,
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "layers": layers,
        "tokens": int(input_ids.shape[1]),
        "max_abs_diff_vs_hooks": max_diff,
        "last_logits_head": reference.logits[0, -1, :8].tolist(),
        "times": times,
    }))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
