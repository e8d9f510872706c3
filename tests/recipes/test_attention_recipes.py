"""`attention_patterns` and `head_scores` against the model's own eager `output_attentions`.

The reference is a local copy of the same weights switched to eager attention, called as the server
calls it (`model(ids, use_cache=False, output_attentions=True)`). Reading `attn_probs` makes the server
run eager attention too, so patterns are compared exactly. Scores are means of those probabilities,
taken here with explicit (query, key) index lists rather than the recipe's diagonals; the mean's
summation order differs, so they are compared to 1e-6.
"""

from __future__ import annotations

import pytest
import torch

from farscope.recipes import AttentionPatternsResult, HeadScoresResult, attention_patterns, head_scores

IOI = "When Mary and John went to the store, John gave a drink to"


def eager_attentions(model, ids: torch.Tensor) -> torch.Tensor:
    """[layers, batch, heads, query, key] from the model's own `output_attentions`."""
    with torch.no_grad():
        out = model(ids, use_cache=False, output_attentions=True)
    return torch.stack(out.attentions)


def reference_scores(attentions: torch.Tensor, kind: str, seq_len: int, offset: int) -> torch.Tensor:
    """[layers, heads]: the documented definitions, with explicit query → key pairs."""
    n, s = seq_len, offset
    total = attentions.shape[-1]
    if kind == "induction":
        pairs = [(s + n + j, s + j + 1) for j in range(n)]
    elif kind == "duplicate_token":
        pairs = [(s + n + j, s + j) for j in range(n)]
    else:
        pairs = [(q, q - 1) for q in range(1, total)]
    queries, keys = zip(*pairs, strict=True)
    return attentions[..., list(queries), list(keys)].mean(dim=(1, 3))   # over batch and pairs


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_attention_patterns_equal_eager_output_attentions(arch, tiny_remote, recipes_tiny_local,
                                                         tiny_eager, tmp_path):
    _, tokenizer = recipes_tiny_local[arch]
    ids = torch.tensor([tokenizer(IOI)["input_ids"]])
    expected = eager_attentions(tiny_eager[arch], ids)[:, 0]      # [layers, heads, q, k]

    everything = attention_patterns(tiny_remote[arch], IOI)
    assert isinstance(everything, AttentionPatternsResult)
    assert torch.equal(everything.patterns, expected)
    assert everything.layers == [0, 1] and everything.heads == [0, 1, 2, 3]
    assert everything.tokens == [tokenizer.decode([t]) for t in ids[0].tolist()]

    some = attention_patterns(tiny_remote[arch], IOI, layers=[1], heads=[3, 0])
    assert torch.equal(some.patterns, expected[[1]][:, [3, 0]])
    path = some.plot(tmp_path / "patterns.png")
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("kind", ["induction", "previous_token", "duplicate_token"])
def test_head_scores_equal_the_reference_on_tiny_models(kind, tiny_remote, tiny_eager, tmp_path):
    for arch in ("llama", "gpt2", "gpt_neox"):
        result = head_scores(tiny_remote[arch], kind=kind, seq_len=12, batch=3, seed=1)
        assert isinstance(result, HeadScoresResult) and result.kind == kind
        assert result.ids.shape == (3, 24)                 # the tiny tokenizer has no BOS
        assert torch.equal(result.ids[:, :12], result.ids[:, 12:])
        assert all(len(set(row)) == 12 for row in result.ids[:, :12].tolist())   # distinct tokens per row
        expected = reference_scores(eager_attentions(tiny_eager[arch], result.ids), kind, 12, 0)
        torch.testing.assert_close(result.scores, expected, rtol=0, atol=1e-6)
    assert result.plot(tmp_path / f"{kind}.png").stat().st_size > 1000


def test_head_scores_are_reproducible_and_checked(tiny_remote):
    model = tiny_remote["llama"]
    a = head_scores(model, seq_len=8, batch=2, seed=3)
    b = head_scores(model, seq_len=8, batch=2, seed=3)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.scores, b.scores)
    assert not torch.equal(a.ids, head_scores(model, seq_len=8, batch=2, seed=4).ids)
    with pytest.raises(ValueError, match="kind"):
        head_scores(model, kind="copying")


def test_smollm2_has_induction_and_previous_token_heads(smol, smol_eager, tmp_path):
    found = {}
    for kind in ("induction", "previous_token"):
        result = head_scores(smol, kind=kind)           # seq_len=50, batch=4, seed=0, after BOS
        assert result.ids.shape == (4, 101) and result.meta["prepend_bos"]
        expected = reference_scores(eager_attentions(smol_eager, result.ids), kind, 50, 1)
        torch.testing.assert_close(result.scores, expected, rtol=0, atol=1e-6)
        found[kind] = result.top(5)
        assert found[kind][0][1] > 0.5, found[kind]
        assert result.plot(tmp_path / f"{kind}.png").stat().st_size > 1000
    print("smollm2 top heads:", {k: [(lh, round(v, 3)) for lh, v in top] for k, top in found.items()})
