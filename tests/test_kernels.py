"""The tuned merge of :mod:`tokenmerge.kernels`, against the reference of
:mod:`tokenmerge.merge`: every path, dtype and threshold gives the reference's averages."""
import pytest
import torch

from tests.test_merge import merge_repeatedly
from tokenmerge import kernels
from tokenmerge.merge import bipartite_soft_matching, merge_wavg


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["scaled_sums", "corrections"])
@pytest.mark.parametrize("with_sizes", [False, True])
@pytest.mark.parametrize(
    "shape,r,p", [((2, 17, 4), 3, 1), ((3, 65, 32), 32, 1), ((1, 198, 64), 60, 2), ((4, 50, 8), 25, 0)]
)
def test_every_path_gives_the_reference_merge(dtype, path, with_sizes, shape, r, p):
    """Both formulations, at any size, in any dtype, equal the plain size-weighted
    average: half precision is averaged in float32 and rounded once on both paths, so
    they agree with the reference to the last bit or one rounding step."""
    x = torch.randn(shape).to(dtype)
    size = torch.randint(1, 9, (*shape[:2], 1)).float() if with_sizes else None
    m = bipartite_soft_matching(x.float(), r, p)
    merged, new_size = getattr(kernels, f"merge_{path}")(x, size, m)
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a_token_merges_the_same_alone_and_in_a_large_batch(dtype):
    """Alone an image is below the size threshold of the two formulations and in a batch
    of 8 above it. In half precision it must merge bit for bit the same (the formulations
    once turned last-bit float32 differences into whole rounding steps, which moved the
    shared ViT-Ti's logits by up to 3 between batch 1 and 8); in float32 to rounding."""
    x = torch.randn(8, 197, 192).to(dtype)
    size = torch.randint(1, 9, (8, 197, 1)).float()
    m_alone = bipartite_soft_matching(x[:1].float(), 40, 1)
    m_batch = bipartite_soft_matching(x.float(), 40, 1)
    alone, _ = kernels.merge_weighted(x[:1], size[:1], m_alone)
    batch, _ = kernels.merge_weighted(x, size, m_batch)
    assert x[:1].numel() < kernels.FEW_VALUES <= x.numel()
    if dtype == torch.float32:
        torch.testing.assert_close(alone, batch[:1], rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(alone, batch[:1])


def test_half_precision_merge_keeps_range_on_the_tuned_path():
    x = torch.full((1, 200, 4), 60000.0, dtype=torch.float16)
    merged, size, _ = merge_repeatedly(x, [50, 50, 25], num_protected=0, merge_weighted=kernels.merge_weighted)
    assert merged.dtype == torch.float16 and torch.isfinite(merged).all()
    torch.testing.assert_close(merged.float(), torch.full(merged.shape, 60000.0), rtol=2e-3, atol=0)


@pytest.mark.parametrize("first", [True, False])
def test_both_merge_formulations_agree(first, monkeypatch):
    x = torch.randn(3, 41, 16, dtype=torch.float64)
    size = None if first else torch.randint(1, 5, (3, 41, 1)).double().float()
    m = bipartite_soft_matching(x, 10, num_protected=1)
    few = kernels.merge_scaled_sums(x, size, m)
    many = kernels.merge_corrections(x, size, m)
    torch.testing.assert_close(few[0], many[0])
    assert torch.equal(few[1], many[1])
    monkeypatch.setattr(kernels, "FEW_VALUES", 0)
    torch.testing.assert_close(kernels.merge_weighted(x, size, m)[0], many[0], rtol=0, atol=0)


@pytest.mark.parametrize("values", [1, 1 << 20], ids=["index_add", "index_put"])
def test_add_rows_adds_repeated_rows_up_whichever_kernel_it_picks(values, monkeypatch):
    """Few added values take ``index_put_``, many ``index_add_`` (on the CPU); both must
    add every row, repeated destinations included, exactly as a loop does."""
    monkeypatch.setattr(kernels, "FEW_ADDED_VALUES", values)
    out = torch.randn(5, 16, dtype=torch.float64)
    rows = torch.tensor([4, 0, 4, 2, 4, 0])
    added = torch.randn(6, 16, dtype=torch.float64)
    expected = out.clone()
    for row, value in zip(rows.tolist(), added):
        expected[row] += value
    result = kernels.add_rows(out, rows, added)
    assert result is out
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("with_sizes", [False, True])
def test_merge_gradient_is_exact_with_tokens_merged_into_the_same_destination(with_sizes):
    """The large-input merge writes its gradient by hand; it must equal the numerical
    one and autograd's through the other formulation, also where several A tokens
    join one B token."""
    torch.manual_seed(0)
    x = torch.randn(3, 41, 8, dtype=torch.float64)
    size = torch.randint(1, 4, (3, 41, 1)).double() if with_sizes else None
    m = bipartite_soft_matching(x, 20, num_protected=1)
    destination = kernels.rows(m).destination
    assert destination.unique().numel() < destination.numel()
    assert torch.autograd.gradcheck(lambda t: kernels.merge_corrections(t, size, m)[0], (x.clone().requires_grad_(),))
    upstream = torch.randn(3, 21, 8, dtype=torch.float64)
    by_hand, by_autograd = x.clone().requires_grad_(), x.clone().requires_grad_()
    merged = kernels.merge_corrections(by_hand, size, m)[0]
    assert "CorrectedRows" in type(merged.grad_fn.next_functions[0][0]).__name__
    merged.backward(upstream)
    kernels.merge_scaled_sums(by_autograd, size, m)[0].backward(upstream)
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
    kernels.merge_corrections(half, size, m)[0].backward(upstream.bfloat16())
    kernels.merge_corrections(exact, size.double(), m)[0].backward(upstream)
    assert half.grad.dtype == torch.bfloat16
    torch.testing.assert_close(half.grad.double(), exact.grad, rtol=2e-2, atol=2e-2)
