"""``tokenmerge export``: a model with token merging as an ONNX file with a dynamic
batch dimension and standard ONNX operators only, checked against the eager model in
ONNX Runtime (see :mod:`tokenmerge.tools.onnx_files`, which scripts can use directly)."""
from __future__ import annotations

import argparse

import torch

from tokenmerge import schedule as schedules

from . import options
from .cli import COMMANDS
from .files import Place, check_apart, check_output_path
from .messages import model_title
from .models import describe_preprocessing, load_model, sample_shape, unwrap
from .onnx_files import export_onnx, graph_signature, onnx_difference, require_onnx
from .settings import Setting, cap_notes, check_schedule_files, configure, largest_r, tuned_variant, variant


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help=COMMANDS["export"][1],
        description="Export the model, merging at one r schedule, to ONNX with a dynamic batch dimension and "
        "standard operators only, then check ONNX Runtime's outputs against the eager model's on random images.",
    )
    options.add_model_options(parser, default_model=options.DEFAULT_MODEL)
    options.add_schedule_option(parser, "four fifths of (patch tokens) // (blocks), so it follows the model: 13 for "
                                "a 197-token, 12-block ViT; 0 exports the unpatched model")
    options.add_method_option(parser)
    parser.add_argument("--output", required=True, metavar="FILE", help="the ONNX file to write (.onnx)")
    parser.add_argument("--batch-size", type=options.positive_int, default=2,
                        help="images in the example the export traces with; the exported batch is dynamic "
                        "(traced with at least two images: one would fix it at 1) (default: 2)")
    parser.add_argument("--static-batch", action="store_true", help="export for --batch-size images only")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip comparing ONNX Runtime's outputs with the eager model's")
    options.add_runtime_options(parser, dtype=False, amp=False)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    check_output_path(args.output, (".onnx",))
    check_apart(args, [Place("--output", args.output)])
    options.check_runtime(args)
    require_onnx()
    model = load_model(args.library, args.model, args.checkpoint, num_classes=args.num_classes,
                       model_kwargs=args.model_kwargs, img_size=args.img_size)
    network = unwrap(model)
    r = args.r if args.r is not None else round(0.8 * largest_r(network))
    check_schedule_files(network, [r], args)
    name, own_prop_attn = tuned_variant(r, args.method, args.prop_attn)
    method, prop_attn = variant(name, own_prop_attn)
    setting = Setting(f"r={schedules.describe(r)}", None if r == 0 else r, method, prop_attn)
    for text in cap_notes(network, [setting]):
        options.note("export", text)
    configure(network, setting)
    shape = sample_shape(model)
    export_onnx(model, args.output, torch.randn(args.batch_size, *shape), not args.static_batch)
    shown = "unpatched" if r == 0 else f"{name} r={schedules.describe(r)}"
    print(f"{model_title(args.model, model.weights)}, {shown}: wrote {args.output}"
          f" ({'batch ' + str(args.batch_size) if args.static_batch else 'dynamic batch'})", flush=True)
    print(f"{graph_signature(args.output)}; preprocessing: {describe_preprocessing(model)}", flush=True)
    if args.check:
        sizes = [args.batch_size] if args.static_batch else [1, args.batch_size + 1]
        worst = max(onnx_difference(args.output, model, torch.randn(b, *shape)) for b in sizes)
        print(f"ONNX Runtime against eager PyTorch, batch {' and '.join(map(str, sizes))}: "
              f"max abs difference {worst:.2e}", flush=True)

