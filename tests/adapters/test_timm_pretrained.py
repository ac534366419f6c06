"""The real ViT-Ti AugReg checkpoint on 500 real ImageNet photographs."""
from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import tokenmerge
from tests.conftest import predict


@pytest.fixture(scope="module")
def pretrained(timm_vit_tiny, imagenet_sample):
    return (timm_vit_tiny, *imagenet_sample)


def test_accuracy_on_the_shared_sample(pretrained, timm_sample_predictions):
    model, images, labels = pretrained
    assert len(labels) == 500
    plain = timm_sample_predictions()
    rows = [("timm", plain)] + [(f"r={r}", timm_sample_predictions(r)) for r in (8, 13)]
    top1 = {name: (pred == labels).float().mean().item() * 100 for name, pred in rows}
    print("\nViT-Ti AugReg on the 500-image ImageNet sample")
    print(f"{'setting':>8} | {'tokens left':>11} | {'top-1 %':>7}")
    for name, _ in rows:
        r = 0 if name == "timm" else int(name[2:])
        print(f"{name:>8} | {tokenmerge.token_counts(model, r=r)[-1]:>11} | {top1[name]:7.1f}")
    at_r0 = tokenmerge.apply(copy.deepcopy(model), r=0)
    assert torch.equal(predict(at_r0, images[:100]), plain[:100]), "r=0 must predict exactly what plain timm predicts"
    assert top1["timm"] == pytest.approx(82.6, abs=0.05)
    assert top1["timm"] - top1["r=8"] <= 1.5


@pytest.mark.parametrize("r", [13, 16])
def test_two_threads_on_real_photographs_get_what_sequential_calls_get(pretrained, r):
    """A threaded server's use: two threads with batches of 2 and 3 real photographs
    each call one merged model; every logit equals that of the same call made alone."""
    import threading

    model, images, _ = pretrained
    inputs = [images[:40].split(2), images[40:100].split(3)]
    tokenmerge.apply(model, r=r)
    try:
        with torch.no_grad():
            expected = [[model(batch) for batch in batches] for batches in inputs]
        results = [[], []]

        def call(index):
            with torch.no_grad():
                results[index].extend(model(batch) for batch in inputs[index])

        threads = [threading.Thread(target=call, args=(index,)) for index in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        tokenmerge.remove(model)
    for got, want in zip(results, expected):
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))


def kernel_batch_dependence(block: torch.nn.Module, token_counts: list[int], dtype: torch.dtype) -> str | None:
    """Whether this machine's own ``dtype`` kernels of a block (its four linear layers,
    attention, and the matching's product of keys) give one image other results alone
    than in a batch of 8 at any of ``token_counts``, those after every merge: a merged
    model runs them at token counts the unmerged model never has, and cannot be more
    batch-independent than they are."""
    generator = torch.Generator().manual_seed(0)
    layers = [block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2]
    for n in sorted(set(token_counts)):
        for layer in layers:
            x = torch.randn(8, n, layer.in_features, generator=generator).to(dtype)
            weight, bias = layer.weight.to(dtype), layer.bias.to(dtype)
            if not torch.equal(F.linear(x[:1], weight, bias), F.linear(x, weight, bias)[:1]):
                return f"a {layer.in_features}-to-{layer.out_features} linear layer at {n} tokens"
        q, k, v = torch.randn(3, 8, 3, n, 64, generator=generator).to(dtype)
        if not torch.equal(F.scaled_dot_product_attention(q[:1], k[:1], v[:1]),
                           F.scaled_dot_product_attention(q, k, v)[:1]):
            return f"attention at {n} tokens"
        a, b = torch.randn(2, 8, n // 2, 64, generator=generator).to(dtype)
        if not torch.equal(torch.bmm(a[:1], b[:1].mT), torch.bmm(a, b.mT)[:1]):
            return f"the matching's product of keys at {n} tokens"
    return None


def assert_batch_independent(model: torch.nn.Module, x: torch.Tensor, autocast_dtype: torch.dtype | None) -> None:
    """A photograph's logits alone and in the batch ``x`` are the same bits."""
    autocast = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        together = model(x)
        for index in range(len(x)):
            assert torch.equal(model(x[index:index + 1]), together[index:index + 1]), f"photograph {index}"


def skip_where_kernels_depend_on_the_batch(model: torch.nn.Module, r: int, dtype: torch.dtype) -> None:
    with torch.no_grad():
        dependent = kernel_batch_dependence(model.blocks[0], tokenmerge.token_counts(model, r=r), dtype)
    if dependent:
        pytest.skip(f"this machine's {dtype} kernels give an image other results alone than in a batch for "
                    f"{dependent}, a shape the unmerged model never runs")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_do_not_depend_on_the_batch(pretrained, dtype):
    """The shared ViT-Ti merged at r=13 in half precision: a photograph's logits alone
    and in a batch of 8 are the same bits, as unpatched, wherever the machine's own
    kernels are batch-independent at the merged token counts."""
    model, images, _ = pretrained
    skip_where_kernels_depend_on_the_batch(model, 13, dtype)
    half = tokenmerge.apply(copy.deepcopy(model).to(dtype), r=13)
    assert_batch_independent(half, images[:8].to(dtype), None)


@pytest.mark.parametrize("r", [13, pytest.param(8, marks=pytest.mark.slow), pytest.param(16, marks=pytest.mark.slow)])
def test_autocast_logits_do_not_depend_on_the_batch(pretrained, r):
    """Under bfloat16 autocast (float32 residual stream, bfloat16 products) the shared
    ViT-Ti's logits of 8 photographs alone and together are the same bits unpatched,
    and so merged: a merge path once chosen by the batch's size moved them by up to 1.4."""
    model, images, _ = pretrained
    assert_batch_independent(model, images[:8], torch.bfloat16)
    skip_where_kernels_depend_on_the_batch(model, r, torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tokenmerge.CappedRWarning)
        assert_batch_independent(tokenmerge.apply(copy.deepcopy(model), r=r), images[:8], torch.bfloat16)


@pytest.mark.parametrize("amp", [None, pytest.param(torch.bfloat16, marks=pytest.mark.slow)],
                         ids=["float32", "autocast-bfloat16"])
@pytest.mark.parametrize("r", [13, pytest.param(8, marks=pytest.mark.slow), pytest.param(16, marks=pytest.mark.slow)])
def test_outputs_of_every_photograph_do_not_depend_on_the_batch(pretrained, r, amp):
    """Scores a rounding apart once reordered the kept tokens, and so every later A/B
    split: 2 to 5 of the 500 photographs came out differently in batches of 7 and of
    100, one with another top-1 class. The kept tokens now keep their input order. In
    float32 the logits agree to rounding and the top-1 classes exactly; under autocast
    the logits are the same bits."""
    model, images, _ = pretrained
    if amp:
        skip_where_kernels_depend_on_the_batch(model, r, amp)
    merged = tokenmerge.apply(copy.deepcopy(model), r=r)
    autocast = torch.autocast("cpu", dtype=amp) if amp else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        large = torch.cat([merged(batch) for batch in images.split(100)])
        small = torch.cat([merged(batch) for batch in images.split(7)])
    assert torch.equal(small.argmax(-1), large.argmax(-1))
    if amp:
        assert torch.equal(small, large)
    else:
        torch.testing.assert_close(small, large, atol=1e-4, rtol=1e-4)
