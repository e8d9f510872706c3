"""The server's core without a transport: the object a gRPC servicer (or a Ray Serve deployment) wraps.

It owns the replicas and a scheduler for each, the job store, the upload pool, the quotas (a key's
rate, concurrent jobs and open streams), decode + validate with each replica's limits, the workers'
health, and the accounting (metrics, job log lines). Every call is plain Python; failures are farscope
errors only.

A request is taken in steps, so that a transport can refuse a caller before reading anything and a
huge body before reading all of it::

    with engine.authenticating():                      # bounded: calls whose key is being checked
        user = engine.authenticate(key)                # None when keys are off
    with engine.stream(user, "execute"):               # bounded: the key's open Execute streams
        engine.charge(user)                            # one call of the key's rate, before any read
        admission = engine.admit(user, Header(model, ir_version, graph_bytes))
        ... read the body in chunks, calling admission.check_size(bytes_so_far); a transport also
        bounds the time each message may take (StreamLimits.message_seconds, request_seconds) ...
        job = engine.enqueue(admission, body)          # decode, validate, quota, queue
        async for event in engine.events(job): ...     # queued, running, progress, log, done | error
        results = engine.results(job)

`engine.submit(user, header, body)` does charge + admit + enqueue at once. The flow of one job from
here: engine -> scheduler (its replica's queue and worker thread) -> replica -> executor; the job's
events come back through the job itself (jobs.py), never through a call back into the engine.

Stream limits (`StreamLimits`, defaults in brackets; `farscope serve` flags of the same names):

- ``max_execute_streams`` [16]: Execute and Submit calls open at once per key, from the first byte to
  the last result chunk. Above it: LimitError (RESOURCE_EXHAUSTED), retry after 1 s.
- ``max_watch_streams`` [64]: Watch calls open at once per key (a client watches each of its
  non-blocking jobs).
  A key's caps are never below its concurrent-job quota (`User.max_concurrent`): a client with a
  call or a watch on each job it may have is never refused.
- ``max_unauthenticated`` [64]: calls of all users together whose key is still being checked.
- ``message_seconds`` [30]: the longest wait for an Execute/Submit header, and for each graph chunk
  after it. ``request_seconds`` [300]: for the whole request body. Past either, the call ends with
  DEADLINE_EXCEEDED (a LimitError): a client that opens a call and sends nothing, or trickles, is cut off.

With keys off (one local user) the caps apply to that user as to one key.

Worker health: each scheduler reports whether its worker thread is up (`on_health`); `healthy` is
False while any model's worker is down, and `watch_health(listener)` tells a transport at once (the
gRPC front turns it into its health service's NOT_SERVING / SERVING).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from farscope._version import __version__ as SERVER_VERSION
from farscope.interventions import codec
from farscope.interventions.errors import (
    FarscopeError,
    LimitError,
    ModelNotFoundError,
    PermissionDeniedError,
    ValidationError,
    VersionError,
)
from farscope.interventions.uploads import UploadPool
from farscope.interventions.validate import SUPPORTED_IR_VERSIONS, GraphLimits, validate

from .auth import OpenStreams
from .jobs import DEFAULT_JOB_TTL, Event, Job, JobStore
from .metrics import Metrics
from .replica import Replica, Results
from .scan import Scanner
from .scheduler import Scheduler

if TYPE_CHECKING:
    from .auth import KeyStore, User

__all__ = ["DEFAULT_UPLOAD_BYTES", "SERVER_VERSION", "SUPPORTED_IR_VERSIONS", "Admission", "Engine", "Header",
           "ModelDescription", "ModelSummary", "StreamLimits"]

log = logging.getLogger(__name__)

DEFAULT_UPLOAD_BYTES = 1 << 30  # uploaded tensors held at once, all users together (least recently used go)

StreamKind = Literal["execute", "watch"]


@dataclass(frozen=True, kw_only=True)
class StreamLimits:
    """How many calls may be open at once and how slowly a request may arrive (module docstring)."""

    max_execute_streams: int = 16
    max_watch_streams: int = 64
    max_unauthenticated: int = 64
    message_seconds: float = 30.0
    request_seconds: float = 300.0

    def __post_init__(self) -> None:
        for name in ("max_execute_streams", "max_watch_streams", "max_unauthenticated", "message_seconds",
                     "request_seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"StreamLimits.{name} must be a positive number, not {value!r}")


@dataclass(frozen=True)
class Header:
    """What a request says about itself before its graph: the model, the IR version, the graph's size."""

    model: str
    ir_version: int
    graph_bytes: int
    client_version: str = ""


@dataclass(frozen=True)
class ModelSummary:
    name: str
    architecture: str
    num_parameters: int
    dtype: str


