"""`logit_lens` against a plain-PyTorch reference, and the Eiffel Tower reproduction on smollm2-135m.

The reference runs a local copy of the same weights (`model(ids, use_cache=False)`, the server's call)
with forward hooks on every layer, then the same float32 ops: softmax(lm_head(norm(h)).float()).topk.
Same weights, same CPU kernels, same op sequence: ids and probabilities are compared exactly.
"""

from __future__ import annotations

import pytest
import torch

from farscope.recipes import LogitLensResult, logit_lens

EIFFEL = "The Eiffel Tower is located in the city of"
LAYERS = {"llama": "model.layers", "gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}
NORMS = {"llama": "model.norm", "gpt2": "transformer.ln_f", "gpt_neox": "gpt_neox.final_layer_norm"}


def _at(root, path: str):
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def reference_lens(model, tokenizer, prompt: str, layers: str, norm: str, k: int):
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    blocks = _at(model, layers)
    outputs: list[torch.Tensor] = []
    handles = [block.register_forward_hook(lambda m, a, o: outputs.append(o)) for block in blocks]
    try:
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
            probs = torch.stack([torch.softmax(model.lm_head(_at(model, norm)(h))[0].float(), -1) for h in outputs])
    finally:
        for handle in handles:
            handle.remove()
    top = probs.topk(k, dim=-1)
    return top.values, top.indices, logits


@pytest.mark.parametrize("arch", list(LAYERS))
def test_logit_lens_equals_plain_hooks_on_tiny_models(arch, tiny_remote, recipes_tiny_local, tmp_path):
    model, tokenizer = recipes_tiny_local[arch]
    result = logit_lens(tiny_remote[arch], EIFFEL, k=3)
    probs, ids, logits = reference_lens(model, tokenizer, EIFFEL, LAYERS[arch], NORMS[arch], 3)

    assert isinstance(result, LogitLensResult)
    positions = len(tokenizer(EIFFEL)["input_ids"])
    assert result.token_ids.shape == result.probs.shape == (model.config.num_hidden_layers, positions, 3)
    assert torch.equal(result.token_ids, ids)
    assert torch.equal(result.probs, probs)
    assert torch.equal(result.token_ids[-1, :, 0], logits[0].argmax(-1))   # the last layer is the model's
    assert result.tokens == [tokenizer.decode([t]) for t in tokenizer(EIFFEL)["input_ids"]]
    assert result.top_tokens[1][-1] == [tokenizer.decode([int(t)]) for t in ids[1, -1]]
    assert len(result.top1()) == model.config.num_hidden_layers

    path = result.plot(tmp_path / "lens.png")
    assert path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_logit_lens_on_smollm2_finds_paris_only_in_the_last_layers(smol, smol_local, tmp_path):
    model, tokenizer = smol_local
    result = logit_lens(smol, EIFFEL, k=5)
    probs, ids, _ = reference_lens(model, tokenizer, EIFFEL, "model.layers", "model.norm", 5)
    assert torch.equal(result.token_ids, ids)
    assert torch.equal(result.probs, probs)

    top1 = result.top1(-1)
    print("logit lens top-1 at the last position, by layer:", top1)
    assert top1[-1] == " Paris"
    first = top1.index(" Paris")
    assert first >= 25 and all(t == " Paris" for t in top1[first:]), top1   # the last few layers only
    assert result.plot(tmp_path / "lens.png").stat().st_size > 1000
