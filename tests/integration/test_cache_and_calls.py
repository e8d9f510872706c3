"""`tracer.cache()`, out-of-order module calls (the logit lens), `skip`, `tracer.stop()` and `tracer.log`.

Each result is compared with plain PyTorch forward hooks on a second, local copy of the same weights,
fed the same token ids with the server's call (`model(ids, use_cache=False)`): exactly equal. Whether
a module ran on the server is counted with forward hooks on the server's own model object (the tests
share the server's process).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from references import at, count_calls, ids_of, layer

import farscope
from farscope.interventions.codec import Opaque

PROMPT = "When Mary and John went to the store"  # 9 tokens with the tiny tokenizer
CLEAN = "When Mary and John went to the store, John gave a drink to"  # 16 tokens
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"  # 16 tokens
EIFFEL = "The Eiffel Tower is located in the city of"

NORMS = {"llama": "model.norm", "gpt2": "transformer.ln_f", "gpt_neox": "gpt_neox.final_layer_norm"}


# -- helpers -----------------------------------------------------------------------------------


def run_hooks(model, ids: torch.Tensor, *, read=(), edits: dict[str, Callable] | None = None,
              use_cache: bool | None = False) -> tuple[dict[str, Any], torch.Tensor]:
    """Plain PyTorch: `model(ids, use_cache=False)` with forward hooks.

    `edits` maps a module path to fn(output) -> new output (before that module's reads); `read`
    keeps module outputs (the first call's). Returns (reads, logits).
    """
    modules = dict(model.named_modules())
    reads: dict[str, Any] = {}
    handles = [modules[path].register_forward_hook(lambda m, a, o, fn=fn: fn(o)) for path, fn in (edits or {}).items()]
    handles += [modules[path].register_forward_hook(lambda m, a, o, path=path: reads.setdefault(path, o))
                for path in read]
    kwargs = {} if use_cache is None else {"use_cache": use_cache}
    try:
        with torch.no_grad():
            logits = model(ids, **kwargs).logits
    finally:
        for handle in handles:
            handle.remove()
    return reads, logits


def assert_same(actual: Any, expected: Any, where: str) -> None:
    """Exactly the same value: tensors by torch.equal, containers item by item."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{where}: {type(actual).__name__}"
        assert actual.dtype == expected.dtype and torch.equal(actual, expected), where
    elif isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)) and len(actual) == len(expected), f"{where}: {actual!r}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{where}[{i}]")
    elif isinstance(expected, dict):  # a model output (a Record on the client)
        assert isinstance(actual, dict) and list(actual) == list(expected), f"{where}: {actual!r}"
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, Opaque):
        assert isinstance(actual, Opaque) and actual.type_name == expected.type_name, where
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def hook_point(module: torch.nn.Module) -> bool:
    """farscope's identity modules inside attention (`attn_probs`, `head_out`): hooking `attn_probs`
    switches attention to eager, so these are neither cached by default nor counted here."""
    return type(module).__name__ == "AttentionHookPoint"


def server_model(server, name: str):
    return server.engine.replicas[name].model


