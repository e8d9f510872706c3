"""The request fuzzer (fuzz_requests.py) as an ordinary test: a small run must find nothing, and every
payload it sends to the server is followed by a liveness check (the worker healthy, health SERVING, a
small known trace served with exactly its values).

The full run is `python tests/fuzz/fuzz_requests.py --count 100000 --seed 0`. The tests below also make
sure that its oracle is not vacuous: each kind of misbehaviour it looks for is reported as a crash.
"""

from __future__ import annotations

from typing import Any

import fuzz_requests as fz
import pytest

from farscope.interventions import codec


def test_a_small_fuzz_run_finds_no_crash(tiny_spec, one_torch_thread: None) -> None:
    lines: list[str] = []
    spec = tiny_spec("llama", name=fz.MODEL, limits=fz.fuzz_limits())
    report = fz.run(2000, seed=0, grpc_count=200, spec=spec, check_every=1, log=lines.append)
    text = report.format()
    assert not report.crashes, text
    assert report.sent == 2000 and report.grpc_sent >= 200, text
    assert set(report.families) == {"structured", "varied", "mutated", "random"}, text
    # deep enough: some documents validate and run, and the server says so
    assert report.verdicts["accepted"] > 0 and report.codes["OK"] > 0, text
    assert report.seeds_ok == report.seeds > 10, text
    assert report.checks == report.grpc_sent + 1, text  # after every call, and once at the end


def test_the_same_seed_makes_the_same_payloads() -> None:
    import random

    pool = [codec.encode({"version": 1, "invokes": ["a"], "nodes": []})]
    first = [fz.mutate(random.Random(3), pool[0], pool) for _ in range(50)]
    again = [fz.mutate(random.Random(3), pool[0], pool) for _ in range(50)]
    assert first == again
    assert [fz.random_bytes(random.Random(i)) for i in range(20)] == [fz.random_bytes(random.Random(i))
                                                                      for i in range(20)]


# -- the oracle ------------------------------------------------------------------------------------------------


@pytest.fixture
def judge() -> Any:
    fuzzer = fz._Fuzzer.__new__(fz._Fuzzer)  # only its judging half: no server needed
    fuzzer.report = fz.Report(seed=0, count=0)
    fuzzer.log = lambda text: None
    return fuzzer


def _kinds(fuzzer: Any) -> list[str]:
    return [crash.kind for crash in fuzzer.report.crashes]


def _outcome(code: str, error: str | None = None, details: str = "a message") -> fz.Outcome:
    return fz.Outcome(code, details, {"farscope-error": error} if error else {})


@pytest.mark.parametrize(
    ("verdict", "expected", "outcome", "kind"),
    [
        ("ValidationError", None, _outcome("INTERNAL", "FarscopeError"), "status INTERNAL"),
        ("accepted", None, _outcome("UNKNOWN"), "status UNKNOWN"),
        ("accepted", None, _outcome("UNAVAILABLE"), "status UNAVAILABLE"),
        ("accepted", None, _outcome("DEADLINE_EXCEEDED"), "status DEADLINE_EXCEEDED"),
        ("accepted", None, _outcome("INCOMPLETE"), "status INCOMPLETE"),
        ("ValidationError", None, _outcome("OK"), "validation bypass"),
        ("LimitError", None, _outcome("INVALID_ARGUMENT", "ValidationError"), "server disagrees with validate"),
        ("ValidationError", None, _outcome("INVALID_ARGUMENT"), "unlabelled error"),
        ("ValidationError", None, _outcome("INVALID_ARGUMENT", "LimitError"), "unlabelled error"),
        ("ValidationError", None, _outcome("INVALID_ARGUMENT", "ValidationError", "x" * 9000), "bad error message"),
        ("ValidationError", None, _outcome("INVALID_ARGUMENT", "ValidationError", ""), "bad error message"),
        ("accepted", "NOT_FOUND", _outcome("INVALID_ARGUMENT", "ValidationError"), "header not honoured"),
    ],
)
def test_each_kind_of_misbehaviour_is_a_crash(judge: Any, verdict: str, expected: str | None, outcome: fz.Outcome,
                                              kind: str) -> None:
    judge.judge("structured", b"\x80", verdict, "test", expected, outcome)
    assert kind in _kinds(judge)


@pytest.mark.parametrize(
    ("verdict", "expected", "outcome"),
    [
        ("accepted", None, _outcome("OK")),
        ("accepted", None, _outcome("ABORTED", "RemoteError")),
        ("accepted", None, _outcome("INVALID_ARGUMENT", "ValidationError")),  # e.g. token ids out of the vocabulary
        ("accepted", None, _outcome("RESOURCE_EXHAUSTED", "LimitError")),
        ("ValidationError", None, _outcome("INVALID_ARGUMENT", "ValidationError")),
        ("VersionError", None, _outcome("FAILED_PRECONDITION", "VersionError")),
        ("UploadMissingError", None, _outcome("FAILED_PRECONDITION", "UploadMissingError")),
        ("LimitError", None, _outcome("RESOURCE_EXHAUSTED", "LimitError")),
        ("accepted", "NOT_FOUND", _outcome("NOT_FOUND", "ModelNotFoundError")),
    ],
)
def test_what_the_server_may_answer_is_not_a_crash(judge: Any, verdict: str, expected: str | None,
                                                   outcome: fz.Outcome) -> None:
    judge.judge("structured", b"\x80", verdict, "test", expected, outcome)
    assert not judge.report.crashes


def test_an_exception_escaping_decode_or_validate_is_a_crash(judge: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from farscope.interventions.uploads import UploadStore
    from farscope.interventions.validate import GraphLimits

    judge.uploads, judge.paths, judge.limits = UploadStore(), frozenset({""}), GraphLimits()
    assert judge.local_verdict("random", b"\xc1") == "ValidationError"
    monkeypatch.setattr(fz, "validate", lambda *args, **kwargs: {}["boom"])
    assert judge.local_verdict("random", codec.encode({"version": 1})) == "CRASH"
    assert _kinds(judge) == ["in-process exception"]


def test_an_unhealthy_worker_fails_the_liveness_check(judge: Any) -> None:
    class Dead:
        healthy = False
        alive = False
    judge.scheduler = Dead()
    judge.check("after a payload")
    assert _kinds(judge) == ["worker"] and judge.report.checks == 0
