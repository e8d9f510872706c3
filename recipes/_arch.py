"""What recipes know of each supported architecture, in one place: the module paths they hook, by
role, whether the final norm centres, and the sizes read off the model's config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Layout", "layout_of", "envoy_at", "config_value", "n_heads_of", "d_model_of"]


def envoy_at(model: Any, path: str) -> Any:
    """The envoy at dotted module path `path` ("model.layers.3.mlp"): attributes, and indices into
    module lists."""
    node = model
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


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
    centered: bool                  # the final norm subtracts the mean (LayerNorm), not only scales (RMSNorm)
    positional: str | None = None   # learned position embedding, when the model has one (GPT-2)
    parallel: bool = False          # attention and MLP read the same residual (GPT-NeoX default)

    def at(self, model: Any, template: str, layer: int | None = None) -> Any:
        """The envoy at `template` (formatted with `layer`)."""
        return envoy_at(model, template.format(i=layer))

    def n_layers(self, model: Any) -> int:
        return len(self.at(model, self.layers))


_LAYOUTS = {
    "LlamaForCausalLM": Layout(
        embed="model.embed_tokens", layers="model.layers", attn="model.layers.{i}.self_attn",
        mlp="model.layers.{i}.mlp", out_proj="model.layers.{i}.self_attn.o_proj", norm="model.norm",
        unembed="lm_head", centered=False),
    "GPT2LMHeadModel": Layout(
        embed="transformer.wte", layers="transformer.h", attn="transformer.h.{i}.attn",
        mlp="transformer.h.{i}.mlp", out_proj="transformer.h.{i}.attn.c_proj", norm="transformer.ln_f",
        unembed="lm_head", centered=True, positional="transformer.wpe"),
    "GPTNeoXForCausalLM": Layout(
        embed="gpt_neox.embed_in", layers="gpt_neox.layers", attn="gpt_neox.layers.{i}.attention",
        mlp="gpt_neox.layers.{i}.mlp", out_proj="gpt_neox.layers.{i}.attention.dense",
        norm="gpt_neox.final_layer_norm", unembed="lm_head", centered=True, parallel=True),
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


def config_value(model: Any, *names: str) -> int:
    """The first of `names` the model's config has (GPT-2's config says n_head / n_embd)."""
    config = model.config
    for name in names:
        if getattr(config, name, None) is not None:
            return int(getattr(config, name))
    raise AttributeError(f"the model's config has none of {', '.join(names)}")


def n_heads_of(model: Any) -> int:
    return config_value(model, "num_attention_heads", "n_head")


def d_model_of(model: Any) -> int:
    return config_value(model, "hidden_size", "n_embd", "d_model")
