"""Checks every adapter's merged state must pass, shared by the adapter tests."""
import torch


def assert_sizes_and_sources_agree(state, num_tokens: int, batch: int) -> None:
    """After a merged pass with ``trace_source``: sizes sum to the ``num_tokens`` that
    entered, protected tokens kept size 1 and their own place, no patch went into a
    protected token, and every token's size is the number of input tokens in it."""
    p = state.num_protected
    assert torch.equal(state.size.sum(1).flatten(), torch.full((batch,), float(num_tokens)))
    assert torch.equal(state.size[:, :p], torch.ones(batch, p, 1))
    assert torch.equal(state.source[:, :p], torch.arange(p).expand(batch, -1))
    assert (state.source[:, p:] >= p).all()
    for b in range(batch):
        counts = torch.bincount(state.source[b], minlength=state.size.shape[1]).float()
        assert torch.equal(counts, state.size[b, :, 0])
