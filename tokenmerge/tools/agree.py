"""``tokenmerge agree``: how often a vision-language model with fewer visual tokens
answers as the full model does, on the user's own images and questions, and how much
sooner it answers. No labels are needed: the full model's answers are the reference.

Every sample (an image and a question) goes through the full model and every setting in
turn, so that all settings are timed on the same inputs under the same machine load.
Per setting it reports the share of answers identical to the full model's (greedy
decoding, token for token), the share whose first token is, and the time to first token
and to the whole answer, each as the median over samples of the full model's time over
the setting's, with its spread.

Quality can only be measured on real weights: run this on the model you deploy, with
the images and questions it will see.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from . import options
from .cli import COMMANDS
from .files import check_output_path, write_csv
from .messages import error_summary
from .progress import ProgressBar
from .reports import describe_environment, environment, format_table
from .settings import AppliedSetting
from .timing import MIN_TIMED_ROUNDS, spread_percent, synchronize, too_few_rounds, untrusted

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
FULL = "full"
DEFAULT_QUESTION = "Describe this image in one sentence."
MORE_SAMPLES = "measure on more images, with fewer --threads or on a quieter machine"
#: The methods that reduce visual tokens, which carry no class token (:func:`tokenmerge.fixed_count.reduce_to`).
VLM_METHODS = ["tome", "tome-features", "random", "cut"]


@dataclass(frozen=True)
class Sample:
    """One question about one image."""

    image: Path
    question: str


@dataclass
class Answer:
    """What one setting gave for one sample: the new token ids, the seconds to the
    first token and to the whole answer, and the visual tokens each image kept."""

    tokens: list[int]
    first_token_s: float
    answer_s: float
    visual_tokens: list[int]


# --- what to run on ----------------------------------------------------------------------


def read_samples(images: Path, prompts: Optional[Path], question: str, limit: Optional[int]) -> list[Sample]:
    """The samples: every image of the folder ``images`` with ``question``, or the lines of
    ``prompts`` (JSON lines ``{"image": PATH, "question": TEXT}``, paths relative to the
    file's folder); the first ``limit`` of them. A one-line error for anything unusable."""
    if prompts is not None:
        samples = read_prompts(prompts)
    else:
        if not images.is_dir():
            raise ValueError(f"--images {images}: no such folder; give a folder of images or --prompts FILE")
        files = sorted(path for path in images.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"--images {images} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        samples = [Sample(path, question) for path in files]
    return samples[:limit] if limit else samples


def read_prompts(path: Path) -> list[Sample]:
    if not path.is_file():
        raise ValueError(f"--prompts {path}: no such file; give a JSON lines file of {{\"image\": ..., "
                         "\"question\": ...}")
    samples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            samples.append(Sample(path.parent / entry["image"], str(entry["question"])))
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"--prompts {path}, line {number}: not a JSON object with \"image\" and "
                             "\"question\"") from None
    if not samples:
        raise ValueError(f"--prompts {path} holds no samples")
    return samples


def settings_of(visual_tokens: Sequence[int | float], tower_r: Sequence[int], method: Optional[str],
                prop_attn: Optional[bool]) -> list[AppliedSetting]:
    """The full model, then one setting per ``visual_tokens`` and per tower ``r``."""
    common: dict[str, Any] = {"method": method, "prop_attn": prop_attn}
    common = {key: value for key, value in common.items() if value is not None}
    settings = [AppliedSetting(FULL)]
    settings += [AppliedSetting(f"visual_tokens={count}", {"visual_tokens": count, **common})
                 for count in visual_tokens]
    settings += [AppliedSetting(f"r={r}", {"r": r, **common}) for r in tower_r]
    return settings


def load_vlm(folder: Path, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
    """The model and processor ``save_pretrained`` wrote to ``folder``; a one-line error
    for a folder that holds none, or a model tokenmerge does not reduce."""
    import transformers

    from tokenmerge.adapters.vlm import find_family

    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: no config.json; give a folder written by save_pretrained (a model and its "
                         "processor)")
    try:
        model = transformers.AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype).to(device).eval()
        processor = transformers.AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{folder}: cannot load a vision-language model and its processor ({error_summary(error)})"
                         ) from None
    try:
        family = find_family(model)
    except TypeError as error:
        raise ValueError(str(error)) from None
    if family is None:
        raise ValueError(f"{folder} holds a {type(model).__name__}, which is no vision-language model")
    return model, processor


# --- measuring ---------------------------------------------------------------------------


