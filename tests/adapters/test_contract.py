"""The contract every adapter keeps, written once and run for every library and model
class through the ``case`` fixture; the per-library files test only what is specific to
their library (exact twin merges, pooling, refusals, real weights).

A new adapter adds its tiny models to ``CASES``.
"""
from __future__ import annotations

import contextlib
import copy
import multiprocessing
import pickle
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch
from torch import Tensor, nn

import tokenmerge
import tokenmerge.attention as proportional
from tests.adapters.invariants import assert_sizes_and_sources_agree
from tokenmerge.adapters import find_adapter

IMAGE, PATCH, WIDTH, DEPTH = 32, 4, 48, 3
NUM_PATCHES = (IMAGE // PATCH) ** 2
R = 6  # 64 patches merge to 46 after three blocks
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Case:
    """A tiny random model of one supported class, how to get its main output, and its
    inputs (``inputs(batch, seed=0)``: images, unless it takes videos or spectrograms)."""

    id: str
    build: Callable[[], nn.Module]
    output: Callable[[nn.Module, Tensor], Tensor] = lambda model, images: model(images)
    inputs: Callable[..., Tensor] = lambda batch, seed=0: images(batch, seed)
    #: The tokens the model gives for dense tasks, (B, N, C), or None where it gives none.
    features: Optional[Callable[[nn.Module, Tensor], Tensor]] = lambda model, images: model.forward_features(images)


def timm_vit(**kwargs) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=3,
                             num_classes=7, **kwargs)


def timm_eva(**kwargs) -> nn.Module:
    from timm.models.eva import Eva

    return Eva(img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=3, num_classes=7, **kwargs)


def timm_distilled() -> nn.Module:
    from timm.models.deit import VisionTransformerDistilled

    return VisionTransformerDistilled(img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=3,
                                      num_classes=7)


def hf(config_name: str, model_name: str, **extra) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        transformers = pytest.importorskip("transformers")
        config = getattr(transformers, config_name)(
            hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=3, image_size=IMAGE, patch_size=PATCH,
            **extra,
        )
        return getattr(transformers, model_name)(config)
    return build


def hf_clip() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99,
                bos_token_id=0, eos_token_id=2)
    vision = dict(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=3, image_size=IMAGE,
                  patch_size=PATCH, intermediate_size=96)
    return transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))


FRAMES, TIME = 2, 36  # a video's frames (one tubelet deep), a spectrogram's time steps (by IMAGE frequencies)


def videos(batch: int, seed: int = 0) -> Tensor:
    return torch.randn(batch, FRAMES, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def spectrograms(batch: int, seed: int = 0) -> Tensor:
    return torch.randn(batch, TIME, IMAGE, generator=torch.Generator().manual_seed(seed))


def hf_audio() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.ASTConfig(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=3,
                                    intermediate_size=96, patch_size=PATCH, frequency_stride=PATCH, time_stride=PATCH,
                                    max_length=TIME, num_mel_bins=IMAGE, num_labels=7)
    return transformers.ASTForAudioClassification(config)


def hf_output(model: nn.Module, images: Tensor) -> Tensor:
    out = model(pixel_values=images)
    return out.logits if hasattr(out, "logits") else out.pooler_output


def hf_features(tower: str = "", key: str = "pixel_values") -> Callable[[nn.Module, Tensor], Tensor]:
    """The ``last_hidden_state`` of a transformers model's ``tower`` (the model itself for "")."""
    def features(model: nn.Module, inputs: Tensor) -> Tensor:
        return (getattr(model, tower) if tower else model)(**{key: inputs}).last_hidden_state
    return features


def torchvision_features(model: nn.Module, images: Tensor) -> Tensor:
    """What torchvision's ``VisionTransformer.forward`` computes before its head: the encoder's tokens."""
    tokens = model._process_input(images)
    return model.encoder(torch.cat([model.class_token.expand(tokens.shape[0], -1, -1), tokens], dim=1))


def open_clip_features(model: nn.Module, images: Tensor) -> Tensor:
    """The patch tokens of open_clip's tower, as ``output_tokens=True`` returns them."""
    model.visual.output_tokens = True
    try:
        return model.visual(images)[1]
    finally:
        model.visual.output_tokens = False


def torchvision_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=IMAGE, patch_size=PATCH, num_layers=DEPTH, num_heads=3, hidden_dim=WIDTH,
                             mlp_dim=96, num_classes=7)