# -- cache -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_cache_of_every_module_equals_individual_saves(arch, tiny_remote, tiny_local, tiny_tokenizer):
    m, model = tiny_remote[arch], tiny_local[arch]
    with m.trace(PROMPT) as tracer:
        cache = tracer.cache()
    assert all(key.startswith("model.") for key in cache)  # NNsight's keys: the envoy paths
    paths = [key.removeprefix("model.") for key in cache]
    with m.trace(PROMPT):
        single = {path: at(m, path).output.save() for path in paths}

    # Every module that runs in the forward pass, by path; containers and attention hook points are left
    # out, and so are modules that never run (GPT-2's attn_dropout: SDPA applies dropout itself).
    modules = dict(model.named_modules())
    candidates = [p for p, mod in modules.items()
                  if p and not isinstance(mod, torch.nn.ModuleList) and not hook_point(mod)]
    fired, _ = run_hooks(model, ids_of(tiny_tokenizer, PROMPT), read=candidates)
    expected = [p for p in candidates if p in fired]
    assert paths == expected
    if arch == "gpt2":
        assert "transformer.h.0.attn.attn_dropout" not in cache
        with pytest.raises(KeyError, match="did not run"):
            cache["transformer.h.0.attn.attn_dropout"]
    assert NORMS[arch] in cache and layer(arch, 1) in cache and "lm_head" in cache
    for path in paths:
        assert_same(cache[path].output, single[path].value, path)
        assert cache[f"model.{path}"] is cache[path]
    # And the tensors are what plain hooks see.
    reads, logits = run_hooks(model, ids_of(tiny_tokenizer, PROMPT), read=paths)
    for path in paths:
        if isinstance(reads[path], torch.Tensor):
            assert_same(cache[path].output, reads[path], path)
    assert_same(cache["lm_head"].output, logits, "logits")


def test_cache_of_chosen_modules_by_envoy_and_by_path(smol, smol_local):
    model, tokenizer = smol_local
    by_envoy = [smol.model.layers[3], smol.model.layers[3].mlp, smol.model.norm]
    by_path = ["model.layers.5", "model.layers.5.self_attn", "model.layers.7.mlp.act_fn"]
    with smol.trace(EIFFEL) as tracer:
        envoy_cache = tracer.cache(by_envoy)
        path_cache = tracer.cache(by_path)
    with smol.trace(EIFFEL):
        single = {path: at(smol, path).output.save()
                  for path in ["model.layers.3", "model.layers.3.mlp", "model.norm", *by_path]}

    assert list(envoy_cache) == ["model.model.layers.3", "model.model.layers.3.mlp", "model.model.norm"]
    assert list(path_cache) == [f"model.{path}" for path in by_path]
    for cache in (envoy_cache, path_cache):
        for key in cache:
            path = key.removeprefix("model.")
            assert_same(cache[key].output, single[path].value, path)
    reads, _ = run_hooks(model, ids_of(tokenizer, EIFFEL), read=["model.layers.3", "model.layers.5"],
                         use_cache=None)
    assert_same(envoy_cache["model.layers.3"].output, reads["model.layers.3"], "layer 3")
    assert_same(path_cache["model.model.layers.5"].output, reads["model.layers.5"], "layer 5")
    attn = path_cache["model.layers.5.self_attn"].output
    assert isinstance(attn, tuple) and attn[0].shape == (1, ids_of(tokenizer, EIFFEL).shape[1], 576)


def test_cache_values_arrive_after_the_trace(tiny_remote):
    m = tiny_remote["llama"]
    with m.trace(PROMPT) as tracer:
        cache = tracer.cache(["model.layers.0"])
        inside = cache["model.layers.0"].output
        assert isinstance(inside, farscope.SavedTensor) and not inside.has_value  # recording while open
    assert isinstance(cache["model.layers.0"].output, torch.Tensor)
    assert cache["model.layers.0"].output is inside and torch.equal(inside, inside.value)


# -- out-of-order module calls ----------------------------------------------------------------------


def test_logit_lens_at_every_layer_of_smollm2(smol, smol_local):
    model, tokenizer = smol_local
    with smol.trace(EIFFEL):
        lens = [smol.lm_head(smol.model.norm(block.output))[:, -1].save() for block in smol.model.layers]
    assert len(lens) == 30

    paths = [f"model.layers.{i}" for i in range(30)]
    reads, logits = run_hooks(model, ids_of(tokenizer, EIFFEL), read=paths, use_cache=None)
    with torch.no_grad():
        for i, path in enumerate(paths):
            ref = model.lm_head(model.model.norm(reads[path]))[:, -1]
            assert torch.equal(lens[i].value, ref), path
    assert torch.equal(lens[-1].value, logits[:, -1])  # the last layer's lens is the model's own output

    top = [tokenizer.decode(int(value[0].argmax())) for value in lens]
    assert top[-1] == " Paris"
    assert " Paris" not in top[:20], top