def encode(processor: Any, sample: Sample, image: Any, device: torch.device) -> dict[str, Any]:
    """The model's inputs for ``sample``: the question as the user's turn of the
    processor's chat template with the image before it, or, for a processor without
    one (PaliGemma), the question as the prompt."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": sample.question}]}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
    else:
        inputs = processor(images=[image], text=[sample.question], return_tensors="pt")
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}


def timed_generate(model: torch.nn.Module, inputs: dict[str, Any], new_tokens: int,
                   device: torch.device) -> tuple[torch.Tensor, float]:
    """Greedy ``generate`` of up to ``new_tokens``: the new token ids and the seconds it took."""
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    synchronize(device)
    return output[0, inputs["input_ids"].shape[1]:], time.perf_counter() - start


def answer(model: torch.nn.Module, processor: Any, setting: AppliedSetting, sample: Sample, image: Any,
           new_tokens: int, device: torch.device) -> Answer:
    """``setting``'s answer to ``sample``: applied to the model and processor, timed
    twice (one token, for the time to first token; the whole answer), removed."""
    import tokenmerge

    if setting.apply:
        tokenmerge.apply(model, processor=processor, **setting.apply)
    try:
        inputs = encode(processor, sample, image, device)
        _, first_token_s = timed_generate(model, inputs, 1, device)
        tokens, answer_s = timed_generate(model, inputs, new_tokens, device)
        kept = [kept for _, kept in tokenmerge.get_state(model).counts] if setting.apply else []
    finally:
        if setting.apply:
            tokenmerge.remove(model)
    return Answer(tokens.tolist(), first_token_s, answer_s, kept)


def measure(model: torch.nn.Module, processor: Any, samples: Sequence[Sample], settings: Sequence[AppliedSetting],
            new_tokens: int = 32, device: Optional[torch.device] = None, warmup: int = 1,
            progress: bool = True, skipped: Optional[list[str]] = None) -> dict[str, list[Optional[Answer]]]:
    """Every setting's answer to every sample (None where the sample could not be read),
    the settings interleaved per sample, after ``warmup`` untimed rounds of the first
    sample, on ``device`` (the model's, by default). An image that cannot be opened is
    skipped, noted in ``skipped``."""
    from PIL import Image

    device = device if device is not None else next(model.parameters()).device

    answers: dict[str, list[Optional[Answer]]] = {setting.name: [] for setting in settings}
    total = (len(samples) + warmup) * len(settings)
    with ProgressBar(total=total, disable=not progress, desc="answering", unit="answer") as bar:
        for index in range(-warmup, len(samples)):
            sample = samples[max(index, 0)]
            try:
                with Image.open(sample.image) as opened:
                    image = opened.convert("RGB")
            except OSError as error:
                if index >= 0:
                    (skipped if skipped is not None else []).append(f"{sample.image}: {error_summary(error)}")
                    for setting in settings:
                        answers[setting.name].append(None)
                bar.update(len(settings))
                continue
            for setting in settings:
                result = answer(model, processor, setting, sample, image, new_tokens, device)
                if index >= 0:
                    answers[setting.name].append(result)
                bar.update()
    return answers


def summarize(answers: dict[str, list[Optional[Answer]]]) -> list[dict[str, Any]]:
    """One row per setting: agreement with the full model's answers and speed-ups over it
    (medians over samples of the per-sample ratio, with their spread in percent)."""
    full = answers[FULL]
    rows = []
    for name, results in answers.items():
        pairs = [(reference, result) for reference, result in zip(full, results)
                 if reference is not None and result is not None]
        if not pairs:
            continue
        first = [reference.first_token_s / result.first_token_s for reference, result in pairs]
        whole = [reference.answer_s / result.answer_s for reference, result in pairs]
        kept = [count for _, result in pairs for count in result.visual_tokens]
        rows.append({
            "setting": name,
            "samples": len(pairs),
            "visual_tokens": statistics.mean(kept) if kept else float("nan"),
            "identical": 100 * statistics.mean(reference.tokens == result.tokens for reference, result in pairs),
            "first_token": 100 * statistics.mean(reference.tokens[:1] == result.tokens[:1]
                                                 for reference, result in pairs),
            "first_token_speedup": statistics.median(first),
            "first_token_spread": spread_percent(first) if len(first) > 1 else float("nan"),
            "answer_speedup": statistics.median(whole),
            "answer_spread": spread_percent(whole) if len(whole) > 1 else float("nan"),
        })
    return rows


COLUMNS = [
    ("setting", "setting", ""),
    ("samples", "samples", "d"),
    ("visual_tokens", "visual tokens/image", ".1f"),
    ("identical", "answers identical %", ".1f"),
    ("first_token", "first token identical %", ".1f"),
    ("first_token_speedup", "first token speed-up", ".2f"),
    ("first_token_spread", "spread %", ".0f"),
    ("answer_speedup", "answer speed-up", ".2f"),
    ("answer_spread", "spread %", ".0f"),
]


def warnings_of(rows: Sequence[dict[str, Any]]) -> list[str]:
    """What makes the speed figures not to be taken as fact: too few samples, a spread too large."""
    reduced = [row for row in rows if row["setting"] != FULL]
    found = [too_few_rounds({row["setting"]: row["samples"] for row in reduced}, "samples", MORE_SAMPLES),
             untrusted({row["setting"]: row["first_token_spread"] for row in reduced
                        if row["samples"] >= MIN_TIMED_ROUNDS}, MORE_SAMPLES)]
    return [warning for warning in found if warning]


def answer_rows(samples: Sequence[Sample], answers: dict[str, list[Optional[Answer]]],
                processor: Any) -> list[dict[str, Any]]:
    """One row per sample and setting, for ``--output``: the decoded answer and whether it is the full model's."""
    rows = []
    for index, sample in enumerate(samples):
        reference = answers[FULL][index]
        for name, results in answers.items():
            result = results[index]
            if result is None or reference is None:
                continue
            rows.append({"image": str(sample.image), "question": sample.question, "setting": name,
                         "answer": processor.decode(result.tokens, skip_special_tokens=True),
                         "identical": result.tokens == reference.tokens,
                         "first_token_s": result.first_token_s, "answer_s": result.answer_s})
    return rows


# --- the command ---------------------------------------------------------------------------


def parse_counts(text: str) -> list[int | float]:
    """``"144,64,0.25"``: whole numbers of tokens, or fractions in (0, 1]."""
    from tokenmerge.fixed_count import check_count

    counts: list[int | float] = []
    for item in text.split(","):
        try:
            count: int | float = float(item) if "." in item else int(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: give a whole number of tokens or a fraction in (0, 1], "
                                             "such as 144,64,0.25") from None
        try:
            check_count(count)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"{item!r}: {error}") from None
        counts.append(count)
    return counts


