"""Running a recorded request: send its graph through the transport, follow the job, fill the saves.

Recording (`tracing`) builds a `Request`; a `Runner` (one per `RemoteModel`) executes it and waits,
or submits it and hands back a `Job`. A server error is raised here, pointing at the user's line that
recorded the failing node.
"""

from __future__ import annotations

import linecache
import threading
from collections.abc import Callable
from typing import Any

from farscope.interventions.errors import FarscopeError, RemoteError
from farscope.interventions.graph import Graph

from .proxy import Proxy
from .transport import Transport

__all__ = ["Request", "Runner", "Job"]

_NEVER_COMPUTED = ("it was never computed: its generation step was not reached (generation ended early) or "
                   "the forward pass stopped before it")


class Request:
    """What one request asks for: a graph, and the proxies to fill with its saved values.

    A lone trace records one; a session's traces record into one shared request.
    """

    def __init__(self) -> None:
        self.graph = Graph()
        self.saved: dict[int, Proxy] = {}  # the `save` node's id -> the proxy it fills

    def fill(self, results: dict[int, Any]) -> None:
        """Give each saved proxy its value from `results` (by save node id), or say why it has none."""
        for node_id, proxy in self.saved.items():
            if node_id in results:
                proxy.set_value(results[node_id])
            else:
                proxy.set_missing(_NEVER_COMPUTED)


class Runner:
    """Runs the requests of one model (`model.name`) through `transport`; log lines go to `on_log`."""

    def __init__(self, model: Any, transport: Transport, on_log: Callable[[str], None]) -> None:
        self.model = model  # the RemoteModel: its `name` addresses requests, and `Job.model` is it
        self.transport = transport
        self.on_log = on_log

    def execute(self, request: Request) -> None:
        """Run `request` and wait for it; its saved proxies hold their values on return."""
        try:
            results = self.transport.execute(self.model.name, request.graph, on_log=self.on_log)
        except FarscopeError as error:
            raise located(request.graph, error) from error.__cause__
        request.fill(results)

    def submit(self, request: Request) -> Job:
        """Queue `request` on the server; its saved proxies fill when the returned job is waited on."""
        try:
            job_id = self.transport.submit(self.model.name, request.graph)
        except FarscopeError as error:
            raise located(request.graph, error) from error.__cause__
        return Job(self, job_id, request)

    def attach(self, job_id: str) -> Job:
        """A job submitted earlier, from any process (there are no proxies to fill)."""
        return Job(self, job_id)


class Job:
    """A submitted job: poll it, wait for it, cancel it; its saved proxies fill when it is waited on.

    `model.job(job_id)` reattaches to a job from another process (then `wait()` returns the saved
    values by node id, as there are no proxies to fill).
    """

    def __init__(self, runner: Runner, job_id: str, request: Request | None = None) -> None:
        self.model = runner.model
        self.id = job_id
        self._runner = runner
        self._request = request
        self._error: FarscopeError | None = None
        self._finished = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name=f"farscope-watch-{job_id[:8]}", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        try:
            self._runner.transport.watch(self.id, on_log=self._runner.on_log)
        except FarscopeError as error:
            self._error = located(self._request.graph, error) if self._request is not None else error
        finally:
            self._finished.set()

    def done(self) -> bool:
        """Whether the job has finished (successfully or not)."""
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> dict[int, Any]:
        """Block until the job finishes; raise its error, or fill the saved proxies and return values."""
        if not self._finished.wait(timeout):
            raise TimeoutError(f"job {self.id} did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        results = self._runner.transport.fetch(self.id)
        if self._request is not None:
            self._request.fill(results)
        return results

    def cancel(self) -> str:
        """Ask the server to cancel; returns the job's state as the server saw it."""
        return self._runner.transport.cancel(self.id)

    def __repr__(self) -> str:
        return f"<farscope.Job {self.id} {'finished' if self.done() else 'pending'}>"


def located(graph: Graph, error: FarscopeError) -> FarscopeError:
    """The error, pointing at the user's line that recorded the failing node.

    This is where every server error reaches the user, so it is also where a `RemoteError` whose
    message names a builtin exception ("IndexError: ...") becomes one that is both: `except IndexError`
    catches it, as it would around NNsight's local execution.
    """
    if error.node_id is not None and 0 <= error.node_id < len(graph.nodes):
        node = graph.nodes[error.node_id]
        error.node = node.format()
        error.where = _describe_where(node.where) if node.where else None
    return as_builtin(error)


# The builtin exceptions a remote failure is raised as too; looked up by name in this fixed table only.
_BUILTINS: dict[str, type[Exception]] = {cls.__name__: cls for cls in (
    IndexError, KeyError, ValueError, TypeError, RuntimeError, AttributeError, ZeroDivisionError)}
_REMOTE_BUILTINS: dict[type[Exception], type[RemoteError]] = {
    builtin: type(f"Remote{builtin.__name__}", (RemoteError, builtin), {
        "__doc__": f"A {builtin.__name__} raised on the server: both a farscope RemoteError and a "
                   f"{builtin.__name__}.",
        "__module__": __name__,
        "__str__": RemoteError.__str__})
    for builtin in _BUILTINS.values()}


def as_builtin(error: FarscopeError) -> FarscopeError:
    """`error`, as a `RemoteError` subclass that is also the builtin exception its message names."""
    if type(error) is not RemoteError:
        return error
    name = error.message.split(":", 1)[0].strip()
    builtin = _BUILTINS.get(name)
    if builtin is None:  # the forward pass's own failure: "the model's forward pass failed: IndexError: ..."
        name = next((n for n in _BUILTINS if f": {n}: " in error.message), "")
        builtin = _BUILTINS.get(name)
    if builtin is None:
        return error
    typed = _REMOTE_BUILTINS[builtin](error.message, node=error.node, node_id=error.node_id,
                                      where=error.where, job_id=error.job_id)
    typed.__cause__ = error.__cause__
    return typed


def _describe_where(where: str) -> str:
    path, _, line = where.rpartition(":")
    source = linecache.getline(path, int(line)).strip() if line.isdigit() else ""
    return f"{where}\n    {source}" if source else where
