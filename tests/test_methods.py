"""Every token reduction method, through the adapters: the token counts the schedule
says, protected tokens kept, sizes summing to the patch count where sizes exist,
exactness at r=0, independence of the batch, and the choices that tell them apart;
the one registry of methods, and no module telling methods apart by their names."""
import ast
import copy
import dataclasses
from pathlib import Path

import pytest
import timm
import torch

import tokenmerge
from tests.adapters.invariants import assert_sizes_and_sources_agree
from tokenmerge import methods
from tokenmerge.methods import METHODS, Evidence, class_attention, keep_attended

MERGING = ["tome", "tome-attended", "tome-random-split", "tome-unweighted", "tome-features"]
PRUNING = ["random", "evit", "evit-fuse"]
ALL = MERGING + PRUNING + ["cut"]


def tiny(**kwargs):
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, depth=4, **kwargs).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {"class token": tiny(), "distilled": timm.create_model(
        "deit_tiny_distilled_patch16_224", img_size=64, patch_size=8, depth=4).eval()}


def run(model, images, **settings):
    model = copy.deepcopy(model)
    tokenmerge.apply(model, **settings)
    counts = []
    hooks = [block.register_forward_hook(lambda m, i, o: counts.append(o.shape[1])) for block in model.blocks]
    with torch.no_grad():
        out = model(images)
    for hook in hooks:
        hook.remove()
    return out, counts, tokenmerge.get_state(model), model


def test_the_methods_are_the_known_ones():
    assert set(METHODS) == set(ALL)


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("kind", ["class token", "distilled"])
def test_token_counts_protected_tokens_and_sizes(models, method, kind):
    model = models[kind]
    images = torch.randn(3, 3, 64, 64)
    out, counts, state, patched = run(model, images, r=7, method=method, trace_source=True)
    assert counts == tokenmerge.token_counts(patched) == [65 + (kind == "distilled") - 7 * (i + 1) for i in range(4)]
    p = model.num_prefix_tokens
    assert state.num_protected == p
    assert torch.equal(state.source[:, :p], torch.arange(p).expand(3, -1)), "protected tokens stay in place"
    assert ((state.source[:, p:] >= p) | (state.source[:, p:] == -1)).all()
    if method in MERGING:
        assert_sizes_and_sources_agree(state, counts[0] + 7, 3)
    elif method == "evit-fuse":
        assert state.size is None and (state.source >= 0).all(), "every dropped token goes into the fused one"
        assert (state.source == counts[-1] - 1).any()
    else:
        assert state.size is None
        assert (state.source == -1).sum(dim=1).tolist() == [28] * 3, "pruning drops exactly r tokens per block"
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("method", ALL)
def test_r0_is_exact(models, method):
    model = models["class token"]
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)
    assert torch.equal(run(model, images, r=0, method=method)[0], expected)


@pytest.mark.parametrize("method", ALL)
def test_an_image_gives_the_same_output_alone_and_in_a_batch(models, method):
    model = models["class token"]
    images = torch.randn(4, 3, 64, 64)
    batched = run(model, images, r=7, method=method)[0]
    alone = torch.cat([run(model, images[i:i + 1], r=7, method=method)[0] for i in range(4)])
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)


def test_methods_differ_from_each_other(models):
    """Each ablation changes one choice, so each gives other outputs than merging."""
    model = models["class token"]
    images = torch.randn(2, 3, 64, 64)
    outputs = {method: run(model, images, r=7, method=method)[0] for method in ALL}
    no_prop = run(model, images, r=7, method="tome", prop_attn=False)[0]
    for method in ALL[1:]:
        assert not torch.allclose(outputs[method], outputs["tome"], atol=1e-4), method
    assert not torch.allclose(no_prop, outputs["tome"], atol=1e-4)