def open_clip_model(**vision) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        model_module = pytest.importorskip("open_clip.model")
        vision_cfg = model_module.CLIPVisionCfg(layers=DEPTH, width=WIDTH, head_width=16, patch_size=PATCH,
                                                image_size=IMAGE, **vision)
        text_cfg = model_module.CLIPTextCfg(context_length=8, vocab_size=50, width=32, heads=2, layers=1)
        return model_module.CLIP(embed_dim=16, vision_cfg=vision_cfg, text_cfg=text_cfg)
    return build


def open_clip_timm_tower() -> nn.Module:
    """A CLIP whose visual tower is a TimmModel, its trunk a Perception Encoder-like Eva
    (rotary embeddings, attention pooling), as open_clip's PE-Core configs build it."""
    timm_model = pytest.importorskip("open_clip.timm_model")
    model = open_clip_model()()
    tower = timm_model.TimmModel.__new__(timm_model.TimmModel)
    nn.Module.__init__(tower)
    tower.image_size = (IMAGE, IMAGE)
    tower.trunk = timm_eva(attn_type="rope", use_rot_pos_emb=True, use_pre_transformer_norm=True, global_pool="map",
                           rope_grid_indexing="xy", use_fc_norm=False)
    tower.trunk.reset_classifier(16)
    tower.head = nn.Sequential()
    model.visual = tower
    return model


