"""Memory is returned when a job ends: failed jobs keep no intermediates through their tracebacks,
finished jobs drop their request, and the job store counts every byte its jobs hold."""

from __future__ import annotations

import gc
import os
import weakref

import pytest
import torch

import farscope
from farscope.interventions.errors import LimitError, RemoteError
from farscope.interventions.graph import Graph
from farscope.server.jobs import Event, Job, JobStore

PROMPT = "John gave a drink to Mary"
MB = 2**20
# What the RSS may grow by after three failed jobs that each held 100 MB (300 MB kept before the fix).
RSS_MARGIN = 60 * MB


def rss() -> int:
    """Resident bytes of this process (the second field of /proc/self/statm, in pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _fail_holding(tensor: torch.Tensor) -> RemoteError:
    """A RemoteError raised, as the executor raises one, while `tensor` is a local of a frame below."""
    def node(value: torch.Tensor) -> None:
        value.view(3, -1)  # an error of torch's, with `value` a local of this frame

    try:
        try:
            node(tensor)
        except RuntimeError as e:
            raise RemoteError(f"RuntimeError: {e}", node="%1 = Tensor.view(%0, 3, -1)") from e
    except RemoteError as error:
        return error
    raise AssertionError("unreachable")


def test_a_failed_job_keeps_its_message_but_not_its_traceback():
    tensor = torch.zeros(1001)
    alive = weakref.ref(tensor)
    error = _fail_holding(tensor)
    del tensor
    gc.collect()
    assert alive() is not None  # the traceback's frames hold it
    job = Job(model="m", payload=None)
    job.fail(error)
    gc.collect()
    assert alive() is None
    assert job.error is error and error.__traceback__ is None and error.__cause__ is None
    assert "RuntimeError: shape '[3, -1]' is invalid for input of size 1001" in str(job.error)


def test_an_internal_error_is_reported_and_released_too(caplog):
    tensor = torch.zeros(1001)
    alive = weakref.ref(tensor)
    cause = _fail_holding(tensor).__cause__  # a non-farscope error, its frames holding the tensor
    del tensor
    job = Job(model="m", payload=None)
    job.fail(cause)
    del cause
    gc.collect()
    assert alive() is None  # even though the log (caplog here) keeps its records
    assert str(job.error).startswith("internal server error: RuntimeError: shape '[3, -1]'")
    assert "in node" in caplog.text and "value.view(3, -1)" in caplog.text  # the traceback, as text


@pytest.mark.parametrize("ending", ["finish", "fail"])
def test_a_finished_job_drops_its_request(ending):
    constant = torch.ones(1000, 1000)  # 4 MB uploaded with the request
    alive = weakref.ref(constant)
    graph = Graph()
    graph.add("torch.add", (constant, 1.0))
    job = Job(model="m", payload=graph)
    del graph, constant
    assert job.nbytes == 4_000_000
    if ending == "finish":
        job.finish(None)
    else:
        job.fail(LimitError("too big"))
    gc.collect()
    assert job.payload is None and alive() is None
    assert job.nbytes < 100


class _Results:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


def test_the_store_counts_every_byte_its_jobs_hold():
    store = JobStore(max_bytes=10_000)
    jobs = []
    for _ in range(3):
        job = Job(model="m", payload=None)
        store.add(job)
        job.emit(Event("log", text="x" * 3_000))  # logs are held too, not only results
        job.finish(_Results(1_000))
        jobs.append(job)
        assert job.nbytes == 4_000
    # 12,000 bytes held: the oldest finished job goes, the others stay
    assert store.get(jobs[0].id) is None
    assert store.get(jobs[1].id) is jobs[1] and store.get(jobs[2].id) is jobs[2]
    queued = Job(model="m", payload=Graph())
    queued.payload.add("torch.add", (torch.zeros(2_500), 1.0))  # 10,000 bytes, not finished: counted, kept
    queued._payload_bytes = 10_000
    store.add(queued)
    assert store.get(queued.id) is queued
    assert store.get(jobs[1].id) is None and store.get(jobs[2].id) is None


def test_failed_jobs_return_their_memory(tiny_remote, tiny_server):
    m = tiny_remote["llama"]

    def fail_holding_100_mb() -> None:
        with pytest.raises(farscope.RemoteError, match=r"shape '\[3, -1\]' is invalid for input of size 25000000"):
            with m.trace(PROMPT):
                h = m.model.layers[0].output
                big = h.new_zeros(25_000_000) + 1  # 100 MB, alive when the next line fails
                (big.view(3, -1).sum() + h.sum()).save()

    fail_holding_100_mb()  # warm up: code paths, allocator pools
    gc.collect()
    baseline = rss()
    for _ in range(3):
        fail_holding_100_mb()
    gc.collect()
    grown = rss() - baseline
    assert grown < RSS_MARGIN, f"RSS grew by {grown / MB:.0f} MB after 3 failed 100 MB jobs"
    # the failed jobs are still there to be asked about, with their messages
    failed = [j for j in tiny_server.engine.jobs._jobs.values() if j.error is not None and "25000000" in str(j.error)]
    assert len(failed) >= 4 and all(j.payload is None for j in failed)


def test_a_finished_job_keeps_no_request_constants(tiny_remote, tiny_server, tiny_local, tiny_tokenizer):
    m = tiny_remote["llama"]
    steer = torch.randn(64) / 64
    padding = torch.zeros(5_000_000)  # a 20 MB constant travelling with the request
    before = set(tiny_server.engine.jobs._jobs)
    with m.trace(PROMPT):
        out = (m.model.layers[0].output + steer + padding[:64]).save()
    job = next(j for i, j in tiny_server.engine.jobs._jobs.items() if i not in before)
    assert job.payload is None
    assert job.nbytes < MB  # its results (a [1, T, 64] tensor) and events, not the 20 MB constant
    with torch.no_grad():
        inputs = tiny_tokenizer(PROMPT, return_tensors="pt")
        h = tiny_local["llama"](**inputs, output_hidden_states=True).hidden_states[1]
    assert torch.equal(out.value, h + steer + padding[:64])
