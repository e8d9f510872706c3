"""The stateless gRPC ingress of a Ray Serve cluster: service.py's front on an engine whose models are
Serve deployments (ray_serve.py), reached through deployment handles.

The ingress engine is the single box's Engine (keys, rates, stream caps, uploads, decode + validate,
the concurrent-job quota, the job store that Watch and Fetch read) with one thing swapped: each
model's scheduler is a `Dispatcher` that sends the validated job to the model's deployment and relays
the replica's events and results into the ingress's own copy of the job. Serve picks the replica (its
router prefers the least busy of two); inside a replica, its own scheduler keeps per-user fairness
and co-batching.

What a lost replica costs: its in-flight jobs fail with TransportError (gRPC UNAVAILABLE, which the
client treats as retryable); new jobs go to the other replicas while Serve starts a replacement.
Jobs live in the ingress that took them: fetching a job by id through another ingress needs a shared
job store (not written: deploy/README.md).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from ray import serve
from ray.serve.exceptions import RequestCancelledError

from farscope.interventions.errors import CancelledError, FarscopeError, TransportError

from .engine import Engine, ModelDescription, ModelSummary
from .jobs import Event, Job
from .ray_serve import Finished, ModelInfo
from .replica import Results
from .service import Server, start_server

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

    from .auth import KeyStore, User
    from .engine import StreamLimits

__all__ = ["ClusterEngine", "Dispatcher", "start_ingress"]

log = logging.getLogger(__name__)

# A job that no replica has taken after this long tells its client why it waits (a log event).
WAIT_NOTICE_SECONDS = 2.0


class Dispatcher:
    """A model's scheduler at the ingress (the part of scheduler.Scheduler the engine calls): jobs go to
    the model's Serve deployment; their events and outcome come back into the ingress's Job."""

    def __init__(self, name: str, handle: DeploymentHandle, loop: asyncio.AbstractEventLoop) -> None:
        self.name = name
        self._handle = handle.options(stream=True)
        self._loop = loop
        self._lock = threading.Lock()
        self._closed = False
        self._inflight: dict[str, tuple[Job, Future[None]]] = {}
        self._streams: dict[str, DeploymentResponseGenerator] = {}  # touched on the loop only

    @property
    def depth(self) -> int:
        """Jobs sent and not yet running (queued in a replica, or waiting for one)."""
        with self._lock:
            return sum(1 for job, _ in self._inflight.values() if job.state == "queued")

    @property
    def running(self) -> tuple[Job, ...]:
        with self._lock:
            return tuple(job for job, _ in self._inflight.values() if job.state == "running")

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._closed:
                raise TransportError("the server is shutting down and accepts no new jobs")
            position = sum(1 for queued, _ in self._inflight.values() if queued.state == "queued")
            job.emit(Event("queued", position=position))
            future = asyncio.run_coroutine_threadsafe(self._relay(job), self._loop)
            self._inflight[job.id] = (job, future)
        future.add_done_callback(lambda _: self._forget(job.id))

    def cancel(self, job: Job) -> None:
        """A queued job never runs; a running one stops at its next hook (on its replica)."""
        job.cancelled.set()
        self._cancel_remote(job)

    def withdraw(self, job: Job) -> bool:
        """Cancel `job` if it is not running yet (True); a running one finishes and stays fetchable."""
        if job.state != "queued":
            return False
        self.cancel(job)
        return True

    def close(self, *, timeout: float = 30.0) -> None:
        """Take no new jobs; give the ones in flight `timeout` seconds, then cancel them."""
        with self._lock:
            self._closed = True
            inflight = list(self._inflight.values())
        for job, _ in inflight:
            if not job.wait(timeout):
                self.cancel(job)
        for _, future in inflight:
            try:
                future.result(timeout=5.0)
            except Exception:  # the relay records its own outcome on the job
                pass

    def _forget(self, job_id: str) -> None:
        with self._lock:
            self._inflight.pop(job_id, None)

    def _cancel_remote(self, job: Job) -> None:
        def cancel() -> None:
            stream = self._streams.get(job.id)
            if stream is not None:
                stream.cancel()  # the replica's generator is cancelled: its finally cancels the job there
        try:
            self._loop.call_soon_threadsafe(cancel)
        except RuntimeError:  # the loop is closed: nothing is in flight any more
            pass

    async def _relay(self, job: Job) -> None:
        """Send the job to a replica and mirror what comes back. Runs on the ingress's handle loop."""
        if job.cancelled.is_set():
            job.fail(CancelledError("the job was cancelled"))
            return
        stream = self._handle.run.remote(job.id, job.user, job.payload)
        self._streams[job.id] = stream
        try:
            items = aiter(stream)
            accepted = asyncio.ensure_future(anext(items, None))  # a replica has the job: its `queued` event
            done, _ = await asyncio.wait({accepted}, timeout=WAIT_NOTICE_SECONDS)
            if not done:
                job.emit(Event("log", text=f"waiting for a replica of model {self.name}: every replica is busy, "
                                           "or one is starting (a deployment scaled to zero starts one now)"))
            item = await accepted
            while item is not None and not self._mirror(job, item):
                item = await anext(items, None)
            if item is None:
                job.fail(TransportError(f"model {self.name}: the replica ended the job without an outcome; retry"))
        except (RequestCancelledError, asyncio.CancelledError):
            job.fail(CancelledError("the job was cancelled"))
        except Exception as e:  # the replica died, or Serve could not reach one: the client may retry
            log.warning("job %s: lost its replica of %s (%s: %s)", job.id, self.name, type(e).__name__, e,
                        extra={"job_id": job.id, "model": self.name})
            job.fail(TransportError(f"model {self.name}: the replica running this job was lost "
                                    f"({type(e).__name__}); retry, another replica will take it"))
        finally:
            self._streams.pop(job.id, None)


    @staticmethod
    def _mirror(job: Job, item: Event | Finished) -> bool:
        """Record what the replica sent on the ingress's job; True once the job has ended."""
        if isinstance(item, Finished):
            job.finish(Results(item.document, [memoryview(blob) for blob in item.blobs], item.run_seconds))
            return True
        if item.kind == "error":
            job.fail(item.error if item.error is not None else FarscopeError("the job failed"))
            return True
        if item.kind != "queued":  # queued at the ingress already (with its place here)
            job.emit(item)
        return False