CASES = [
    Case("timm_class_token", timm_vit),
    Case("timm_registers_avg", lambda: timm_vit(class_token=False, reg_tokens=2, global_pool="avg")),
    Case("timm_map_pool", lambda: timm_vit(class_token=False, global_pool="map")),
    Case("timm_distilled", timm_distilled),
    # Eva, configured as timm's registered families are (EVA-02, DINOv3, RoPE-ViT, PE)
    Case("timm_eva02_rope_swiglu", lambda: timm_eva(mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True,
                                                    use_rot_pos_emb=True, ref_feat_shape=(4, 4))),
    Case("timm_dinov3_rope_registers", lambda: timm_eva(
        qkv_bias=False, init_values=1e-5, num_reg_tokens=2, use_abs_pos_emb=False, use_rot_pos_emb=True,
        rope_type="dinov3", rope_temperature=100, dynamic_img_size=True)),
    Case("timm_rope_mixed", lambda: timm_eva(
        attn_type="rope", use_rot_pos_emb=True, rope_type="mixed", use_abs_pos_emb=False, global_pool="token")),
    Case("timm_pe_map_grouped_kv", lambda: timm_eva(
        attn_type="rope", qkv_fused=False, num_kv_heads=1, use_rot_pos_emb=True, use_pre_transformer_norm=True,
        global_pool="map", rope_grid_indexing="xy", use_fc_norm=False)),
    Case("timm_eva_post_norm_mrope", lambda: timm_eva(
        use_post_norm=True, use_rot_pos_emb=True, rope_type="mrope", global_pool="token")),
    Case("transformers_vit", hf("ViTConfig", "ViTForImageClassification", intermediate_size=96, num_labels=7),
         hf_output, features=hf_features("vit")),
    Case("transformers_deit_teacher", hf("DeiTConfig", "DeiTForImageClassificationWithTeacher",
                                         intermediate_size=96, num_labels=7), hf_output, features=hf_features("deit")),
    Case("transformers_dinov2_registers", hf("Dinov2WithRegistersConfig", "Dinov2WithRegistersForImageClassification",
                                             mlp_ratio=2, num_register_tokens=2, num_labels=7), hf_output,
         features=hf_features("dinov2_with_registers")),
    Case("transformers_siglip", hf("SiglipVisionConfig", "SiglipVisionModel", intermediate_size=96), hf_output,
         features=hf_features()),
    Case("transformers_clip", hf_clip,
         lambda model, images: model.get_image_features(pixel_values=images).pooler_output,
         features=hf_features("vision_model")),
    # without the random rescaling of rotary positions in training, so that two passes compute the same
    Case("transformers_dinov3_registers_swiglu", hf("DINOv3ViTConfig", "DINOv3ViTModel", intermediate_size=96,
                                                    num_register_tokens=2, use_gated_mlp=True,
                                                    pos_embed_rescale=None), hf_output, features=hf_features()),
    Case("transformers_videomae", hf("VideoMAEConfig", "VideoMAEForVideoClassification", num_frames=FRAMES,
                                     tubelet_size=FRAMES, intermediate_size=96, num_labels=7), hf_output, videos,
         hf_features("videomae")),
    Case("transformers_ast", hf_audio, lambda model, spectrograms: model(input_values=spectrograms).logits,
         spectrograms, hf_features("audio_spectrogram_transformer", "input_values")),
    Case("torchvision_vit", torchvision_vit, features=torchvision_features),
    Case("open_clip_tok", open_clip_model(), lambda model, images: model.encode_image(images),
         features=open_clip_features),
    Case("open_clip_avg", open_clip_model(pool_type="avg"), lambda model, images: model.encode_image(images),
         features=open_clip_features),
    Case("open_clip_attentional_pool", open_clip_model(ls_init_value=0.5, attentional_pool=True, attn_pooler_queries=4,
                                                       attn_pooler_heads=2),
         lambda model, images: model.encode_image(images), features=None),  # its tokens are the pooler's queries
    Case("open_clip_timm_tower", open_clip_timm_tower, lambda model, images: model.encode_image(images),
         features=lambda model, images: model.visual.trunk.forward_features(images)),
]
CASES_BY_ID = {case.id: case for case in CASES}

LAYER_SCALES = ("gamma", "gamma_1", "gamma_2", "lambda1")
RANDOMISED_TOKENS = ("cls_token", "reg_token", "dist_token", "class_embedding", "class_token", "register_tokens",
                     "distillation_token", "mask_token")


def make(case: Case) -> nn.Module:
    """The case's model in eval mode, norms and LayerScales far from their neutral init
    and learned tokens far from zero, so that dropping or misplacing any of them shows."""
    torch.manual_seed(0)
    model = case.build().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in LAYER_SCALES or ("norm" in name or ".ln" in name) and leaf == "weight":
                param.uniform_(0.5, 1.5)
            elif leaf in RANDOMISED_TOKENS:
                param.normal_(0, 0.5)
    return model


@pytest.fixture(params=CASES, ids=[case.id for case in CASES])
def case(request) -> Case:
    return request.param


