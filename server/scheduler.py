"""The queue in front of one model replica: fair in cost between users, and supervised. No torch.

Order
-----
Each user has a FIFO of jobs. Between users, the worker takes the user who has received the least
*service*: seconds of model time, measured (a pass's wall time, divided equally among the jobs that
shared it). Ties go to the user who has waited longest for a turn (round robin). The scheduler keeps a
virtual time ``V``: the service of the user it picked last. A user whose queue was empty joins at
``max(its own service, V)``: being idle earns no credit, and the service a user got ahead of the others
(its last pass) is still counted against it. Every user with queued jobs has service >= ``V``.

Bound (the one the README states)
---------------------------------
Let ``P`` be the longest pass: a pass stops at its next hook once it has run ``max_wall_seconds``, so
``P`` is that limit plus the work between two hooks (a whole generation is one pass; the work between
hooks is bounded only as far as each op's cost is bounded before it runs). Passes are not
preempted. A job ``j`` of user ``B``, submitted when ``B`` has no other job queued, starts after at most

    R + sum, over the other users u served before j, of (d_B + P_u)

of model time, where ``R <= P`` is what remains of the pass running when ``j`` arrives and ``P_u <= P``
is one pass of ``u``. ``d_B`` is ``B``'s debt, how far ``B``'s service is ahead of ``V`` when ``j``
arrives: at most the charge of ``B``'s own previous pass, shrinking as the others are served. A user
``u`` is served before ``j`` only while its service is below ``B``'s, so for at most ``d_B`` plus the one
pass that takes it past ``B``. With no debt, that leaves ``R`` plus one pass of each user tied with ``B``
at ``V`` and ahead of it in turn order: users that joined from idle just before ``B`` and were not
served since. A user that keeps its queue full is never among them (its running pass is charged before
the next choice), so **another user's long jobs, however many, delay a debt-free job by at most the one
pass already running.** After that, ``B``'s further jobs are served in step with the others: two users
that both keep jobs queued are never more than one pass ``P`` apart in service, so ``B``'s short jobs run
before an attacker's next long one until their summed time catches up with its last long pass.

Companions: with co-batching, queued jobs whose batch keys equal the chosen job's (queue heads of any
user) join its pass; they add to that pass's time and are charged their share of it.

Supervision
-----------
The worker thread is the only one that runs model work for its replica. A job's own failure (anything
a pass raises as an ``Exception``) fails that job and the worker goes on. Anything else escaping the
worker's loop (a bug of ours, or a ``BaseException`` from below) is logged with its traceback; the jobs
taken for the pass in progress fail with a clear error; ``healthy`` turns False; the loop restarts (after
a short back-off that doubles, up to MAX_BACKOFF, while it keeps failing without serving a pass) and
``healthy`` turns True as it takes jobs again. Queued jobs wait meanwhile; none is lost.
``on_health`` is called from the worker thread on every change (and False once the worker stops after
`close`), so that a server can answer NOT_SERVING meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from typing import Any, Protocol

from farscope.interventions.errors import CancelledError, FarscopeError, TransportError

from .jobs import Event, Job

__all__ = ["Runner", "Scheduler"]

log = logging.getLogger(__name__)

MIN_CHARGE = 1e-6  # seconds charged for a pass however fast: every pass moves its users' service on
FIRST_BACKOFF = 0.05  # seconds before restarting a failed worker loop; doubled while it keeps failing
MAX_BACKOFF = 5.0


class Runner(Protocol):
    """What a scheduler drives: a replica, or anything shaped like one."""

    name: str

    def run(self, job: Job) -> Any:
        """Run one job; returns its results (emitting progress and log events on the job)."""

    def run_many(self, jobs: list[Job]) -> list[Any]:
        """Run jobs with equal batch keys in one pass; each one's results or exception, in order."""

    def batch_key(self, job: Job) -> Hashable | None:
        """What `job` may share a pass with (jobs with equal keys), or None: it runs alone."""


