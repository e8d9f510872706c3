"""Regenerate farscope_pb2*.py from farscope.proto (`make proto`); tests check they are current."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
GENERATED = ("farscope_pb2.py", "farscope_pb2.pyi", "farscope_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    """Write the generated modules for farscope.proto into `out_dir`."""
    from grpc_tools import protoc  # a dev dependency: only needed to regenerate

    with tempfile.TemporaryDirectory() as tmp:
        # The virtual include path makes generated imports read `from farscope.proto import ...`.
        args = [
            "protoc",
            f"-Ifarscope/proto={HERE}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            "farscope/proto/farscope.proto",
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed")
        for name in GENERATED:
            shutil.copy(Path(tmp, "farscope", "proto", name), out_dir / name)


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
