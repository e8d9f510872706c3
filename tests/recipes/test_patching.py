"""`activation_patching` and `attribution_patching` against plain PyTorch hooks, and the IOI result on smollm2.

References run on second copies of the same weights (`recipes_tiny_local`, `smol_local`; conftest.py) with forward hooks
only: the component's output is captured by a forward hook on the decoder layer ("resid"), the
attention module (its output[0], "attn") or the MLP ("mlp"); a head's output is the matching `head_dim`
slice of the output projection's input (a forward pre-hook), independent of farscope's `head_out`.
Patched runs are batched here too (one row per patch, each row patched at its own place by the hook):
rows of equal length are bit-identical to solo runs in float32, so every number must be equal
(`torch.equal`), no tolerance. AtP references take `torch.autograd.grad` of the metric on a solo run.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import pytest
import torch

from farscope.recipes import activation_patching, attribution_patching
from farscope.recipes._arch import Layout, layout_of

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
DATASET = [  # same token count as CLEAN on the tiny tokenizer (checked)
    "When John and Mary went to the store, Mary gave a drink to",
    "When Tom and Mary went to the store, John gave a drink to",
    "When Anna and John went to the store, Tom gave a drink to",
]
ARCHS = ("llama", "gpt2", "gpt_neox")
COMPONENTS = ("resid", "attn", "mlp", "head")
VARIANTS = (("resample", "denoising"), ("resample", "noising"), ("noise", "denoising"), ("noise", "noising"),
            ("zero", "noising"), ("mean", "noising"))


def ids_of(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def token(tokenizer, word: str) -> int:
    ids = ids_of(tokenizer, word)
    assert len(ids) == 1, f"{word!r} is {len(ids)} tokens"
    return ids[0]


def logit_diff(tokenizer):
    mary, john = token(tokenizer, " Mary"), token(tokenizer, " John")
    return lambda logits: logits[0, -1, mary] - logits[0, -1, john]


# -- plain-PyTorch references --------------------------------------------------------------------


@dataclass
class Ref:
    """A local model and where its components are (the recipe's Layout templates, as module paths)."""

    model: torch.nn.Module
    layout: Layout

    def module(self, template: str, layer: int | None = None) -> torch.nn.Module:
        return dict(self.model.named_modules())[template.format(i=layer)]

    def site(self, component: str, layer: int) -> torch.nn.Module:
        template = {"resid": self.layout.layers + ".{i}", "attn": self.layout.attn, "mlp": self.layout.mlp,
                    "head": self.layout.out_proj}[component]
        return self.module(template, layer)

    @property
    def heads(self) -> int:
        config = self.model.config
        return getattr(config, "num_attention_heads", None) or config.n_head

    def hook(self, component: str, layer: int, fn):
        """fn(activation) -> None (capture) or a replacement; activation [batch, pos, d] or, for heads,
        [batch, pos, heads, head_dim] (a view of the output projection's input)."""
        module = self.site(component, layer)
        if component == "head":
            def pre(module, args):
                x = args[0]
                heads = x.view(*x.shape[:2], self.heads, -1)
                new = fn(heads)
                return None if new is None else (new.reshape(x.shape), *args[1:])
            return module.register_forward_pre_hook(pre)
        if component == "attn":
            def post_tuple(module, args, output):
                new = fn(output[0])
                return None if new is None else (new, *output[1:])
            return module.register_forward_hook(post_tuple)

        def post(module, args, output):
            return fn(output)
        return module.register_forward_hook(post)

    def run(self, rows: list[list[int]], hooks=(), delta: torch.Tensor | None = None, grad: bool = False):
        handles = list(hooks)
        if delta is not None:
            handles.append(self.module(self.layout.embed).register_forward_hook(lambda m, a, o: o + delta))
        try:
            with torch.enable_grad() if grad else torch.no_grad():
                return self.model(torch.tensor(rows), use_cache=False).logits
        finally:
            for handle in handles:
                handle.remove()

    def capture(self, component: str, layers: list[int], rows: list[list[int]], delta=None, grad=False):
        kept: dict[int, torch.Tensor] = {}
        hooks = [self.hook(component, i, lambda a, i=i: kept.__setitem__(i, a)) for i in layers]
        logits = self.run(rows, hooks, delta, grad)
        return kept, logits


def noise_delta(ref: Ref, ids: list[int], seed: int, noise_std: float | None) -> torch.Tensor:
    """What the recipe documents: scale * randn(1, pos, d_model) from Generator().manual_seed(seed)."""
    embedding = ref.module(ref.layout.embed)(torch.tensor([ids])).detach()
    unit = torch.randn(1, len(ids), embedding.shape[-1], generator=torch.Generator().manual_seed(seed))
    scale = 3 * embedding.std() if noise_std is None else torch.tensor(noise_std, dtype=torch.float32)
    return scale * unit


def reference_patching(ref: Ref, component: str, kind: str, setup: str, clean: list[int], corrupted, metric,
                       layers: list[int], positions: list[int], dataset=None, seed=0, noise_std=None,
                       rows_per_pass: int = 64):
    """(values [layers, positions(, heads)], clean metric, corrupted metric or None)."""
    delta = noise_delta(ref, clean, seed, noise_std) if kind == "noise" else None
    clean_metric = metric(ref.run([clean]))
    corrupted_metric = None
    if kind == "resample":
        corrupted_metric = metric(ref.run([corrupted]))
    elif kind == "noise":
        corrupted_metric = metric(ref.run([clean], delta=delta))
    # Where patched values come from, and the run they go into.
    if kind == "zero":
        sources = None
    elif kind == "mean":
        acts, _ = ref.capture(component, layers, [ids for ids in dataset])
        sources = {i: a.mean(0, keepdim=True) for i, a in acts.items()}
    elif setup == "denoising":
        sources, _ = ref.capture(component, layers, [clean])
    else:
        sources, _ = ref.capture(component, layers, [corrupted if kind == "resample" else clean],
                                 delta=delta if kind == "noise" else None)
    base = corrupted if (kind == "resample" and setup == "denoising") else clean
    base_delta = delta if (kind == "noise" and setup == "denoising") else None
    heads = list(range(ref.heads)) if component == "head" else [None]
    patches = [(i, p, h) for i in layers for p in positions for h in heads]
    values = []
    for start in range(0, len(patches), rows_per_pass):
        chunk = patches[start:start + rows_per_pass]
        by_layer = defaultdict(list)
        for row, (i, p, h) in enumerate(chunk):
            by_layer[i].append((row, p, h))

        def patch(activation, layer, items):
            out = activation.clone()
            for row, p, h in items:
                where = (row, p) if h is None else (row, p, h)
                out[where] = 0.0 if sources is None else sources[layer][(0, *where[1:])]
            return out
        hooks = [ref.hook(component, i, lambda a, i=i, items=items: patch(a, i, items))
                 for i, items in by_layer.items()]
        logits = ref.run([base] * len(chunk), hooks, base_delta)
        values.extend(metric(logits[row:row + 1]) for row in range(len(chunk)))
    shape = [len(layers), len(positions)] + ([ref.heads] if component == "head" else [])
    return torch.stack(values).reshape(shape), clean_metric, corrupted_metric


def reference_atp(ref: Ref, component: str, setup: str, clean: list[int], corrupted: list[int], metric):
    layers = list(range(len(ref.module(ref.layout.layers))))
    source_ids, base_ids = (clean, corrupted) if setup == "denoising" else (corrupted, clean)
    sources, _ = ref.capture(component, layers, [source_ids])
    acts, logits = ref.capture(component, layers, [base_ids], grad=True)
    wrt = [acts[i] for i in layers]
    if component == "head":  # a head's activation is a view of the output projection's input: use that
        inputs: dict[int, torch.Tensor] = {}
        hooks = [ref.site("head", i).register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0]))
                 for i in layers]
        logits = ref.run([base_ids], hooks, grad=True)
        wrt = [inputs[i] for i in layers]
    with torch.enable_grad():
        grads = torch.autograd.grad(metric(logits), wrt)
    grads = [g.reshape(acts[i].shape) for i, g in zip(layers, grads, strict=True)]
    return torch.stack([(g * (sources[i] - acts[i])).sum(-1)[0] for i, g in zip(layers, grads, strict=True)])


