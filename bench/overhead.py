"""What farscope's interventions cost on top of a plain forward pass, and what NNsight's cost.

Run by hand: ``.venv/bin/python bench/overhead.py [--repeat N] [--threads T]``. Everything is measured
on the embedded default model (smollm2-135m, float32, CPU), one prompt, in one run:

(a) the server's executor running a graph that saves all 30 layer outputs, vs a plain forward;
    decoding + validating that graph, and tokenizing, reported on their own;
(b) end-to-end remote traces through the real client, real gRPC on loopback and an in-process server,
    vs the same plain forward: saving layers[5].output (the executor stops after layer 5), and, for an
    honest full-forward comparison, saving lm_head.output and saving all 30 layer outputs;
(c) NNsight 0.8.1 saving all 30 layer outputs inside ``model.trace(prompt)`` vs a plain forward, in a
    subprocess in ``bench/.nnsight-venv`` (created and filled by this script on first use), on the
    same weights (the server's converted safetensors directory).

Each ratio compares variants timed in the same process, interleaved (one call of each per round, the
order rotating), as the median of ``--repeat`` rounds after ``--warmup`` rounds.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import inspect
import io
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROMPT = "The Eiffel Tower is located in the city of"
HERE = Path(__file__).resolve().parent
NNSIGHT_VENV = HERE / ".nnsight-venv"
NNSIGHT_SIDE = HERE / "_nnsight_side.py"
NNSIGHT_VERSION = "0.8.1"
# The CPU build that lies on this machine's disk; an unpinned torch pulls a multi-GB CUDA build.
TORCH_VERSION = "2.13.0"
PROFILE_ABOVE = 1.3  # (a)'s ratio above which the executor path is profiled and its top costs printed


# -- timing ----------------------------------------------------------------------------------------


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


@dataclass
class Row:
    label: str
    seconds: list[float] | None  # None: a section heading
    ratio: bool = True  # compare with the section's plain forward (components are shown in ms only)

    @property
    def median_ms(self) -> float:
        assert self.seconds is not None
        return statistics.median(self.seconds) * 1e3

    @property
    def min_ms(self) -> float:
        assert self.seconds is not None
        return min(self.seconds) * 1e3


def print_table(rows: list[Row]) -> None:
    width = max(len(r.label) for r in rows) + 2
    head = f"{'variant':<{width}}{'median ms':>11}{'min ms':>10}{'ratio':>9}{'added ms':>11}"
    print(head)
    print("-" * len(head))
    base: Row | None = None
    for row in rows:
        if row.seconds is None:
            print(row.label)
            base = None
            continue
        if base is None:  # the first timed row of a section is its plain forward
            base = row
        line = f"{row.label:<{width}}{row.median_ms:>11.2f}{row.min_ms:>10.2f}"
        if row.ratio:
            line += f"{row.median_ms / base.median_ms:>8.2f}x{row.median_ms - base.median_ms:>+11.2f}"
        print(line)


# -- the NNsight venv ------------------------------------------------------------------------------


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _probe(python: Path) -> dict[str, str] | None:
    """Versions of nnsight, torch and transformers in `python`'s environment, or None if not all there."""
    if not python.exists():
        return None
    code = ("import json, importlib.metadata as m; "
            "print(json.dumps({p: m.version(p) for p in ('nnsight', 'torch', 'transformers')}))")
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else None


def _pip(python: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", *args],
                          capture_output=True, text=True)