def images(batch: int, seed: int = 0) -> Tensor:
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def run(case: Case, model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return case.output(model, x)


def test_r0_equals_the_unpatched_model_and_remove_restores_it(case):
    model = make(case)
    classes = {name: type(module) for name, module in model.named_modules()}
    x = case.inputs(3)
    expected = run(case, model, x)
    tokenmerge.apply(model, r=0)
    assert torch.equal(run(case, model, x), expected)
    twin = copy.deepcopy(model)
    tokenmerge.remove(model)
    assert {name: type(module) for name, module in model.named_modules()} == classes
    tokenmerge.remove(twin)
    for removed in (model, twin):
        assert not any(module._forward_pre_hooks or module.__dict__.keys() & {"_tokenmerge_hooks", "_tokenmerge_state"}
                       for module in removed.modules())
    assert torch.equal(run(case, model, x), expected)


def test_remove_restores_classes_state_and_attributes(case):
    """``remove`` gives back every module's class and attributes and the same
    parameters and buffers; the patched model has the same state-dict keys."""
    model = make(case)
    classes = {name: type(module) for name, module in model.named_modules()}
    state = {key: value.clone() for key, value in model.state_dict().items()}
    attributes = {name: set(vars(module)) for name, module in model.named_modules()}
    tokenmerge.apply(model, r=R)
    patched = {name: type(module) for name, module in model.named_modules()}
    assert patched != classes and all(issubclass(patched[name], cls) for name, cls in classes.items())
    assert model.state_dict().keys() == state.keys()
    tokenmerge.remove(model)
    assert {name: type(module) for name, module in model.named_modules()} == classes
    assert {name: set(vars(module)) for name, module in model.named_modules()} == attributes
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    assert not tokenmerge.is_applied(model)
    with pytest.raises(ValueError, match="no token merging applied"):
        tokenmerge.remove(model)


def test_applying_twice_updates_the_settings_and_new_r_takes_effect(case):
    """A second ``apply`` changes the settings without patching a class twice; a new
    ``state.r`` changes the next pass's token counts; a bad r is refused and changes
    nothing."""
    model = tokenmerge.apply(make(case), r=2)
    classes = {name: type(module) for name, module in model.named_modules()}
    tokenmerge.apply(model, r=4, prop_attn=False)
    assert {name: type(module) for name, module in model.named_modules()} == classes
    assert all(sum(cls.__name__.startswith("TokenMerge") for cls in type(module).__mro__) <= 1
               for module in model.modules())
    state = tokenmerge.get_state(model)
    assert (state.r, state.prop_attn) == (4, False)
    num_tokens, _ = find_adapter(model).token_layout(model)
    for r, merged in [(4, 4 * DEPTH), (1, DEPTH), ([8] + [0] * (DEPTH - 1), 8)]:
        state.r = r
        run(case, model, case.inputs(1))
        assert state.size.shape[1] == num_tokens - merged
    for bad in (-1, [1] * (DEPTH + 1)):
        with pytest.raises(ValueError):
            tokenmerge.apply(model, r=bad)
        with pytest.raises(ValueError):
            state.r = bad
    assert state.r == [8] + [0] * (DEPTH - 1)


def test_token_counts_are_fixed_protected_tokens_kept_and_sizes_sum(case):
    """Every block leaves the same number of tokens whatever the images, as
    ``token_counts`` says; block forward hooks see them; sizes sum to the tokens that
    entered and protected tokens are never merged."""
    model = tokenmerge.apply(make(case), r=R, trace_source=True)
    adapter = find_adapter(model)
    num_tokens, num_protected = adapter.token_layout(model)
    counts = []
    for block in adapter.blocks(model):
        block.register_forward_hook(lambda module, args, out: counts.append(tuple(out.shape)))
    state = tokenmerge.get_state(model)
    assert state.num_protected == num_protected
    for seed in (0, 1):
        counts.clear()
        run(case, model, case.inputs(2, seed))
        token_dims = [shape[1] if shape[0] == 2 else shape[0] for shape in counts]
        assert token_dims == tokenmerge.token_counts(model) == [num_tokens - R * (i + 1) for i in range(DEPTH)]
        assert state.num_input_tokens == num_tokens
        assert_sizes_and_sources_agree(state, num_tokens, 2)


def test_an_image_gives_the_same_output_alone_and_in_a_batch(case):
    model = tokenmerge.apply(make(case), r=R)
    x = case.inputs(4)
    together = run(case, model, x)
    alone = torch.cat([run(case, model, image[None]) for image in x])
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-5)