# -- tiny models: every variant equals the reference -----------------------------------------------


@pytest.fixture(params=ARCHS)
def tiny(request):
    arch = request.param
    remote = request.getfixturevalue("tiny_remote")[arch]
    model, tokenizer = request.getfixturevalue("recipes_tiny_local")[arch]
    return remote, Ref(model, layout_of(remote)), tokenizer


@pytest.mark.parametrize("component", COMPONENTS)
def test_activation_patching_equals_plain_hooks_on_tiny_models(tiny, component, tmp_path):
    remote, ref, tokenizer = tiny
    clean, corrupted = ids_of(tokenizer, CLEAN), ids_of(tokenizer, CORRUPTED)
    dataset = [ids_of(tokenizer, text) for text in DATASET]
    assert all(len(ids) == len(clean) for ids in [corrupted, *dataset])
    metric = logit_diff(tokenizer)
    layers, n = [0, 1], len(clean)
    positions = list(range(n)) if component != "head" else [1, 3, 10, n - 1]
    for kind, setup in VARIANTS:
        kwargs = {"resample": {}, "zero": {}, "mean": {"dataset": DATASET}, "noise": {"seed": 3}}[kind]
        result = activation_patching(remote, CLEAN, CORRUPTED if kind == "resample" else None, metric,
                                     component=component, kind=kind, setup=setup,
                                     positions=None if component != "head" else positions,
                                     batch_size=16, passes_per_request=2, **kwargs)
        expected, clean_metric, corrupted_metric = reference_patching(
            ref, component, kind, setup, clean, corrupted, metric, layers, positions, dataset=dataset, seed=3)
        where = f"{component} {kind} {setup}"
        assert result.layers == layers and result.positions == positions, where
        assert result.values.shape == expected.shape, where
        assert torch.equal(result.values, expected), f"{where}: max diff {(result.values - expected).abs().max()}"
        assert result.clean_metric == clean_metric.item(), where
        if corrupted_metric is None:
            assert result.corrupted_metric is None, where
        else:
            assert result.corrupted_metric == corrupted_metric.item(), where
        assert result.effect.abs().max() > 0, where
    assert result.plot(tmp_path / f"{component}.png").stat().st_size > 0


