"""API keys over real gRPC: unauthenticated, permission denied, rate and concurrency limits, TLS."""

from __future__ import annotations

import subprocess

import grpc
import pytest

import farscope
from farscope.server.auth import KeyStore
from farscope.server.loading import load_model
from farscope.server.replica import Replica
from farscope.server.service import start_server

PROMPT = "John gave a drink to Mary"


@pytest.fixture(scope="module")
def replicas(tiny_spec):
    return {name: Replica(load_model(tiny_spec(arch, name=name)))
            for name, arch in (("tiny-a", "llama"), ("tiny-b", "gpt2"))}


@pytest.fixture()
def keyed(replicas, tmp_path):
    keys = KeyStore(tmp_path / "keys.db")
    server = start_server(replicas, keys=keys)
    yield server, keys
    server.stop(grace=1)


def _read(model):
    with model.trace(PROMPT):
        out = model.output.logits.save()
    return out.value


def test_missing_and_unknown_keys_are_unauthenticated(keyed):
    server, keys = keyed
    address = f"127.0.0.1:{server.port}"
    for key in (None, "fsk_wrong"):
        with pytest.raises(farscope.AuthError) as info:
            farscope.RemoteModel("tiny-a", address=address, api_key=key)
        assert info.value.__cause__.code() == grpc.StatusCode.UNAUTHENTICATED
    key = keys.add("alice")
    keys.revoke("alice")
    with pytest.raises(farscope.AuthError, match="unknown or revoked"):
        farscope.RemoteModel("tiny-a", address=address, api_key=key)


def test_a_key_limited_to_some_models_gets_permission_denied_for_others(keyed):
    server, keys = keyed
    key = keys.add("bob", models=["tiny-a"])
    address = f"127.0.0.1:{server.port}"
    model = farscope.RemoteModel("tiny-a", address=address, api_key=key)
    assert _read(model).shape[-1] > 0
    with pytest.raises(farscope.PermissionDeniedError) as info:
        farscope.RemoteModel("tiny-b", address=address, api_key=key)
    assert info.value.__cause__.code() == grpc.StatusCode.PERMISSION_DENIED
    assert [m.name for m in model._transport.list_models().models] == ["tiny-a"]


def test_the_rate_limit_answers_resource_exhausted_with_retry_after(keyed):
    server, keys = keyed
    key = keys.add("carol", rate_per_minute=3)
    model = farscope.RemoteModel("tiny-a", address=f"127.0.0.1:{server.port}", api_key=key)
    for _ in range(3):
        _read(model)
    with pytest.raises(farscope.LimitError) as info:
        _read(model)
    assert info.value.__cause__.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.retry_after is not None and 0 < info.value.retry_after <= 20


def test_the_concurrent_job_quota_is_enforced(keyed):
    server, keys = keyed
    key = keys.add("dave", max_concurrent=1)
    model = farscope.RemoteModel("tiny-a", address=f"127.0.0.1:{server.port}", api_key=key)
    with model.generate(PROMPT, max_new_tokens=200, min_new_tokens=200, blocking=False) as tracer:
        tracer.result.save()
    with pytest.raises(farscope.LimitError, match="max_concurrent"):
        _read(model)
    tracer.job.cancel()
    with pytest.raises(farscope.CancelledError):
        tracer.job.wait(60)
    assert _read(model).shape[0] == 1


def test_one_users_jobs_are_invisible_to_another(keyed):
    server, keys = keyed
    address = f"127.0.0.1:{server.port}"
    alice = farscope.RemoteModel("tiny-a", address=address, api_key=keys.add("erin"))
    mallory = farscope.RemoteModel("tiny-a", address=address, api_key=keys.add("mallory"))
    with alice.trace(PROMPT, blocking=False) as tracer:
        alice.output.logits.save()
    tracer.job.wait(60)
    with pytest.raises(farscope.FarscopeError, match="no job"):
        mallory.job(tracer.job.id).wait(60)


def test_tls(replicas, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    server = start_server(replicas, tls=(cert.read_bytes(), key.read_bytes()))
    try:
        model = farscope.RemoteModel("tiny-a", address=f"localhost:{server.port}", ca_path=str(cert))
        assert _read(model).shape[0] == 1
        with pytest.raises(farscope.TransportError):  # plaintext against a TLS port
            farscope.RemoteModel("tiny-a", address=f"localhost:{server.port}", timeout=5)
    finally:
        server.stop(grace=1)
