"""The one vocabulary of the command-line tools: every option means the same thing,
with the same syntax, in every command that has it, and is checked before any work
(:func:`check_runtime`, :func:`tokenmerge.tools.files.check_output_path`, the model
loaders), so that a mistake costs a one-line error, not a finished run.

Options that ``torchrun`` would read as an abbreviation of its own (``--r``) have an
alias every command accepts (``--merge-r``; ``--sweep`` for a sweep).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch

from tokenmerge import schedule as schedules
from tokenmerge.libraries import LIBRARIES

from .messages import UnusableFile
from .settings import compared_by_default, variants

#: The model of the commands that can run without data: bench and visualize.
DEFAULT_MODEL = "vit_small_patch16_224"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AMP_DTYPES = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Data loading processes by default on a GPU; on the CPU they would take cores from the model.
CUDA_WORKERS = 4

SCHEDULE_SYNTAX = ("an int, one int per block '8/8/4/...', 'decreasing:R', 'increasing:R', 'linear:R:SLOPE' or "
                   "'@FILE', a schedule tokenmerge tune wrote")
DEFAULT_SWEEP_HELP = ("0 and a half, four fifths and all of (patch tokens) // (blocks), so it follows the model: "
                      "0,8,13,16 for a 197-token, 12-block ViT, 0,2,3,4 for a 50-token one")
CAP_POLICY = ("a block merges at most half of its mergeable tokens; an r beyond that merges what the block can, "
              "with a note")


def parse_schedule(text: str) -> schedules.Schedule:
    """One schedule: ``"13"``, ``"decreasing:13"``, ``"8/8/4/..."``, ``"@FILE"``; a
    file that cannot be used is an :class:`~tokenmerge.tools.messages.UnusableFile`."""
    try:
        return schedules.parse(text)
    except ValueError as error:
        if names_file(text):
            raise UnusableFile(str(error)) from None
        raise argparse.ArgumentTypeError(str(error)) from None


def names_file(item: str) -> bool:
    """Whether a schedule's text names a file: ``@`` and a name."""
    text = item.strip()
    return text.startswith("@") and text != "@"


def parse_sweep(text: str) -> list[schedules.Schedule]:
    """A comma-separated sweep of schedules: ``"0,8,13,16,decreasing:13"`` (see :func:`sweep_items`)."""
    return [parse_schedule(item) for item in sweep_items(text)]


def sweep_items(text: str) -> list[str]:
    """The items of a comma-separated sweep. A file name may hold commas: an ``@FILE``
    item takes in the pieces after it as far as that names an existing file (the
    furthest such), and is the piece alone where none does."""
    pieces, items = text.split(","), []
    while pieces:
        joined = [",".join(pieces[:count]) for count in range(1, len(pieces) + 1)]
        count = 1 + max((index for index, item in enumerate(joined)
                         if names_file(item) and Path(item.strip()[1:]).exists()), default=0)
        items.append(joined[count - 1])
        del pieces[:count]
    return items


def parse_methods(text: str) -> list[str]:
    """Comma-separated method names, each known."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in variants()]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown method {', '.join(unknown) or '(none given)'}; known: {', '.join(variants())}"
        )
    return names


def whole_number(minimum: int):
    """An argparse type: a whole number of at least ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


positive_int = whole_number(1)
non_negative_int = whole_number(0)


class Renamed(argparse.Action):
    """An option a command does not have, refused with a pointer to what it has."""

    def __init__(self, option_strings, dest, message: str = "", **kwargs):
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kwargs)
        self.message = message

    def __call__(self, parser, namespace, values, option_string=None):
        raise argparse.ArgumentError(self, self.message)


