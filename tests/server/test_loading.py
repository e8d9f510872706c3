from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import tokenizers
import torch
import transformers

from farscope.server import loading
from farscope.server.config import DEFAULT_MODEL, ModelSpec
from farscope.server.loading import LoadedModel, cache_root, load_model

IOI = "When Mary and John went to the store, John gave a drink to"
EIFFEL = "The Eiffel Tower is located in the city of"
PROMPTS = [IOI, EIFFEL, "Hi", "Completely unseen words: zyzzyva!"]


def write_files(files: dict[str, bytes], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory


def next_token(loaded: LoadedModel, prompt: str) -> str:
    ids = loaded.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = loaded.model(**ids).logits
    return loaded.tokenizer.decode(logits[0, -1].argmax())


# --- tiny models, one code path for every architecture ---------------------------------------------


def test_tiny_model_loads_and_runs(tiny_spec: Callable[..., ModelSpec], tiny_arch: str) -> None:
    loaded = load_model(tiny_spec(tiny_arch))

    assert loaded.spec == tiny_spec(tiny_arch)
    assert loaded.model.config.model_type == tiny_arch
    assert not loaded.model.training
    # Requests may ask for gradients, so the loader must not freeze the weights.
    assert all(p.requires_grad for p in loaded.model.parameters())
    assert next(loaded.model.parameters()).dtype == torch.float32

    ids = loaded.tokenizer(IOI, return_tensors="pt").input_ids
    assert ids.shape[1] >= 5
    with torch.no_grad():
        logits = loaded.model(ids).logits
    assert logits.shape == (1, ids.shape[1], loaded.model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_tiny_models_are_reproducible(tiny_spec: Callable[..., ModelSpec], tiny_arch: str) -> None:
    # Same seed, same files: two loads give the same weights (tests comparing against references rely on it).
    first, second = (load_model(tiny_spec(tiny_arch)).model.state_dict() for _ in range(2))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_gradients_flow(tiny_spec: Callable[..., ModelSpec]) -> None:
    loaded = load_model(tiny_spec("llama"))
    ids = loaded.tokenizer(IOI, return_tensors="pt").input_ids
    loaded.model(ids).logits[0, -1].logsumexp(-1).backward()
    assert loaded.model.get_input_embeddings().weight.grad is not None


def test_dtype_is_applied(tiny_spec: Callable[..., ModelSpec]) -> None:
    loaded = load_model(tiny_spec("gpt_neox", dtype="bfloat16"))
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


def test_local_directory_never_reaches_the_hub(
    tiny_spec: Callable[..., ModelSpec], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, dict]] = []
    for auto in (loading.AutoModelForCausalLM, loading.AutoTokenizer):
        original = auto.from_pretrained

        def spy(path, *args, _original=original, **kwargs):
            calls.append((str(path), kwargs))
            return _original(path, *args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", spy)
    spec = tiny_spec("gpt2")
    load_model(spec)
    assert [path for path, _ in calls] == [spec.source, spec.source]
    assert all(kwargs["local_files_only"] is True for _, kwargs in calls)
    assert all(kwargs["trust_remote_code"] is False for _, kwargs in calls)


def test_tokenizer_pads_left(tiny_spec: Callable[..., ModelSpec], tiny_arch: str) -> None:
    tokenizer = load_model(tiny_spec(tiny_arch)).tokenizer
    batch = tokenizer([IOI, "Hi"], padding=True, return_tensors="pt")
    assert tokenizer.padding_side == "left"
    # The short prompt is padded at the front, so position -1 is a real token in every row.
    assert batch.input_ids[1, 0] == tokenizer.pad_token_id
    assert batch.attention_mask[1, 0] == 0
    assert batch.attention_mask[:, -1].tolist() == [1, 1]


def test_tokenizer_files_rebuild_the_tokenizer(
    tiny_spec: Callable[..., ModelSpec], tiny_arch: str, tmp_path: Path
) -> None:
    loaded = load_model(tiny_spec(tiny_arch))
    assert "tokenizer.json" in loaded.tokenizer_files
    directory = write_files(loaded.tokenizer_files, tmp_path / "tokenizer")

    rebuilt = transformers.AutoTokenizer.from_pretrained(directory)
    raw = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    for prompt in PROMPTS:
        expected = loaded.tokenizer(prompt).input_ids
        assert rebuilt(prompt).input_ids == expected
        assert raw.encode(prompt).ids == expected
    assert rebuilt.padding_side == "left"
    assert rebuilt.pad_token == loaded.tokenizer.pad_token


def test_missing_pad_token_falls_back_to_eos(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    # GPT-2 style checkpoints ship without a pad token.
    directory = Path(shutil.copytree(tiny_model_dirs["gpt2"], tmp_path / "no-pad"))
    config_path = directory / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    del tokenizer_config["pad_token"]
    config_path.write_text(json.dumps(tokenizer_config))
    generation_path = directory / "generation_config.json"
    generation_config = json.loads(generation_path.read_text())
    generation_config.pop("pad_token_id", None)
    generation_path.write_text(json.dumps(generation_config))

    loaded = load_model(ModelSpec(name="no-pad", source=str(directory)))

    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token == "<eos>"
    assert loaded.model.generation_config.pad_token_id == loaded.tokenizer.eos_token_id
    # The fallback reuses a token; it must not grow the vocabulary or the embeddings.
    assert loaded.model.get_input_embeddings().weight.shape[0] == len(loaded.tokenizer)
    rebuilt = transformers.AutoTokenizer.from_pretrained(write_files(loaded.tokenizer_files, tmp_path / "t"))
    assert rebuilt.pad_token == "<eos>"


def test_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FARSCOPE_CACHE", str(tmp_path / "env"))
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert cache_root() == tmp_path / "env"
    monkeypatch.delenv("FARSCOPE_CACHE")
    assert cache_root() == Path.home() / ".cache" / "farscope"


def test_missing_package_or_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="package 'no_such_package_farscope' is not installed"):
        load_model(ModelSpec(name="x", package="no_such_package_farscope", gguf_file="m.gguf"), cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_model(ModelSpec(name="x", source=str(tmp_path), gguf_file="missing.gguf"), cache_dir=tmp_path)


# --- the GGUF cache, with the (slow) conversion replaced by copying a tiny model --------------------


class FakeConverter:
    """Stands in for `_convert_gguf`: writes a tiny model where the conversion would write."""

    def __init__(self, model_dir: Path, *, fail: bool = False, delay: float = 0.0) -> None:
        self.model_dir, self.fail, self.delay = model_dir, fail, delay
        self.calls = 0

    def __call__(self, gguf: Path, out: Path, dtype: torch.dtype) -> None:
        self.calls += 1
        time.sleep(self.delay)
        for file in self.model_dir.iterdir():
            shutil.copy(file, out / file.name)
            if self.fail:
                raise RuntimeError("killed mid-write")


@pytest.fixture
def fake_gguf(tmp_path: Path) -> ModelSpec:
    source = tmp_path / "source"
    source.mkdir()
    (source / "tiny.gguf").write_bytes(b"GGUF not really")
    return ModelSpec(name="fake", source=str(source), gguf_file="tiny.gguf")


def cache_entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.is_dir())


def test_gguf_converted_once_then_cached(
    fake_gguf: ModelSpec, tiny_model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    convert = FakeConverter(tiny_model_dirs["llama"])
    monkeypatch.setattr(loading, "_convert_gguf", convert)
    cache = tmp_path / "cache"

    first = load_model(fake_gguf, cache_dir=cache)
    second = load_model(fake_gguf, cache_dir=cache)

    assert convert.calls == 1
    [entry] = cache_entries(cache)
    assert entry.startswith("fake-")
    assert Path(second.model.name_or_path) == cache / entry
    # Readable by other users of a shared cache, whatever modes the writer's temp files had.
    assert (cache / entry).stat().st_mode & 0o777 == 0o755
    assert {f.stat().st_mode & 0o777 for f in (cache / entry).iterdir()} == {0o644}
    assert second.tokenizer_files == first.tokenizer_files

    # A changed file (here: a new mtime) is a different model: converted afresh, beside the old one.
    gguf = Path(fake_gguf.source) / "tiny.gguf"
    stat = gguf.stat()
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    load_model(fake_gguf, cache_dir=cache)
    assert convert.calls == 2
    assert len(cache_entries(cache)) == 2


def test_crash_mid_conversion_leaves_no_cache(
    fake_gguf: ModelSpec, tiny_model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setattr(loading, "_convert_gguf", FakeConverter(tiny_model_dirs["llama"], fail=True))
    with pytest.raises(RuntimeError, match="killed mid-write"):
        load_model(fake_gguf, cache_dir=cache)
    assert cache_entries(cache) == []

    # A process killed outright leaves its partial directory; the next converter sweeps it.
    monkeypatch.setattr(loading, "_convert_gguf", FakeConverter(tiny_model_dirs["llama"]))
    load_model(fake_gguf, cache_dir=cache)
    [entry] = cache_entries(cache)
    stale = cache / f".{entry}.abandoned.partial"
    stale.mkdir()
    shutil.rmtree(cache / entry)
    load_model(fake_gguf, cache_dir=cache)
    assert cache_entries(cache) == [entry]


def test_concurrent_loads_convert_once(
    fake_gguf: ModelSpec, tiny_model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # flock locks belong to open file descriptions, so threads contend exactly like processes do.
    convert = FakeConverter(tiny_model_dirs["gpt2"], delay=0.5)
    # from_pretrained swaps these process-wide while it runs; unserialized threads leave them swapped.
    swapped = (transformers.PreTrainedModel.tie_weights, torch.nn.init.normal_)
    monkeypatch.setattr(loading, "_convert_gguf", convert)
    cache = tmp_path / "cache"
    results: list[LoadedModel] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(load_model(fake_gguf, cache_dir=cache))
        except BaseException as e:  # surfaced below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert len(results) == 3
    assert convert.calls == 1
    assert len(cache_entries(cache)) == 1
    assert (transformers.PreTrainedModel.tie_weights, torch.nn.init.normal_) == swapped


# --- the real default model --------------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_predicts(default_model: LoadedModel) -> None:
    assert default_model.spec == DEFAULT_MODEL
    assert next_token(default_model, EIFFEL) == " Paris"
    assert next_token(default_model, IOI) == " Mary"


@pytest.mark.slow
def test_default_model_batched_left_padded(default_model: LoadedModel) -> None:
    batch = default_model.tokenizer([EIFFEL, IOI], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = default_model.model(**batch).logits[:, -1]
    assert [default_model.tokenizer.decode(t) for t in logits.argmax(-1)] == [" Paris", " Mary"]


@pytest.mark.slow
def test_default_model_tokenizer_files(default_model: LoadedModel, tmp_path: Path) -> None:
    directory = write_files(default_model.tokenizer_files, tmp_path)
    rebuilt = transformers.AutoTokenizer.from_pretrained(directory)
    raw = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    for prompt in PROMPTS:
        expected = default_model.tokenizer(prompt).input_ids
        assert rebuilt(prompt).input_ids == raw.encode(prompt).ids == expected
    assert rebuilt.padding_side == "left"


@pytest.mark.slow
def test_default_model_second_load_hits_cache(
    default_model: LoadedModel,
    farscope_cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def no_conversion(*args: object) -> None:
        raise AssertionError("converted the GGUF again instead of reading the cache")

    monkeypatch.setattr(loading, "_convert_gguf", no_conversion)
    started = time.perf_counter()
    with caplog.at_level(logging.INFO, logger=loading.__name__):
        again = load_model(DEFAULT_MODEL, cache_dir=farscope_cache_dir)
    elapsed = time.perf_counter() - started

    cached = Path(again.model.name_or_path)
    assert cached.parent == farscope_cache_dir
    assert cached.name.startswith(f"{DEFAULT_MODEL.name}-")
    assert "using converted GGUF" in caplog.text
    # The conversion takes ~30 s; a cache read well under a second. A third of it leaves slack.
    assert elapsed < 10
    assert "quantization_config" not in json.loads((cached / "config.json").read_text())
    assert next_token(again, EIFFEL) == " Paris"
