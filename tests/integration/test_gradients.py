"""Gradients in a trace (`.backward()`, `.grad`, assigning `.grad`) through a real server and client.

Each gradient is compared with `torch.autograd.grad` on a second, local copy of the same weights
(`tiny_local` / `smol_local`, sdpa attention like the server when no `attn_probs` is hooked): forward
hooks keep the activation the server reads (made to require grad if it does not already; the local
weights are trainable, so activations usually do) and the reference is its gradient, for the same
token ids and the same call (`model(ids, use_cache=False)`). Only gradients with respect to
activations are taken, so the server's frozen weights change nothing computed: the backward runs the
same float32 kernels in the same order, and every comparison is exact (`torch.equal`); no tolerance.
Gradients of `attn_probs` are compared with an eager copy's `output_attentions` tensors.

The prompt is the IOI one; the differentiated value is logit[' Mary'] - logit[' John'] at the last
position. On the tiny models (two layers) "early" and "late" are layers 0 and 1; on smollm2, 4 and 8,
and the single layer read is layer 5.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import farscope

PROMPT = "When Mary and John went to the store, John gave a drink to"
OTHER = "When Mary and John went to the store, Mary gave a drink to"  # the same length (no padding)

LAYERS = {"llama": "model.layers", "gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers",
          "smollm2": "model.layers"}
CASES = ("llama", "gpt2", "gpt_neox", "smollm2")


@dataclass
class Case:
    name: str
    remote: farscope.RemoteModel
    local: nn.Module
    tokenizer: Any
    layers: str
    read: int  # the single layer whose output's gradient is read
    early: int
    late: int

    def layer(self, i: int) -> str:
        return f"{self.layers}.{i}"

    def ids(self, *texts: str) -> torch.Tensor:
        return torch.tensor([self.tokenizer(t)["input_ids"] for t in texts])

    def token(self, word: str) -> int:
        ids = self.tokenizer(word)["input_ids"]
        assert len(ids) == 1, f"{word!r} is {len(ids)} tokens for {self.name}"
        return ids[0]


@pytest.fixture(params=CASES)
def case(request: pytest.FixtureRequest) -> Case:
    name = request.param
    if name == "smollm2":
        model, tokenizer = request.getfixturevalue("smol_local")
        return Case(name, request.getfixturevalue("smol"), model, tokenizer, LAYERS[name], 5, 4, 8)
    remote = request.getfixturevalue("tiny_remote")[name]
    local = request.getfixturevalue("tiny_local")[name]
    tokenizer = request.getfixturevalue("tiny_tokenizer")
    return Case(name, remote, local, tokenizer, LAYERS[name], 0, 0, 1)


def at(root: Any, path: str) -> Any:
    """The envoy (or local module) at a dotted `named_modules()` path."""
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def logit_diff(case: Case) -> Callable[[Any], Any]:
    mary, john = case.token(" Mary"), case.token(" John")

    def diff(logits: Any, row: int = 0) -> Any:
        return logits[row, -1, mary] - logits[row, -1, john]
    return diff


def reference(model: nn.Module, ids: torch.Tensor, loss: Callable[[torch.Tensor], torch.Tensor], *,
              outputs: tuple[str, ...] = (), inputs: tuple[str, ...] = (),
              replace: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
              grad_hooks: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
              extra: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None,
              ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Plain PyTorch: `torch.autograd.grad` of `loss(logits)` w.r.t. hooked activations.

    `outputs` / `inputs`: module outputs / first inputs to differentiate with respect to (keys
    `path` / `path:input`); `replace`: {path: fn(output) -> new output}, the new output kept as
    `path:replaced`; `grad_hooks`: {path: fn(grad) -> grad}, a tensor hook on that module's output;
    `extra(logits)`: more intermediate tensors (computed from the logits) to differentiate w.r.t.
    Returns (gradients, loss value).
    """
    modules = dict(model.named_modules())
    kept: dict[str, torch.Tensor] = {}
    handles = []

    def grad_enabled(t: torch.Tensor) -> torch.Tensor:
        return t if t.requires_grad else t.detach().requires_grad_()

    for path in inputs:
        def pre(module, args, kwargs, path=path):
            if args:
                kept[f"{path}:input"] = x = grad_enabled(args[0])
                return (x, *args[1:]), kwargs
            first = next(iter(kwargs))
            kept[f"{path}:input"] = x = grad_enabled(kwargs[first])
            return args, {**kwargs, first: x}
        handles.append(modules[path].register_forward_pre_hook(pre, with_kwargs=True))
    for path, fn in (replace or {}).items():
        def swap(module, args, output, path=path, fn=fn):
            kept[f"{path}:replaced"] = new = fn(output)
            return new
        handles.append(modules[path].register_forward_hook(swap))
    for path in {*outputs, *(grad_hooks or {})}:
        def post(module, args, output, path=path):
            kept[path] = out = grad_enabled(output)
            if path in (grad_hooks or {}):
                out.register_hook(grad_hooks[path])
            return out
        handles.append(modules[path].register_forward_hook(post))
    try:
        with torch.enable_grad():
            logits = model(ids, use_cache=False).logits
            kept.update(extra(logits) if extra else {})
            value = loss(logits)
            wanted = [k for k in kept if k not in (grad_hooks or {}) or k in outputs]
            grads = torch.autograd.grad(value, [kept[k] for k in wanted])
    finally:
        for handle in handles:
            handle.remove()
    return dict(zip(wanted, grads, strict=True)), value.detach()


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, where: str) -> None:
    assert isinstance(actual, torch.Tensor), f"{where}: got {type(actual).__name__}"
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=lambda m: f"{where}: {m}")


