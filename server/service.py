"""The gRPC servicer: proto messages in, domain objects to the scheduler, results streamed back.

`serve()` only wires the grpc server, the servicer, health and the port, as in grpc's route_guide.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from farscope.interventions import codec
from farscope.interventions.codec import CHUNK_BYTES, MAX_MESSAGE_BYTES
from farscope.interventions.errors import (
    CancelledError,
    FarscopeError,
    LimitError,
    ModelNotFoundError,
    PermissionDeniedError,
    ValidationError,
    VersionError,
    status_of,
)
from farscope.interventions.uploads import UploadStore
from farscope.interventions.validate import SUPPORTED_IR_VERSIONS, GraphLimits, validate
from farscope.proto import farscope_pb2 as pb
from farscope.proto import farscope_pb2_grpc as pb_grpc

from .jobs import Event, Job, JobStore
from .metrics import Metrics
from .replica import Replica, Results
from .scheduler import Scheduler

__all__ = ["FarscopeServicer", "Server", "start_server", "SERVICE_NAME"]

log = logging.getLogger(__name__)

SERVICE_NAME = "farscope.v1.Farscope"
SERVER_VERSION = "0.1.0"


# A status message travels percent-encoded in grpc-message; past gRPC's 8 KiB metadata limit the call is
# dropped and the client sees RESOURCE_EXHAUSTED instead of the error. Requests' values are quoted in messages.
_MAX_DETAILS = 6000


def _bounded(message: str) -> str:
    """`message`, cut to what grpc-message can carry."""
    size = 0
    for i, char in enumerate(message):
        size += 1 if " " <= char <= "~" and char != "%" else 3 * len(char.encode("utf-8", "replace"))
        if size > _MAX_DETAILS:
            return message[:i] + " [...]"
    return message


def _quote(text: str) -> str:
    """A name a client sent, for an error message: repr'd and at most about 120 characters."""
    return repr(text) if len(text) <= 120 else repr(text[:117]) + "..."


def _status(error: FarscopeError) -> grpc.StatusCode:
    return grpc.StatusCode[status_of(error)]


def _as_farscope(error: BaseException | None, job: Job) -> FarscopeError:
    if not isinstance(error, FarscopeError):
        log.error("job %s: internal error", job.id, exc_info=error)
        error = FarscopeError(f"internal server error: {type(error).__name__}: {error}")
    error.job_id = job.id
    return error


def _abort(context: grpc.ServicerContext, error: FarscopeError, *, code: grpc.StatusCode | None = None,
           metrics: Metrics | None = None) -> None:
    code = code or _status(error)
    if metrics is not None:
        metrics.errors.labels(code=code.name).inc()
    metadata = [("farscope-error", type(error).__name__)]
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        metadata.append(("retry-after", f"{retry_after:.3f}"))
    if error.node_id is not None:
        metadata.append(("farscope-node", str(error.node_id)))
    if error.job_id:
        metadata.append(("farscope-job", error.job_id))
    context.set_trailing_metadata(metadata)
    context.abort(code, _bounded(error.message))


def _stopper(jobs: list[Job], limit: float) -> Callable[[], None]:
    """The check run at every hook: a pass stops at its next module once all its jobs are cancelled
    (a shared pass serves the others on) or once it has run longer than `limit` seconds."""
    deadline = time.monotonic() + limit

    def check() -> None:
        if all(job.cancelled.is_set() for job in jobs):
            raise CancelledError("the job was cancelled")
        if time.monotonic() > deadline:
            raise LimitError(f"the job ran longer than max_wall_seconds={limit:g}")
    return check


def _rate_limiter() -> Any:
    from .auth import RateLimiter

    return RateLimiter()


