"""`RemoteModel`: a model served by a farscope server, used as if it were local."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from .envoy import Envoy, build_tree
from .runner import Job, Runner
from .tokenizer import load_tokenizer
from .tracing import Session, Tracer
from .transport import Transport

__all__ = ["RemoteModel", "DEFAULT_ADDRESS"]

DEFAULT_ADDRESS = "localhost:50051"


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
    def architecture(self) -> str:
        return self._description.summary.architecture

    def __repr__(self) -> str:
        return self._description.repr

    # -- tracing -------------------------------------------------------------------------------

    def trace(self, inputs: Any = None, *, blocking: bool = True) -> Tracer:
        """`with model.trace(prompt):` records interventions on one forward pass of `prompt`.

        Without an input, batch several with `tracer.invoke(...)`. With `blocking=False` the block
        only submits the job: `tracer.job` is a handle to poll (`done()`), `wait()` on or `cancel()`.
        """
        return Tracer(self, inputs, blocking=blocking, runner=self._runner)

    def job(self, job_id: str) -> Job:
        """Reattach to a job by id (from any process, until the server's result TTL runs out)."""
        return self._runner.attach(job_id)

    def generate(self, inputs: Any = None, *, max_new_tokens: int = 20, blocking: bool = True,
                 **generation_kwargs: Any) -> Tracer:
        """`with model.generate(prompt, max_new_tokens=N) as tracer:` records interventions per step.

        Interventions outside a step loop apply to the first step (the prompt's forward pass);
        `for step in tracer.all():` or `tracer.iter[a:b]` repeat them on chosen steps.
        `tracer.result` is the generated token ids. Keywords go to HF `generate` (greedy by default).
        """
        options = {"max_new_tokens": max_new_tokens, **generation_kwargs}
        return Tracer(self, inputs, mode="generate", options=options, blocking=blocking, runner=self._runner)

    def session(self) -> Session:
        """`with model.session():` several traces in one request; values flow between them."""
        return Session(self, runner=self._runner)

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
