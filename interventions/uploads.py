"""Uploads by hash: a large tensor (steering vector, probe, SAE weights) travels once per server.

Both sides name a tensor by `digest()`, a SHA-256 over its dtype, shape and bytes. The client sends a
large tensor inline the first time and by digest afterwards; the server keeps what it received in an
`UploadStore`, bounded by bytes (least recently used out first). A digest the server no longer holds
fails the request with `UploadMissingError`, and the client resends inline (once, transparently).
The server computes digests itself from the bytes it received, so no client can plant a wrong one.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterable

import torch

from .errors import UploadMissingError

__all__ = ["UPLOAD_THRESHOLD", "UploadMissingError", "UploadStore", "digest"]

# Smaller tensors always travel inline: hashing and a round trip on a miss would cost more.
UPLOAD_THRESHOLD = 64 * 1024


def digest(dtype_name: str, shape: Iterable[int], data: bytes | memoryview) -> str:
    h = hashlib.sha256(f"{dtype_name}:{','.join(map(str, shape))}:".encode())
    h.update(data)
    return h.hexdigest()


class UploadStore:
    """Tensors received by digest, least recently used evicted first once over `max_bytes`."""

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self._tensors: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._tensors:
                self._tensors.move_to_end(key)
                return
            self._tensors[key] = tensor.clone()  # the request may edit its own copy in place
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._tensors.popitem(last=False)
                self._bytes -= evicted.nbytes

    def get(self, key: str) -> torch.Tensor:
        """A fresh copy (graphs may edit tensors in place), or UploadMissingError."""
        with self._lock:
            tensor = self._tensors.get(key)
            if tensor is None:
                raise UploadMissingError(f"upload {key[:16]}… is not held by this server (evicted or never sent)")
            self._tensors.move_to_end(key)
        return tensor.clone()

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    @property
    def nbytes(self) -> int:
        return self._bytes