def parse_rs(text: str) -> list[int]:
    try:
        rs = [int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give whole numbers, such as 8,16") from None
    if any(r < 0 for r in rs):
        raise argparse.ArgumentTypeError(f"{text!r}: r cannot be negative")
    return rs


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "agree", help=COMMANDS["agree"][1],
        description="Answer every question about every image with the full vision-language model and with every "
        "setting of fewer visual tokens, in turn, and report how often the answers are the same and how much sooner "
        "they come. The model is loaded with from_pretrained from a local folder.")
    parser.add_argument("model", type=Path, help="a folder written by save_pretrained: the model and its processor")
    parser.add_argument("--images", type=Path, default=Path("."), help="a folder of images (searched recursively)")
    parser.add_argument("--question", default=DEFAULT_QUESTION,
                        help=f"the question asked about every image (default: {DEFAULT_QUESTION!r})")
    parser.add_argument("--prompts", type=Path, metavar="FILE",
                        help="JSON lines of {\"image\": PATH, \"question\": TEXT} instead of --images and --question")
    parser.add_argument("--limit", type=options.positive_int, metavar="N", help="the first N samples only")
    parser.add_argument("--visual-tokens", type=parse_counts, default=[144, 64], metavar="K,K,...",
                        help="visual tokens per image of every setting: counts or fractions (default: 144,64)")
    parser.add_argument("--tower-r", type=parse_rs, default=[], metavar="R,R,...",
                        help="settings that merge r tokens per block in the vision tower (where the family can)")
    parser.add_argument("--method", choices=VLM_METHODS, help="what reduces the visual tokens (default: tome, token "
                        "merging; tome-features matches on the tokens themselves; random and cut are baselines)")
    parser.add_argument("--prop-attn", action=argparse.BooleanOptionalAction, default=None,
                        help="size-aware attention in the language model: every visual token weighed by the tokens "
                        "it stands for (default: off for vision-language models)")
    parser.add_argument("--max-new-tokens", type=options.positive_int, default=32, metavar="N",
                        help="the longest answer (default: 32)")
    parser.add_argument("--warmup", type=options.non_negative_int, default=1, metavar="N",
                        help="untimed rounds of the first sample (default: 1)")
    parser.add_argument("--output", type=Path, metavar="FILE.csv", help="write every answer of every setting")
    options.add_runtime_options(parser, amp=False)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    device = options.check_runtime(args)
    check_output_path(args.output, (".csv",))
    samples = read_samples(args.images, args.prompts, args.question, args.limit)
    model, processor = load_vlm(args.model, device, options.DTYPES[args.dtype])
    settings = settings_of(args.visual_tokens, args.tower_r, args.method, args.prop_attn)
    skipped: list[str] = []
    answers = measure(model, processor, samples, settings, args.max_new_tokens, device, args.warmup,
                      skipped=skipped)
    for line in skipped:
        options.note("agree", f"skipped {line}")
    rows = summarize(answers)
    if not rows:
        raise ValueError("no image could be read; nothing was measured")
    print(f"# {type(model).__name__} from {args.model}: {len(samples) - len(skipped)} samples, greedy answers of up "
          f"to {args.max_new_tokens} tokens; {describe_environment(environment(device))}, "
          f"{torch.get_num_threads()} threads")
    print(format_table(rows, COLUMNS))
    for warning in warnings_of(rows):
        options.note("agree", warning, "warning")
    if args.output is not None:
        columns = ["image", "question", "setting", "answer", "identical", "first_token_s", "answer_s"]
        write_csv(args.output, columns, answer_rows(samples, answers, processor))
