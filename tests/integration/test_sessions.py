"""`model.session()` on smollm2-135m: several traces (and generates) in one request.

Results are compared with plain PyTorch forward hooks (and HF `generate`) on a second copy of the same
weights. The transport's `execute` is wrapped to count requests and to look at what came back.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch

import farscope

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
HIDDEN = 576


def ids_of(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([tokenizer(text)["input_ids"]])


def run_hooks(model, ids: torch.Tensor, *, read=(), edits=None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Plain hooks: `model(ids)`; edits: {path: fn(output) -> output}; returns (reads, logits)."""
    modules = dict(model.named_modules())
    reads: dict[str, torch.Tensor] = {}
    handles = [modules[path].register_forward_hook(lambda m, a, o, fn=fn: fn(o)) for path, fn in (edits or {}).items()]
    handles += [modules[path].register_forward_hook(lambda m, a, o, path=path: reads.__setitem__(path, o.clone()))
                for path in read]
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for handle in handles:
            handle.remove()
    return reads, logits


def hf_generate(model, ids: torch.Tensor, steps: int, edits=None) -> torch.Tensor:
    """HF greedy generate; edits: {path: fn(output) -> output} on every forward call."""
    modules = dict(model.named_modules())
    handles = [modules[path].register_forward_hook(lambda m, a, o, fn=fn: fn(o)) for path, fn in (edits or {}).items()]
    try:
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                                  pad_token_id=model.generation_config.pad_token_id)
    finally:
        for handle in handles:
            handle.remove()