def test_noise_options_and_chunking_on_tiny_llama(tiny_remote, recipes_tiny_local):
    """An explicit noise_std, noise on chosen positions only, chosen layers and negative positions,
    and a sweep cut into many small requests: all equal to the reference."""
    remote = tiny_remote["llama"]
    model, tokenizer = recipes_tiny_local["llama"]
    ref = Ref(model, layout_of(remote))
    clean = ids_of(tokenizer, CLEAN)
    metric = logit_diff(tokenizer)
    result = activation_patching(remote, CLEAN, None, metric, kind="noise", noise_std=0.5, seed=7,
                                 layers=[1], positions=[-1, 3], batch_size=4, passes_per_request=1)
    expected, _, noised = reference_patching(ref, "resid", "noise", "denoising", clean, None, metric, [1],
                                             [len(clean) - 1, 3], seed=7, noise_std=0.5)
    assert result.positions == [len(clean) - 1, 3]
    assert torch.equal(result.values, expected) and result.corrupted_metric == noised.item()

    # Noise on the first two positions only: later positions of the embeddings stay clean.
    partial = activation_patching(remote, CLEAN, None, metric, kind="noise", noise_positions=[0, 1],
                                  layers=[0], batch_size=8)
    delta = noise_delta(ref, clean, 0, None)
    delta[:, 2:] = 0
    assert partial.corrupted_metric == metric(ref.run([clean], delta=delta)).item()


def test_patching_refuses_what_it_cannot_do(tiny_remote):
    remote = tiny_remote["llama"]
    metric = logit_diff(remote.tokenizer)
    with pytest.raises(ValueError, match="same length"):
        activation_patching(remote, CLEAN, "When Mary and John went to the store, John gave", metric)
    with pytest.raises(ValueError, match="same length"):
        attribution_patching(remote, CLEAN, "When Mary went to the store", metric)
    with pytest.raises(ValueError, match="no corrupted run"):
        activation_patching(remote, CLEAN, None, metric, kind="zero", setup="denoising")
    with pytest.raises(ValueError, match="dataset"):
        activation_patching(remote, CLEAN, None, metric, kind="mean")
    with pytest.raises(ValueError, match="corrupted=None"):
        activation_patching(remote, CLEAN, CORRUPTED, metric, kind="noise")
    with pytest.raises(ValueError, match="component"):
        activation_patching(remote, CLEAN, CORRUPTED, metric, component="neuron")


@pytest.mark.parametrize("component", COMPONENTS)
@pytest.mark.parametrize("setup", ("denoising", "noising"))
def test_attribution_patching_equals_autograd_on_tiny_models(tiny, component, setup):
    remote, ref, tokenizer = tiny
    clean, corrupted = ids_of(tokenizer, CLEAN), ids_of(tokenizer, CORRUPTED)
    metric = logit_diff(tokenizer)
    result = attribution_patching(remote, CLEAN, CORRUPTED, metric, component=component, setup=setup)
    expected = reference_atp(ref, component, setup, clean, corrupted, metric)
    assert torch.equal(result.values, expected), f"max diff {(result.values - expected).abs().max()}"
    assert result.values.shape[:2] == (2, len(clean))
    assert torch.equal(result.effect, result.values)


