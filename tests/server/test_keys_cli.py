"""`farscope keys add/list/revoke` as an operator runs them, each in its own process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from farscope.server.auth import KeyStore


def farscope(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "farscope.server.cli", *args],
                          capture_output=True, text=True, timeout=120)


def test_add_list_revoke(tmp_path: Path) -> None:
    db = str(tmp_path / "lab" / "keys.db")

    added = farscope("keys", "add", "alice", "--models", "smollm2-135m,tiny", "--rate", "30",
                     "--concurrent", "2", "--db", db)
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    assert key.startswith("fsk_") and "\n" not in key  # stdout is the key alone
    assert (added.stdout + added.stderr).count(key) == 1
    assert "not be shown again" in added.stderr
    assert farscope("keys", "add", "bob", "--db", db).returncode == 0

    listed = farscope("keys", "list", "--db", db)
    assert listed.returncode == 0, listed.stderr
    assert key not in listed.stdout + listed.stderr
    assert key[4:20] not in listed.stdout
    header, alice, bob = listed.stdout.splitlines()
    for column in ("NAME", "PREFIX", "MODELS", "RATE", "CONCURRENT", "CREATED", "REVOKED"):
        assert column in header
    with KeyStore(db) as keys:
        prefix = next(info.prefix for info in keys.list() if info.name == "alice")
    assert alice.split()[:5] == ["alice", prefix + "...", "smollm2-135m,tiny", "30", "2"]
    assert key.startswith(prefix)
    assert alice.split()[-1] == "-" and bob.split()[2] == "*"

    with KeyStore(db) as keys:
        user = keys.authenticate(key)
    assert (user.name, user.models, user.rate_per_minute) == ("alice", frozenset({"smollm2-135m", "tiny"}), 30)

    revoked = farscope("keys", "revoke", "alice", "--db", db)
    assert revoked.returncode == 0, revoked.stderr
    gone = farscope("keys", "revoke", "alice", "--db", db)  # already revoked
    assert gone.returncode == 1 and "no active key" in gone.stderr
    alice = farscope("keys", "list", "--db", db).stdout.splitlines()[1]
    assert alice.startswith("alice") and alice.split()[-1] != "-"
    with KeyStore(db) as keys:
        assert [info.name for info in keys.list() if info.revoked] == ["alice"]


def test_add_refuses_a_taken_name_and_bad_limits(tmp_path: Path) -> None:
    db = str(tmp_path / "keys.db")
    assert farscope("keys", "add", "alice", "--db", db).returncode == 0
    again = farscope("keys", "add", "alice", "--db", db)
    assert again.returncode == 1 and "already exists" in again.stderr and again.stdout == ""
    bad = farscope("keys", "add", "bob", "--rate", "0", "--db", db)
    assert bad.returncode == 1 and bad.stdout == ""
    with KeyStore(db) as keys:
        assert [info.name for info in keys.list()] == ["alice"]


def test_db_from_the_environment(tmp_path: Path, monkeypatch) -> None:
    db = tmp_path / "env.db"
    monkeypatch.setenv("FARSCOPE_DB", str(db))
    empty = farscope("keys", "list")
    assert empty.returncode == 0 and empty.stdout == "" and f"no API keys in {db}" in empty.stderr
    assert farscope("keys", "add", "alice").returncode == 0
    assert farscope("keys", "list").stdout.splitlines()[1].startswith("alice")
