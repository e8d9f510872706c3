"""`steering_vector` and `generate`: references by plain forward hooks (and HF `generate`) on local
copies of the same weights.

- `steering_vector` batches prompts of different lengths (left-padded) into one forward pass; the
  reference runs each prompt alone, unpadded. A padded row runs with an attention mask and explicit
  position ids, whose kernels round differently in the last bits from an unpadded solo run, so the
  comparison allows rtol = 1e-5, atol = 1e-5 (activations are O(1); float32 eps is 1.2e-7). A batch of
  equal-length prompts is unpadded: compared with the same batch run locally, it is exact.
- `generate` runs each generation alone (batch 1, two generates of one session), so the token ids
  equal HF greedy `generate` with the same forward hook exactly; greedy argmax makes any numerical
  difference in the steering show up as a different token, so equality is the whole check.
"""

from __future__ import annotations

import pytest
import torch

from farscope.recipes import SteeredGeneration, generate, steering_vector

LAYERS = {"llama": "model.layers", "gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers",
          "smollm2": "model.layers"}
POSITIVE = ["I love this, it is wonderful", "What a good day", "She was very happy and kind to us"]
NEGATIVE = ["I hate this", "What a bad and terrible day it was", "He was sad"]
PROMPT = "When Mary and John went to the store"
PADDED = dict(rtol=1e-5, atol=1e-5)
SMOL_PADDED = dict(rtol=1e-4, atol=1e-4)  # smollm2 layer 10: more layers to carry the rounding


class Requests:
    """Counts the requests a RemoteModel sends (blocking executes and submitted jobs)."""

    def __init__(self, model, monkeypatch) -> None:
        self.count = 0
        for name in ("execute", "submit"):
            original = getattr(model._transport, name)

            def counting(*args, original=original, **kwargs):
                self.count += 1
                return original(*args, **kwargs)
            monkeypatch.setattr(model._transport, name, counting)


def _module(model, path):
    for part in path.split("."):
        model = model[int(part)] if part.isdigit() else getattr(model, part)
    return model


def layer_reads(model, tokenizer, prompt, path):
    """The module's output for `prompt` run alone: [pos, d]."""
    kept = {}
    handle = _module(model, path).register_forward_hook(lambda m, a, o: kept.__setitem__("h", o))
    try:
        with torch.no_grad():
            model(torch.tensor([tokenizer(prompt)["input_ids"]]), use_cache=False)
    finally:
        handle.remove()
    return kept["h"][0]


def reference_vector(model, tokenizer, path, positive, negative, position=-1):
    sums = []
    for prompts in (positive, negative):
        total = None
        for prompt in prompts:
            h = layer_reads(model, tokenizer, prompt, path)[position]
            total = h if total is None else total + h
        sums.append(total)
    return sums[0] / len(positive) - sums[1] / len(negative)


def hf_generate(model, tokenizer, prompt, steps, edits=None):
    """HF greedy generate of one prompt; `edits`: {path: fn(output) -> output} on every forward call."""
    handles = [_module(model, path).register_forward_hook(lambda m, a, o, fn=fn: fn(o))
               for path, fn in (edits or {}).items()]
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    try:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                                 pad_token_id=model.generation_config.pad_token_id)
    finally:
        for handle in handles:
            handle.remove()
    return out[0, ids.shape[1]:]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_steering_vector_equals_per_prompt_hooks(arch, tiny_remote, recipes_tiny_local, monkeypatch):
    model, tokenizer = recipes_tiny_local[arch]
    remote = tiny_remote[arch]
    requests = Requests(remote, monkeypatch)
    path = f"{LAYERS[arch]}.1"
    vector = steering_vector(remote, POSITIVE, NEGATIVE, layer=1)
    assert requests.count == 1
    expected = reference_vector(model, tokenizer, path, POSITIVE, NEGATIVE)
    assert vector.shape == (model.config.hidden_size,)
    torch.testing.assert_close(vector, expected, **PADDED)
    # A non-negative position counts from each prompt's own first token, whatever the padding; a
    # module path works as the layer.
    first = steering_vector(remote, POSITIVE, NEGATIVE, layer=path, position=1)
    torch.testing.assert_close(first, reference_vector(model, tokenizer, path, POSITIVE, NEGATIVE, 1), **PADDED)


