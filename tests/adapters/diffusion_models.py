"""Tiny random-weight denoisers of diffusers, built from the real classes, with inputs of
the shapes their pipelines pass: what the diffusion tests run on (no weights can be
downloaded).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")


# --- Diffusion transformers: SD3, Flux, PixArt-Sigma, Wan ----------------------------------
#
# Every transformer here sees a 16 x 16 latent (an 8 x 8 grid of image tokens, 64 tokens,
# after patches of 2; Wan: 2 frames of 8 x 8) and 7 text tokens, at width 32 with 2 heads
# and 2 blocks of each kind.

LATENT, TEXT_TOKENS = 16, 7


@dataclass(frozen=True)
class DiT:
    """A tiny transformer of one family: ``build()`` gives the model with seeded random
    weights, ``inputs(batch)`` the keyword arguments of one denoiser call, ``grid`` the
    image tokens' grid (frames, rows, columns)."""

    id: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], dict[str, object]]
    grid: tuple[int, int, int]


def seeded(factory: Callable[[], nn.Module], seed: int = 0) -> Callable[[], nn.Module]:
    """``factory`` whose random weights come from ``seed``, in eval mode."""

    def build() -> nn.Module:
        torch.manual_seed(seed)
        return factory().eval()

    return build


def sd3_transformer(**kwargs: object) -> nn.Module:
    """SD3's MMDiT: joint attention over text and image tokens; ``dual_attention_layers``
    as SD3.5 has them."""
    config: dict[str, object] = dict(
        sample_size=LATENT, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=12,
        out_channels=4, pos_embed_max_size=16,
    )
    return diffusers.SD3Transformer2DModel(**{**config, **kwargs})


def sd3_inputs(batch: int, seed: int = 1) -> dict[str, object]:
    generator = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, LATENT, LATENT, generator=generator),
        encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, 24, generator=generator),
        pooled_projections=torch.randn(batch, 12, generator=generator),
        timestep=torch.full((batch,), 500.0),
    )


def flux_transformer(**kwargs: object) -> nn.Module:
    """Flux.1: double-stream and single-stream blocks with 3-axis RoPE over the joint
    sequence (its axes sum to the head size)."""
    config: dict[str, object] = dict(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12, axes_dims_rope=(4, 6, 6),
    )
    return diffusers.FluxTransformer2DModel(**{**config, **kwargs})


def flux_image_ids(rows: int, columns: int) -> torch.Tensor:
    """(rows * columns, 3) the image tokens' positions as Flux's pipeline writes them:
    (0, row, column) in raster order."""
    ids = torch.zeros(rows, columns, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(columns)[None, :]
    return ids.reshape(-1, 3)


def flux_inputs(batch: int, seed: int = 1) -> dict[str, object]:
    """Flux's packed latents: every token is a 2 x 2 patch of the 16-channel latent."""
    generator = torch.Generator().manual_seed(seed)
    rows = columns = LATENT // 2
    return dict(
        hidden_states=torch.randn(batch, rows * columns, 16, generator=generator),
        encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, 24, generator=generator),
        pooled_projections=torch.randn(batch, 12, generator=generator),
        timestep=torch.full((batch,), 0.5),
        img_ids=flux_image_ids(rows, columns),
        txt_ids=torch.zeros(TEXT_TOKENS, 3),
    )


def flux2_transformer(**kwargs: object) -> nn.Module:
    """FLUX.2: double-stream and fused single-stream blocks, 4-axis RoPE (t, h, w, l)."""
    config: dict[str, object] = dict(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4),
    )
    return diffusers.Flux2Transformer2DModel(**{**config, **kwargs})


def flux2_inputs(batch: int, seed: int = 1) -> dict[str, object]:
    """FLUX.2's packed latents with (t, h, w, l) positions: image tokens (0, row, column, 0),
    text tokens (0, 0, 0, index)."""
    generator = torch.Generator().manual_seed(seed)
    rows = columns = LATENT // 2
    image_ids = torch.cat([flux_image_ids(rows, columns), torch.zeros(rows * columns, 1)], dim=1)
    text_ids = torch.zeros(TEXT_TOKENS, 4)
    text_ids[:, 3] = torch.arange(TEXT_TOKENS)
    return dict(
        hidden_states=torch.randn(batch, rows * columns, 16, generator=generator),
        encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, 24, generator=generator),
        timestep=torch.full((batch,), 0.5),
        guidance=torch.full((batch,), 4.0),
        img_ids=image_ids,
        txt_ids=text_ids,
    )


def qwenimage_transformer(**kwargs: object) -> nn.Module:
    """Qwen-Image: dual-stream blocks, image and text rotary tables of their own."""
    config: dict[str, object] = dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, axes_dims_rope=(4, 6, 6),
    )
    return diffusers.QwenImageTransformer2DModel(**{**config, **kwargs})


