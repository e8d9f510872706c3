"""`RemoteModel`: a model served by a farscope server, used as if it were local."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from farscope.interventions import codec, ops
from farscope.interventions.errors import TraceError
from farscope.interventions.graph import INVOKES, IR_VERSION, NODES, VERSION, Node, Ref, Segment, map_args

from . import tracer_stack
from .envoy import Envoy, build_tree
from .runner import Job, Runner
from .tokenizer import load_tokenizer
from .tracing import Scan, Session, Tracer
from .transport import Transport

__all__ = ["RemoteModel", "DEFAULT_ADDRESS"]

DEFAULT_ADDRESS = "localhost:50051"
_SCANS_KEPT = 64  # scans of distinct inputs a handle remembers


class RemoteModel:
    """A handle on model `name` at `address` (default: $FARSCOPE_ADDRESS, else localhost:50051).

    `api_key` (default: $FARSCOPE_API_KEY) is sent as gRPC metadata; `secure=True` uses TLS with the
    system's CAs, `ca_path` TLS with the given CA certificate (PEM).

    Attribute access walks the module tree (`model.model.layers[5].mlp`); `trace(...)` records
    interventions that run on the server when the block exits.
    """

    def __init__(self, name: str, *, address: str | None = None, api_key: str | None = None,
                 timeout: float | None = None, on_log: Callable[[str], None] | None = None,
                 secure: bool = False, ca_path: str | None = None) -> None:
        self.name = name
        self.address = address or os.environ.get("FARSCOPE_ADDRESS") or DEFAULT_ADDRESS
        self._transport = Transport(self.address, api_key=api_key or os.environ.get("FARSCOPE_API_KEY"),
                                    timeout=timeout, secure=secure, ca_path=ca_path)
        self._description = self._transport.describe(name)
        self._root = build_tree(self, [(m.path, m.class_name) for m in self._description.modules])
        self._tokenizer: Any = None
        self._config: Any = None
        # `tracer.log(...)` lines go to `on_log` while a job runs (NNsight prints remote prints).
        self._runner = Runner(self, self._transport, on_log or (lambda text: print(text, flush=True)))
        self._edits: list[Edit] = []  # model.edit(): recorded into every invoke of this handle's traces
        self._scans: dict[bytes, dict[str, Any]] = {}  # the server's scans, by encoded inputs

    # -- what the server told us ---------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer, built from the server's files (cached on disk)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(lambda: self._transport.tokenizer_files(self.name),
                                             self._description.tokenizer_sha256)
        return self._tokenizer

    @property
    def config(self) -> SimpleNamespace:
        if self._config is None:
            self._config = SimpleNamespace(**json.loads(self._description.config_json))
        return self._config

    @property
    def device(self) -> Any:
        """Where this client's tensors live (CPU): NNsight scripts build inputs with `device=model.device`;
        farscope uploads them to the server's device."""
        import torch

        return torch.device("cpu")

    @property
    def architecture(self) -> str:
        return self._description.summary.architecture

    def __repr__(self) -> str:
        return self._description.repr

    # -- tracing -------------------------------------------------------------------------------

    def trace(self, inputs: Any = None, *, blocking: bool = True, remote: bool | None = None) -> Tracer:
        """`with model.trace(prompt):` records interventions on one forward pass of `prompt`.

        Without an input, batch several with `tracer.invoke(...)`. With `blocking=False` the block
        only submits the job: `tracer.job` is a handle to poll (`done()`), `wait()` on or `cancel()`.
        `remote` is accepted as NNsight spells it; farscope always runs on the server.
        """
        return Tracer(self, inputs, blocking=blocking, runner=self._runner, edits=self._edits)

    def job(self, job_id: str) -> Job:
        """Reattach to a job by id (from any process, until the server's result TTL runs out)."""
        return self._runner.attach(job_id)

    def generate(self, inputs: Any = None, *, max_new_tokens: int = 20, blocking: bool = True,
                 remote: bool | None = None, **generation_kwargs: Any) -> Tracer:
        """`with model.generate(prompt, max_new_tokens=N) as tracer:` records interventions per step.

        Interventions outside a step loop apply to the first step (the prompt's forward pass);
        `for step in tracer.all():` or `tracer.iter[a:b]` repeat them on chosen steps.
        `tracer.result` is the generated token ids. Keywords go to HF `generate` (greedy by default).
        """
        options = {"max_new_tokens": max_new_tokens, **generation_kwargs}
        return Tracer(self, inputs, mode="generate", options=options, blocking=blocking, runner=self._runner,
                      edits=self._edits)

    def session(self, *, remote: bool | None = None) -> Session:
        """`with model.session():` several traces in one request; values flow between them."""
        return Session(self, runner=self._runner)

    @property
    def generator(self) -> SimpleNamespace:
        """NNsight's `model.generator.output`: the generated token ids (farscope's `tracer.result`)."""
        tracer = tracer_stack.active_tracer(self)
        if not isinstance(tracer, Tracer):
            raise TraceError("model.generator exists inside `with model.generate(...)`")
        return SimpleNamespace(output=tracer.result)

    # -- persistent edits ----------------------------------------------------------------------

    def edit(self, *, inplace: bool = False) -> Editing:
        """`with model.edit() as (tracer, edited):` records interventions that every later trace of
        `edited` applies to each of its inputs, as NNsight 0.8's `edit`; `with model.edit(inplace=True)
        as tracer:` attaches them to this model itself.

        The edits are kept on the client and recorded into each request: nothing is stored on the server.
        """
        return Editing(self, self if inplace else self._copy(), self._runner, inplace=inplace)

    def clear_edits(self) -> None:
        """Forget this handle's persistent edits."""
        self._edits.clear()

    def add_edit(self, edit: Edit) -> None:
        self._edits.append(edit)

    def _copy(self) -> RemoteModel:
        """Another handle on the same model and connection, with its own module tree and edits."""
        twin = copy.copy(self)
        twin.own_state(list(self._edits))
        return twin

    def own_state(self, edits: list[Edit]) -> None:
        """Give this handle (a copy of another) its own module tree, runner and `edits`."""
        self._root = build_tree(self, [(m.path, m.class_name) for m in self._description.modules])
        self._runner = Runner(self, self._transport, self._runner.on_log)
        self._edits = edits

    # -- shapes while recording ----------------------------------------------------------------

    def scan(self, inputs: Any = None, *, remote: bool | None = None) -> Scan:
        """`with model.scan(prompt):` records as a trace does, and runs nothing: values have their
        shapes and dtypes (the server's meta-tensor scan), and saved ones are meta tensors afterwards,
        as NNsight's scan gives fake tensors. Shapes are known inside `model.trace` too."""
        return Scan(self, inputs, runner=self._runner, edits=self._edits)

    def scan_document(self, segment: Segment) -> dict[str, Any]:
        """The server's scan of a trace's inputs (cached on this handle by inputs)."""
        document = codec.encode({VERSION: IR_VERSION, INVOKES: list(segment.invokes), NODES: []})
        found = self._scans.get(document)
        if found is None:
            found = self._transport.scan(self.name, document)
            if len(self._scans) >= _SCANS_KEPT:
                self._scans.pop(next(iter(self._scans)))
            self._scans[document] = found
        return found

    # -- the module tree -----------------------------------------------------------------------

    @property
    def output(self) -> Any:
        return self._root.output

    @output.setter
    def output(self, value: Any) -> None:
        self._root.output = value

    @property
    def input(self) -> Any:
        return self._root.input

    @property
    def inputs(self) -> Any:
        return self._root.inputs

    def modules(self) -> Any:
        return self._root.modules()

    def __getattr__(self, name: str) -> Envoy:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._root, name)

    def close(self) -> None:
        self._transport.close()


    def __enter__(self) -> RemoteModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Edit:
    """Nodes recorded in a `model.edit()` block, re-recorded into the current invoke of a later trace."""

    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = nodes

    def __call__(self, tracer: Tracer) -> None:
        new_ids: dict[int, int] = {}
        invoke = tracer.invoke_rows

        def remap(value: Any) -> Any:
            return Ref(new_ids[value.id]) if isinstance(value, Ref) else value
        for node in self.nodes:
            kwargs = map_args(dict(node.kwargs), remap)
            if "invoke" in kwargs:
                kwargs["invoke"] = invoke
            new_ids[node.id] = tracer.record(node.op, map_args(node.args, remap), kwargs).node.id


class Editing:
    """The `model.edit()` block: a trace of a placeholder input that records and never runs; on exit
    its nodes become an `Edit` of the edited handle."""

    def __init__(self, model: RemoteModel, edited: RemoteModel, runner: Runner, *, inplace: bool) -> None:
        self.model = model
        self.edited = edited
        self.inplace = inplace
        # The body names the edited handle's modules (`edited.model.layers[1]`; with inplace=True that is
        # `model` itself). Never run: its nodes are only kept.
        self.tracer = Tracer(edited, "", runner=runner)

    def __enter__(self) -> Tracer | tuple[Tracer, RemoteModel]:
        self.tracer.__enter__()
        return self.tracer if self.inplace else (self.tracer, self.edited)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        nodes = [n for n in self.tracer.graph.nodes if n.op != ops.SAVE]
        tracer_stack.pop_tracer(self.tracer)
        self.tracer.is_open = False
        if exc_type is None:
            self.edited.add_edit(Edit(nodes))
