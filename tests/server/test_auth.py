from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from farscope.interventions.errors import AuthError, LimitError
from farscope.server.auth import KeyInfo, KeyStore, RateLimiter, User, key_from_metadata


@pytest.fixture
def store(tmp_path: Path):
    with KeyStore(tmp_path / "keys.db") as keys:
        yield keys


def test_round_trip(store: KeyStore) -> None:
    key = store.add("alice", models=["smollm2-135m", "tiny"], rate_per_minute=30, max_concurrent=2)
    assert key.startswith("fsk_") and len(key) > 40
    user = store.authenticate(key)
    assert user == User("alice", frozenset({"smollm2-135m", "tiny"}), rate_per_minute=30, max_concurrent=2)

    [info] = store.list()
    assert isinstance(info, KeyInfo)
    assert (info.name, info.models, info.rate_per_minute, info.max_concurrent) == ("alice", user.models, 30, 2)
    assert key.startswith(info.prefix) and len(info.prefix) < len(key) // 2
    assert not info.revoked and info.revoked_at is None
    assert abs(datetime.now(UTC) - info.created_at) < timedelta(minutes=1)
    assert key not in repr(info)


def test_defaults_allow_every_model(store: KeyStore) -> None:
    user = store.authenticate(store.add("bob"))
    assert user.models is None and user.may_use("anything")
    assert (user.rate_per_minute, user.max_concurrent) == (120, 4)
    assert store.authenticate(store.add("carol", models=["*"])).models is None


def test_keys_persist_across_opens(tmp_path: Path) -> None:
    with KeyStore(tmp_path / "keys.db") as keys:
        key = keys.add("alice")
    with KeyStore(tmp_path / "keys.db") as keys:
        assert keys.authenticate(key).name == "alice"


def test_key_is_never_stored_in_clear(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "keys.db")
    key = keys.add("alice")
    secret = key.removeprefix("fsk_")
    # While open, rows may sit in the WAL file: read every file sqlite wrote, then again after closing.
    for _ in range(2):
        blobs = [p.read_bytes() for p in tmp_path.iterdir()]
        assert blobs and any(b"alice" in blob for blob in blobs)  # the reading itself works
        for blob in blobs:
            assert key.encode() not in blob and secret.encode() not in blob
            assert secret[8:24].encode() not in blob
        keys.close()
    with sqlite3.connect(tmp_path / "keys.db") as db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(api_keys)")]
        assert {"id", "name", "hash", "prefix", "models", "rate_per_minute", "max_concurrent",
                "created_at", "revoked_at"} <= set(columns)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_revoke(store: KeyStore) -> None:
    key = store.add("alice")
    other = store.add("bob")
    assert store.revoke("alice") is True
    with pytest.raises(AuthError, match="unknown or revoked"):
        store.authenticate(key)
    assert store.authenticate(other).name == "bob"
    assert store.revoke("alice") is False  # already revoked
    assert store.revoke("nobody") is False
    alice = next(info for info in store.list() if info.name == "alice")
    assert alice.revoked and alice.revoked_at is not None
    with pytest.raises(ValueError, match="already exists"):
        store.add("alice")  # names stay taken: the revoked row is the record


def test_revoke_from_another_connection_takes_effect_at_once(tmp_path: Path) -> None:
    server = KeyStore(tmp_path / "keys.db")
    admin = KeyStore(tmp_path / "keys.db")  # as `farscope keys revoke` would, in its own process
    key = admin.add("alice")
    assert server.authenticate(key).name == "alice"
    assert admin.revoke("alice")
    with pytest.raises(AuthError):
        server.authenticate(key)
    server.close()
    admin.close()


@pytest.mark.parametrize("key", [None, ""])
def test_missing_key(store: KeyStore, key: str | None) -> None:
    with pytest.raises(AuthError, match="missing API key"):
        store.authenticate(key)  # type: ignore[arg-type]


def test_unknown_key(store: KeyStore) -> None:
    key = store.add("alice")
    for wrong in ("fsk_nope", key[:-1], key + "x", key.upper(), "Bearer " + key):
        with pytest.raises(AuthError, match="unknown or revoked API key") as caught:
            store.authenticate(wrong)
        assert wrong not in str(caught.value)