def qwenimage_inputs(batch: int, seed: int = 1) -> dict[str, object]:
    """Qwen-Image's packed latents (2 x 2 patches of a 4-channel latent), a text mask
    with the last text token padding, and the image grid of every sample."""
    generator = torch.Generator().manual_seed(seed)
    rows = columns = LATENT // 2
    mask = torch.ones(batch, TEXT_TOKENS)
    mask[:, -1] = 0
    return dict(
        hidden_states=torch.randn(batch, rows * columns, 16, generator=generator),
        encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, 24, generator=generator),
        encoder_hidden_states_mask=mask,
        timestep=torch.full((batch,), 0.5),
        img_shapes=[[(1, rows, columns)]] * batch,
    )


def pixart_transformer(**kwargs: object) -> nn.Module:
    """PixArt-Sigma: BasicTransformerBlocks with ada_norm_single, cross-attention to T5."""
    config: dict[str, object] = dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=32, sample_size=LATENT, patch_size=2, caption_channels=24, norm_num_groups=4,
        use_additional_conditions=False, interpolation_scale=1,
    )
    return diffusers.PixArtTransformer2DModel(**{**config, **kwargs})


def pixart_inputs(batch: int, seed: int = 1) -> dict[str, object]:
    generator = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, LATENT, LATENT, generator=generator),
        encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, 24, generator=generator),
        timestep=torch.full((batch,), 500.0),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )


WAN_FRAMES = 2


def wan_transformer(**kwargs: object) -> nn.Module:
    """Wan 2.x: video tokens with 3D RoPE, self-attention, cross-attention to T5."""
    config: dict[str, object] = dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=24, freq_dim=16, ffn_dim=48, num_layers=2, rope_max_seq_len=32,
    )
    return diffusers.WanTransformer3DModel(**{**config, **kwargs})


def wan_inputs(batch: int, seed: int = 1) -> dict[str, object]:
    generator = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, WAN_FRAMES, LATENT, LATENT, generator=generator),
        encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, 24, generator=generator),
        timestep=torch.full((batch,), 500.0),
    )


