"""Load: many concurrent clients against one in-process server, co-batching on and off side by side.

Run by hand: ``.venv/bin/python bench/load.py [--model tiny|smollm2] [--clients 64] [--requests 20]``.

Each client is a thread with its own `RemoteModel` (its own gRPC channel) sending a fixed, mixed
sequence of requests: reads, ablations, steering, activation patching across two invokes, and short
generations (a few tokens, steered on every step for half of them). Every distinct request is first
run alone, one after another, and every result of the load run must be `torch.equal` to its solo
result. The same replica is then served twice, with co-batching on and off (one server each, one
after the other), and the table shows throughput and latency percentiles side by side.

Everything is bounded: per-request gRPC deadlines, a start barrier with a timeout, and one overall
deadline per run (`--timeout`). The exit status is 1 if any request failed, differed from its solo
run, or did not finish in time.

One torch intra-op thread by default (as bench/overhead.py): with two or more, a batched matmul may
split its work differently from a one-row matmul, so co-batched rows can differ from solo runs in the
last bits (seen with 6-token inputs of the tiny model; `--threads 2` to try).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import farscope
from farscope.server.config import DEFAULT_MODEL, ModelSpec
from farscope.server.loading import load_model
from farscope.server.replica import Replica
from farscope.server.service import start_server

HERE = Path(__file__).resolve().parent
KINDS = ("read", "ablate", "steer", "patch", "generate")
VARIANTS = 8  # per kind: 40 distinct requests, each sent many times
LENGTHS = (8, 12)  # input token counts: only requests of one length can share a forward pass


# -- the model -------------------------------------------------------------------------------------


def _tiny_llama(root: Path) -> ModelSpec:
    """The tests' tiny random Llama (tests/conftest.py builds it: same config, seed and tokenizer)."""
    spec = importlib.util.spec_from_file_location("_farscope_test_fixtures", HERE.parent / "tests" / "conftest.py")
    fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixtures)
    from transformers import AutoModelForCausalLM

    vocab_size = fixtures._build_tokenizer(root / "tokenizer")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(fixtures._tiny_config("llama", vocab_size))
    model.save_pretrained(root / "llama")
    for file in (root / "tokenizer").iterdir():
        (root / "llama" / file.name).write_bytes(file.read_bytes())
    return ModelSpec(name="tiny-llama", source=str(root / "llama"))


# -- the requests ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    kind: str
    variant: int
    length: int

    @property
    def label(self) -> str:
        return f"{self.kind}/{self.variant}/{self.length}"


