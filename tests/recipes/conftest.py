"""Fixtures for the recipe tests: in-process servers of the tiny models and of smollm2-135m, and local
copies of the same weights for plain-PyTorch references.

`tests/conftest.py` (tiny_spec, default_model, farscope_cache_dir) applies here;
`tests/integration/conftest.py` does not. Several recipe test files share this file: add fixtures
with distinct names, do not rename existing ones.
"""

from __future__ import annotations

import pytest
import torch

# -- servers and local copies for the logit lens, DLA and attention recipes (prefix `recipes_`) ------
# Each server loads its models through the normal path (`load_model`); references run on second
# copies loaded from the same files: `*_local` keep the model's own (sdpa) attention, `*_eager` are
# switched to eager attention, whose `output_attentions` are what `attn_probs` reads equal.

RECIPES_TINY_ARCHS = ("llama", "gpt2", "gpt_neox")


@pytest.fixture(scope="session")
def recipes_tiny_server(tiny_spec):
    from farscope.server.loading import load_model
    from farscope.server.replica import Replica
    from farscope.server.service import start_server

    replicas = {f"tiny-{arch}": Replica(load_model(tiny_spec(arch, name=f"tiny-{arch}")))
                for arch in RECIPES_TINY_ARCHS}
    server = start_server(replicas, host="127.0.0.1", port=0)
    yield server
    server.stop(grace=1)


@pytest.fixture(scope="session")
def recipes_tiny_remote(recipes_tiny_server):
    """{"llama" | "gpt2" | "gpt_neox": farscope.RemoteModel} on a server of the tiny models."""
    import farscope

    models = {arch: farscope.RemoteModel(f"tiny-{arch}", address=f"127.0.0.1:{recipes_tiny_server.port}")
              for arch in RECIPES_TINY_ARCHS}
    yield models
    for model in models.values():
        model.close()


@pytest.fixture(scope="session")
def recipes_tiny_local(tiny_spec):
    """{arch: (local nn.Module with sdpa attention, tokenizer)}: second copies for references."""
    from farscope.server.loading import load_model

    loaded = {arch: load_model(tiny_spec(arch)) for arch in RECIPES_TINY_ARCHS}
    return {arch: (item.model, item.tokenizer) for arch, item in loaded.items()}


@pytest.fixture(scope="session")
def recipes_tiny_eager(tiny_spec):
    """{arch: local nn.Module with eager attention} (its `output_attentions` are the reference)."""
    from farscope.server.loading import load_model

    models = {}
    for arch in RECIPES_TINY_ARCHS:
        model = load_model(tiny_spec(arch)).model
        model.set_attn_implementation("eager")
        models[arch] = model
    return models


@pytest.fixture(scope="session")
def recipes_smol_server(default_model):
    from farscope.server.config import DEFAULT_MODEL
    from farscope.server.replica import Replica
    from farscope.server.service import start_server

    server = start_server({DEFAULT_MODEL.name: Replica(default_model)}, host="127.0.0.1", port=0)
    yield server
    server.stop(grace=1)


@pytest.fixture(scope="session")
def recipes_smol(recipes_smol_server):
    """farscope.RemoteModel of smollm2-135m on an in-process server."""
    import farscope
    from farscope.server.config import DEFAULT_MODEL

    model = farscope.RemoteModel(DEFAULT_MODEL.name, address=f"127.0.0.1:{recipes_smol_server.port}")
    yield model
    model.close()


@pytest.fixture(scope="session")
def recipes_smol_local(farscope_cache_dir):
    """(local smollm2-135m with sdpa attention, tokenizer), loaded from the same converted cache."""
    from farscope.server.config import DEFAULT_MODEL
    from farscope.server.loading import load_model

    loaded = load_model(DEFAULT_MODEL, cache_dir=farscope_cache_dir)
    return loaded.model, loaded.tokenizer


@pytest.fixture(scope="session")
def recipes_smol_eager(farscope_cache_dir):
    """A local smollm2-135m with eager attention."""
    from farscope.server.config import DEFAULT_MODEL
    from farscope.server.loading import load_model

    model = load_model(DEFAULT_MODEL, cache_dir=farscope_cache_dir).model
    model.set_attn_implementation("eager")
    return model


@pytest.fixture(scope="session")
def recipes_biased_specs(tiny_model_dirs, tiny_spec, tmp_path_factory):
    """{arch: ModelSpec} of the tiny models with every norm weight, norm bias and linear bias made
    random (seeded): a fresh random init leaves them at 1 and 0, which would hide how a recipe handles
    them. Named ``biased-<arch>``."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("biased-models")
    specs = {}
    for arch in RECIPES_TINY_ARCHS:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[arch])
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                is_norm = "norm" in name or ".ln" in name or name.startswith("transformer.ln_f")
                if is_norm and name.endswith("weight"):
                    param.copy_(1 + 0.3 * torch.randn(param.shape, generator=generator))
                elif name.endswith("bias") and param.dim() == 1:
                    param.copy_(0.1 * torch.randn(param.shape, generator=generator))
        out = root / arch
        model.save_pretrained(out)
        for file in tiny_model_dirs[arch].iterdir():
            if not (out / file.name).exists():  # the tokenizer's files
                (out / file.name).write_bytes(file.read_bytes())
        specs[arch] = tiny_spec(arch, name=f"biased-{arch}", source=str(out))
    return specs


@pytest.fixture(scope="session")
def recipes_biased_remote(recipes_biased_specs):
    """{arch: farscope.RemoteModel} of the ``biased-<arch>`` models on their own in-process server."""
    import farscope
    from farscope.server.loading import load_model
    from farscope.server.replica import Replica
    from farscope.server.service import start_server

    server = start_server({spec.name: Replica(load_model(spec)) for spec in recipes_biased_specs.values()},
                          host="127.0.0.1", port=0)
    models = {arch: farscope.RemoteModel(spec.name, address=f"127.0.0.1:{server.port}")
              for arch, spec in recipes_biased_specs.items()}
    yield models
    for model in models.values():
        model.close()
    server.stop(grace=1)


@pytest.fixture(scope="session")
def recipes_biased_local(recipes_biased_specs):
    """{arch: (local nn.Module, tokenizer)}: second copies of the ``biased-<arch>`` models."""
    from farscope.server.loading import load_model

    loaded = {arch: load_model(spec) for arch, spec in recipes_biased_specs.items()}
    return {arch: (item.model, item.tokenizer) for arch, item in loaded.items()}
