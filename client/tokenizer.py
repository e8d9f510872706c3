"""The model's tokenizer on the client: its files fetched from the server once and cached on disk."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["cache_root", "load_tokenizer"]


def cache_root() -> Path:
    return Path(os.environ.get("FARSCOPE_CACHE") or Path.home() / ".cache" / "farscope")


def _ensure_files(fetch: Any, digest: str) -> Path:
    folder = cache_root() / "tokenizers" / digest
    if folder.is_dir():
        return folder
    files: dict[str, bytes] = fetch()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".incoming-"))
    for name, data in files.items():
        if "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"refusing tokenizer file name {name!r} from the server")
        (staging / name).write_bytes(data)
    try:
        staging.rename(folder)
    except OSError:  # another process cached it first
        pass
    return folder


def load_tokenizer(fetch: Any, digest: str) -> Any:
    """A real tokenizer: transformers' when installed, else the `tokenizers` library's, wrapped."""
    folder = _ensure_files(fetch, digest)
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return Tokenizer(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    return tokenizer


class Tokenizer:
    """A small HF-like face over `tokenizers.Tokenizer`, for clients without transformers."""

    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        self._tokenizer = _Tokenizer.from_file(str(folder / "tokenizer.json"))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> dict[str, Any]:
        if isinstance(text, str):
            return {"input_ids": self.encode(text, add_special_tokens)}
        return {"input_ids": [self.encode(t, add_special_tokens) for t in text]}

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in sequences]

    def convert_ids_to_tokens(self, ids: Any) -> Any:
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(ids)
        return [self._tokenizer.id_to_token(int(i)) for i in ids]

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size()
