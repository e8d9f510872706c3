"""The gRPC front (grpc.aio): one short async method per RPC, translating protobuf <-> engine calls.

The servicer holds no state of its own: the engine (engine.py) does everything else. No RPC holds a
thread while it waits: watching a job is an asyncio wait woken by the replica's worker thread; model
work runs on those worker threads; decode + validate and key lookups run on a small pool of their own.

No user can hold the server (the engine's `StreamLimits`, defaults there): a call counts as
unauthenticated while its key is checked (`max_unauthenticated` of those, all users together); an
Execute or Submit call then takes one of its key's `max_execute_streams` slots and one call of the
key's rate before reading any message, and must send its header, and each graph chunk after it, within
`message_seconds` (the whole body within `request_seconds`), else it ends DEADLINE_EXCEEDED; a Watch
takes one of `max_watch_streams`. Over a cap: RESOURCE_EXHAUSTED, retry after 1 s.

Health (grpc.health.v1): "" and "farscope.v1.Farscope" are SERVING once the models are loaded
(`set_serving`) and while every model's worker is up; "farscope.v1.Farscope/<model>" says the same of
one model. A worker that goes down turns its model and the overall status NOT_SERVING until it is back.
The health service shares nothing with users' calls (no pool, no cap), so it answers whatever they do.

`start_server()` wires the aio server, the servicer, health and the port, on a background thread with
its own event loop, so that sync callers (the CLI, tests) hold a plain `Server` handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from farscope.interventions.codec import BULK_CHUNK_BYTES, CHUNK_BYTES, MAX_MESSAGE_BYTES
from farscope.interventions.errors import FarscopeError, LimitError, ValidationError, status_of
from farscope.proto import chunks
from farscope.proto import farscope_pb2 as pb
from farscope.proto import farscope_pb2_grpc as pb_grpc

from .auth import key_from_metadata
from .engine import (
    DEFAULT_UPLOAD_BYTES,
    SERVER_VERSION,
    SUPPORTED_IR_VERSIONS,
    Engine,
    Header,
    ModelSummary,
    StreamKind,
    StreamLimits,
)
from .jobs import DEFAULT_JOB_TTL, Event, Job
from .replica import Replica, Results

if TYPE_CHECKING:
    from .auth import KeyStore, User

__all__ = ["FarscopeServicer", "Server", "start_server", "SERVICE_NAME", "model_health_name"]

log = logging.getLogger(__name__)

SERVICE_NAME = "farscope.v1.Farscope"
T = TypeVar("T")

# A status message travels percent-encoded in grpc-message; past gRPC's 8 KiB metadata limit the call is
# dropped and the client sees RESOURCE_EXHAUSTED instead of the error. Requests' values are quoted in messages.
_MAX_DETAILS = 6000
# Requests up to this size are decoded and validated on the event loop: well under a millisecond, less
# than the hop to the pool and back. Larger ones go to the pool so that the loop keeps serving.
_INLINE_BYTES = 16 * 1024


def model_health_name(model: str) -> str:
    """The health service name that reports one model: ``farscope.v1.Farscope/<model>``."""
    return f"{SERVICE_NAME}/{model}"


def _bounded(message: str) -> str:
    """`message`, cut to what grpc-message can carry."""
    size = 0
    for i, char in enumerate(message):
        size += 1 if " " <= char <= "~" and char != "%" else 3 * len(char.encode("utf-8", "replace"))
        if size > _MAX_DETAILS:
            return message[:i] + " [...]"
    return message


class FarscopeServicer(pb_grpc.FarscopeServicer):
    def __init__(self, engine: Engine, blocking: ThreadPoolExecutor) -> None:
        self.engine = engine
        self._pool = blocking  # for CPU-bound or blocking calls (decode + validate, key lookups)

    # -- RPCs ----------------------------------------------------------------------------------

    async def ListModels(self, request: pb.ListModelsRequest, context: Any) -> pb.ListModelsResponse:
        user = await self._user(context, "ListModels")
        return pb.ListModelsResponse(models=[_summary(m) for m in self.engine.list_models(user)],
                                     server_version=SERVER_VERSION, ir_versions=SUPPORTED_IR_VERSIONS)

    async def DescribeModel(self, request: pb.DescribeModelRequest, context: Any) -> pb.ModelDescription:
        user = await self._user(context, "DescribeModel")
        described = await self._call(context, self.engine.describe, request.name, user)
        return pb.ModelDescription(
            summary=_summary(described.summary),
            modules=[pb.ModuleInfo(path=p, class_name=c) for p, c in described.modules],
            repr=described.repr,
            config_json=described.config_json,
            tokenizer_sha256=described.tokenizer_sha256,
        )

    async def GetTokenizer(self, request: pb.DescribeModelRequest, context: Any) -> AsyncIterator[pb.FileChunk]:
        user = await self._user(context, "GetTokenizer")
        files = await self._call(context, self.engine.tokenizer_files, request.name, user)
        for name, data in sorted(files.items()):
            for offset in range(0, max(len(data), 1), CHUNK_BYTES):
                yield pb.FileChunk(name=name, offset=offset, data=data[offset:offset + CHUNK_BYTES],
                                   size=len(data))

    async def Execute(self, request_iterator: AsyncIterator[pb.ExecuteRequest],
                      context: Any) -> AsyncIterator[pb.ExecuteEvent]:
        user = await self._user(context, "Execute")
        async with self._stream(context, user, "execute"):
            job = await self._submit(request_iterator, context, user)
            try:
                async for message in self._watch(job, context):
                    yield message
                async for message in self._fetch(job, context):
                    yield message
            finally:  # a client gone while its job waits cancels it; once running, the job finishes
                self.engine.abandon(job)

    async def Submit(self, request_iterator: AsyncIterator[pb.ExecuteRequest], context: Any) -> pb.Queued:
        user = await self._user(context, "Submit")
        async with self._stream(context, user, "execute"):
            job = await self._submit(request_iterator, context, user)
        return pb.Queued(job_id=job.id, position=job.position)

    async def Watch(self, request: pb.JobRequest, context: Any) -> AsyncIterator[pb.ExecuteEvent]:
        user = await self._user(context, "Watch")
        async with self._stream(context, user, "watch"):
            job = await self._job(request.job_id, context, user)
            async for message in self._watch(job, context):
                yield message

    async def Fetch(self, request: pb.JobRequest, context: Any) -> AsyncIterator[pb.ExecuteEvent]:
        job = await self._job(request.job_id, context, await self._user(context, "Fetch"))
        if job.finished is None:
            await self._abort(context, FarscopeError(f"job {job.id} has not finished; Watch it first",
                                                     job_id=job.id), code=grpc.StatusCode.FAILED_PRECONDITION)
        async for message in self._fetch(job, context):
            yield message

    async def Cancel(self, request: pb.JobRequest, context: Any) -> pb.JobState:
        job = await self._job(request.job_id, context, await self._user(context, "Cancel"))
        self.engine.cancel(job)
        return pb.JobState(job_id=job.id, state=job.state)

    async def Scan(self, request: pb.ScanRequest, context: Any) -> pb.ScanResult:
        user = await self._user(context, "Scan")
        try:
            document = await self._blocking(self.engine.scan, user, request.model, request.ir_version,
                                            request.document)
        except FarscopeError as e:
            await self._abort(context, e)
        except Exception as e:  # a bug of ours, never the client's: say so, keep serving
            log.exception("unexpected error while scanning")
            await self._abort(context, FarscopeError(f"internal server error while scanning: {type(e).__name__}"))
        return pb.ScanResult(document=document)

    # -- helpers -------------------------------------------------------------------------------

    async def _blocking(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(function, *args))

    async def _call(self, context: Any, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` on the loop (a cheap engine call); its farscope error aborts the RPC."""
        try:
            return function(*args)
        except FarscopeError as e:
            await self._abort(context, e)

    async def _abort(self, context: Any, error: FarscopeError, *, code: grpc.StatusCode | None = None) -> NoReturn:
        """End the call with `error`: its status, message and context as trailing metadata."""
        code = code or grpc.StatusCode[status_of(error)]
        self.engine.metrics.errors.labels(code=code.name).inc()
        metadata = [("farscope-error", type(error).__name__)]
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            metadata.append(("retry-after", f"{retry_after:.3f}"))
        if error.node_id is not None:
            metadata.append(("farscope-node", str(error.node_id)))
        if error.job_id:
            metadata.append(("farscope-job", error.job_id))
        await context.abort(code, _bounded(error.message), trailing_metadata=tuple(metadata))
        raise AssertionError("context.abort returned")  # it raises; this line tells type checkers so

    async def _user(self, context: Any, rpc: str) -> User | None:
        """The caller (None with auth off); aborts UNAUTHENTICATED for a missing or unknown key, and
        RESOURCE_EXHAUSTED when too many calls wait for their keys to be checked."""
        self.engine.metrics.requests.labels(rpc=rpc).inc()
        if self.engine.keys is None:
            return None
        key = key_from_metadata(context.invocation_metadata())
        try:
            if not key:  # refused at once (KeyStore raises before its database): no pool, no slot
                return self.engine.authenticate(key)
            with self.engine.authenticating():
                return await self._blocking(self.engine.authenticate, key)
        except FarscopeError as e:
            await self._abort(context, e)

    @asynccontextmanager
    async def _stream(self, context: Any, user: User | None, kind: StreamKind) -> AsyncIterator[None]:
        """Hold one of the key's `kind` stream slots for the block; aborts RESOURCE_EXHAUSTED when the
        key has them all open."""
        with contextlib.ExitStack() as slot:
            try:
                slot.enter_context(self.engine.stream(user, kind))
            except FarscopeError as e:
                log.info("call refused: %s", e.message, extra={"user": user.name if user else ""})
                await self._abort(context, e)
            yield

    async def _job(self, job_id: str, context: Any, user: User | None) -> Job:
        job = self.engine.job(job_id, user)
        if job is None:
            await self._abort(context, FarscopeError(f"no job {_quote(job_id)} here: unknown, or its results "
                                                     "expired"), code=grpc.StatusCode.NOT_FOUND)
        return job

    async def _submit(self, request_iterator: AsyncIterator[pb.ExecuteRequest], context: Any,
                      user: User | None) -> Job:
        try:
            self.engine.charge(user)  # before the first read: a call that sends nothing still pays
            return await self._receive(request_iterator, user)
        except TimeoutError as e:  # the client sent too slowly, or nothing: a LimitError, by deadline
            log.info("request cut off: %s", e, extra={"user": user.name if user else ""})
            await self._abort(context, LimitError(str(e)), code=grpc.StatusCode.DEADLINE_EXCEEDED)
        except FarscopeError as e:
            log.info("request rejected: %s", e.message, extra={"user": user.name if user else ""})
            await self._abort(context, e)
        except Exception as e:  # a bug of ours, never the client's: say so, keep serving
            log.exception("unexpected error while reading a request")
            await self._abort(context, FarscopeError(f"internal server error while reading the request: "
                                                     f"{type(e).__name__}"))

    async def _receive(self, request_iterator: AsyncIterator[pb.ExecuteRequest], user: User | None) -> Job:
        """Read a request as it arrives: the header is checked first, the body's size at every chunk;
        TimeoutError when a message, or the whole request, is slower than the engine's StreamLimits."""
        requests = _paced(aiter(request_iterator), self.engine.stream_limits)
        first = await anext(requests, None)
        if first is None or isinstance(first, memoryview) or first.WhichOneof("part") != "header":
            raise ValidationError("an Execute call must start with a RequestHeader")
        header = first.header
        admission = self.engine.admit(user, Header(header.model, header.ir_version, header.graph_bytes,
                                                   header.client_version))
        # One buffer of the announced size (admitted, so within the key's limit), each chunk copied
        # into place as it arrives: the request's large tensors are then built over it (codec.decode).
        # It is not zero-filled first: memory the client never sends to is never touched, so announcing
        # a size costs nothing.
        view = memoryview(torch.empty(header.graph_bytes, dtype=torch.uint8).numpy()).cast("B")
        size = 0
        async for message in requests:
            data = message if isinstance(message, memoryview) else _graph_chunk(message)
            end = size + len(data)
            admission.check_size(end)
            view[size:end] = data
            size = end
        body = view[:size]  # short: enqueue names the shortfall
        if size <= _INLINE_BYTES:
            return self.engine.enqueue(admission, body)
        return await self._blocking(self.engine.enqueue, admission, body)

    async def _watch(self, job: Job, context: Any) -> AsyncIterator[pb.ExecuteEvent]:
        async for event in self.engine.events(job):
            if event.kind == "error":
                await self._abort(context, event.error)
            message = _event_message(job, event)
            if message is not None:
                yield message

    async def _fetch(self, job: Job, context: Any) -> AsyncIterator[pb.ExecuteEvent]:
        results = await self._call(context, self.engine.results, job)
        for message in _result_messages(results):
            yield message
        yield pb.ExecuteEvent(done=pb.Done(job_id=job.id, run_seconds=results.run_seconds))


