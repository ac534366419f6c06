"""Tiny LLaVA-NeXT, LLaVA-OneVision and LLaVA-NeXT-Video models: a 32 px base crop of 8x8 patches and up to
two more crops (pinpoints 32x32, 32x64, 64x32), so that pictures of different shapes give
different token counts."""
from tests.adapters.vlm_models import (
    CHAT_TEMPLATE,
    GRID,
    IMAGE,
    PATCH,
    Family,
    text_config,
    tower_config,
    transformers,
    word_tokenizer,
)

PINPOINTS = [[IMAGE, IMAGE], [IMAGE, 2 * IMAGE], [2 * IMAGE, IMAGE]]
FRAMES = 4


def llava_next():
    tokenizer = word_tokenizer(["<image>"], {"image_token": "<image>"})
    images = transformers.LlavaNextImageProcessor(
        size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}, image_grid_pinpoints=PINPOINTS)
    processor = transformers.LlavaNextProcessor(
        image_processor=images, tokenizer=tokenizer, patch_size=PATCH, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE.replace("{{ image }}", "<image>"))
    config = transformers.LlavaNextConfig(
        vision_config=tower_config(transformers.CLIPVisionConfig), text_config=text_config(
            transformers.LlamaConfig, len(tokenizer)), image_token_id=tokenizer.image_token_id,
        image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2, vision_feature_select_strategy="default")
    return transformers.LlavaNextForConditionalGeneration(config).eval(), processor


def llava_onevision():
    special = {"image_token": "<image>", "video_token": "<video>"}
    tokenizer = word_tokenizer(list(special.values()), special)
    sizes = dict(size={"height": IMAGE, "width": IMAGE})
    processor = transformers.LlavaOnevisionProcessor(
        image_processor=transformers.LlavaOnevisionImageProcessor(image_grid_pinpoints=PINPOINTS, **sizes),
        video_processor=transformers.LlavaOnevisionVideoProcessor(**sizes), tokenizer=tokenizer,
        num_image_tokens=GRID, vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE.replace("{{ image }}", "<image>"))
    config = transformers.LlavaOnevisionConfig(
        vision_config=tower_config(transformers.SiglipVisionConfig), text_config=text_config(
            transformers.Qwen2Config, len(tokenizer)), image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.video_token_id, image_grid_pinpoints=PINPOINTS, vision_feature_layer=-1,
        vision_feature_select_strategy="full")
    return transformers.LlavaOnevisionForConditionalGeneration(config).eval(), processor


def llava_next_video():
    special = {"image_token": "<image>", "video_token": "<video>"}
    tokenizer = word_tokenizer(list(special.values()), special)
    sizes = dict(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    processor = transformers.LlavaNextVideoProcessor(
        image_processor=transformers.LlavaNextImageProcessor(image_grid_pinpoints=PINPOINTS, **sizes),
        video_processor=transformers.LlavaNextVideoVideoProcessor(**sizes), tokenizer=tokenizer, patch_size=PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE.replace("{{ image }}", "<image>"))
    config = transformers.LlavaNextVideoConfig(
        vision_config=tower_config(transformers.CLIPVisionConfig), text_config=text_config(
            transformers.LlamaConfig, len(tokenizer)), image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.video_token_id, image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2,
        vision_feature_select_strategy="default")
    return transformers.LlavaNextVideoForConditionalGeneration(config).eval(), processor


def prompt(images: int) -> str:
    return "USER: " + "<image> " * images + "what is this ? ASSISTANT:"


FAMILIES = [
    # the first picture (40x48 px) takes the 32x64 pinpoint: 64 base tokens and 8 rows of 10, each with its row end
    Family("llava_next", llava_next, prompt, 152, tower_merges=False, dynamic=True),
    Family("llava_onevision", llava_onevision, prompt, 152, tower_merges=False, dynamic=True),
    Family("llava_next_video", llava_next_video, prompt, 152, tower_merges=False, dynamic=True),
]
