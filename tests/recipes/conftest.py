"""Fixtures for the recipe tests only; the shared servers, clients and reference copies (`tiny_remote`,
`tiny_local`, `tiny_eager`, `smol`, `smol_local`, `smol_eager`) are in tests/conftest.py.

Here: `recipes_tiny_local`, the shared tiny reference copies paired with their tokenizers as the recipe
tests take them, and the ``biased-<arch>`` models (random norm weights and biases) on a server of their own.
"""

from __future__ import annotations

import pytest
import torch

RECIPES_TINY_ARCHS = ("llama", "gpt2", "gpt_neox")


@pytest.fixture(scope="session")
def recipes_tiny_local(tiny_loaded):
    """{arch: (local nn.Module with sdpa attention, tokenizer)}: the shared reference copies."""
    return {arch: (item.model, item.tokenizer) for arch, item in tiny_loaded.items()}


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
