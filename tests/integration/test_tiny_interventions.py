"""Interventions on the tiny Llama, GPT-2 and GPT-NeoX models through a real server and client.

Every result is compared with plain PyTorch forward hooks on a second, local copy of the same
weights (`tiny_local`), fed the same token ids. The server runs a trace as `model(input_ids,
use_cache=False)` when its inputs need no padding; the references make the same call (the cache
flag changes nothing computed, only which objects appear in a layer's kwargs), so those results are
compared exactly. Prompts of different lengths are left-padded into one batch with an attention mask
and position ids: the longest prompt's row (no padding) is still exact, while a padded row is compared
with a tight tolerance (`PADDED`, below).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from references import LAYERS, at, ids_of, layer

from farscope.interventions.codec import Opaque

PROMPT = "When Mary and John went to the store"  # 9 tokens
SHORT = "The quick brown fox"  # 8 tokens
LONGER = "The Eiffel Tower is located in the city of"  # 13 tokens
CLEAN = "When Mary and John went to the store, John gave a drink to"  # 16 tokens
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"  # 16 tokens

HIDDEN = 64

# A left-padded row attends over a longer key sequence whose pad positions are masked out: they add
# exact zeros, but the softmax and attention-times-values reductions run over a different length (and
# so a different vectorized blocking), which rounds float32 sums differently from a solo run: about
# 2e-7 on logits of size ~1 here. Rows without padding are compared exactly.
PADDED = {"rtol": 1e-5, "atol": 1e-6}

_gen = torch.Generator().manual_seed(7)
VEC = torch.randn(HIDDEN, generator=_gen)
W = torch.randn(HIDDEN, HIDDEN, generator=_gen) / 8


# -- helpers -----------------------------------------------------------------------------------


def run_hooks(
    model,
    ids: torch.Tensor,
    *,
    read: tuple[str, ...] = (),
    read_inputs: tuple[str, ...] = (),
    edits: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Plain PyTorch: `model(ids, use_cache=False)` with forward hooks.

    `edits` maps a module path to fn(output) -> new output (applied before that module's reads);
    `read` keeps module outputs, `read_inputs` a module's (args, kwargs). Returns (reads, logits).
    """
    modules = dict(model.named_modules())
    reads: dict[str, Any] = {}
    handles = []
    for path, fn in (edits or {}).items():
        handles.append(modules[path].register_forward_hook(lambda m, a, o, fn=fn: fn(o)))
    for path in read:
        handles.append(modules[path].register_forward_hook(
            lambda m, a, o, path=path: reads.__setitem__(path, o.clone())))
    for path in read_inputs:
        handles.append(modules[path].register_forward_pre_hook(
            lambda m, a, k, path=path: reads.__setitem__(f"{path}:inputs", (a, dict(k))), with_kwargs=True))
    try:
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    return reads, logits


def edited(fn: Callable[[torch.Tensor], None]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A hook edit from an in-place function on a copy of the output."""
    def edit(out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        fn(out)
        return out
    return edit


def assert_equal(actual: Any, expected: Any, where: str = "value") -> None:
    """Exactly equal; nested tuples/lists/dicts; server objects that cannot travel arrive as `Opaque`."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{where}: got {type(actual).__name__}"
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=lambda m: f"{where}: {m}")
    elif isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)) and len(actual) == len(expected), f"{where}: {actual!r}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_equal(a, e, f"{where}[{i}]")
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), f"{where}: keys {list(actual)}"
        for key in expected:
            assert_equal(actual[key], expected[key], f"{where}[{key!r}]")
    elif expected is None or isinstance(expected, (bool, int, float, str)):
        assert actual == expected and type(actual) is type(expected), f"{where}: {actual!r} != {expected!r}"
    else:  # e.g. a cache object: shown for what it is
        assert isinstance(actual, Opaque), f"{where}: {actual!r}"
        assert actual.type_name.endswith(type(expected).__qualname__), f"{where}: {actual!r}"


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.allclose(a, b, rtol=1e-3, atol=1e-3)


# -- reading -----------------------------------------------------------------------------------


