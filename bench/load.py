"""Load: many concurrent clients against one in-process server, co-batching on and off side by side;
or, with ``--adversarial``, honest clients with and without one attacker among them.

Run by hand: ``.venv/bin/python bench/load.py [--model tiny|smollm2] [--clients 64] [--requests 20]``,
``.venv/bin/python bench/load.py --adversarial [--clients 8] [--requests 20]``.

Each client is a thread with its own `RemoteModel` (its own gRPC channel) sending a fixed, mixed
sequence of requests: reads, ablations, steering, activation patching across two invokes, and short
generations (a few tokens, steered on every step for half of them). Every distinct request is first
run alone, one after another, and every result of the load run must be `torch.equal` to its solo
result. The same replica is then served twice, with co-batching on and off (one server each, one
after the other), and the table shows throughput and latency percentiles side by side.

Adversarial mode: every client has its own API key (fairness is between keys), co-batching on. The same
honest clients run twice, alone and then with one more key, the attacker, which holds idle streams
open the whole time (Execute streams that never send a header, Watch streams on its running job) and
loops over long steered generations (``--attack-tokens``) and an operator op on plain integers,
``pow(10, --pow-exponent)`` (0 leaves it out), until the honest clients are done. The table shows
the honest clients' throughput and latency percentiles without and with the attacker.

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

import grpc
import torch

import farscope
from farscope.interventions import codec
from farscope.interventions.graph import IR_VERSION, HookPoint, Ref
from farscope.proto import farscope_pb2 as pb
from farscope.proto import farscope_pb2_grpc as pb_grpc
from farscope.server.auth import KeyStore
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
    attacks: dict[str, int] = field(default_factory=dict)  # what the attacker did, by kind

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
             args: argparse.Namespace, mode: str | None = None, keys: KeyStore | None = None,
             attack: bool = False) -> Outcome:
    """One load run. With `keys`, each client gets its own key ("client<i>"); with `attack` (keys
    needed) one more key, "attacker", runs `Attacker` until the clients are done."""
    outcome = Outcome(mode or ("co-batching on" if cobatch else "co-batching off"))
    api_keys = [keys.add(f"client{i}", rate_per_minute=10**6, max_concurrent=100) if keys else None
                for i in range(clients)]
    forwards = [0]
    handle = replica.model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    batches = _Batches()
    scheduler_log = logging.getLogger("farscope.server.scheduler")
    scheduler_log.addHandler(batches)
    scheduler_log.setLevel(logging.INFO)
    server = start_server({replica.name: replica}, host="127.0.0.1", port=0, cobatch=cobatch, keys=keys)
    attacker = None
    if attack:
        assert keys is not None, "an attacker needs keys: fairness is between keys"
        attacker = Attacker(f"127.0.0.1:{server.port}", replica.name,
                            keys.add("attacker", rate_per_minute=10**6, max_concurrent=100), args)
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
                                         timeout=args.request_timeout, api_key=api_keys[index])
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
        if attacker is not None:
            attacker.start()
        for thread in threads:
            thread.join(timeout=max(0.0, deadline[0] + args.request_timeout - time.monotonic()))
        outcome.seconds = time.perf_counter() - started[0]
        if attacker is not None:
            outcome.attacks = attacker.stop()
        outcome.unfinished = sum(thread.is_alive() for thread in threads)
        outcome.forwards = forwards[0]
        outcome.batches = list(batches.sizes)
    finally:
        if attacker is not None:
            attacker.stop()
        server.stop(grace=1)
        scheduler_log.removeHandler(batches)
        handle.remove()
    return outcome


# -- the attacker (adversarial mode) ---------------------------------------------------------------


class Attacker:
    """One hostile key: idle streams held open, then long generations and `pow` on plain integers in a
    loop, until `stop()`. Returns counts of what it did, by kind (and its failures, by error class)."""

    IDLE_STREAMS = 40

    def __init__(self, address: str, model: str, api_key: str, args: argparse.Namespace) -> None:
        self.address, self.model_name, self.api_key, self.args = address, model, api_key, args
        self.done = threading.Event()
        self.counts: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, name="load-attacker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> dict[str, int]:
        self.done.set()
        self._thread.join(timeout=self.args.request_timeout + 30)
        return dict(self.counts)

    def _count(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def _run(self) -> None:
        metadata = (("authorization", f"Bearer {self.api_key}"),)
        channel = grpc.insecure_channel(self.address)
        stub = pb_grpc.FarscopeStub(channel)
        model = farscope.RemoteModel(self.model_name, address=self.address, api_key=self.api_key,
                                     timeout=self.args.request_timeout)

        def silent():  # an Execute stream that never sends its header
            self.done.wait(self.args.timeout)
            yield from ()
        calls = [stub.Execute(silent(), metadata=metadata) for _ in range(self.IDLE_STREAMS)]
        self.counts["idle Execute streams"] = len(calls)
        try:
            seed = 0
            while not self.done.is_set():
                seed += 1
                try:
                    with model.generate(_ids(seed, 8, model.config.vocab_size), max_new_tokens=self.args.attack_tokens,
                                        min_new_tokens=self.args.attack_tokens, blocking=False) as tracer:
                        for _ in tracer.all():
                            model.model.layers[1].output[:, -1] += 0.25
                        tracer.result.save()
                    if len(calls) < 2 * self.IDLE_STREAMS:  # Watch streams on its own running job
                        calls += [stub.Watch(pb.JobRequest(job_id=tracer.job.id), metadata=metadata)
                                  for _ in range(self.IDLE_STREAMS)]
                        self.counts["idle Watch streams"] = self.IDLE_STREAMS
                    tracer.job.wait(timeout=self.args.request_timeout)
                    self._count("long generations")
                except farscope.FarscopeError as e:
                    self._count(f"failed: {type(e).__name__}")
                if self.args.pow_exponent and not self.done.is_set():
                    self._pow(stub, metadata)
        finally:
            for call in calls:
                call.cancel()
            model.close()
            channel.close()

    def _pow(self, stub: pb_grpc.FarscopeStub, metadata: tuple) -> None:
        where = "attacker.py:1"
        document = codec.encode({"version": IR_VERSION, "invokes": [[5, 6, 7, 8]], "nodes": [
            ["read", (HookPoint("lm_head", "output"),), {"invoke": 0}, where],
            ["pow", (10, self.args.pow_exponent), {}, where],
            ["gt", (Ref(1), 5), {}, where],
            ["save", (Ref(2),), {}, where],
        ]})
        header = pb.ExecuteRequest(header=pb.RequestHeader(model=self.model_name, client_version="attacker",
                                                           ir_version=IR_VERSION, graph_bytes=len(document)))
        try:
            for _ in stub.Execute(iter([header, pb.ExecuteRequest(graph_chunk=document)]), metadata=metadata,
                                  timeout=self.args.request_timeout):
                pass
            self._count(f"pow(10, {self.args.pow_exponent}) run")
        except grpc.RpcError as e:
            self._count(f"pow(10, {self.args.pow_exponent}) refused: {e.code().name}")


# -- main ------------------------------------------------------------------------------------------


def _row(label: str, on: str, off: str, ratio: str = "") -> str:
    return f"  {label:<30}{on:>16}{off:>17}{ratio:>14}"


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
    parser.add_argument("--adversarial", action="store_true",
                        help="honest clients without and with one attacker (keys on, co-batching on)")
    parser.add_argument("--attack-tokens", type=int, default=100,
                        help="tokens of each of the attacker's steered generations (default 100)")
    parser.add_argument("--pow-exponent", type=int, default=10**7,
                        help="the attacker's pow(10, N) on plain integers (default 10**7; 0: none)")
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

        run = dict(clients=args.clients, count=args.requests, solo=solo, args=args)
        if args.adversarial:
            stores = [KeyStore(Path(tmp) / f"keys-{i}.db") for i in range(2)]
            try:
                first = load_run(replica, cobatch=True, mode="honest only", keys=stores[0], **run)
                second = load_run(replica, cobatch=True, mode="with attacker", keys=stores[1], attack=True, **run)
            finally:
                for store in stores:
                    store.close()
        else:
            first = load_run(replica, cobatch=True, **run)
            second = load_run(replica, cobatch=False, **run)

    kinds = ", ".join(KINDS[:-1]) + f", generate ({args.gen_tokens} tokens)"
    print(f"farscope load: {replica.name} ({replica.architecture}), {args.clients} clients x {args.requests} "
          f"requests, mixed: {kinds}")
    print(f"  one in-process server (grpc.aio: no thread per stream), real gRPC on loopback; torch threads "
          f"{args.threads}; {os.cpu_count()} CPUs; Python {platform.python_version()}, torch {torch.__version__}")
    print(f"  {len(distinct)} distinct requests run alone first: {solo_seconds:.1f} s "
          f"({len(distinct) / solo_seconds:.1f} req/s, one at a time)")
    if args.adversarial:
        pow_part = f", pow(10, {args.pow_exponent})" if args.pow_exponent else ""
        print(f"  adversarial: one key per client, co-batching on; the attacker holds {Attacker.IDLE_STREAMS} idle "
              f"Execute + {Attacker.IDLE_STREAMS} Watch streams and loops over {args.attack_tokens}-token steered "
              f"generations{pow_part}")
    print()
    def ratio(a: float, b: float) -> str:  # on/off for co-batching; with/without for the attacker
        return f"{b / a:.2f}" if args.adversarial else f"{a / b:.2f}"
    print(_row("", first.mode, second.mode, "with/without" if args.adversarial else "on/off"))
    total = args.clients * args.requests
    print(_row("requests finished", f"{first.done}/{total}", f"{second.done}/{total}"))
    print(_row("failures", str(len(first.failures)), str(len(second.failures))))
    print(_row("results != solo run", str(len(first.mismatches)), str(len(second.mismatches))))
    print(_row("wall time (s)", f"{first.seconds:.2f}", f"{second.seconds:.2f}", ratio(first.seconds, second.seconds)))
    first_rate, second_rate = first.done / first.seconds, second.done / second.seconds
    print(_row("throughput (req/s)", f"{first_rate:.1f}", f"{second_rate:.1f}", ratio(first_rate, second_rate)))
    for p in (50, 99, 100):
        a, b = first.percentile(p), second.percentile(p)
        label = "max latency (ms)" if p == 100 else f"p{p} latency (ms)"
        print(_row(label, f"{a:.1f}", f"{b:.1f}", ratio(a, b)))
    if args.adversarial:
        done = ", ".join(f"{kind}: {n}" for kind, n in second.attacks.items()) or "nothing"
        print(f"\n  the attacker, meanwhile: {done}")
    else:
        print(_row("model forward calls", str(first.forwards), str(second.forwards),
                   f"{first.forwards / max(second.forwards, 1):.2f}"))
        merged = sum(first.batches)
        mean = f"{statistics.mean(first.batches):.1f}" if first.batches else "-"
        print(_row("co-batched passes (jobs)", f"{len(first.batches)} ({merged})",
                   f"{len(second.batches)} ({sum(second.batches)})"))
        print(_row("mean jobs per co-batched pass", mean, "-"))

    bad = False
    for outcome in (first, second):
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
