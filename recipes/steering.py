"""Steering: a difference-of-means direction (ActAdd / CAA style), and generation with and without it.

`steering_vector(model, positive, negative, layer)` is the mean residual stream (the decoder layer's
output) at one position over the positive prompts minus that over the negative prompts, all prompts
batched into one forward pass of one request. `generate(model, prompt, steer={layer: vector})` adds
the vectors while generating and returns the steered and the unsteered continuation side by side,
both generated in one request (a session holding two generates).
"""

from __future__ import annotations

import itertools
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ._arch import envoy_at, layout_of
from ._result import RecipeResult
from .inputs import token_labels

__all__ = ["SteeredGeneration", "steering_vector", "generate"]

POSITIONS = ("all", "last")


def layer_envoy(model: Any, layer: int | str) -> Any:
    """The decoder layer `layer` (an index into the model's layers) or the module at a dotted path."""
    if isinstance(layer, str):
        return envoy_at(model, layer)
    layout = layout_of(model)
    return layout.at(model, layout.layers)[int(layer)]


def negative_index(position: int, length: int, prompt: Any = None) -> int:
    """`position` of a prompt of `length` tokens as an index from the end (prompts are left-padded in a
    batch, so only indices from the end mean the same token in every row)."""
    index = position - length if position >= 0 else position
    if not -length <= index < 0:
        raise IndexError(f"position {position} is outside {prompt!r} ({length} tokens)")
    return index


def steering_vector(model: Any, positive_prompts: Sequence[str], negative_prompts: Sequence[str],
                    layer: int | str, position: int = -1) -> torch.Tensor:
    """mean(h_layer[position] over positive prompts) − mean(h_layer[position] over negative prompts).

    `layer`: a decoder layer index (its output is the residual stream after that layer) or any
    module's dotted path. `position`: a token position of each prompt (negative from its end; a
    non-negative one counts from each prompt's own first token, whatever the padding). Every prompt
    is an invoke of one trace: one request, one batched forward pass (stopped after `layer`); only
    the [d_model] difference comes back.
    """
    if not positive_prompts or not negative_prompts:
        raise ValueError("steering_vector needs at least one positive and one negative prompt")
    tokenizer = model.tokenizer
    envoy = layer_envoy(model, layer)

    with model.trace() as tracer:
        sums = []
        for prompts in (positive_prompts, negative_prompts):
            total = None
            for prompt in prompts:
                index = negative_index(position, len(tokenizer(prompt)["input_ids"]), prompt)
                with tracer.invoke(prompt):
                    h = envoy.output[0, index]
                total = h if total is None else total + h
            sums.append(total)
        vector = (sums[0] / len(positive_prompts) - sums[1] / len(negative_prompts)).save()
    return vector.value.detach()


