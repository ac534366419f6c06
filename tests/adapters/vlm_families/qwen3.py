"""A tiny Qwen3-VL with deepstack on (a 3-layer tower whose layers 0 and 1 feed the
language model's first two layers) at dynamic resolution, as the Qwen2.5-VL builder of
tests/adapters/vlm_models.py; and its mixture-of-experts twin."""
from __future__ import annotations

import torch

from tests.adapters.vlm_models import CHAT_TEMPLATE, PATCH, QWEN_IMAGE, WIDTH, Family, transformers, word_tokenizer

QWEN3_VIDEO = "<|vision_start|><|video_pad|><|vision_end|> "
FRAMES = 8  # frames of the test videos: 4 frame groups of 2 (temporal patches)


def qwen3_vl_parts() -> tuple[dict, dict, object, dict]:
    """The tower's and the language model's settings, the processor, and the token ids for the config."""
    special = {"vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>",
               "image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}
    tokenizer = word_tokenizer(list(special.values()), special)
    pixels = dict(patch_size=PATCH, temporal_patch_size=2, merge_size=2)
    # dynamic resolution: every picture keeps (about) its own size, between 16x16 and 48x48 pixels
    images = transformers.Qwen2VLImageProcessor(min_pixels=16 * 16, max_pixels=48 * 48, **pixels)
    # every frame as it comes (no sampling), 32x32 pixels
    videos = transformers.Qwen3VLVideoProcessor(size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32 * FRAMES},
                                                do_sample_frames=False, cap_pixels_per_frame=False, **pixels)
    processor = transformers.Qwen3VLProcessor(
        image_processor=images, tokenizer=tokenizer, video_processor=videos,
        chat_template=CHAT_TEMPLATE.replace("{{ image }}", QWEN_IMAGE.strip()))
    vision = dict(depth=3, hidden_size=WIDTH, num_heads=2, intermediate_size=64, out_hidden_size=WIDTH,
                  patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 1])
    text = dict(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, vocab_size=len(tokenizer),
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0,
                                 "mrope_interleaved": True})
    ids = dict(image_token_id=tokenizer.image_token_id, video_token_id=tokenizer.video_token_id,
               vision_start_token_id=tokenizer.vision_start_token_id, vision_end_token_id=tokenizer.vision_end_token_id)
    return vision, text, processor, ids


def qwen3_vl() -> tuple[torch.nn.Module, object]:
    vision, text, processor, ids = qwen3_vl_parts()
    config = transformers.Qwen3VLConfig(vision_config=vision, text_config=text, **ids)
    return transformers.Qwen3VLForConditionalGeneration(config).eval(), processor


def qwen3_vl_moe() -> tuple[torch.nn.Module, object]:
    vision, text, processor, ids = qwen3_vl_parts()
    text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    config = transformers.Qwen3VLMoeConfig(vision_config=vision, text_config=text, **ids)
    return transformers.Qwen3VLMoeForConditionalGeneration(config).eval(), processor


FAMILIES = [
    # the first picture (40x48 px) gives 10x12 patches, 30 tokens after the 2x2 merger; the others are smaller
    Family("qwen3_vl", qwen3_vl, lambda n: "USER: " + QWEN_IMAGE * n + "what is this ? ASSISTANT:", 30,
           tower_merges=False, dynamic=True),
]