def test_read_output_input_and_inputs(tiny_arch, tiny_remote, tiny_local, tiny_tokenizer):
    m, model = tiny_remote[tiny_arch], tiny_local[tiny_arch]
    l0, l1 = layer(tiny_arch, 0), layer(tiny_arch, 1)
    with m.trace(PROMPT):
        out0 = at(m, l0).output.save()
        in1 = at(m, l1).input.save()
        mlp_inputs = at(m, f"{l1}.mlp").inputs.save()
        layer_inputs = at(m, l1).inputs.save()
        logits = m.lm_head.output.save()
    reads, ref_logits = run_hooks(model, ids_of(tiny_tokenizer, PROMPT), read=(l0,),
                                  read_inputs=(l1, f"{l1}.mlp"))
    ref_args, ref_kwargs = reads[f"{l1}:inputs"]
    assert_equal(out0.value, reads[l0], "layer 0 output")
    assert_equal(in1.value, ref_args[0], "layer 1 input")
    assert_equal(in1.value, out0.value, "layer 1 input is layer 0 output")
    assert_equal(tuple(mlp_inputs.value), reads[f"{l1}.mlp:inputs"], "mlp (args, kwargs)")
    assert_equal(tuple(layer_inputs.value), (ref_args, ref_kwargs), "layer (args, kwargs)")
    assert_equal(logits.value, ref_logits, "logits")


# -- editing -----------------------------------------------------------------------------------


def test_zero_ablation_by_slice_assignment(tiny_arch, tiny_remote, tiny_local, tiny_tokenizer):
    m, model = tiny_remote[tiny_arch], tiny_local[tiny_arch]
    mlp = f"{layer(tiny_arch, 1)}.mlp"
    with m.trace(PROMPT):
        at(m, mlp).output[:, -1] = 0
        ablated = at(m, mlp).output.save()
        logits = m.lm_head.output.save()

    def ablate(out):
        out[:, -1] = 0
    reads, ref = run_hooks(model, ids_of(tiny_tokenizer, PROMPT), edits={mlp: edited(ablate)}, read=(mlp,))
    _, plain = run_hooks(model, ids_of(tiny_tokenizer, PROMPT))
    assert_equal(ablated.value, reads[mlp])
    assert torch.all(ablated.value[:, -1] == 0)
    assert_equal(logits.value, ref)
    assert differs(logits.value[:, -1], plain[:, -1])
    assert_equal(logits.value[:, :-1], plain[:, :-1])  # causal: earlier positions are untouched


def test_inplace_steering_with_a_local_tensor(tiny_arch, tiny_remote, tiny_local, tiny_tokenizer):
    m, model = tiny_remote[tiny_arch], tiny_local[tiny_arch]
    l0 = layer(tiny_arch, 0)
    with m.trace(PROMPT):
        at(m, l0).output[:, -1] += 2 * VEC
        logits = m.lm_head.output.save()

    def steer(out):
        out[:, -1] += 2 * VEC
    _, ref = run_hooks(model, ids_of(tiny_tokenizer, PROMPT), edits={l0: edited(steer)})
    _, plain = run_hooks(model, ids_of(tiny_tokenizer, PROMPT))
    assert_equal(logits.value, ref)
    assert differs(logits.value[:, -1], plain[:, -1])


def test_whole_output_replacement(tiny_arch, tiny_remote, tiny_local, tiny_tokenizer):
    m, model = tiny_remote[tiny_arch], tiny_local[tiny_arch]
    ids = ids_of(tiny_tokenizer, PROMPT)
    mlp0, l1 = f"{layer(tiny_arch, 0)}.mlp", layer(tiny_arch, 1)
    replacement = torch.randn(1, ids.shape[1], HIDDEN, generator=torch.Generator().manual_seed(3))
    with m.trace(PROMPT):
        at(m, mlp0).output = replacement  # a local tensor
        at(m, l1).output = at(m, l1).output * 0.5 + VEC  # a value computed from the proxy
        logits = m.lm_head.output.save()
    _, ref = run_hooks(model, ids, edits={mlp0: lambda out: replacement.clone(), l1: lambda out: out * 0.5 + VEC})
    _, plain = run_hooks(model, ids)
    assert_equal(logits.value, ref)
    assert differs(logits.value, plain)


# -- computing on proxies ----------------------------------------------------------------------