class Requests:
    """Wraps a RemoteModel's `transport.execute`: counts requests and keeps what each returned."""

    def __init__(self, model: farscope.RemoteModel, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        self.results: list[dict[int, Any]] = []
        execute = model._transport.execute

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            results = execute(*args, **kwargs)
            self.results.append(results)
            return results
        monkeypatch.setattr(model._transport, "execute", counting)


@pytest.fixture
def requests(smol, monkeypatch) -> Requests:
    return Requests(smol, monkeypatch)


def this_line() -> int:
    return inspect.currentframe().f_back.f_lineno


# -- activation patching across traces --------------------------------------------------------------


def test_ioi_patching_across_traces_is_one_request_and_equals_hooks(smol, smol_local, requests):
    model, tokenizer = smol_local
    mary, john = tokenizer(" Mary")["input_ids"][0], tokenizer(" John")["input_ids"][0]
    with smol.session():
        with smol.trace(CLEAN):
            resid = smol.model.layers[21].output[:, -1]  # not saved: it stays on the server
            clean = smol.lm_head.output[:, -1].save()
        with smol.trace(CORRUPTED):
            corrupted = smol.lm_head.output[:, -1].save()
        with smol.trace(CORRUPTED):
            smol.model.layers[21].output[:, -1] = resid
            patched = smol.lm_head.output[:, -1].save()
        assert requests.count == 0  # nothing is sent before the session exits
    assert requests.count == 1

    clean_ids, corrupted_ids = ids_of(tokenizer, CLEAN), ids_of(tokenizer, CORRUPTED)
    reads, ref_clean = run_hooks(model, clean_ids, read=["model.layers.21"])
    _, ref_corrupted = run_hooks(model, corrupted_ids)

    def patch(out):
        out = out.clone()
        out[:, -1] = reads["model.layers.21"][:, -1]
        return out
    _, ref_patched = run_hooks(model, corrupted_ids, edits={"model.layers.21": patch})

    def metric(logits: torch.Tensor) -> float:
        return (logits[0, mary] - logits[0, john]).item()

    assert torch.equal(clean.value, ref_clean[:, -1])
    assert torch.equal(corrupted.value, ref_corrupted[:, -1])
    assert torch.equal(patched.value, ref_patched[:, -1])
    assert metric(patched) == metric(ref_patched[:, -1])
    assert metric(clean) > 5 and metric(corrupted) < -5
    assert metric(corrupted) < metric(patched)


def test_an_unsaved_value_of_an_earlier_trace_never_travels_back(smol, smol_local, requests):
    model, tokenizer = smol_local
    with smol.session():
        with smol.trace(CLEAN):
            resid = smol.model.layers[21].output[:, -1]
        with smol.trace(CORRUPTED):
            smol.model.layers[21].output[:, -1] = resid
            norm = smol.model.layers[21].output[:, -1].norm().save()
    assert requests.count == 1
    (results,) = requests.results
    assert len(results) == 1  # only the one saved value came back
    (value,) = results.values()
    assert value is norm.value and value.dim() == 0
    assert not any(isinstance(v, torch.Tensor) and HIDDEN in v.shape for v in results.values())
    with pytest.raises(farscope.TraceError, match="was not saved"):
        resid.value  # noqa: B018
    reads, _ = run_hooks(model, ids_of(tokenizer, CLEAN), read=["model.layers.21"])
    assert torch.equal(norm.value, reads["model.layers.21"][:, -1].norm())


def test_values_of_an_earlier_trace_compute_in_a_later_one(smol, smol_local, requests):
    """Operators, tensor methods and torch functions apply to an earlier trace's (unsaved) values."""
    model, tokenizer = smol_local
    with smol.session():
        with smol.trace(CLEAN):
            a = smol.model.layers[4].output[0, -1]
        with smol.trace(CORRUPTED):
            b = smol.model.layers[4].output[0, -1]
            saved = {
                "difference": (a - b).save(),
                "reflected": (2 * a).save(),
                "negated": (-a).save(),
                "unit": (a / a.norm()).save(),
                "cosine": torch.nn.functional.cosine_similarity(a, b, dim=-1).save(),
                "stacked": torch.stack([a, b]).save(),
            }
    assert requests.count == 1
    ref_a = run_hooks(model, ids_of(tokenizer, CLEAN), read=["model.layers.4"])[0]["model.layers.4"][0, -1]
    ref_b = run_hooks(model, ids_of(tokenizer, CORRUPTED), read=["model.layers.4"])[0]["model.layers.4"][0, -1]
    expected = {
        "difference": ref_a - ref_b,
        "reflected": 2 * ref_a,
        "negated": -ref_a,
        "unit": ref_a / ref_a.norm(),
        "cosine": torch.nn.functional.cosine_similarity(ref_a, ref_b, dim=-1),
        "stacked": torch.stack([ref_a, ref_b]),
    }
    for name, value in saved.items():
        assert torch.equal(value.value, expected[name]), name


def test_values_of_a_session_arrive_only_when_it_exits(smol, smol_local, requests):
    model, tokenizer = smol_local
    with smol.session():
        with smol.trace(CLEAN):
            h = smol.model.layers[2].output.save()
        with pytest.raises(farscope.TraceError, match=r"no value yet: values arrive when the trace \(or the "
                                                       r"session\) exits"):
            h.value  # noqa: B018
        # Python between traces records session-level nodes (computed on the server), as NNsight allows.
        later = (h + 1).save()
        assert isinstance(later, torch.Tensor) and not later.has_value
        with pytest.raises(farscope.TraceError, match="no value yet"):
            later.value  # noqa: B018
        assert requests.count == 0
    assert requests.count == 1
    reads, _ = run_hooks(model, ids_of(tokenizer, CLEAN), read=["model.layers.2"])
    assert torch.equal(h.value, reads["model.layers.2"])
    assert torch.equal(later, reads["model.layers.2"] + 1)


def test_a_session_mixing_a_trace_and_generates(smol, smol_local, requests):
    """A direction read in a trace steers a generate in the same request; a plain generate beside it."""
    model, tokenizer = smol_local
    source, prompt, steps = "I hate you, you are terrible", "My favourite food is", 6
    with smol.session():
        with smol.trace(source):
            direction = smol.model.layers[10].output[0, -1]
        with smol.generate(prompt, max_new_tokens=steps) as tracer:
            for _ in tracer.all():
                smol.model.layers[10].output[:, -1] += 2 * direction
            steered = tracer.result.save()
        with smol.generate(prompt, max_new_tokens=steps) as tracer:
            plain = tracer.result.save()
    assert requests.count == 1

    reads, _ = run_hooks(model, ids_of(tokenizer, source), read=["model.layers.10"])
    ref_direction = reads["model.layers.10"][0, -1]

    def steer(out):
        out = out.clone()
        out[:, -1] += 2 * ref_direction
        return out
    ids = ids_of(tokenizer, prompt)
    ref_steered = hf_generate(model, ids, steps, edits={"model.layers.10": steer})
    ref_plain = hf_generate(model, ids, steps)
    assert torch.equal(steered.value, ref_steered)
    assert torch.equal(plain.value, ref_plain)
    assert not torch.equal(steered.value, plain.value), "the steering should change the generated tokens"


def test_an_error_in_the_second_trace_points_at_its_line(smol, requests):
    with pytest.raises(farscope.RemoteError) as info:
        with smol.session():
            with smol.trace(CLEAN):
                resid = smol.model.layers[3].output[:, -1]
                smol.lm_head.output.save()
            with smol.trace(CORRUPTED):
                smol.model.layers[3].output[:, -1] = resid
                bad_line = this_line() + 1
                smol.model.layers[5].output[:, -1] = torch.zeros(7)
                smol.lm_head.output.save()
    assert requests.count == 1
    error = info.value
    assert "RuntimeError" in error.message and "Tensor sizes: [7]" in error.message  # torch's own message
    assert error.where is not None
    first, _, source = error.where.partition("\n")
    assert first == f"{__file__}:{bad_line}"
    assert source.strip() == "smol.model.layers[5].output[:, -1] = torch.zeros(7)"
    assert f"{__file__}:{bad_line}" in str(error)