def test_a_module_call_skips_the_traces_interventions_and_call_count(tiny_arch, tiny_remote, tiny_local,
                                                                    tiny_tokenizer):
    """An ablation recorded on lm_head's output applies to the forward pass's lm_head call only; the
    out-of-order `lm_head(norm(h))` calls neither see it nor count as calls of lm_head or the norm."""
    m, model = tiny_remote[tiny_arch], tiny_local[tiny_arch]
    l0, l1, norm = layer(tiny_arch, 0), layer(tiny_arch, 1), NORMS[tiny_arch]
    with m.trace(PROMPT):
        m.lm_head.output[:, -1] = 0
        early = m.lm_head(at(m, norm)(at(m, l0).output)).save()
        late = m.lm_head(at(m, norm)(at(m, l1).output)).save()
        normed = at(m, norm).output.save()
        logits = m.lm_head.output.save()

    ids = ids_of(tiny_tokenizer, PROMPT)
    reads, plain = run_hooks(model, ids, read=(l0, norm))

    def ablate(out):
        out = out.clone()
        out[:, -1] = 0
        return out
    _, ablated = run_hooks(model, ids, edits={"lm_head": ablate})
    with torch.no_grad():
        ref_early = model.lm_head(at(model, norm)(reads[l0]))
    assert torch.equal(early.value, ref_early)
    assert torch.equal(late.value, plain)  # lm_head(norm(last layer)) is the unablated output
    assert torch.all(late.value[:, -1] != 0)
    assert torch.equal(normed.value, reads[norm])  # call 0 of the norm is the forward pass's own
    assert torch.equal(logits.value, ablated)
    assert torch.all(logits.value[:, -1] == 0)


# -- skip ---------------------------------------------------------------------------------------------


def test_skip_equals_replacing_the_output_and_the_module_does_not_run(tiny_arch, tiny_remote, tiny_local,
                                                                     tiny_tokenizer, tiny_server):
    m, model = tiny_remote[tiny_arch], tiny_local[tiny_arch]
    l0, l1 = layer(tiny_arch, 0), layer(tiny_arch, 1)
    server = server_model(tiny_server, f"tiny-{tiny_arch}")
    inside_l1 = [p for p, mod in server.named_modules() if p.startswith(f"{l1}.") and not hook_point(mod)]
    inside_l0 = [p for p, mod in server.named_modules() if p.startswith(f"{l0}.") and not hook_point(mod)]
    assert inside_l1
    with count_calls(server, [*inside_l0, *inside_l1, "lm_head"]) as counts:
        with m.trace(PROMPT):
            at(m, l1).skip(at(m, l0).output)
            skipped = at(m, l1).output.save()
            logits = m.lm_head.output.save()
    assert all(counts[p] == 0 for p in inside_l1), counts  # nothing inside layer 1 ran
    assert counts["lm_head"] == 1 and any(counts[p] == 1 for p in inside_l0)

    ids = ids_of(tiny_tokenizer, PROMPT)
    reads, _ = run_hooks(model, ids, read=(l0,))
    _, ref = run_hooks(model, ids, edits={l1: lambda out: reads[l0]})
    _, plain = run_hooks(model, ids)
    assert torch.equal(skipped.value, reads[l0])
    assert torch.equal(logits.value, ref)
    assert not torch.equal(logits.value, plain)


