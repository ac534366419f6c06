"""torch.compile and torch.export of patched models, and the eager passes after them:
shape caches must not keep tensors made while tracing, and nothing about a pass may
depend on a batch size that is symbolic."""
import pytest
import torch

import tokenmerge
from tests.adapters.test_contract import CASES_BY_ID, R, images, make, run


@pytest.mark.parametrize("case_id", ["timm_class_token", "torchvision_vit", "open_clip_tok"])
def test_eager_passes_after_an_export_return_real_tensors_equal_to_before(case_id):
    """Once, exporting poisoned the shape caches: every later eager pass at that shape,
    of any patched model, returned fake tensors."""
    case = CASES_BY_ID[case_id]
    model, other = tokenmerge.apply(make(case), r=R), tokenmerge.apply(make(case), r=R)
    x = images(2)
    before, other_before = run(case, model, x), run(case, other, x)
    torch.export.export(model, (x,))
    after, other_after = run(case, model, x), run(case, other, x)
    assert type(after) is torch.Tensor and type(other_after) is torch.Tensor
    assert torch.equal(after, before) and torch.equal(other_after, other_before)
    assert type(tokenmerge.get_state(model).size) is torch.Tensor


class MainOutput(torch.nn.Module):
    """A case's main output as a module's forward, for export."""

    def __init__(self, case, model):
        super().__init__()
        self.case, self.model = case, model

    def forward(self, images):
        return self.case.output(self.model, images)


@pytest.mark.parametrize("case_id", ["timm_class_token", "timm_eva02_rope_swiglu", "torchvision_vit", "open_clip_avg"])
def test_export_with_a_dynamic_batch_gives_the_eager_outputs(case_id):
    case = CASES_BY_ID[case_id]
    model = tokenmerge.apply(make(case), r=R)
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(MainOutput(case, model), (images(2),), dynamic_shapes=({0: batch},)).module()
    for size in (1, 3, 5):
        x = images(size, seed=size)
        with torch.no_grad():
            torch.testing.assert_close(exported(x), run(case, model, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case_id", ["timm_class_token", "timm_dinov3_rope_registers", "torchvision_vit",
                                     "open_clip_avg", "transformers_vit",
                                     *(pytest.param(case, marks=pytest.mark.slow) for case in (
                                         "timm_rope_mixed", "transformers_siglip",
                                         "transformers_dinov3_registers_swiglu"))])
def test_a_compiled_model_has_no_graph_break_and_eager_passes_after_it_are_exact(case_id):
    case = CASES_BY_ID[case_id]
    model = tokenmerge.apply(make(case), r=R, trace_source=True)
    x = images(2)
    forward = lambda images: case.output(model, images)  # noqa: E731
    before = run(case, model, x)
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(forward)(x)
    assert explained.graph_break_count == 0, [reason.reason for reason in explained.break_reasons]
    compiled = torch.compile(forward, backend="eager")
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), before, atol=1e-6, rtol=1e-6)
        assert tokenmerge.get_state(model).size.shape == (2, tokenmerge.token_counts(model)[-1], 1)
        compiled(images(2, seed=1))  # another pass: nothing of the last one is guarded on
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
        after = run(case, model, x)
    assert type(after) is torch.Tensor and torch.equal(after, before)


@pytest.mark.parametrize("case_id", ["transformers_vit", "transformers_dinov2_registers", "transformers_siglip",
                                     "transformers_dinov3_registers_swiglu"])
def test_a_merging_transformers_model_exports_with_a_dynamic_batch_and_the_eager_outputs(case_id):
    """transformers builds an attention mask over the unmerged tokens while exporting,
    even when the caller passed none: it hides nothing, and is left out."""
    case = CASES_BY_ID[case_id]
    model = tokenmerge.apply(make(case), r=R)
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(MainOutput(case, model), (images(2),), dynamic_shapes=({0: batch},)).module()
    for size in (1, 3):
        x = images(size, seed=size)
        torch.testing.assert_close(exported(x), run(case, model, x), atol=1e-5, rtol=1e-5)


def test_exporting_with_the_callers_attention_mask_is_refused_and_remove_drops_the_hook():
    case = CASES_BY_ID["transformers_vit"]
    model = tokenmerge.apply(make(case), r=R)
    x, mask = images(2), torch.ones(2, 1, 1, 1)

    class WithMask(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, images, mask):
            return self.model(pixel_values=images, attention_mask=mask).logits

    with pytest.raises(NotImplementedError, match="does not support an attention_mask while merging"):
        torch.export.export(WithMask(), (x, mask))
    tokenmerge.remove(model)
    assert not model.vit._forward_pre_hooks
    assert torch.equal(WithMask()(x, mask), make(case)(pixel_values=x, attention_mask=mask).logits)


