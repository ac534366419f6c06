"""The tuned merge of :mod:`tokenmerge.kernels`, against the reference of
:mod:`tokenmerge.merge`: every dtype gives the reference's averages, the same bits alone
and in a batch."""
import pytest
import torch

from tests.test_merge import merge_repeatedly
from tokenmerge import kernels
from tokenmerge.merge import bipartite_soft_matching, merge_wavg


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_sizes", [False, True])
@pytest.mark.parametrize(
    "shape,r,p", [((2, 17, 4), 3, 1), ((3, 65, 32), 32, 1), ((1, 198, 64), 60, 2), ((4, 50, 8), 25, 0)]
)
def test_the_tuned_merge_gives_the_reference_merge(dtype, with_sizes, shape, r, p):
    """At any size, in any dtype, the tuned merge equals the plain size-weighted
    average: half precision is averaged in float32 and rounded once, so it agrees with
    the reference to the last bit or one rounding step."""
    x = torch.randn(shape).to(dtype)
    size = torch.randint(1, 9, (*shape[:2], 1)).float() if with_sizes else None
    m = bipartite_soft_matching(x.float(), r, p)
    merged, new_size = kernels.merge_weighted(x, size, m)
    expected, expected_size = merge_wavg(x, size, m)
    assert merged.dtype == dtype and new_size.dtype == torch.float32
    assert torch.equal(new_size, expected_size)
    # sizes are float32, so float64 features are weighed with float32 weights
    tolerance = {torch.float64: 1e-6, torch.float32: 1e-5}.get(dtype, 0)
    if tolerance:
        torch.testing.assert_close(merged, expected, rtol=tolerance, atol=tolerance)
    else:  # one rounding of a float32 value that may differ in its last bits
        spacing = torch.finfo(dtype).eps * expected.float().abs().clamp_min(1)
        assert ((merged.float() - expected.float()).abs() <= spacing).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_sizes", [False, True])
@pytest.mark.parametrize("batch,tokens,channels", [(8, 197, 192), (64, 197, 384)])
def test_an_image_merges_to_the_same_bits_alone_and_in_any_batch(dtype, with_sizes, batch, tokens, channels):
    """Features, sizes and gradients of an image are the same bits alone and in a batch,
    in every dtype: last-bit float32 differences once became whole half-precision
    rounding steps under autocast and chose other merges downstream, moving the shared
    ViT-Ti's logits by up to 1.4. r is near its limit, so many A tokens join one B token."""
    x = torch.randn(batch, tokens, channels).to(dtype)
    size = torch.randint(1, 9, (batch, tokens, 1)).float() if with_sizes else None
    m_alone = bipartite_soft_matching(x[:1].float(), 90, 1)
    m_batch = bipartite_soft_matching(x.float(), 90, 1)
    assert torch.equal(m_alone.order, m_batch.order[:1])
    destination = kernels.rows(m_alone).destination
    assert destination.unique().numel() < destination.numel() - 20
    alone = kernels.merge_weighted(x[:1], None if size is None else size[:1], m_alone)
    in_batch = kernels.merge_weighted(x, size, m_batch)
    assert torch.equal(alone[0], in_batch[0][:1]) and torch.equal(alone[1], in_batch[1][:1])
    upstream = torch.randn(batch, tokens - 90, channels).to(dtype)
    grads = []
    for inputs, matching, up in ((x[:1], m_alone, upstream[:1]), (x, m_batch, upstream)):
        leaf = inputs.clone().requires_grad_()
        kernels.merge_weighted(leaf, None if size is None else size[:len(inputs)], matching)[0].backward(up)
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1][:1])


def test_half_precision_merge_keeps_range_on_the_tuned_path():
    x = torch.full((1, 200, 4), 60000.0, dtype=torch.float16)
    merged, size, _ = merge_repeatedly(x, [50, 50, 25], num_protected=0, merge_weighted=kernels.merge_weighted)
    assert merged.dtype == torch.float16 and torch.isfinite(merged).all()
    torch.testing.assert_close(merged.float(), torch.full(merged.shape, 60000.0), rtol=2e-3, atol=0)


@pytest.mark.parametrize("num_out, num_added, channels", [(5, 8, 16), (300, 2000, 384)])
def test_add_rows_adds_repeated_rows_up_one_after_another_in_their_order(num_out, num_added, channels):
    """Repeated destinations add up exactly as a loop over the rows does, to the bit
    (values of very different magnitudes make any other order round differently), also
    where the kernels split the work over threads."""
    generator = torch.Generator().manual_seed(0)
    out = torch.randn(num_out, channels, generator=generator)
    rows = torch.randint(0, num_out, (num_added,), generator=generator)
    rows[:8] = torch.tensor([4, 0, 4, 2, 4, 0, 4, 4])
    added = torch.randn(num_added, channels, generator=generator) * torch.logspace(-4, 4, num_added).unsqueeze(1)
    expected = out.clone()
    for row, value in zip(rows.tolist(), added):
        expected[row] += value
    result = kernels.add_rows(out, rows, added)
    assert result is out
    assert torch.equal(out, expected)