def server_model(case: Case, request: pytest.FixtureRequest) -> nn.Module:
    server = request.getfixturevalue("smol_server" if case.name == "smollm2" else "tiny_server")
    return server.engine.replicas[case.remote.name].model


# -- reading gradients -------------------------------------------------------------------------


def test_grad_of_a_layer_output(case: Case):
    m, diff = case.remote, logit_diff(case)
    path = case.layer(case.read)
    with m.trace(PROMPT):
        h = at(m, path).output
        d = diff(m.lm_head.output)
        with d.backward():
            g = h.grad.save()
        d.save()
    grads, ref_diff = reference(case.local, case.ids(PROMPT), diff, outputs=(path,))
    assert_equal(d.value, ref_diff, "diff")
    assert g.value.shape == (1, len(case.tokenizer(PROMPT)["input_ids"]), case.local.config.hidden_size)
    assert_equal(g.value, grads[path], f"{path}.output.grad")
    assert g.value.abs().sum() > 0


def test_grad_of_a_module_input(case: Case):
    m, diff = case.remote, logit_diff(case)
    mlp = f"{case.layer(case.read)}.mlp"
    with m.trace(PROMPT):
        x = at(m, mlp).input
        d = diff(m.lm_head.output)
        d.backward()
        g = x.grad.save()
    grads, _ = reference(case.local, case.ids(PROMPT), diff, inputs=(mlp,))
    assert_equal(g.value, grads[f"{mlp}:input"], f"{mlp}.input.grad")
    assert g.value.abs().sum() > 0


def test_grad_of_intermediate_computed_values(case: Case):
    """An activation computed in the graph and written back, and a value computed from the logits."""
    m = case.remote
    mary, john = case.token(" Mary"), case.token(" John")
    mlp = f"{case.layer(case.read)}.mlp"
    with m.trace(PROMPT):
        scaled = at(m, mlp).output * 1.5
        at(m, mlp).output = scaled
        logprobs = m.lm_head.output[0, -1].log_softmax(-1)
        d = logprobs[mary] - logprobs[john]
        d.backward()
        g_scaled = scaled.grad.save()
        g_logprobs = logprobs.grad.save()
        d.save()

    kept: dict[str, torch.Tensor] = {}

    def logprobs_of(logits: torch.Tensor) -> dict[str, torch.Tensor]:
        kept["logprobs"] = logits[0, -1].log_softmax(-1)
        return kept

    def loss(logits: torch.Tensor) -> torch.Tensor:
        return kept["logprobs"][mary] - kept["logprobs"][john]

    grads, ref_diff = reference(case.local, case.ids(PROMPT), loss, replace={mlp: lambda o: o * 1.5},
                                extra=logprobs_of)
    assert_equal(d.value, ref_diff, "diff")
    assert_equal(g_scaled.value, grads[f"{mlp}:replaced"], "(mlp.output * 1.5).grad")
    assert_equal(g_logprobs.value, grads["logprobs"], "log_softmax(logits).grad")
    expected = torch.zeros_like(g_logprobs.value)
    expected[mary], expected[john] = 1, -1
    assert torch.equal(g_logprobs.value, expected)


