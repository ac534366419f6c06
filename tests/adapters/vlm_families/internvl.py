"""A tiny InternVL model with its real processor class: 32 px crops of patches 4 (an 8x8
grid, and a class token the model drops) that the model pixel-shuffles 2x2, so 16 tokens
per crop. The generic tests run with one crop per image; ``build_internvl(crops=True)``
tiles a picture into 2 to 4 crops and adds a thumbnail of the whole."""
from __future__ import annotations

import torch

from tests.adapters.vlm_models import (
    CHAT_TEMPLATE,
    IMAGE,
    Family,
    text_config,
    tower_config,
    transformers,
    word_tokenizer,
)

TOKENS_PER_CROP = 16  # (32 / 4)^2 patches, 2x2 cells to one token
SPECIAL = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
           "video_token": "<video>"}


def prompt(count: int) -> str:
    return "USER: " + "<IMG_CONTEXT> " * count + "what is this ? ASSISTANT:"


def build_internvl(crops: bool = False) -> tuple[torch.nn.Module, object]:
    tokenizer = word_tokenizer(list(SPECIAL.values()), SPECIAL)
    tiles = dict(min_patches=2, max_patches=4) if crops else dict(min_patches=1, max_patches=1)
    size = {"height": IMAGE, "width": IMAGE}
    processor = transformers.InternVLProcessor(
        image_processor=transformers.GotOcr2ImageProcessor(size=size, crop_to_patches=True, **tiles),
        tokenizer=tokenizer, video_processor=transformers.InternVLVideoProcessor(size=size),
        image_seq_length=TOKENS_PER_CROP, chat_template=CHAT_TEMPLATE.replace("{{ image }}", "<IMG_CONTEXT>"))
    config = transformers.InternVLConfig(
        vision_config=tower_config(transformers.InternVLVisionConfig),
        text_config=text_config(transformers.Qwen2Config, len(tokenizer)),
        image_token_id=tokenizer.context_image_token_id, downsample_ratio=0.5)
    return transformers.InternVLForConditionalGeneration(config).eval(), processor


FAMILIES = [Family("internvl", build_internvl, prompt, TOKENS_PER_CROP, tower_merges=False)]