@dataclass
class SteeredGeneration(RecipeResult):
    """One prompt continued twice, greedily: with the steering vectors added and without.

    `*_ids` hold the generated tokens only (1-D); `prompt_ids` the prompt's. `tokens` labels the
    prompt's tokens; `steered_tokens` / `unsteered_tokens` the generated ones.
    """

    prompt: str = ""
    steered_text: str = ""
    unsteered_text: str = ""
    prompt_ids: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    steered_ids: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    unsteered_ids: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    steered_tokens: list[str] = field(default_factory=list)
    unsteered_tokens: list[str] = field(default_factory=list)

    @property
    def first_difference(self) -> int | None:
        """The first generation step whose token differs between the two runs (None: identical)."""
        for step, (a, b) in enumerate(itertools.zip_longest(self.steered_ids.tolist(),
                                                            self.unsteered_ids.tolist())):
            if a != b:
                return step
        return None

    def __str__(self, width: int = 44) -> str:
        left = textwrap.wrap(self.steered_text, width) or [""]
        right = textwrap.wrap(self.unsteered_text, width) or [""]
        lines = [f"prompt: {self.prompt!r}    steering: {self.meta.get('steer_desc', '')}",
                 f"{'steered':<{width}} | unsteered", f"{'-' * width}-+-{'-' * width}"]
        lines += [f"{a:<{width}} | {b}" for a, b in itertools.zip_longest(left, right, fillvalue="")]
        return "\n".join(lines)

    def _draw(self, plt: Any, **kwargs: Any) -> Any:
        """A text figure: the generated tokens step by step, steered beside unsteered; steps whose
        tokens differ are in red."""
        steps = max(len(self.steered_tokens), len(self.unsteered_tokens))
        figure, axes = plt.subplots(figsize=(9, 1.2 + 0.28 * (steps + 1)))
        axes.axis("off")
        axes.set_xlim(0, 1)
        axes.set_ylim(steps + 1, -1.5)
        axes.text(0.0, -1, f"prompt: {self.prompt!r}", fontsize=9, family="monospace", va="center")
        axes.text(0.08, 0, "steered", fontsize=9, weight="bold", va="center")
        axes.text(0.55, 0, "unsteered", fontsize=9, weight="bold", va="center")
        pairs = itertools.zip_longest(self.steered_tokens, self.unsteered_tokens, fillvalue="")
        for step, (a, b) in enumerate(pairs, start=1):
            colour = "tab:red" if a != b else "black"
            axes.text(0.0, step, f"{step - 1:>3}", fontsize=8, family="monospace", va="center", color="grey")
            axes.text(0.08, step, repr(a), fontsize=8, family="monospace", va="center", color=colour)
            axes.text(0.55, step, repr(b), fontsize=8, family="monospace", va="center", color=colour)
        axes.set_title(f"steering {self.meta.get('steer_desc', '')}", fontsize=9)
        return figure


def generate(model: Any, prompt: str, steer: dict[int | str, torch.Tensor], *, max_new_tokens: int = 20,
             positions: str = "all", **generation_kwargs: Any) -> SteeredGeneration:
    """Continue `prompt` with `steer` ({layer: vector}, vectors already scaled) added, and without it.

    `positions="all"`: the vector is added at every position the layer outputs, at every step (the
    whole prompt at step 0, then each new token, as the KV cache makes later steps one position
    long); `"last"`: only at the last position of each step (the prompt's last token, then each new
    token). Both generations (greedy unless `generation_kwargs` say otherwise) are two generates of
    one session: one request, no values in between leave the server.
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, not {positions!r}")
    if not steer:
        raise ValueError("steer is empty: give {layer: vector}")
    envoys = [(layer_envoy(model, layer), torch.as_tensor(vector)) for layer, vector in steer.items()]
    tokenizer = model.tokenizer
    with model.session():
        with model.generate(prompt, max_new_tokens=max_new_tokens, **generation_kwargs) as tracer:
            for _ in tracer.all():
                for envoy, vector in envoys:
                    if positions == "all":
                        envoy.output[:, :] += vector
                    else:
                        envoy.output[:, -1] += vector
            steered = tracer.result.save()
        with model.generate(prompt, max_new_tokens=max_new_tokens, **generation_kwargs) as tracer:
            unsteered = tracer.result.save()
    prompt_ids = tokenizer(prompt)["input_ids"]
    n = len(prompt_ids)
    steered_ids, unsteered_ids = steered.value[0, n:].detach(), unsteered.value[0, n:].detach()
    described = ", ".join(f"layer {layer}: |v| = {float(torch.as_tensor(v).float().norm()):.3g}"
                          for layer, v in steer.items())
    return SteeredGeneration(
        tokens=token_labels(tokenizer, prompt_ids),
        meta={"prompt": prompt, "layers": list(steer), "max_new_tokens": max_new_tokens, "positions": positions,
              "steer_desc": f"{described} ({positions} positions)", **generation_kwargs},
        prompt=prompt,
        steered_text=tokenizer.decode(steered_ids.tolist()),
        unsteered_text=tokenizer.decode(unsteered_ids.tolist()),
        prompt_ids=torch.tensor(prompt_ids),
        steered_ids=steered_ids,
        unsteered_ids=unsteered_ids,
        steered_tokens=token_labels(tokenizer, steered_ids.tolist()),
        unsteered_tokens=token_labels(tokenizer, unsteered_ids.tolist()),
    )