def test_arithmetic_and_comparisons(tiny_arch, tiny_remote, tiny_local, tiny_tokenizer):
    m, model = tiny_remote[tiny_arch], tiny_local[tiny_arch]
    l0, l1 = layer(tiny_arch, 0), layer(tiny_arch, 1)
    exprs: dict[str, Callable[[Any, Any], Any]] = {
        "affine": lambda a, b: a * 2 + 1,
        "centered": lambda a, b: a - a.mean(),
        "difference": lambda a, b: b - a,
        "ratio": lambda a, b: a / (b.abs() + 1),
        "reflected": lambda a, b: 1 - 3 * a,
        "power": lambda a, b: a ** 2 + abs(b),
        "negated": lambda a, b: -a,
        "floor": lambda a, b: (a * 10) // 3 % 4,
        "matmul": lambda a, b: a @ W,
        "positive": lambda a, b: a > 0,
        "bounded": lambda a, b: (a >= -0.1) & (a <= 0.1),
        "same_sign": lambda a, b: (a < 0) == (b < 0),
        "changed": lambda a, b: a != b,
        "either": lambda a, b: (a > 0.2) | ~(b < 0.3),
    }
    with m.trace(PROMPT):
        a, b = at(m, l0).output, at(m, l1).output
        saved = {name: fn(a, b).save() for name, fn in exprs.items()}
    reads, _ = run_hooks(model, ids_of(tiny_tokenizer, PROMPT), read=(l0, l1))
    for name, fn in exprs.items():
        assert_equal(saved[name].value, fn(reads[l0], reads[l1]), name)
    assert saved["positive"].value.dtype == torch.bool


def test_a_value_used_at_two_layers_outlives_its_later_recorded_users(tiny_remote, tiny_local, tiny_tokenizer):
    """Nodes run when their inputs exist, not in recording order: `a * 2` (recorded last) runs at
    layer 0, before `b - a` can run at layer 1, and must not free `a` while `b - a` still needs it."""
    m, model = tiny_remote["llama"], tiny_local["llama"]
    with m.trace(PROMPT):
        a = m.model.layers[0].output
        b = m.model.layers[1].output
        diff = (b - a).save()
        double = (a * 2).save()
    reads, _ = run_hooks(model, ids_of(tiny_tokenizer, PROMPT), read=("model.layers.0", "model.layers.1"))
    assert_equal(diff.value, reads["model.layers.1"] - reads["model.layers.0"])
    assert_equal(double.value, reads["model.layers.0"] * 2)


def test_tensor_methods(tiny_arch, tiny_remote, tiny_local, tiny_tokenizer):
    m, model = tiny_remote[tiny_arch], tiny_local[tiny_arch]
    l0 = layer(tiny_arch, 0)
    exprs: dict[str, Callable[[Any, Any], Any]] = {
        "sum": lambda h, lg: h.sum(),
        "sum_dim": lambda h, lg: h.sum(dim=-1, keepdim=True),
        "mean": lambda h, lg: h.mean(1),
        "norm": lambda h, lg: h.norm(dim=-1),
        "softmax": lambda h, lg: lg.softmax(-1),
        "log_softmax": lambda h, lg: lg[:, -1].log_softmax(dim=-1),
        "argmax": lambda h, lg: lg.argmax(-1),
        "topk": lambda h, lg: lg[0, -1].topk(5),
        "topk_indices": lambda h, lg: lg[0, -1].topk(5).indices,
        "reshape": lambda h, lg: h.reshape(-1, 8),
        "view": lambda h, lg: h.view(h.shape[1], HIDDEN),
        "transpose": lambda h, lg: h.transpose(1, 2),
        "unsqueeze": lambda h, lg: h.unsqueeze(0),
        "clone": lambda h, lg: h.clone(),
        "detach": lambda h, lg: h.detach(),
        "float": lambda h, lg: h.double().float(),
        "to_dtype": lambda h, lg: h.to(torch.float16),
        "to_kw": lambda h, lg: h.to(dtype=torch.bfloat16),
    }
    with m.trace(PROMPT):
        h, lg = at(m, l0).output, m.lm_head.output
        saved = {name: fn(h, lg).save() for name, fn in exprs.items()}
    reads, logits = run_hooks(model, ids_of(tiny_tokenizer, PROMPT), read=(l0,))
    for name, fn in exprs.items():
        assert_equal(saved[name].value, fn(reads[l0], logits), name)
    assert saved["to_dtype"].value.dtype == torch.float16
    assert saved["topk"].value.indices.shape == (5,)


