"""DescribeModel shows the model as served, never where the server keeps it: no path of the server's
filesystem in the config (the tiny models are loaded from temporary directories)."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from farscope.proto import farscope_pb2 as pb
from farscope.proto import farscope_pb2_grpc as pb_grpc
from farscope.server.replica import public_config

ARCHS = ("llama", "gpt2", "gpt_neox")


def _strings(value: object) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


@pytest.mark.parametrize("arch", ARCHS)
def test_describe_model_shows_no_server_path(arch: str, tiny_server, tiny_model_dirs) -> None:
    name = f"tiny-{arch}"
    source = tiny_model_dirs[arch]
    assert source.is_absolute()
    with grpc.insecure_channel(f"127.0.0.1:{tiny_server.port}") as channel:
        described = pb_grpc.FarscopeStub(channel).DescribeModel(pb.DescribeModelRequest(name=name), timeout=30)
    config = json.loads(described.config_json)
    assert config["_name_or_path"] == name
    assert str(source.parent) not in described.config_json
    assert str(Path.home()) not in described.config_json
    assert not [s for s in _strings(config) if s.startswith(("/", "~"))]
    assert config["model_type"] == arch  # the rest of the config is still there


def test_public_config_replaces_nested_and_path_like_values() -> None:
    config = {
        "_name_or_path": "/srv/models/secret-run-7",
        "text_config": {"_name_or_path": "org/model", "hidden_size": 8},
        "tokenizer_file": "/home/alice/.cache/tok.json",
        "adapters": ["~/lora", "C:\\models\\x", "file:///srv/x", "relu"],
        "architectures": ["LlamaForCausalLM"],
        "torch_dtype": "float32",
    }
    assert public_config(config, "served") == {
        "_name_or_path": "served",
        "text_config": {"_name_or_path": "served", "hidden_size": 8},
        "tokenizer_file": "served",
        "adapters": ["served", "served", "served", "relu"],
        "architectures": ["LlamaForCausalLM"],
        "torch_dtype": "float32",
    }
