"""A keyed server of this folder's own (loopback, the tiny Llama) and an honest co-tenant that measures
its latency (conftest.py makes the fixture from `serve`).

Two API keys: "attacker" runs an attack, "honest" runs one small trace in a loop meanwhile (its own
client, its own channel). Everything runs in this process, so the resident memory read from
/proc/self/statm is the server's (plus the clients').

One torch intra-op thread while this folder runs (as tests/fuzz): on a small shared machine several
intra-op threads only contend, and with one thread the honest trace's values are bit-identical from
run to run and whoever shares its pass. Not the session's shared `tiny_server`, for the reason
tests/fuzz/conftest.py gives.
"""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

import farscope
from farscope.proto import farscope_pb2_grpc as pb_grpc
from farscope.server.auth import KeyStore
from farscope.server.config import Limits
from farscope.server.loading import load_model
from farscope.server.replica import Replica
from farscope.server.scheduler import Scheduler
from farscope.server.service import SERVICE_NAME, Server, start_server

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fuzz"))  # tests/fuzz/fuzz_requests.py

MODEL = "tiny"
LIMITS = Limits(max_request_bytes=64 * 2**20, max_wall_seconds=20.0)
HONEST_IDS = torch.tensor([[17, 42, 99, 123, 7, 311]])  # the honest co-tenant's 6 tokens
BASELINE_RUNS = 30
PAGE = os.sysconf("SC_PAGE_SIZE")


def _libc_trim() -> Callable[[], object]:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # glibc
    except (OSError, AttributeError):
        return lambda: None


_TRIM = _libc_trim()


def resident_bytes() -> int:
    """This process's resident memory, after a full garbage collection and after glibc hands its free
    heap pages back: memory the allocator keeps for reuse is free memory, not memory the server holds
    (seen: +170 MiB kept by malloc after 4 MiB request chunks were freed, 0 after the trim)."""
    gc.collect()
    _TRIM(0)
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * PAGE


def p99(latencies: list[float]) -> float:
    """The 99th percentile, nearest rank (so the largest of fewer than 100 samples)."""
    ordered = sorted(latencies)
    return ordered[max(0, -(-99 * len(ordered) // 100) - 1)]


def honest_trace(model: farscope.RemoteModel) -> tuple[torch.Tensor, torch.Tensor]:
    with model.trace(HONEST_IDS):
        hidden = model.model.layers[0].output.save()
        logits = model.lm_head.output.save()
    return hidden.value, logits.value


def reference(local: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The honest trace's values from plain PyTorch hooks on a local copy of the model."""
    seen: dict[str, torch.Tensor] = {}
    handles = [local.get_submodule(path).register_forward_hook(
        lambda module, args, output, path=path: seen.__setitem__(path, (output[0] if isinstance(output, tuple)
                                                                        else output).detach().clone()))
        for path in ("model.layers.0", "lm_head")]
    try:
        with torch.no_grad():
            local(input_ids=HONEST_IDS, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen["model.layers.0"], seen["lm_head"]


@dataclass
class Tenancy:
    """What the honest co-tenant saw during one attack."""

    latencies: list[float] = field(default_factory=list)
    after: int = 0  # requests served after the attack ended
    wrong: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def p99(self) -> float:
        return p99(self.latencies) if self.latencies else float("inf")

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies) if self.latencies else float("inf")


@dataclass
class CoTenancy:
    server: Server
    keys: dict[str, str]
    expected: tuple[torch.Tensor, torch.Tensor]  # the honest trace's values, alone, before any attack
    baseline: Tenancy
    channel: grpc.Channel
    figures: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def scheduler(self) -> Scheduler:
        return self.server.engine.schedulers[MODEL]

    @property
    def replica(self) -> Replica:
        return self.server.engine.replicas[MODEL]

    def model(self, user: str, **options: object) -> farscope.RemoteModel:
        return farscope.RemoteModel(MODEL, address=self.address, api_key=self.keys[user],
                                    **{"timeout": 120, **options})

    def metadata(self, user: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.keys[user]}"),)

    def stub(self) -> pb_grpc.FarscopeStub:
        return pb_grpc.FarscopeStub(self.channel)

    def health(self, timeout: float = 5.0) -> int:
        status = health_pb2_grpc.HealthStub(self.channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout).status
        return status

    def honest_loop(self, stop: threading.Event, *, deadline: float, ready: threading.Event | None = None,
                    max_requests: int = 2000) -> Tenancy:
        """The honest co-tenant: its small trace again and again until `stop` (then at least three more,
        served after the attack), `deadline` or `max_requests`. `ready` is set once it is connected and
        warm: the attack starts then, so that every honest call it can delay is timed."""
        seen = Tenancy()
        with self.model("honest") as model:
            honest_trace(model)  # connected, described: its first call is not a latency
            if ready is not None:
                ready.set()
            while len(seen.latencies) < max_requests and time.monotonic() < deadline:
                if stop.is_set():
                    if seen.after >= 3:
                        break
                    seen.after += 1
                started = time.perf_counter()
                try:
                    values = honest_trace(model)
                except farscope.FarscopeError as e:
                    seen.errors.append(f"{type(e).__name__}: {e}"[:300])
                    continue
                seen.latencies.append(time.perf_counter() - started)
                if not all(torch.equal(a, b) for a, b in zip(values, self.expected, strict=True)):
                    seen.wrong += 1
        return seen


def serve(tiny_spec: Callable[..., object], key_dir: Path) -> Iterator[CoTenancy]:
    """The server, the keys, the honest trace's expected values and its baseline latency."""
    spec = tiny_spec("llama", name=MODEL, limits=LIMITS)
    local = load_model(spec).model
    store = KeyStore(key_dir / "keys.db")
    keys = {user: store.add(user, rate_per_minute=1_000_000, max_concurrent=500) for user in ("honest", "attacker")}
    server = start_server({MODEL: Replica(load_model(spec))}, host="127.0.0.1", port=0, keys=store)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}", options=[("grpc.max_send_message_length", -1)])
    try:
        with farscope.RemoteModel(MODEL, address=f"127.0.0.1:{server.port}", api_key=keys["honest"]) as model:
            expected = honest_trace(model)
            for got, want in zip(expected, reference(local), strict=True):  # right, not only repeatable
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
            baseline = Tenancy()
            for _ in range(BASELINE_RUNS):
                started = time.perf_counter()
                values = honest_trace(model)
                baseline.latencies.append(time.perf_counter() - started)
                assert all(torch.equal(a, b) for a, b in zip(values, expected, strict=True))
        yield CoTenancy(server, keys, expected, baseline, channel)
    finally:
        channel.close()
        server.stop(grace=1)
        store.close()