def test_grads_of_two_layers_at_once(case: Case):
    m, diff = case.remote, logit_diff(case)
    early, late = case.layer(case.early), case.layer(case.late)
    with m.trace(PROMPT):
        h_early = at(m, early).output
        h_late = at(m, late).output
        d = diff(m.lm_head.output)
        with d.backward():
            g_late = h_late.grad.save()
            g_early = h_early.grad.save()
    grads, _ = reference(case.local, case.ids(PROMPT), diff, outputs=(early, late))
    assert_equal(g_early.value, grads[early], f"{early}.output.grad")
    assert_equal(g_late.value, grads[late], f"{late}.output.grad")
    assert not torch.equal(g_early.value, g_late.value)


ATTENTION = {"llama": "self_attn", "gpt2": "attn", "gpt_neox": "attention", "smollm2": "self_attn"}
PROJECTION = {"llama": "o_proj", "gpt2": "c_proj", "gpt_neox": "dense", "smollm2": "o_proj"}


def test_grads_of_the_attention_hook_points(case: Case, request: pytest.FixtureRequest):
    """`.grad` of `attn_probs` (eager attention) and of `head_out` (sdpa), as autograd computes them.

    References: the probabilities an eager copy returns as `output_attentions` are the very tensors
    that weight the values, so autograd differentiates with respect to them; `head_out` is the output
    projection's input, split into heads.
    """
    m, diff = case.remote, logit_diff(case)
    attn = f"{case.layer(case.read)}.{ATTENTION[case.name]}"
    with m.trace(PROMPT):
        probs = at(m, attn).attn_probs.output
        d = diff(m.lm_head.output)
        d.backward()
        g_probs = probs.grad.save()
    with m.trace(PROMPT):
        heads = at(m, attn).head_out.output
        d = diff(m.lm_head.output)
        d.backward()
        g_heads = heads.grad.save()

    if case.name == "smollm2":
        eager = request.getfixturevalue("smol_eager")
    else:
        eager = request.getfixturevalue("tiny_eager")[case.name]
    with torch.enable_grad():
        out = eager(case.ids(PROMPT), use_cache=False, output_attentions=True)
        (expected_probs,) = torch.autograd.grad(diff(out.logits), out.attentions[case.read])
    assert_equal(g_probs.value, expected_probs, f"{attn}.attn_probs.output.grad")
    assert g_probs.value.any()

    grads, _ = reference(case.local, case.ids(PROMPT), diff, inputs=(f"{attn}.{PROJECTION[case.name]}",))
    expected_heads = grads[f"{attn}.{PROJECTION[case.name]}:input"].view(g_heads.value.shape)
    assert g_heads.value.shape[2] == case.local.config.num_attention_heads
    assert_equal(g_heads.value, expected_heads, f"{attn}.head_out.output.grad")


# -- writing gradients -------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["layer", "mlp"])
def test_assigning_a_grad_changes_earlier_grads_like_a_tensor_hook(case: Case, where: str):
    """Zero the gradient of the late layer's output (or of its MLP's output); read the early layer's."""
    m, diff = case.remote, logit_diff(case)
    early = case.layer(case.early)
    late = case.layer(case.late) + (".mlp" if where == "mlp" else "")
    with m.trace(PROMPT):
        h_early = at(m, early).output
        h_late = at(m, late).output
        d = diff(m.lm_head.output)
        with d.backward():
            g_late = h_late.grad.save()
            h_late.grad = h_late.grad * 0
            g_early = h_early.grad.save()
    grads, _ = reference(case.local, case.ids(PROMPT), diff, outputs=(early, late),
                         grad_hooks={late: lambda grad: grad * 0})
    plain, _ = reference(case.local, case.ids(PROMPT), diff, outputs=(early,))
    # `.grad` read before the assignment is the gradient arriving there, unchanged.
    assert_equal(g_late.value, grads[late], f"{late}.output.grad")
    assert g_late.value.any()
    assert_equal(g_early.value, grads[early], f"{early}.output.grad after zeroing {late}'s")
    assert not torch.equal(g_early.value, plain[early])
    if where == "layer":  # every path from the early layer to the logits runs through the late layer
        assert not g_early.value.any()
    else:  # the residual stream still carries a gradient around the MLP
        assert g_early.value.any()


# -- batches -----------------------------------------------------------------------------------


