"""Per-pass state: settings taken once per pass, side tensors that follow reductions,
and what copies of a state carry."""
import pickle

import pytest
import torch

import tokenmerge
from tests.adapters.test_contract import CASES_BY_ID, R, images, make
from tokenmerge.methods import METHODS
from tokenmerge.state import MergeState, Pass


def test_a_setting_changed_during_a_pass_applies_from_the_next_pass():
    model = tokenmerge.apply(make(CASES_BY_ID["timm_class_token"]), r=R)
    state = tokenmerge.get_state(model)
    counts = []
    model.blocks[0].register_forward_hook(lambda module, args, out: setattr(state, "r", 2))
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, out: counts.append(out.shape[1]))
    with torch.no_grad():
        model(images(1))
        assert counts == [65 - R, 65 - 2 * R, 65 - 3 * R]
        counts.clear()
        model(images(1))
    assert counts == [63, 61, 59]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_side_tensors_follow_every_reduction(method):
    """A per-token side tensor (here each token's own position) is reduced with the
    tokens: every output token carries the position of an input token it holds."""
    num_protected = 1
    state = MergeState(depth=2, r=5, method=method, trace_source=True, num_protected=num_protected)
    run = Pass(state, first_block=0, num_input_tokens=21)
    x = torch.randn(2, 21, 8)
    queries = keys = x.view(2, 1, 21, 8)
    position = torch.arange(21.0).view(1, 21, 1).expand(2, -1, -1)
    run.set_side(0, "position", position)
    plan = run.plan(0, x, queries, keys)
    out = run.reduce(0, x, plan)
    followed = run.side(1, "position")
    assert followed.shape == (2, out.shape[1], 1)
    assert torch.equal(followed[:, :num_protected], position[:, :num_protected])
    source = run.sources[1]
    for b in range(2):
        for token, held in enumerate(followed[b, :, 0].long().tolist()):
            assert source[b, held] == token or method == "evit-fuse" and token == out.shape[1] - 1


def test_averaged_side_tensors_are_the_size_weighted_means_of_the_tokens_they_hold():
    """Coordinates attached as an averaged side come out as the size-weighted mean of the
    input coordinates each output token holds (read from the source map), after two
    merges, so sizes above 1 weigh in."""
    state = MergeState(depth=2, r=5, trace_source=True, num_protected=1)
    run = Pass(state, first_block=0, num_input_tokens=21)
    x = torch.randn(2, 21, 8)
    coordinates = torch.randn(2, 21, 2, dtype=torch.float64)
    run.set_side(0, "coordinates", coordinates, averaged=True)
    for block in range(2):
        tokens = x.view(2, 1, -1, 8)
        x = run.reduce(block, x, run.plan(block, x, tokens, tokens))
    averaged, source = run.side(2, "coordinates"), run.sources[2]
    assert averaged.shape == (2, x.shape[1], 2)
    for b in range(2):
        for token in range(x.shape[1]):
            held = source[b] == token
            torch.testing.assert_close(averaged[b, token], coordinates[b, held].mean(dim=0))


def test_a_pass_that_reduces_nothing_keeps_its_side_tensors():
    state = MergeState(depth=2, r=0, num_protected=1)
    run = Pass(state, first_block=0, num_input_tokens=5)
    side = torch.randn(1, 5, 2)
    run.set_side(0, "angles", side)
    run.pass_through(0)
    assert run.side(1, "angles") is side


def test_copies_of_a_state_carry_its_settings_and_none_of_its_passes():
    model = tokenmerge.apply(make(CASES_BY_ID["timm_class_token"]), r=R, trace_source=True)
    with torch.no_grad():
        model(images(2))
    state = tokenmerge.get_state(model)
    assert state.size is not None
    copied = pickle.loads(pickle.dumps(state))
    assert (copied.r, copied.trace_source, copied.num_protected) == (R, True, 1)
    assert copied.size is None and copied.sizes == {}


def test_apply_to_a_patched_model_changes_only_what_it_is_given():
    """``apply(model, r=8)`` keeps the method, attention and tracing set before, as
    assigning ``get_state(model).r = 8`` does; what it names, it changes."""
    by_apply = tokenmerge.apply(make(CASES_BY_ID["timm_class_token"]), r=R, method="evit", trace_source=True,
                                prop_attn=False)
    by_assignment = tokenmerge.apply(make(CASES_BY_ID["timm_class_token"]), r=R, method="evit", trace_source=True,
                                     prop_attn=False)
    tokenmerge.apply(by_apply, r=8)
    tokenmerge.get_state(by_assignment).r = 8
    for model in (by_apply, by_assignment):
        state = tokenmerge.get_state(model)
        assert (state.r, state.method, state.trace_source, state.prop_attn) == (8, "evit", True, False)
    tokenmerge.apply(by_apply, r=4, method="tome", prop_attn=True)
    state = tokenmerge.get_state(by_apply)
    assert (state.r, state.method, state.trace_source, state.prop_attn) == (4, "tome", True, True)