IMAGE_GRID = (1, LATENT // 2, LATENT // 2)

DITS = {
    "sd3": DiT("sd3", seeded(sd3_transformer), sd3_inputs, IMAGE_GRID),
    "sd3.5": DiT("sd3.5", seeded(lambda: sd3_transformer(dual_attention_layers=(0,), qk_norm="rms_norm")),
                 sd3_inputs, IMAGE_GRID),
    "flux": DiT("flux", seeded(flux_transformer), flux_inputs, IMAGE_GRID),
    "flux2": DiT("flux2", seeded(flux2_transformer), flux2_inputs, IMAGE_GRID),
    "qwenimage": DiT("qwenimage", seeded(qwenimage_transformer), qwenimage_inputs, IMAGE_GRID),
    "pixart": DiT("pixart", seeded(pixart_transformer), pixart_inputs, IMAGE_GRID),
    "wan": DiT("wan", seeded(wan_transformer), wan_inputs, (WAN_FRAMES, LATENT // 2, LATENT // 2)),
}


def denoise(model: nn.Module, inputs: dict[str, object]) -> torch.Tensor:
    """One denoiser call, without gradients: the model's output tensor."""
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def merged_output(model: nn.Module, inputs: dict[str, object], **options: object) -> torch.Tensor:
    """One denoiser call with tokenmerge applied under ``options``, removed again after."""
    import tokenmerge

    tokenmerge.apply(model, **options)
    try:
        return denoise(model, inputs)
    finally:
        tokenmerge.remove(model)


def batch_row(inputs: dict[str, object], row: int) -> dict[str, object]:
    """The inputs of one row of a batch (Flux's ids have no batch axis and stay whole)."""
    def one_row(name: str, value: object) -> object:
        if name == "img_shapes":  # Qwen-Image's grids, one list per sample
            return value[row:row + 1]  # type: ignore[index]
        return value[row:row + 1] if isinstance(value, torch.Tensor) and name not in ("img_ids", "txt_ids") else value

    return {name: one_row(name, value) for name, value in inputs.items()}


#: Every branch merged, fixed destinations: the setting the DiT checks run.
ALL_BRANCHES = dict(ratio=0.5, use_rand=False, merge_attn=True, merge_crossattn=True, merge_mlp=True)
#: Rows of a batch merged on their own agree with the batch to float rounding (outputs of order 1).
ROW_TOLERANCE = 1e-5


def check_exact_without_merging(dit: DiT) -> None:
    """ratio=0 and remove give the unpatched output bit for bit."""
    model, inputs = dit.build(), dit.inputs(2)
    reference = denoise(model, inputs)
    assert torch.equal(merged_output(model, inputs, ratio=0.0, merge_mlp=True, merge_crossattn=True), reference)
    merged_output(model, inputs, **ALL_BRANCHES)
    assert torch.equal(denoise(model, inputs), reference)


def check_merges_rows_alone(dit: DiT) -> None:
    """Merging changes the output, keeps its shape, and every row of a batch merges on its
    own: a batch gives what its rows give one by one."""
    model, inputs = dit.build(), dit.inputs(2)
    reference, merged = denoise(model, inputs), merged_output(model, inputs, **ALL_BRANCHES)
    assert merged.shape == reference.shape
    assert (merged - reference).norm() > 1e-3 * reference.norm()
    for row in range(2):
        alone = merged_output(model, batch_row(inputs, row), **ALL_BRANCHES)
        torch.testing.assert_close(alone, merged[row:row + 1], rtol=0, atol=ROW_TOLERANCE)


def grid_destinations(grid: tuple[int, int, int]) -> torch.Tensor:
    """The fixed destinations of 2 x 2 cells (use_rand=False): every cell's top-left token."""
    frames, rows, columns = grid
    index = torch.arange(frames * rows * columns).view(frames, rows, columns)
    return index[:, ::2, ::2].flatten()


def check_merged_positions(positions: torch.Tensor, grid: tuple[int, int, int], kept: int) -> None:
    """(N - r,) the image token every merged token sits at, in the merged order: first
    ``kept`` sources, ascending and no destination, then every destination."""
    destinations = grid_destinations(grid)
    assert positions.shape[0] == kept + destinations.numel()
    assert torch.equal(positions[kept:], destinations)
    sources = positions[:kept]
    assert bool((sources[1:] > sources[:-1]).all()) and not bool(torch.isin(sources, destinations).any())


# --- Stable Diffusion UNets ------------------------------------------------------------------
#
# A 16 x 16 latent, width 32 at the first level: SD-like UNets have attention at every level
# but the last, the SDXL-like one (addition_embed_type="text_time") none at its first.

UNET_LATENT, UNET_CONTEXT = 16, 24


def sd_unet(**kwargs: object) -> nn.Module:
    """SD 1.x/2.x's layout: cross-attention at downsample 1, 2 (and the mid block at 4)."""
    config: dict[str, object] = dict(
        sample_size=UNET_LATENT, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=UNET_CONTEXT,
        attention_head_dim=8, norm_num_groups=8,
    )
    return diffusers.UNet2DConditionModel(**{**config, **kwargs})


def sdxl_unet(**kwargs: object) -> nn.Module:
    """SDXL's layout: no attention at the first level, pooled text and size conditioning."""
    config: dict[str, object] = dict(
        sample_size=UNET_LATENT, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=UNET_CONTEXT,
        attention_head_dim=8, norm_num_groups=8, transformer_layers_per_block=(1, 1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 12,
        use_linear_projection=True,
    )
    return diffusers.UNet2DConditionModel(**{**config, **kwargs})


def unet_inputs(batch: int, seed: int = 1, sdxl: bool = False, width: int = UNET_LATENT) -> dict[str, object]:
    """One UNet call's arguments: a UNET_LATENT x ``width`` latent, 5 text tokens."""
    generator = torch.Generator().manual_seed(seed)
    inputs: dict[str, object] = dict(
        sample=torch.randn(batch, 4, UNET_LATENT, width, generator=generator),
        timestep=torch.full((batch,), 500.0),
        encoder_hidden_states=torch.randn(batch, 5, UNET_CONTEXT, generator=generator),
    )
    if sdxl:
        inputs["added_cond_kwargs"] = dict(text_embeds=torch.randn(batch, 12, generator=generator),
                                           time_ids=torch.randn(batch, 6, generator=generator))
    return inputs


UNETS = {"sd": (seeded(sd_unet), unet_inputs),
         "sdxl": (seeded(sdxl_unet), lambda batch, **kw: unet_inputs(batch, sdxl=True, **kw))}


# --- a whole pipeline ------------------------------------------------------------------

transformers = pytest.importorskip("transformers")

SIZE = 32  # pixels: a 16 x 16 latent under the VAE's one downsampling


def tiny_tokenizer() -> transformers.CLIPTokenizer:
    """A CLIP tokenizer of single letters (no merges), built without any file."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["<|startoftext|>", "<|endoftext|>", *letters, *(f"{letter}</w>" for letter in letters)]
    return transformers.CLIPTokenizer(vocab={word: index for index, word in enumerate(words)}, merges=[],
                                      model_max_length=16)


def tiny_pipeline() -> diffusers.StableDiffusionPipeline:
    """A Stable Diffusion pipeline of tiny random parts: a UNet with one transformer
    level, a VAE that halves the image, a one-layer CLIP text encoder."""
    unet = diffusers.UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=SIZE)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
        max_position_embeddings=16, projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    return diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tiny_tokenizer(), unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler(steps_offset=1), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
