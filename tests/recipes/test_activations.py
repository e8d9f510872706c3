"""`collect_activations` equals per-prompt forward hooks on local copies; the probe example runs.

The reference runs every prompt alone (unpadded) with forward hooks (outputs) and forward pre-hooks
(first positional inputs). With `batch_size=1` the recipe's requests are the same unpadded call, and
the comparison is exact. With larger batches, prompts of different lengths are left-padded and run
with an attention mask and explicit position ids, whose kernels round differently in the last bits
from an unpadded solo run: compared with rtol = 1e-5, atol = 1e-5 (activations are O(1), float32 eps
is 1.2e-7), which any mix-up of rows, positions or padding would exceed by orders of magnitude.
"""

from __future__ import annotations

import importlib.util
import math
import time
from pathlib import Path

import pytest
import torch

from farscope.recipes import CollectedActivations, collect_activations

LAYERS = {"llama": "model.layers", "gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}
PROMPTS = [
    "When Mary and John went to the store, John gave a drink to",
    "The quick brown fox",
    "The Eiffel Tower is located in the city of",
    "What is your name?",
    "It was a cold day in winter, so they stayed inside",
]
PADDED = dict(rtol=1e-5, atol=1e-5)
# smollm2's residual stream after a dozen of its 30 layers carries the padded/unpadded rounding
# differences through more layers (1.2e-5 measured at layer 12): ten times looser.
SMOL_PADDED = dict(rtol=1e-4, atol=1e-4)
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "probe.py"


def _module(model, path):
    for part in path.split("."):
        model = model[int(part)] if part.isdigit() else getattr(model, part)
    return model


def reference(model, tokenizer, prompts, points, positions):
    """{point: [n, (positions,) d]} from solo runs: outputs by forward hooks, inputs by pre-hooks."""
    several = not isinstance(positions, int)
    wanted = list(positions) if several else [positions]
    rows = {point: [] for point in points}
    for prompt in prompts:
        kept, handles = {}, []
        for point in points:
            path, _, which = point.rpartition(".")
            if which not in ("output", "input"):
                path, which = point, "output"
            module = _module(model, path)
            if which == "output":
                handles.append(module.register_forward_hook(lambda m, a, o, p=point, k=kept: k.__setitem__(p, o)))
            else:
                handles.append(module.register_forward_pre_hook(lambda m, a, p=point, k=kept: k.__setitem__(p, a[0])))
        try:
            with torch.no_grad():
                model(torch.tensor([tokenizer(prompt)["input_ids"]]), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        for point in points:
            picked = torch.stack([kept[point][0, i] for i in wanted])
            rows[point].append(picked if several else picked[0])
    return {point: torch.stack(values) for point, values in rows.items()}


class Submits:
    def __init__(self, model, monkeypatch) -> None:
        self.count = 0
        submit = model._transport.submit

        def counting(*args, **kwargs):
            self.count += 1
            return submit(*args, **kwargs)
        monkeypatch.setattr(model._transport, "submit", counting)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_batched_collection_equals_solo_hooks(arch, tiny_remote, recipes_tiny_local, monkeypatch, capsys):
    model, tokenizer = recipes_tiny_local[arch]
    remote = tiny_remote[arch]
    layers = LAYERS[arch]
    points = [f"{layers}.1", f"{layers}.0.mlp.input", f"{layers}.0.mlp.output"]
    submits = Submits(remote, monkeypatch)
    result = collect_activations(remote, PROMPTS, points, batch_size=2)
    assert submits.count == math.ceil(len(PROMPTS) / 2)
    assert "collect_activations" in capsys.readouterr().err  # the progress bar
    assert isinstance(result, CollectedActivations) and list(result) == points
    expected = reference(model, tokenizer, PROMPTS, points, -1)
    for point in points:
        assert result[point].shape == (len(PROMPTS), model.config.hidden_size)
        torch.testing.assert_close(result[point], expected[point], **PADDED, msg=lambda m, p=point: f"{p}: {m}")
    # The MLP's input and output differ (the hooks are not mixed up).
    assert not torch.allclose(result[points[1]], result[points[2]])


def test_several_positions_count_from_each_prompts_own_start(tiny_remote, recipes_tiny_local, tmp_path):
    model, tokenizer = recipes_tiny_local["llama"]
    points = ["model.layers.0.output", "model.layers.1.input"]
    positions = [0, 2, -1]
    result = collect_activations(tiny_remote["llama"], PROMPTS, points, positions=positions, batch_size=3,
                                 progress=False)
    expected = reference(model, tokenizer, PROMPTS, points, positions)
    for point in points:
        assert result[point].shape == (len(PROMPTS), len(positions), model.config.hidden_size)
        torch.testing.assert_close(result[point], expected[point], **PADDED)
    assert result.plot(tmp_path / "cosine.png").stat().st_size > 0


def test_batches_of_one_are_exact(tiny_remote, recipes_tiny_local):
    model, tokenizer = recipes_tiny_local["gpt2"]
    points = ["transformer.h.1", "transformer.h.1.attn.input"]
    result = collect_activations(tiny_remote["gpt2"], PROMPTS[:3], points, positions=[0, -2],
                                 batch_size=1, progress=False)
    expected = reference(model, tokenizer, PROMPTS[:3], points, [0, -2])
    for point in points:
        torch.testing.assert_close(result[point], expected[point], rtol=0, atol=0)


def test_a_position_outside_a_prompt_is_refused(tiny_remote):
    with pytest.raises(IndexError, match="quick brown"):
        collect_activations(tiny_remote["llama"], PROMPTS, "model.layers.0", positions=-12, progress=False)


def test_smollm2_collection_equals_hooks(smol, smol_local):
    model, tokenizer = smol_local
    points = ["model.layers.12", "model.layers.5.mlp.input"]
    result = collect_activations(smol, PROMPTS[:4], points, batch_size=4, progress=False)
    expected = reference(model, tokenizer, PROMPTS[:4], points, -1)
    for point in points:
        torch.testing.assert_close(result[point], expected[point], **SMOL_PADDED)


def test_probe_example_runs(smol):
    """examples/probe.py on smollm2 (80 true/false statements; two layers here to keep it quick):
    truth is linearly decodable at layer 12 (0.94 measured), not at the embeddings' layer 0 (0.47)."""
    spec = importlib.util.spec_from_file_location("farscope_probe_example", EXAMPLE)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    started = time.perf_counter()
    results = probe.run(smol, layers=[0, 12], progress=False)
    assert time.perf_counter() - started < 60
    assert len(probe.dataset()[0]) >= 40
    assert results[12]["test_accuracy"] >= 0.85
    assert results[12]["test_accuracy"] > results[0]["test_accuracy"]
