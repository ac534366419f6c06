"""``tokenmerge train``: the command line of :func:`tokenmerge.tools.train.train`."""
from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from .. import options
from ..cli import COMMANDS
from ..data import class_folders
from ..distributed import first_process
from ..reports import format_table
from ..settings import tuned_variant, variant
from .config import TrainConfig
from .loop import check_timm_names, train
from .metrics import METRIC_COLUMNS


def add_parser(subparsers) -> None:
    defaults = TrainConfig(model="", data="", output="")
    parser = subparsers.add_parser(
        "train",
        help=COMMANDS["train"][1],
        description="Fine-tune a timm model on DATA/train/<class>/<image> with token merging, validating on "
        "DATA/val/<class>/<image> (or --val-split) after every epoch. A checkpoint is written after every epoch; "
        "running the same command again resumes after the last finished one. Under torchrun --nproc_per_node=N "
        "the global batch is shared by N processes (DistributedDataParallel). timm models only. The fine-tuned "
        "model is OUTPUT/model.safetensors, with its class map OUTPUT/classes.txt: evaluate it with "
        "tokenmerge eval --checkpoint OUTPUT/model.safetensors --num-classes K --class-map OUTPUT/classes.txt.",
    )
    options.add_model_options(parser)
    group = parser.add_argument_group("images")
    group.add_argument("--data", required=True, metavar="DIR", help="folder with train/ and val/ class folders")
    group.add_argument("--val-split", default=defaults.val_split, metavar="NAME",
                       help="the validation folder in DIR, e.g. test (default: val)")
    group.add_argument("--augment", action=argparse.BooleanOptionalAction, default=defaults.augment,
                       help="timm's training augmentation; --no-augment trains on the evaluation transform "
                       "(default: on)")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="folder for checkpoints, metrics.csv, metrics.png and steps.csv; "
                        "resumed if it holds a checkpoint")
    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=options.positive_int, default=defaults.epochs,
                       help=f"(default: {defaults.epochs})")
    group.add_argument("--max-steps-per-epoch", type=options.positive_int, metavar="N",
                       help="end every epoch after N steps")
    group.add_argument("--batch-size", type=options.positive_int, default=defaults.batch_size,
                       help=f"global batch over all processes (default: {defaults.batch_size})")
    group.add_argument("--lr", type=float, default=defaults.lr, help=f"peak learning rate (default: {defaults.lr:g})")
    group.add_argument("--weight-decay", type=float, default=defaults.weight_decay,
                       help=f"(default: {defaults.weight_decay:g})")
    group.add_argument("--opt", default=defaults.opt, help=f"timm optimizer name (default: {defaults.opt})")
    group.add_argument("--sched", default=defaults.sched, help=f"timm scheduler name (default: {defaults.sched})")
    group.add_argument("--warmup-epochs", type=options.non_negative_int, default=defaults.warmup_epochs,
                       help=f"(default: {defaults.warmup_epochs})")
    group.add_argument("--drop-path", type=float, default=defaults.drop_path,
                       help=f"drop path rate (default: {defaults.drop_path:g})")
    group.add_argument("--seed", type=int, default=defaults.seed, help=f"(default: {defaults.seed})")
    options.add_schedule_option(parser, "0, no merging", default=defaults.r)
    parser.add_argument("--eval-r", type=options.parse_schedule, metavar="R",
                        help="r schedule for validation (default: the training r)")
    options.add_method_option(parser)
    options.add_runtime_options(parser, dtype=False, workers=True)
    parser.set_defaults(run=run_command)


def run_command(args: argparse.Namespace) -> None:
    options.check_library(args, "train", ["timm"])
    check_timm_names(args.opt, args.sched, prefix="--")
    if args.num_classes is not None:
        found = len(class_folders(Path(args.data) / "train"))
        if args.num_classes != found:
            raise ValueError(f"--num-classes {args.num_classes}: the classifier is made for the {found} classes of "
                             f"{Path(args.data) / 'train'}; leave --num-classes out")
    options.check_runtime(args)
    method, prop_attn = variant(*tuned_variant(args.r, args.method, args.prop_attn))
    names = {f.name for f in fields(TrainConfig)} - {"progress", "method", "prop_attn", "img_size"}
    values = {name: value for name, value in vars(args).items() if name in names}
    img_size = None if args.img_size is None else list(args.img_size)
    history = train(TrainConfig(**values, method=method, prop_attn=prop_attn, img_size=img_size))
    if first_process() and history:  # the process group is left by now
        print(format_table(history, METRIC_COLUMNS))
        print(f"wrote {Path(args.output) / 'model.safetensors'}, metrics.csv, metrics.png and steps.csv")