class FarscopeServicer(pb_grpc.FarscopeServicer):
    def __init__(self, replicas: dict[str, Replica], *, upload_bytes: int = 1 << 30,
                 job_ttl: float = 3600.0, keys: Any = None, metrics: Metrics | None = None,
                 cobatch: bool = True) -> None:
        self.cobatch = cobatch
        self.uploads = UploadStore(upload_bytes)  # content-addressed, so shared by all users safely
        self.jobs = JobStore(ttl=job_ttl)
        self.keys = keys  # an auth.KeyStore, or None: no authentication (loopback only, by the CLI)
        self.rate = _rate_limiter() if keys is not None else None
        self.metrics = metrics or Metrics()
        self.replicas: dict[str, Replica] = {}
        self.schedulers: dict[str, Scheduler] = {}
        for replica in replicas.values():
            self.add(replica)

    def add(self, replica: Replica) -> None:
        """Serve one more model (a server binds its port first and adds models as they load)."""
        if self.cobatch:
            scheduler = Scheduler(replica.name, self._runner(replica), run_many=self._many_runner(replica),
                                  batch_key=lambda job: replica.batch_key(job.payload))
        else:
            scheduler = Scheduler(replica.name, self._runner(replica))
        self.schedulers[replica.name] = scheduler
        self.replicas[replica.name] = replica
        self.metrics.watch_queue(replica.name, lambda: scheduler.depth)

    def close(self, grace: float = 30.0) -> None:
        """Drain: take no new jobs, fail queued ones clearly, give running ones `grace` seconds to
        finish, then cancel them (they stop at their next hook)."""
        for scheduler in self.schedulers.values():
            scheduler.close(timeout=grace)

    @staticmethod
    def _runner(replica: Replica):  # noqa: ANN205
        def run(job: Job) -> Results:
            check_cancelled = _stopper([job], replica.limits.max_wall_seconds)

            def on_log(text: str) -> None:
                job.emit(Event("log", text=text))

            def on_progress(step: int, total: int) -> None:
                job.emit(Event("progress", step=step, total=total))
            return replica.execute(job.payload, check_cancelled=check_cancelled, on_log=on_log,
                                   on_progress=on_progress)
        return run

    @staticmethod
    def _many_runner(replica: Replica):  # noqa: ANN205
        def run_many(jobs: list[Job]) -> list[Any]:
            check_cancelled = _stopper(jobs, replica.limits.max_wall_seconds)
            outcomes = replica.execute_many([job.payload for job in jobs], check_cancelled=check_cancelled)
            return [CancelledError("the job was cancelled") if job.cancelled.is_set() else outcome
                    for job, outcome in zip(jobs, outcomes, strict=True)]
        return run_many

    # -- who is asking -------------------------------------------------------------------------

    def _user(self, context: grpc.ServicerContext, rpc: str) -> Any:
        """The caller (None with auth off); aborts UNAUTHENTICATED for a missing or unknown key."""
        self.metrics.requests.labels(rpc=rpc).inc()
        if self.keys is None:
            return None
        from .auth import key_from_metadata

        try:
            return self.keys.authenticate(key_from_metadata(context.invocation_metadata() or ()))
        except FarscopeError as e:
            self._abort(context, e)

    def _allow(self, context: grpc.ServicerContext, user: Any, model: str) -> None:
        if user is not None and not user.may_use(model):
            self._abort(context, PermissionDeniedError(f"API key {user.name!r} may not use model {model!r}"))

    def _abort(self, context: grpc.ServicerContext, error: FarscopeError,
               code: grpc.StatusCode | None = None) -> None:
        _abort(context, error, code=code, metrics=self.metrics)

    def _replica(self, name: str) -> Replica:
        try:
            return self.replicas[name]
        except KeyError:
            raise ModelNotFoundError(
                f"no model named {_quote(name)} is served here; served: {', '.join(sorted(self.replicas))}"
            ) from None

    def _summary(self, replica: Replica) -> pb.ModelSummary:
        return pb.ModelSummary(name=replica.name, architecture=replica.architecture,
                               num_parameters=replica.num_parameters, dtype=replica.dtype)

    # -- RPCs ----------------------------------------------------------------------------------

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        user = self._user(context, "ListModels")
        replicas = [r for r in self.replicas.values() if user is None or user.may_use(r.name)]
        return pb.ListModelsResponse(models=[self._summary(r) for r in replicas],
                                     server_version=SERVER_VERSION, ir_versions=SUPPORTED_IR_VERSIONS)

    def DescribeModel(self, request: pb.DescribeModelRequest, context: grpc.ServicerContext) -> pb.ModelDescription:
        replica = self._model_for(context, "DescribeModel", request.name)
        return pb.ModelDescription(
            summary=self._summary(replica),
            modules=[pb.ModuleInfo(path=p, class_name=c) for p, c in replica.modules],
            repr=repr(replica.model),
            config_json=replica.config_json(),
            tokenizer_sha256=replica.tokenizer_sha256,
        )

    def GetTokenizer(self, request: pb.DescribeModelRequest, context: grpc.ServicerContext) -> Iterator[pb.FileChunk]:
        replica = self._model_for(context, "GetTokenizer", request.name)
        for name, data in sorted(replica.loaded.tokenizer_files.items()):
            for offset in range(0, max(len(data), 1), CHUNK_BYTES):
                yield pb.FileChunk(name=name, offset=offset, data=data[offset:offset + CHUNK_BYTES],
                                   size=len(data))

    def Execute(
        self, request_iterator: Iterable[pb.ExecuteRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ExecuteEvent]:
        job = self._submit(request_iterator, context, "Execute")
        # A client that goes away while its job waits cancels it; once running, the job finishes and
        # stays fetchable by id (Watch/Fetch) until its TTL.
        context.add_callback(lambda: job.state == "queued" and self.schedulers[job.model].cancel(job))
        yield from self._watch(job, context)
        yield from self._fetch(job, context)

    def Submit(self, request_iterator: Iterable[pb.ExecuteRequest], context: grpc.ServicerContext) -> pb.Queued:
        job = self._submit(request_iterator, context, "Submit")
        return pb.Queued(job_id=job.id, position=next(job.follow()).position)

    def Watch(self, request: pb.JobRequest, context: grpc.ServicerContext) -> Iterator[pb.ExecuteEvent]:
        yield from self._watch(self._job(request.job_id, context, "Watch"), context)

    def Fetch(self, request: pb.JobRequest, context: grpc.ServicerContext) -> Iterator[pb.ExecuteEvent]:
        job = self._job(request.job_id, context, "Fetch")
        if job.finished is None:
            self._abort(context, FarscopeError(f"job {job.id} has not finished; Watch it first", job_id=job.id),
                        code=grpc.StatusCode.FAILED_PRECONDITION)
        yield from self._fetch(job, context)

    def Cancel(self, request: pb.JobRequest, context: grpc.ServicerContext) -> pb.JobState:
        job = self._job(request.job_id, context, "Cancel")
        self.schedulers[job.model].cancel(job)
        return pb.JobState(job_id=job.id, state=job.state)

    # -- jobs ----------------------------------------------------------------------------------

    def _model_for(self, context: grpc.ServicerContext, rpc: str, name: str) -> Replica:
        user = self._user(context, rpc)
        try:
            replica = self._replica(name)
        except FarscopeError as e:
            self._abort(context, e)
        self._allow(context, user, name)
        return replica

    def _submit(self, request_iterator: Iterable[pb.ExecuteRequest], context: grpc.ServicerContext,
                rpc: str) -> Job:
        user = self._user(context, rpc)
        try:
            replica, graph = self._receive(request_iterator, context, user)
        except FarscopeError as e:
            log.info("request rejected: %s", e.message, extra={"user": user.name if user else ""})
            self._abort(context, e)
        except Exception as e:  # a bug of ours, never the client's: say so, keep serving
            log.exception("unexpected error while reading a request")
            self._abort(context, FarscopeError(f"internal server error while reading the request: "
                                               f"{type(e).__name__}"))
        job = Job(model=replica.name, payload=graph, user=user.name if user else "")
        if user is not None and self.jobs.active(job.user) >= user.max_concurrent:
            self._abort(context, LimitError(f"API key {user.name!r} already has {user.max_concurrent} jobs queued "
                                            "or running (its max_concurrent quota); retry when one finishes"))
        self.jobs.add(job)
        log.info("job queued", extra={"job_id": job.id, "user": job.user, "model": job.model})
        try:
            self.schedulers[replica.name].submit(job)
        except FarscopeError as e:
            job.fail(e)  # refused while draining: finished, so it holds no quota
            self._abort(context, e, code=grpc.StatusCode.UNAVAILABLE)
        threading.Thread(target=self._account, args=(job,), daemon=True).start()
        return job

    def _account(self, job: Job) -> None:
        """Record a job's outcome in the metrics and the log once it ends."""
        for event in job.follow():
            if event.kind == "running":
                log.info("job running", extra={"job_id": job.id, "user": job.user, "model": job.model})
        seconds = (job.finished or time.monotonic()) - job.submitted
        outcome = "done" if job.error is None else type(job.error).__name__
        self.metrics.jobs.labels(model=job.model, outcome=outcome).inc()
        self.metrics.latency.labels(model=job.model).observe(seconds)
        if job.result is not None:
            self.metrics.run_time.labels(model=job.model).observe(job.result.run_seconds)
        log.info("job %s", "done" if job.error is None else f"failed: {job.error}",
                 extra={"job_id": job.id, "user": job.user, "model": job.model, "seconds": round(seconds, 4)})

    def _job(self, job_id: str, context: grpc.ServicerContext, rpc: str) -> Job:
        user = self._user(context, rpc)
        job = self.jobs.get(job_id)
        if job is None or (user is not None and job.user != user.name):  # others' jobs do not exist
            self._abort(context, FarscopeError(f"no job {_quote(job_id)} here: unknown, or its results expired"),
                        code=grpc.StatusCode.NOT_FOUND)
        return job

    def _watch(self, job: Job, context: grpc.ServicerContext) -> Iterator[pb.ExecuteEvent]:
        for event in job.follow():
            if event.kind == "queued":
                yield pb.ExecuteEvent(queued=pb.Queued(job_id=job.id, position=event.position))
            elif event.kind == "running":
                yield pb.ExecuteEvent(running=pb.Running(job_id=job.id))
            elif event.kind == "progress":
                yield pb.ExecuteEvent(progress=pb.Progress(job_id=job.id, step=event.step, total=event.total))
            elif event.kind == "log":
                yield pb.ExecuteEvent(log=pb.LogLine(text=event.text))
            elif event.kind == "error":
                self._abort(context, _as_farscope(event.error, job))

    def _fetch(self, job: Job, context: grpc.ServicerContext) -> Iterator[pb.ExecuteEvent]:
        if job.error is not None:
            self._abort(context, _as_farscope(job.error, job))
        self.metrics.bytes_out.inc(job.result.nbytes)
        yield from _stream_results(job.result)
        yield pb.ExecuteEvent(done=pb.Done(job_id=job.id, run_seconds=job.result.run_seconds))

    def _receive(self, request_iterator: Iterable[pb.ExecuteRequest], context: grpc.ServicerContext,
                 user: Any) -> tuple[Replica, object]:
        requests = iter(request_iterator)
        first = next(requests, None)
        if first is None or first.WhichOneof("part") != "header":
            raise ValidationError("an Execute call must start with a RequestHeader")
        header = first.header
        replica = self._replica(header.model)
        self._allow(context, user, replica.name)
        if user is not None:
            self.rate.acquire(user)  # LimitError with retry_after once the key's rate is spent
        if header.ir_version not in SUPPORTED_IR_VERSIONS:
            raise VersionError(
                f"this server (farscope {SERVER_VERSION}) accepts graph IR version(s) "
                f"{', '.join(map(str, SUPPORTED_IR_VERSIONS))}; the client (farscope "
                f"{(header.client_version or '?')[:64]}) sent version {header.ir_version}. Install a farscope "
                "client that matches this server."
            )
        limit = replica.limits.max_request_bytes
        if header.graph_bytes > limit:
            raise LimitError(f"request of {header.graph_bytes} bytes exceeds max_request_bytes={limit}")
        parts: list[bytes] = []
        size = 0
        for message in requests:
            if message.WhichOneof("part") != "graph_chunk":
                raise ValidationError("after the header, an Execute call may only send graph chunks")
            size += len(message.graph_chunk)
            if size > limit:
                raise LimitError(f"request exceeds max_request_bytes={limit}")
            parts.append(message.graph_chunk)
        if size != header.graph_bytes:
            raise ValidationError(f"the header announced {header.graph_bytes} graph bytes, {size} arrived")
        self.metrics.bytes_in.inc(size)
        document = codec.decode(b"".join(parts), uploads=self.uploads)
        limits = GraphLimits(max_nodes=replica.limits.max_nodes)
        return replica, validate(document, module_paths=replica.module_paths, limits=limits)


def _stream_results(results: Results) -> Iterator[pb.ExecuteEvent]:
    blobs = [memoryview(results.document), *results.blobs]
    yield pb.ExecuteEvent(result=pb.ResultHeader(blob_sizes=[b.nbytes for b in blobs]))
    for index, blob in enumerate(blobs):
        for offset in range(0, blob.nbytes, CHUNK_BYTES):
            chunk = blob[offset:offset + CHUNK_BYTES].tobytes()
            yield pb.ExecuteEvent(chunk=pb.ResultChunk(blob=index, offset=offset, data=chunk))


@dataclass
class Server:
    """A running farscope gRPC server: its port, health servicer and how to stop it."""

    grpc_server: grpc.Server
    servicer: FarscopeServicer
    health: health.HealthServicer
    port: int
    metrics_port: int | None = None

    def add(self, replica: Replica) -> None:
        self.servicer.add(replica)

    def set_serving(self) -> None:
        """Report SERVING on the gRPC health service: readiness means the models are loaded."""
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float | None = 5.0) -> None:
        """Drain and stop: NOT_SERVING at once, no new jobs, queued jobs failed clearly, running jobs
        given `grace` seconds to finish (then cancelled), their clients sent the outcome, then exit."""
        self.health.enter_graceful_shutdown()
        busy = any(s.running is not None for s in self.servicer.schedulers.values())
        self.servicer.close(grace=grace or 0.0)
        if busy:  # jobs finished during the drain: their non-blocking clients still need to Fetch
            time.sleep(min(2.0, grace or 0.0))
        self.grpc_server.stop(max(grace or 0.0, 1.0)).wait()
        self.servicer.metrics.close()