METHODS = ["tome", "tome-attended", "tome-random-split", "tome-unweighted", "tome-features", "random", "evit",
           "evit-fuse", "cut"]


def compile_cleanly(case, model, x):
    """The output of ``model`` compiled with fullgraph=True, and dynamo's counters."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(lambda images: case.output(model, images), fullgraph=True, backend="eager")
    return compiled(x), compiled


@pytest.mark.parametrize("method", [pytest.param(m, marks=() if m in ("tome", "random") else pytest.mark.slow)
                                    for m in METHODS])
@pytest.mark.parametrize("trace_source", [False, True])
def test_every_method_compiles_in_one_graph_with_the_eager_outputs(method, trace_source):
    case = CASES_BY_ID["timm_class_token"]
    model = tokenmerge.apply(make(case), r=R, method=method, trace_source=trace_source)
    x = images(2)
    expected = run(case, model, x)
    with torch.no_grad():
        out, _ = compile_cleanly(case, model, x)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_training_compiles_in_one_graph_with_the_eager_gradients():
    case = CASES_BY_ID["timm_class_token"]
    model = tokenmerge.apply(make(case), r=R).train()
    model.blocks[0].drop_path = torch.nn.Identity()
    x = images(2)
    torch.manual_seed(0)
    case.output(model, x).square().sum().backward()
    expected = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    model.zero_grad()
    torch.manual_seed(0)
    out, _ = compile_cleanly(case, model, x)
    out.square().sum().backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    for name, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-5, rtol=1e-4)


def test_a_new_r_recompiles_once_and_a_seen_one_or_another_batch_never():
    case = CASES_BY_ID["timm_class_token"]
    model = tokenmerge.apply(make(case), r=2)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(lambda images: case.output(model, images), fullgraph=True, backend="eager",
                             dynamic=True)
    graphs = []
    with torch.no_grad():
        for r, batch in [(2, 2), (2, 3), (2, 5), (4, 2), (2, 4), (4, 3), (3, 2)]:
            tokenmerge.get_state(model).r = r
            torch.testing.assert_close(compiled(images(batch)), run(case, model, images(batch)), atol=1e-6, rtol=1e-6)
            graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs == [1, 1, 1, 2, 2, 2, 3]


def test_a_compiled_merging_model_under_autocast_gives_an_image_the_same_bits_alone_and_in_a_batch():
    """Compiled, as eager: under bfloat16 autocast an image's merged output alone and in
    a batch of 96 are the same bits, as the compiled unpatched model's are."""
    case = CASES_BY_ID["timm_class_token"]
    model, x = make(case), images(96)

    def alone_and_together():
        compiled = torch.compile(model, dynamic=False)  # each batch size its own graph, as a server warms up
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return compiled(x[:1]), compiled(x)[:1]

    unpatched_alone, unpatched_together = alone_and_together()
    if not torch.equal(unpatched_alone, unpatched_together):
        pytest.skip("this machine's compiled bfloat16 kernels give an image other results alone than in a batch")
    tokenmerge.apply(model, r=R)
    alone, together = alone_and_together()
    assert torch.equal(alone, together)


@pytest.mark.parametrize("case_id, features", [
    ("timm_dinov3_rope_registers", lambda model, x: model.forward_features(x)),
    ("transformers_dinov3_registers_swiglu", lambda model, x: model(pixel_values=x).last_hidden_state),
])
def test_dense_features_export_with_the_source_map_of_the_traced_pass(case_id, features):
    """``dense=True`` under torch.export spreads the tokens with the source map of the
    pass it traces: exported before or after an eager call, every input token's row
    is what eager gives."""
    model = tokenmerge.apply(make(CASES_BY_ID[case_id]), r=R, dense=True)

    class Features(torch.nn.Module):
        def forward(self, x):
            return features(model, x)

    exported = torch.export.export(Features(), (images(2),)).module()
    with torch.no_grad():
        features(model, images(2, seed=7))  # an eager pass in between, with other merges
        for seed in (1, 2):
            x = images(2, seed=seed)
            expected = features(model, x)
            assert expected.shape[1] == tokenmerge.get_state(model).num_input_tokens
            torch.testing.assert_close(exported(x), expected, atol=1e-5, rtol=1e-5)
