"""`direct_logit_attribution`: the decomposition sums to the model's logit difference, and every number
equals a plain-PyTorch reference computed from the local copy's weights.

The reference reads the components with forward hooks on a local copy (`model(ids, use_cache=False)`,
the server's call) and takes the weights directly: W_O from the output projection (nn.Linear or
GPT-2's Conv1D), γ, β and ε from the final norm (σ = sqrt(mean((r − μ)²) + ε), as TransformerLens),
W_U from lm_head. The recipe reads the same weights off module calls on the server, and its σ off the
norm's output, so the two agree to float32 rounding, not bit for bit: compared with
rtol = atol = 1e-4 (contributions are O(1); float32 dot products over d_model terms round at ~1e-6).
"""

from __future__ import annotations

import pytest
import torch

from farscope.recipes import DLAResult, direct_logit_attribution

IOI = "When Mary and John went to the store, John gave a drink to"
PATHS = {
    "llama": dict(embed="model.embed_tokens", pos=None, layers="model.layers", attn="self_attn", mlp="mlp",
                  proj="o_proj", norm="model.norm", centered=False),
    "gpt2": dict(embed="transformer.wte", pos="transformer.wpe", layers="transformer.h", attn="attn", mlp="mlp",
                 proj="c_proj", norm="transformer.ln_f", centered=True),
    "gpt_neox": dict(embed="gpt_neox.embed_in", pos=None, layers="gpt_neox.layers", attn="attention", mlp="mlp",
                     proj="dense", norm="gpt_neox.final_layer_norm", centered=True),
}
PATHS["smollm2"] = PATHS["llama"]
TOL = dict(rtol=1e-4, atol=1e-4)


def _at(root, path: str):
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def reference_dla(model, tokenizer, prompt: str, paths: dict, target: int, foil: int | None) -> dict:
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    reads: dict[str, torch.Tensor] = {}
    handles = []

    def keep(name):
        return lambda m, a, o: reads.__setitem__(name, (o[0] if isinstance(o, tuple) else o)[0, -1])

    handles.append(_at(model, paths["embed"]).register_forward_hook(keep("embed")))
    if paths["pos"]:
        handles.append(_at(model, paths["pos"]).register_forward_hook(keep("pos")))
    for i in range(n_layers):
        layer = _at(model, f"{paths['layers']}.{i}")
        attn = getattr(layer, paths["attn"])
        handles.append(attn.register_forward_hook(keep(f"attn{i}")))
        handles.append(getattr(layer, paths["mlp"]).register_forward_hook(keep(f"mlp{i}")))
        handles.append(getattr(attn, paths["proj"]).register_forward_pre_hook(
            lambda m, a, i=i: reads.__setitem__(f"z{i}", a[0][0, -1])))
    norm = _at(model, paths["norm"])
    handles.append(norm.register_forward_pre_hook(lambda m, a: reads.__setitem__("resid", a[0][0, -1])))
    try:
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits[0, -1]
    finally:
        for handle in handles:
            handle.remove()

    with torch.no_grad():
        w_u = model.lm_head.weight[target] - (model.lm_head.weight[foil] if foil is not None else 0)
        b_u = model.lm_head.bias
        bias_u = 0.0 if b_u is None else b_u[target] - (b_u[foil] if foil is not None else 0)
        r = reads["resid"]
        eps = getattr(norm, "variance_epsilon", None) or norm.eps
        if paths["centered"]:
            sigma = ((r - r.mean()).pow(2).mean() + eps).sqrt()
        else:
            sigma = (r.pow(2).mean() + eps).sqrt()

        def contribution(c: torch.Tensor) -> torch.Tensor:
            if paths["centered"]:
                c = c - c.mean(-1, keepdim=True)
            return (c * norm.weight / sigma) @ w_u

        heads, attn_bias = torch.zeros(n_layers, n_heads), torch.zeros(n_layers)
        for i in range(n_layers):
            proj = getattr(getattr(_at(model, f"{paths['layers']}.{i}"), paths["attn"]), paths["proj"])
            weight = proj.weight if type(proj).__name__ == "Conv1D" else proj.weight.T   # [in, out]
            z = reads[f"z{i}"].reshape(n_heads, -1)
            d = z.shape[-1]
            heads[i] = torch.stack([contribution(z[h] @ weight[h * d:(h + 1) * d]) for h in range(n_heads)])
            if proj.bias is not None:
                attn_bias[i] = contribution(proj.bias)
        beta = getattr(norm, "bias", None)
        return {
            "embed": contribution(reads["embed"]),
            "pos_embed": contribution(reads["pos"]) if paths["pos"] else None,
            "attn": torch.stack([contribution(reads[f"attn{i}"]) for i in range(n_layers)]),
            "mlp": torch.stack([contribution(reads[f"mlp{i}"]) for i in range(n_layers)]),
            "heads": heads,
            "attn_bias": attn_bias,
            "final_bias": (0.0 if beta is None else beta @ w_u) + bias_u,
            "logit_diff": logits[target] - (logits[foil] if foil is not None else 0),
            "scale": sigma,
        }