# -- smollm2: IOI ----------------------------------------------------------------------------------

# Every third or fourth layer keeps the test quick on two CPU cores (the full 30 x 14 sweep is one
# request of 420 runs, ~20 s; its figures are in the README): the S2 -> final-token move happens
# between layers 22 and 23.
IOI_LAYERS = [0, 4, 8, 12, 16, 20, 23, 26, 29]
# The heads compared with AtP: every head of the second half of the network, at the final position,
# where the heads that move the name to the output are (all 30 layers: correlation 0.99 too).
HEAD_LAYERS = list(range(14, 30))


def test_ioi_on_smollm2(smol, smol_local, tmp_path):
    model, tokenizer = smol_local
    ref = Ref(model, layout_of(smol))
    clean, corrupted = ids_of(tokenizer, CLEAN), ids_of(tokenizer, CORRUPTED)
    metric = logit_diff(tokenizer)
    s2, end = 9, len(clean) - 1
    assert tokenizer.decode([clean[s2]]) == " John" and tokenizer.decode([corrupted[s2]]) == " Mary"

    started = time.perf_counter()
    exact = activation_patching(smol, CLEAN, CORRUPTED, metric, layers=IOI_LAYERS)
    elapsed = time.perf_counter() - started
    print(f"\nIOI resid sweep: {exact.values.numel()} patched runs in {elapsed:.1f} s")
    assert exact.clean_metric > 5 and exact.corrupted_metric < -5
    top = dict(zip(exact.layers, exact.top_positions(), strict=True))
    print("largest |effect| position by layer:", {layer: exact.labels[exact.positions.index(p)]
                                                  for layer, p in top.items()})
    assert all(top[layer] == s2 for layer in IOI_LAYERS if layer <= 20), top
    assert all(top[layer] == end for layer in IOI_LAYERS if layer >= 23), top
    # Denoising S2 early on restores the clean answer almost entirely; so does the final token late.
    recovered = exact.normalized()
    assert recovered[0, s2] > 0.9 and recovered[-1, end] > 0.9
    assert exact.plot(tmp_path / "ioi.png").stat().st_size > 0

    expected, clean_metric, corrupted_metric = reference_patching(
        ref, "resid", "resample", "denoising", clean, corrupted, metric, IOI_LAYERS, list(range(len(clean))))
    assert torch.equal(exact.values, expected), f"max diff {(exact.values - expected).abs().max()}"
    assert exact.clean_metric == clean_metric.item() and exact.corrupted_metric == corrupted_metric.item()

    atp = attribution_patching(smol, CLEAN, CORRUPTED, metric, layers=IOI_LAYERS)
    correlation = torch.corrcoef(torch.stack([atp.effect.flatten(), exact.effect.flatten()]))[0, 1].item()
    print(f"AtP vs exact, resid: correlation {correlation:.3f}")
    assert correlation > 0.5


def test_ioi_heads_atp_on_smollm2(smol, tmp_path):
    """Every head of the second half, patched at the final position (144 runs), against AtP's estimate."""
    metric = logit_diff(smol.tokenizer)
    started = time.perf_counter()
    exact = activation_patching(smol, CLEAN, CORRUPTED, metric, component="head", positions=[-1],
                                layers=HEAD_LAYERS)
    elapsed = time.perf_counter() - started
    atp = attribution_patching(smol, CLEAN, CORRUPTED, metric, component="head", positions=[-1],
                               layers=HEAD_LAYERS)
    assert exact.values.shape == atp.values.shape == (len(HEAD_LAYERS), 1, 9)
    correlation = torch.corrcoef(torch.stack([atp.effect.flatten(), exact.effect.flatten()]))[0, 1].item()
    top = exact.effect.abs().flatten().topk(5).indices.tolist()
    print(f"\nIOI head sweep at the final position: {exact.values.numel()} runs in {elapsed:.1f} s; "
          f"AtP vs exact, heads: correlation {correlation:.3f}; "
          f"top heads (layer.head): {[f'{HEAD_LAYERS[i // 9]}.{i % 9}' for i in top]}")
    # Measured 0.99 (0.99 over all 30 layers too): patching one head's output at the last position is a
    # small change, where the first-order estimate is good. The residual stream at S2 in early layers
    # is a large change through a saturating path, which is why resid correlates less (0.87).
    assert correlation > 0.8
    assert exact.plot(tmp_path / "heads.png").stat().st_size > 0
