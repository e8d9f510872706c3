"""Faults on real servers with tiny models: clients that die, servers that drain, jobs that fail,
are cancelled, run out of time, or outlive their clients.

A process that must die is a real subprocess (SIGKILL, SIGTERM). Everything is bounded: every wait
has a timeout, every loop a deadline.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import farscope
from farscope.server.config import Limits
from farscope.server.loading import load_model
from farscope.server.replica import Replica
from farscope.server.service import Server, start_server

MODEL = "tiny-llama"
LIMITED = "tiny-llama-limited"  # the same weights, with max_wall_seconds=0.5
PROMPT = "When Mary and John went to the store"  # 9 tokens with the tiny tokenizer
SHORT_PROMPT = "The quick brown fox"  # 8 tokens
# Prompt + generated tokens stay below the tiny models' 128 positions.
LONG_STEPS = 110

CHILD_ENV = {**os.environ, "FARSCOPE_PROGRESS": "0", "PYTHONUNBUFFERED": "1"}


def _until(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Probe:
    """Forward pre-hook on a server model: counts calls (by input length) and can slow each one."""

    delay: float = 0.0
    lengths: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        with self.lock:
            self.lengths.append(int(ids.shape[-1]) if isinstance(ids, torch.Tensor) else -1)
        if self.delay:
            time.sleep(self.delay)

    def count(self, length: int | None = None) -> int:
        with self.lock:
            return len(self.lengths) if length is None else sum(1 for n in self.lengths if n == length)


@dataclass
class FaultServer:
    server: Server
    probes: dict[str, Probe]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def model(self, name: str = MODEL) -> farscope.RemoteModel:
        return farscope.RemoteModel(name, address=self.address, timeout=60)

    def job(self, job_id: str):  # the server's own record of a job
        return self.server.engine.jobs.get(job_id)


@pytest.fixture(scope="module")
def fault_server(tiny_spec) -> Iterator[FaultServer]:
    replicas = {
        MODEL: Replica(load_model(tiny_spec("llama", name=MODEL))),
        LIMITED: Replica(load_model(tiny_spec("llama", name=LIMITED, limits=Limits(max_wall_seconds=0.5)))),
    }
    probes = {name: Probe() for name in replicas}
    handles = [r.model.register_forward_pre_hook(probes[name], with_kwargs=True) for name, r in replicas.items()]
    server = start_server(replicas, host="127.0.0.1", port=0)
    try:
        yield FaultServer(server, probes)
    finally:
        server.stop(grace=1)
        for handle in handles:
            handle.remove()


@pytest.fixture
def fs(fault_server: FaultServer) -> Iterator[FaultServer]:
    yield fault_server
    for probe in fault_server.probes.values():
        probe.delay = 0.0


def _generate(model: farscope.RemoteModel, steps: int, prompt: str = PROMPT) -> torch.Tensor:
    with model.generate(prompt, max_new_tokens=steps, min_new_tokens=steps) as tracer:
        tokens = tracer.result.save()
    return tokens.value


def _read(model: farscope.RemoteModel, prompt: str = SHORT_PROMPT) -> torch.Tensor:
    with model.trace(prompt):
        logits = model.lm_head.output.save()
    return logits.value


class _Lines:
    """A subprocess's stdout lines, read on a thread so that waiting for one is bounded."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []

        def pump() -> None:
            for line in process.stdout:
                self.lines.put(line.rstrip("\n"))
            self.lines.put(None)
        threading.Thread(target=pump, daemon=True).start()

    def wait_for(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line starting with {prefix!r} within {timeout} s; got {self.seen}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"the process ended before printing {prefix!r}; got {self.seen}")
            self.seen.append(line)
            if line.startswith(prefix):
                return line


@contextmanager
def _popen(args: list[str], **kwargs) -> Iterator[subprocess.Popen]:
    process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=CHILD_ENV, **kwargs)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


# -- (a) a client killed mid-stream; a new process fetches its job by id ---------------------------

_STREAMING_CLIENT = """
import functools, sys
import farscope
address, name, prompt, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model = farscope.RemoteModel(name, address=address, timeout=120)
def on_event(event):  # test instrumentation: the job id and the progress the stream delivers
    kind = event.WhichOneof("event")
    if kind == "queued":
        print("JOB", event.queued.job_id, flush=True)
    elif kind == "progress" and event.progress.step <= 5:
        print("STEP", event.progress.step, flush=True)
model._transport.execute = functools.partial(model._transport.execute, on_event=on_event)
with model.generate(prompt, max_new_tokens=steps, min_new_tokens=steps) as tracer:
    tokens = tracer.result.save()
print("FINISHED", flush=True)
"""