async def _paced(requests: AsyncIterator[T], limits: StreamLimits) -> AsyncIterator[T]:
    """`requests`, each message due within `message_seconds` of the previous one (or of the call's
    start) and all within `request_seconds`; TimeoutError, saying which, when one is late."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limits.request_seconds
    what = "RequestHeader"
    while True:
        wait = min(limits.message_seconds, deadline - loop.time())
        try:
            async with asyncio.timeout(max(wait, 0.0)):
                message = await anext(requests, None)
        except TimeoutError:
            if wait < limits.message_seconds:
                raise TimeoutError(f"the request did not arrive within {limits.request_seconds:g} s; "
                                   "the call is closed") from None
            raise TimeoutError(f"no {what} arrived within {limits.message_seconds:g} s; the call is closed"
                               ) from None
        if message is None:
            return
        yield message
        what = "graph chunk"


def _quote(text: str) -> str:
    """A name a client sent, for an error message: repr'd and at most about 120 characters."""
    return repr(text) if len(text) <= 120 else repr(text[:117]) + "..."


def _summary(summary: ModelSummary) -> pb.ModelSummary:
    return pb.ModelSummary(name=summary.name, architecture=summary.architecture,
                           num_parameters=summary.num_parameters, dtype=summary.dtype)


def _event_message(job: Job, event: Event) -> pb.ExecuteEvent | None:
    """A job event as the wire carries it (None for `done`: the results follow instead)."""
    if event.kind == "queued":
        return pb.ExecuteEvent(queued=pb.Queued(job_id=job.id, position=event.position))
    if event.kind == "running":
        return pb.ExecuteEvent(running=pb.Running(job_id=job.id))
    if event.kind == "progress":
        return pb.ExecuteEvent(progress=pb.Progress(job_id=job.id, step=event.step, total=event.total))
    if event.kind == "log":
        return pb.ExecuteEvent(log=pb.LogLine(text=event.text))
    return None