class Scheduler:
    """Per-user queues, fair in measured cost, and one supervised worker thread that owns the replica."""

    def __init__(self, replica: Runner, *, cobatch: bool = True, max_batch: int = 16,
                 on_health: Callable[[bool], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        """With `cobatch`, queued jobs with equal batch keys (from any users) are taken together, up to
        `max_batch`, and run as one pass. `on_health(healthy)` is called from the worker thread whenever
        `healthy` changes. `clock` measures passes (seconds; a test may pass a fake one)."""
        self.name = replica.name
        self.replica = replica
        self.cobatch = cobatch
        self.max_batch = max_batch
        self.on_health = on_health
        self.clock = clock
        self._queues: OrderedDict[str, deque[Job]] = OrderedDict()  # users in turn order; never empty deques
        self._keys: dict[str, Hashable | None] = {}  # batch keys by job id, computed once per queued job
        self._service: dict[str, float] = {}  # seconds of model time per user; absent: at most `_virtual`
        self._virtual = 0.0  # the service of the user picked last
        self._wake = threading.Condition()
        self._closed = False
        self._healthy = True
        self._taken: tuple[Job, ...] = ()  # the pass in progress, from the moment it leaves the queues
        self.running: tuple[Job, ...] = ()
        self.restarts = 0
        self._failures = 0  # failures since the worker last served a pass
        self._worker = threading.Thread(target=self._supervise, name=f"farscope-worker-{self.name}", daemon=True)
        self._worker.start()

    # -- what callers do -----------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self._wake:
            if self._closed:
                raise TransportError("the server is shutting down and accepts no new jobs")
            if job.user not in self._queues:  # joining: no credit for idleness, its debt still counts
                self._service[job.user] = max(self._service.get(job.user, 0.0), self._virtual)
            position = self._position(job.user)
            self._queues.setdefault(job.user, deque()).append(job)
            job.emit(Event("queued", position=position))
            self._wake.notify()

    def cancel(self, job: Job) -> None:
        """Cancel a queued job now; a running one stops at its next hook or generation step."""
        job.cancelled.set()
        self.withdraw(job)

    def withdraw(self, job: Job) -> bool:
        """Cancel `job` if it is still queued (True); a job already taken to run is left alone."""
        with self._wake:
            queue = self._queues.get(job.user)
            if queue is None or job not in queue:
                return False
            queue.remove(job)
            if not queue:  # an empty deque left here once killed the worker (pop from an empty deque)
                del self._queues[job.user]
            self._keys.pop(job.id, None)
            job.cancelled.set()
        job.fail(CancelledError("the job was cancelled before it ran", job_id=job.id))
        return True

    @property
    def depth(self) -> int:
        with self._wake:
            return sum(len(q) for q in self._queues.values())

    @property
    def alive(self) -> bool:
        return self._worker.is_alive()

    @property
    def healthy(self) -> bool:
        """Whether the worker is serving: False while it restarts after a failure, and once it stopped."""
        return self._healthy and self._worker.is_alive()

    def service(self, user: str) -> float:
        """Seconds of model time `user` is counted as having received (for tests and metrics)."""
        with self._wake:
            return max(self._service.get(user, 0.0), self._virtual)

    def _position(self, user: str) -> int:
        """About how many jobs will run before a new job of `user`: its own queued ones, and one of each
        other user whose service is not above its own (the bound in the module docstring)."""
        mine = self._service[user]
        ahead = sum(1 for u in self._queues if u != user and self._service.get(u, self._virtual) <= mine)
        return len(self._queues.get(user, ())) + ahead

    def close(self, *, timeout: float = 30.0) -> None:
        """Stop taking jobs; fail the queued ones clearly; give the running ones `timeout` seconds,
        then cancel them (they stop at their next hook or generation step)."""
        with self._wake:
            self._closed = True
            queued = [job for q in self._queues.values() for job in q]
            self._queues.clear()
            self._keys.clear()
            self._wake.notify_all()
        for job in queued:
            job.fail(CancelledError("the server shut down before this job ran; submit it again", job_id=job.id))
        self._worker.join(timeout=timeout)
        for job in self.running:
            job.cancelled.set()
        self._worker.join(timeout=30)

    # -- choosing ------------------------------------------------------------------------------

    def _next(self) -> list[Job] | None:
        """The next pass's jobs: the first job of the user with the least service and, co-batching,
        its companions. None once closed."""
        with self._wake:
            while not self._queues:
                if self._closed:
                    return None
                self._wake.wait()
            user = min(self._queues, key=lambda u: self._service.get(u, self._virtual))  # first of equals
            queue = self._queues.pop(user)
            job = queue.popleft()
            self._taken = (job,)  # from here on, the supervisor fails it if the worker fails
            if queue:
                self._queues[user] = queue  # re-inserted last: among equals, the others go first
            self._virtual = max(self._virtual, self._service.get(user, self._virtual))
            jobs = [job, *self._companions(job)]
            self._forget_idle()
            return jobs

    def _forget_idle(self) -> None:
        """Drop the service of users who would join at `_virtual` anyway (so the table stays small).
        Called with the lock held."""
        busy = {job.user for job in self._taken}
        for user in [u for u, s in self._service.items() if s <= self._virtual]:
            if user not in self._queues and user not in busy:
                del self._service[user]

    def _key(self, job: Job) -> Hashable | None:
        if job.id not in self._keys:
            try:
                self._keys[job.id] = self.replica.batch_key(job)
            except Exception:
                log.exception("job %s: its batch key could not be computed; it runs alone", job.id)
                self._keys[job.id] = None
        return self._keys[job.id]

    def _companions(self, first: Job) -> list[Job]:
        """Queued jobs that can share `first`'s pass: queue heads with its key, users in turn.
        Called with the lock held."""
        key = self._key(first) if self.cobatch else None
        self._keys.pop(first.id, None)
        if key is None:
            return []
        taken: list[Job] = []  # each also in `_taken` at once: if anything fails here, it is not lost
        progress = True
        while progress and len(taken) + 1 < self.max_batch:
            progress = False
            for user in list(self._queues):
                queue = self._queues[user]
                if queue[0].cancelled.is_set() or self._key(queue[0]) != key:
                    continue
                taken.append(queue.popleft())
                self._taken += (taken[-1],)
                self._keys.pop(taken[-1].id, None)
                if not queue:
                    del self._queues[user]
                progress = True
                if len(taken) + 1 >= self.max_batch:
                    break
        return taken

    def _charge(self, jobs: list[Job], seconds: float) -> None:
        """Count a pass's measured time against its jobs' users, in equal shares."""
        share = max(seconds, MIN_CHARGE) / len(jobs)
        with self._wake:
            for job in jobs:
                self._service[job.user] = self._service.get(job.user, self._virtual) + share

    # -- the worker ----------------------------------------------------------------------------

    def _supervise(self) -> None:
        """The worker thread: run the loop; if anything escapes it, fail the pass in progress, report
        unhealthy, and restart it (the back-off doubles while it keeps failing without serving a pass)."""
        while True:
            try:
                self._loop()
                break  # closed
            except BaseException as e:  # noqa: BLE001 - no worker dies silently, whatever it was
                self._failed(e)
                if self._pause(min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (self._failures - 1))):
                    break
                self.restarts += 1
                log.warning("scheduler %s: worker loop restarted (restart %d)", self.name, self.restarts)
                self._set_health(True)
        self._set_health(False)

    def _failed(self, error: BaseException) -> None:
        """Log the failure, fail the jobs of the pass it interrupted, report unhealthy."""
        self._failures += 1
        try:
            log.critical("scheduler %s: the worker loop failed; failing its pass and restarting it", self.name,
                         exc_info=error)
            taken = self._taken
            message = (f"internal server error: the worker of model {self.name!r} failed while this job was "
                       f"in its hands ({type(error).__name__}: {error})"[:1500] +
                       "; the worker was restarted; submit the job again")
            for job in taken:
                job.fail(FarscopeError(message, job_id=job.id))  # a no-op for jobs already finished
            with self._wake:  # only now: a job leaves the worker's hands finished
                self._taken = ()
            self.running = ()
            self._set_health(False)
        except BaseException:  # noqa: BLE001 - reporting must never stop the restart
            log.exception("scheduler %s: reporting a worker failure failed", self.name)

    def _pause(self, seconds: float) -> bool:
        """Wait `seconds` before a restart; True if the scheduler was closed meanwhile."""
        deadline = time.monotonic() + seconds
        with self._wake:
            while not self._closed and (left := deadline - time.monotonic()) > 0:
                self._wake.wait(left)
            return self._closed

    def _set_health(self, healthy: bool) -> None:
        with self._wake:
            changed, self._healthy = self._healthy != healthy, healthy
        if changed and self.on_health is not None:
            try:
                self.on_health(healthy)
            except Exception:
                log.exception("scheduler %s: the health listener failed", self.name)

    def _loop(self) -> None:
        while (jobs := self._next()) is not None:
            self._serve(jobs)
            with self._wake:
                self._taken = ()
            self.running = ()
            self._failures = 0  # it served a pass: a later failure backs off from the start again

    def _serve(self, jobs: list[Job]) -> None:
        live = [job for job in jobs if not job.cancelled.is_set()]
        for job in jobs:
            if job.cancelled.is_set():
                job.fail(CancelledError("the job was cancelled before it ran", job_id=job.id))
        if not live:
            return
        self.running = tuple(live)
        for job in live:
            job.emit(Event("running"))
        started = self.clock()
        if len(live) == 1:
            try:
                outcomes: list[Any] = [self.replica.run(live[0])]
            except Exception as e:  # the job fails; the worker keeps serving
                outcomes = [e]
        else:
            log.info("co-batching %d jobs on %s", len(live), self.name)
            try:
                outcomes = self.replica.run_many(live)
            except Exception as e:  # the shared pass itself failed: each of its jobs fails with it
                log.error("scheduler %s: a shared pass failed outside its jobs' own errors", self.name, exc_info=e)
                outcomes = [e] * len(live)
        self._charge(live, self.clock() - started)
        for job, outcome in zip(live, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                log.info("job %s failed: %s", job.id, outcome if isinstance(outcome, FarscopeError) else
                         type(outcome).__name__)
                job.fail(outcome)
            else:
                job.finish(outcome)