def test_skip_in_one_invoke_of_two(tiny_arch, tiny_remote, tiny_local, tiny_tokenizer):
    """Same-length prompts (no padding): the skipping row equals the hooks reference, the other row a
    plain run of its prompt."""
    m, model = tiny_remote[tiny_arch], tiny_local[tiny_arch]
    l0, l1 = layer(tiny_arch, 0), layer(tiny_arch, 1)
    with m.trace() as tracer:
        with tracer.invoke(CLEAN):
            at(m, l1).skip(at(m, l0).output)
            clean = m.lm_head.output.save()
        with tracer.invoke(CORRUPTED):
            corrupted = m.lm_head.output.save()

    clean_ids, corrupted_ids = ids_of(tiny_tokenizer, CLEAN), ids_of(tiny_tokenizer, CORRUPTED)
    assert clean_ids.shape == corrupted_ids.shape
    reads, _ = run_hooks(model, clean_ids, read=(l0,))
    _, ref_clean = run_hooks(model, clean_ids, edits={l1: lambda out: reads[l0]})
    _, plain_clean = run_hooks(model, clean_ids)
    _, ref_corrupted = run_hooks(model, corrupted_ids)
    assert torch.equal(clean.value, ref_clean)
    assert not torch.equal(clean.value, plain_clean)
    assert torch.equal(corrupted.value, ref_corrupted)


# -- stop ---------------------------------------------------------------------------------------------


def test_stop_ends_the_forward_pass(tiny_remote, tiny_local, tiny_tokenizer, tiny_server):
    m, model = tiny_remote["llama"], tiny_local["llama"]
    paths = ["model.layers.0", "model.layers.1", "model.norm", "lm_head"]
    with count_calls(server_model(tiny_server, "tiny-llama"), paths) as counts:
        with m.trace(PROMPT) as tracer:
            h0 = m.model.layers[0].output.save()
            top = m.model.layers[0].output[0, -1].argmax().save()
            tracer.stop()
            after = m.lm_head.output.save()  # recorded after the stop: never runs
    assert counts == {"model.layers.0": 1, "model.layers.1": 0, "model.norm": 0, "lm_head": 0}

    reads, _ = run_hooks(model, ids_of(tiny_tokenizer, PROMPT), read=("model.layers.0",))
    assert torch.equal(h0.value, reads["model.layers.0"])
    assert int(top) == int(reads["model.layers.0"][0, -1].argmax())
    with pytest.raises(farscope.TraceError, match="forward pass stopped before it"):
        after.value  # noqa: B018


# -- log ----------------------------------------------------------------------------------------------


@pytest.fixture
def logged(tiny_server) -> Iterator[tuple[farscope.RemoteModel, list[str]]]:
    lines: list[str] = []
    model = farscope.RemoteModel("tiny-llama", address=f"127.0.0.1:{tiny_server.port}", on_log=lines.append)
    yield model, lines
    model.close()


def test_log_lines_arrive_in_order_with_their_values(logged, tiny_local, tiny_tokenizer):
    m, lines = logged
    model = tiny_local["llama"]
    with m.trace(PROMPT) as tracer:
        tracer.log("start", 3, 0.5)
        tracer.log("layer 0 norm:", m.model.layers[0].output.norm())
        tracer.log("layer 1 last:", m.model.layers[1].output[0, -1, :3])
        tracer.log("top token:", m.lm_head.output[0, -1].argmax(), "shape", m.lm_head.output.shape)
        logits = m.lm_head.output.save()

    reads, ref = run_hooks(model, ids_of(tiny_tokenizer, PROMPT), read=("model.layers.0", "model.layers.1"))
    assert torch.equal(logits.value, ref)
    assert lines == [
        "start 3 0.5",
        f"layer 0 norm: {reads['model.layers.0'].norm()!r}",
        f"layer 1 last: {reads['model.layers.1'][0, -1, :3]!r}",
        f"top token: {ref[0, -1].argmax()!r} shape {ref.shape}",
    ]


def test_log_at_every_generation_step(logged, tiny_tokenizer):
    m, lines = logged
    n = len(tiny_tokenizer(PROMPT)["input_ids"])
    with m.generate(PROMPT, max_new_tokens=4) as tracer:
        for step in tracer.all():
            tracer.log("step", step, m.lm_head.output[0, -1].argmax())
        out = tracer.result.save()
    generated = out.value[0, n:]
    assert lines == [f"step {step} {generated[step]!r}" for step in range(4)]
