"""Stable Diffusion UNets: the same output as tomesd (a peer test against tomesd from
PyPI) for every option, exact at ratio 0 and after remove, per-row merges in a guidance
batch, seeded random destinations, SDXL's levels, pipelines, and errors before changes."""
from __future__ import annotations

import copy

import pytest
import torch

import tokenmerge
from tests.adapters.diffusion_models import UNETS, denoise, sd_unet, seeded

tomesd = pytest.importorskip("tomesd")

#: tomesd's and tokenmerge's outputs agree to float rounding: attention over the same merged
#: tokens in another order sums in another order (outputs are of order 1).
PEER_TOLERANCE = 1e-5

#: Every option varied, each with another: (options, also on the SDXL-like UNet).
OPTION_SETS = [
    ({}, True),
    ({"ratio": 0.3, "sx": 3, "sy": 3}, False),  # cells that do not divide the grid
    ({"ratio": 0.75}, False),  # the cap: every source merged
    ({"merge_attn": False, "merge_crossattn": True}, False),
    ({"merge_crossattn": True, "merge_mlp": True, "sx": 4, "sy": 2}, True),
    ({"max_downsample": 8, "merge_mlp": True, "ratio": 0.6}, True),
]
PEER_CASES = [pytest.param(kind, options, id=f"{kind}-" + ",".join(f"{k}={v}" for k, v in options.items()))
              for options, on_sdxl in OPTION_SETS for kind in (("sd", "sdxl") if on_sdxl else ("sd",))]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny UNets run fastest on one thread (several threads over such small tensors wait
    on each other, the more so on a busy machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def positional(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """One call with the sample, timestep and text given positionally, as tomesd's hook reads them."""
    inputs = dict(inputs)
    with torch.no_grad():
        return model(inputs.pop("sample"), inputs.pop("timestep"), inputs.pop("encoder_hidden_states"), **inputs,
                     return_dict=False)[0]


def tomesd_output(unet: torch.nn.Module, inputs: dict, options: dict) -> torch.Tensor:
    peer = copy.deepcopy(unet)
    tomesd.apply_patch(peer, use_rand=False, **{"ratio": 0.5, **options})
    return positional(peer, inputs)


@pytest.mark.parametrize("kind, options", PEER_CASES)
def test_the_output_equals_tomesds_for_every_option_set(kind, options):
    build, inputs_of = UNETS[kind]
    unet, inputs = build(), inputs_of(2)
    if kind == "sdxl":
        options = {"max_downsample": 2, **options}  # tomesd's default 1 merges nothing in SDXL
    expected = tomesd_output(unet, inputs, options)
    unpatched = denoise(unet, inputs)
    tokenmerge.apply(unet, use_rand=False, **options)
    merged = denoise(unet, inputs)
    assert (merged - expected).abs().max() < PEER_TOLERANCE
    assert (merged - unpatched).abs().max() > 100 * PEER_TOLERANCE  # merging changed something


@pytest.mark.parametrize("kind", sorted(UNETS))
def test_ratio_zero_and_remove_are_exact(kind):
    build, inputs_of = UNETS[kind]
    unet, inputs = build(), inputs_of(2)
    unpatched, classes = denoise(unet, inputs), [type(module) for module in unet.modules()]
    state_dict = {name: tensor.clone() for name, tensor in unet.state_dict().items()}
    tokenmerge.apply(unet, ratio=0.0)
    assert torch.equal(denoise(unet, inputs), unpatched)
    tokenmerge.remove(unet)
    tokenmerge.apply(unet, ratio=0.5, merge_mlp=True)
    assert not torch.equal(denoise(unet, inputs), unpatched)
    tokenmerge.remove(unet)
    assert not tokenmerge.is_applied(unet)
    assert [type(module) for module in unet.modules()] == classes
    assert not unet._forward_pre_hooks and not any("_tokenmerge" in key for m in unet.modules() for key in vars(m))
    assert all(torch.equal(tensor, state_dict[name]) for name, tensor in unet.state_dict().items())
    assert torch.equal(denoise(unet, inputs), unpatched)


def test_every_row_of_a_guidance_batch_merges_as_it_would_alone():
    build, inputs_of = UNETS["sd"]
    unet, inputs = build(), inputs_of(2)
    tokenmerge.apply(unet, use_rand=False, merge_mlp=True)
    batch = denoise(unet, inputs)
    for row in range(2):
        alone = {name: value[row:row + 1] if isinstance(value, torch.Tensor) else value
                 for name, value in inputs.items()}
        assert (denoise(unet, alone) - batch[row:row + 1]).abs().max() < PEER_TOLERANCE


def test_random_destinations_follow_the_seed():
    build, inputs_of = UNETS["sd"]
    inputs = inputs_of(2)

    def output(**options) -> torch.Tensor:
        unet = build()
        tokenmerge.apply(unet, **options)
        return denoise(unet, inputs)

    first = output(seed=3)
    assert torch.equal(output(seed=3), first)
    assert torch.equal(output(generator=torch.Generator().manual_seed(3)), first)
    assert not torch.equal(output(seed=4), first)
    assert not torch.equal(output(use_rand=False), first)


def test_sdxl_merges_by_default_where_its_attention_is():
    build, inputs_of = UNETS["sdxl"]
    unet, inputs = build(), inputs_of(2)
    expected = tomesd_output(unet, inputs, {"max_downsample": 2})
    tokenmerge.apply(unet, use_rand=False)
    assert tokenmerge.get_state(unet).settings.max_downsample == 2
    assert (denoise(unet, inputs) - expected).abs().max() < PEER_TOLERANCE


def test_a_setting_that_merges_nowhere_is_an_error_naming_the_levels():
    unet = UNETS["sdxl"][0]()
    with pytest.raises(ValueError, match=r"max_downsample=1 merges in no block .* downsample 2, 4; give "):
        tokenmerge.apply(unet, max_downsample=1)
    assert not tokenmerge.is_applied(unet)


@pytest.mark.parametrize("options, message", [
    ({"ratio": 1.0}, "ratio must be a number in"),
    ({"ratio": -0.1}, "ratio must be a number in"),
    ({"sx": 0}, "sx must be a positive int"),
    ({"sy": 1.5}, "sy must be a positive int"),
    ({"max_downsample": 0}, "max_downsample must be a positive int"),
    ({"use_rand": 1}, "use_rand must be True or False"),
    ({"merge_mlp": "yes"}, "merge_mlp must be True or False"),
    ({"seed": 1, "generator": torch.Generator()}, "seed or generator, not both"),
])
def test_bad_values_are_one_line_errors_before_any_change(options, message):
    unet = UNETS["sd"][0]()
    classes = [type(module) for module in unet.modules()]
    with pytest.raises(ValueError, match=message):
        tokenmerge.apply(unet, **options)
    assert [type(module) for module in unet.modules()] == classes and not unet._forward_pre_hooks


def test_vision_transformer_options_are_refused_for_a_unet_and_diffusion_options_elsewhere():
    unet = UNETS["sd"][0]()
    with pytest.raises(TypeError, match="r are not options of diffusion models"):
        tokenmerge.apply(unet, r=4)
    with pytest.raises(TypeError, match="ratio are options of diffusion models"):
        tokenmerge.apply(torch.nn.Linear(2, 2), ratio=0.5)
    tokenmerge.apply(unet)
    with pytest.raises(TypeError, match="already applied"):
        tokenmerge.apply(unet)


def test_an_unsupported_diffusers_model_is_a_one_line_type_error_naming_it():
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)
    with pytest.raises(TypeError, match="does not merge tokens in diffusers' AutoencoderKL"):
        tokenmerge.apply(vae)


class Pipeline:
    """What tokenmerge reads of a diffusers pipeline: the denoiser it holds."""

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet


def test_a_pipeline_is_patched_through_its_unet():
    build, inputs_of = UNETS["sd"]
    unet, inputs = build(), inputs_of(2)
    expected = tomesd_output(unet, inputs, {})
    pipe = Pipeline(unet)
    assert tokenmerge.apply(pipe, use_rand=False) is pipe
    assert tokenmerge.is_applied(pipe) and tokenmerge.is_applied(unet)
    assert tokenmerge.get_state(pipe) is tokenmerge.get_state(unet)
    assert (denoise(unet, inputs) - expected).abs().max() < PEER_TOLERANCE
    assert tokenmerge.remove(pipe) is pipe
    assert not tokenmerge.is_applied(unet)


def test_compiles_in_one_graph_whole_and_by_repeated_blocks():
    """torch.compile of the patched UNet has no graph break, and diffusers'
    compile_repeated_blocks finds the patched blocks (they keep their class name) and
    compiles each in one graph (the eager backend: what is checked is the tracing)."""
    unet = seeded(sd_unet)()
    inputs = UNETS["sd"][1](2)
    tokenmerge.apply(unet, use_rand=False)
    expected = denoise(unet, inputs)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(unet)(**inputs, return_dict=False)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    unet.compile_repeated_blocks(fullgraph=True, backend="eager")
    blocks = [module for module in unet.modules() if tokenmerge.is_applied(module)][1:]
    assert blocks and all(block._compiled_call_impl is not None for block in blocks)
    assert (denoise(unet, inputs) - expected).abs().max() < PEER_TOLERANCE


def test_a_stable_diffusion_pipeline_generates_as_with_tomesd_and_exactly_after_remove():
    pytest.importorskip("transformers")
    from tests.adapters.diffusion_models import SIZE, tiny_pipeline

    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)

    def generate() -> torch.Tensor:
        return pipe("a cat", num_inference_steps=2, height=SIZE, width=SIZE, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    unmerged = generate()
    tomesd.apply_patch(pipe, ratio=0.5, use_rand=False)
    expected = generate()
    tomesd.remove_patch(pipe)
    assert tokenmerge.apply(pipe, use_rand=False) is pipe
    merged = generate()
    assert (merged - expected).abs().max() < PEER_TOLERANCE
    assert not torch.equal(merged, unmerged)
    tokenmerge.remove(pipe)
    assert torch.equal(generate(), unmerged)


def test_a_non_square_latent_merges_as_with_tomesd():
    build, inputs_of = UNETS["sd"]
    unet, inputs = build(), inputs_of(2, width=24)
    for options in ({}, {"max_downsample": 4, "merge_mlp": True}):
        expected = tomesd_output(unet, inputs, options)
        tokenmerge.apply(unet, use_rand=False, **options)
        assert (denoise(unet, inputs) - expected).abs().max() < PEER_TOLERANCE
        tokenmerge.remove(unet)


def test_a_block_whose_forward_another_library_wrapped_is_refused_before_any_change():
    unet = UNETS["sd"][0]()
    block = next(module for module in unet.modules() if type(module).__name__ == "BasicTransformerBlock")
    block.forward = block.forward  # what accelerate's hooks do: a forward of the module's own
    with pytest.raises(TypeError, match="apply tokenmerge first, then enable offloading"):
        tokenmerge.apply(unet)
    assert not tokenmerge.is_applied(unet)