@pytest.mark.parametrize("with_sizes", [False, True])
def test_merge_gradient_is_exact_with_tokens_merged_into_the_same_destination(with_sizes):
    """The tuned merge writes its gradient by hand; it must equal the numerical one and
    autograd's through the reference merge, also where several A tokens join one B token."""
    torch.manual_seed(0)
    x = torch.randn(3, 41, 8, dtype=torch.float64)
    size = torch.randint(1, 4, (3, 41, 1)).double() if with_sizes else None
    m = bipartite_soft_matching(x, 20, num_protected=1)
    destination = kernels.rows(m).destination
    assert destination.unique().numel() < destination.numel()
    assert torch.autograd.gradcheck(lambda t: kernels.merge_weighted(t, size, m)[0], (x.clone().requires_grad_(),))
    upstream = torch.randn(3, 21, 8, dtype=torch.float64)
    by_hand, by_autograd = x.clone().requires_grad_(), x.clone().requires_grad_()
    merged = kernels.merge_weighted(by_hand, size, m)[0]
    assert "CorrectedRows" in type(merged.grad_fn.next_functions[0][0]).__name__
    merged.backward(upstream)
    merge_wavg(by_autograd, size, m)[0].backward(upstream)
    torch.testing.assert_close(by_hand.grad, by_autograd.grad, rtol=0, atol=1e-6 if size is None else 1e-12)


def test_merge_gradient_in_bfloat16_is_weighed_in_float32():
    """Half-precision gradients of the hand-written backward keep their range and
    agree with the float64 gradient to bfloat16 precision."""
    torch.manual_seed(0)
    x = torch.randn(2, 41, 8, dtype=torch.float64)
    size = torch.randint(1, 50, (2, 41, 1)).float()
    m = bipartite_soft_matching(x, 20, num_protected=1)
    upstream = torch.randn(2, 21, 8, dtype=torch.float64)
    half, exact = x.bfloat16().requires_grad_(), x.clone().requires_grad_()
    kernels.merge_weighted(half, size, m)[0].backward(upstream.bfloat16())
    kernels.merge_weighted(exact, size.double(), m)[0].backward(upstream)
    assert half.grad.dtype == torch.bfloat16
    torch.testing.assert_close(half.grad.double(), exact.grad, rtol=2e-2, atol=2e-2)


# --- grid merges (ToMe for Stable Diffusion) ---------------------------------------------------


def test_grid_destinations_take_one_token_per_whole_cell():
    from tokenmerge.merge import grid_destinations

    choice = torch.tensor([[0, 3], [1, 2]])  # places in 2 x 2 cells, row * sx + column
    destinations, sources = grid_destinations(5, 4, 2, 2, choice)
    # the fifth row has no whole cell: its tokens are all sources
    assert destinations.tolist() == [0, 7, 9, 14]
    assert sorted(destinations.tolist() + sources.tolist()) == list(range(20))
    assert torch.equal(sources, sources.sort().values)
    both, _ = grid_destinations(5, 4, 2, 2, choice, frames=2)
    assert both.tolist() == [0, 7, 9, 14, 20, 27, 29, 34]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("height, width, sx, sy, r", [(8, 8, 2, 2, 40), (6, 9, 3, 2, 10), (4, 4, 2, 2, 12)])
def test_the_tuned_grid_merge_and_unmerge_give_the_reference(dtype, height, width, sx, sy, r):
    """Matching equal to float rounding (the same links on random features); merge and
    unmerge by row numbers equal to the reference's gathers and scatters."""
    from tokenmerge.merge import grid_bipartite_matching, grid_destinations, merge_mean, unmerge_grid

    x = torch.randn(3, height * width, 16)
    choice = torch.randint(sx * sy, (height // sy, width // sx))
    destinations, sources = grid_destinations(height, width, sx, sy, choice)
    reference = grid_bipartite_matching(x, destinations, sources, r)
    tuned = kernels.grid_matching(x, destinations, sources, r)
    assert torch.equal(tuned.merged, reference.merged) and torch.equal(tuned.partner, reference.partner)
    rows = kernels.grid_rows(reference)
    features = x.to(dtype)
    expected = merge_mean(features.float(), reference)
    merged = kernels.merge_mean_rows(features, rows)
    assert merged.dtype == dtype and merged.shape == (3, height * width - r, 16)
    assert torch.allclose(merged.float(), expected, atol=1e-6 if dtype == torch.float32 else 1e-2)
    assert torch.equal(kernels.unmerge_rows(merged, rows), unmerge_grid(merged, reference))
    # unmerging a merge gives every kept source and destination back as it was
    kept = torch.cat([sources[reference.kept[0]], destinations])
    assert torch.equal(kernels.unmerge_rows(merged, rows)[0, kept], merged[0])