def _plan(client: int, count: int) -> list[Request]:
    """Client `client`'s requests: every kind in turn, variants spread over clients."""
    requests = []
    for r in range(count):
        index = client * count + r
        variant = (index // len(KINDS) + client) % VARIANTS
        requests.append(Request(KINDS[index % len(KINDS)], variant, LENGTHS[variant % len(LENGTHS)]))
    return requests


def _ids(seed: int, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab - 3, (1, length), generator=torch.Generator().manual_seed(seed))


def _vec(seed: int, hidden: int) -> torch.Tensor:
    return 2 * torch.randn(hidden, generator=torch.Generator().manual_seed(10_000 + seed))


def run_request(model: farscope.RemoteModel, request: Request, *, gen_tokens: int) -> dict[str, torch.Tensor]:
    """Send one request; returns its saved values by name."""
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    layers = model.model.layers
    seed, length = request.variant, request.length
    saved: dict[str, Any] = {}
    if request.kind == "generate":
        with model.generate(_ids(seed, length, vocab), max_new_tokens=gen_tokens) as tracer:
            if seed % 2:
                for _ in tracer.all():
                    layers[1].output[:, -1] += _vec(seed, hidden)
            saved["tokens"] = tracer.result.save()
    elif request.kind == "patch":  # the first invoke's residual patched into the second, one pass
        with model.trace() as tracer:
            with tracer.invoke(_ids(seed, length, vocab)):
                resid = layers[1].output[:, -1]
            with tracer.invoke(_ids(seed + 100, length, vocab)):
                layers[1].output[:, -1] = resid
                saved["logits"] = model.lm_head.output[:, -1].save()
    else:
        with model.trace(_ids(seed, length, vocab)):
            if request.kind == "read":
                saved["h0"] = layers[0].output.save()
            elif request.kind == "ablate":
                layers[0].mlp.output[:, -1] = 0
            else:
                layers[1].output[:, -1] += _vec(seed, hidden)
            saved["logits"] = model.lm_head.output[:, -1].save()
    return {name: proxy.value for name, proxy in saved.items()}


# -- one load run ----------------------------------------------------------------------------------


class _Batches(logging.Handler):
    """Counts the scheduler's "co-batching N jobs" lines."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.sizes: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = re.match(r"co-batching (\d+) jobs", record.getMessage())
        if match:
            self.sizes.append(int(match.group(1)))


@dataclass
class Outcome:
    mode: str
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    max_diff: float = 0.0
    unfinished: int = 0
    seconds: float = 0.0
    forwards: int = 0
    batches: list[int] = field(default_factory=list)

    @property
    def done(self) -> int:
        return len(self.latencies)

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))] * 1e3


def _compare(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float | None:
    """None if equal; else the largest absolute difference (inf if the keys or shapes differ)."""
    if got.keys() != expected.keys():
        return float("inf")
    worst = 0.0
    for name, value in got.items():
        if torch.equal(value, expected[name]):
            continue
        if value.shape != expected[name].shape or value.dtype != expected[name].dtype:
            return float("inf")
        worst = max(worst, (value.double() - expected[name].double()).abs().max().item())
    return None if worst == 0.0 else worst


def load_run(replica: Replica, *, cobatch: bool, clients: int, count: int, solo: dict[Request, dict],
             args: argparse.Namespace) -> Outcome:
    outcome = Outcome("co-batching on" if cobatch else "co-batching off")
    forwards = [0]
    handle = replica.model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    batches = _Batches()
    scheduler_log = logging.getLogger("farscope.server.scheduler")
    scheduler_log.addHandler(batches)
    scheduler_log.setLevel(logging.INFO)
    server = start_server({replica.name: replica}, host="127.0.0.1", port=0, cobatch=cobatch)
    lock = threading.Lock()
    deadline = [0.0]
    started = [0.0]

    def start_clock() -> None:  # run by one thread once every client is connected, before any goes
        forwards[0] = 0
        started[0] = time.perf_counter()
        deadline[0] = time.monotonic() + args.timeout
    barrier = threading.Barrier(clients + 1, action=start_clock, timeout=120)

    def client(index: int) -> None:
        model = None
        try:
            model = farscope.RemoteModel(replica.name, address=f"127.0.0.1:{server.port}",
                                         timeout=args.request_timeout)
            model.config  # noqa: B018 - parsed once, before the clock starts
            barrier.wait()
            for request in _plan(index, count):
                if time.monotonic() > deadline[0]:
                    with lock:
                        outcome.failures.append(f"client {index}: out of time")
                    return
                start = time.perf_counter()
                try:
                    got = run_request(model, request, gen_tokens=args.gen_tokens)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    with lock:
                        outcome.failures.append(f"client {index} {request.label}: {type(e).__name__}: {e}")
                    continue
                elapsed = time.perf_counter() - start
                diff = _compare(got, solo[request])
                with lock:
                    outcome.latencies.append(elapsed)
                    if diff is not None:
                        outcome.mismatches.append(request.label)
                        outcome.max_diff = max(outcome.max_diff, diff)
        except threading.BrokenBarrierError:
            with lock:
                outcome.failures.append(f"client {index}: the start barrier broke")
        except Exception as e:  # noqa: BLE001 - e.g. could not connect
            with lock:
                outcome.failures.append(f"client {index}: {type(e).__name__}: {e}")
            barrier.abort()
        finally:
            if model is not None:
                model.close()

    try:
        threads = [threading.Thread(target=client, args=(i,), name=f"load-client-{i}", daemon=True)
                   for i in range(clients)]
        for thread in threads:
            thread.start()
        barrier.wait()  # every client connected: the clock starts
        for thread in threads:
            thread.join(timeout=max(0.0, deadline[0] + args.request_timeout - time.monotonic()))
        outcome.seconds = time.perf_counter() - started[0]
        outcome.unfinished = sum(thread.is_alive() for thread in threads)
        outcome.forwards = forwards[0]
        outcome.batches = list(batches.sizes)
    finally:
        server.stop(grace=1)
        scheduler_log.removeHandler(batches)
        handle.remove()
    return outcome


# -- main ------------------------------------------------------------------------------------------


def _row(label: str, on: str, off: str, ratio: str = "") -> str:
    return f"  {label:<30}{on:>16}{off:>17}{ratio:>10}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny",
                        help="tiny: the tests' tiny random Llama (default); smollm2: the embedded smollm2-135m")
    parser.add_argument("--clients", type=int, default=64, help="concurrent client threads (default 64)")
    parser.add_argument("--requests", type=int, default=20, help="requests per client (default 20)")
    parser.add_argument("--gen-tokens", type=int, default=3, help="tokens per generation request (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="gRPC deadline per request (s)")
    parser.add_argument("--timeout", type=float, default=600.0, help="deadline of each load run (s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("FARSCOPE_PROGRESS", "0")

    with tempfile.TemporaryDirectory(prefix="farscope-load-") as tmp:
        spec = _tiny_llama(Path(tmp)) if args.model == "tiny" else DEFAULT_MODEL
        replica = Replica(load_model(spec))

        # Every distinct request, alone: one client, one request at a time.
        plans = [_plan(c, args.requests) for c in range(args.clients)]
        distinct = sorted({r for plan in plans for r in plan}, key=lambda r: (r.kind, r.variant))
        solo_server = start_server({replica.name: replica}, host="127.0.0.1", port=0, cobatch=False)
        try:
            with farscope.RemoteModel(replica.name, address=f"127.0.0.1:{solo_server.port}",
                                      timeout=args.request_timeout) as model:
                started = time.perf_counter()
                solo = {request: run_request(model, request, gen_tokens=args.gen_tokens) for request in distinct}
                solo_seconds = time.perf_counter() - started
        finally:
            solo_server.stop(grace=1)

        on = load_run(replica, cobatch=True, clients=args.clients, count=args.requests, solo=solo, args=args)
        off = load_run(replica, cobatch=False, clients=args.clients, count=args.requests, solo=solo, args=args)

    kinds = ", ".join(KINDS[:-1]) + f", generate ({args.gen_tokens} tokens)"
    print(f"farscope load: {replica.name} ({replica.architecture}), {args.clients} clients x {args.requests} "
          f"requests, mixed: {kinds}")
    print(f"  one in-process server (grpc.aio: no thread per stream), real gRPC on loopback; torch threads "
          f"{args.threads}; {os.cpu_count()} CPUs; Python {platform.python_version()}, torch {torch.__version__}")
    print(f"  {len(distinct)} distinct requests run alone first: {solo_seconds:.1f} s "
          f"({len(distinct) / solo_seconds:.1f} req/s, one at a time)")
    print()
    print(_row("", "co-batching on", "co-batching off", "on/off"))
    total = args.clients * args.requests
    print(_row("requests finished", f"{on.done}/{total}", f"{off.done}/{total}"))
    print(_row("failures", str(len(on.failures)), str(len(off.failures))))
    print(_row("results != solo run", str(len(on.mismatches)), str(len(off.mismatches))))
    print(_row("wall time (s)", f"{on.seconds:.2f}", f"{off.seconds:.2f}", f"{on.seconds / off.seconds:.2f}"))
    on_rate, off_rate = on.done / on.seconds, off.done / off.seconds
    print(_row("throughput (req/s)", f"{on_rate:.1f}", f"{off_rate:.1f}", f"{on_rate / off_rate:.2f}"))
    for p in (50, 99):
        a, b = on.percentile(p), off.percentile(p)
        print(_row(f"p{p} latency (ms)", f"{a:.1f}", f"{b:.1f}", f"{a / b:.2f}"))
    print(_row("model forward calls", str(on.forwards), str(off.forwards), f"{on.forwards / max(off.forwards, 1):.2f}"))
    merged = sum(on.batches)
    mean = f"{statistics.mean(on.batches):.1f}" if on.batches else "-"
    print(_row("co-batched passes (jobs)", f"{len(on.batches)} ({merged})", f"{len(off.batches)} ({sum(off.batches)})"))
    print(_row("mean jobs per co-batched pass", mean, "-"))

    bad = False
    for outcome in (on, off):
        if outcome.failures or outcome.mismatches or outcome.unfinished:
            bad = True
            print(f"\n{outcome.mode}: {len(outcome.failures)} failures, {len(outcome.mismatches)} results differing "
                  f"from their solo runs (largest difference {outcome.max_diff:.3g}), {outcome.unfinished} clients "
                  "unfinished", file=sys.stderr)
            for line in outcome.failures[:5]:
                print(f"  {line}", file=sys.stderr)
            if outcome.mismatches:
                print(f"  differing: {', '.join(sorted(set(outcome.mismatches))[:10])}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
