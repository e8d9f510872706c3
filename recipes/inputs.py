"""Input attribution: how much each prompt token's embedding matters to the next-token logit.

`input_attribution(model, prompt, target)` scores every prompt token for the target token's logit at
the last position (target − foil with a `foil`, the contrastive form), by gradient × input or by
integrated gradients, both taken on the input embeddings (the token embedding module's output,
[pos, d_model]) in a single request and a single forward/backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ._arch import layout_of
from ._result import RecipeResult, bars

__all__ = ["InputAttributionResult", "input_attribution"]

METHODS = ("gradient_x_input", "integrated_gradients")
AGGREGATIONS = ("l2", "dot")


@dataclass
class InputAttributionResult(RecipeResult):
    """Per-token scores for one prompt.

    - `scores` [pos]: the per-token score under `aggregation` ("l2": the L2 norm over d_model of
      the per-dimension attribution, always ≥ 0; "dot": its sum over d_model, signed — for gradient ×
      input that is the dot product ⟨grad, embedding⟩, for integrated gradients the token's share of
      metric(x) − metric(baseline)).
    - `attributions` [pos, d_model]: the per-dimension attribution (grad * input, or the integrated
      gradients), from which either aggregation can be recomputed (`aggregate("dot")`).
    - `metric`: the attributed value on the prompt: logit[target] (− logit[foil]) at the last position.
    - `baseline_metric`: integrated gradients only: that value with every token embedding zeroed.
    """

    scores: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    attributions: torch.Tensor = field(default_factory=lambda: torch.empty(0, 0))
    metric: float = float("nan")
    baseline_metric: float | None = None

    def aggregate(self, aggregation: str) -> torch.Tensor:
        """Per-token scores from `attributions`: "l2" (norm over d_model) or "dot" (sum over d_model)."""
        return _aggregate(self.attributions, aggregation)

    @property
    def completeness_error(self) -> float | None:
        """Integrated gradients: |Σ attributions − (metric − baseline_metric)|, the Riemann-sum error.

        Zero for exact integration (the completeness axiom); it shrinks as `steps` grows.
        """
        if self.baseline_metric is None:
            return None
        return abs(float(self.attributions.sum()) - (self.metric - self.baseline_metric))

    def _draw(self, plt: Any, **kwargs: Any) -> Any:
        meta = self.meta
        what = f"logit[{meta.get('target')!r}]"
        if meta.get("foil") is not None:
            what += f" − logit[{meta['foil']!r}]"
        title = f"{meta.get('method', '')} ({meta.get('aggregation', '')}) for {what} = {self.metric:.3f}"
        return bars(plt, self.scores, self.tokens, title=title, ylabel="attribution")

    def __str__(self) -> str:
        rows = [f"{token!r:>16} {score:+.4f}" for token, score in zip(self.tokens, self.scores.tolist(),
                                                                        strict=True)]
        return "\n".join([f"{self.meta.get('method')} ({self.meta.get('aggregation')}), "
                          f"metric {self.metric:+.4f}", *rows])


def input_attribution(model: Any, prompt: str, target: str | int, foil: str | int | None = None, *,
                      method: str = "gradient_x_input", steps: int = 32,
                      aggregation: str = "l2") -> InputAttributionResult:
    """Token-level attribution of the last position's logit of `target` (minus `foil`'s) to the prompt.

    `target` / `foil`: a string that is one token (e.g. " Paris") or a token id.

    - "gradient_x_input": e ⊙ ∂m/∂e at the embeddings e, one forward and one backward pass.
    - "integrated_gradients": (e − e′) ⊙ ∫₀¹ ∂m/∂e(e′ + α(e − e′)) dα with the all-zero baseline
      e′ = 0, integrated by the Riemann **midpoint** rule: α_k = (k + ½)/steps, k = 0 … steps−1. The
      `steps` interpolated copies of the prompt are invokes of one trace (each sets the embedding
      module's output to α_k·e), so they run as one batched forward pass; the summed metric gets one
      backward. Two more invokes in the same pass give m(e) and m(0) for the completeness check.
      Only the token embeddings are scaled: learned position embeddings (GPT-2's wpe) stay as they are.

    `aggregation`: "l2" or "dot" per token (see `InputAttributionResult`). Returns the result with
    decoded token labels; `.plot(path)` draws a bar chart over the tokens.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, not {aggregation!r}")
    if method == "integrated_gradients" and steps < 1:
        raise ValueError("integrated gradients need steps >= 1")
    layout = layout_of(model)
    tokenizer = model.tokenizer
    target_id = token_id(tokenizer, target)
    foil_id = None if foil is None else token_id(tokenizer, foil)
    embed = layout.at(model, layout.embed)
    norm = layout.at(model, layout.norm)
    unembed = layout.at(model, layout.unembed)

    def metric() -> Any:
        # The unembedding applied to the final norm's last position only (a module call): the same
        # logits as the model's own, without the [pos, vocab] logits of every invoke — their rows'
        # gradients would each be materialised at the whole batch's size in the backward pass — and
        # the forward pass stops after the final norm.
        logits = unembed(norm.output[:, -1])
        value = logits[0, target_id]
        return value if foil_id is None else value - logits[0, foil_id]

    baseline = None
    if method == "gradient_x_input":
        with model.trace(prompt):
            emb = embed.output
            value = metric()
            with value.backward():
                attributions = (emb * emb.grad)[0].save()
            value = value.save()
    else:
        alphas = [(k + 0.5) / steps for k in range(steps)]
        with model.trace() as tracer:
            scaled, metrics = [], []
            for alpha in alphas:
                with tracer.invoke(prompt):
                    point = embed.output * alpha
                    embed.output = point
                    scaled.append(point)
                    metrics.append(metric())
            with tracer.invoke(prompt):
                emb = embed.output
                value = metric().save()
            with tracer.invoke(prompt):
                embed.output = embed.output * 0.0
                baseline = metric().save()
                total = metrics[0]
                for m in metrics[1:]:
                    total = total + m
                # Rows are independent, so d(Σ_k m_k)/d(point_k) is each row's own gradient.
                with total.backward():
                    grads = scaled[0].grad
                    for p in scaled[1:]:
                        grads = grads + p.grad
                    attributions = (emb * (grads / steps))[0].save()
    attributions = attributions.value.detach()
    ids = tokenizer(prompt)["input_ids"]
    return InputAttributionResult(
        tokens=token_labels(tokenizer, ids),
        meta={"prompt": prompt, "target": target, "foil": foil, "target_id": target_id, "foil_id": foil_id,
              "method": method, "steps": steps if method == "integrated_gradients" else None,
              "aggregation": aggregation, "rule": "midpoint" if method == "integrated_gradients" else None},
        scores=_aggregate(attributions, aggregation),
        attributions=attributions,
        metric=float(value.value),
        baseline_metric=None if baseline is None else float(baseline.value),
    )


def _aggregate(attributions: torch.Tensor, aggregation: str) -> torch.Tensor:
    if aggregation == "l2":
        return attributions.norm(dim=-1)
    if aggregation == "dot":
        return attributions.sum(-1)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, not {aggregation!r}")


def token_id(tokenizer: Any, token: str | int) -> int:
    """The id of `token`: an int as is, a string that must encode to exactly one token."""
    if isinstance(token, int):
        return token
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{token!r} is {len(ids)} tokens ({ids}); pass a single token or a token id")
    return ids[0]


def token_labels(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token decoded on its own, for axis labels."""
    return [tokenizer.decode([i]) for i in ids]
