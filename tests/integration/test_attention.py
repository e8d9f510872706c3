"""Hook points inside attention (`<attn>.attn_probs`, `<attn>.head_out`) through a real server and client.

References run on local copies of the same weights, fed the same token ids with the same call
(`model(ids, use_cache=False)`): `tiny_local` / `smol_local` keep the model's own sdpa attention (and
are not instrumented); `tiny_eager` / `smol_eager` are third copies switched to eager attention, whose
`output_attentions` are the probabilities to match. Reading `attn_probs` makes the server compute
every layer's attention eagerly, so such a trace matches the eager copy bit for bit; otherwise the
server delegates to sdpa and matches the sdpa copy bit for bit. Every comparison is exact.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import farscope

PROMPT = "When Mary and John went to the store, John gave a drink to"
CASES = ("llama", "gpt2", "gpt_neox", "smollm2")
LAYERS = {"llama": "model.layers", "gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers", "smollm2": "model.layers"}
ATTENTION = {"llama": "self_attn", "gpt2": "attn", "gpt_neox": "attention", "smollm2": "self_attn"}
PROJECTION = {"llama": "o_proj", "gpt2": "c_proj", "gpt_neox": "dense", "smollm2": "o_proj"}


@dataclass
class Case:
    name: str
    remote: farscope.RemoteModel
    local: nn.Module  # sdpa, as loaded
    eager: nn.Module
    tokenizer: Any
    layer: int  # the layer whose attention is patched / ablated
    head: int

    @property
    def config(self) -> Any:
        return self.local.config

    @property
    def heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.config.hidden_size // self.heads

    @property
    def layers(self) -> int:
        return self.config.num_hidden_layers

    def attn(self, i: int) -> str:
        return f"{LAYERS[self.name]}.{i}.{ATTENTION[self.name]}"

    def proj(self, i: int) -> str:
        return f"{self.attn(i)}.{PROJECTION[self.name]}"

    def ids(self, text: str = PROMPT) -> torch.Tensor:
        return torch.tensor([self.tokenizer(text)["input_ids"]])


@pytest.fixture(params=CASES)
def case(request: pytest.FixtureRequest) -> Case:
    name = request.param
    if name == "smollm2":
        model, tokenizer = request.getfixturevalue("smol_local")
        return Case(name, request.getfixturevalue("smol"), model, request.getfixturevalue("smol_eager"), tokenizer,
                    5, 2)
    return Case(name, request.getfixturevalue("tiny_remote")[name], request.getfixturevalue("tiny_local")[name],
                request.getfixturevalue("tiny_eager")[name], request.getfixturevalue("tiny_tokenizer"), 1, 2)


def at(root: Any, path: str) -> Any:
    """The envoy (or local module) at a dotted `named_modules()` path."""
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def run(model: nn.Module, ids: torch.Tensor, *, read: tuple[str, ...] = (),
        pre: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
        post: dict[str, Callable[[torch.Tensor], Any]] | None = None,
        attentions: bool = False) -> tuple[dict[str, Any], Any]:
    """Plain PyTorch: `model(ids, use_cache=False)` with hooks.

    `read`: module outputs to keep; `pre`: {path: fn(first input) -> new first input};
    `post`: {path: fn(output) -> new output}. Returns (reads, the model's output).
    """
    modules = dict(model.named_modules())
    reads: dict[str, Any] = {}
    handles = []
    for path, fn in (pre or {}).items():
        def first_input(module, args, kwargs, fn=fn):
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            first = next(iter(kwargs))  # e.g. Llama's attention gets `hidden_states=` by keyword
            return args, {**kwargs, first: fn(kwargs[first])}
        handles.append(modules[path].register_forward_pre_hook(first_input, with_kwargs=True))
    for path, fn in (post or {}).items():
        handles.append(modules[path].register_forward_hook(lambda m, a, o, fn=fn: fn(o)))
    for path in read:
        handles.append(modules[path].register_forward_hook(
            lambda m, a, o, path=path: reads.__setitem__(path, o)))
    try:
        with torch.no_grad():
            out = model(ids, use_cache=False, **({"output_attentions": True} if attentions else {}))
    finally:
        for handle in handles:
            handle.remove()
    return reads, out


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, where: str) -> None:
    assert isinstance(actual, torch.Tensor), f"{where}: got {type(actual).__name__}"
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=lambda m: f"{where}: {m}")


# -- reading -----------------------------------------------------------------------------------


def test_attn_probs_equal_eager_output_attentions_in_every_layer(case: Case):
    m = case.remote
    with m.trace(PROMPT):
        probs = [at(m, case.attn(i)).attn_probs.output.save() for i in range(case.layers)]
        logits = m.lm_head.output.save()
    _, expected = run(case.eager, case.ids(), attentions=True)
    seq = case.ids().shape[1]
    assert len(expected.attentions) == case.layers
    for i, (p, e) in enumerate(zip(probs, expected.attentions, strict=True)):
        assert p.value.shape == (1, case.heads, seq, seq)
        assert torch.equal(p.value, e), f"layer {i}: attn_probs differ from output_attentions"
    # Reading probabilities made the whole forward pass eager: the logits are the eager copy's too.
    assert_equal(logits.value, expected.logits, "logits")
    assert torch.allclose(probs[0].value.sum(-1), torch.ones(1, case.heads, seq))


def test_one_layers_attn_probs_make_every_layer_eager(case: Case):
    m = case.remote
    with m.trace(PROMPT):
        p = at(m, case.attn(case.layer)).attn_probs.output[:, case.head].save()
        logits = m.lm_head.output.save()
    _, eager = run(case.eager, case.ids(), attentions=True)
    _, sdpa = run(case.local, case.ids())
    assert torch.equal(p.value, eager.attentions[case.layer][:, case.head])
    assert_equal(logits.value, eager.logits, "logits")
    assert not torch.equal(eager.logits, sdpa.logits)  # so the comparison above tells them apart


def test_head_out_is_per_head_and_projects_to_the_attention_output(case: Case):
    """`head_out` [batch, seq, heads, head_dim], reshaped and projected, is the attention's output.

    Reading it leaves the server on sdpa: everything equals the (uninstrumented) sdpa copy.
    """
    m = case.remote
    attn = case.attn(case.layer)
    with m.trace(PROMPT):
        heads = at(m, attn).head_out.output.save()
        out = at(m, attn).output[0].save()
        logits = m.lm_head.output.save()
    seq = case.ids().shape[1]
    assert heads.value.shape == (1, seq, case.heads, case.head_dim)
    reads, sdpa = run(case.local, case.ids(), read=(attn,))
    assert_equal(out.value, reads[attn][0], f"{attn} output")
    assert_equal(logits.value, sdpa.logits, "logits (sdpa)")
    projection = at(case.local, case.proj(case.layer))
    with torch.no_grad():
        projected = projection(heads.value.reshape(1, seq, -1))
    assert_equal(projected, out.value, f"{PROJECTION[case.name]}(head_out)")


def test_nothing_hooked_means_the_models_own_sdpa_numerics(case: Case):
    """Instrumentation changes nothing unless `attn_probs` is hooked; and hooking it leaves nothing."""
    m = case.remote
    path = f"{LAYERS[case.name]}.{case.layer}"

    def plain() -> tuple[torch.Tensor, torch.Tensor]:
        with m.trace(PROMPT):
            h = at(m, path).output.save()
            logits = m.lm_head.output.save()
        return h.value, logits.value

    reads, sdpa = run(case.local, case.ids(), read=(path,))
    before = plain()
    with m.trace(PROMPT):
        at(m, case.attn(0)).attn_probs.output.save()
        eager_logits = m.lm_head.output.save()
    after = plain()
    for name, (h, logits) in {"before": before, "after": after}.items():
        assert_equal(h, reads[path], f"{path} output ({name} an attn_probs trace)")
        assert_equal(logits, sdpa.logits, f"logits ({name} an attn_probs trace)")
    assert not torch.equal(eager_logits.value, sdpa.logits)


def test_print_shows_the_attention_hook_points(case: Case):
    text = str(case.remote)
    assert "attn_probs" in text and "head_out" in text
    attn = at(case.remote, case.attn(0))
    assert attn.attn_probs.path == f"{case.attn(0)}.attn_probs"
    assert attn.head_out.path == f"{case.attn(0)}.head_out"


# -- editing -----------------------------------------------------------------------------------


def test_zero_ablating_a_head_via_head_out(case: Case):
    """Equals zeroing that head's slice of the output projection's input (a pre-hook)."""
    m = case.remote
    attn, h, d = case.attn(case.layer), case.head, case.head_dim
    with m.trace(PROMPT):
        at(m, attn).head_out.output[:, :, h] = 0
        heads = at(m, attn).head_out.output.save()
        logits = m.lm_head.output.save()

    def ablate(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[..., h * d:(h + 1) * d] = 0
        return x
    _, expected = run(case.local, case.ids(), pre={case.proj(case.layer): ablate})
    _, plain = run(case.local, case.ids())
    assert not heads.value[:, :, h].any() and heads.value[:, :, h + 1].any()
    assert_equal(logits.value, expected.logits, "logits with the head ablated")
    assert not torch.equal(logits.value, plain.logits)


def _values(case: Case, hidden: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """The layer's value vectors [batch, seq, heads, head_dim] (kv heads repeated), from its input."""
    b, s = hidden.shape[:2]
    d = case.head_dim
    if case.name == "gpt2":
        v = layer.c_attn(hidden).split(case.config.hidden_size, dim=2)[2].view(b, s, -1, d)
    elif case.name == "gpt_neox":
        v = layer.query_key_value(hidden).view(b, s, -1, 3 * d)[..., 2 * d:]
    else:
        v = layer.v_proj(hidden).view(b, s, -1, d)
    return v.repeat_interleave(case.heads // v.shape[2], dim=2)


def test_patching_a_heads_attention_pattern(case: Case):
    """Make one head attend only to position 0; compare with an eager reference computed locally.

    With the pattern one-hot on key 0, that head's output at every query is exactly the value vector
    at position 0 (1 * v0 plus exact zeros). The reference runs the eager copy (the server runs every
    layer eagerly once probabilities are hooked) and puts v0 into that head's slice of the output
    projection's input.
    """
    m = case.remote
    attn, h, d = case.attn(case.layer), case.head, case.head_dim
    seq = case.ids().shape[1]
    pattern = torch.zeros(seq, seq)
    pattern[:, 0] = 1
    with m.trace(PROMPT):
        probs = at(m, attn).attn_probs.output
        original = probs[:, h].clone().save()
        renormalized = probs[:, h] * pattern
        probs[:, h] = renormalized / renormalized.sum(-1, keepdim=True)
        patched = at(m, attn).attn_probs.output.save()
        heads = at(m, attn).head_out.output.save()
        logits = m.lm_head.output.save()

    captured: dict[str, torch.Tensor] = {}
    eager_attn = at(case.eager, attn)

    def keep_input(hidden: torch.Tensor) -> torch.Tensor:
        captured["v"] = _values(case, hidden, eager_attn)
        return hidden

    def put_v0(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[..., h * d:(h + 1) * d] = captured["v"][:, 0:1, h]
        return x
    _, expected = run(case.eager, case.ids(), pre={attn: keep_input, case.proj(case.layer): put_v0})
    reads, plain = run(case.eager, case.ids(), read=(f"{attn}.{PROJECTION[case.name]}",), attentions=True)

    assert torch.equal(original.value, plain.attentions[case.layer][:, h])
    assert torch.equal(patched.value[:, h], pattern.expand(1, seq, seq))
    others = [i for i in range(case.heads) if i != h]
    assert torch.equal(patched.value[:, others], plain.attentions[case.layer][:, others])
    assert torch.equal(heads.value[:, :, h], captured["v"][:, 0:1, h].expand(1, seq, d))
    assert_equal(logits.value, expected.logits, "logits with the pattern patched")
    assert not torch.equal(logits.value, plain.logits)


def test_attn_probs_in_a_left_padded_batch_are_each_invokes_rows(case: Case):
    """Two prompts of different lengths: the shorter is left-padded, with its mask and position ids."""
    m = case.remote
    short = "The quick brown fox"
    with m.trace() as tracer:
        with tracer.invoke(PROMPT):
            p_long = at(m, case.attn(case.layer)).attn_probs.output.save()
        with tracer.invoke(short):
            p_short = at(m, case.attn(case.layer)).attn_probs.output.save()
            logits = m.lm_head.output.save()
    rows = [case.tokenizer(t)["input_ids"] for t in (PROMPT, short)]
    length, pad = len(rows[0]), case.tokenizer.pad_token_id
    assert len(rows[1]) < length
    ids = torch.tensor([[pad] * (length - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    kwargs = {"attention_mask": mask, "use_cache": False, "output_attentions": True}
    if "position_ids" in inspect.signature(case.eager.forward).parameters:  # as the server does
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = case.eager(ids, **kwargs)
    assert_equal(p_long.value, expected.attentions[case.layer][0:1], "the unpadded row's probabilities")
    assert_equal(p_short.value, expected.attentions[case.layer][1:2], "the padded row's probabilities")
    start = length - len(rows[1])
    assert not p_short.value[..., start:, :start].any()  # real tokens never attend to the pads
    assert_equal(logits.value, expected.logits[1:2], "the padded row's logits")