def test_model_permissions(store: KeyStore) -> None:
    user = store.authenticate(store.add("alice", models=["tiny"]))
    assert user.may_use("tiny")
    assert not user.may_use("smollm2-135m")
    assert not user.may_use("")


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("", {}),
        ("two words", {}),
        ("alice", {"models": []}),
        ("alice", {"models": ["a,b"]}),
        ("alice", {"models": ["*", "tiny"]}),
        ("alice", {"models": "tiny"}),
        ("alice", {"rate_per_minute": 0}),
        ("alice", {"max_concurrent": -1}),
        ("alice", {"rate_per_minute": True}),
    ],
)
def test_add_rejects_bad_input(store: KeyStore, name: str, options: dict) -> None:
    with pytest.raises((ValueError, TypeError)):
        store.add(name, **options)
    assert store.list() == []


def test_default_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FARSCOPE_DB", str(tmp_path / "x.db"))
    assert KeyStore.default_path() == tmp_path / "x.db"
    monkeypatch.delenv("FARSCOPE_DB")
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    assert KeyStore.default_path() == Path.home() / ".local" / "share" / "farscope" / "keys.db"


def test_creates_missing_folders_and_a_private_file(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "keys.db"
    with KeyStore(path) as keys:
        keys.add("alice")
    assert path.exists()
    assert path.stat().st_mode & 0o077 == 0


def test_concurrent_use_from_threads(store: KeyStore) -> None:
    keys = {f"user{i}": store.add(f"user{i}") for i in range(4)}
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def authenticate(name: str) -> None:
        try:
            start.wait()
            for _ in range(200):
                assert store.authenticate(keys[name]).name == name
        except BaseException as e:  # collected, the test thread asserts
            errors.append(e)

    def add(index: int) -> None:
        try:
            start.wait()
            for j in range(25):
                store.authenticate(store.add(f"new{index}-{j}"))
                store.list()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=authenticate, args=(name,)) for name in keys]
    threads += [threading.Thread(target=add, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert len(store.list()) == 4 + 4 * 25


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_bucket_and_refill() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock=clock)
    user = User("alice", rate_per_minute=60)  # one call per second, bursts of 60
    for _ in range(60):
        limiter.acquire(user)
    with pytest.raises(LimitError) as caught:
        limiter.acquire(user)
    assert caught.value.retry_after == pytest.approx(1.0)
    assert "retry after 1.0 s" in str(caught.value) and "alice" in str(caught.value)

    clock.now += 0.25
    with pytest.raises(LimitError) as caught:
        limiter.acquire(user)
    assert caught.value.retry_after == pytest.approx(0.75)  # refused calls cost nothing

    clock.now += 0.75
    limiter.acquire(user)  # exactly one token back
    with pytest.raises(LimitError):
        limiter.acquire(user)

    clock.now += 3600  # the bucket fills up to its capacity, no further
    for _ in range(60):
        limiter.acquire(user)
    with pytest.raises(LimitError):
        limiter.acquire(user)


def test_rate_limiter_is_per_user() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock=clock)
    slow, other = User("slow", rate_per_minute=2), User("other", rate_per_minute=2)
    limiter.acquire(slow)
    limiter.acquire(slow)
    with pytest.raises(LimitError) as caught:
        limiter.acquire(slow)
    assert caught.value.retry_after == pytest.approx(30.0)  # 2 per minute: one token every 30 s
    limiter.acquire(other)


def test_rate_limiter_threads_get_exactly_the_capacity() -> None:
    limiter = RateLimiter(clock=FakeClock())  # time stands still: no refill
    user = User("alice", rate_per_minute=100)
    granted: list[int] = []
    refused: list[float] = []
    lock = threading.Lock()

    def hammer() -> None:
        for _ in range(50):
            try:
                limiter.acquire(user)
                outcome = True
            except LimitError as e:
                outcome = False
                with lock:
                    refused.append(e.retry_after)
            if outcome:
                with lock:
                    granted.append(1)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(granted) == 100 and len(refused) == 300
    assert all(0 < r <= 0.6 + 1e-9 for r in refused)


def test_key_from_metadata() -> None:
    assert key_from_metadata([("authorization", "Bearer fsk_abc")]) == "fsk_abc"
    assert key_from_metadata([("user-agent", "x"), ("Authorization", "bearer  fsk_abc ")]) == "fsk_abc"
    assert key_from_metadata([("x-api-key", "fsk_abc")]) == "fsk_abc"
    assert key_from_metadata([("x-api-key", "fsk_b"), ("authorization", "Bearer fsk_a")]) == "fsk_a"
    assert key_from_metadata([("authorization", "Basic dXNlcjpwdw==")]) is None
    assert key_from_metadata([("authorization", "Bearer ")]) is None
    assert key_from_metadata([("other-bin", b"\x00")]) is None
    assert key_from_metadata([]) is None
    assert key_from_metadata(None) is None
