"""Where things are in each supported architecture: the module paths recipes hook, by role."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Layout", "layout_of"]


@dataclass(frozen=True)
class Layout:
    """Dotted module paths, `{i}` standing for a layer index."""

    embed: str          # token embedding (output: [batch, pos, d_model])
    layers: str         # the ModuleList of decoder layers
    attn: str           # layer i's attention (output: its contribution to the residual)
    mlp: str            # layer i's MLP (output: its contribution to the residual)
    out_proj: str       # layer i's attention output projection (input: per-head outputs, concatenated)
    norm: str           # the final norm
    unembed: str        # the unembedding (lm_head)
    positional: str | None = None   # learned position embedding, when the model has one (GPT-2)
    parallel: bool = False          # attention and MLP read the same residual (GPT-NeoX default)

    def at(self, model: Any, template: str, layer: int | None = None) -> Any:
        """The envoy at `template` (formatted with `layer`)."""
        node = model
        for part in template.format(i=layer).split("."):
            node = node[int(part)] if part.isdigit() else getattr(node, part)
        return node

    def n_layers(self, model: Any) -> int:
        return len(self.at(model, self.layers))


_LAYOUTS = {
    "LlamaForCausalLM": Layout(
        embed="model.embed_tokens", layers="model.layers", attn="model.layers.{i}.self_attn",
        mlp="model.layers.{i}.mlp", out_proj="model.layers.{i}.self_attn.o_proj", norm="model.norm",
        unembed="lm_head"),
    "GPT2LMHeadModel": Layout(
        embed="transformer.wte", layers="transformer.h", attn="transformer.h.{i}.attn",
        mlp="transformer.h.{i}.mlp", out_proj="transformer.h.{i}.attn.c_proj", norm="transformer.ln_f",
        unembed="lm_head", positional="transformer.wpe"),
    "GPTNeoXForCausalLM": Layout(
        embed="gpt_neox.embed_in", layers="gpt_neox.layers", attn="gpt_neox.layers.{i}.attention",
        mlp="gpt_neox.layers.{i}.mlp", out_proj="gpt_neox.layers.{i}.attention.dense",
        norm="gpt_neox.final_layer_norm", unembed="lm_head", parallel=True),
}


def layout_of(model: Any) -> Layout:
    """The layout of a `farscope.RemoteModel` (by its architecture's class name)."""
    try:
        layout = _LAYOUTS[model.architecture]
    except KeyError:
        raise NotImplementedError(f"recipes know {', '.join(_LAYOUTS)}; not {model.architecture}") from None
    if model.architecture == "GPTNeoXForCausalLM" and not getattr(model.config, "use_parallel_residual", True):
        layout = Layout(**{**layout.__dict__, "parallel": False})
    return layout