@pytest.mark.parametrize("wrap", ["compile", "data_parallel", "distributed_data_parallel"])
def test_wrapped_models_are_patched_through_the_model_they_wrap(wrap):
    """What a user means by applying to a ``torch.compile`` wrapper, ``DataParallel`` or
    ``DistributedDataParallel``: the model inside is patched, the wrapper returned, and
    every entry point sees through it."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    model = make(CASES_BY_ID["timm_class_token"])
    if wrap == "compile":
        wrapper = torch.compile(model)
    elif wrap == "data_parallel":
        wrapper = DataParallel(model)
    else:  # built without a process group, as the wrapper's own tests do
        wrapper = DistributedDataParallel.__new__(DistributedDataParallel)
        torch.nn.Module.__init__(wrapper)
        wrapper.module = model
    assert tokenmerge.apply(wrapper, r=R) is wrapper
    assert tokenmerge.is_applied(wrapper) and tokenmerge.is_applied(model)
    assert tokenmerge.get_state(wrapper) is tokenmerge.get_state(model)
    assert tokenmerge.token_counts(wrapper) == [65 - R, 65 - 2 * R, 65 - 3 * R]
    assert tokenmerge.flops_per_image(wrapper) == tokenmerge.flops_per_image(model)
    if wrap == "data_parallel":  # on the CPU DataParallel calls the model itself
        with torch.no_grad():
            assert torch.equal(wrapper(images(2)), model(images(2)))
    assert tokenmerge.remove(wrapper) is wrapper and not tokenmerge.is_applied(model)


@pytest.mark.parametrize("build", ["resnet18", "convit_tiny"])
def test_token_counts_and_flops_of_a_model_that_cannot_be_patched_say_why(build):
    import timm

    model = timm.create_model(build, pretrained=False)
    for entry in (tokenmerge.token_counts, tokenmerge.flops_per_image):
        with pytest.raises(TypeError, match=f"does not support timm's {type(model).__name__}"):
            entry(model, r=8)


def test_a_copy_counts_its_calls_in_its_own_state():
    """The hooks that count a model's calls in flight (for ``remove``) belong to the
    copy's own state after ``deepcopy``, not to the original's."""
    import copy

    model = tokenmerge.apply(make(CASES_BY_ID["timm_class_token"]), r=R)
    twin = copy.deepcopy(model)
    hooks = list(twin._forward_pre_hooks.values()) + list(twin.blocks._forward_pre_hooks.values())
    assert hooks and all(hook.__self__ is tokenmerge.get_state(twin).passes for hook in hooks)
    assert tokenmerge.get_state(twin).passes is not tokenmerge.get_state(model).passes


def test_passes_interleaved_in_one_call_keep_their_own_sizes():
    """Inside one open call, each block continues the pass whose output it is given,
    not the pass that ran last: two images run block by block in turn merge as they
    do alone."""
    model = tokenmerge.apply(make(CASES_BY_ID["timm_class_token"]), r=R).eval()
    passes = tokenmerge.get_state(model).passes
    first, second = images(1), images(1) * -1.5
    with torch.no_grad():
        alone = [model.forward_features(x) for x in (first, second)]
        passes.enter_call(model, ())
        try:
            tokens = [model.norm_pre(model._pos_embed(model.patch_embed(x))) for x in (first, second)]
            for block in model.blocks:
                tokens = [block(x) for x in tokens]
        finally:
            passes.leave_call(model, (), None)
        interleaved = [model.norm(x) for x in tokens]
    for got, expected in zip(interleaved, alone):
        assert torch.equal(got, expected)


def test_a_call_keeps_no_tokens_once_it_returns():
    """The pass of a finished call lets go of the tokens it returned: they are freed
    when the caller drops them."""
    import gc
    import weakref

    model = tokenmerge.apply(make(CASES_BY_ID["timm_class_token"]), r=R).eval()
    with torch.no_grad():
        out = model.blocks(model._pos_embed(model.patch_embed(images(2))))
    assert tokenmerge.get_state(model).size.shape[1] == out.shape[1]
    freed = weakref.ref(out)
    del out
    gc.collect()
    assert freed() is None
