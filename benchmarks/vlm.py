"""Time to first token, prefill and KV cache of vision-language models with fewer visual tokens.

    python benchmarks/vlm.py                        # LLaVA-1.5-7B and Qwen2.5-VL-7B shapes, float32 on the CPU
    python benchmarks/vlm.py --models llava --runs 10
    python benchmarks/vlm.py --device cuda --dtype bfloat16 --decoder-layers 8
    python benchmarks/vlm.py --quick --runs 2       # tiny widths, the real token counts: that it runs

The models are transformers' own classes at the real widths with random weights (no
model hub is needed): LLaVA-1.5-7B (``LlavaForConditionalGeneration``: CLIP ViT-L/14
at 336 px, 576 visual tokens, a LLaMA decoder 4096 wide) and Qwen2.5-VL-7B
(``Qwen2_5_VLForConditionalGeneration``: its 32-block window-attention ViT, a 448x448
image by default, 256 visual tokens after the 2x2 merger, a decoder 3584 wide with 4
key-value heads), each with its real processor class over an offline word-level
tokenizer and a prompt of one image and ``--text-tokens`` words. The decoder is built
with ``--decoder-layers`` of its real depth (all its layers are alike); every figure
is at the real depth, scaled from the layers measured (the notes under the table give
the formula). The real vocabularies are kept, so the embedding and the language-model
head (applied to the last position only, as ``generate``'s prefill does) are real too.

Settings, timed interleaved in one run (unpatched, every setting, unpatched, ...,
warm-up rounds excluded): the unpatched model; ``visual_tokens`` at the full count
(which reduces nothing), at every ``--visual-tokens`` count; and ``r`` in the vision
tower for every ``--r`` (LLaVA only: Qwen2.5-VL refuses it, and the table says so).
One timed pass is the forward pass ``generate`` starts with: the prompt with its
image, the KV cache built, the logits of the last position.
"""
from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image
from speed_options import ints
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import Tensor, nn

import tokenmerge
from tokenmerge.tools.reports import describe_environment, environment
from tokenmerge.tools.timing import (
    interquartile_range,
    synchronize,
    time_interleaved,
    too_few_rounds,
    untrusted,
)

#: The issue's targets: time to first token at 144 of 576 visual tokens, and the reduction's share of prefill.
TARGET_TTFT_RATIO, TARGET_REDUCTION_SHARE = 0.40, 0.02


# --- the models ------------------------------------------------------------------------


@dataclass(frozen=True)
class Built:
    """A model to time, its processor, one image and a prompt for it."""

    model: nn.Module
    processor: Any
    image: Image.Image
    prompt: str


@dataclass(frozen=True)
class Shape:
    """One model family at the shapes of a real model.

    Attributes:
        name: the ``--models`` name.
        title: the real model whose shapes it takes.
        build: makes the model with ``(decoder layers, text tokens, options)``.
        depth: the real model's decoder layers, what every figure is scaled to.
        vision_parts: the inner model's modules that make the visual tokens before
            any reduction (the tower, the projector).
    """

    name: str
    title: str
    build: Callable[[int, int, argparse.Namespace], Built]
    depth: int
    vision_parts: tuple[str, ...]


def word_tokenizer(special: dict[str, str], text_tokens: int) -> transformers.PreTrainedTokenizerFast:
    """An offline word-level tokenizer (split on spaces) that knows a family's
    ``special`` tokens, as its processor names them, and the prompt's words."""
    words = ["<pad>", "<s>", "</s>", "<unk>", *special.values(), "USER:", "ASSISTANT:", *prompt_words(text_tokens)]
    model = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=model, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens=special, padding_side="left",
    )


def prompt_words(text_tokens: int) -> list[str]:
    return [f"w{index}" for index in range(text_tokens)]


def prompt_around(image: str, text_tokens: int) -> str:
    """A chat prompt of ``text_tokens`` tokens of text around one image placeholder."""
    return " ".join(["USER:", image, *prompt_words(max(0, text_tokens - 2)), "ASSISTANT:"])