def _graph_chunk(message: pb.ExecuteRequest) -> bytes:
    if message.WhichOneof("part") != "graph_chunk":
        raise ValidationError("after the header, an Execute call may only send graph chunks")
    return message.graph_chunk


def _result_messages(results: Results) -> Iterator[pb.ExecuteEvent | bytes]:
    """The result header, then each blob in chunks, each serialized straight from the tensor's memory
    (proto/chunks.py: one copy, into the message gRPC sends)."""
    blobs = [memoryview(results.document), *results.blobs]
    yield pb.ExecuteEvent(result=pb.ResultHeader(blob_sizes=[b.nbytes for b in blobs]))
    for index, blob in enumerate(blobs):
        for offset in range(0, blob.nbytes, BULK_CHUNK_BYTES):
            yield chunks.chunk_event(index, offset, blob[offset:offset + BULK_CHUNK_BYTES])


def _add_servicer(servicer: FarscopeServicer, server: grpc.aio.Server) -> None:
    """Register the servicer as the generated code does, except that the calls carrying bulk data
    read graph chunks as memoryviews and send pre-serialized result chunks (proto/chunks.py; the
    bytes on the wire are the same)."""
    captured: dict[str, Any] = {}

    class Capture:
        def add_generic_rpc_handlers(self, handlers: Any) -> None:
            pass

        def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
            captured.update(service=service, handlers=dict(handlers))

    pb_grpc.add_FarscopeServicer_to_server(servicer, Capture())
    service, handlers = captured["service"], captured["handlers"]
    for name in ("Execute", "Submit"):
        handlers[name] = handlers[name]._replace(request_deserializer=chunks.request_deserializer)
    for name in ("Execute", "Fetch"):
        handlers[name] = handlers[name]._replace(response_serializer=chunks.serializer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


class Server:
    """A running farscope gRPC server: its port, its engine, and how to stop it. The aio server runs
    on its own thread and event loop; the methods here are called from any other thread."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop, thread: threading.Thread,
                 blocking: ThreadPoolExecutor, grpc_server: grpc.aio.Server, health_servicer: Any,
                 port: int) -> None:
        self.engine = engine
        self.port = port
        self.metrics_port: int | None = None
        self._loop = loop
        self._thread = thread
        self._blocking = blocking
        self._grpc = grpc_server
        self._health = health_servicer
        self._health_lock = asyncio.Lock()  # one refresh at a time, so the last one's reading wins
        self._ready = False
        self._stopped = False
        engine.watch_health(self._on_worker_health)

    def add(self, replica: Replica) -> None:
        self.engine.add(replica)
        self._on_loop(self._refresh_health())

    def set_serving(self) -> None:
        """Report SERVING on the gRPC health service: readiness means the models are loaded (and their
        workers up: a worker down turns it NOT_SERVING until it is back)."""
        self._ready = True
        self._on_loop(self._refresh_health())

    def _on_worker_health(self, model: str, healthy: bool) -> None:
        """The engine's health listener: runs on a worker thread, so it only hands over to the loop."""
        try:
            asyncio.run_coroutine_threadsafe(self._refresh_health(), self._loop)
        except RuntimeError:  # the loop is closed: the server is gone
            pass

    async def _refresh_health(self) -> None:
        """Set every health entry from the engine's state now: overall and per model."""
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        async with self._health_lock:
            down = self.engine.down
            overall = serving if self._ready and not down else not_serving
            await _set_health(self._health, overall)
            for model in list(self.engine.replicas):
                await self._health.set(model_health_name(model),
                                       serving if self._ready and model not in down else not_serving)

    def stop(self, grace: float | None = 5.0) -> None:
        """Drain and stop: NOT_SERVING at once, no new jobs, queued jobs failed clearly, running jobs
        given `grace` seconds to finish (then cancelled), their clients sent the outcome, then exit."""
        if self._stopped:
            return
        self._stopped = True
        grace = grace or 0.0
        self._on_loop(self._health.enter_graceful_shutdown())
        busy = self.engine.busy
        self.engine.close(grace=grace)  # here, not on the loop: the loop keeps streaming the outcomes
        if busy:  # jobs finished during the drain: their non-blocking clients still need to Fetch
            time.sleep(min(2.0, grace))
        self._on_loop(self._grpc.stop(max(grace, 1.0)))
        self.engine.metrics.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._blocking.shutdown(wait=False, cancel_futures=True)

    def _on_loop(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()


async def _set_health(servicer: Any, status: Any) -> None:
    for service in ("", SERVICE_NAME):
        await servicer.set(service, status)


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def _start_grpc(engine: Engine, blocking: ThreadPoolExecutor, address: str,
                      tls: tuple[bytes, bytes] | None) -> tuple[grpc.aio.Server, Any, int]:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    _add_servicer(FarscopeServicer(engine, blocking), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if tls is not None:  # (certificate chain PEM, private key PEM)
        bound = server.add_secure_port(address, grpc.ssl_server_credentials([(tls[1], tls[0])]))
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"could not bind {address}")
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    return server, health_servicer, bound


def start_server(replicas: dict[str, Replica], *, host: str = "127.0.0.1", port: int = 0, serving: bool = True,
                 upload_bytes: int = DEFAULT_UPLOAD_BYTES, upload_bytes_per_user: int | None = None,
                 keys: KeyStore | None = None, job_ttl: float = DEFAULT_JOB_TTL, metrics_port: int | None = None,
                 tls: tuple[bytes, bytes] | None = None, cobatch: bool = True, blocking_threads: int = 4,
                 stream_limits: StreamLimits | None = None, engine: Engine | None = None) -> Server:
    """Start serving `replicas` on host:port (0 picks a free port).

    With `serving=False` the health service says NOT_SERVING until `set_serving()`: a server can bind
    its port at once and tell load balancers it is ready only after its models are loaded.
    `blocking_threads` bounds the pool that decodes and validates requests and looks keys up;
    `stream_limits` bounds open calls and slow senders (engine.StreamLimits; its defaults when None);
    `upload_bytes` bounds all users' uploads together, `upload_bytes_per_user` each user's.
    `engine`: one built by the caller (a Ray Serve ingress: ray_ingress.py), served as it is; the engine
    arguments here are then unused.
    """
    if engine is None:
        engine = Engine(replicas, keys=keys, upload_bytes=upload_bytes, upload_bytes_per_user=upload_bytes_per_user,
                        job_ttl=job_ttl, cobatch=cobatch, stream_limits=stream_limits)
    blocking = ThreadPoolExecutor(max_workers=blocking_threads, thread_name_prefix="farscope-decode")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=_run_loop, args=(loop,), name="farscope-rpc", daemon=True)
    thread.start()
    try:
        started = asyncio.run_coroutine_threadsafe(_start_grpc(engine, blocking, f"{host}:{port}", tls), loop)
        grpc_server, health_servicer, bound = started.result()
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        blocking.shutdown(wait=False)
        engine.close(grace=0)
        raise
    running = Server(engine, loop, thread, blocking, grpc_server, health_servicer, bound)
    if metrics_port is not None:
        running.metrics_port = engine.metrics.serve_http(metrics_port, host)
    if serving:
        running.set_serving()
    else:
        running._on_loop(running._refresh_health())  # each model's entry, NOT_SERVING until ready
    return running
