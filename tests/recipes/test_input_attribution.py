"""`input_attribution`: gradient × input and integrated gradients equal plain-PyTorch references, and
integrated gradients are complete where the model is smooth along the path.

References run on a local copy of the same weights with a forward hook on the token embedding module
and `torch.autograd.grad`, doing the same float32 arithmetic in the same order as the recipe asks of
the server (the same batch of identical, unpadded rows; each row's embedding scaled by its α; the
metrics summed in invoke order; the gradients summed in invoke order): the numbers are compared
exactly (rtol = atol = 0).

Completeness: Σ IG = m(x) − m(0) up to the Riemann (midpoint) error, O(1/steps²) for a smooth path.
On tiny GPT-2 the learned position embeddings keep the residual stream away from zero at the baseline,
the path is smooth, and the error falls ~16× from 8 to 32 steps (6e-4 -> 4e-5 measured). Models whose
residual stream vanishes with the token embeddings (Llama, no biases: tiny Llama and smollm2) put the
zero baseline on a singular point — the final RMSNorm of a vanishing residual jumps from 0 to a unit
vector — so there the sum does not approach m(x) − m(0) at any practical step count; the test records
that m(0) is exactly 0 there, and the README says so.
"""

from __future__ import annotations

import pytest
import torch

from farscope.recipes import InputAttributionResult, input_attribution

IOI = "When Mary and John went to the store, John gave a drink to"
EIFFEL = "The Eiffel Tower is located in the city of"
EMBED = {"llama": "model.embed_tokens", "gpt2": "transformer.wte", "gpt_neox": "gpt_neox.embed_in",
         "smollm2": "model.embed_tokens"}
NORM = {"llama": "model.norm", "gpt2": "transformer.ln_f", "gpt_neox": "gpt_neox.final_layer_norm",
        "smollm2": "model.norm"}
EXACT = dict(rtol=0, atol=0)


def _module(model, path):
    for part in path.split("."):
        model = model[int(part)] if part.isdigit() else getattr(model, part)
    return model


def _tid(tokenizer, word):
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (word, ids)
    return ids[0]


def reference(model, tokenizer, arch, prompt, target, foil, steps=None):
    """(attributions [pos, d], m(x), m(0) or None) by forward hooks and autograd on a local copy."""
    ids = tokenizer(prompt)["input_ids"]
    t, f = _tid(tokenizer, target), None if foil is None else _tid(tokenizer, foil)
    alphas = None if steps is None else [(k + 0.5) / steps for k in range(steps)]
    rows = 1 if steps is None else steps + 2
    kept = {}

    def hook(module, args, out):
        if alphas is None:
            kept["emb"] = out
            return out
        points = [out[k:k + 1] * a for k, a in enumerate(alphas)]
        kept["points"], kept["emb"] = points, out[steps:steps + 1]
        return torch.cat([*points, kept["emb"], out[steps + 1:] * 0.0])

    handles = [_module(model, EMBED[arch]).register_forward_hook(hook),
               _module(model, NORM[arch]).register_forward_hook(lambda m, a, o: kept.__setitem__("final", o))]
    try:
        with torch.enable_grad():
            model(torch.tensor([ids] * rows), use_cache=False)
            # Each row's last-position logits: lm_head on that row's final-norm output.
            logits = torch.cat([model.lm_head(kept["final"][k:k + 1, -1]) for k in range(rows)])
            metric = logits[:, t] if f is None else logits[:, t] - logits[:, f]
            values = metric.detach().tolist()
            if alphas is None:
                grad, = torch.autograd.grad(metric[0], kept["emb"])
                return (kept["emb"] * grad)[0].detach(), values[0], None
            total = metric[0]
            for k in range(1, steps):
                total = total + metric[k]
            grads = torch.autograd.grad(total, kept["points"])
            summed = grads[0]
            for g in grads[1:]:
                summed = summed + g
            attributions = (kept["emb"] * (summed / steps))[0].detach()
            return attributions, values[steps], values[steps + 1]
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_gradient_x_input_equals_hooks(arch, tiny_remote, recipes_tiny_local, tmp_path):
    model, tokenizer = recipes_tiny_local[arch]
    result = input_attribution(tiny_remote[arch], IOI, " Mary", foil=" John")
    attributions, metric, _ = reference(model, tokenizer, arch, IOI, " Mary", " John")
    assert isinstance(result, InputAttributionResult)
    torch.testing.assert_close(result.attributions, attributions, **EXACT)
    assert result.metric == metric
    torch.testing.assert_close(result.scores, attributions.norm(dim=-1), **EXACT)
    torch.testing.assert_close(result.aggregate("dot"), attributions.sum(-1), **EXACT)
    assert len(result.tokens) == attributions.shape[0] == len(tokenizer(IOI)["input_ids"])
    assert result.completeness_error is None
    assert result.plot(tmp_path / "gxi.png").stat().st_size > 0


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_integrated_gradients_equal_hooks(arch, tiny_remote, recipes_tiny_local):
    model, tokenizer = recipes_tiny_local[arch]
    result = input_attribution(tiny_remote[arch], IOI, " Mary", method="integrated_gradients", steps=8,
                               aggregation="dot")
    attributions, metric, baseline = reference(model, tokenizer, arch, IOI, " Mary", None, steps=8)
    torch.testing.assert_close(result.attributions, attributions, **EXACT)
    assert (result.metric, result.baseline_metric) == (metric, baseline)
    torch.testing.assert_close(result.scores, attributions.sum(-1), **EXACT)
    assert result.meta["rule"] == "midpoint"


