"""The logit lens: what the residual stream after each layer would predict if the model stopped there.

    from farscope.recipes import logit_lens
    lens = logit_lens(model, "The Eiffel Tower is located in the city of", k=5)
    lens.top_tokens[-1][-1]           # the last layer's top-5 at the last position
    lens.plot("lens.png")

One trace: the residual stream after every layer is decoded on the server by calling the model's own
final norm and unembedding on it (`lm_head(norm(layer.output))`, module calls), softmaxed and reduced to
its top k; only the top-k ids and probabilities travel back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ._arch import layout_of
from ._result import RecipeResult, heatmap

__all__ = ["LogitLensResult", "logit_lens"]


@dataclass
class LogitLensResult(RecipeResult):
    """Top-k decodings of the residual stream after each layer, at each position.

    `token_ids` and `probs` are [layers, positions, k] (row `i`: after layer `i`; the last row is the
    model's own prediction); `top_tokens[layer][position]` the k decoded tokens; `tokens` the prompt's.
    """

    token_ids: torch.Tensor = field(default_factory=lambda: torch.empty(0, 0, 0, dtype=torch.long))
    probs: torch.Tensor = field(default_factory=lambda: torch.empty(0, 0, 0))
    top_tokens: list[list[list[str]]] = field(default_factory=list)

    @property
    def n_layers(self) -> int:
        return self.token_ids.shape[0]

    def top1(self, position: int = -1) -> list[str]:
        """The top-1 token after each layer at `position`."""
        return [row[position][0] for row in self.top_tokens]

    def _draw(self, plt: Any, **kwargs: Any) -> Any:
        annotations = [[_short(row[p][0]) for p in range(len(row))] for row in self.top_tokens]
        figure = heatmap(
            plt, self.probs[:, :, 0], title=kwargs.get("title", "logit lens: top-1 token and its probability"),
            xlabels=[repr(t)[1:-1] for t in self.tokens], ylabels=[f"L{i}" for i in range(self.n_layers)],
            xlabel="position", ylabel="residual stream after layer", center=False, annotations=annotations)
        return figure


def _short(token: str, width: int = 8) -> str:
    text = repr(token)[1:-1]
    return text if len(text) <= width else text[:width - 1] + "…"


def logit_lens(model: Any, prompt: str, k: int = 5) -> LogitLensResult:
    """Decode the residual stream after every layer through the final norm and the unembedding.

    For each layer `i` and position `p`: softmax(lm_head(norm(h_i[p]))), reduced to its top `k` ids
    and probabilities (computed in float32). One request, one forward pass.
    """
    layout = layout_of(model)
    tokenizer = model.tokenizer
    ids = tokenizer(prompt)["input_ids"]
    norm, unembed = layout.at(model, layout.norm), layout.at(model, layout.unembed)
    with model.trace(prompt):
        values, indices = [], []
        for i in range(layout.n_layers(model)):
            resid = layout.at(model, layout.layers)[i].output
            probs = torch.softmax(unembed(norm(resid))[0].float(), dim=-1)   # [positions, vocab]
            top = probs.topk(k, dim=-1)
            values.append(top.values)
            indices.append(top.indices)
        saved_probs = torch.stack(values).save()
        saved_ids = torch.stack(indices).save()
    token_ids = saved_ids.value.long()
    flat = [tokenizer.decode([int(t)]) for t in token_ids.reshape(-1).tolist()]
    n_layers, positions, _ = token_ids.shape
    top_tokens = [[flat[(i * positions + p) * k:(i * positions + p + 1) * k] for p in range(positions)]
                  for i in range(n_layers)]
    return LogitLensResult(tokens=[tokenizer.decode([t]) for t in ids], meta={"prompt": prompt, "k": k},
                           token_ids=token_ids, probs=saved_probs.value.float(), top_tokens=top_tokens)
