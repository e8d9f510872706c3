"""API keys for a shared server: who may call, which models they may use, how often and how much at once.

A `KeyStore` is an SQLite file of keys. A key is ``fsk_`` plus 32 random bytes (url-safe base64); it
exists in clear only once, when `KeyStore.add` returns it. The store keeps its SHA-256 and a short
prefix, so operators can tell keys apart in `farscope keys list` without ever seeing one again::

    keys = KeyStore(KeyStore.default_path())
    key = keys.add("alice", models=["smollm2-135m"], rate_per_minute=60)
    user = keys.authenticate(key_from_metadata(context.invocation_metadata()))
    if not user.may_use(request.model): ...
    limiter.acquire(user)                     # a RateLimiter shared by all RPCs; LimitError when over
    with streams.hold(("watch", user.name), limit=16, refusal="too many Watch calls open"):
        ...                                   # an OpenStreams: calls open at once; LimitError when over

Clients send the key as gRPC metadata ``authorization: Bearer <key>`` (or ``x-api-key: <key>``).
Nothing here imports grpc or torch: the CLI can manage keys without loading the server.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import secrets
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from os import PathLike
from pathlib import Path

from farscope.interventions.errors import AuthError, LimitError

__all__ = ["KEY_PREFIX", "KeyInfo", "KeyStore", "OpenStreams", "RateLimiter", "User", "key_from_metadata"]

KEY_PREFIX = "fsk_"
# Characters of a key shown by `farscope keys list`: "fsk_" + 8 of its 43 random characters. That
# reveals 48 of 256 random bits: enough to tell keys apart, far too little to help guess one.
_SHOWN_CHARS = len(KEY_PREFIX) + 8
_ALL_MODELS = "*"
# Key names are printed in tables and logs: one word, no spaces or control characters.
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id              INTEGER PRIMARY KEY,
    name            TEXT    NOT NULL UNIQUE,
    hash            TEXT    NOT NULL UNIQUE,
    prefix          TEXT    NOT NULL,
    models          TEXT    NOT NULL DEFAULT '*',
    rate_per_minute INTEGER NOT NULL DEFAULT 120 CHECK (rate_per_minute > 0),
    max_concurrent  INTEGER NOT NULL DEFAULT 4 CHECK (max_concurrent > 0),
    created_at      TEXT    NOT NULL,
    revoked_at      TEXT
)
"""


@dataclass(frozen=True)
class User:
    """Who a key belongs to and what it allows. `models` is None when every model is allowed."""

    name: str
    models: frozenset[str] | None = None
    rate_per_minute: int = 120
    max_concurrent: int = 4

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True)
class KeyInfo:
    """One row of the store as `KeyStore.list` shows it: everything but the secret."""

    name: str
    prefix: str
    models: frozenset[str] | None
    rate_per_minute: int
    max_concurrent: int
    created_at: datetime
    revoked_at: datetime | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


def _digest(key: str) -> str:
    # A plain SHA-256 is enough here, with no salt and no slow KDF: those defend low-entropy secrets
    # (passwords) against guessing. Our keys are 256 uniformly random bits, so even someone holding the
    # database cannot invert or brute-force the hash, and equal digests only ever mean equal keys.
    # Being deterministic, the digest is also the lookup index.
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _check_count(what: str, value: object) -> int:
    # bool is an int subclass; `rate_per_minute=True` is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive integer, not {value!r}")
    return value


def _encode_models(models: Sequence[str] | None) -> str:
    if models is None:
        return _ALL_MODELS
    if isinstance(models, str):
        raise TypeError("models must be a list of model names (or None for all), not one string")
    names = sorted({m.strip() for m in models})
    if names == [_ALL_MODELS]:
        return _ALL_MODELS
    if not names:
        raise ValueError("models is empty: give at least one model name, or None for all models")
    for name in names:
        if not name or name == _ALL_MODELS or "," in name or any(c.isspace() for c in name):
            raise ValueError(f"bad model name {name!r} (use None alone for all models)")
    return ",".join(names)


def _decode_models(text: str) -> frozenset[str] | None:
    return None if text == _ALL_MODELS else frozenset(text.split(","))


