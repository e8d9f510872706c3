"""Activation patching and attribution patching (AtP), built only on the public client API.

`activation_patching` runs one batch row per patched (layer, position[, head]): each patch is one
invoke of a batched trace, the value it patches in flows from a source invoke of the same trace (or
of the first trace of the same session), and the metric is computed on the server from each
invoke's logits; only the metric values come back. Forward passes hold at most `batch_size` rows and
a request (a session) holds at most `passes_per_request` of them, so a 30-layer x 14-position sweep
(420 patched runs) is one request of seven batched forward passes.

`attribution_patching` estimates the same sweep to first order from one request: a clean and a
corrupted invoke batched in one forward pass, and one backward pass from the base run's metric.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ._arch import Layout, d_model_of, layout_of, n_heads_of
from ._result import RecipeResult, heatmap

__all__ = ["PatchingResult", "activation_patching", "attribution_patching"]

COMPONENTS = ("resid", "attn", "mlp", "head")
KINDS = ("resample", "mean", "zero", "noise")
SETUPS = ("denoising", "noising")

Metric = Callable[[Any], Any]


@dataclass(repr=False)
class PatchingResult(RecipeResult):
    """The outcome of a patching sweep.

    `values` is [layers, positions] ([layers, positions, heads] for component "head"):
    - activation patching: the metric of each patched run;
    - attribution patching: the estimated change of the metric that patching would cause (AtP).
    `effect` is the change of the metric relative to the unpatched base run in both cases (the base
    run is the corrupted run when denoising, the clean run when noising), so the two compare directly.
    `clean_metric` / `corrupted_metric` are the metric of the unpatched runs (`corrupted_metric` is
    None for zero and mean ablation, which have no corrupted run). `tokens` are the clean prompt's
    tokens, `corrupted_tokens` the corrupted prompt's; `layers`, `positions`, `heads` label the axes.
    """

    values: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    clean_metric: float = math.nan
    corrupted_metric: float | None = None
    corrupted_tokens: list[str] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    heads: list[int] | None = None
    component: str = "resid"
    kind: str = "resample"
    setup: str = "denoising"
    method: str = "activation"  # or "attribution"

    def __repr__(self) -> str:
        corrupted = "none" if self.corrupted_metric is None else f"{self.corrupted_metric:.4g}"
        return (f"PatchingResult({self.method} patching, {self.component}, {self.kind}, {self.setup}: values "
                f"{list(self.values.shape)}, clean metric {self.clean_metric:.4g}, corrupted metric {corrupted})")

    @property
    def baseline(self) -> float:
        """The metric of the unpatched base run (corrupted when denoising, clean when noising)."""
        if self.setup == "denoising":
            return math.nan if self.corrupted_metric is None else self.corrupted_metric
        return self.clean_metric

    @property
    def effect(self) -> torch.Tensor:
        """The (estimated) change of the metric caused by each patch, relative to the base run."""
        return self.values - self.baseline if self.method == "activation" else self.values

    def normalized(self) -> torch.Tensor:
        """(patched metric - corrupted) / (clean - corrupted): 1 = clean behaviour, 0 = corrupted."""
        if self.corrupted_metric is None:
            raise ValueError(f"kind={self.kind!r} has no corrupted run to normalize against")
        patched = self.values if self.method == "activation" else self.baseline + self.values
        return (patched - self.corrupted_metric) / (self.clean_metric - self.corrupted_metric)

    @property
    def labels(self) -> list[str]:
        """A label per patched position: its index and token ('clean/corrupted' where they differ)."""
        out = []
        for p in self.positions:
            token = self.tokens[p] if p < len(self.tokens) else "?"
            other = self.corrupted_tokens[p] if p < len(self.corrupted_tokens) else token
            out.append(f"{p}:{token}" if other == token else f"{p}:{token}/{other}")
        return out

    def top_positions(self) -> list[int]:
        """For each layer, the position whose patch changes the metric most (largest |effect|;
        for heads, the largest |effect| of any head at that position)."""
        effect = self.effect.abs()
        if effect.dim() == 3:
            effect = effect.amax(-1)
        return [self.positions[i] for i in effect.argmax(-1).tolist()]

    def _draw(self, plt: Any, position: int | None = None, normalized: bool = False, **_: Any) -> Any:
        values = self.normalized() if normalized else self.effect
        what = "normalized metric" if normalized else "change of the metric"
        method = "attribution patching (AtP)" if self.method == "attribution" else "activation patching"
        title = f"{method}: {self.component}, {self.kind}, {self.setup} — {what}"
        ylabels = [f"L{i}" for i in self.layers]
        if self.component != "head":
            return heatmap(plt, values, title=title, xlabels=self.labels, ylabels=ylabels,
                           xlabel="position", ylabel="layer", center=not normalized)
        if position is None and len(self.positions) == 1:
            position = self.positions[0]
        if position is not None:
            column = self.positions.index(position if position >= 0 else len(self.tokens) + position)
            panel, where = values[:, column], f" at {self.labels[column]}"
        else:
            panel, where = values.sum(1), " (summed over positions)"
        return heatmap(plt, panel, title=title + where, xlabels=[f"H{h}" for h in self.heads or []],
                       ylabels=ylabels, xlabel="head", ylabel="layer", center=not normalized)


# -- the model's shape ---------------------------------------------------------------------------


def _ids(model: Any, prompt: Any) -> list[int]:
    if isinstance(prompt, str):
        return list(model.tokenizer(prompt)["input_ids"])
    if isinstance(prompt, torch.Tensor):
        return [int(t) for t in prompt.reshape(-1).tolist()]
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    raise TypeError(f"a prompt is a string or a sequence of token ids, not {type(prompt).__name__}")


def _token_labels(model: Any, ids: list[int]) -> list[str]:
    return [model.tokenizer.decode([t]) for t in ids]


def _indices(what: str, chosen: Sequence[int] | None, size: int) -> list[int]:
    if chosen is None:
        return list(range(size))
    out = []
    for i in chosen:
        j = int(i) + size if int(i) < 0 else int(i)
        if not 0 <= j < size:
            raise ValueError(f"{what} {i} is out of range: there are {size}")
        out.append(j)
    if len(set(out)) != len(out):
        raise ValueError(f"{what}s repeat: {list(chosen)}")
    return out


def _check(component: str, kind: str | None = None, setup: str | None = None) -> None:
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {', '.join(COMPONENTS)}; got {component!r}")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    if setup is not None and setup not in SETUPS:
        raise ValueError(f"setup must be one of {', '.join(SETUPS)}; got {setup!r}")


def _same_length(clean: list[int], other: list[int], what: str, model: Any) -> None:
    if len(other) != len(clean):
        raise ValueError(
            f"{what} is {len(other)} tokens and the clean prompt {len(clean)}: patching lines positions up "
            f"one to one, so they must tokenize to the same length (clean: {_token_labels(model, clean)}; "
            f"{what}: {_token_labels(model, other)})")


# -- hook points, by component -------------------------------------------------------------------


def _read(model: Any, layout: Layout, component: str, layer: int, *, for_grad: bool = False) -> Any:
    """The component's activation at `layer` in the current invoke: [1, pos, d_model] or, for heads,
    [1, pos, heads, head_dim]. A view of the model's value: assigning into it patches the run."""
    if component == "resid":
        return layout.at(model, layout.layers)[layer].output
    if component == "mlp":
        return layout.at(model, layout.mlp, layer).output
    if component == "head":
        return layout.at(model, layout.attn, layer).head_out.output
    if for_grad:
        # The output projection's output is the attention module's output (its last operation;
        # dropout is off at inference). It is a tensor read straight from a hook point, so its
        # gradient can be taken for one invoke's rows of a batch; the attention module returns a tuple.
        return layout.at(model, layout.out_proj, layer).output
    return layout.at(model, layout.attn, layer).output[0]


