"""The scheduler alone, with a fake replica (no torch, no gRPC): cancelling queued jobs, and a worker
that survives whatever a pass raises."""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from farscope.interventions.errors import CancelledError, FarscopeError, TransportError
from farscope.server.jobs import Job
from farscope.server.scheduler import Scheduler

WAIT = 10.0  # seconds: every wait is bounded


@dataclass
class FakeReplica:
    """Runs a job by returning its payload; a payload "block" waits for `release`, "boom" raises."""

    name: str = "fake"
    release: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)
    ran: list[str] = field(default_factory=list)
    key_error: bool = False
    many_error: bool = False

    def run(self, job: Job) -> Any:
        self.ran.append(job.payload)
        if job.payload == "block":
            self.started.set()
            assert self.release.wait(WAIT)
        if job.payload == "boom":
            raise RuntimeError("a bug in the replica")
        return job.payload

    def run_many(self, jobs: list[Job]) -> list[Any]:
        if self.many_error:
            raise RuntimeError("a bug in the shared pass")
        self.ran.append("+".join(job.payload for job in jobs))
        return [job.payload for job in jobs]

    def batch_key(self, job: Job) -> Hashable | None:
        if self.key_error:
            raise ValueError("cannot measure the inputs")
        return "same" if job.payload.startswith("small") else None


@pytest.fixture
def replica() -> FakeReplica:
    return FakeReplica()


@pytest.fixture
def scheduler(replica: FakeReplica) -> Iterator[Scheduler]:
    scheduler = Scheduler(replica)
    yield scheduler
    replica.release.set()
    scheduler.close(timeout=WAIT)


def _job(payload: str, user: str) -> Job:
    return Job(model="fake", payload=payload, user=user)


def _blocked(scheduler: Scheduler, replica: FakeReplica) -> Job:
    """A job of user "long" now running on the worker, until `replica.release` is set."""
    long = _job("block", "long")
    scheduler.submit(long)
    assert replica.started.wait(WAIT)
    return long


def test_cancelling_a_queued_job_leaves_the_worker_serving_other_users(scheduler, replica):
    # Issue 9, item 1: a cancelled queued job once left an empty per-user queue; the worker then died
    # with "pop from an empty deque" and no job of any user ran again.
    long = _blocked(scheduler, replica)
    abandoned = _job("abandoned", "bob")
    scheduler.submit(abandoned)
    scheduler.cancel(abandoned)
    assert isinstance(abandoned.error, CancelledError)
    assert scheduler.depth == 0
    after = _job("after", "carol")
    scheduler.submit(after)
    replica.release.set()
    assert after.wait(WAIT), "the next user's job was never served"
    assert after.result == "after" and long.result == "block"
    assert replica.ran == ["block", "after"]
    assert scheduler.alive


def test_a_withdrawn_job_is_cancelled_only_while_queued(scheduler, replica):
    long = _blocked(scheduler, replica)
    queued = _job("queued", "bob")
    scheduler.submit(queued)
    assert scheduler.withdraw(queued)
    assert not scheduler.withdraw(long)  # running: the client's departure does not stop it
    assert not long.cancelled.is_set()
    replica.release.set()
    assert long.wait(WAIT) and long.error is None
    assert isinstance(queued.error, CancelledError) and "queued" not in replica.ran


def test_a_pass_that_raises_fails_its_job_and_the_worker_serves_on(scheduler, replica, caplog):
    boom, after = _job("boom", "alice"), _job("after", "bob")
    with caplog.at_level(logging.ERROR, logger="farscope.server.jobs"):
        scheduler.submit(boom)
        scheduler.submit(after)
        assert after.wait(WAIT) and boom.wait(WAIT)
    assert type(boom.error) is FarscopeError and "internal server error: RuntimeError" in boom.error.message
    assert boom.error.job_id == boom.id
    assert "a bug in the replica" in caplog.text  # the traceback is in the log, not lost
    assert after.result == "after" and scheduler.alive


def test_a_failing_shared_pass_fails_its_jobs_each_with_its_own_id(replica, caplog):
    replica.many_error = True
    scheduler = Scheduler(replica)
    try:
        long = _blocked(scheduler, replica)
        small = [_job(f"small{i}", f"user{i}") for i in range(3)]
        for job in small:
            scheduler.submit(job)
        after = _job("after", "zed")
        scheduler.submit(after)
        replica.release.set()
        assert all(job.wait(WAIT) for job in [long, *small, after])
        assert [job.error.job_id for job in small] == [job.id for job in small]
        assert after.result == "after" and scheduler.alive
    finally:
        scheduler.close(timeout=WAIT)


def test_a_batch_key_that_raises_is_logged_and_the_job_runs_alone(replica, caplog):
    replica.key_error = True
    scheduler = Scheduler(replica)
    try:
        long = _blocked(scheduler, replica)
        small = [_job(f"small{i}", f"user{i}") for i in range(2)]
        with caplog.at_level(logging.ERROR, logger="farscope.server.scheduler"):
            for job in small:
                scheduler.submit(job)
            replica.release.set()
            assert all(job.wait(WAIT) for job in [long, *small])
        assert "runs alone" in caplog.text and "cannot measure the inputs" in caplog.text
        assert replica.ran == ["block", "small0", "small1"]  # no shared pass
    finally:
        scheduler.close(timeout=WAIT)


def test_compatible_queued_jobs_share_one_pass(scheduler, replica):
    long = _blocked(scheduler, replica)
    small = [_job(f"small{i}", f"user{i}") for i in range(3)]
    for job in small:
        scheduler.submit(job)
    replica.release.set()
    assert all(job.wait(WAIT) for job in [long, *small])
    assert replica.ran == ["block", "small0+small1+small2"]


def test_close_fails_queued_jobs_and_refuses_new_ones(replica):
    scheduler = Scheduler(replica)
    long = _blocked(scheduler, replica)
    queued = _job("queued", "bob")
    scheduler.submit(queued)
    closing = threading.Thread(target=scheduler.close, kwargs={"timeout": WAIT})
    closing.start()
    assert queued.wait(WAIT) and "shut down" in queued.error.message
    with pytest.raises(TransportError, match="shutting down"):
        scheduler.submit(_job("late", "carol"))
    replica.release.set()
    closing.join(WAIT)
    assert not closing.is_alive() and long.error is None and not scheduler.alive