def random_image(size: int) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def llava(layers: int, text_tokens: int, args: argparse.Namespace) -> Built:
    """LLaVA-1.5-7B: CLIP ViT-L/14-336 read at layer -2 without its class token, a
    two-layer MLP projector, a LLaMA decoder (4096 wide, 32 heads)."""
    image_size, patch = 336, 14
    tower = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
    text = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                vocab_size=32064)
    if args.quick:
        tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)
        text = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=2)
    tokenizer = word_tokenizer({"image_token": "<image>"}, text_tokens)
    text.setdefault("vocab_size", len(tokenizer))
    images = transformers.CLIPImageProcessor(size={"shortest_edge": image_size},
                                             crop_size={"height": image_size, "width": image_size})
    processor = transformers.LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=patch,
                                            vision_feature_select_strategy="default", num_additional_image_tokens=1)
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(image_size=image_size, patch_size=patch, **tower),
        text_config=transformers.LlamaConfig(num_hidden_layers=layers, pad_token_id=0, **text),
        image_token_id=tokenizer.image_token_id, vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = transformers.LlavaForConditionalGeneration(config)
    return Built(model, processor, random_image(image_size), prompt_around("<image>", text_tokens))


def qwen2_5_vl(layers: int, text_tokens: int, args: argparse.Namespace) -> Built:
    """Qwen2.5-VL-7B: a 32-block ViT (window attention, full attention in blocks 7, 15,
    23 and 31) whose 2x2 merger gives one token per 28x28 pixels, and a decoder 3584
    wide with 28 query and 4 key-value heads, placed by M-RoPE."""
    special = {"vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>",
               "image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}
    vision = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=3584,
                  fullatt_block_indexes=[7, 15, 23, 31])
    text = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                vocab_size=152064, rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24],
                                                    "rope_theta": 1000000.0})
    if args.quick:
        vision = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
                      fullatt_block_indexes=[1])
        text = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1,
                    rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0})
    tokenizer = word_tokenizer(special, text_tokens)
    text.setdefault("vocab_size", len(tokenizer))
    # the image keeps its size: a multiple of 28 pixels is not resized
    pixels = dict(patch_size=14, temporal_patch_size=2, merge_size=2, min_pixels=28 * 28,
                  max_pixels=args.qwen_image ** 2)
    processor = transformers.Qwen2_5_VLProcessor(
        image_processor=transformers.Qwen2VLImageProcessor(**pixels), tokenizer=tokenizer,
        video_processor=transformers.Qwen2VLVideoProcessor(**pixels))
    config = transformers.Qwen2_5_VLConfig(
        vision_config=dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112, **vision),
        text_config=dict(num_hidden_layers=layers, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **text), image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.video_token_id, vision_start_token_id=tokenizer.vision_start_token_id)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    return Built(model, processor, random_image(args.qwen_image), prompt_around(image, text_tokens))


SHAPES = {
    "llava": Shape("llava", "LLaVA-1.5-7B", llava, 32, ("vision_tower", "multi_modal_projector")),
    "qwen": Shape("qwen", "Qwen2.5-VL-7B", qwen2_5_vl, 28, ("visual",)),
}
#: The decoder depth figures are scaled to under --quick, whose decoders are tiny.
QUICK_DEPTH = 4


# --- the settings ----------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One way to run the model: unpatched (no options) or with the options of ``tokenmerge.apply``."""

    name: str
    options: dict[str, int]


def settings_for(full: int, visual_tokens: Sequence[int], rs: Sequence[int]) -> list[Setting]:
    """Unpatched, ``visual_tokens`` at the ``full`` count (which reduces nothing) and at
    every count below it, and ``r`` in the tower."""
    settings = [Setting("unpatched", {}), Setting(f"visual_tokens={full} (all)", {"visual_tokens": full})]
    settings += [Setting(f"visual_tokens={count}", {"visual_tokens": count}) for count in visual_tokens
                 if count < full]
    return settings + [Setting(f"r={r}", {"r": r}) for r in rs]


