"""Shared fixtures for every test folder: the models, one in-process server per model kind, clients, and
reference copies.

Tiny models are built from configs with a fixed seed and saved to disk together with a tiny
byte-level BPE tokenizer, so that tests load them through the same code path as real checkpoints.
Everything here is session-scoped: build and load once, read many times.

Model kinds and their fixtures:

- tiny (``tiny-llama``, ``tiny-gpt2``, ``tiny-gpt_neox``): ``tiny_server`` serves all three;
  ``tiny_remote`` = ``{arch: RemoteModel}``; references ``tiny_local`` = ``{arch: nn.Module}`` (the
  model's own sdpa attention), ``tiny_eager`` (eager attention), ``tiny_tokenizer``, ``tiny_loaded``.
- smollm2-135m (the embedded default model): ``smol_server``; ``smol`` (RemoteModel); references
  ``default_model`` (a LoadedModel), ``smol_local`` = ``(nn.Module, tokenizer)``, ``smol_eager``.

Each model is loaded once for its server and once per reference copy. The copies are separate objects
on purpose: a Replica instruments the model it wraps (hook points inside attention), so a served model
is never a reference, and a model object is never wrapped by two Replicas. A test that needs a server
with special settings (keys, limits, TTLs, a server it stops) starts its own, with models of its own.
Tests must not mutate the shared models: the servers run jobs on their own worker threads, and
hooks a test adds must be removed by the code that adds them. Nor may a test change torch's thread
count around the first use of a shared server: its worker threads keep the intra-op thread count they
first computed with, and results computed with another count are not bit-identical to the references.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from farscope.server.config import ModelSpec

if TYPE_CHECKING:  # imported for real inside the fixtures, see below
    from torch import nn

    import farscope
    from farscope.server.loading import LoadedModel
    from farscope.server.service import Server

TINY_ARCHS = ("llama", "gpt2", "gpt_neox")

# Training text for the tiny tokenizer: common English words plus the prompts the tests use, so
# those prompts come out as a handful of whole-word tokens rather than bytes.
_TOKENIZER_CORPUS = """\
When Mary and John went to the store, John gave a drink to Mary.
When Tom and Anna went to the park, Anna gave a ball to Tom.
The Eiffel Tower is located in the city of Paris, the capital of France.
The Colosseum is located in the city of Rome, the capital of Italy.
Berlin is the capital of Germany and Madrid is the capital of Spain.
The quick brown fox jumps over the lazy dog. The dog was not happy about it.
Once upon a time there was a little girl who lived in a small house near the forest.
She liked to read books, play music, and walk with her friends every day after school.
He said that he would come back home soon, but he never did. They waited for a long time.
What is your name? Where do you live? How old are you? Why did you do that? Who are they?
I think this is a good idea, because it is simple and it works well for all of us.
We can see the sun in the morning and the moon at night, and the stars are very bright.
One, two, three, four, five, six, seven, eight, nine, ten. First, second, third, last.
The man and the woman had a cat and a dog; the children gave them food and water.
It was a cold day in winter, so they stayed inside, made tea, and talked about the year.
My favourite colours are red, green, blue, yellow, black and white. This one is new, that one is old.
"""


def _build_tokenizer(save_dir: Path) -> int:
    """Train a tiny byte-level BPE (deterministic for a fixed text), save it, return its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<eos>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    # Byte-level like GPT-2/Llama 3: any string encodes, and decoding gives back the exact text.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_TOKENIZER_CORPUS.splitlines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>"
    )
    tokenizer.save_pretrained(save_dir)
    return len(tokenizer)


def _tiny_config(arch: str, vocab_size: int):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    special = {"bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1}  # <eos>, <pad> as trained
    if arch == "llama":
        # Fewer key/value heads than query heads, as in most current Llama-family models.
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **special,
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=128, **special,
        )
    if arch == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128, **special,
        )
    raise ValueError(f"no tiny config for architecture {arch!r}; known: {', '.join(TINY_ARCHS)}")


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{"llama" | "gpt2" | "gpt_neox": directory}``, each a saved random model plus tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tiny-models")
    tokenizer_dir = root / "tokenizer"
    vocab_size = _build_tokenizer(tokenizer_dir)
    dirs: dict[str, Path] = {}
    for arch in TINY_ARCHS:
        torch.manual_seed(0)  # per model, so each one is the same whatever is built before it
        model = AutoModelForCausalLM.from_config(_tiny_config(arch, vocab_size))
        out = root / arch
        model.save_pretrained(out)
        for file in tokenizer_dir.iterdir():
            (out / file.name).write_bytes(file.read_bytes())
        dirs[arch] = out
    return dirs


@pytest.fixture(scope="session")
def tiny_spec(tiny_model_dirs: dict[str, Path]) -> Callable[..., ModelSpec]:
    """``tiny_spec(arch, **overrides) -> ModelSpec`` for a tiny model, named ``tiny-<arch>``."""

    def make(arch: str, **overrides: object) -> ModelSpec:
        fields: dict = {"name": f"tiny-{arch}", "source": str(tiny_model_dirs[arch])}
        fields.update(overrides)
        return ModelSpec(**fields)

    return make


@pytest.fixture(params=TINY_ARCHS)
def tiny_arch(request: pytest.FixtureRequest) -> str:
    """Runs the requesting test once per tiny architecture."""
    return request.param


