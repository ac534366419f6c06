"""The merge step's cost in operations: how many kernel-launching operations a merging
block runs beyond the same block unpatched, counted with a dispatch mode, so that a
change cannot add launches back unnoticed. On a GPU each is a kernel launch, on the CPU
a per-operation overhead; at batch 1 they are most of what merging costs."""
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tokenmerge
from tests.adapters.test_contract import CASES_BY_ID, R, images, make

#: Operations that launch no kernel: views, metadata and allocation without a fill.
NOT_LAUNCHING = frozenset({
    "view", "_unsafe_view", "reshape", "_reshape_alias", "slice", "select", "narrow", "unsqueeze", "squeeze",
    "permute", "transpose", "t", "mT", "expand", "unbind", "split", "split_with_sizes", "as_strided", "alias", "detach",
    "empty", "empty_like", "new_empty", "empty_strided", "lift_fresh", "sym_size", "sym_stride", "sym_numel",
    "is_same_size", "dim", "size", "stride", "to", "contiguous",  # these two dispatch a copy when they make one
})

#: Kernel-launching operations a merging block may run beyond the unpatched block
#: (at most 15 is the goal; ToMe's own merge step runs about 40 in this count).
MAX_EXTRA_PER_MERGING_BLOCK = 26


class CountOperations(TorchDispatchMode):
    """Counts the ATen operations run inside it, by name."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def launching_operations(model: torch.nn.Module, x: torch.Tensor) -> Counter:
    with torch.inference_mode():
        model(x)  # shape-only indices are made on the first call and kept
        with CountOperations() as counter:
            model(x)
    return Counter({name: count for name, count in counter.counts.items() if name not in NOT_LAUNCHING})


def test_a_merging_block_launches_few_operations_beyond_the_unpatched_block():
    model = make(CASES_BY_ID["timm_class_token"]).eval()
    x = images(4)
    unpatched = launching_operations(model, x)
    tokenmerge.apply(model, r=R)
    merging_blocks = sum(1 for r in tokenmerge.get_state(model).r_per_block if r)
    merged = launching_operations(model, x)
    extra = merged.total() - unpatched.total()
    by_name = {name: merged[name] - unpatched[name] for name in merged | unpatched if merged[name] != unpatched[name]}
    assert merging_blocks > 0
    assert extra <= MAX_EXTRA_PER_MERGING_BLOCK * merging_blocks, f"{extra / merging_blocks:.1f} per block: {by_name}"