_FETCHING_CLIENT = """
import json, sys
import farscope
address, name = sys.argv[1:3]
print("READY", flush=True)
job_id = sys.stdin.readline().strip()  # started early (imports take seconds), told the job id later
with farscope.RemoteModel(name, address=address, timeout=60) as model:
    values = model.job(job_id).wait(timeout=90)
print("RESULT", json.dumps({str(k): v.tolist() for k, v in values.items()}), flush=True)
"""


def test_killed_client_job_is_fetched_by_id_from_a_new_process(fs):
    probe = fs.probes[MODEL]
    probe.delay = 0.01  # keep the job running while the client is being killed
    streaming = [sys.executable, "-c", _STREAMING_CLIENT, fs.address, MODEL, PROMPT, str(LONG_STEPS)]
    fetching = [sys.executable, "-c", _FETCHING_CLIENT, fs.address, MODEL]
    with _popen(streaming) as client, _popen(fetching, stdin=subprocess.PIPE) as fetcher:
        lines = _Lines(client)
        job_id = lines.wait_for("JOB ", timeout=60).split()[1]
        lines.wait_for("STEP 5", timeout=60)  # the client is mid-stream: it has received progress
        assert fs.job(job_id).finished is None, "the job ended before the client could be killed"
        client.send_signal(signal.SIGKILL)
        assert client.wait(timeout=10) == -signal.SIGKILL
        probe.delay = 0.0
        assert fs.job(job_id).state == "running", "the client's death must not cancel its running job"

        fetched_lines = _Lines(fetcher)
        fetched_lines.wait_for("READY", timeout=60)
        fetcher.stdin.write(job_id + "\n")
        fetcher.stdin.close()
        with fs.model() as model:  # meanwhile, the same request, run alone (it queues behind the job)
            alone = _generate(model, LONG_STEPS)
        result_line = fetched_lines.wait_for("RESULT ", timeout=90)
        assert fetcher.wait(timeout=30) == 0
    fetched = {int(k): torch.tensor(v) for k, v in json.loads(result_line.removeprefix("RESULT ")).items()}
    assert fs.job(job_id).state == "done"
    assert alone.shape == (1, 9 + LONG_STEPS)
    assert len(fetched) == 1
    assert torch.equal(next(iter(fetched.values())), alone)


# -- (b) SIGTERM drains `farscope serve` --------------------------------------------------------


def _console_script() -> str:
    found = Path(sys.executable).parent / "farscope"
    return str(found) if found.exists() else "farscope"


def test_sigterm_drains_the_server(tiny_model_dirs, tmp_path):
    config = tmp_path / "models.toml"
    config.write_text(f'[[models]]\nname = "tiny"\nsource = "{tiny_model_dirs["llama"]}"\n')
    grace = 5.0
    log_file = (tmp_path / "serve.log").open("w")
    args = [_console_script(), "serve", "--no-auth", "--port", "0", "--config", str(config), "--grace", str(grace)]
    with log_file, _popen(args, stderr=log_file) as serve:
        lines = _Lines(serve)
        address = lines.wait_for("farscope: serving", timeout=120).rsplit(" ", 1)[1]
        port = int(address.rsplit(":", 1)[1])

        running = threading.Event()
        outcome: dict[str, object] = {}
        runner = farscope.RemoteModel("tiny", address=address, timeout=60, on_log=lambda text: running.set())
        # The long job should last about 1.5 s on this machine now: surely still running when the
        # drain begins, surely done within the grace period.
        start = time.monotonic()
        _generate(runner, 30)
        steps = min(max(int(1.5 / ((time.monotonic() - start) / 30)), 40), 600)

        def run_long() -> None:
            try:
                with runner.generate(PROMPT, max_new_tokens=steps, min_new_tokens=steps) as tracer:
                    tracer.log("running")  # runs as the job starts: tells us it is on the worker
                    tokens = tracer.result.save()
                outcome["tokens"] = tokens.value
            except BaseException as e:  # noqa: BLE001 - reported by the assertions below
                outcome["error"] = e
            finally:
                outcome["finished_at"] = time.monotonic()

        long_job = threading.Thread(target=run_long, daemon=True)
        long_job.start()
        assert running.wait(timeout=60), "the long job never started"

        other = farscope.RemoteModel("tiny", address=address, timeout=60)
        queued = []
        for _ in range(3):
            with other.trace(SHORT_PROMPT, blocking=False) as tracer:
                other.model.layers[0].output.save()
            queued.append(tracer.job)
        assert "finished_at" not in outcome, "the long job ended before the drain began"
        serve.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        for job in queued:
            with pytest.raises(farscope.CancelledError, match="shut down"):
                job.wait(timeout=30)
        # Draining: new work is refused (by the scheduler, or by gRPC once it has stopped).
        with pytest.raises(farscope.FarscopeError, match="shutting down|cannot reach"):
            with other.trace(SHORT_PROMPT):
                other.model.layers[0].output.save()

        long_job.join(timeout=grace + 30)
        assert not long_job.is_alive()
        assert "error" not in outcome, outcome.get("error")
        assert outcome["finished_at"] > signalled  # it was still running when the drain began
        assert outcome["tokens"].shape == (1, 9 + steps)

        assert serve.wait(timeout=grace + 30) == 0
        assert time.monotonic() - signalled < grace + 15
        runner.close()
        other.close()

    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    with pytest.raises(farscope.TransportError):
        farscope.RemoteModel("tiny", address=address, timeout=5)


