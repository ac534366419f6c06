"""Tiny random vision-language models of transformers with their real processor classes,
over an offline word-level tokenizer that knows each family's special tokens: what the
VLM tests run on (no weights can be downloaded).

Every family is built so that one image gives 64 patch tokens (32 px, patches of 4) to
a 3-layer tower, and a prompt of a few words around its placeholder.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

IMAGE, PATCH, WIDTH = 32, 4, 32
GRID = (IMAGE // PATCH) ** 2  # 64 patch tokens per image
WORDS = ["USER:", "ASSISTANT:", "what", "is", "this", "?", "a", "cat", "dog"] + [f"w{i}" for i in range(40)]


@dataclass(frozen=True)
class Family:
    """A tiny model of one family: ``build()`` gives (model, processor); ``prompt(n)`` a
    prompt with ``n`` images; ``full`` the tokens one image gives the language model
    unreduced; ``messages(n)`` a chat with ``n`` images for ``apply_chat_template``."""

    id: str
    build: Callable[[], tuple[torch.nn.Module, object]]
    prompt: Callable[[int], str]
    full: int
    tower_merges: bool = True
    dynamic: bool = False  # images keep their own resolution: the first one gives ``full`` tokens, others fewer


def word_tokenizer(special: list[str], extra: dict[str, str]) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer (whitespace split) with ``special`` tokens, as each family's
    processor expects them (``extra`` names them: ``image_token``, ``boi_token``, ...)."""
    words = ["<pad>", "<s>", "</s>", "<unk>", *special, *WORDS]
    model = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=model, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens=extra, padding_side="left",
    )


def tower_config(cls: type, **kwargs) -> object:
    return cls(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=IMAGE,
               patch_size=PATCH, **kwargs)


def text_config(cls: type, vocab_size: int, **kwargs) -> object:
    return cls(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, vocab_size=vocab_size, pad_token_id=0, **kwargs)


CHAT_TEMPLATE = ("{% for message in messages %}USER: {% for part in message['content'] %}"
                 "{% if part['type'] == 'image' %}{{ image }} {% else %}{{ part['text'] }} {% endif %}{% endfor %}"
                 "ASSISTANT:{% endfor %}")


def llava() -> tuple[torch.nn.Module, object]:
    tokenizer = word_tokenizer(["<image>"], {"image_token": "<image>"})
    images = transformers.CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    processor = transformers.LlavaProcessor(
        image_processor=images, tokenizer=tokenizer, patch_size=PATCH, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE.replace("{{ image }}", "<image>"))
    config = transformers.LlavaConfig(
        vision_config=tower_config(transformers.CLIPVisionConfig), text_config=text_config(
            transformers.LlamaConfig, len(tokenizer)), image_token_id=tokenizer.image_token_id,
        vision_feature_layer=-2, vision_feature_select_strategy="default")
    return transformers.LlavaForConditionalGeneration(config).eval(), processor


def paligemma() -> tuple[torch.nn.Module, object]:
    tokenizer = word_tokenizer(["<image>"], {"image_token": "<image>"})
    images = transformers.SiglipImageProcessor(size={"height": IMAGE, "width": IMAGE})
    images.image_seq_length = GRID
    processor = transformers.PaliGemmaProcessor(image_processor=images, tokenizer=tokenizer)
    config = transformers.PaliGemmaConfig(
        vision_config=tower_config(transformers.SiglipVisionConfig), projection_dim=WIDTH,
        text_config=text_config(transformers.GemmaConfig, len(tokenizer), head_dim=16),
        image_token_id=tokenizer.image_token_id)
    return transformers.PaliGemmaForConditionalGeneration(config).eval(), processor


GEMMA3_TOKENS = 16  # the projector pools the 8x8 grid to 4x4