def test_unweighted_merging_ignores_sizes_but_counts_them():
    from tokenmerge.merge import bipartite_soft_matching
    from tokenmerge.methods import merge, merge_unweighted

    # token 0 (set A, value 0, 3 patches) matches token 1 (set B, value 4, 1 patch)
    x = torch.tensor([[[0.0], [4.0], [7.0], [9.0]]])
    size = torch.tensor([[[3.0], [1.0], [1.0], [1.0]]])
    matching = bipartite_soft_matching(torch.tensor([[[1.0, 0], [1, 0], [0, 1], [1, 0]]]), 1, 0)
    weighted, weighted_size, _ = merge(x, size, None, matching)
    plain, plain_size, _ = merge_unweighted(x, size, None, matching)
    # layout after the merge: the kept A token (7), then the B tokens (merged pair, 9)
    assert weighted.flatten().tolist() == [7.0, 1.0, 9.0]
    assert plain.flatten().tolist() == [7.0, 2.0, 9.0]
    assert weighted_size.flatten().tolist() == plain_size.flatten().tolist() == [1.0, 4.0, 1.0]


def test_evit_keeps_the_tokens_the_class_token_attends_to():
    torch.manual_seed(0)
    keys = torch.randn(2, 3, 9, 4)
    queries = torch.randn(2, 3, 9, 4)
    evidence = Evidence(torch.randn(2, 9, 12), queries, keys, None, 0)
    attention = class_attention(evidence)
    torch.testing.assert_close(attention.sum(dim=1), torch.ones(2))
    keep = keep_attended(evidence, 3, 1).keep
    for b in range(2):
        expected = attention[b, 1:].topk(5).indices.sort().values + 1
        assert keep[b].tolist() == [0, *expected.tolist()]
    fused = keep_attended(evidence, 3, 1, fuse=True)
    assert fused.keep.shape == (2, 5) and torch.allclose(fused.fuse.sum(dim=1), torch.ones(2))
    assert (fused.fuse.gather(1, fused.keep) == 0).all()


@pytest.mark.parametrize("method", ["evit", "tome-attended"])
def test_methods_reading_the_class_attention_need_a_class_token(method):
    model = tiny(global_pool="avg", class_token=False)
    tokenmerge.apply(model, r=4, method=method)
    with pytest.raises(ValueError, match="no class token"):
        model(torch.randn(1, 3, 64, 64))


def test_a_cost_keeps_a_token_from_merging_unless_its_link_is_better_by_more():
    from tokenmerge.merge import bipartite_soft_matching

    # A tokens 0, 2 and B tokens 1, 3: link 0-1 has similarity 1, link 2-3 similarity 0.8
    metric = torch.tensor([[[1.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0.8, 0.6]]])
    assert bipartite_soft_matching(metric, 1).merged.tolist() == [[0]]
    cost = torch.tensor([[0.0, 0.15, 0.0, 0.0]])  # B token 1 is costly: link 0-1 scores 0.85, still the best
    assert bipartite_soft_matching(metric, 1, cost=cost).merged.tolist() == [[0]]
    cost = torch.tensor([[0.15, 0.1, 0.0, 0.0]])  # both of its tokens are: 0.75 < 0.8
    assert bipartite_soft_matching(metric, 1, cost=cost).merged.tolist() == [[1]]


def test_tome_attended_spares_the_tokens_the_class_token_attends_to():
    from tokenmerge.methods import match_keys, match_keys_sparing_attended

    # class token, then four pairs of identical tokens (A at odd positions, B at even ones);
    # the class token's query points at the first pair, so that ToMe's first link is the attended one
    pairs = torch.eye(4) * 3
    keys = torch.cat([torch.zeros(1, 4), pairs.repeat_interleave(2, dim=0)]).view(1, 1, 9, 4)
    queries = torch.zeros(1, 1, 9, 4)
    queries[0, 0, 0] = torch.tensor([4.0, 0, 0, 0])
    evidence = Evidence(torch.randn(1, 9, 4), queries, keys, None, 0)
    assert match_keys(evidence, 1, 1).merged.tolist() == [[0]], "equal links: the first in index order"
    spared = match_keys_sparing_attended(evidence, 3, 1)
    assert sorted(spared.merged[0].tolist()) == [1, 2, 3], "the attended pair merges last"


def test_unknown_method_is_a_clear_error_listing_the_known_ones():
    with pytest.raises(ValueError, match="unknown token reduction method 'pruning'; known: tome, tome-attended, "
                                         "tome-random-split"):
        tokenmerge.apply(tiny(), r=4, method="pruning")


