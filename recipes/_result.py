"""What every recipe returns: numbers as tensors, the labels that go with them, and a picture."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["RecipeResult", "heatmap", "bars"]


@dataclass
class RecipeResult:
    """A recipe's outcome. Subclasses add their own tensors and say how to draw them in `_draw`.

    `tokens` labels positions (decoded prompt tokens); `meta` records the arguments that produced it.
    """

    tokens: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def plot(self, path: str | Path, **kwargs: Any) -> Path:
        """Draw the result with matplotlib (headless) into a PNG at `path`; returns the path."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure = self._draw(plt, **kwargs)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(figure)
        return path

    def _draw(self, plt: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


def heatmap(plt: Any, values: torch.Tensor, *, title: str, xlabels: list[str] | None = None,
            ylabels: list[str] | None = None, xlabel: str = "", ylabel: str = "", center: bool = True,
            annotations: list[list[str]] | None = None) -> Any:
    """A [rows, columns] heatmap; diverging colours around 0 when `center`."""
    values = values.detach().float().cpu().numpy()
    rows, cols = values.shape
    figure, axes = plt.subplots(figsize=(max(6, 0.6 * cols + 2), max(4, 0.28 * rows + 1.5)))
    if center:
        bound = float(abs(values).max()) or 1.0
        image = axes.imshow(values, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    else:
        image = axes.imshow(values, cmap="viridis", aspect="auto")
    figure.colorbar(image, ax=axes)
    if xlabels is not None:
        axes.set_xticks(range(cols), xlabels, rotation=60, ha="right", fontsize=8)
    if ylabels is not None:
        axes.set_yticks(range(rows), ylabels, fontsize=7)
    if annotations is not None:
        for r in range(rows):
            for c in range(cols):
                axes.text(c, r, annotations[r][c], ha="center", va="center", fontsize=5)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    return figure


def bars(plt: Any, values: torch.Tensor, labels: list[str], *, title: str, ylabel: str = "") -> Any:
    values = values.detach().float().cpu().numpy()
    figure, axes = plt.subplots(figsize=(max(6, 0.25 * len(labels) + 2), 4))
    colours = ["tab:red" if v < 0 else "tab:blue" for v in values.tolist()]
    axes.bar(range(len(labels)), values, color=colours)
    axes.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.axhline(0, color="black", linewidth=0.5)
    return figure
