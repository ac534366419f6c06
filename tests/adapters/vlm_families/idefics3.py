"""Tiny Idefics3 and SmolVLM models with their real processor classes: 32 px crops of
patches 4 (an 8x8 grid) that the connector pixel-shuffles 2x2, so 16 tokens per crop.
The generic tests run with splitting off (one crop per image: the whole image resized);
``build_idefics3(splitting=True)`` splits a picture into 2x2 crops and adds the whole."""
from __future__ import annotations

import pytest
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
SPECIAL = {"fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
           "end_of_utterance_token": "<end_of_utterance>", "global_image_token": "<global-img>"}
ROW_COL = [f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)]


def prompt(count: int) -> str:
    return "USER: " + "<image> " * count + "what is this ? ASSISTANT:"


def images(cls: type, splitting: bool) -> object:
    """Crops of 32 px; with splitting, pictures are first resized to 64 px on their longest edge (2x2 crops)."""
    return cls(size={"longest_edge": 2 * IMAGE}, max_image_size={"longest_edge": IMAGE}, do_image_splitting=splitting)


def config(cls: type, vision: type, tokenizer: object) -> object:
    return cls(vision_config=tower_config(vision), text_config=text_config(transformers.LlamaConfig, len(tokenizer)),
               image_token_id=tokenizer.image_token_id, scale_factor=2)


def build_idefics3(splitting: bool = False) -> tuple[torch.nn.Module, object]:
    tokenizer = word_tokenizer([*SPECIAL.values(), *ROW_COL], SPECIAL)
    processor = transformers.Idefics3Processor(
        image_processor=images(transformers.Idefics3ImageProcessor, splitting), tokenizer=tokenizer,
        image_seq_len=TOKENS_PER_CROP, chat_template=CHAT_TEMPLATE.replace("{{ image }}", "<image>"))
    model_config = config(transformers.Idefics3Config, transformers.Idefics3VisionConfig, tokenizer)
    return transformers.Idefics3ForConditionalGeneration(model_config).eval(), processor


def build_smolvlm(splitting: bool = False) -> tuple[torch.nn.Module, object]:
    pytest.importorskip("num2words", reason="SmolVLMProcessor needs num2words")
    tokenizer = word_tokenizer([*SPECIAL.values(), *ROW_COL], SPECIAL)
    processor = transformers.SmolVLMProcessor(
        image_processor=images(transformers.SmolVLMImageProcessor, splitting), tokenizer=tokenizer,
        video_processor=transformers.SmolVLMVideoProcessor(size={"longest_edge": IMAGE},
                                                           max_image_size={"longest_edge": IMAGE}),
        image_seq_len=TOKENS_PER_CROP, chat_template=CHAT_TEMPLATE.replace("{{ image }}", "<image>"))
    model_config = config(transformers.SmolVLMConfig, transformers.SmolVLMVisionConfig, tokenizer)
    return transformers.SmolVLMForConditionalGeneration(model_config).eval(), processor


FAMILIES = [
    Family("idefics3", build_idefics3, prompt, TOKENS_PER_CROP, tower_merges=False),
    Family("smolvlm", build_smolvlm, prompt, TOKENS_PER_CROP, tower_merges=False),
]