def start_server(replicas: dict[str, Replica], *, host: str = "127.0.0.1", port: int = 0,
                 max_workers: int = 32, serving: bool = True, upload_bytes: int = 1 << 30,
                 keys: Any = None, job_ttl: float = 3600.0, metrics_port: int | None = None,
                 tls: tuple[bytes, bytes] | None = None, cobatch: bool = True) -> Server:
    """Start serving `replicas` on host:port (0 picks a free port).

    With `serving=False` the health service says NOT_SERVING until `set_serving()`: a server can bind
    its port at once and tell load balancers it is ready only after its models are loaded.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="farscope-rpc"),
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
    )
    servicer = FarscopeServicer(replicas, upload_bytes=upload_bytes, keys=keys, job_ttl=job_ttl,
                                cobatch=cobatch)
    pb_grpc.add_FarscopeServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if tls is not None:  # (certificate chain PEM, private key PEM)
        credentials = grpc.ssl_server_credentials([(tls[1], tls[0])])
        bound = server.add_secure_port(f"{host}:{port}", credentials)
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}")
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    server.start()
    running = Server(server, servicer, health_servicer, bound)
    if metrics_port is not None:
        running.metrics_port = servicer.metrics.serve_http(metrics_port, host)
    if serving:
        running.set_serving()
    return running
