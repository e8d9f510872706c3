"""`farscope serve` as users start it: the console script, a models file, health, SIGTERM."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

import farscope


def _console_script() -> str:
    found = Path(sys.executable).parent / "farscope"
    return str(found) if found.exists() else shutil.which("farscope") or "farscope"


def _add_key(db, name: str) -> str:
    added = subprocess.run([_console_script(), "keys", "add", name, "--db", str(db)], capture_output=True,
                           text=True, timeout=60, check=True)
    return next(word for word in added.stdout.split() if word.startswith("fsk_"))


def test_farscope_serve_with_a_models_file(tiny_model_dirs, tmp_path):
    db = tmp_path / "keys.db"
    key = _add_key(db, "alice")
    config = tmp_path / "models.toml"
    config.write_text(
        f'[[models]]\nname = "tiny"\nsource = "{tiny_model_dirs["gpt2"]}"\ndtype = "float32"\n'
        '[models.limits]\nmax_nodes = 1000\n'
    )
    process = subprocess.Popen([_console_script(), "serve", "--config", str(config), "--port", "0",
                                "--db", str(db)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 120
        line = ""
        while time.monotonic() < deadline and not line.startswith("farscope: serving"):
            line = process.stdout.readline()
            assert line, f"server exited early with {process.poll()}"
        address = line.rsplit(" ", 1)[1].strip()
        assert address.startswith("127.0.0.1:")

        with grpc.insecure_channel(address) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            assert status.status == health_pb2.HealthCheckResponse.SERVING
        probe = subprocess.run([sys.executable, "-m", "farscope.server.healthcheck", address],
                               capture_output=True, text=True, timeout=60)
        assert probe.returncode == 0 and probe.stdout.strip() == "SERVING"

        with pytest.raises(farscope.AuthError, match="missing API key"):
            farscope.RemoteModel("tiny", address=address, api_key="")
        with pytest.raises(farscope.AuthError, match="unknown or revoked"):
            farscope.RemoteModel("tiny", address=address, api_key="fsk_not-a-key")
        with farscope.RemoteModel("tiny", address=address, api_key=key) as model:
            assert "GPT2LMHeadModel" in repr(model)
            with model.trace("John gave a drink to Mary"):
                h = model.transformer.h[0].output.save()
            hidden = h.value[0] if isinstance(h.value, tuple) else h.value
            assert isinstance(hidden, torch.Tensor) and hidden.shape[-1] == 64
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
    assert code == 0
