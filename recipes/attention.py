"""Attention patterns, and scores that find induction, previous-token and duplicate-token heads.

    from farscope.recipes import attention_patterns, head_scores
    pats = attention_patterns(model, "When Mary and John went to the store, John gave a drink to", layers=[3, 4])
    pats.patterns                          # [layers, heads, query, key]
    scores = head_scores(model, kind="induction")
    scores.top(5)                          # [((layer, head), score), ...]

Both read `<attn>.attn_probs` (which makes the server run every layer's attention eagerly, so the
probabilities are exactly the model's `output_attentions`) and reduce them on the server: one request,
one forward pass.

`head_scores` runs on `batch` sequences, each `seq_len` random tokens (distinct within a sequence,
special tokens excluded, drawn with `torch.Generator().manual_seed(seed)`) repeated twice, after the
tokenizer's BOS token when it has one (`prepend_bos`). With the first copy at positions s..s+n-1 and
the second at s+n..s+2n-1 (n = seq_len, s = 1 with BOS, else 0), a head's score is the mean over the
batch and the query positions below of the attention weight on one key:

  * induction: each query in the second copy (q = s+n+j, j = 0..n-1) → the token right after that
    token's earlier occurrence (k = s+j+1);
  * duplicate_token: each query in the second copy → that token's earlier occurrence (k = s+j);
  * previous_token: every query that has a previous position (q = 1..s+2n-1) → k = q-1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ._arch import layout_of, n_heads_of
from ._result import RecipeResult, heatmap

__all__ = ["AttentionPatternsResult", "HeadScoresResult", "attention_patterns", "head_scores", "KINDS"]

KINDS = ("induction", "previous_token", "duplicate_token")


@dataclass
class AttentionPatternsResult(RecipeResult):
    """`patterns` [layers, heads, query, key] of the chosen `layers` and `heads` (their indices)."""

    patterns: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, 0, 0))
    layers: list[int] = field(default_factory=list)
    heads: list[int] = field(default_factory=list)

    def _draw(self, plt: Any, **kwargs: Any) -> Any:
        """A grid of heatmaps, one per (layer, head); token labels when the grid is small."""
        rows, cols = len(self.layers), len(self.heads)
        size = kwargs.get("cell", 2.2 if rows * cols > 16 else 3.5)
        figure, axes = plt.subplots(rows, cols, figsize=(size * cols + 1, size * rows + 0.5), squeeze=False)
        labels = [repr(t)[1:-1] for t in self.tokens]
        show_labels = rows * cols <= 16 and len(labels) <= 40
        image = None
        for r, layer in enumerate(self.layers):
            for c, head in enumerate(self.heads):
                ax = axes[r][c]
                image = ax.imshow(self.patterns[r, c].float().numpy(), cmap="viridis", vmin=0, vmax=1)
                ax.set_title(f"L{layer} H{head}", fontsize=8)
                if show_labels:
                    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=5)
                    ax.set_yticks(range(len(labels)), labels, fontsize=5)
                else:
                    ax.set_xticks([])
                    ax.set_yticks([])
        if image is not None:
            figure.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
        figure.suptitle(kwargs.get("title", "attention patterns (rows: query, columns: key)"))
        return figure


@dataclass
class HeadScoresResult(RecipeResult):
    """`scores` [layers, heads]: each head's `kind` score (see the module docstring).

    `ids` [batch, positions] are the token ids it ran on; `tokens` label the first sequence.
    """

    kind: str = "induction"
    scores: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))
    ids: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.long))

    def top(self, n: int = 5) -> list[tuple[tuple[int, int], float]]:
        """The `n` highest-scoring heads: [((layer, head), score), ...]."""
        flat = self.scores.reshape(-1)
        order = flat.argsort(descending=True)[:n]
        width = self.scores.shape[1]
        return [((int(i) // width, int(i) % width), float(flat[i])) for i in order]

    def _draw(self, plt: Any, **kwargs: Any) -> Any:
        layers, heads = self.scores.shape
        annotations = [[f"{float(v):.2f}" for v in row] for row in self.scores] if layers * heads <= 400 else None
        return heatmap(plt, self.scores, title=kwargs.get("title", f"{self.kind} score per head"),
                       xlabels=[str(h) for h in range(heads)], ylabels=[f"L{i}" for i in range(layers)],
                       xlabel="head", ylabel="layer", center=False, annotations=annotations)


def _probs(model: Any, layout: Any, layer: int) -> Any:
    return layout.at(model, layout.attn, layer).attn_probs.output


def attention_patterns(model: Any, prompt: str, layers: list[int] | None = None,
                       heads: list[int] | None = None) -> AttentionPatternsResult:
    """The attention weights [layers, heads, query, key] of `prompt` (all layers / heads by default)."""
    layout = layout_of(model)
    layers = list(range(layout.n_layers(model))) if layers is None else [int(i) for i in layers]
    all_heads = n_heads_of(model)
    heads = list(range(all_heads)) if heads is None else [int(h) for h in heads]
    tokenizer = model.tokenizer
    ids = tokenizer(prompt)["input_ids"]
    with model.trace(prompt):
        chosen = []
        for layer in layers:
            probs = _probs(model, layout, layer)[0]                 # [heads, query, key]
            chosen.append(probs if heads == list(range(all_heads)) else probs[heads])
        patterns = torch.stack(chosen).save()
    return AttentionPatternsResult(tokens=[tokenizer.decode([t]) for t in ids], meta={"prompt": prompt},
                                   patterns=patterns.value.float(), layers=layers, heads=heads)


def repeated_random_tokens(model: Any, seq_len: int = 50, batch: int = 4, seed: int = 0,
                           prepend_bos: bool = True) -> tuple[torch.Tensor, int]:
    """[batch, (1 +) 2·seq_len] ids: distinct random non-special tokens, repeated; and the offset s."""
    tokenizer = model.tokenizer
    vocab = min(len(tokenizer), int(model.config.vocab_size))
    special = set(tokenizer.all_special_ids)
    candidates = torch.tensor([i for i in range(vocab) if i not in special])
    if seq_len > len(candidates):
        raise ValueError(f"seq_len {seq_len} is more than the {len(candidates)} ordinary tokens of the vocabulary")
    generator = torch.Generator().manual_seed(seed)
    random = torch.stack([candidates[torch.randperm(len(candidates), generator=generator)[:seq_len]]
                          for _ in range(batch)])
    ids = torch.cat([random, random], dim=1)
    bos = tokenizer.bos_token_id if prepend_bos else None
    if bos is not None:
        ids = torch.cat([torch.full((batch, 1), bos), ids], dim=1)
    return ids, int(bos is not None)


def head_scores(model: Any, kind: str = "induction", seq_len: int = 50, batch: int = 4, seed: int = 0,
                prepend_bos: bool = True) -> HeadScoresResult:
    """[layers, heads] induction / previous-token / duplicate-token scores on repeated random tokens.

    One request: the `batch` sequences go through one forward pass and each layer's probabilities are
    reduced to their scores on the server.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    layout = layout_of(model)
    ids, s = repeated_random_tokens(model, seq_len, batch, seed, prepend_bos)
    n = seq_len
    # The score's (query, key) pairs lie on one diagonal q − k = lag: the slice [first, first + count)
    # of `diagonal(offset=-lag)`, whose element i is (q = i + lag, k = i).
    lag, first, count = {"induction": (n - 1, s + 1, n), "duplicate_token": (n, s, n),
                         "previous_token": (1, 0, s + 2 * n - 1)}[kind]
    with model.trace(ids):
        per_layer = []
        for layer in range(layout.n_layers(model)):
            stripe = _probs(model, layout, layer).diagonal(offset=-lag, dim1=-2, dim2=-1)  # [batch, heads, i]
            per_layer.append(stripe[:, :, first:first + count].float().mean(dim=(0, 2)))
        scores = torch.stack(per_layer).save()
    tokenizer = model.tokenizer
    return HeadScoresResult(tokens=[tokenizer.decode([t]) for t in ids[0].tolist()],
                            meta={"seq_len": seq_len, "batch": batch, "seed": seed, "prepend_bos": bool(s)},
                            kind=kind, scores=scores.value.float(), ids=ids)