# -- activation patching -------------------------------------------------------------------------


def activation_patching(model: Any, clean: Any, corrupted: Any, metric: Metric, component: str = "resid",
                        kind: str = "resample", setup: str | None = None, positions: Sequence[int] | None = None,
                        dataset: Sequence[Any] | None = None, noise_std: float | None = None, seed: int = 0, *,
                        layers: Sequence[int] | None = None, noise_positions: Sequence[int] | None = None,
                        batch_size: int = 64, passes_per_request: int = 8) -> PatchingResult:
    """Patch each (layer, position) — and each head for component "head" — one at a time; measure `metric`.

    `metric(logits)` is written with proxies: `logits` is the run's `lm_head` output [1, pos, vocab]
    (e.g. `lambda logits: logits[0, -1, mary] - logits[0, -1, john]`) and must return a scalar.

    component: "resid" (a decoder layer's output), "attn" / "mlp" (those modules' outputs, what they
    add to the residual stream), "head" (one head's slice of `head_out`, before the output projection).

    setup: "denoising" runs the corrupted input and patches in the clean activation; "noising" runs the
    clean input and patches in the corrupted activation. The default is denoising for resample and noise,
    noising for zero and mean (ablations of the clean run: they have no corrupted run to denoise).

    kind: what the corrupted activation is.
    - "resample": the activation on the `corrupted` prompt (same token length as `clean`);
    - "mean": its mean over `dataset` (prompts with the same token length as `clean`), position by position;
    - "zero": zero;
    - "noise": the activation on the clean prompt with Gaussian noise added to the token embeddings,
      ROME-style (pass `corrupted=None`): noise = scale * N(0, 1) drawn by
      `torch.randn(1, pos, d_model, generator=torch.Generator().manual_seed(seed))`, zero outside
      `noise_positions` (default: every position), scale = `noise_std` or 3x the standard deviation of
      the clean prompt's token embeddings (computed on the server).

    `positions` and `layers` (default: all; negative positions count from the end) choose what to patch.
    Each patch is its own batch row: forward passes of at most `batch_size` rows, at most
    `passes_per_request` of them in one request (a session).
    """
    _check(component, kind, setup)
    if setup is None:
        setup = "noising" if kind in ("zero", "mean") else "denoising"
    if kind in ("zero", "mean") and setup == "denoising":
        raise ValueError(f"kind={kind!r} ablates the clean run (setup='noising'): there is no corrupted run "
                         "to patch clean activations into")
    if batch_size < 4 or passes_per_request < 1:
        raise ValueError("batch_size must be at least 4 and passes_per_request at least 1")
    layout = layout_of(model)
    clean_ids = _ids(model, clean)
    n = len(clean_ids)
    corrupted_ids: list[int] | None = None
    rows: list[list[int]] = []
    if kind == "resample":
        if corrupted is None:
            raise ValueError("kind='resample' patches from the corrupted prompt: pass one")
        corrupted_ids = _ids(model, corrupted)
        _same_length(clean_ids, corrupted_ids, "the corrupted prompt", model)
    elif corrupted is not None:
        raise ValueError(f"kind={kind!r} makes its own corrupted activations; pass corrupted=None")
    if kind == "mean":
        if not dataset:
            raise ValueError("kind='mean' averages activations over `dataset`: pass a list of prompts")
        rows = [_ids(model, prompt) for prompt in dataset]
        for i, ids in enumerate(rows):
            _same_length(clean_ids, ids, f"dataset prompt {i}", model)
    elif dataset is not None:
        raise ValueError("`dataset` is used only by kind='mean'")
    if noise_std is not None and kind != "noise":
        raise ValueError("`noise_std` is used only by kind='noise'")
    unit_noise = None
    if kind == "noise":
        generator = torch.Generator().manual_seed(seed)
        unit_noise = torch.randn(1, n, d_model_of(model), generator=generator)
        if noise_positions is not None:
            keep = torch.zeros(n, dtype=torch.bool)
            keep[_indices("noise position", noise_positions, n)] = True
            unit_noise[:, ~keep] = 0
    elif noise_positions is not None:
        raise ValueError("`noise_positions` is used only by kind='noise'")

    layer_list = _indices("layer", layers, layout.n_layers(model))
    position_list = _indices("position", positions, n)
    heads = list(range(n_heads_of(model))) if component == "head" else None
    patches = [(layer, p, h) for layer in layer_list for p in position_list for h in (heads or [None])]

    plan = _Plan(model, layout, component, kind, setup, metric, clean_ids, corrupted_ids, rows, unit_noise,
                 noise_std, layer_list)
    per_request = batch_size * passes_per_request
    results: list[torch.Tensor] = []
    first_metrics: tuple[Any, Any] | None = None
    start = 0
    while start < len(patches):
        stop = min(start + per_request - plan.extra_rows, len(patches))
        outcome, metrics = plan.request(patches[start:stop], batch_size, with_metrics=first_metrics is None)
        results.append(outcome)
        if first_metrics is None:
            first_metrics = metrics
        start = stop
    if first_metrics is None:  # nothing to patch: still measure the unpatched runs
        _, first_metrics = plan.request([], batch_size, with_metrics=True)

    values = torch.cat(results) if results else torch.empty(0)
    shape = [len(layer_list), len(position_list)] + ([len(heads)] if heads is not None else [])
    clean_metric, corrupted_metric = first_metrics
    return PatchingResult(
        tokens=_token_labels(model, clean_ids),
        corrupted_tokens=_token_labels(model, corrupted_ids) if corrupted_ids is not None else [],
        meta={"recipe": "activation_patching", "component": component, "kind": kind, "setup": setup,
              "seed": seed, "noise_std": noise_std, "batch_size": batch_size,
              "passes_per_request": passes_per_request, "forward_rows": len(patches)},
        values=values.reshape(shape), clean_metric=float(clean_metric.value),
        corrupted_metric=None if corrupted_metric is None else float(corrupted_metric.value),
        layers=layer_list, positions=position_list, heads=heads, component=component, kind=kind, setup=setup,
        method="activation")


