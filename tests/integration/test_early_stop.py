"""The executor hooks only what a graph references and stops the forward pass once nothing is left."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def _count_calls(model, paths):
    """Counts forward calls of the server's own modules (the test shares the server's process)."""
    modules = dict(model.named_modules())
    counts = dict.fromkeys(paths, 0)
    handles = [modules[p].register_forward_hook(lambda m, a, o, p=p: counts.__setitem__(p, counts[p] + 1))
               for p in paths]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def test_reading_layer_3_of_30_runs_no_later_layer(smol, smol_server, smol_local):
    server_model = smol_server.engine.replicas["smollm2-135m"].model
    layers = [f"model.layers.{i}" for i in range(30)]
    with _count_calls(server_model, [*layers, "lm_head"]) as counts:
        with smol.trace("The Eiffel Tower is located in the city of"):
            h = smol.model.layers[3].output.save()
    assert [counts[p] for p in layers[:4]] == [1, 1, 1, 1]
    assert all(counts[p] == 0 for p in layers[4:]), counts
    assert counts["lm_head"] == 0
    model, tokenizer = smol_local
    ref = {}
    handle = model.model.layers[3].register_forward_hook(lambda m, a, o: ref.setdefault("h", o))
    with torch.no_grad():
        model(torch.tensor([tokenizer("The Eiffel Tower is located in the city of")["input_ids"]]))
    handle.remove()
    assert torch.equal(h.value, ref["h"])


def test_a_write_with_nothing_saved_after_it_stops_there(tiny_remote, tiny_server):
    server_model = tiny_server.engine.replicas["tiny-llama"].model
    m = tiny_remote["llama"]
    with _count_calls(server_model, ["model.layers.0", "model.layers.1", "lm_head"]) as counts:
        with m.trace("John gave a drink to Mary"):
            h = m.model.layers[0].output.save()
            m.model.layers[0].output[:, -1] = 0
    assert counts == {"model.layers.0": 1, "model.layers.1": 0, "lm_head": 0}
    assert torch.all(h.value[:, -1] == 0)  # the saved output is the edited tensor, as in NNsight


def test_reading_the_logits_runs_everything(tiny_remote, tiny_server):
    server_model = tiny_server.engine.replicas["tiny-llama"].model
    m = tiny_remote["llama"]
    with _count_calls(server_model, ["model.layers.0", "model.layers.1", "lm_head"]) as counts:
        with m.trace("John gave a drink to Mary"):
            m.lm_head.output.save()
    assert counts == {"model.layers.0": 1, "model.layers.1": 1, "lm_head": 1}