def ensure_nnsight_venv(venv: Path, transformers_version: str) -> dict[str, str]:
    """NNsight in its own venv (created on first use), torch left at the on-disk CPU build."""
    python = _venv_python(venv)
    found = _probe(python)
    if found and found["nnsight"] == NNSIGHT_VERSION and found["torch"].split("+")[0] == TORCH_VERSION:
        return found
    log(f"installing nnsight {NNSIGHT_VERSION} into {venv} (once; about a minute)")
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # torch first, alone: installed after nnsight's resolution it could be some other (CUDA) build.
    done = _pip(python, f"torch=={TORCH_VERSION}")
    if done.returncode != 0:
        raise SystemExit(f"pip could not install torch=={TORCH_VERSION}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    torch_installed = _probe_one(python, "torch")
    # The same transformers as the server side, so both run the very same model code; pinning torch
    # to what is installed keeps pip from replacing it.
    done = _pip(python, f"nnsight=={NNSIGHT_VERSION}", f"torch=={torch_installed}",
                f"transformers=={transformers_version}")
    if done.returncode != 0:
        log(f"nnsight {NNSIGHT_VERSION} does not install with transformers=={transformers_version}; "
            "letting pip choose transformers")
        done = _pip(python, f"nnsight=={NNSIGHT_VERSION}", f"torch=={torch_installed}")
    if done.returncode != 0:
        raise SystemExit(f"pip could not install nnsight=={NNSIGHT_VERSION}:\n"
                         f"{done.stdout[-3000:]}{done.stderr[-3000:]}")
    found = _probe(python)
    if not found or found["torch"] != torch_installed:
        raise SystemExit(f"installing nnsight replaced torch {torch_installed} with {found and found['torch']}")
    return found


def _probe_one(python: Path, package: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({package!r}))"
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def run_nnsight_side(model_dir: Path, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    python = _venv_python(args.nnsight_venv)
    command = [str(python), str(NNSIGHT_SIDE), str(model_dir), "--prompt", PROMPT, "--repeat", str(args.repeat),
               "--warmup", str(args.warmup), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"the NNsight side failed (exit {done.returncode}):\n{done.stderr[-5000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- helpers ---------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[overhead] {message}", file=sys.stderr, flush=True)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def executor_runner(executor_class: Any, build_batch: Any, model: Any, tokenizer: Any,
                    graph: Any) -> Callable[[], dict[int, Any]]:
    """``Executor(...).run()`` on `graph`, its batch built inside the timed call as the server does.

    The executor takes either a ready batch or, with sessions (several forward passes in one request),
    a function from each segment to its batch; both are accepted, so this file outlives that change.
    """
    if "batch_for" in inspect.signature(executor_class).parameters:
        return lambda: executor_class(model, graph, lambda seg: build_batch(model, tokenizer, seg.invokes)).run()
    return lambda: executor_class(model, graph, build_batch(model, tokenizer, graph.invokes)).run()


def reference_forward(model: Any, input_ids: Any) -> tuple[Any, list[Any]]:
    """A plain forward's output and every decoder layer's output, taken with plain forward hooks."""
    import torch

    outputs: list[Any] = []
    layers = model.get_decoder().layers
    handles = [layer.register_forward_hook(lambda _m, _a, out: outputs.append(out)) for layer in layers]
    try:
        with torch.no_grad():
            result = model(input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return result, outputs


def _load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "?"


def profile(fn: Callable[[], object], calls: int, top: int = 15) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


# -- main ------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=20, help="measured rounds (median reported); default 20")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured rounds first; default 3")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads in both processes; default 1 (see bench/README.md)")
    parser.add_argument("--skip-nnsight", action="store_true", help="leave out (c) and the NNsight venv")
    parser.add_argument("--nnsight-venv", type=Path, default=NNSIGHT_VENV, help=f"default {NNSIGHT_VENV}")
    parser.add_argument("--profile", action="store_true",
                        help=f"profile the executor path even when (a)'s ratio is below {PROFILE_ABOVE}")
    args = parser.parse_args()
    if args.repeat < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--repeat and --threads must be positive, --warmup not negative")

    load_before = _load_average()
    # Before torch is imported: OpenMP reads these once, and threads started later (the gRPC server's,
    # the scheduler's) get the same count as the main thread. The NNsight subprocess inherits them.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    import transformers

    import farscope
    from farscope.interventions import codec
    from farscope.interventions.graph import to_document
    from farscope.interventions.validate import GraphLimits, validate
    from farscope.server.config import DEFAULT_MODEL
    from farscope.server.executor import Executor
    from farscope.server.inputs import build_batch
    from farscope.server.loading import load_model
    from farscope.server.replica import Replica
    from farscope.server.service import start_server

    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    log("loading smollm2-135m")
    loaded = load_model(DEFAULT_MODEL)
    model, tokenizer = loaded.model, loaded.tokenizer
    model_dir = Path(model.name_or_path)
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"expected the converted model directory at {model_dir}")
    layers = model.config.num_hidden_layers
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids

    replica = Replica(loaded)
    server = start_server({loaded.spec.name: replica}, port=0)
    try:
        remote = farscope.RemoteModel(loaded.spec.name, address=f"127.0.0.1:{server.port}")

        # (a)'s graph, recorded by the real client (this runs it once, remotely; the recorded graph stays
        # on the tracer) and turned into the bytes a request carries.
        # A graph that saves every layer's output ends the forward after the last layer, skipping the
        # final norm and lm_head (a fifth of the flops here); the same plus lm_head.output runs all of it.
        with remote.trace(PROMPT) as tracer:
            remote_saved = [remote.model.layers[i].output.save() for i in range(layers)]
        with remote.trace(PROMPT) as full_tracer:
            [remote.model.layers[i].output.save() for i in range(layers)]
            remote.lm_head.output.save()
        document = codec.encode(to_document(tracer.graph))
        full_document = codec.encode(to_document(full_tracer.graph))
        limits = GraphLimits(max_nodes=replica.limits.max_nodes)

        def decode_validate(data: bytes = document) -> Any:
            return validate(codec.decode(data), module_paths=replica.module_paths, limits=limits)

        graph = decode_validate()
        full_graph = decode_validate(full_document)

        def plain() -> object:
            with torch.no_grad():
                return model(input_ids)

        def plain_no_cache() -> object:
            with torch.no_grad():
                return model(input_ids, use_cache=False)

        def tokenize() -> object:
            return build_batch(model, tokenizer, graph.invokes)

        executor = executor_runner(Executor, build_batch, model, tokenizer, graph)
        executor_full = executor_runner(Executor, build_batch, model, tokenizer, full_graph)

        def replica_execute_full() -> object:
            return replica.execute(full_graph)

        def remote_embed() -> object:
            with remote.trace(PROMPT):
                h = remote.model.embed_tokens.output.save()
            return h.value

        def remote_layer5() -> object:
            with remote.trace(PROMPT):
                h = remote.model.layers[5].output.save()
            return h.value

        def remote_logits() -> object:
            with remote.trace(PROMPT):
                logits = remote.lm_head.output.save()
            return logits.value

        def remote_all_full() -> list:
            with remote.trace(PROMPT):
                saved = [remote.model.layers[i].output.save() for i in range(layers)]
                saved.append(remote.lm_head.output.save())
            return [s.value for s in saved]

        # Correctness before timing: every path returns the plain forward's values (layer outputs taken
        # by plain forward hooks: HF's hidden_states[-1] is after the final norm, not the last layer).
        reference, layer_outputs = reference_forward(model, input_ids)
        local = executor()
        saves = [n.id for n in graph.nodes if n.op == "save"]
        for i in range(layers):
            expected = layer_outputs[i]
            assert torch.equal(local[saves[i]], expected), f"executor: layer {i} differs"
            assert torch.equal(torch.as_tensor(remote_saved[i].value), expected), f"remote: layer {i} differs"
        assert torch.equal(torch.as_tensor(remote_layer5()), layer_outputs[5])
        assert torch.equal(torch.as_tensor(remote_logits()), reference.logits)
        full = executor_full()
        assert torch.equal(full[max(full)], reference.logits), "executor: logits differ"

        # Which thread count the forward really runs with inside the server's worker thread.
        server_threads: list[int] = []
        hook = model.get_input_embeddings().register_forward_hook(
            lambda *_: server_threads.append(torch.get_num_threads()))
        remote_layer5()
        hook.remove()

        variants: dict[str, Callable[[], object]] = {
            "plain": plain,
            "plain_no_cache": plain_no_cache,
            "tokenize": tokenize,
            "decode_validate": decode_validate,
            "executor": executor,
            "executor_full": executor_full,
            "replica_execute_full": replica_execute_full,
            "remote_embed": remote_embed,
            "remote_layer5": remote_layer5,
            "remote_logits": remote_logits,
            "remote_all_full": remote_all_full,
        }
        log(f"measuring {len(variants)} variants x {args.repeat} rounds (+{args.warmup} warm-up) in this process")
        times = interleaved(variants, args.repeat, args.warmup)
    finally:
        server.stop(0)

    nnsight: dict[str, Any] | None = None
    if not args.skip_nnsight:
        versions = ensure_nnsight_venv(args.nnsight_venv, transformers.__version__)
        log(f"measuring NNsight {versions['nnsight']} in {args.nnsight_venv} (subprocess)")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        nnsight = run_nnsight_side(model_dir, args, env)
        same = torch.allclose(torch.tensor(nnsight["last_logits_head"]), reference.logits[0, -1, :8], atol=1e-4)
        if not same or nnsight["max_abs_diff_vs_hooks"] > 1e-4:
            raise SystemExit(f"the NNsight side computed different values: {nnsight}")

    # -- report ------------------------------------------------------------------------------------
    print()
    print(f"farscope overhead on {loaded.spec.name} ({type(model).__name__}, {layers} layers, "
          f"{next(model.parameters()).dtype}, CPU), prompt {PROMPT!r} = {input_ids.shape[1]} tokens")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; python {platform.python_version()}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"threads: torch.set_num_threads({args.threads}) -> main {torch.get_num_threads()}, "
          f"server worker {server_threads[0] if server_threads else '?'}"
          + (f", nnsight process {nnsight['threads']}" if nnsight else ""))
    print(f"load average (1 min): {load_before} at start, {_load_average()} now; anything else running on these "
          "cores shows up as noise")
    print(f"timing: median of {args.repeat} interleaved rounds after {args.warmup} warm-up; ratio and added ms "
          "vs the first row of the same process")
    print(f"(a)'s graphs: {len(graph.nodes)} nodes, request document {len(document)} bytes; with lm_head "
          f"{len(full_graph.nodes)} nodes, {len(full_document)} bytes")
    print()
    rows = [
        Row(f"farscope, this process (torch {torch.__version__})", None),
        Row("plain forward: model(input_ids) under no_grad", times["plain"]),
        Row("  plain forward, use_cache=False (as the executor calls it)", times["plain_no_cache"]),
        Row(f"(a) executor: build_batch + run, save {layers} layer outputs *", times["executor"]),
        Row("(a) executor: same + lm_head.output (full forward)", times["executor_full"]),
        Row("      build_batch alone (tokenize)", times["tokenize"], ratio=False),
        Row(f"      decode + validate the {layers}-layer request", times["decode_validate"], ratio=False),
        Row("    Replica.execute, full forward (build_batch + run + encode)", times["replica_execute_full"]),
        Row("(b) remote trace, gRPC loopback, save embed_tokens.output *", times["remote_embed"], ratio=False),
        Row("(b) remote trace, gRPC loopback, save layers[5].output *", times["remote_layer5"]),
        Row("(b) remote trace, gRPC loopback, save lm_head.output", times["remote_logits"]),
        Row(f"(b) remote trace, gRPC loopback, {layers} layers + lm_head", times["remote_all_full"]),
    ]
    if nnsight:
        rows += [
            Row(f"nnsight {nnsight['nnsight']}, subprocess (torch {nnsight['torch']}, "
                f"transformers {nnsight['transformers']})", None),
            Row("plain forward: model(input_ids) under no_grad", nnsight["times"]["plain"]),
            Row(f"(c) nnsight trace, save {layers} layer outputs", nnsight["times"]["trace_all"]),
            Row(f"(c) nnsight trace under no_grad, save {layers} layer outputs",
                nnsight["times"]["trace_all_no_grad"]),
        ]
    print_table(rows)
    print()
    print("* the executor stops the forward pass once nothing later is needed: right after the embeddings for\n"
          "  embed_tokens (so that row is about the fixed cost of a round trip), after layer 5 for layers[5], and\n"
          "  before the final norm and lm_head for the 30 layer outputs. Ratios below 1 there are that early stop,\n"
          "  not a free lunch; the rows with lm_head.output run the whole forward, as plain PyTorch and NNsight do.")

    ratio_a = statistics.median(times["executor_full"]) / statistics.median(times["plain"])
    if args.profile or ratio_a > PROFILE_ABOVE:
        calls = max(10, args.repeat)
        print(f"\n(a)'s ratio is {ratio_a:.2f}x: cProfile of {calls} full-forward executor runs, top costs by own time")
        print(profile(executor_full, calls))
        print(f"for contrast, cProfile of {calls} plain forwards")
        print(profile(plain, calls))
    log(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