def test_two_invokes_each_grad_is_its_rows(case: Case):
    m, diff = case.remote, logit_diff(case)
    path = case.layer(case.read)
    ids = case.ids(PROMPT, OTHER)
    assert ids.shape[0] == 2  # same length: one unpadded batch
    with m.trace() as tracer:
        with tracer.invoke(PROMPT):
            h0 = at(m, path).output
            d0 = diff(m.lm_head.output)
        with tracer.invoke(OTHER):
            h1 = at(m, path).output
            d1 = diff(m.lm_head.output)
            total = d0 + 2 * d1
            total.backward()
            g0, g1 = h0.grad.save(), h1.grad.save()
    grads, _ = reference(case.local, ids, lambda lg: diff(lg, 0) + 2 * diff(lg, 1), outputs=(path,))
    assert g0.value.shape == g1.value.shape == (1, *grads[path].shape[1:])
    assert_equal(g0.value, grads[path][0:1], "invoke 0's grad")
    assert_equal(g1.value, grads[path][1:2], "invoke 1's grad")


def test_two_invokes_each_with_its_own_backward(case: Case):
    """Each invoke backpropagates its own value; `.grad` inside `with d.backward():` belongs to it."""
    m, diff = case.remote, logit_diff(case)
    path = case.layer(case.read)
    ids = case.ids(PROMPT, OTHER)
    with m.trace() as tracer:
        with tracer.invoke(PROMPT):
            h0 = at(m, path).output
            d0 = diff(m.lm_head.output)
            with d0.backward(retain_graph=True):
                g0 = h0.grad.save()
        with tracer.invoke(OTHER):
            h1 = at(m, path).output
            d1 = diff(m.lm_head.output)
            with d1.backward():
                g1 = h1.grad.save()
    ref0, _ = reference(case.local, ids, lambda lg: diff(lg, 0), outputs=(path,))
    ref1, _ = reference(case.local, ids, lambda lg: diff(lg, 1), outputs=(path,))
    assert_equal(g0.value, ref0[path][0:1], "invoke 0's grad of its own backward")
    assert_equal(g1.value, ref1[path][1:2], "invoke 1's grad of its own backward")


# -- errors and isolation ------------------------------------------------------------------------


def test_backward_of_a_value_without_activations_is_a_clear_error(case: Case):
    m = case.remote
    with pytest.raises(farscope.RemoteError, match="backward") as caught:
        with m.trace(PROMPT):
            picked = m.lm_head.output.argmax(-1).float().sum()
            picked.backward()
    assert "depend" in str(caught.value) or "activations" in str(caught.value)
    assert "picked.backward()" in str(caught.value)  # points at the user's line


def test_grad_of_token_ids_is_a_clear_error(case: Case):
    m = case.remote
    embed = "model.embed_tokens" if case.layers == "model.layers" else (
        "transformer.wte" if case.name == "gpt2" else "gpt_neox.embed_in")
    with pytest.raises(farscope.RemoteError, match="floating-point"):
        with m.trace(PROMPT):
            ids = at(m, embed).input
            d = m.lm_head.output[0, -1].sum()
            d.backward()
            ids.grad.save()


def test_gradients_leave_no_trace_on_the_server(case: Case, request: pytest.FixtureRequest):
    """Weights get no `.grad` and stay frozen; no hooks are left; a plain trace gives the same bits."""
    m, diff = case.remote, logit_diff(case)
    path = case.layer(case.read)

    def plain() -> tuple[torch.Tensor, torch.Tensor]:
        with m.trace(PROMPT):
            h = at(m, path).output.save()
            logits = m.lm_head.output.save()
        assert not h.value.requires_grad and not logits.value.requires_grad
        return h.value, logits.value

    before = plain()
    with m.trace(PROMPT):
        h = at(m, path).output
        at(m, f"{path}.mlp").output = at(m, f"{path}.mlp").output * 1  # a write in a gradient trace too
        d = diff(m.lm_head.output)
        with d.backward():
            g = h.grad.save()
            h.grad = h.grad * 2
    assert g.value.any()
    with pytest.raises(farscope.RemoteError):  # a failing gradient request leaves nothing either
        with m.trace(PROMPT):
            m.lm_head.output.argmax(-1).float().sum().backward()
    after = plain()
    assert_equal(after[0], before[0], f"{path}.output after gradient requests")
    assert_equal(after[1], before[1], "logits after gradient requests")

    served = server_model(case, request)
    assert all(not p.requires_grad for p in served.parameters())
    assert all(p.grad is None for p in served.parameters())
    for name, module in served.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, f"hooks left on {name!r}"
        assert not module._backward_hooks, f"backward hooks left on {name!r}"