def precisions() -> list:
    """(model dtype, device, autocast dtype or None) for every way a user runs a model in
    lower precision: converted, and under autocast with a float32 residual stream, on
    the CPU and, where there is one, on a GPU."""
    modes = [(dtype, "cpu", None) for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16)]
    modes += [(torch.float32, "cpu", dtype) for dtype in (torch.bfloat16, torch.float16)]
    if torch.cuda.is_available():
        modes += [(torch.float32, "cuda", dtype) for dtype in (torch.bfloat16, torch.float16)]
    def name(dtype: torch.dtype) -> str:
        return str(dtype).removeprefix("torch.")

    return [pytest.param(dtype, device, amp, id=f"{device}-{name(dtype)}" + (f"-autocast-{name(amp)}" if amp else ""))
            for dtype, device, amp in modes]


@pytest.mark.parametrize("dtype,device,amp", precisions())
def test_an_image_gives_the_same_bits_alone_and_in_a_batch_in_every_precision(case, dtype, device, amp):
    """An image's merged output alone and in a batch of 96 are the same bits wherever
    every step of the unpatched model is (the machine's matrix products may depend on
    the batch, in float32 and even in float64: then to rounding), converted to half
    precision and under autocast. The batch is large enough that any path chosen by the
    size of the input would differ."""
    model = make(case).to(device, dtype)
    x = case.inputs(96).to(device, dtype)
    autocast = torch.autocast(device, dtype=amp) if amp else contextlib.nullcontext()

    def alone_and_together() -> tuple[Tensor, Tensor]:
        with autocast:
            return run(case, model, x[:1]), run(case, model, x)[:1]

    with every_step_recorded(model) as steps:
        unpatched_alone, unpatched_together = alone_and_together()
    tokenmerge.apply(model, r=R)
    alone, together = alone_and_together()
    assert torch.isfinite(together).all()
    if torch.equal(unpatched_alone, unpatched_together) and steps_batch_independent(steps):
        assert torch.equal(alone, together)
    else:
        torch.testing.assert_close(alone, together, atol=1e-4, rtol=1e-4)


@contextlib.contextmanager
def every_step_recorded(model: nn.Module):
    """The tensor outputs of every module of ``model`` during the block, call by call,
    per module: ``{name: [output of call 1, output of call 2, ...]}``."""
    steps: dict[str, list[Tensor]] = {}

    def record(name: str):
        def hook(module, args, output):
            if isinstance(output, Tensor) and output.dim() > 0:
                steps.setdefault(name, []).append(output.detach().clone())
        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in model.named_modules()]
    try:
        yield steps
    finally:
        for handle in handles:
            handle.remove()


def steps_batch_independent(steps: dict[str, list[Tensor]]) -> bool:
    """Whether every module gave the first image the same bits alone (its first call) as
    in the batch (its second call): outputs with a batch dimension only."""
    for outputs in steps.values():
        if len(outputs) == 2 and outputs[0].shape[1:] == outputs[1].shape[1:] and len(outputs[0]) == 1 \
                and len(outputs[1]) > 1 and not torch.equal(outputs[0][:1], outputs[1][:1]):
            return False
    return True


@pytest.mark.parametrize("batch", [0, 1])
def test_batch_sizes_0_and_1_give_what_the_unpatched_model_gives(case, batch):
    """Also an empty batch: an output of the right shape, or, where the library's own
    model cannot take an empty batch, the library's own error."""
    model = make(case)
    x = case.inputs(batch)
    try:
        expected = run(case, model, x)
    except RuntimeError as error:
        tokenmerge.apply(model, r=R)
        with pytest.raises(RuntimeError, match=str(error)[:40]):
            run(case, model, x)
        return
    tokenmerge.apply(model, r=R)
    merged = run(case, model, x)
    assert merged.shape == expected.shape and merged.dtype == expected.dtype
    assert torch.isfinite(merged).all()


def test_gradients_reach_every_parameter_they_reach_unpatched(case):
    def gradients(model):
        model.zero_grad()
        case.output(model, case.inputs(2)).square().sum().backward()
        return {name: param.grad for name, param in model.named_parameters() if param.grad is not None}

    model = make(case).train()
    expected = gradients(model)
    tokenmerge.apply(model, r=0)
    assert all(torch.equal(grad, expected[name]) for name, grad in gradients(model).items())
    tokenmerge.apply(model, r=R)
    merged = gradients(model)
    assert merged.keys() == expected.keys()
    assert all(torch.isfinite(grad).all() for grad in merged.values())


