"""`model.generate(...)` through a real server and client: per-step interventions, steps, invokes, result.

Every result is compared with Hugging Face `generate` (greedy) on a second, local copy of the same
weights, with plain PyTorch forward hooks doing the same thing on the same forward calls: under
`generate`, a module's n-th forward call is generation step n (step 0 is the prompt's forward pass,
later steps see one new position each, thanks to the KV cache). Greedy decoding picks an argmax, so
equal token ids mean the interventions did exactly the same thing.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from references import at, ids_of, layer

import farscope

PROMPT = "When Mary and John went to the store"  # 9 tokens with the tiny tokenizer
SHORT = "The quick brown fox"  # 8 tokens
LONGER = "The Eiffel Tower is located in the city of"  # 13 tokens
STEPS = 10

HIDDEN = 64
EOS = 2  # the tiny models' <eos>
PAD = 1  # the tiny models' <pad>

VEC = 4 * torch.randn(HIDDEN, generator=torch.Generator().manual_seed(11))

Edit = Callable[[int, torch.Tensor], torch.Tensor | None]


# -- helpers -----------------------------------------------------------------------------------


@contextlib.contextmanager
def hooked(model, edits: dict[str, Edit] | None = None, reads: tuple[str, ...] = ()) -> Iterator[dict]:
    """Forward hooks on a local model: `edits[path](call, output)` may return a new output (call =
    0, 1, ... counts that module's forward calls); `reads` keeps each call's output, by path."""
    edits = edits or {}
    modules = dict(model.named_modules())
    calls: Counter[str] = Counter()
    seen: dict[str, list[torch.Tensor]] = {path: [] for path in reads}
    handles = []
    for path in {*edits, *reads}:
        def hook(module, args, output, path=path):
            call = calls[path]
            calls[path] += 1
            if path in edits:
                new = edits[path](call, output)
                output = output if new is None else new
            if path in seen:
                seen[path].append(output.detach().clone())
            return output
        handles.append(modules[path].register_forward_hook(hook))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def hf_generate(model, ids: torch.Tensor, *, steps: int = STEPS, edits: dict[str, Edit] | None = None,
                reads: tuple[str, ...] = ()) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
    """Plain HF greedy `generate` on one prompt, with hooks; returns (token ids, reads by path)."""
    with hooked(model, edits, reads) as seen, torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                             pad_token_id=model.generation_config.pad_token_id)
    return out, seen


def add_last(vec: torch.Tensor, calls: Any = None) -> Edit:
    """An edit adding `vec` at the last position, on every call or on the calls in `calls`."""
    def edit(call: int, output: torch.Tensor) -> torch.Tensor | None:
        if calls is not None and call not in calls:
            return None
        output = output.clone()
        output[:, -1] += vec
        return output
    return edit


def solo_row(row: torch.Tensor, n_prompt: int, solo: torch.Tensor) -> None:
    """A batch row (left-padded prompt + generated tokens) holds exactly the solo run's ids."""
    pads = row.shape[0] - n_prompt - STEPS
    assert pads >= 0
    assert torch.all(row[:pads] == PAD), row
    assert torch.equal(row[pads:pads + solo.shape[0]], solo), f"{row[pads:].tolist()} != {solo.tolist()}"
    assert torch.all(row[pads + solo.shape[0]:] == PAD)  # only if the solo run stopped at EOS


# -- steering on every step ----------------------------------------------------------------------


def test_steering_every_step_equals_hf_generate_with_a_hook(tiny_arch, tiny_remote, tiny_local, tiny_tokenizer):
    m, model = tiny_remote[tiny_arch], tiny_local[tiny_arch]
    path = layer(tiny_arch, 0)
    ids = ids_of(tiny_tokenizer, PROMPT)
    with m.generate(PROMPT, max_new_tokens=STEPS) as tracer:
        for _ in tracer.all():
            at(m, path).output[:, -1] += VEC
        out = tracer.result.save()
    with m.generate(PROMPT, max_new_tokens=STEPS) as tracer:
        plain = tracer.result.save()

    ref, _ = hf_generate(model, ids, edits={path: add_last(VEC)})
    ref_plain, _ = hf_generate(model, ids)
    assert out.value.shape == (1, ids.shape[1] + STEPS)
    assert torch.equal(out.value, ref)
    assert torch.equal(plain.value, ref_plain)
    assert torch.equal(out.value[:, :ids.shape[1]], ids)
    assert not torch.equal(out.value, plain.value), "the steering vector should change the generated tokens"


def test_smollm2_steering_at_layer_10_every_step(smol, smol_local):
    model, tokenizer = smol_local
    prompt = "The Eiffel Tower is located in the city of"
    ids = ids_of(tokenizer, prompt)
    vec = 8 * torch.randn(576, generator=torch.Generator().manual_seed(0))
    with smol.generate(prompt, max_new_tokens=STEPS) as tracer:
        for _ in tracer.all():
            smol.model.layers[10].output[:, -1] += vec
        out = tracer.result.save()
    with smol.generate(prompt, max_new_tokens=STEPS) as tracer:
        plain = tracer.result.save()

    ref, _ = hf_generate(model, ids, edits={"model.layers.10": add_last(vec)})
    ref_plain, _ = hf_generate(model, ids)
    assert torch.equal(out.value, ref)
    assert torch.equal(plain.value, ref_plain)
    assert not torch.equal(out.value, plain.value), "the steering vector should change the generated tokens"
    assert tokenizer.decode(plain.value[0, ids.shape[1]]) == " Paris"


# -- choosing steps ----------------------------------------------------------------------------------


def test_reading_at_one_step_is_that_forward_call(tiny_arch, tiny_remote, tiny_local, tiny_tokenizer):
    m, model = tiny_remote[tiny_arch], tiny_local[tiny_arch]
    path = layer(tiny_arch, 1)
    ids = ids_of(tiny_tokenizer, PROMPT)
    with m.generate(PROMPT, max_new_tokens=STEPS) as tracer:
        first = at(m, path).output.save()  # outside a step loop: step 0, the prompt's pass
        for _ in tracer.iter[3]:
            fourth = at(m, path).output.save()
            logits = m.lm_head.output.save()
        for _ in tracer.iter[-1]:
            last = at(m, path).output.save()
        out = tracer.result.save()

    ref, seen = hf_generate(model, ids, reads=(path, "lm_head"))
    assert len(seen[path]) == STEPS
    assert torch.equal(out.value, ref)
    assert first.shape == (1, ids.shape[1], HIDDEN)
    assert torch.equal(first.value, seen[path][0])
    assert fourth.shape == (1, 1, HIDDEN)  # one new position per step after the first
    assert torch.equal(fourth.value, seen[path][3])
    assert torch.equal(logits.value, seen["lm_head"][3])
    assert torch.equal(last.value, seen[path][STEPS - 1])
    # The token chosen at step 3 is the argmax of that step's logits.
    assert int(out.value[0, ids.shape[1] + 3]) == int(logits.value[0, -1].argmax())


def test_steps_by_slice_and_by_list(tiny_arch, tiny_remote, tiny_local, tiny_tokenizer):
    m, model = tiny_remote[tiny_arch], tiny_local[tiny_arch]
    l0, l1 = layer(tiny_arch, 0), layer(tiny_arch, 1)
    ids = ids_of(tiny_tokenizer, PROMPT)
    with m.generate(PROMPT, max_new_tokens=6) as tracer:
        steered = []
        for step in tracer.iter[1:3]:
            at(m, l0).output[:, -1] += VEC
            steered.append((step, at(m, l0).output.save()))
        picked = []
        for step in tracer.iter[[0, 4]]:
            picked.append((step, at(m, l1).output.save()))
        out = tracer.result.save()

    ref, seen = hf_generate(model, ids, steps=6, edits={l0: add_last(VEC, calls={1, 2})}, reads=(l0, l1))
    ref_plain, _ = hf_generate(model, ids, steps=6)
    assert [step for step, _ in steered] == [1, 2]
    assert [step for step, _ in picked] == [0, 4]
    assert torch.equal(out.value, ref)
    assert not torch.equal(out.value, ref_plain)
    assert torch.equal(out.value[:, :ids.shape[1] + 1], ref_plain[:, :ids.shape[1] + 1])  # step 0 untouched
    for step, value in steered:
        assert torch.equal(value.value, seen[l0][step]), f"step {step}"
    for step, value in picked:
        assert torch.equal(value.value, seen[l1][step]), f"step {step}"


def test_a_step_outside_the_generation_is_refused(tiny_remote):
    m = tiny_remote["llama"]
    with pytest.raises(farscope.TraceError, match="outside this generation's 3 steps"):
        with m.generate(PROMPT, max_new_tokens=3) as tracer:
            for _ in tracer.iter[3]:
                m.model.layers[0].output.save()


# -- several invokes -----------------------------------------------------------------------------------


def test_invokes_of_different_lengths_each_equal_a_solo_generate(tiny_arch, tiny_remote, tiny_local,
                                                                 tiny_tokenizer):
    """SHORT is left-padded to LONGER's length; each row is exactly its solo greedy generation, and
    the steering of SHORT's invoke never reaches LONGER's row."""
    m, model = tiny_remote[tiny_arch], tiny_local[tiny_arch]
    path = layer(tiny_arch, 0)
    short_ids, long_ids = ids_of(tiny_tokenizer, SHORT), ids_of(tiny_tokenizer, LONGER)
    n_short, n_long = short_ids.shape[1], long_ids.shape[1]
    assert n_short < n_long
    with m.generate(max_new_tokens=STEPS) as tracer:
        with tracer.invoke(SHORT):
            for _ in tracer.all():
                at(m, path).output[:, -1] += VEC
            short_out = tracer.result.save()
        with tracer.invoke(LONGER):
            long_out = tracer.result.save()
        both = tracer.result.save()

    ref_short, _ = hf_generate(model, short_ids, edits={path: add_last(VEC)})
    ref_short_plain, _ = hf_generate(model, short_ids)
    ref_long, _ = hf_generate(model, long_ids)
    assert both.shape == (2, n_long + STEPS)
    # Inside an invoke, `tracer.result` is that invoke's rows of the batch's result.
    assert torch.equal(short_out.value, both.value[0:1])
    assert torch.equal(long_out.value, both.value[1:2])
    solo_row(both.value[0], n_short, ref_short[0])
    solo_row(both.value[1], n_long, ref_long[0])
    assert not torch.equal(ref_short, ref_short_plain), "the steering vector should change SHORT's tokens"


def test_an_intervention_in_one_invoke_leaves_the_other_alone(tiny_arch, tiny_remote, tiny_local,
                                                              tiny_tokenizer):
    """Same-length prompts (no padding): the unsteered row equals plain generation, the steered one
    equals generation with the hook, while both share each forward pass."""
    m, model = tiny_remote[tiny_arch], tiny_local[tiny_arch]
    clean = "When Mary and John went to the store, John gave a drink to"
    corrupted = "When Mary and John went to the store, Mary gave a drink to"
    path = layer(tiny_arch, 1)
    clean_ids, corrupted_ids = ids_of(tiny_tokenizer, clean), ids_of(tiny_tokenizer, corrupted)
    assert clean_ids.shape == corrupted_ids.shape
    with m.generate(max_new_tokens=STEPS) as tracer:
        with tracer.invoke(clean):
            clean_out = tracer.result.save()
        with tracer.invoke(corrupted):
            for _ in tracer.all():
                at(m, path).output[:, -1] -= VEC
            corrupted_out = tracer.result.save()

    ref_clean, _ = hf_generate(model, clean_ids)
    ref_corrupted, _ = hf_generate(model, corrupted_ids, edits={path: add_last(-VEC)})
    ref_corrupted_plain, _ = hf_generate(model, corrupted_ids)
    solo_row(clean_out.value[0], clean_ids.shape[1], ref_clean[0])
    solo_row(corrupted_out.value[0], corrupted_ids.shape[1], ref_corrupted[0])
    assert not torch.equal(ref_corrupted, ref_corrupted_plain)


def test_result_is_only_for_generate(tiny_remote):
    m = tiny_remote["llama"]
    with pytest.raises(farscope.TraceError, match="generate"):
        with m.trace(PROMPT) as tracer:
            tracer.result.save()


# -- generation ending early -----------------------------------------------------------------------


def test_generation_ending_early_leaves_later_saves_absent(tiny_remote, tiny_local, tiny_tokenizer):
    """EOS forced at step 2: generation ends there; a save recorded for step 5 has no value."""
    m, model = tiny_remote["llama"], tiny_local["llama"]
    ids = ids_of(tiny_tokenizer, PROMPT)
    n = ids.shape[1]
    with m.generate(PROMPT, max_new_tokens=STEPS) as tracer:
        for _ in tracer.iter[1]:
            early = m.model.layers[1].output.save()
        for _ in tracer.iter[2]:
            m.lm_head.output[:, -1, EOS] = 1e4
        for _ in tracer.iter[5]:
            late = m.model.layers[1].output.save()
        out = tracer.result.save()

    def force_eos(call, logits):
        if call == 2:
            logits = logits.clone()
            logits[:, -1, EOS] = 1e4
            return logits
        return None
    ref, seen = hf_generate(model, ids, edits={"lm_head": force_eos}, reads=("model.layers.1",))
    assert len(seen["model.layers.1"]) == 3  # HF itself stopped after 3 steps
    assert torch.equal(out.value, ref)
    assert out.shape == (1, n + 3) and int(out.value[0, -1]) == EOS
    assert torch.equal(early.value, seen["model.layers.1"][1])
    with pytest.raises(farscope.TraceError, match="never computed.*generation ended early"):
        late.value  # noqa: B018
    # Asking again gives the same answer, naming the node that was saved.
    with pytest.raises(farscope.TraceError, match=r"^%\d+ \(read\) has no value"):
        late.value  # noqa: B018


# -- what generate refuses ---------------------------------------------------------------------------


def test_backward_inside_generate_is_refused(tiny_remote):
    m = tiny_remote["llama"]
    with pytest.raises(farscope.ValidationError, match="generate") as info:
        with m.generate(PROMPT, max_new_tokens=3):
            loss = m.model.layers[1].output.sum()
            loss.backward()
    assert "trace" in str(info.value)  # it says where gradients can be taken instead
