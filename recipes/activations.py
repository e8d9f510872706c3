"""Collecting activations at module points for many prompts: batched requests, a progress bar.

`collect_activations(model, prompts, ["model.layers.10", "model.layers.10.mlp.input"])` runs the
prompts `batch_size` at a time, each batch one request holding one invoke per prompt (one left-padded
forward pass, stopped after the last module read), and keeps two requests in flight so that the
server works on the next batch while the client takes in the last one. What comes back per batch is
only the chosen positions, stacked on the server into one tensor per point.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ._result import RecipeResult, heatmap
from .steering import layer_envoy, negative_index

__all__ = ["CollectedActivations", "collect_activations", "parse_point"]

_POINTS = ("output", "input")


def parse_point(point: str) -> tuple[str, str]:
    """"model.layers.10" -> ("model.layers.10", "output"); "….mlp.input" -> ("….mlp", "input")."""
    path, _, last = point.rpartition(".")
    if last in _POINTS and path:
        return path, last
    return point, "output"


@dataclass
class CollectedActivations(RecipeResult):
    """`activations[point]`: [n_prompts, d] for one position, [n_prompts, n_positions, d] for several.

    Indexable like a dict: `result["model.layers.10"]`. `prompts` are the inputs, in order.
    """

    activations: dict[str, torch.Tensor] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)

    def __getitem__(self, point: str) -> torch.Tensor:
        return self.activations[point]

    def __iter__(self) -> Any:
        return iter(self.activations)

    def __len__(self) -> int:
        return len(self.activations)

    def keys(self) -> Any:
        return self.activations.keys()

    def items(self) -> Any:
        return self.activations.items()

    def _draw(self, plt: Any, point: str | None = None, **kwargs: Any) -> Any:
        """Cosine similarity between the prompts' activations at `point` (default: the first)."""
        point = point or next(iter(self.activations))
        x = self.activations[point].float()
        x = x.reshape(x.shape[0], -1)
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        labels = [p if len(p) <= 30 else p[:27] + "..." for p in self.prompts]
        return heatmap(plt, x @ x.T, title=f"cosine similarity of activations at {point}",
                       xlabels=labels, ylabels=labels)


def collect_activations(model: Any, prompts: Sequence[str], points: str | Iterable[str],
                        positions: int | Sequence[int] = -1, batch_size: int = 16, *,
                        progress: bool = True) -> CollectedActivations:
    """Activations of `prompts` at module `points`, at token `positions`, `batch_size` prompts a request.

    A point is a module path (`named_modules()` names, e.g. "model.layers.10" or
    "model.layers.10.mlp"), optionally ending in ".output" (the default) or ".input" (the module's
    first positional input). `positions`: one int (-> [n_prompts, d]) or a sequence of ints
    (-> [n_prompts, len(positions), d]); negative ones count from each prompt's last token, others
    from each prompt's first token (batches are left-padded, so -1 is every prompt's last token).
    A tqdm bar counts the batches (`progress=False` hides it).
    """
    from tqdm.auto import tqdm

    prompts = list(prompts)
    points = [points] if isinstance(points, str) else list(points)
    if not prompts or not points:
        raise ValueError("collect_activations needs at least one prompt and one point")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    several = not isinstance(positions, int)
    wanted = list(positions) if several else [positions]
    if not wanted:
        raise ValueError("positions is empty")
    hooks = {point: (layer_envoy(model, path), which) for point in points for path, which in [parse_point(point)]}
    tokenizer = model.tokenizer
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    indices = [[negative_index(p, n, prompt) for p in wanted] for prompt, n in zip(prompts, lengths, strict=True)]

    def submit(start: int) -> tuple[Any, dict[str, Any]]:
        rows: dict[str, list[Any]] = {point: [] for point in points}
        with model.trace(blocking=False) as tracer:
            for prompt, index in zip(prompts[start:start + batch_size], indices[start:start + batch_size],
                                     strict=True):
                with tracer.invoke(prompt):
                    for point, (envoy, which) in hooks.items():
                        value = getattr(envoy, which)
                        if several:
                            rows[point].append(torch.stack([value[0, i] for i in index]))
                        else:
                            rows[point].append(value[0, index[0]])
            saved = {point: torch.stack(values).save() for point, values in rows.items()}
        return tracer.job, saved

    starts = list(range(0, len(prompts), batch_size))
    parts: dict[str, list[torch.Tensor]] = {point: [] for point in points}
    bar = tqdm(total=len(starts), desc="collect_activations", unit="batch", disable=not progress)
    pending: list[tuple[Any, dict[str, Any]]] = []
    try:
        pending.append(submit(starts[0]))
        for k in range(len(starts)):
            if k + 1 < len(starts):  # the next batch queues on the server while this one finishes
                pending.append(submit(starts[k + 1]))
            job, saved = pending.pop(0)
            job.wait()
            for point, value in saved.items():
                parts[point].append(value.value.detach())
            bar.update(1)
    except BaseException:
        for job, _ in pending:  # do not leave queued batches running for nobody
            job.cancel()
        raise
    finally:
        bar.close()
    return CollectedActivations(
        tokens=[],
        meta={"points": points, "positions": positions, "batch_size": batch_size, "n_prompts": len(prompts)},
        activations={point: torch.cat(values) for point, values in parts.items()},
        prompts=prompts,
    )
