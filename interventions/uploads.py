"""Uploads by hash: a large tensor (steering vector, probe, SAE weights) travels once per server.

Both sides name a tensor by `digest()`, a SHA-256 over its dtype, shape and bytes. The client sends a
large tensor inline the first time and by digest afterwards; the server keeps what it received in an
`UploadStore`, bounded by bytes (least recently used out first). A digest the server no longer holds
fails the request with `UploadMissingError`, and the client resends inline (once, transparently).
The server computes digests itself from the bytes it received, so no client can plant a wrong one.

On a shared server the uploads live in one `UploadPool`, with a namespace per user: `pool.store(user)`
is the `UploadStore` a request of that user decodes with. A user sees only what they uploaded; a probe
of another user's digest fails exactly as a digest nobody sent (same error, same code path), so the
store is no oracle of what others hold. Equal tensors of two users are kept twice, on purpose: sharing
one copy would let eviction (or the time a put takes) tell one user that another holds it. Each user's
bytes are counted and bounded (`max_bytes_per_user`), and the pool as a whole by `max_bytes`.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterable

import torch

from .errors import UploadMissingError

__all__ = ["UPLOAD_THRESHOLD", "UploadMissingError", "UploadPool", "UploadStore", "digest"]

# Smaller tensors always travel inline: hashing and a round trip on a miss would cost more.
UPLOAD_THRESHOLD = 64 * 1024


def digest(dtype_name: str, shape: Iterable[int], data: bytes | memoryview) -> str:
    h = hashlib.sha256(f"{dtype_name}:{','.join(map(str, shape))}:".encode())
    h.update(data)
    return h.hexdigest()


class UploadPool:
    """Every user's uploads: at most `max_bytes` in all and `max_bytes_per_user` (default: `max_bytes`)
    per user; over either, the least recently used go first (the user's own, for the per-user bound).
    Thread-safe."""

    def __init__(self, max_bytes: int = 1 << 30, *, max_bytes_per_user: int | None = None) -> None:
        self.max_bytes = max_bytes
        self.max_bytes_per_user = min(max_bytes, max_bytes_per_user or max_bytes)
        self._users: dict[str, OrderedDict[str, torch.Tensor]] = {}  # user -> digest -> tensor, LRU first
        self._user_bytes: dict[str, int] = {}
        self._order: OrderedDict[tuple[str, str], None] = OrderedDict()  # (user, digest), LRU first
        self._bytes = 0
        self._lock = threading.Lock()

    def store(self, user: str) -> UploadStore:
        """`user`'s namespace ("" with authentication off)."""
        return UploadStore(pool=self, user=user)

    def put(self, user: str, key: str, tensor: torch.Tensor) -> None:
        size = tensor.nbytes
        if size > self.max_bytes_per_user:
            return
        with self._lock:
            mine = self._users.setdefault(user, OrderedDict())
            if key in mine:
                self._touch(user, key)
                return
            mine[key] = tensor.clone()  # the request may edit its own copy in place
            self._order[(user, key)] = None
            self._user_bytes[user] = self._user_bytes.get(user, 0) + size
            self._bytes += size
            while self._user_bytes[user] > self.max_bytes_per_user:
                self._evict(user, next(iter(mine)))
            while self._bytes > self.max_bytes:
                self._evict(*next(iter(self._order)))

    def get(self, user: str, key: str) -> torch.Tensor:
        """A fresh copy of `user`'s upload (graphs may edit tensors in place), or UploadMissingError:
        the same error for a digest nobody sent, one evicted, and one only another user holds."""
        with self._lock:
            tensor = self._users.get(user, {}).get(key)
            if tensor is None:
                raise UploadMissingError(f"upload {key[:16]}… is not held by this server (evicted or never sent)")
            self._touch(user, key)
        return tensor.clone()

    def holds(self, user: str, key: str) -> bool:
        with self._lock:
            return key in self._users.get(user, {})

    def count(self, user: str) -> int:
        with self._lock:
            return len(self._users.get(user, {}))

    def nbytes_of(self, user: str) -> int:
        """The bytes `user`'s uploads hold."""
        with self._lock:
            return self._user_bytes.get(user, 0)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._order)

    def _touch(self, user: str, key: str) -> None:
        self._users[user].move_to_end(key)
        self._order.move_to_end((user, key))

    def _evict(self, user: str, key: str) -> None:
        evicted = self._users[user].pop(key)
        del self._order[(user, key)]
        self._user_bytes[user] -= evicted.nbytes
        self._bytes -= evicted.nbytes
        if not self._users[user]:  # no empty namespaces or zero counters left behind
            del self._users[user], self._user_bytes[user]


class UploadStore:
    """One user's uploads by digest, least recently used evicted first once over the bounds.

    `UploadStore(max_bytes)` alone is a private store (a pool of one user: a client-side judge, tests);
    a server hands out `UploadPool.store(user)`.
    """

    def __init__(self, max_bytes: int = 1 << 30, *, pool: UploadPool | None = None, user: str = "") -> None:
        self.pool = pool if pool is not None else UploadPool(max_bytes)
        self.user = user

    @property
    def max_bytes(self) -> int:
        return self.pool.max_bytes_per_user

    def put(self, key: str, tensor: torch.Tensor) -> None:
        self.pool.put(self.user, key, tensor)

    def get(self, key: str) -> torch.Tensor:
        """A fresh copy (graphs may edit tensors in place), or UploadMissingError."""
        return self.pool.get(self.user, key)

    def __contains__(self, key: str) -> bool:
        return self.pool.holds(self.user, key)

    def __len__(self) -> int:
        return self.pool.count(self.user)

    @property
    def nbytes(self) -> int:
        return self.pool.nbytes_of(self.user)
