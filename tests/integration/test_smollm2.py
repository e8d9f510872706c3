"""The embedded default model, smollm2-135m, through a real server and client over gRPC.

Each result is compared with plain PyTorch forward hooks on a second copy of the same weights.
"""

from __future__ import annotations

import torch

EIFFEL = "The Eiffel Tower is located in the city of"
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"


def _ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([tokenizer(text)["input_ids"]])


def _reference(model, ids, *, read=(), edits=None):
    """Plain hooks: run `model(ids)`; edits: {module: fn(output) -> output}; returns (reads, logits)."""
    modules = dict(model.named_modules())
    reads, handles = {}, []
    for path, fn in (edits or {}).items():
        handles.append(modules[path].register_forward_hook(lambda m, a, o, fn=fn: fn(o)))
    for path in read:
        def keep(module, args, output, path=path):
            reads[path] = output.clone()
        handles.append(modules[path].register_forward_hook(keep))
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for h in handles:
            h.remove()
    return reads, logits


def test_read_layer_output_and_logits(smol, smol_local):
    model, tokenizer = smol_local
    with smol.trace(EIFFEL):
        h = smol.model.layers[5].output.save()
        logits = smol.lm_head.output.save()
    reads, ref_logits = _reference(model, _ids(tokenizer, EIFFEL), read=["model.layers.5"])
    assert torch.equal(h.value, reads["model.layers.5"])
    assert torch.equal(logits.value, ref_logits)
    assert smol.tokenizer.decode(logits[0, -1].argmax()) == " Paris"


def test_zero_ablate_mlp_output_at_last_position(smol, smol_local):
    model, tokenizer = smol_local
    with smol.trace(EIFFEL):
        smol.model.layers[8].mlp.output[:, -1] = 0
        logits = smol.lm_head.output.save()

    def ablate(out):
        out = out.clone()
        out[:, -1] = 0
        return out
    _, ref = _reference(model, _ids(tokenizer, EIFFEL), edits={"model.layers.8.mlp": ablate})
    assert torch.equal(logits.value, ref)
    _, plain = _reference(model, _ids(tokenizer, EIFFEL))
    assert not torch.equal(logits.value, plain)


def test_steering_vector_added_at_one_layer(smol, smol_local):
    model, tokenizer = smol_local
    vec = torch.randn(576, generator=torch.Generator().manual_seed(0))
    with smol.trace(EIFFEL):
        smol.model.layers[10].output[:, -1] += 4 * vec
        logits = smol.lm_head.output.save()

    def steer(out):
        out = out.clone()
        out[:, -1] += 4 * vec
        return out
    _, ref = _reference(model, _ids(tokenizer, EIFFEL), edits={"model.layers.10": steer})
    assert torch.equal(logits.value, ref)


def test_ioi_logit_difference_clean_corrupted_and_patched(smol, smol_local):
    model, tokenizer = smol_local
    mary, john = tokenizer(" Mary")["input_ids"][0], tokenizer(" John")["input_ids"][0]
    with smol.trace() as tracer:
        with tracer.invoke(CLEAN):
            clean_resid = smol.model.layers[20].output[:, -1]
            clean = smol.lm_head.output[:, -1].save()
        with tracer.invoke(CORRUPTED):
            smol.model.layers[20].output[:, -1] = clean_resid
            patched = smol.lm_head.output[:, -1].save()
    with smol.trace(CORRUPTED):
        corrupted = smol.lm_head.output[:, -1].save()

    def diff(logits):
        return (logits[0, mary] - logits[0, john]).item()

    clean_ids, corrupted_ids = _ids(tokenizer, CLEAN), _ids(tokenizer, CORRUPTED)
    reads, ref_clean = _reference(model, clean_ids, read=["model.layers.20"])
    _, ref_corrupted = _reference(model, corrupted_ids)

    def patch(out):
        out = out.clone()
        out[:, -1] = reads["model.layers.20"][:, -1]
        return out
    _, ref_patched = _reference(model, corrupted_ids, edits={"model.layers.20": patch})

    # Same-length prompts batch without padding, so each row computes exactly what it computes alone.
    assert diff(clean) == diff(ref_clean[:, -1])
    assert diff(corrupted) == diff(ref_corrupted[:, -1])
    assert diff(patched) == diff(ref_patched[:, -1])
    assert diff(clean) > 5 and diff(corrupted) < -5
    assert diff(corrupted) < diff(patched) < diff(clean)