def check_against_reference(result: DLAResult, expected: dict) -> None:
    for name, value in expected.items():
        actual = getattr(result, name)
        if value is None:
            assert actual is None, name
            continue
        torch.testing.assert_close(actual, torch.as_tensor(value, dtype=torch.float32), **TOL,
                                   msg=lambda m, name=name: f"{name}: {m}")


def check_sums(result: DLAResult) -> None:
    """Σ components + final bias = the model's logit (difference); Σ heads + b_O's part = attention."""
    diff = float(result.logit_diff)
    assert abs(float(result.total) - diff) <= 1e-3 * max(1.0, abs(diff)), (float(result.total), diff)
    torch.testing.assert_close(result.heads.sum(-1) + result.attn_bias, result.attn, rtol=1e-4, atol=1e-4)


def _token(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (text, ids)
    return ids[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("with_foil", [True, False])
def test_dla_equals_reference_and_sums_to_the_logit_on_tiny_models(arch, with_foil, recipes_biased_remote,
                                                                 recipes_biased_local):
    """On the tiny models with random norm weights and biases (so γ, β and b_O all matter)."""
    model, tokenizer = recipes_biased_local[arch]
    mary, john = _token(tokenizer, " Mary"), _token(tokenizer, " John")
    foil = " John" if with_foil else None
    result = direct_logit_attribution(recipes_biased_remote[arch], IOI, " Mary", foil=foil)
    expected = reference_dla(model, tokenizer, IOI, PATHS[arch], mary, john if with_foil else None)

    assert (result.target_id, result.foil_id) == (mary, john if with_foil else None)
    assert result.heads.shape == (model.config.num_hidden_layers, model.config.num_attention_heads)
    check_against_reference(result, expected)
    check_sums(result)
    assert torch.equal(result.logit_diff, expected["logit_diff"])      # the model's own logits, exactly
    if arch != "llama":
        assert result.attn_bias.abs().sum() > 0 and result.final_bias != 0    # the biases are accounted for


def test_dla_accepts_token_ids_and_refuses_multi_token_strings(tiny_remote, recipes_tiny_local):
    model, tokenizer = recipes_tiny_local["gpt2"]
    by_text = direct_logit_attribution(tiny_remote["gpt2"], IOI, " Mary", " John")
    by_id = direct_logit_attribution(tiny_remote["gpt2"], IOI, _token(tokenizer, " Mary"),
                                     _token(tokenizer, " John"))
    assert torch.equal(by_text.heads, by_id.heads) and by_id.target == " Mary"
    with pytest.raises(ValueError, match="tokens"):
        direct_logit_attribution(tiny_remote["gpt2"], IOI, " Mary went home")


def test_dla_on_smollm2_ioi(smol, smol_local, tmp_path):
    model, tokenizer = smol_local
    result = direct_logit_attribution(smol, IOI, " Mary", foil=" John")
    expected = reference_dla(model, tokenizer, IOI, PATHS["smollm2"], _token(tokenizer, " Mary"),
                             _token(tokenizer, " John"))
    check_against_reference(result, expected)
    check_sums(result)
    assert float(result.logit_diff) > 5                          # the model does IOI
    print(f"IOI logit diff {float(result.logit_diff):.4f}, sum of contributions {float(result.total):.4f}; "
          f"top heads {[(lh, round(v, 3)) for lh, v in result.top_heads(5)]}")

    for what in ("components", "heads"):
        path = result.plot(tmp_path / f"dla-{what}.png", what=what)
        assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"