class ModelKwargs(argparse.Action):
    """timm's ``KEY=VALUE`` parsing (``timm.utils.ParseKwargs``: values as Python
    literals, else text), with an argparse error for an item without ``=``; timm is
    imported when the option is given, so that ``--help`` does not wait for it."""

    def __call__(self, parser, namespace, values, option_string=None):
        from timm.utils import ParseKwargs

        for value in values:
            if value and ("=" not in value or value.startswith("=")):
                raise argparse.ArgumentError(self, f"expected KEY=VALUE items, got {value!r}")
        ParseKwargs(self.option_strings, self.dest, nargs=self.nargs)(parser, namespace, values, option_string)


class ImageSize(argparse.Action):
    """``--img-size S`` (square) or ``--img-size H W``, stored as (H, W)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if len(values) > 2:
            raise argparse.ArgumentError(self, f"expected SIZE or HEIGHT WIDTH, got {len(values)} numbers")
        setattr(namespace, self.dest, (values[0], values[-1]))


# --- the model ---------------------------------------------------------------------


def add_model_options(parser: argparse.ArgumentParser, default_model: Optional[str] = None) -> None:
    """``--library``, ``--model``, ``--checkpoint``, ``--num-classes``, ``--model-kwargs``
    and ``--img-size``: how every command builds its model."""
    group = parser.add_argument_group("model")
    group.add_argument("--library", choices=list(LIBRARIES), default="timm",
                       help="the library the model comes from (default: timm)")
    group.add_argument("--model", default=default_model, required=default_model is None,
                       help="model name in its library: timm or torchvision model name, open_clip architecture, "
                       "transformers local folder" + (f" (default: {default_model})" if default_model else ""))
    group.add_argument("--checkpoint", metavar="FILE",
                       help="local weights: a file (timm: loaded through the model's pretrained config; torchvision: "
                       "a state dict; open_clip: a checkpoint), or for transformers a folder written by "
                       "save_pretrained; a model written by 'tokenmerge train' is OUTPUT/model.safetensors with "
                       "--num-classes (default: random weights)")
    group.add_argument("--num-classes", type=positive_int, metavar="N",
                       help="classes of the model's classifier, e.g. of a model fine-tuned by 'tokenmerge train' "
                       "(default: the model's own)")
    group.add_argument("--model-kwargs", nargs="*", default={}, action=ModelKwargs, metavar="KEY=VALUE",
                       help="more arguments for building the model: timm.create_model's, torchvision's get_model's, "
                       "open_clip's create_model's, or values of a transformers config; e.g. depth=6 "
                       "dynamic_img_size=True")
    group.add_argument("--img-size", type=positive_int, nargs="+", action=ImageSize, metavar="SIZE",
                       help="input size, SIZE or HEIGHT WIDTH: timm models are built for it (default: the model's)")


def check_library(args: argparse.Namespace, command: str, supported: Sequence[str]) -> None:
    """A command that builds models of some libraries only says so, naming the others."""
    if args.library not in supported:
        every = "bench, eval and compare"
        raise ValueError(f"tokenmerge {command} supports {', '.join(supported)} models only; "
                         f"{every} take --library {args.library}")


# --- what to run -------------------------------------------------------------------


def add_sweep_option(parser: argparse.ArgumentParser, default_help: str) -> None:
    parser.add_argument("--r", "--sweep", "--merge-r", dest="r", type=parse_sweep, metavar="SWEEP",
                        help=f"comma-separated r schedules, each {SCHEDULE_SYNTAX} (a FILE's name may hold commas: "
                        f"an @ item runs on over commas as far as that names an existing file); {CAP_POLICY} "
                        f"(default: {default_help}); under torchrun write --sweep")
    add_allow_other_model_option(parser)


def add_schedule_option(parser: argparse.ArgumentParser, default_help: str, default=None) -> None:
    parser.add_argument("--r", "--merge-r", dest="r", type=parse_schedule, default=default, metavar="R",
                        help=f"r schedule, {SCHEDULE_SYNTAX}; {CAP_POLICY} (default: {default_help}); "
                        "under torchrun write --merge-r")
    add_allow_other_model_option(parser)


def add_allow_other_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-other-model", action="store_true",
                        help="use a schedule file (@FILE) tuned for another model than --model; without it such a "
                        "file is refused, naming both models")


def add_method_option(parser: argparse.ArgumentParser, many: bool = False) -> None:
    """``--method`` (``--methods`` for a comparison) and ``--prop-attn``."""
    if many:
        default = compared_by_default()
        parser.add_argument("--methods", type=parse_methods, default=default, metavar="M,M,...",
                            help=f"comma-separated methods (default: {','.join(default)}; also known: "
                            f"{','.join(name for name in variants() if name not in default) or 'none'})")
    else:
        parser.add_argument("--method", choices=list(variants()),
                            help="token reduction method (default: tome, token merging, or for --r @FILE the "
                            "method it was tuned with); see tokenmerge compare --help")
    add_prop_attn_option(parser)


def add_prop_attn_option(parser: argparse.ArgumentParser, methods: bool = True) -> None:
    """``--prop-attn``, None where not given: a schedule file's own setting, or the method's, then applies."""
    parser.add_argument("--prop-attn", action=argparse.BooleanOptionalAction, default=None,
                        help="proportional attention: attention weighs every token by the patches it stands for "
                        "(default: on, or for --r @FILE the attention it was tuned with"
                        + ("; off for a *-no-prop-attn method)" if methods else ")"))


# --- where and how -----------------------------------------------------------------


def add_runtime_options(
    parser: argparse.ArgumentParser, dtype: bool = True, amp: bool = True, workers: bool = False
) -> None:
    """``--device``, ``--threads`` and, where the command has them, ``--dtype``,
    ``--amp`` and ``--workers``."""
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, ... (default: cpu)")
    group.add_argument("--threads", type=positive_int, metavar="N",
                       help="torch threads per process (default: torch's choice)")
    if dtype:
        group.add_argument("--dtype", choices=list(DTYPES), default="float32",
                           help="precision of the weights and inputs (default: float32)")
    if amp:
        group.add_argument("--amp", choices=list(AMP_DTYPES), default="none",
                           help="mixed precision through torch.autocast: bfloat16 or float16 (default: none)")
    if workers:
        group.add_argument("--workers", type=non_negative_int, metavar="N",
                           help=f"data loading processes per process (default: 0 on CPU, where they would take "
                           f"cores from the model; {CUDA_WORKERS} on CUDA)")


def check_device(text: str) -> torch.device:
    """The device ``text`` names, if torch can use it here; a one-line error otherwise."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {text}: not a device name; use cpu, cuda, cuda:1, mps, ...") from None
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        name = {"cuda": "CUDA GPU", "mps": "MPS (Apple GPU)"}.get(device.type, f"{device.type} device")
        raise ValueError(f"--device {text}: torch sees no {name} here; use --device cpu")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise ValueError(f"--device {text}: there {'is' if count == 1 else 'are'} only {count} {device.type} "
                         f"device{'s' if count != 1 else ''} here (numbered from 0)")
    return device


def check_runtime(args: argparse.Namespace) -> torch.device:
    """Check ``--device`` (and ``--amp`` on it) and set ``--threads``; the device."""
    device = check_device(args.device)
    if getattr(args, "amp", "none") == "float16" and device.type == "cpu":
        raise ValueError("--amp float16 needs a GPU; use --amp bfloat16 on the CPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    return device


def autocast(device: torch.device, amp: str | torch.dtype | None):
    """``torch.autocast`` on ``device`` to ``amp``, an ``--amp`` name or a dtype, or
    nothing for none."""
    dtype = AMP_DTYPES[amp] if isinstance(amp, str) else amp
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def default_workers(workers: Optional[int], device: torch.device) -> int:
    return workers if workers is not None else CUDA_WORKERS if device.type == "cuda" else 0


def note(command: str, text: str, kind: str = "note") -> None:
    """A line on stderr that the user should read but that does not stop the run:
    a ``note``, or a ``warning`` that a result is not to be trusted."""
    print(f"tokenmerge {command}: {kind}: {text}", file=sys.stderr, flush=True)