def test_steering_vector_of_equal_lengths_is_exact(tiny_remote, recipes_tiny_local):
    """Prompts of one length make an unpadded batch, the same call as `model(ids)` on both rows."""
    model, tokenizer = recipes_tiny_local["llama"]
    positive, negative = "When Mary and John went", "When Tom and Anna went"
    ids = torch.tensor([tokenizer(positive)["input_ids"], tokenizer(negative)["input_ids"]])
    vector = steering_vector(tiny_remote["llama"], [positive], [negative], layer=0)
    kept = {}
    handle = model.model.layers[0].register_forward_hook(lambda m, a, o: kept.__setitem__("h", o))
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        handle.remove()
    expected = kept["h"][0, -1] / 1 - kept["h"][1, -1] / 1
    torch.testing.assert_close(vector, expected, rtol=0, atol=0)


@pytest.mark.parametrize("positions", ["all", "last"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_generate_equals_hf_generate_with_a_hook(arch, positions, tiny_remote, recipes_tiny_local,
                                                 monkeypatch, tmp_path):
    model, tokenizer = recipes_tiny_local[arch]
    remote = tiny_remote[arch]
    vec = 4 * torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    requests = Requests(remote, monkeypatch)
    result = generate(remote, PROMPT, steer={0: vec}, max_new_tokens=8, positions=positions)
    assert requests.count == 1, "both generations should travel in one request"

    def add(out):
        if positions == "all":
            return out + vec
        out = out.clone()
        out[:, -1] += vec
        return out
    steered = hf_generate(model, tokenizer, PROMPT, 8, {f"{LAYERS[arch]}.0": add})
    plain = hf_generate(model, tokenizer, PROMPT, 8)
    assert isinstance(result, SteeredGeneration)
    assert torch.equal(result.steered_ids, steered)
    assert torch.equal(result.unsteered_ids, plain)
    assert not torch.equal(result.steered_ids, result.unsteered_ids)
    assert result.first_difference is not None
    assert result.steered_text == tokenizer.decode(steered.tolist())
    assert result.unsteered_text == tokenizer.decode(plain.tolist())
    assert torch.equal(result.prompt_ids, torch.tensor(tokenizer(PROMPT)["input_ids"]))
    assert "steered" in str(result) and "unsteered" in str(result)
    assert result.plot(tmp_path / "steer.png").stat().st_size > 0


def test_smollm2_caa_vector_steers_generation(smol, smol_local, monkeypatch, tmp_path):
    """A love − hate vector at layer 10 (difference of means over 4 + 4 prompts), added at every
    position: the generation equals HF generate with the same hook and differs from the plain one."""
    model, tokenizer = smol_local
    positive = ["I love you so much", "This is wonderful, I am so happy", "What a beautiful day", "I adore it"]
    negative = ["I hate you so much", "This is awful, I am so angry", "What a horrible day", "I despise it"]
    requests = Requests(smol, monkeypatch)
    vector = steering_vector(smol, positive, negative, layer=10)
    torch.testing.assert_close(vector, reference_vector(model, tokenizer, "model.layers.10", positive, negative),
                               **SMOL_PADDED)
    prompt, steps = "I think that you are", 10
    result = generate(smol, prompt, steer={10: 4 * vector}, max_new_tokens=steps)
    assert requests.count == 2  # one for the vector, one for both generations

    def add(out):
        return out + 4 * vector
    assert torch.equal(result.steered_ids, hf_generate(model, tokenizer, prompt, steps, {"model.layers.10": add}))
    assert torch.equal(result.unsteered_ids, hf_generate(model, tokenizer, prompt, steps))
    assert result.steered_text != result.unsteered_text
    print(result)
    result.plot(tmp_path / "smol_steer.png")