def test_torch_functions_on_proxies(tiny_arch, tiny_remote, tiny_local, tiny_tokenizer):
    m, model = tiny_remote[tiny_arch], tiny_local[tiny_arch]
    l0, l1 = layer(tiny_arch, 0), layer(tiny_arch, 1)
    exprs: dict[str, Callable[[Any, Any, Any], Any]] = {
        "stack": lambda a, b, lg: torch.stack([a, b]),
        "stack_dim": lambda a, b, lg: torch.stack((a[:, -1], b[:, -1], VEC[None]), dim=1),
        "cat": lambda a, b, lg: torch.cat([a, b], dim=-1),
        "where": lambda a, b, lg: torch.where(a > b, a, b),
        "where_scalar": lambda a, b, lg: torch.where(a > 0, a, 0.0),
        "matmul": lambda a, b, lg: torch.matmul(a, W),
        "einsum": lambda a, b, lg: torch.einsum("btd,bsd->bts", a, b),
        "softmax": lambda a, b, lg: F.softmax(lg, dim=-1),
        "log_softmax": lambda a, b, lg: F.log_softmax(lg[:, -1], -1),
        "cosine": lambda a, b, lg: F.cosine_similarity(a, b, dim=-1),
    }
    with m.trace(PROMPT):
        a, b, lg = at(m, l0).output, at(m, l1).output, m.lm_head.output
        saved = {name: fn(a, b, lg).save() for name, fn in exprs.items()}
    reads, logits = run_hooks(model, ids_of(tiny_tokenizer, PROMPT), read=(l0, l1))
    for name, fn in exprs.items():
        assert_equal(saved[name].value, fn(reads[l0], reads[l1], logits), name)


def test_iterating_over_the_layers(tiny_arch, tiny_remote, tiny_local, tiny_tokenizer):
    m, model = tiny_remote[tiny_arch], tiny_local[tiny_arch]
    layers = at(m, LAYERS[tiny_arch])
    with m.trace(PROMPT):
        outs, norms = [], []
        for i, block in enumerate(layers):
            block.output[:, -1] += (i + 1) * VEC
            outs.append(block.output.save())
            norms.append(block.output.norm(dim=-1).save())
        logits = m.lm_head.output.save()
    assert len(outs) == len(layers) == 2
    paths = [layer(tiny_arch, i) for i in range(len(layers))]

    def steer(i):
        def fn(out):
            out[:, -1] += (i + 1) * VEC
        return edited(fn)
    reads, ref = run_hooks(model, ids_of(tiny_tokenizer, PROMPT), read=tuple(paths),
                           edits={p: steer(i) for i, p in enumerate(paths)})
    for i, path in enumerate(paths):
        assert_equal(outs[i].value, reads[path], path)
        assert_equal(norms[i].value, reads[path].norm(dim=-1), f"{path} norm")
    assert_equal(logits.value, ref)


def test_saved_values_behave_as_tensors_after_the_trace(tiny_arch, tiny_remote, tiny_local, tiny_tokenizer):
    m, model = tiny_remote[tiny_arch], tiny_local[tiny_arch]
    l0 = layer(tiny_arch, 0)
    with m.trace(PROMPT):
        h = at(m, l0).output.save()
        shape = at(m, l0).output.shape.save()
    reads, _ = run_hooks(model, ids_of(tiny_tokenizer, PROMPT), read=(l0,))
    ref = reads[l0]
    assert isinstance(h.value, torch.Tensor)
    assert h.shape == ref.shape and shape.value == ref.shape and isinstance(shape.value, torch.Size)
    assert h.dtype == torch.float32 and h.ndim == 3 and len(h) == 1
    assert_equal(h[0, -1], ref[0, -1])
    assert_equal(h[:, 2:5].sum(-1), ref[:, 2:5].sum(-1))
    assert_equal(h + 1, ref + 1)
    assert_equal(2 * h - h, 2 * ref - ref)
    assert_equal(h @ W, ref @ W)
    assert_equal(torch.softmax(h, -1), torch.softmax(ref, -1))
    assert_equal(torch.stack([h, h]), torch.stack([ref, ref]))
    assert_equal(F.normalize(h, dim=-1), F.normalize(ref, dim=-1))
    assert torch.equal(h, ref) and torch.equal(ref, h)
    assert float(h[0, 0, 0]) == float(ref[0, 0, 0])
    assert int(h.argmax()) == int(ref.argmax())
    assert [row.shape for row in h] == [row.shape for row in ref]
    assert bool((h == ref).all())
    assert f"{h[0, 0, 0]:.4f}" == f"{ref[0, 0, 0].item():.4f}"
    h[0, 0] = 0  # a finished proxy edits its (local) value
    assert torch.all(h.value[0, 0] == 0)


