"""Python `if` / `while` on traced values, and `tracer.cond` / `tracer.else_`, run as conditional blocks on
the server.

Each result equals plain PyTorch with the branch the server's values choose; both branches are
exercised by flipping the threshold. The server receives `if` / `else` / `end` nodes, never Python.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from references import at, count_calls, ids_of, layer

import farscope
from farscope.interventions import ops

PROMPT = "John gave a drink to Mary"


def _reference(local: torch.nn.Module, tokenizer: Any, zero: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer 0's output norm mean, logits) with `zero`'s output set to 0 (or no edit)."""
    seen: dict[str, torch.Tensor] = {}
    modules = dict(local.named_modules())

    def read(m: Any, a: Any, o: Any) -> None:
        seen["norm"] = _first(o).norm(dim=-1).mean()

    def edit(m: Any, a: Any, o: Any) -> None:
        _first(o)[:] = 0

    handles = [modules[layer("llama", 0)].register_forward_hook(read)]
    if zero is not None:
        handles.append(modules[zero].register_forward_hook(edit))
    try:
        with torch.no_grad():
            logits = local(ids_of(tokenizer, PROMPT), use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    return seen["norm"], logits


def _first(output: Any) -> Any:
    return output[0] if isinstance(output, tuple) else output


@pytest.mark.parametrize("taken", [True, False])
def test_plain_if_on_a_traced_norm_matches_pytorch(tiny_remote, tiny_local, tiny_tokenizer, taken):
    m = tiny_remote["llama"]
    norm_ref, _ = _reference(tiny_local["llama"], tiny_tokenizer, None)
    threshold = float(norm_ref) - 1.0 if taken else float(norm_ref) + 1.0
    with m.trace(PROMPT):
        norm = _first(at(m, layer("llama", 0)).output).norm(dim=-1).mean()
        if norm > threshold:
            _first(at(m, layer("llama", 1)).output)[:] = 0
        logits = m.lm_head.output.save()
    _, expected = _reference(tiny_local["llama"], tiny_tokenizer, layer("llama", 1) if taken else None)
    assert torch.equal(logits, expected)


@pytest.mark.parametrize("taken", [True, False])
def test_if_else_both_branches_match_pytorch(tiny_remote, tiny_local, tiny_tokenizer, taken):
    m = tiny_remote["llama"]
    norm_ref, _ = _reference(tiny_local["llama"], tiny_tokenizer, None)
    threshold = float(norm_ref) - 1.0 if taken else float(norm_ref) + 1.0
    with m.trace(PROMPT) as tracer:
        norm = _first(at(m, layer("llama", 0)).output).norm(dim=-1).mean()
        if norm > threshold:
            _first(at(m, layer("llama", 1)).output)[:] = 0
        else:
            m.model.norm.output[:] = 0
        logits = m.lm_head.output.save()
    ops_recorded = [n.op for n in tracer.graph.nodes]
    assert ops_recorded.count(ops.IF) == ops_recorded.count(ops.ELSE) == 1 and ops_recorded.count(ops.END) == 2
    _, expected = _reference(tiny_local["llama"], tiny_tokenizer, layer("llama", 1) if taken else "model.norm")
    assert torch.equal(logits, expected)


def test_explicit_cond_and_else_record_the_same_and_match(tiny_remote, tiny_local, tiny_tokenizer):
    m = tiny_remote["llama"]
    with m.trace(PROMPT) as tracer:
        norm = _first(at(m, layer("llama", 0)).output).norm(dim=-1).mean()
        with tracer.cond(norm < 0):  # never: a norm is not negative
            _first(at(m, layer("llama", 1)).output)[:] = 0
        with tracer.else_():
            m.model.norm.output[:] = 0
        logits = m.lm_head.output.save()
    _, expected = _reference(tiny_local["llama"], tiny_tokenizer, "model.norm")
    assert torch.equal(logits, expected)


def test_nested_ifs_and_values_from_a_branch(tiny_remote, tiny_local, tiny_tokenizer):
    m = tiny_remote["llama"]
    with m.trace(PROMPT):
        h = _first(at(m, layer("llama", 0)).output)
        norm = h.norm(dim=-1).mean()
        if norm > 0:
            if norm > 1e9:
                _first(at(m, layer("llama", 1)).output)[:] = 0
            else:
                m.model.norm.output[:] = 0
        never = None
        if norm < 0:
            never = (h * 2).save()
        logits = m.lm_head.output.save()
    _, expected = _reference(tiny_local["llama"], tiny_tokenizer, "model.norm")
    assert torch.equal(logits, expected)
    with pytest.raises(farscope.FarscopeError, match="never computed|no value"):
        never.value  # noqa: B018 - its block was not taken


def test_a_branch_not_taken_runs_no_module_it_reads(tiny_remote, tiny_server):
    server_model = tiny_server.engine.replicas["tiny-llama"].model
    m = tiny_remote["llama"]
    with count_calls(server_model, [layer("llama", 0), layer("llama", 1), "lm_head"]) as counts:
        with m.trace(PROMPT):
            h = _first(at(m, layer("llama", 0)).output)
            if h.norm() < 0:
                m.lm_head.output.save()
            kept = h.sum().save()
    assert counts == {layer("llama", 0): 1, layer("llama", 1): 0, "lm_head": 0}
    assert kept.shape == ()


def test_a_value_from_a_branch_not_taken_used_later_names_it(tiny_remote):
    m = tiny_remote["llama"]
    with pytest.raises(farscope.RemoteError, match="conditional block that was not taken"):
        with m.trace(PROMPT):
            h = _first(at(m, layer("llama", 0)).output)
            doubled = h
            if h.norm() < 0:
                doubled = h * 2
            (doubled + 1).save()


def test_a_condition_of_many_values_is_refused_by_the_server(tiny_remote):
    m = tiny_remote["llama"]
    with pytest.raises(farscope.RemoteError, match="single value"):
        with m.trace(PROMPT):
            h = _first(at(m, layer("llama", 0)).output)
            if h > 0:
                h.save()


def test_if_inside_generation_steps_stops_on_a_token(tiny_remote):
    m = tiny_remote["llama"]
    with m.generate(PROMPT, max_new_tokens=4) as tracer:
        for step in tracer.iter[:]:
            token = m.lm_head.output[0, -1].argmax(dim=-1).save()
            if step == 0:
                first = token
            if token.item() >= 0:  # every token id: stops after the first step
                tracer.stop()
    assert first.shape == ()
    with pytest.raises(farscope.FarscopeError):
        token.tolist()  # step 3 never ran
    with m.generate(PROMPT, max_new_tokens=4) as tracer:
        for _step in tracer.iter[:]:
            last = m.lm_head.output[0, -1].argmax(dim=-1).save()
            if last.item() < 0:  # never
                tracer.stop()
        result = tracer.result.save()
    with m.generate(PROMPT, max_new_tokens=4) as tracer:
        plain = tracer.result.save()
    assert torch.equal(result, plain)  # every step ran, as without the condition


def test_what_cannot_be_decided_while_recording_is_refused_on_the_client(tiny_remote):
    m = tiny_remote["llama"]
    with pytest.raises(farscope.TraceError, match="`break` inside a `while`"):
        with m.trace(PROMPT):
            h = _first(at(m, layer("llama", 0)).output).norm()
            while h > 0:
                h = h / 2
                break
    with pytest.raises(farscope.TraceError, match="`break`"):
        with m.trace(PROMPT):
            h = _first(at(m, layer("llama", 0)).output).norm()
            for _ in range(3):
                if h > 0:
                    break
    with pytest.raises(farscope.TraceError, match="no truth value"):
        with m.trace(PROMPT):
            h = _first(at(m, layer("llama", 0)).output).norm()
            if h > 0 and h < 10:
                pass


def _halve_until(local: torch.nn.Module, tokenizer: Any, target: float) -> tuple[int, torch.Tensor]:
    """Plain PyTorch: layer 0's output halved in place while its norm is over `target`; (halvings, logits)."""
    count = [0]

    def edit(m: Any, a: Any, o: Any) -> None:
        h = _first(o)
        while h.norm() > target:
            h *= 0.5
            count[0] += 1

    handle = dict(local.named_modules())[layer("llama", 0)].register_forward_hook(edit)
    try:
        with torch.no_grad():
            logits = local(ids_of(tokenizer, PROMPT), use_cache=False).logits
    finally:
        handle.remove()
    return count[0], logits


def test_a_while_on_a_traced_value_runs_as_often_as_pytorch_does(tiny_remote, tiny_local, tiny_tokenizer):
    m = tiny_remote["llama"]
    norm, _ = _reference(tiny_local["llama"], tiny_tokenizer, None)
    for target in (1e9, 0.3 * float(norm) * 5):  # no iteration; some
        halvings, expected = _halve_until(tiny_local["llama"], tiny_tokenizer, target)
        with m.trace(PROMPT):
            h = _first(at(m, layer("llama", 0)).output)
            while h.norm() > target:
                h *= 0.5
            logits = m.lm_head.output.save()
        assert torch.equal(logits, expected), (target, halvings)
    assert halvings > 0  # the second target loops


def test_a_while_past_its_bound_fails_naming_the_bound(tiny_remote):
    m = tiny_remote["llama"]
    with pytest.raises(farscope.RemoteError, match="more than 4 times, its bound"):
        with m.trace(PROMPT) as tracer:
            tracer.branches.max_iterations = 4
            h = _first(at(m, layer("llama", 0)).output)
            while h.norm() > 0:  # halving never reaches 0 within 4 iterations
                h *= 0.5
            m.lm_head.output.save()


def test_an_if_between_the_traces_of_a_session_runs_there(tiny_remote, tiny_local, tiny_tokenizer):
    m = tiny_remote["llama"]
    norm, logits_ref = _reference(tiny_local["llama"], tiny_tokenizer, None)
    with m.session():
        with m.trace(PROMPT):
            norm_remote = _first(at(m, layer("llama", 0)).output).norm(dim=-1).mean()
        if norm_remote > 0:
            doubled = (norm_remote * 2).save()
        if norm_remote < 0:
            never = (norm_remote * 3).save()
        with m.trace(PROMPT):
            logits = m.lm_head.output.save()
    assert torch.equal(doubled, norm * 2)
    assert torch.equal(logits, logits_ref)
    with pytest.raises(farscope.FarscopeError):
        never.tolist()
    with pytest.raises(farscope.TraceError, match="cannot start inside"):
        with m.session():
            with m.trace(PROMPT):
                value = _first(at(m, layer("llama", 0)).output).norm()
            if value > 0:
                with m.trace(PROMPT):
                    m.lm_head.output.save()
