"""The reference algorithm of :mod:`tokenmerge.merge`: matching, the size-weighted merge,
source maps and unmerging."""
import pytest
import torch

from tokenmerge.merge import (
    bipartite_soft_matching,
    initial_source,
    max_merges,
    merge_source,
    merge_wavg,
    unmerge,
)


def merge_repeatedly(x, rs, num_protected, merge_weighted=merge_wavg):
    """Merge ``x`` with keys = features for every r in ``rs``; returns features, sizes, source."""
    size, source = None, initial_source(x.shape[0], x.shape[1])
    for r in rs:
        matching = bipartite_soft_matching(x, r, num_protected)
        source = merge_source(source, matching)
        x, size = merge_weighted(x, size, matching)
    return x, size, source


def test_matching_partitions_set_a_and_links_into_set_b():
    metric = torch.randn(3, 21, 8)
    m = bipartite_soft_matching(metric, r=4, num_protected=1)
    num_a, num_b = 10, 10
    assert m.merged.shape == (3, 4) and m.kept.shape == (3, num_a - 4)
    both = torch.cat([m.kept, m.merged], dim=1).sort(dim=1).values
    assert torch.equal(both, torch.arange(num_a).expand(3, -1))
    assert ((m.destination >= 0) & (m.destination < num_b)).all()


def test_matching_picks_most_similar_pairs():
    # A tokens 0..3 at even positions, B tokens at odd ones; A1 is a copy of B2, A3 nearly a copy of B0.
    b = torch.eye(4)
    a = torch.stack([torch.tensor([1.0, 1, 1, 1]), b[2], torch.tensor([1.0, 1, -1, -1]), b[0] + 0.01])
    metric = torch.stack([a, b], dim=1).reshape(1, 8, 4)
    m = bipartite_soft_matching(metric, r=2)
    assert m.merged.tolist() == [[1, 3]]
    assert m.destination.tolist() == [[2, 0]]


def test_r_beyond_half_the_mergeable_tokens_is_refused():
    assert max_merges(11, 1) == 5
    with pytest.raises(ValueError, match="at most 5"):
        bipartite_soft_matching(torch.randn(1, 11, 4), r=6, num_protected=1)


@pytest.mark.parametrize("num_protected", [0, 1, 5])
def test_sizes_sum_to_token_count_and_protected_tokens_stay(num_protected):
    x = torch.randn(4, 50 + num_protected, 8)
    merged, size, source = merge_repeatedly(x, [10, 10, 8, 5], num_protected)
    assert merged.shape[1] == x.shape[1] - 33
    assert torch.equal(size.sum(1).squeeze(-1), torch.full((4,), float(x.shape[1])))
    assert torch.equal(size[:, :num_protected], torch.ones(4, num_protected, 1))
    torch.testing.assert_close(merged[:, :num_protected], x[:, :num_protected], rtol=0, atol=0)
    assert torch.equal(source[:, :num_protected], torch.arange(num_protected).expand(4, -1))


def test_merged_token_is_the_mean_of_the_patches_it_covers():
    x = torch.randn(3, 41, 6, dtype=torch.float64)
    merged, size, source = merge_repeatedly(x, [10, 8, 6, 4], num_protected=1)
    for b in range(3):
        counts = torch.bincount(source[b], minlength=merged.shape[1])
        assert torch.equal(counts.to(size.dtype), size[b, :, 0])
        for token in range(merged.shape[1]):
            members = x[b, source[b] == token]
            torch.testing.assert_close(merged[b, token], members.mean(0))


def test_unmerge_spreads_tokens_back_over_their_patches():
    x = torch.randn(2, 30, 4)
    merged, _, source = merge_repeatedly(x, [7, 5], num_protected=0)
    spread = unmerge(merged, source)
    assert spread.shape == x.shape
    for b in range(2):
        for i in range(30):
            assert torch.equal(spread[b, i], merged[b, source[b, i]])


def test_half_precision_merge_keeps_range():
    x = torch.full((1, 200, 4), 60000.0, dtype=torch.float16)
    merged, size, _ = merge_repeatedly(x, [50, 50, 25], num_protected=0)
    assert merged.dtype == torch.float16 and torch.isfinite(merged).all()
    torch.testing.assert_close(merged.float(), torch.full(merged.shape, 60000.0), rtol=2e-3, atol=0)
    assert size.dtype == torch.float32 and size.max() >= 4


def test_merged_and_kept_tokens_keep_their_input_order():
    """Only the set of merged tokens depends on the scores; the layout after a merge
    lists each group by index, so scores a rounding apart cannot reorder tokens."""
    metric = torch.randn(3, 41, 8, generator=torch.Generator().manual_seed(3))
    matching = bipartite_soft_matching(metric, 7, num_protected=1)
    for group in (matching.merged, matching.kept):
        assert torch.equal(group, group.sort(dim=1).values)
    scores = torch.nn.functional.normalize(metric[:, 1::2], dim=-1) @ torch.nn.functional.normalize(
        metric[:, 2::2], dim=-1).mT
    best = scores.amax(-1)
    merged_scores, kept_scores = best.gather(1, matching.merged), best.gather(1, matching.kept)
    assert (merged_scores.amin(1) >= kept_scores.amax(1)).all()