class _Plan:
    """How to build the requests of one activation-patching sweep."""

    def __init__(self, model: Any, layout: Layout, component: str, kind: str, setup: str, metric: Metric,
                 clean_ids: list[int], corrupted_ids: list[int] | None, dataset_rows: list[list[int]],
                 unit_noise: torch.Tensor | None, noise_std: float | None, layers: list[int]) -> None:
        self.model, self.layout, self.component, self.kind, self.setup = model, layout, component, kind, setup
        self.metric = metric
        self.clean_ids, self.corrupted_ids, self.dataset_rows = clean_ids, corrupted_ids, dataset_rows
        self.unit_noise, self.noise_std = unit_noise, noise_std
        self.layers = layers
        # Rows every request spends on unpatched runs: the clean run, the corrupted run (resample,
        # noise), the dataset (mean).
        self.extra_rows = 1 + (kind in ("resample", "noise")) + len(dataset_rows)
        self.base_noised = kind == "noise" and setup == "denoising"

    def _invoke(self, tracer: Any, ids: list[int] | list[list[int]]) -> Any:
        return tracer.invoke(torch.tensor(ids if ids and isinstance(ids[0], list) else [ids]))

    def _noise(self, delta: Any) -> None:
        embed = self.layout.at(self.model, self.layout.embed)
        embed.output = embed.output + delta

    def _sources(self, tracer: Any, with_metrics: bool) -> tuple[dict[int, Any] | None, Any, Any, Any]:
        """The unpatched runs, first in the trace: returns (source activations by layer or None for zero
        ablation, the noise to add to the embeddings, the clean metric, the corrupted metric)."""
        model, layout = self.model, self.layout
        sources: dict[int, Any] | None = None
        delta = None
        clean_metric = corrupted_metric = None
        with self._invoke(tracer, self.clean_ids):
            if self.kind == "noise":
                embedding = layout.at(model, layout.embed).output
                # A value of the graph either way, so the noise travels once and every noised run uses it.
                scale = 3 * embedding.std() if self.noise_std is None else embedding.new_full((), float(self.noise_std))
                delta = scale * self.unit_noise
            if self.setup == "denoising":
                sources = {i: _read(model, layout, self.component, i) for i in self.layers}
            if with_metrics:
                clean_metric = self.metric(layout.at(model, layout.unembed).output).save()
        if self.kind in ("resample", "noise"):
            with self._invoke(tracer, self.corrupted_ids if self.kind == "resample" else self.clean_ids):
                if self.kind == "noise":
                    self._noise(delta)
                if self.setup == "noising":
                    sources = {i: _read(model, layout, self.component, i) for i in self.layers}
                if with_metrics:
                    corrupted_metric = self.metric(layout.at(model, layout.unembed).output).save()
        if self.kind == "mean":
            with self._invoke(tracer, self.dataset_rows):
                sources = {i: _read(model, layout, self.component, i).mean(0, keepdim=True) for i in self.layers}
        return sources, delta, clean_metric, corrupted_metric

    def request(self, patches: list[tuple[int, int, int | None]], batch_size: int,
                with_metrics: bool) -> tuple[torch.Tensor, tuple[Any, Any]]:
        """One request (a session): the unpatched runs, then every patch as its own invoke."""
        model, layout = self.model, self.layout
        base_ids = self.corrupted_ids if self.setup == "denoising" and self.kind == "resample" else self.clean_ids
        outputs: list[Any] = []
        metrics: tuple[Any, Any] = (None, None)
        with model.session():
            done = 0
            first = True
            while first or done < len(patches):
                room = batch_size - self.extra_rows if first else batch_size
                chunk = patches[done:done + max(room, 1)]
                with model.trace() as tracer:
                    if first:
                        sources, delta, *metrics = self._sources(tracer, with_metrics)
                        first = False
                    measured = []
                    for layer, position, head in chunk:
                        with self._invoke(tracer, base_ids):
                            if self.base_noised:
                                self._noise(delta)
                            where = (slice(None), position) if head is None else (slice(None), position, head)
                            activation = _read(model, layout, self.component, layer)
                            activation[where] = 0.0 if sources is None else sources[layer][where]
                            measured.append(self.metric(layout.at(model, layout.unembed).output))
                    if measured:
                        outputs.append(torch.stack(measured).save())
                done += len(chunk)
        values = torch.cat([o.value.reshape(-1) for o in outputs]) if outputs else torch.empty(0)
        if values.numel() != len(patches):
            raise ValueError(f"the metric must return one number per run; got {values.numel()} for "
                             f"{len(patches)} runs")
        return values, metrics