# -- several invokes in one batch ------------------------------------------------------------------


def test_invokes_of_different_lengths_touch_only_their_rows(tiny_arch, tiny_remote, tiny_local, tiny_tokenizer):
    """Each invoke's edits reach only its rows; its logits equal a solo run of its prompt with its edits.

    SHORT (8 tokens) is left-padded to LONGER's 13: its row is compared with a tight tolerance
    (`PADDED`). LONGER's row has no padding and equals its solo run exactly, although the batch runs
    with an attention mask and position ids.
    """
    m, model = tiny_remote[tiny_arch], tiny_local[tiny_arch]
    mlp0, l1 = f"{layer(tiny_arch, 0)}.mlp", layer(tiny_arch, 1)
    short_ids, long_ids = ids_of(tiny_tokenizer, SHORT), ids_of(tiny_tokenizer, LONGER)
    n_short, n_long = short_ids.shape[1], long_ids.shape[1]
    assert n_short < n_long
    with m.trace() as tracer:
        with tracer.invoke(SHORT):
            at(m, mlp0).output[:, -1] = 0
            short_h = at(m, l1).output.save()
            short_logits = m.lm_head.output.save()
        with tracer.invoke(LONGER):
            at(m, l1).output[:, -1] += 3 * VEC
            long_h = at(m, l1).output.save()
            long_logits = m.lm_head.output.save()

    def ablate(out):
        out[:, -1] = 0

    def steer(out):
        out[:, -1] += 3 * VEC
    short_reads, short_ref = run_hooks(model, short_ids, edits={mlp0: edited(ablate)}, read=(l1,))
    long_reads, long_ref = run_hooks(model, long_ids, edits={l1: edited(steer)}, read=(l1,))
    _, short_plain = run_hooks(model, short_ids)
    _, long_plain = run_hooks(model, long_ids)

    # One row each, padded to the batch's length; SHORT's real tokens are the last n_short positions.
    assert short_logits.shape == long_logits.shape == (1, n_long, short_ref.shape[-1])
    torch.testing.assert_close(short_logits.value[:, -n_short:], short_ref, **PADDED)
    torch.testing.assert_close(short_h.value[:, -n_short:], short_reads[l1], **PADDED)
    assert_equal(long_logits.value, long_ref, "unpadded row's logits")
    assert_equal(long_h.value, long_reads[l1], "unpadded row's layer 1 output")
    # Each edit took effect in its own row only.
    assert differs(short_logits.value[:, -1], short_plain[:, -1])
    assert differs(long_logits.value[:, -1], long_plain[:, -1])
    assert not differs(short_logits.value[:, -n_short:-1], short_plain[:, :-1])
    assert not differs(long_logits.value[:, :-1], long_plain[:, :-1])


def test_invoke_without_edits_matches_a_plain_run(tiny_arch, tiny_remote, tiny_local, tiny_tokenizer):
    m, model = tiny_remote[tiny_arch], tiny_local[tiny_arch]
    l0 = layer(tiny_arch, 0)
    with m.trace() as tracer:
        with tracer.invoke(LONGER):
            at(m, l0).output[:] = 0
        with tracer.invoke(SHORT):
            short_logits = m.lm_head.output.save()
    short_ids = ids_of(tiny_tokenizer, SHORT)
    _, plain = run_hooks(model, short_ids)
    torch.testing.assert_close(short_logits.value[:, -short_ids.shape[1]:], plain, **PADDED)