def test_a_pickled_copy_is_patched_and_computes_the_same(case):
    model = tokenmerge.apply(make(case), r=R, prop_attn=True, method="tome")
    x = case.inputs(2)
    copy_ = pickle.loads(pickle.dumps(model))
    assert tokenmerge.is_applied(copy_) and tokenmerge.get_state(copy_).r == R
    assert torch.equal(run(case, copy_, x), run(case, model, x))
    tokenmerge.remove(copy_)
    assert torch.equal(run(case, copy_, x), run(case, tokenmerge.remove(model), x))


def test_concurrent_threads_give_the_outputs_of_sequential_calls(case):
    """Three threads call one model with different batch sizes at once: each gets
    exactly what it gets alone (sizes belong to the pass, not to the model)."""
    model = tokenmerge.apply(make(case), r=R)
    inputs = [case.inputs(batch, seed=batch) for batch in (1, 2, 3)]
    expected = [run(case, model, x) for x in inputs]
    results, errors = [[] for _ in inputs], []

    def call(index):
        try:
            for _ in range(8):
                results[index].append(run(case, model, inputs[index]))
        except Exception as error:  # reported below, with the thread's case
            errors.append(error)

    threads = [threading.Thread(target=call, args=(index,)) for index in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for outputs, reference in zip(results, expected):
        assert len(outputs) == 8 and all(torch.equal(out, reference) for out in outputs)


def test_saved_models_load_and_compute_the_same_in_a_fresh_process(tmp_path):
    """``torch.save`` of a patched model of every case, loaded by ``torch.load`` in a new
    interpreter: same classes, same outputs."""
    for case in CASES:
        try:
            model = tokenmerge.apply(make(case), r=R)
        except pytest.skip.Exception:
            continue
        torch.save({"model": model, "expected": run(case, model, case.inputs(2))}, tmp_path / f"{case.id}.pt")
    script = (
        "import sys, torch\n"
        "saved = [torch.load(path, weights_only=False) for path in sys.argv[1:]]\n"  # before tokenmerge is imported
        "import tokenmerge\n"
        "from tokenmerge.adapters import find_adapter\n"
        "from tests.adapters.test_contract import CASES_BY_ID, run\n"
        "for path, entry in zip(sys.argv[1:], saved):\n"
        "    case, model = CASES_BY_ID[path.rsplit('/', 1)[-1][:-3]], entry['model']\n"
        "    assert tokenmerge.is_applied(model), case.id\n"
        "    blocks = find_adapter(model).blocks(model)\n"
        "    assert all(type(block).__name__.startswith('TokenMerge') for block in blocks), case.id\n"
        "    assert torch.equal(run(case, model, case.inputs(2)), entry['expected']), case.id\n"
        "print('loaded', len(sys.argv) - 1)\n"
    )
    paths = sorted(str(path) for path in tmp_path.glob("*.pt"))
    done = subprocess.run([sys.executable, "-c", script, *paths], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"loaded {len(paths)}"


def _run_in_worker(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x)


def test_a_spawned_worker_runs_a_patched_model():
    """A patched model sent to a ``spawn`` pool (what DataLoader workers, torch
    multiprocessing and process pools do) runs there and computes the same."""
    model = tokenmerge.apply(make(CASES_BY_ID["timm_class_token"]), r=R)
    x = images(2)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        result = pool.apply_async(_run_in_worker, (model, x)).get(timeout=120)
    assert torch.equal(result, _run_in_worker(model, x))


@pytest.mark.parametrize("case_id", ["timm_class_token", "transformers_vit"])
def test_stress_four_threads_mixed_batches_match_sequential_outputs(case_id):
    """Four threads, batch sizes 1 to 5, 240 calls on one model: every output equals the
    sequential output for the same images."""
    case = CASES_BY_ID[case_id]
    model = tokenmerge.apply(make(case), r=R)
    batches = {batch: case.inputs(batch, seed=10 + batch) for batch in range(1, 6)}
    expected = {batch: run(case, model, x) for batch, x in batches.items()}
    mismatches, errors = [], []

    def call(worker):
        try:
            for step in range(60):
                batch = 1 + (worker + step) % 5
                if not torch.equal(run(case, model, batches[batch]), expected[batch]):
                    mismatches.append((worker, step, batch))
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=call, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and not mismatches


def serve_while(case: Case, model: nn.Module, x: Tensor, change: Callable[[], None]) -> list[Tensor]:
    """The outputs of two threads calling ``model`` on ``x`` over and over while
    ``change`` runs in this one; any error in a serving thread fails the test."""
    stop, errors, outputs = threading.Event(), [], []

    def serve():
        while not stop.is_set():
            try:
                outputs.append(run(case, model, x))
            except Exception as error:  # noqa: BLE001 - any error is what the test reports
                errors.append(error)
                return

    servers = [threading.Thread(target=serve) for _ in range(2)]
    for thread in servers:
        thread.start()
    try:
        while len(outputs) < 2 and not errors:
            stop.wait(0.001)
        change()
    finally:
        stop.set()
        for thread in servers:
            thread.join()
    assert not errors, errors[:3]
    return outputs


@pytest.mark.parametrize("case_id", ["timm_registers_avg", "transformers_vit", "open_clip_avg", "torchvision_vit"])
def test_remove_and_apply_while_other_threads_run_the_model(case_id):
    """Threads keep calling the model while another removes merging: every call returns
    the merged or the unpatched output, exactly (a removal once restored blocks under
    running passes: raw AttributeErrors, or merged tokens pooled unweighted). While
    merging is applied to the unpatched model, calls never fail, and once it is, they
    merge."""
    case = CASES_BY_ID[case_id]
    model, x = make(case), case.inputs(2)
    with torch.no_grad():  # heads that start at zero would hide what merging changes
        for param in model.parameters():
            if not param.any():
                param.normal_()
    unpatched = run(case, model, x)
    tokenmerge.apply(model, r=R)
    merged = run(case, model, x)
    assert not torch.equal(merged, unpatched)
    for _ in range(10):
        outputs = serve_while(case, model, x, lambda: tokenmerge.remove(model))
        assert all(torch.equal(out, merged) or torch.equal(out, unpatched) for out in outputs)
        outputs = serve_while(case, model, x, lambda: tokenmerge.apply(model, r=R))
        assert all(out.shape == merged.shape and torch.isfinite(out).all() for out in outputs)
        assert torch.equal(run(case, model, x), merged)


def test_torch_jit_script_is_refused_with_the_alternatives(case):
    model = tokenmerge.apply(make(case), r=R)
    with pytest.warns(FutureWarning), pytest.raises(TypeError, match="torch.compile, torch.export or torch.jit.trace"):
        torch.jit.script(model)


def test_forward_hooks_that_replace_block_outputs_keep_the_pass(case):
    """A forward hook that returns a new tensor (a copy) between blocks: the next block
    still knows the sizes of its tokens, so outputs do not change."""
    model = tokenmerge.apply(make(case), r=R)
    x = case.inputs(2)
    expected = run(case, model, x)
    for block in find_adapter(model).blocks(model):
        block.register_forward_hook(lambda module, args, out: out.clone())
    assert torch.equal(run(case, model, x), expected)


def test_the_state_repr_names_the_settings_and_copies_have_their_own_state():
    model = tokenmerge.apply(make(CASES_BY_ID["timm_class_token"]), r=tokenmerge.Linear(4))
    assert repr(tokenmerge.get_state(model)) == (
        "MergeState(r=decreasing:4, method='tome', prop_attn=True, trace_source=False, dense=False, depth=3, "
        "num_protected=1)"
    )
    copied = copy.deepcopy(model)
    tokenmerge.get_state(copied).r = 2
    assert tokenmerge.get_state(model).r == tokenmerge.Linear(4)


def test_proportional_attention_without_a_mask_gives_what_the_mask_gives(case, monkeypatch):
    """The mask-free formulation that a GPU runs (a size channel on the queries and
    keys, tokenmerge.attention) reproduces the float mask in every adapter."""
    model = tokenmerge.apply(make(case), r=R)
    x = case.inputs(2)
    expected = run(case, model, x)
    monkeypatch.setattr(proportional, "default_formulation", lambda device: "channel")
    calls = []
    channel = proportional.with_size_channel
    monkeypatch.setattr(proportional, "with_size_channel", lambda *a, **k: calls.append(1) or channel(*a, **k))
    got = run(case, model, x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert calls, "the channel formulation never ran"


# --- dense features ---------------------------------------------------------------------


@pytest.mark.parametrize("prop_attn", [True, False], ids=["prop_attn", "no_prop_attn"])
def test_dense_features_leave_the_pooled_output_as_it_is(case, prop_attn):
    """``dense=True`` changes the features the model gives, never what its head pools
    from them: with or without proportional attention, average and attention pools."""
    model = tokenmerge.apply(make(case), r=R, prop_attn=prop_attn)
    x = case.inputs(2)
    merged = run(case, model, x)
    tokenmerge.apply(model, r=R, dense=True)
    torch.testing.assert_close(run(case, model, x), merged, atol=1e-5, rtol=1e-5)


def test_dense_features_have_one_token_per_token_of_the_unpatched_model(case):
    if case.features is None:
        pytest.skip(f"{case.id} gives no token features")
    model = make(case)
    x = case.inputs(2)
    with torch.no_grad():
        unpatched = case.features(model, x)
        tokenmerge.apply(model, r=R)
        merged = case.features(model, x)
        tokenmerge.apply(model, r=R, dense=True)
        dense = case.features(model, x)
    assert merged.shape[1] < unpatched.shape[1]
    assert dense.shape == unpatched.shape


# --- what tokenmerge cannot follow is refused ------------------------------------------


def first_output_changed(change: Callable[[Tensor], Tensor]) -> Callable:
    """A forward hook that changes a block's (B, N, C) tokens, whatever the block returns."""
    def hook(module, args, out):
        if isinstance(out, tuple):
            return (change(out[0]), *out[1:])
        return change(out)
    return hook


def test_a_hook_that_drops_a_token_between_blocks_is_an_error(case):
    """A token count no merge explains: sizes and sources would describe the wrong tokens."""
    model = tokenmerge.apply(make(case), r=R)
    find_adapter(model).blocks(model)[1].register_forward_hook(first_output_changed(lambda x: x[:, :-1]))
    with pytest.raises(RuntimeError, match="block 2 got .* but block 1 left .*no merge explains"):
        run(case, model, case.inputs(2))


def test_remove_from_inside_a_pass_is_refused_and_the_pass_finishes(case):
    model = tokenmerge.apply(make(case), r=R)
    x = case.inputs(2)
    expected = run(case, model, x)
    errors = []

    def remove_now(module, args, out):
        try:
            tokenmerge.remove(model)
        except RuntimeError as error:
            errors.append(str(error))

    handle = find_adapter(model).blocks(model)[1].register_forward_hook(remove_now)
    assert torch.equal(run(case, model, x), expected)
    handle.remove()
    assert len(errors) == 1 and "during a forward pass" in errors[0]
    assert tokenmerge.is_applied(model)


def test_vmap_over_a_patched_model_is_refused_by_name(case):
    model = tokenmerge.apply(make(case), r=R)
    x = case.inputs(2)
    with pytest.raises(NotImplementedError, match="torch.func.vmap"):
        torch.func.vmap(lambda one: run(case, model, one.unsqueeze(0)))(x)
