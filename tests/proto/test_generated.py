"""The committed gRPC modules are exactly what protoc makes of proto/farscope.proto today."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("grpc_tools", reason="grpcio-tools (a dev dependency) regenerates the modules")

from farscope.proto import generate  # noqa: E402


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("generated")
    generate.generate(out)
    return out


@pytest.mark.parametrize("name", generate.GENERATED)
def test_committed_module_matches_a_fresh_generation(name: str, regenerated: Path) -> None:
    committed = generate.HERE / name
    fresh = regenerated / name
    assert fresh.read_bytes() == committed.read_bytes(), (
        f"proto/{name} is stale: farscope.proto changed without regenerating; run `make proto` "
        "(python -m farscope.proto.generate) and commit the result"
    )


def test_every_generated_module_is_checked() -> None:
    assert set(generate.GENERATED) == {"farscope_pb2.py", "farscope_pb2.pyi", "farscope_pb2_grpc.py"}