# -- (c) a graph that raises inside the forward pass fails alone ----------------------------------


def test_failing_graph_fails_alone_and_the_next_job_runs(fs):
    with fs.model() as model:
        before = _read(model)
        with pytest.raises(farscope.RemoteError, match="shape|size") as raised:
            with model.trace(SHORT_PROMPT):
                model.model.layers[0].output[:, -1] = torch.zeros(7)  # hidden size is 64
                model.lm_head.output.save()
        assert "test_faults.py" in (raised.value.where or "")  # points at the user's line
        assert torch.equal(_read(model), before)


# -- (d) cancel mid-generation frees the worker within one step -----------------------------------


def test_cancel_mid_generation_frees_the_worker_within_one_step(fs):
    probe = fs.probes[MODEL]
    probe.delay = 0.02  # >= 6 s for the whole generation, so stopping early is unmistakable
    steps = 300
    with fs.model() as model, fs.model() as other:
        with model.generate(PROMPT, max_new_tokens=steps, min_new_tokens=steps, blocking=False) as tracer:
            tracer.result.save()
        job = tracer.job
        decoded = probe.count(length=1)  # forward calls of generation steps after the first see 1 token
        _until(lambda: probe.count(length=1) >= decoded + 5, 30, "the generation to make progress")

        assert job.cancel() in ("running", "error")
        at_cancel = probe.count(length=1)
        start = time.monotonic()
        other_logits = _read(other)  # submitted right after the cancel
        elapsed = time.monotonic() - start
        with pytest.raises(farscope.CancelledError, match="cancelled"):
            job.wait(timeout=30)
        assert fs.job(job.id).state == "error"
        after = probe.count(length=1)

    assert after - at_cancel <= 1, f"{after - at_cancel} generation steps ran after the cancel"
    assert after - decoded < steps - 1
    assert elapsed < 3.0, f"a short trace after the cancel took {elapsed:.2f} s"
    assert other_logits.shape[:2] == (1, 8)


# -- (e) a job over its time limit ----------------------------------------------------------------


def test_job_over_its_time_limit_fails_and_the_next_runs(fs):
    fs.probes[LIMITED].delay = 0.02  # >= 6 s for the whole generation
    with fs.model(LIMITED) as model:
        start = time.monotonic()
        with pytest.raises(farscope.LimitError, match=r"max_wall_seconds=0\.5"):
            _generate(model, 300)
        elapsed = time.monotonic() - start
        assert 0.5 <= elapsed < 4.0
        fs.probes[LIMITED].delay = 0.0
        logits = _read(model)
    with fs.model() as reference:
        assert torch.equal(logits, _read(reference))  # same weights, unaffected by the failure


# -- (f) results outlive their client, then expire --------------------------------------------------


def test_results_stay_fetchable_after_disconnect_then_expire(tiny_spec):
    replica = Replica(load_model(tiny_spec("llama", name=MODEL)))
    server = start_server({MODEL: replica}, host="127.0.0.1", port=0, job_ttl=1)
    address = f"127.0.0.1:{server.port}"
    try:
        client = farscope.RemoteModel(MODEL, address=address, timeout=30)
        with client.trace(PROMPT, blocking=False) as tracer:
            client.model.layers[1].output.save()
        job_id = tracer.job.id
        client.close()  # gone before the result was fetched

        with farscope.RemoteModel(MODEL, address=address, timeout=30) as later:
            values = later.job(job_id).wait(timeout=30)
            with later.trace(PROMPT):
                h = later.model.layers[1].output.save()
            assert list(values) and torch.equal(next(iter(values.values())), h.value)

            finished = server.engine.jobs.get(job_id).finished
            time.sleep(max(0.0, finished + 1.3 - time.monotonic()))
            with pytest.raises(farscope.FarscopeError, match="expired"):
                later.job(job_id).wait(timeout=30)
    finally:
        server.stop(grace=1)