def test_methods_work_through_other_adapters():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=4,
                                                 hidden_dim=64, mlp_dim=128, num_classes=10).eval()
    images = torch.randn(2, 3, 32, 32)
    for method in ALL:
        tokenmerge.apply(model, r=3, method=method, trace_source=True)
        with torch.no_grad():
            model(images)
        state = tokenmerge.get_state(model)
        assert state.source.shape == (2, 17) and torch.equal(state.source[:, 0], torch.zeros(2, dtype=torch.long))
        assert len(set(state.source[0].tolist()) - {-1}) == 17 - 9
    tokenmerge.remove(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_keys_summed_over_heads_are_the_same_bits_for_any_batch(dtype):
    """Large batches copy the strided keys before summing, small ones do not: the sums
    must be the same bits either way, or an image would match differently alone and in
    a batch."""
    from tokenmerge.methods import sum_over_heads

    qkv = torch.randn(64, 197, 3, 6, 64).to(dtype)
    keys = qkv.permute(2, 0, 3, 1, 4)[1]
    assert not keys.is_contiguous() and keys.numel() > 1 << 17 > keys[:1].numel()
    assert torch.equal(sum_over_heads(keys[:1]), sum_over_heads(keys)[:1])


def test_the_flags_say_what_each_method_is():
    def flagged(flag):
        return {name for name, method in METHODS.items() if getattr(method, flag)}

    assert flagged("merges") == flagged("matches") == set(MERGING)
    assert flagged("needs_class_token") == {"tome-attended", "evit", "evit-fuse"}
    assert flagged("speed_reference") == {"cut"}


@pytest.fixture
def registered():
    """``tome`` registered again as ``tome-again``, removed afterwards."""
    methods.register("tome-again", dataclasses.replace(methods.resolve("tome")))
    yield "tome-again"
    methods.unregister("tome-again")


def test_a_registered_method_runs_through_apply(models, registered):
    model = models["class token"]
    images = torch.randn(2, 3, 64, 64)
    out, counts, state, _ = run(model, images, r=7, method=registered)
    assert state.method == registered and counts == [65 - 7 * (i + 1) for i in range(4)]
    torch.testing.assert_close(out, run(model, images, r=7, method="tome")[0], atol=0, rtol=0)
    assert tokenmerge.flops_per_image(model, 7, method=registered) == tokenmerge.flops_per_image(model, 7)


def test_a_taken_name_is_refused(registered):
    with pytest.raises(ValueError, match="'tome' is already registered"):
        methods.register("tome", methods.resolve("evit"))
    with pytest.raises(ValueError, match="'tome-again' is already registered"):
        methods.register(registered, methods.resolve("tome"))
    assert methods.resolve(registered).merges and methods.resolve("tome").plan is methods.match_keys


def test_the_registry_changes_only_through_register():
    with pytest.raises(TypeError):
        METHODS["mine"] = methods.resolve("tome")  # type: ignore[index]
    with pytest.raises(TypeError, match="is a tokenmerge.methods.Method"):
        methods.register("mine", methods.match_keys)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="library's own methods"):
        methods.unregister("tome")
    with pytest.raises(ValueError, match="unknown token reduction method 'mine'"):
        methods.unregister("mine")
    assert set(METHODS) == set(ALL)


ROOT = Path(__file__).parents[1]
SOURCES = sorted([*(ROOT / "tokenmerge").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")])
AFFIX_TESTS = {"startswith": str.startswith, "removeprefix": str.startswith,
               "endswith": str.endswith, "removesuffix": str.endswith}


def affix_tests_of_method_names(path: Path) -> list[int]:
    """Lines of ``path`` that call ``startswith`` or ``endswith`` (or remove a prefix or
    suffix) with a string that begins or ends a method's name: telling methods apart
    by name, where a flag of :class:`tokenmerge.methods.Method` says it."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args \
                and node.func.attr in AFFIX_TESTS:
            argument = node.args[0]
            texts = [element.value for element in (argument.elts if isinstance(argument, ast.Tuple) else [argument])
                     if isinstance(element, ast.Constant) and isinstance(element.value, str)]
            if any(AFFIX_TESTS[node.func.attr](name, text) for name in ALL for text in texts):
                lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("path", SOURCES, ids=[str(path.relative_to(ROOT)) for path in SOURCES])
def test_no_module_tells_methods_apart_by_their_names(path):
    assert not affix_tests_of_method_names(path), f"{path.relative_to(ROOT)}: use a flag of the method"