# -- attribution patching ------------------------------------------------------------------------


def attribution_patching(model: Any, clean: Any, corrupted: Any, metric: Metric, component: str = "resid",
                         setup: str = "denoising", positions: Sequence[int] | None = None, *,
                         layers: Sequence[int] | None = None) -> PatchingResult:
    """AtP: the first-order estimate of `activation_patching(..., kind="resample")` for every
    layer x position (x head), from one request: the clean and the corrupted prompt in one batched
    forward pass, and one backward pass from the base run's metric.

    Denoising: grad of the metric on the corrupted run x (clean - corrupted activation); noising: grad on
    the clean run x (corrupted - clean activation); the product summed over d_model (over head_dim for
    heads). `values` (= `effect`) estimate the change of the metric each patch would cause.
    """
    _check(component, setup=setup)
    layout = layout_of(model)
    clean_ids, corrupted_ids = _ids(model, clean), _ids(model, corrupted)
    _same_length(clean_ids, corrupted_ids, "the corrupted prompt", model)
    n = len(clean_ids)
    layer_list = _indices("layer", layers, layout.n_layers(model))
    position_list = _indices("position", positions, n)
    heads = list(range(n_heads_of(model))) if component == "head" else None
    unembed = layout.at(model, layout.unembed)

    with model.trace() as tracer:
        with tracer.invoke(torch.tensor([clean_ids])):
            clean_acts = [_read(model, layout, component, i, for_grad=True) for i in layer_list]
            clean_metric = metric(unembed.output).save()
        with tracer.invoke(torch.tensor([corrupted_ids])):
            corrupted_acts = [_read(model, layout, component, i, for_grad=True) for i in layer_list]
            corrupted_metric = metric(unembed.output).save()
        if setup == "denoising":
            base, base_acts, source_acts = corrupted_metric, corrupted_acts, clean_acts
        else:
            base, base_acts, source_acts = clean_metric, clean_acts, corrupted_acts
        differences = [source - act for source, act in zip(source_acts, base_acts, strict=True)]
        base.backward()
        scores = torch.stack([(act.grad * difference).sum(-1)[0]
                              for act, difference in zip(base_acts, differences, strict=True)]).save()

    values = scores.value[:, position_list]
    return PatchingResult(
        tokens=_token_labels(model, clean_ids), corrupted_tokens=_token_labels(model, corrupted_ids),
        meta={"recipe": "attribution_patching", "component": component, "setup": setup},
        values=values, clean_metric=float(clean_metric.value), corrupted_metric=float(corrupted_metric.value),
        layers=layer_list, positions=position_list, heads=heads, component=component, kind="resample",
        setup=setup, method="attribution")