def test_integrated_gradients_are_complete_on_a_smooth_path(tiny_remote):
    """Σ IG → m(x) − m(0) at the midpoint rule's O(1/steps²): 4× the steps, ≥ 8× smaller error
    (16× in theory), and under 1e-3 of the scale at 32 steps; float32 rounding is ~1e-6 here."""
    model = tiny_remote["gpt2"]
    errors = {}
    for steps in (8, 32):
        result = input_attribution(model, IOI, " Mary", foil=" John", method="integrated_gradients", steps=steps)
        errors[steps] = result.completeness_error
        scale = max(1.0, abs(result.metric - result.baseline_metric))
    print(f"IG completeness error, tiny gpt2: {errors}")
    assert errors[32] < errors[8] / 8
    assert errors[32] < 1e-3 * scale


def test_zero_baseline_is_singular_without_biases(tiny_remote):
    """Llama has no biases: zero token embeddings give an all-zero residual stream and logits exactly 0,
    while any α > 0 gives a normalised, O(1) final residual — a jump completeness cannot integrate."""
    result = input_attribution(tiny_remote["llama"], IOI, " Mary", foil=" John",
                               method="integrated_gradients", steps=4)
    assert result.baseline_metric == 0.0


def test_smollm2_gradient_x_input_and_ig(smol, smol_local, tmp_path):
    model, tokenizer = smol_local
    result = input_attribution(smol, EIFFEL, " Paris", foil=" Rome")
    attributions, metric, _ = reference(model, tokenizer, "smollm2", EIFFEL, " Paris", " Rome")
    torch.testing.assert_close(result.attributions, attributions, **EXACT)
    assert result.metric == metric > 0
    assert result.tokens[int(result.scores.argmax())] == "iffel"  # the token that names the tower
    print(result)
    result.plot(tmp_path / "smol_gxi.png")

    ig = input_attribution(smol, EIFFEL, " Paris", foil=" Rome", method="integrated_gradients", steps=4)
    attributions, metric, baseline = reference(model, tokenizer, "smollm2", EIFFEL, " Paris", " Rome", steps=4)
    torch.testing.assert_close(ig.attributions, attributions, **EXACT)
    assert (ig.metric, ig.baseline_metric) == (metric, baseline)
    print(f"smollm2 IG (4 steps): Σ = {float(ig.attributions.sum()):.3f}, m(x) − m(0) = "
          f"{ig.metric - ig.baseline_metric:.3f}, error {ig.completeness_error:.3f}")


def test_bad_arguments(tiny_remote):
    model = tiny_remote["llama"]
    with pytest.raises(ValueError, match="method"):
        input_attribution(model, IOI, " Mary", method="saliency")
    with pytest.raises(ValueError, match="aggregation"):
        input_attribution(model, IOI, " Mary", aggregation="max")
    with pytest.raises(ValueError, match="tokens"):
        input_attribution(model, IOI, " Mary John")