@pytest.fixture(scope="session")
def farscope_cache_dir() -> Path:
    """The GGUF conversion cache shared across test runs: ``$FARSCOPE_CACHE`` or ``~/.cache/farscope``.

    Deliberately not a tmp dir: converting the default model takes ~30 s, and a persistent cache
    makes every run after the first skip it.
    """
    env = os.environ.get("FARSCOPE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "farscope"


# -- servers and clients: one per model kind ---------------------------------------------------------
# farscope, the server and transformers are imported inside the fixtures: tests/fuzz/fuzz_requests.py
# loads this file on its own for `_build_tokenizer` and `_tiny_config`.


def _serve(loaded_models: dict[str, LoadedModel]) -> Iterator[Server]:
    """A server on a free loopback port wrapping each given model in its own Replica, stopped at the end."""
    from farscope.server.replica import Replica
    from farscope.server.service import start_server

    server = start_server({name: Replica(loaded) for name, loaded in loaded_models.items()},
                          host="127.0.0.1", port=0)
    try:
        yield server
    finally:
        server.stop(grace=1)


def _load_tiny(tiny_spec: Callable[..., ModelSpec]) -> dict[str, LoadedModel]:
    """``{arch: LoadedModel}``: a fresh copy of every tiny model, each named ``tiny-<arch>``."""
    from farscope.server.loading import load_model  # lazily: it imports transformers

    return {arch: load_model(tiny_spec(arch)) for arch in TINY_ARCHS}


def _load_smol(cache_dir: Path) -> LoadedModel:
    """A fresh copy of smollm2-135m from the converted cache."""
    from farscope.server.config import DEFAULT_MODEL
    from farscope.server.loading import load_model

    return load_model(DEFAULT_MODEL, cache_dir=cache_dir)


@pytest.fixture(scope="session")
def tiny_server(tiny_spec: Callable[..., ModelSpec]) -> Iterator[Server]:
    """The tiny models (``tiny-llama``, ``tiny-gpt2``, ``tiny-gpt_neox``) on one in-process server."""
    yield from _serve({f"tiny-{arch}": loaded for arch, loaded in _load_tiny(tiny_spec).items()})


@pytest.fixture(scope="session")
def tiny_remote(tiny_server: Server) -> Iterator[dict[str, farscope.RemoteModel]]:
    """``{arch: farscope.RemoteModel}`` on ``tiny_server``."""
    import farscope

    models = {arch: farscope.RemoteModel(f"tiny-{arch}", address=f"127.0.0.1:{tiny_server.port}")
              for arch in TINY_ARCHS}
    yield models
    for model in models.values():
        model.close()


@pytest.fixture(scope="session")
def smol_server(farscope_cache_dir: Path) -> Iterator[Server]:
    """smollm2-135m on an in-process server, from its own copy of the model."""
    from farscope.server.config import DEFAULT_MODEL

    yield from _serve({DEFAULT_MODEL.name: _load_smol(farscope_cache_dir)})


@pytest.fixture(scope="session")
def smol(smol_server: Server) -> Iterator[farscope.RemoteModel]:
    """farscope.RemoteModel of smollm2-135m on ``smol_server``."""
    import farscope
    from farscope.server.config import DEFAULT_MODEL

    model = farscope.RemoteModel(DEFAULT_MODEL.name, address=f"127.0.0.1:{smol_server.port}")
    yield model
    model.close()


# -- reference copies: loaded apart from the servers' models, never served --------------------------


@pytest.fixture(scope="session")
def tiny_loaded(tiny_spec: Callable[..., ModelSpec]) -> dict[str, LoadedModel]:
    """``{arch: LoadedModel}``: second copies of the tiny models, for plain-PyTorch references."""
    return _load_tiny(tiny_spec)


@pytest.fixture(scope="session")
def tiny_local(tiny_loaded: dict[str, LoadedModel]) -> dict[str, nn.Module]:
    """``{arch: nn.Module}`` with the model's own (sdpa) attention, as loaded."""
    return {arch: loaded.model for arch, loaded in tiny_loaded.items()}


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_loaded: dict[str, LoadedModel]) -> Any:
    """The tokenizer all tiny models share (saved from one training run into each model's folder)."""
    return tiny_loaded["llama"].tokenizer


@pytest.fixture(scope="session")
def tiny_eager(tiny_spec: Callable[..., ModelSpec]) -> dict[str, nn.Module]:
    """``{arch: nn.Module}`` third copies switched to eager attention: their ``output_attentions`` are the
    probabilities that ``attn_probs`` reads must equal."""
    models = {}
    for arch, loaded in _load_tiny(tiny_spec).items():
        loaded.model.set_attn_implementation("eager")
        models[arch] = loaded.model
    return models


@pytest.fixture(scope="session")
def default_model(farscope_cache_dir: Path) -> LoadedModel:
    """The embedded default model (SmolLM2-135M-Instruct from GGUF) as a LoadedModel: the reference copy."""
    return _load_smol(farscope_cache_dir)


@pytest.fixture(scope="session")
def smol_local(default_model: LoadedModel) -> tuple[nn.Module, Any]:
    """(smollm2-135m with its own sdpa attention, its tokenizer): the reference copy."""
    return default_model.model, default_model.tokenizer


@pytest.fixture(scope="session")
def smol_eager(farscope_cache_dir: Path) -> nn.Module:
    """A third copy of smollm2-135m, switched to eager attention."""
    model = _load_smol(farscope_cache_dir).model
    model.set_attn_implementation("eager")
    return model