def test_same_length_invokes_are_exact(tiny_arch, tiny_remote, tiny_local, tiny_tokenizer):
    """Without padding the batch is `model(input_ids)`: every row equals its solo run exactly."""
    m, model = tiny_remote[tiny_arch], tiny_local[tiny_arch]
    l1 = layer(tiny_arch, 1)
    with m.trace() as tracer:
        with tracer.invoke(CLEAN):
            clean = m.lm_head.output.save()
        with tracer.invoke(CORRUPTED):
            at(m, l1).output[:, -1] += VEC
            corrupted = m.lm_head.output.save()

    def steer(out):
        out[:, -1] += VEC
    _, clean_ref = run_hooks(model, ids_of(tiny_tokenizer, CLEAN))
    _, corrupted_ref = run_hooks(model, ids_of(tiny_tokenizer, CORRUPTED), edits={l1: edited(steer)})
    assert_equal(clean.value, clean_ref, "clean")
    assert_equal(corrupted.value, corrupted_ref, "corrupted, steered")


def test_activation_patching_across_invokes(tiny_arch, tiny_remote, tiny_local, tiny_tokenizer):
    """A value read in invoke 0 and written into invoke 1, in one forward pass, equals hook patching."""
    m, model = tiny_remote[tiny_arch], tiny_local[tiny_arch]
    l0 = layer(tiny_arch, 0)
    with m.trace() as tracer:
        with tracer.invoke(CLEAN):
            clean_resid = at(m, l0).output[:, -1]
            clean = m.lm_head.output[:, -1].save()
        with tracer.invoke(CORRUPTED):
            at(m, l0).output[:, -1] = clean_resid
            patched = m.lm_head.output[:, -1].save()
    clean_ids, corrupted_ids = ids_of(tiny_tokenizer, CLEAN), ids_of(tiny_tokenizer, CORRUPTED)
    reads, clean_ref = run_hooks(model, clean_ids, read=(l0,))

    def patch(out):
        out[:, -1] = reads[l0][:, -1]
    _, patched_ref = run_hooks(model, corrupted_ids, edits={l0: edited(patch)})
    _, corrupted_ref = run_hooks(model, corrupted_ids)
    assert_equal(clean.value, clean_ref[:, -1], "clean")
    assert_equal(patched.value, patched_ref[:, -1], "patched")
    assert differs(patched.value, corrupted_ref[:, -1])


def test_activation_patching_between_prompts_of_different_lengths(tiny_arch, tiny_remote, tiny_local,
                                                                  tiny_tokenizer):
    """Patch PROMPT's (padded) last-position residual into the longer prompt's (unpadded) row."""
    m, model = tiny_remote[tiny_arch], tiny_local[tiny_arch]
    l0 = layer(tiny_arch, 0)
    with m.trace() as tracer:
        with tracer.invoke(PROMPT):
            source = at(m, l0).output[:, -1].clone()
        with tracer.invoke(LONGER):
            at(m, l0).output[:, -1] = source
            patched = m.lm_head.output.save()
    reads, _ = run_hooks(model, ids_of(tiny_tokenizer, PROMPT), read=(l0,))

    def patch(out):
        out[:, -1] = reads[l0][:, -1]
    _, patched_ref = run_hooks(model, ids_of(tiny_tokenizer, LONGER), edits={l0: edited(patch)})
    # The patched-in value comes from PROMPT's padded row (layer 0's attention ran masked), so it and
    # everything after it carry that row's rounding: tight tolerance.
    torch.testing.assert_close(patched.value, patched_ref, **PADDED)


@pytest.mark.parametrize("index", [0, -1])
def test_each_invoke_reads_its_own_rows(tiny_remote, tiny_local, tiny_tokenizer, index):
    """Reads in a batch of three are per invoke; padded rows hold their prompt at the end."""
    m, model = tiny_remote["llama"], tiny_local["llama"]
    path = f"model.layers.{range(2)[index]}"
    prompts = [PROMPT, SHORT, LONGER]  # 9, 8 and 13 tokens: the first two are padded
    with m.trace() as tracer:
        saved = []
        for prompt in prompts:
            with tracer.invoke(prompt):
                saved.append(m.model.layers[index].output.save())
    for prompt, value in zip(prompts, saved, strict=True):
        reads, _ = run_hooks(model, ids_of(tiny_tokenizer, prompt), read=(path,))
        ref = reads[path]
        assert value.shape == (1, 13, HIDDEN)
        if prompt == LONGER:
            assert_equal(value.value, ref, prompt)
        else:
            torch.testing.assert_close(value.value[:, -ref.shape[1]:], ref, **PADDED)