@dataclass(frozen=True)
class ModelDescription:
    summary: ModelSummary
    modules: list[tuple[str, str]]  # (named_modules() path, class name), in order
    repr: str
    config_json: str
    tokenizer_sha256: str


@dataclass(frozen=True)
class Admission:
    """A request whose header passed (model, permission, rate, version, announced size): the body it may
    still send is bounded by `max_bytes`."""

    user: User | None
    replica: Replica
    header: Header

    @property
    def max_bytes(self) -> int:
        return self.replica.limits.max_request_bytes

    def check_size(self, received: int) -> None:
        """Raise as soon as the body read so far is over the limit, or over what its header announced
        (a client announcing 1 KB must not make the server buffer megabytes before it is refused)."""
        if received > self.max_bytes:
            raise LimitError(f"request exceeds max_request_bytes={self.max_bytes}")
        if received > self.header.graph_bytes:
            raise ValidationError(f"the header announced {self.header.graph_bytes} graph bytes; more arrived")


def _quote(text: str) -> str:
    """A name a client sent, for an error message: repr'd and at most about 120 characters."""
    return repr(text) if len(text) <= 120 else repr(text[:117]) + "..."


def _user_name(user: User | None) -> str:
    return user.name if user is not None else ""


class Engine:
    def __init__(self, replicas: dict[str, Replica] | None = None, *, keys: KeyStore | None = None,
                 upload_bytes: int = DEFAULT_UPLOAD_BYTES, upload_bytes_per_user: int | None = None,
                 job_ttl: float = DEFAULT_JOB_TTL, cobatch: bool = True, metrics: Metrics | None = None,
                 stream_limits: StreamLimits | None = None) -> None:
        """`keys`: an auth.KeyStore, or None: no authentication (loopback only, by the CLI).
        `upload_bytes` bounds the uploads of all users together, `upload_bytes_per_user` (default: the
        same) each user's; each user sees only their own uploads."""
        self.keys = keys
        self.cobatch = cobatch
        self.stream_limits = stream_limits or StreamLimits()
        self.streams = OpenStreams()
        self.uploads = UploadPool(upload_bytes, max_bytes_per_user=upload_bytes_per_user)
        self._health_lock = threading.Lock()
        self._down: set[str] = set()  # models whose worker is down
        self._health_listeners: list[Callable[[str, bool], None]] = []
        self.jobs = JobStore(ttl=job_ttl)
        self.metrics = metrics or Metrics()
        if keys is not None:
            from .auth import RateLimiter

            self.rate: RateLimiter | None = RateLimiter()
        else:
            self.rate = None
        self.replicas: dict[str, Replica] = {}
        self.schedulers: dict[str, Scheduler] = {}
        self._closing = False
        self.scanners: dict[str, Scanner] = {}  # made on a model's first scan
        for replica in (replicas or {}).values():
            self.add(replica)

    def add(self, replica: Replica) -> None:
        """Serve one more model (a server binds its port first and adds models as they load)."""
        scheduler = Scheduler(replica, cobatch=self.cobatch,
                              on_health=functools.partial(self.worker_health, replica.name))
        self.schedulers[replica.name] = scheduler
        self.replicas[replica.name] = replica
        self.metrics.watch_queue(replica.name, lambda: scheduler.depth)
        self.metrics.worker_up.labels(model=replica.name).set(0 if replica.name in self.down else 1)

    @property
    def busy(self) -> bool:
        """Whether any replica is running a job now."""
        return any(scheduler.running for scheduler in self.schedulers.values())

    # -- workers' health -------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False while any model's worker is down."""
        with self._health_lock:
            return not self._down

    @property
    def down(self) -> frozenset[str]:
        """The models whose worker is down now."""
        with self._health_lock:
            return frozenset(self._down)

    def watch_health(self, listener: Callable[[str, bool], None]) -> None:
        """Call `listener(model, healthy)` whenever a model's worker goes down or comes back (on the
        worker's thread: a listener only hands the news on)."""
        with self._health_lock:
            self._health_listeners.append(listener)

    def worker_health(self, model: str, healthy: bool) -> None:
        """Whether `model`'s worker is up: each scheduler's `on_health` (called on its worker thread)."""
        with self._health_lock:
            if healthy == (model not in self._down):
                return
            (self._down.discard if healthy else self._down.add)(model)
            listeners = list(self._health_listeners)
        self.metrics.worker_up.labels(model=model).set(1 if healthy else 0)
        if healthy:
            log.warning("model %s: its worker is back; serving", model, extra={"model": model})
        elif self._closing:  # the drain stopped it: expected, not an outage
            log.info("model %s: its worker stopped (the server is shutting down)", model, extra={"model": model})
        else:
            log.error("model %s: its worker is down; health says NOT_SERVING until it is back",
                      model, extra={"model": model})
        for listener in listeners:
            try:
                listener(model, healthy)
            except Exception:  # a listener's bug must not reach the worker thread
                log.exception("a health listener failed")

    def close(self, grace: float = 30.0) -> None:
        """Drain: take no new jobs, fail queued ones clearly, give running ones `grace` seconds to
        finish, then cancel them (they stop at their next hook). Blocks until then."""
        self._closing = True
        for scheduler in self.schedulers.values():
            scheduler.close(timeout=grace)

    # -- who is asking, and for what -----------------------------------------------------------

    def authenticate(self, key: str | None) -> User | None:
        """The key's user (None with authentication off); AuthError for a missing or unknown key."""
        return None if self.keys is None else self.keys.authenticate(key)

    @contextmanager
    def authenticating(self) -> Iterator[None]:
        """Count a call whose key is being checked, for the `with` block: at most
        `max_unauthenticated` of them, all users together, or LimitError."""
        limit = self.stream_limits.max_unauthenticated
        with self.streams.hold(("unauthenticated",), limit=limit,
                               refusal=f"the server is busy checking {limit} other calls' keys; retry shortly"):
            yield

    @contextmanager
    def stream(self, user: User | None, kind: StreamKind) -> Iterator[None]:
        """Count one more open `kind` call of `user`'s key for the `with` block, or LimitError when the
        key has its cap open already: `max_execute_streams` / `max_watch_streams`, or the key's
        concurrent-job quota where that is larger."""
        limit = (self.stream_limits.max_execute_streams if kind == "execute"
                 else self.stream_limits.max_watch_streams)
        if user is not None:
            limit = max(limit, user.max_concurrent)
        who = _user_name(user)
        calls = "Execute/Submit" if kind == "execute" else "Watch"
        refusal = (f"{'API key ' + repr(who) if who else 'this client'} has {limit} {calls} calls open "
                   f"already (the most a key may have at once); close one, or wait for one to end")
        with self.streams.hold((kind, who), limit=limit, refusal=refusal):
            yield

    def charge(self, user: User | None) -> None:
        """One call of the key's rate (LimitError with `retry_after` once spent); nothing with keys off.
        A transport charges before it reads a request's first message."""
        if user is not None and self.rate is not None:
            self.rate.acquire(user)

    def _replica(self, name: str, user: User | None) -> Replica:
        replica = self.replicas.get(name)
        if replica is None:
            raise ModelNotFoundError(
                f"no model named {_quote(name)} is served here; served: {', '.join(sorted(self.replicas))}")
        if user is not None and not user.may_use(name):
            raise PermissionDeniedError(f"API key {user.name!r} may not use model {name!r}")
        return replica

    def list_models(self, user: User | None) -> list[ModelSummary]:
        return [_summary(r) for r in self.replicas.values() if user is None or user.may_use(r.name)]

    def describe(self, name: str, user: User | None) -> ModelDescription:
        replica = self._replica(name, user)
        return ModelDescription(summary=_summary(replica), modules=replica.modules, repr=repr(replica.model),
                                config_json=replica.config_json(), tokenizer_sha256=replica.tokenizer_sha256)

    def tokenizer_files(self, name: str, user: User | None) -> dict[str, bytes]:
        return dict(self._replica(name, user).loaded.tokenizer_files)

    # -- shapes while recording ----------------------------------------------------------------

    def scan(self, user: User | None, name: str, ir_version: int, document: bytes) -> bytes:
        """The encoded scan document (server/scan.py) of a document holding only inputs
        (`{version, invokes, nodes: []}`). Checked like a request's header and inputs; a scan the
        model has cached costs nothing, any other one call of the key's rate. CPU-bound: a transport on
        an event loop calls it from a thread."""
        replica = self._replica(name, user)
        if ir_version not in SUPPORTED_IR_VERSIONS:
            raise VersionError(f"this server (farscope {SERVER_VERSION}) accepts graph IR version(s) "
                               f"{', '.join(map(str, SUPPORTED_IR_VERSIONS))}; the client sent version {ir_version}")
        if len(document) > replica.limits.max_request_bytes:
            raise LimitError(f"scan request of {len(document)} bytes exceeds max_request_bytes="
                             f"{replica.limits.max_request_bytes}")
        graph = validate(codec.decode(document), module_paths=replica.module_paths,
                         limits=GraphLimits(max_nodes=replica.limits.max_nodes))
        if graph.nodes or len(graph.segments) != 1:
            raise ValidationError("a scan document holds one trace's inputs and no nodes")
        scanner = self.scanners.setdefault(replica.name, Scanner(replica))
        if not scanner.cached(graph.segments[0]):
            self.charge(user)
        return scanner.scan(graph.segments[0])

    # -- requests become jobs ------------------------------------------------------------------

    def admit(self, user: User | None, header: Header) -> Admission:
        """Check a request's header: the model exists and the key may use it, the IR version, the
        announced size. (The call's rate was charged before: `charge`.)"""
        replica = self._replica(header.model, user)
        if header.ir_version not in SUPPORTED_IR_VERSIONS:
            raise VersionError(
                f"this server (farscope {SERVER_VERSION}) accepts graph IR version(s) "
                f"{', '.join(map(str, SUPPORTED_IR_VERSIONS))}; the client (farscope "
                f"{(header.client_version or '?')[:64]}) sent version {header.ir_version}. Install a farscope "
                "client that matches this server."
            )
        admission = Admission(user, replica, header)
        if header.graph_bytes > admission.max_bytes:
            raise LimitError(f"request of {header.graph_bytes} bytes exceeds max_request_bytes={admission.max_bytes}")
        return admission

    def enqueue(self, admission: Admission, graph: bytes) -> Job:
        """Decode and validate an admitted request's graph, check the key's concurrent-job quota and
        queue it. CPU-bound for a large graph: a transport on an event loop calls it from a thread."""
        header, replica, user = admission.header, admission.replica, admission.user
        admission.check_size(len(graph))
        if len(graph) != header.graph_bytes:
            raise ValidationError(f"the header announced {header.graph_bytes} graph bytes, {len(graph)} arrived")
        self.metrics.bytes_in.inc(len(graph))
        try:
            document = codec.decode(graph, uploads=self.uploads.store(_user_name(user)))
            payload = validate(document, module_paths=replica.module_paths,
                               limits=GraphLimits(max_nodes=replica.limits.max_nodes))
        except FarscopeError:
            raise
        except Exception as e:  # a bug of ours, never the client's: say so, keep serving
            log.exception("unexpected error while reading a request")
            raise FarscopeError(f"internal server error while reading the request: {type(e).__name__}") from None
        job = Job(model=replica.name, payload=payload, user=_user_name(user))
        self.jobs.add(job, max_active=user.max_concurrent if user is not None else None)
        job.subscribe(self._account)
        log.info("job queued", extra={"job_id": job.id, "user": job.user, "model": job.model})
        try:
            self.schedulers[replica.name].submit(job)
        except FarscopeError as e:
            job.fail(e)  # refused while draining: finished, so it holds no quota
            raise
        return job

    def submit(self, user: User | None, header: Header, graph: bytes) -> Job:
        """`charge`, `admit` then `enqueue`: for callers that hold the whole request already."""
        self.charge(user)
        return self.enqueue(self.admit(user, header), graph)

    def _account(self, job: Job, event: Event) -> None:
        """Log a job's start; record its outcome in the metrics and the log once it ends. Runs on the
        thread that emitted the event (the replica's worker, or a canceller)."""
        extra = {"job_id": job.id, "user": job.user, "model": job.model}
        if event.kind == "running":
            log.info("job running", extra=extra)
        if event.kind not in ("done", "error"):
            return
        seconds = (job.finished or time.monotonic()) - job.submitted
        outcome = "done" if job.error is None else type(job.error).__name__
        run_seconds = job.result.run_seconds if job.result is not None else None
        self.metrics.record_job(job.model, outcome, seconds, run_seconds)
        log.info("job %s", "done" if job.error is None else f"failed: {job.error}",
                 extra={**extra, "seconds": round(seconds, 4)})

    # -- jobs ----------------------------------------------------------------------------------

    def job(self, job_id: str, user: User | None) -> Job | None:
        """The job with this id, or None: unknown, expired, or another key's (others' jobs do not exist)."""
        job = self.jobs.get(job_id)
        if job is None or (user is not None and job.user != user.name):
            return None
        return job

    def events(self, job: Job) -> AsyncIterator[Event]:
        """The job's events, replayed from the start then live, until it ends (on the caller's event
        loop; waiting holds no thread)."""
        return job.watch()

    def results(self, job: Job) -> Results:
        """A finished job's results; its error if it failed."""
        if job.error is not None:
            raise job.error.with_traceback(None)
        if job.result is None:
            raise FarscopeError(f"job {job.id} has not finished", job_id=job.id)
        self.metrics.bytes_out.inc(job.result.nbytes)
        return job.result

    def cancel(self, job: Job) -> None:
        """A queued job never runs; a running one stops at its next hook or generation step."""
        self.schedulers[job.model].cancel(job)

    def abandon(self, job: Job) -> None:
        """Its client went away: a queued job is cancelled; once running, it finishes and stays
        fetchable by id until its TTL."""
        self.schedulers[job.model].withdraw(job)


def _summary(replica: Replica) -> ModelSummary:
    return ModelSummary(name=replica.name, architecture=replica.architecture,
                        num_parameters=replica.num_parameters, dtype=replica.dtype)