def gemma3() -> tuple[torch.nn.Module, object]:
    special = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tokenizer = word_tokenizer(list(special.values()), special)
    images = transformers.Gemma3ImageProcessor(size={"height": IMAGE, "width": IMAGE})
    processor = transformers.Gemma3Processor(
        image_processor=images, tokenizer=tokenizer, image_seq_length=GEMMA3_TOKENS,
        chat_template=CHAT_TEMPLATE.replace("{{ image }}", "<start_of_image>"))
    config = transformers.Gemma3Config(
        vision_config=tower_config(transformers.SiglipVisionConfig),
        text_config=text_config(transformers.Gemma3TextConfig, len(tokenizer), head_dim=16),
        image_token_id=tokenizer.image_token_id, boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id, mm_tokens_per_image=GEMMA3_TOKENS)
    return transformers.Gemma3ForConditionalGeneration(config).eval(), processor


def qwen2_5_vl() -> tuple[torch.nn.Module, object]:
    special = {"vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>",
               "image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}
    tokenizer = word_tokenizer(list(special.values()), special)
    # dynamic resolution: every picture keeps (about) its own size, between 16x16 and 48x48 pixels
    pixels = dict(patch_size=PATCH, temporal_patch_size=2, merge_size=2, min_pixels=16 * 16, max_pixels=48 * 48)
    processor = transformers.Qwen2_5_VLProcessor(
        image_processor=transformers.Qwen2VLImageProcessor(**pixels), tokenizer=tokenizer,
        video_processor=transformers.Qwen2VLVideoProcessor(**pixels),
        chat_template=CHAT_TEMPLATE.replace("{{ image }}", "<|vision_start|><|image_pad|><|vision_end|>"))
    vision = dict(depth=2, hidden_size=WIDTH, num_heads=2, intermediate_size=64, out_hidden_size=WIDTH,
                  patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2, window_size=4 * PATCH,
                  fullatt_block_indexes=[1])
    text = dict(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=len(tokenizer),
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    config = transformers.Qwen2_5_VLConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.video_token_id, vision_start_token_id=tokenizer.vision_start_token_id)
    return transformers.Qwen2_5_VLForConditionalGeneration(config).eval(), processor


QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|> "

FAMILIES = [
    Family("llava", llava, lambda n: "USER: " + "<image> " * n + "what is this ? ASSISTANT:", GRID),
    # PaliGemma's processor puts the placeholders before the prompt itself
    Family("paligemma", paligemma, lambda n: "<image>" * n + "what is this ?", GRID),
    Family("gemma3", gemma3, lambda n: "USER: " + "<start_of_image> " * n + "what is this ? ASSISTANT:",
           GEMMA3_TOKENS, tower_merges=False),
    # the first picture (40x48 px) gives 10x12 patches, 30 tokens after the 2x2 merger; the others are smaller
    Family("qwen2_5_vl", qwen2_5_vl, lambda n: "USER: " + QWEN_IMAGE * n + "what is this ? ASSISTANT:", 30,
           tower_merges=False, dynamic=True),
]


def pictures(count: int, seed: int = 0) -> list[Image.Image]:
    """``count`` random pictures of different sizes (the processor resizes them)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40 + 4 * i, 48 - 2 * i, 3), dtype=np.uint8)) for i in range(count)]


def make(family: Family) -> tuple[torch.nn.Module, object]:
    torch.manual_seed(0)
    return family.build()


def logits_and_ids(model, batch, new_tokens: int = 3):
    """The logits of one pass over ``batch`` and ``new_tokens`` greedy tokens generated from it."""
    with torch.no_grad():
        return model(**batch).logits, model.generate(**batch, max_new_tokens=new_tokens, do_sample=False)


def assert_unreduced_is_unpatched(model, processor, batch_of: Callable[[object], dict], full: int) -> None:
    """With every image (crop) keeping its ``full`` tokens, the processor gives the same
    prompts and the model the unpatched ids, and logits within 1e-6."""
    batch = batch_of(processor)
    expected_logits, expected_ids = logits_and_ids(model, batch)
    import tokenmerge

    tokenmerge.apply(model, visual_tokens=full, processor=processor)
    again = batch_of(processor)
    assert torch.equal(again["input_ids"], batch["input_ids"])
    logits, ids = logits_and_ids(model, again)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(logits, expected_logits, atol=1e-6, rtol=0)
