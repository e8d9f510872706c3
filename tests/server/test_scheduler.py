"""The scheduler alone, with a fake replica (no torch, no gRPC): cancelling queued jobs, a worker that
survives whatever a pass raises and is restarted (reporting its health) when its own loop fails, fairness
in measured cost rather than turns, and the queue's invariants over random interleavings (hypothesis
stateful testing)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, precondition, rule

from farscope.interventions.errors import CancelledError, FarscopeError, TransportError
from farscope.server import scheduler as scheduler_module
from farscope.server.jobs import Job
from farscope.server.scheduler import Scheduler

WAIT = 10.0  # seconds: every wait is bounded


class WorkerBug(BaseException):
    """What no job's error handling catches: it escapes the worker's loop (as a bug of ours would)."""


@dataclass
class FakeClock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeReplica:
    """Runs a job by returning its payload; a payload "block" waits for `release`, "boom" raises."""

    name: str = "fake"
    release: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)
    ran: list[str] = field(default_factory=list)
    key_error: bool = False
    many_error: bool = False

    clock: FakeClock | None = None

    def run(self, job: Job) -> Any:
        self.ran.append(job.payload)
        if job.payload.startswith("cost:"):  # a job that takes that many seconds of the fake clock
            assert self.clock is not None
            self.clock.now += float(job.payload.split(":")[1])
        if job.payload == "bug":
            raise WorkerBug("not an Exception: it escapes the job's own error handling")
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
        if job.payload == "keybug":
            raise WorkerBug("escapes while the next pass is chosen")
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


# -- supervision ----------------------------------------------------------------------------------


@dataclass
class HealthLog:
    changes: list[bool] = field(default_factory=list)
    seen_by_property: list[bool] = field(default_factory=list)
    threads: list[str] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)
    scheduler: Scheduler | None = None

    def __call__(self, healthy: bool) -> None:
        with self.changed:
            self.changes.append(healthy)
            self.threads.append(threading.current_thread().name)
            if self.scheduler is not None:
                self.seen_by_property.append(self.scheduler.healthy)
            self.changed.notify_all()

    def wait_for(self, changes: list[bool]) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: self.changes == changes, WAIT), self.changes


def _supervised(replica: FakeReplica) -> tuple[Scheduler, HealthLog]:
    health = HealthLog()
    scheduler = Scheduler(replica, on_health=health)
    health.scheduler = scheduler
    return scheduler, health


def test_a_failing_worker_loop_is_logged_fails_its_job_and_is_restarted(replica, caplog):
    scheduler, health = _supervised(replica)
    try:
        assert scheduler.healthy
        with caplog.at_level(logging.CRITICAL, logger="farscope.server.scheduler"):
            bug = _job("bug", "mallory")
            scheduler.submit(bug)
            assert bug.wait(WAIT)
            health.wait_for([False, True])
        assert type(bug.error) is FarscopeError and bug.error.job_id == bug.id
        assert "worker of model 'fake' failed" in bug.error.message and "WorkerBug" in bug.error.message
        assert "restarted" in bug.error.message
        assert "not an Exception" in caplog.text and "Traceback" in caplog.text  # logged, with its traceback
        assert health.seen_by_property == [False, True]
        assert set(health.threads) == {"farscope-worker-fake"}  # called from the worker thread
        after = _job("after", "bob")
        scheduler.submit(after)
        assert after.wait(WAIT) and after.result == "after"
        assert scheduler.healthy and scheduler.alive and scheduler.restarts == 1
    finally:
        scheduler.close(timeout=WAIT)
    health.wait_for([False, True, False])  # stopped: not serving any more
    assert not scheduler.healthy


def test_a_bug_in_the_schedulers_own_code_fails_the_pass_not_the_worker(replica, monkeypatch):
    scheduler, health = _supervised(replica)
    try:
        real = scheduler._charge
        calls = []

        def charge_once_broken(jobs: list[Job], seconds: float) -> None:
            calls.append(len(jobs))
            if len(calls) == 1:
                raise KeyError("a bug in the accounting")
            real(jobs, seconds)
        monkeypatch.setattr(scheduler, "_charge", charge_once_broken)
        first, second = _job("first", "alice"), _job("second", "bob")
        scheduler.submit(first)
        assert first.wait(WAIT)
        assert "KeyError" in first.error.message and "a bug in the accounting" in first.error.message
        scheduler.submit(second)
        assert second.wait(WAIT) and second.result == "second"
        health.wait_for([False, True])
    finally:
        scheduler.close(timeout=WAIT)


def test_a_failure_while_choosing_the_next_pass_fails_the_job_taken(replica):
    scheduler, health = _supervised(replica)
    try:
        chosen = _job("keybug", "mallory")
        scheduler.submit(chosen)
        assert chosen.wait(WAIT), "a job taken from the queue was lost with the failure"
        assert "escapes while the next pass is chosen" in chosen.error.message
        after = _job("after", "bob")
        scheduler.submit(after)
        assert after.wait(WAIT) and after.result == "after"
        health.wait_for([False, True])
        assert scheduler.depth == 0 and scheduler.healthy
    finally:
        scheduler.close(timeout=WAIT)


def test_a_worker_that_keeps_failing_stays_unhealthy_and_backs_off(replica, monkeypatch):
    monkeypatch.setattr(scheduler_module, "MAX_BACKOFF", 0.2)
    scheduler, health = _supervised(replica)
    try:
        bugs = [_job("bug", f"user{i}") for i in range(4)]
        for job in bugs:
            scheduler.submit(job)
        assert all(job.wait(WAIT) for job in bugs)
        assert all("WorkerBug" in job.error.message for job in bugs)
        # every failure reports False, every restart True; the last restart serves on
        health.wait_for([False, True] * 4)
        ok = _job("ok", "bob")
        scheduler.submit(ok)
        assert ok.wait(WAIT) and ok.result == "ok" and scheduler.healthy
    finally:
        scheduler.close(timeout=WAIT)


def test_close_during_the_back_off_stops_the_worker(replica, monkeypatch):
    monkeypatch.setattr(scheduler_module, "FIRST_BACKOFF", 60.0)
    scheduler, health = _supervised(replica)
    scheduler.submit(_job("bug", "mallory"))
    health.wait_for([False])  # now waiting a minute before its restart
    started = time.monotonic()
    scheduler.close(timeout=WAIT)
    assert time.monotonic() - started < WAIT / 2
    assert not scheduler.alive and not scheduler.healthy and scheduler.restarts == 0


# -- fair cost ------------------------------------------------------------------------------------


def _fake_clock_scheduler(replica: FakeReplica) -> Scheduler:
    replica.clock = FakeClock()
    return Scheduler(replica, cobatch=False, clock=replica.clock)


def _ordered_run(replica: FakeReplica, jobs: list[Job]) -> list[str]:
    """Hold the worker in a zero-cost block, queue `jobs`, release; the payloads in the order they ran."""
    scheduler = _fake_clock_scheduler(replica)
    try:
        block = _job("block", "zed")
        scheduler.submit(block)
        assert replica.started.wait(WAIT)
        for job in jobs:
            scheduler.submit(job)
        replica.release.set()
        assert all(job.wait(WAIT) for job in jobs)
    finally:
        scheduler.close(timeout=WAIT)
    return replica.ran[1:]


def test_backlogged_users_share_model_time_not_turns(replica):
    jobs = [_job("cost:10", "long") for _ in range(4)] + [_job("cost:1", "short") for _ in range(40)]
    order = _ordered_run(replica, jobs)
    # Both queued at once, "long" first in turn order: one long pass, then ten short ones (their summed
    # time catches up), and so on. Round robin would give alternate turns: one short per long one.
    assert order == (["cost:10"] + ["cost:1"] * 10) * 4, order


def test_a_debt_free_user_waits_for_the_running_pass_only(replica):
    scheduler = _fake_clock_scheduler(replica)
    try:
        first = _job("block", "attacker")
        scheduler.submit(first)
        assert replica.started.wait(WAIT)
        replica.clock.now += 100  # the attacker's running pass is long
        queued = [_job("cost:100", "attacker") for _ in range(5)]
        for job in queued:
            scheduler.submit(job)
        mine = [_job("cost:1", "honest") for _ in range(20)]
        for job in mine:
            scheduler.submit(job)
        replica.release.set()
        assert all(job.wait(WAIT) for job in [*queued, *mine])
    finally:
        scheduler.close(timeout=WAIT)
    # all twenty short jobs (20 s in all) ran right after the running 100 s pass, before any queued one
    assert replica.ran == ["block", *["cost:1"] * 20, *["cost:100"] * 5]


def test_idle_time_earns_no_credit(replica):
    scheduler = _fake_clock_scheduler(replica)
    try:
        for _ in range(3):
            job = _job("cost:10", "early")
            scheduler.submit(job)
            assert job.wait(WAIT)
        # "late" arrives after "early" had 30 s alone: it joins at the virtual time, not at 0, so it
        # does not get the next 30 s to itself
        block = _job("block", "zed")
        scheduler.submit(block)
        assert replica.started.wait(WAIT)
        jobs = [_job("cost:10", "late") for _ in range(3)] + [_job("cost:10", "early") for _ in range(3)]
        for job in jobs:
            scheduler.submit(job)
        replica.release.set()
        assert all(job.wait(WAIT) for job in jobs)
    finally:
        scheduler.close(timeout=WAIT)
    users = [job.user for job in sorted(jobs, key=lambda j: j.finished)]
    assert users == ["late", "early"] * 3 or users == ["early", "late"] * 3, users


# -- invariants over random interleavings ---------------------------------------------------------


class HeldReplica:
    """A fake replica for the state machine: "hold" jobs wait (bounded) until the test releases them,
    "fail" raises (the job's own error), "bug" raises past the worker's loop, "pair" jobs share a key."""

    name = "held"

    def __init__(self) -> None:
        self.gates: dict[str, threading.Event] = {}
        self.lock = threading.Lock()

    def gate(self, job: Job) -> threading.Event:
        with self.lock:
            return self.gates.setdefault(job.id, threading.Event())

    def _one(self, job: Job) -> Any:
        kind = job.payload.split(":")[0]
        if kind == "hold":
            assert self.gate(job).wait(WAIT), "a held job was never released"
        if kind == "fail":
            raise RuntimeError("the job's own failure")
        if kind == "bug":
            raise WorkerBug("escapes the loop")
        return job.payload

    def run(self, job: Job) -> Any:
        return self._one(job)

    def run_many(self, jobs: list[Job]) -> list[Any]:
        return [job.payload for job in jobs]

    def batch_key(self, job: Job) -> Hashable | None:
        return "pair" if job.payload.startswith("pair") else None


KINDS = ("ok", "hold", "fail", "bug", "pair")


def _ended_as_it_should(job: Job, payload: str) -> None:
    """`payload`: what the job was submitted with (a job drops its payload once it ends)."""
    kind = payload.split(":")[0]
    if kind in ("ok", "hold", "pair"):
        assert job.error is None and job.result == payload, job.error
    elif kind == "fail":
        assert "RuntimeError: the job's own failure" in job.error.message, job.error
    else:
        assert "worker of model 'held' failed" in job.error.message, job.error


class SchedulerMachine(RuleBasedStateMachine):
    """Random submits, releases, cancels, withdrawals (a client gone) and a drain, while the real worker
    thread runs; after every step the queue's invariants hold, and at the end every job has ended in
    exactly one terminal state that matches what it was."""

    jobs = Bundle("jobs")

    def __init__(self) -> None:
        super().__init__()
        self.replica = HeldReplica()
        self.health: list[bool] = []
        scheduler_module_backoff = scheduler_module.FIRST_BACKOFF
        scheduler_module.FIRST_BACKOFF = 0.001  # restarts in a millisecond: the machine runs many
        self._restore = lambda: setattr(scheduler_module, "FIRST_BACKOFF", scheduler_module_backoff)
        self.scheduler = Scheduler(self.replica, on_health=self.health.append)
        self.submitted: list[Job] = []
        self.payloads: dict[str, str] = {}  # job id -> payload (a job drops its payload once it ends)
        self.cancelled: set[str] = set()
        self.closed = False

    @rule(target=jobs, user=st.sampled_from(["ann", "ben", "cat"]), kind=st.sampled_from(KINDS))
    def submit(self, user: str, kind: str) -> Job:
        job = Job(model="held", payload=f"{kind}:{len(self.submitted)}", user=user)
        self.payloads[job.id] = job.payload
        if self.closed:
            with pytest.raises(TransportError):
                self.scheduler.submit(job)
            return job
        self.scheduler.submit(job)
        self.submitted.append(job)
        return job

    @rule(job=jobs)
    def release(self, job: Job) -> None:
        self.replica.gate(job).set()

    @rule(job=jobs)
    def cancel(self, job: Job) -> None:
        self.scheduler.cancel(job)
        self.cancelled.add(job.id)

    @rule(job=jobs)
    def disconnect(self, job: Job) -> None:
        if self.scheduler.withdraw(job):  # it was queued: it ends now, cancelled
            assert isinstance(job.error, CancelledError) and job.state == "error"
            self.cancelled.add(job.id)

    @precondition(lambda self: not self.closed)
    @rule()
    def drain(self) -> None:
        for job in self.submitted:
            self.replica.gate(job).set()
        self.scheduler.close(timeout=WAIT)
        self.closed = True
        assert not self.scheduler.alive and not self.scheduler.healthy
        assert all(job.finished is not None for job in self.submitted)

    @invariant()
    def queues_are_consistent(self) -> None:
        s = self.scheduler
        with s._wake:
            queued = [job for q in s._queues.values() for job in q]
            assert all(s._queues.values()), "an empty per-user queue was left"
            assert s.depth == len(queued)
            assert len({job.id for job in queued}) == len(queued), "a job is queued twice"
            assert all(job.user == user for user, q in s._queues.items() for job in q)
            taken = {job.id for job in s._taken}
            assert not taken & {job.id for job in queued}, "a job in the worker's hands is still queued"
            assert {job.id for job in s.running} <= taken
            assert all(job.finished is None and job.state == "queued" for job in queued)
            out = [job for job in self.submitted if job.id not in taken and job not in queued]
            assert all(job.finished is not None for job in out), "a job left the queue without ending"
            assert all(s._service.get(u, s._virtual) >= s._virtual for u in s._queues)
            assert set(s._keys) <= {job.id for job in queued}
        for job in self.submitted:
            kinds = [event.kind for event in job.events()]
            ends = [kind for kind in kinds if kind in ("done", "error")]
            assert len(ends) <= 1 and (not ends or kinds[-1] == ends[0]), kinds
        if not self.closed:
            assert s.alive, "the worker thread died"

    def teardown(self) -> None:
        try:
            for job in self.submitted:
                self.replica.gate(job).set()
            for job in self.submitted:
                assert job.wait(WAIT), f"job {self.payloads[job.id]} never ended"
            self.scheduler.close(timeout=WAIT)
            for job in self.submitted:
                if isinstance(job.error, CancelledError):
                    # cancelled while queued (or taken but not started), or queued when the drain came
                    assert job.id in self.cancelled or "shut down" in job.error.message, job.error
                else:  # ran: its own outcome, cancelled or not (a fake pass has no hook to stop at)
                    _ended_as_it_should(job, self.payloads[job.id])
            # every failure of the loop reported False, every restart True; stopped at the end
            assert self.health == [False, True] * self.scheduler.restarts + [False], self.health
        finally:
            self._restore()


SchedulerMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=25, derandomize=True,
                                              deadline=None, database=None)
test_scheduler_invariants = SchedulerMachine.TestCase