class ClusterEngine(Engine):
    """The engine of an ingress: everything of engine.Engine but running jobs, which go to Serve."""

    def __init__(self, models: Iterable[str], *, keys: KeyStore | None = None, **engine_options: Any) -> None:
        super().__init__(None, keys=keys, **engine_options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="farscope-serve-handles", daemon=True)
        self._thread.start()
        for name in models:
            self.add_remote(name)

    def add_remote(self, name: str, app: str | None = None) -> None:
        """Serve the model deployed as Serve deployment `name` of application `app` (default: `name`).
        Blocks until one of its replicas answers (with min_replicas = 0, until one has started)."""
        handle = serve.get_deployment_handle(name, app_name=app or name)
        info: ModelInfo = asyncio.run_coroutine_threadsafe(self._info(handle), self._loop).result()
        dispatcher = Dispatcher(name, handle, self._loop)
        self.replicas[name] = info  # type: ignore[assignment]  # a stand-in: names, limits, description
        self.schedulers[name] = dispatcher  # type: ignore[assignment]  # the scheduler's calls, relayed
        self.metrics.watch_queue(name, lambda: dispatcher.depth)
        self.metrics.worker_up.labels(model=name).set(1)

    @staticmethod
    async def _info(handle: DeploymentHandle) -> ModelInfo:
        return await handle.info.remote()

    def describe(self, name: str, user: User | None) -> ModelDescription:
        info: ModelInfo = self._replica(name, user)  # type: ignore[assignment]
        return ModelDescription(
            summary=ModelSummary(name=info.name, architecture=info.architecture,
                                 num_parameters=info.num_parameters, dtype=info.dtype),
            modules=info.modules, repr=info.repr, config_json=info.config, tokenizer_sha256=info.tokenizer_sha256)

    def tokenizer_files(self, name: str, user: User | None) -> dict[str, bytes]:
        info: ModelInfo = self._replica(name, user)  # type: ignore[assignment]
        return dict(info.tokenizer_files)

    def close(self, grace: float = 30.0) -> None:
        super().close(grace)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


def start_ingress(models: Iterable[str], *, host: str = "127.0.0.1", port: int = 0, keys: KeyStore | None = None,
                  stream_limits: StreamLimits | None = None, metrics_port: int | None = None,
                  tls: tuple[bytes, bytes] | None = None, **engine_options: Any) -> Server:
    """farscope's gRPC front for `models` (each a Serve application of that name, ray_serve.model_app)
    on host:port, in a process connected to the Ray cluster (ray.init / inside a Serve replica)."""
    engine = ClusterEngine(models, keys=keys, stream_limits=stream_limits, **engine_options)
    return start_server({}, host=host, port=port, metrics_port=metrics_port, tls=tls, engine=engine)