class KeyStore:
    """API keys in an SQLite file (created with its tables on first open; mode 0600 on POSIX).

    One connection, guarded by a lock, serves every thread. The database runs in WAL mode, so
    `farscope keys add/revoke` in another process can write while a server reads; a revoked key is
    refused from the server's next `authenticate`, no restart needed.
    """

    def __init__(self, path: str | PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.path.exists():
            # Create the file ourselves so it is private from the start (sqlite would use the umask);
            # sqlite gives its -wal and -shm files the same mode.
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._lock = threading.Lock()
        # isolation_level=None: autocommit; every statement here is its own transaction.
        self._db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(_SCHEMA)
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                self._db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            elif version != _SCHEMA_VERSION:
                raise RuntimeError(f"{self.path}: key database schema {version} is not {_SCHEMA_VERSION}")
        except BaseException:
            self._db.close()
            raise

    @staticmethod
    def default_path() -> Path:
        """$FARSCOPE_DB, else $XDG_DATA_HOME/farscope/keys.db (~/.local/share/farscope/keys.db)."""
        if os.environ.get("FARSCOPE_DB"):
            return Path(os.environ["FARSCOPE_DB"]).expanduser()
        data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
        return Path(data_home) / "farscope" / "keys.db"

    def add(
        self,
        name: str,
        *,
        models: Sequence[str] | None = None,
        rate_per_minute: int = 120,
        max_concurrent: int = 4,
    ) -> str:
        """Create a key for `name` and return it: the only time it exists in clear.

        `models=None` allows every served model. Names are unique, revoked keys' names included
        (a revoked row stays as a record); raises ValueError if `name` is taken.
        """
        if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
            raise ValueError(f"bad key name {name!r}: letters, digits and ._@+- only, at most 64 characters")
        row = (
            name,
            _encode_models(models),
            _check_count("rate_per_minute", rate_per_minute),
            _check_count("max_concurrent", max_concurrent),
        )
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        try:
            with self._lock:
                self._db.execute(
                    "INSERT INTO api_keys (name, models, rate_per_minute, max_concurrent, hash, prefix, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (*row, _digest(key), key[:_SHOWN_CHARS], _now()),
                )
        except sqlite3.IntegrityError as e:
            raise ValueError(f"a key named {name!r} already exists (revoked keys keep their names)") from e
        return key

    def list(self) -> list[KeyInfo]:
        """Every key, revoked ones included, oldest first. No secrets."""
        with self._lock:
            rows = self._db.execute(
                "SELECT name, prefix, models, rate_per_minute, max_concurrent, created_at, revoked_at"
                " FROM api_keys ORDER BY id"
            ).fetchall()
        return [
            KeyInfo(
                name=name,
                prefix=prefix,
                models=_decode_models(models),
                rate_per_minute=rate,
                max_concurrent=concurrent,
                created_at=datetime.fromisoformat(created),
                revoked_at=datetime.fromisoformat(revoked) if revoked else None,
            )
            for name, prefix, models, rate, concurrent, created, revoked in rows
        ]

    def revoke(self, name: str) -> bool:
        """Revoke `name`'s key; False if there is no such key or it was already revoked."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL", (_now(), name)
            )
        return cursor.rowcount == 1

    def authenticate(self, key: str | None) -> User:
        """The user a key belongs to; AuthError if the key is missing, unknown or revoked."""
        if not key:
            raise AuthError(
                "missing API key: send it as gRPC metadata 'authorization: Bearer <key>' "
                "(farscope clients: api_key=... or FARSCOPE_API_KEY)"
            )
        digest = _digest(key)
        with self._lock:
            row = self._db.execute(
                "SELECT hash, name, models, rate_per_minute, max_concurrent FROM api_keys"
                " WHERE hash = ? AND revoked_at IS NULL",
                (digest,),
            ).fetchone()
        # The lookup is by digest, so its timing tells nothing about the key; compare_digest is a
        # second, constant-time check of the row the index found.
        if row is None or not hmac.compare_digest(row[0], digest):
            raise AuthError("unknown or revoked API key")
        _, name, models, rate, concurrent = row
        return User(name=name, models=_decode_models(models), rate_per_minute=rate, max_concurrent=concurrent)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KeyStore({str(self.path)!r})"


class RateLimiter:
    """A token bucket per user: bursts up to `rate_per_minute` calls, refilled at rate/60 per second.

    Thread-safe; one instance serves every RPC. `clock` (seconds, monotonic) is injectable for tests.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # user name -> (tokens, time of last update)

    def acquire(self, user: User) -> None:
        """Take one call from `user`'s bucket, or raise LimitError with `retry_after` (seconds) set."""
        capacity = float(user.rate_per_minute)
        per_second = capacity / 60.0
        with self._lock:
            now = self._clock()
            tokens, then = self._buckets.get(user.name, (capacity, now))
            tokens = min(capacity, tokens + max(0.0, now - then) * per_second)
            if tokens >= 1.0:
                self._buckets[user.name] = (tokens - 1.0, now)
                return
            self._buckets[user.name] = (tokens, now)
        retry_after = (1.0 - tokens) / per_second
        error = LimitError(
            f"rate limit exceeded for {user.name!r} ({user.rate_per_minute} requests per minute); "
            f"retry after {math.ceil(retry_after * 10) / 10:.1f} s"
        )
        error.retry_after = retry_after  # type: ignore[attr-defined]
        raise error


class OpenStreams:
    """How many calls of each kind are open at once, per key (or for everyone): each count bounded.

    `hold(slot, limit=...)` counts one more open call of `slot` (e.g. ``("watch", "alice")``) for the
    `with` block, or raises LimitError (`retry_after` set) when `limit` are open already. Thread-safe;
    a count that drops to zero leaves no entry behind.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: Counter[Hashable] = Counter()

    @contextmanager
    def hold(self, slot: Hashable, *, limit: int, refusal: str, retry_after: float = 1.0) -> Iterator[None]:
        with self._lock:
            if self._open[slot] >= limit:
                error = LimitError(refusal)
                error.retry_after = retry_after  # type: ignore[attr-defined]
                raise error
            self._open[slot] += 1
        try:
            yield
        finally:
            with self._lock:
                self._open[slot] -= 1
                if self._open[slot] <= 0:
                    del self._open[slot]

    def count(self, slot: Hashable) -> int:
        with self._lock:
            return self._open.get(slot, 0)


def key_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The API key in gRPC metadata: ``authorization: Bearer <key>``, else ``x-api-key: <key>``."""
    bearer = plain = None
    for name, value in metadata or ():
        if not isinstance(value, str):
            continue
        name = name.lower()
        if name == "authorization" and bearer is None:
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                bearer = token.strip()
        elif name == "x-api-key" and plain is None and value.strip():
            plain = value.strip()
    return bearer or plain