def full_count(built: Built) -> int:
    """The visual tokens the unpatched processor gives the image."""
    return placeholders(built.model, inputs_of(built.processor, built, "cpu", torch.float32))


def placeholders(model: nn.Module, inputs: dict[str, Any]) -> int:
    return int((inputs["input_ids"] == model.config.image_token_id).sum())


def inputs_of(processor: Any, built: Built, device: str, dtype: torch.dtype) -> dict[str, Any]:
    """The processor's inputs for the prompt and image, floating ones in ``dtype``, on ``device``."""
    encoded = processor(images=[built.image], text=[built.prompt], return_tensors="pt")
    return {key: value.to(device, dtype) if value.is_floating_point() else value.to(device)
            for key, value in encoded.items()}


def sharing_weights(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its own modules (to patch) over the same parameters and buffers."""
    shared = {id(tensor): tensor for tensor in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo=shared)


# --- timing the parts of a pass ---------------------------------------------------------


class Probe:
    """Seconds one model spends, in every forward pass, in the vision step
    (``get_image_features``: tower, projector and reduction), in the tower and
    projector themselves, and in the decoder layers: forward hooks, and a wrapper on
    the inner model's ``get_image_features``, the device synchronised at each edge."""

    def __init__(self, model: nn.Module, inputs: dict[str, Any], vision_parts: Sequence[str]):
        self.model, self.inputs = model, inputs
        self.device = next(model.parameters()).device
        self.passes: list[dict[str, float]] = []
        self.current: dict[str, float] = defaultdict(float)
        inner: Any = model.model
        for name in vision_parts:
            self.time_module(getattr(inner, name), "tower")
        for layer in inner.language_model.layers:
            self.time_module(layer, "layers")
        inner.get_image_features = self.timed(inner.get_image_features, "vision")

    def now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def time_module(self, module: nn.Module, part: str) -> None:
        starts: list[float] = []
        module.register_forward_pre_hook(lambda *_: starts.append(self.now()))
        module.register_forward_hook(lambda *_: self.add(part, starts.pop()))

    def timed(self, function: Callable, part: str) -> Callable:
        def run(*args: Any, **kwargs: Any) -> Any:
            start = self.now()
            try:
                return function(*args, **kwargs)
            finally:
                self.add(part, start)

        return run

    def add(self, part: str, start: float) -> None:
        self.current[part] += self.now() - start

    def run(self, _: Tensor) -> Tensor:
        """One prefill pass, as ``generate`` starts (KV cache built, last position's logits)."""
        self.current = defaultdict(float)
        logits = self.model(**self.inputs, use_cache=True, logits_to_keep=1).logits
        self.passes.append(dict(self.current))
        return logits


@dataclass(frozen=True)
class Pass:
    """One timed pass, scaled to the real decoder depth (seconds)."""

    ttft: float
    prefill: float
    reduction: float


def scaled(total: float, parts: dict[str, float], measured: int, depth: int) -> Pass:
    """A pass of ``total`` seconds with ``measured`` decoder layers, at ``depth`` layers:
    the vision step, ``depth`` times the mean decoder layer, and the rest of the pass."""
    vision, layers = parts.get("vision", 0.0), parts["layers"]
    rest = total - vision - layers
    prefill = depth * layers / measured + rest
    return Pass(vision + prefill, prefill, vision - parts.get("tower", 0.0))


# --- measuring -------------------------------------------------------------------------


@dataclass
class Row:
    model: str
    setting: str
    visual_tokens: int
    prompt_tokens: int
    passes: list[Pass]
    kv_bytes: int


def kv_cache_bytes(model: nn.Module, tokens: int, depth: int, dtype: torch.dtype) -> int:
    """2 (keys, values) x layers x key-value heads x head size x tokens x bytes per element."""
    text = model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * depth * text.num_key_value_heads * head_dim * tokens * dtype.itemsize


def measure(shape: Shape, args: argparse.Namespace, dtype: torch.dtype) -> tuple[list[Row], list[str]]:
    """Every setting of ``shape`` timed interleaved; the rows, and notes on settings refused."""
    depth = QUICK_DEPTH if args.quick else shape.depth
    measured = min(args.decoder_layers, depth)
    torch.manual_seed(0)
    built = shape.build(measured, args.text_tokens, args)
    model = built.model.to(args.device, dtype).eval()
    full = full_count(built)
    probes, rows, notes = {}, {}, []
    for setting in settings_for(full, args.visual_tokens, args.r):
        copied, processor = sharing_weights(model), copy.deepcopy(built.processor)
        try:
            if setting.options:
                tokenmerge.apply(copied, processor=processor, **setting.options)
        except TypeError as refused:
            notes.append(f"{shape.title}, {setting.name}: refused: {refused}")
            continue
        inputs = inputs_of(processor, built, args.device, dtype)
        probes[setting.name] = Probe(copied, inputs, shape.vision_parts)
        tokens = inputs["input_ids"].shape[1]
        rows[setting.name] = Row(shape.title, setting.name, placeholders(model, inputs), tokens, [],
                                 kv_cache_bytes(model, tokens, depth, dtype))
    times = time_interleaved({name: probe.run for name, probe in probes.items()},
                             torch.empty(0, device=args.device), args.runs, args.warmup, description=shape.title)
    for name, probe in probes.items():
        rows[name].passes = [scaled(total, parts, measured, depth)
                             for total, parts in zip(times[name], probe.passes[args.warmup:])]
    notes.append(f"{shape.title}: decoder of {measured} of {depth} layers built and timed, scaled to {depth}")
    return list(rows.values()), notes


# --- the table -------------------------------------------------------------------------


def ratios(row: Row, base: Row, figure: str) -> tuple[float, float]:
    """The median and the interquartile range of ``figure`` over ``base``'s, round by round."""
    values = [getattr(mine, figure) / getattr(theirs, figure) for mine, theirs in zip(row.passes, base.passes)]
    return statistics.median(values), interquartile_range(values)


def median_of(row: Row, figure: str) -> float:
    return statistics.median(getattr(one, figure) for one in row.passes)


HEADER = ("| model | setting | visual tokens | prompt tokens | TTFT ms | TTFT ratio | IQR | prefill ms | "
          "prefill ratio | IQR | reduction ms | of prefill | KV cache MiB | KV ratio |")


def markdown(rows: list[Row]) -> str:
    lines = [HEADER, "|---" * HEADER.count(" | ") + "|---|"]
    for row in rows:
        base = next(other for other in rows if other.model == row.model and other.setting == "unpatched")
        ttft, ttft_iqr = ratios(row, base, "ttft")
        prefill, prefill_iqr = ratios(row, base, "prefill")
        reduction = median_of(row, "reduction")
        lines.append(
            f"| {row.model} | {row.setting} | {row.visual_tokens} | {row.prompt_tokens} | "
            f"{1000 * median_of(row, 'ttft'):.0f} | {ttft:.3f} | {ttft_iqr:.3f} | "
            f"{1000 * median_of(row, 'prefill'):.0f} | {prefill:.3f} | {prefill_iqr:.3f} | "
            f"{1000 * reduction:.1f} | {100 * reduction / median_of(row, 'prefill'):.2f}% | "
            f"{row.kv_bytes / 2 ** 20:.1f} | {row.kv_bytes / base.kv_bytes:.3f} |")
    return "\n".join(lines)


def target_notes(rows: list[Row]) -> list[str]:
    """Whether this run met the issue's targets, where it measured what they are about."""
    notes = []
    for row in rows:
        base = next(other for other in rows if other.model == row.model and other.setting == "unpatched")
        if row.visual_tokens == 144 and base.visual_tokens == 576:
            ttft = ratios(row, base, "ttft")[0]
            verdict = "met" if ttft <= TARGET_TTFT_RATIO else "NOT met"
            notes.append(f"target TTFT at 144 of 576 visual tokens <= {TARGET_TTFT_RATIO:.2f} of the unpatched "
                         f"model's ({row.model}): {ttft:.3f}, {verdict}")
    shares = {f"{row.model} {row.setting}": median_of(row, "reduction") / median_of(row, "prefill")
              for row in rows if row.setting.startswith("visual_tokens=") and not row.setting.endswith("(all)")}
    if shares:
        worst = max(shares, key=shares.__getitem__)
        verdict = "met" if shares[worst] <= TARGET_REDUCTION_SHARE else "NOT met"
        notes.append(f"target reduction step <= {100 * TARGET_REDUCTION_SHARE:.0f}% of prefill: at most "
                     f"{100 * shares[worst]:.2f}% ({worst}), {verdict}")
    return notes


def timing_notes(rows: list[Row], runs: int) -> list[str]:
    """Warnings on ratios too noisy, or timed too few rounds, to trust."""
    spreads = {}
    for row in rows:
        base = next(other for other in rows if other.model == row.model and other.setting == "unpatched")
        if row is not base:
            median, iqr = ratios(row, base, "ttft")
            spreads[f"{row.model} {row.setting}"] = 100 * iqr / median
    warnings = [untrusted(spreads), too_few_rounds({"every setting": runs})]
    return [warning for warning in warnings if warning]


FORMULA = (
    "per pass, vision = the time in get_image_features (tower, projector, reduction); layer = the time in the "
    "decoder layers built, over their number; rest = the pass - vision - the layers built (embedding, positions, "
    "placeholders, final norm, language-model head on the last position). At the real depth D: "
    "TTFT = vision + D x layer + rest, prefill = D x layer + rest. reduction = vision - the tower and projector's own "
    "time (matching, merging, grid order, the keys). KV cache = 2 x D x key-value heads x head size x prompt tokens "
    "x bytes per element. Ratios: to the unpatched model of the same round, median over the rounds, with their "
    "interquartile range (IQR)."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--visual-tokens", type=ints, default=[144, 64],
                        help="comma-separated visual tokens per image (default: 144,64)")
    parser.add_argument("--r", type=ints, default=[8, 16], help="comma-separated r in the tower (default: 8,16)")
    parser.add_argument("--decoder-layers", type=int, default=2,
                        help="decoder layers built and timed, scaled to the real depth (default: 2)")
    parser.add_argument("--text-tokens", type=int, default=50,
                        help="text tokens of the prompt around the image (default: 50, LLaVA-1.5's system prompt "
                        "and a short question)")
    parser.add_argument("--qwen-image", type=int, default=448,
                        help="Qwen2.5-VL's image side in pixels, a multiple of 28 (default: 448, 256 visual tokens; "
                        "672: 576)")
    parser.add_argument("--runs", type=int, default=5, help="timed rounds (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default: 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny widths (the real token counts, a decoder depth of {QUICK_DEPTH}): that it runs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.qwen_image % 28:
        parser.error(f"--qwen-image {args.qwen_image}: a multiple of 28 pixels, which Qwen2.5-VL does not resize")
    dtype = getattr(torch, args.dtype)
    how = "tiny widths (--quick)" if args.quick else "the real widths"
    print(f"{', '.join(SHAPES[name].title for name in args.models)} shapes at {how}, random weights, {args.dtype}; "
          f"{describe_environment(environment(args.device))}\n")
    rows, notes = [], []
    for name in args.models:
        measured_rows, measured_notes = measure(SHAPES[name], args, dtype)
        rows += measured_rows
        notes += measured_notes
        gc.collect()
    print(markdown(rows))
    print("\n" + "\n".join(f"- {note}" for note in [*notes, FORMULA, *target_notes(rows),
                                                     *timing_notes(rows, args.runs)]))


if __name__ == "__main__":
    main()
