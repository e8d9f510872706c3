"""Direct logit attribution: how much each component writes the target logit (or target − foil).

    from farscope.recipes import direct_logit_attribution
    dla = direct_logit_attribution(model, "When Mary and John went to the store, John gave a drink to",
                                   " Mary", foil=" John")
    dla.heads              # [layers, heads]
    dla.plot("dla.png")

The residual stream at the last position is a sum of what each component wrote into it (the primer's
eq. 10): r = embed (+ pos_embed) + Σ_l (attn_l + mlp_l), and each attention output is its heads'
sum plus the output projection's bias: attn_l = Σ_h W_O^h z^h + b_O. The final norm is
norm(r) = γ ⊙ (r − μ(r)) / σ(r) + β (μ ≡ 0 for RMSNorm); with its scale σ frozen at the clean run's
value — as TransformerLens does — it is linear, so the logit difference splits exactly:

    logit[t] − logit[f] = Σ_c ⟨c − μ(c), γ ⊙ (W_U[t] − W_U[f]) / σ⟩ + ⟨β, W_U[t] − W_U[f]⟩ + (b_U[t] − b_U[f])

`final_bias` is the last two terms (the norm's shift and the unembedding's bias, 0 for most models);
`attn_bias[l]` is ⟨b_O − μ(b_O), ...⟩, the part of `attn[l]` that no head wrote; MLP biases stay in
`mlp[l]`. The sum of every component plus `final_bias` equals the model's logit difference (up to float
rounding, since σ is the actual scale of this run).

Everything is computed on the server in one forward pass, with only the client API: the weights the
decomposition needs are read off module calls on values of the trace —
  * each head's write W_O^h z^h: the output projection called on its input with every other head's
    slice zeroed (a block-diagonal batch, one row per head), minus its call on zeros (the bias b_O);
  * γ and β: β = norm(0); γ = (norm(a·v) − β) / v for a ±1 vector v of mean 0 and RMS 1 and a = 100
    (so that σ(a·v) = a to float precision whatever the norm's epsilon);
  * σ: fitted from the norm's own output on the residual, σ = ⟨u, u⟩ / ⟨u, norm(r) − β⟩ with
    u = γ ⊙ (r − μ(r)) — the exact scale the module applied, epsilon included;
  * W_U[t] − W_U[f]: the unembedding called on the rows of an identity matrix (built on the server,
    in chunks), minus its call on zeros (its bias).
Only the scalars travel back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ._arch import d_model_of, layout_of, n_heads_of
from ._result import RecipeResult, bars, heatmap

__all__ = ["DLAResult", "direct_logit_attribution"]

# Whether the architecture's norms subtract the mean (LayerNorm) or not (RMSNorm).
_PROBE_SCALE = 100.0
_CHUNK = 256  # rows of the identity per unembedding call: bounds the server's [rows, vocab] scratch


def _scalar() -> torch.Tensor:
    return torch.zeros(())


@dataclass
class DLAResult(RecipeResult):
    """Direct contributions to `logit[target]` (− `logit[foil]`) at the last position.

    Scalars are 0-dim tensors; `attn`, `mlp`, `attn_bias` are [layers], `heads` [layers, heads].
    `pos_embed` is None for models without learned positions. `logit_diff` is the model's own value
    (its logits at the last position); `scale` the frozen final-norm scale σ.
    """

    target: str = ""
    foil: str | None = None
    target_id: int = 0
    foil_id: int | None = None
    embed: torch.Tensor = field(default_factory=_scalar)
    pos_embed: torch.Tensor | None = None
    attn: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    mlp: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    heads: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))
    attn_bias: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    final_bias: torch.Tensor = field(default_factory=_scalar)
    logit_diff: torch.Tensor = field(default_factory=_scalar)
    scale: torch.Tensor = field(default_factory=_scalar)

    @property
    def total(self) -> torch.Tensor:
        """Σ of the layer-level components plus `final_bias`: equals `logit_diff` up to rounding."""
        pos = self.pos_embed if self.pos_embed is not None else 0.0
        return self.embed + pos + self.attn.sum() + self.mlp.sum() + self.final_bias

    def components(self) -> tuple[list[str], torch.Tensor]:
        """(labels, values) of the layer-level components, in the order they write the residual."""
        labels, values = ["embed"], [self.embed]
        if self.pos_embed is not None:
            labels.append("pos_embed")
            values.append(self.pos_embed)
        for i in range(len(self.attn)):
            labels += [f"L{i} attn", f"L{i} mlp"]
            values += [self.attn[i], self.mlp[i]]
        labels.append("final bias")
        values.append(self.final_bias)
        return labels, torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in values])

    def top_heads(self, n: int = 10) -> list[tuple[tuple[int, int], float]]:
        """The `n` heads with the largest |contribution|: [((layer, head), value), ...]."""
        flat = self.heads.reshape(-1)
        order = flat.abs().argsort(descending=True)[:n]
        width = self.heads.shape[1]
        return [((int(i) // width, int(i) % width), float(flat[i])) for i in order]

    @property
    def _what(self) -> str:
        return f"logit[{self.target!r}]" + (f" − logit[{self.foil!r}]" if self.foil is not None else "")

    def _draw(self, plt: Any, **kwargs: Any) -> Any:
        """Bars per component (default), or `what="heads"` for a [layers, heads] heatmap."""
        if kwargs.get("what", "components") == "heads":
            return heatmap(plt, self.heads, title=f"direct attribution of heads to {self._what}",
                           xlabels=[str(h) for h in range(self.heads.shape[1])],
                           ylabels=[f"L{i}" for i in range(self.heads.shape[0])], xlabel="head", ylabel="layer")
        labels, values = self.components()
        return bars(plt, values, labels, title=f"direct logit attribution to {self._what} "
                    f"(sum {float(self.total):.3f}, model {float(self.logit_diff):.3f})", ylabel="contribution")


def _token_id(tokenizer: Any, token: str | int) -> tuple[int, str]:
    if isinstance(token, int):
        return token, tokenizer.decode([token])
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{token!r} is {len(ids)} tokens ({ids}); pass a string that is one token, or its id")
    return ids[0], token


def direct_logit_attribution(model: Any, prompt: str, target: str | int,
                             foil: str | int | None = None) -> DLAResult:
    """Contributions of the embeddings, each layer's attention and MLP and each head to the target
    logit (or target − foil) at the last position, with the final norm's scale frozen (see the module
    docstring for the decomposition and where each weight comes from). One request, one forward pass.
    """
    layout = layout_of(model)
    centered = layout.centered
    tokenizer = model.tokenizer
    target_id, target_text = _token_id(tokenizer, target)
    foil_id, foil_text = (None, None) if foil is None else _token_id(tokenizer, foil)
    ids = tokenizer(prompt)["input_ids"]
    n_layers, n_heads, d_model = layout.n_layers(model), n_heads_of(model), d_model_of(model)
    picked = [target_id] if foil_id is None else [target_id, foil_id]
    sign = torch.tensor([1.0] if foil_id is None else [1.0, -1.0])
    head_mask = torch.eye(n_heads).unsqueeze(-1)                       # [heads, heads, 1]
    norm, unembed = layout.at(model, layout.norm), layout.at(model, layout.unembed)

    with model.trace(prompt):
        # What each component wrote at the last position, as rows of [components, d_model].
        rows = [layout.at(model, layout.embed).output[0, -1]]
        if layout.positional is not None:
            rows.append(layout.at(model, layout.positional).output[0, -1])
        attn_rows, mlp_rows, head_rows, bias_rows = [], [], [], []
        for i in range(n_layers):
            attn = layout.at(model, layout.attn, i)
            attn_rows.append(attn.output[0][0, -1])
            mlp_rows.append(layout.at(model, layout.mlp, i).output[0, -1])
            z = attn.head_out.output[0, -1]                            # [heads, head_dim]
            blocks = (z.unsqueeze(0) * head_mask.type_as(z)).reshape(n_heads, -1)   # row h: only head h's slice
            out_proj = layout.at(model, layout.out_proj, i)
            bias = out_proj(blocks[:1] * 0)                            # [1, d_model]: b_O (0 if none)
            head_rows.append(out_proj(blocks) - bias)
            bias_rows.append(bias)
        resid = norm.input[0, -1]                                      # r, the final norm's input

        # The final norm's γ, β and the frozen σ of this run.
        probe = _probe_vector(d_model).type_as(resid)
        beta = norm(resid.new_zeros(1, d_model))[0]
        gamma = (norm((probe * _PROBE_SCALE).unsqueeze(0))[0] - beta) / probe
        centred_resid = resid - resid.mean() if centered else resid
        u = gamma * centred_resid
        sigma = (u * u).sum() / (u * (norm(resid.unsqueeze(0))[0] - beta)).sum()

        # The unembedding direction W_U[t] (− W_U[f]), and its bias difference.
        zero_logits = unembed(resid.new_zeros(1, d_model))[0]   # b_U (0 if none)
        eye = resid.new_ones(d_model).diag()
        columns = [unembed(eye[start:start + _CHUNK])[:, picked] for start in range(0, d_model, _CHUNK)]
        w_u = torch.cat(columns) - zero_logits[picked]                 # [d_model, picked]
        direction = (w_u * sign).sum(-1)                               # [d_model]
        unembed_bias = (zero_logits[picked] * sign).sum()

        g = gamma * direction / sigma
        if centered:
            g = g - g.mean()        # ⟨c − μ(c), g⟩ = ⟨c, g − μ(g)⟩
        scores = {
            "embed": torch.stack(rows) @ g,
            "attn": torch.stack(attn_rows) @ g,
            "mlp": torch.stack(mlp_rows) @ g,
            "heads": torch.stack(head_rows) @ g,                       # [layers, heads]
            "attn_bias": torch.cat(bias_rows) @ g,
            "final_bias": (beta * direction).sum() + unembed_bias,
            "logit_diff": (unembed.output[0, -1, picked] * sign).sum(),
            "scale": sigma,
        }
        saved = {name: value.save() for name, value in scores.items()}

    values = {name: proxy.value.detach().float() for name, proxy in saved.items()}
    embeds = values.pop("embed")
    return DLAResult(
        tokens=[tokenizer.decode([t]) for t in ids],
        meta={"prompt": prompt, "centered_norm": centered},
        target=target_text, foil=foil_text, target_id=target_id, foil_id=foil_id,
        embed=embeds[0], pos_embed=embeds[1] if layout.positional is not None else None, **values)


def _probe_vector(size: int) -> torch.Tensor:
    """A vector of mean 0 and RMS 1 with no zero entry: ±1 alternating (shifted when `size` is odd)."""
    v = torch.ones(size)
    v[1::2] = -1
    v = v - v.mean()
    return v / v.pow(2).mean().sqrt()
