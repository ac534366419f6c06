"""``tokenmerge visualize``: which patches end up in the same token.

Every patch of an image is painted with the mean colour of all the pixels of the
token it was merged into, with a thin border where neighbouring patches belong to
different tokens, as in the figures of the ToMe paper. This shows what merging
throws together: after the final block, and optionally after earlier blocks, so
that a row shows the groups growing.

The functions below return arrays, for notebooks::

    from tokenmerge.visualize import visualize, draw_figure   # or tokenmerge.tools.visualize
    result = visualize(model, ["cat.jpg"], r=13, blocks=[2, 5, 8])
    result.merges.final    # (B, grid_h, grid_w) group of every patch after the last block
    result.painted         # (B, blocks, H, W, 3) the painted pictures
    draw_figure(result)    # a matplotlib Figure

Blocks are numbered from 0 like the model's ``blocks`` list; the groups "of block i"
are those of the tokens leaving block i. Protected tokens (class, distillation and
register tokens) are not patches and never merge, so they have no group. Group ``g``
is the token at position ``num_protected + g`` of the block's output, so the ids of
every map run from 0 to (tokens - protected - 1).
"""
from __future__ import annotations

import argparse
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

import tokenmerge
from tokenmerge import schedule as schedules
from tokenmerge.adapters import find_adapter
from tokenmerge.merge import initial_source
from tokenmerge.reading import check_file
from tokenmerge.state import CappedRWarning, MergeState

from . import options
from .cli import COMMANDS
from .files import Place, check_apart, check_figure_path, write_figure
from .models import load_model
from .settings import Setting, cap_notes, check_schedule_files, largest_r

ImageInput = Union[str, Path, Image.Image]
Colour = tuple[float, float, float]

#: Default colour of the lines between groups, RGB in [0, 1].
BORDER_COLOUR: Colour = (1.0, 1.0, 1.0)
#: Width of one picture in a figure, in inches; rows are as tall as the pictures need.
PANEL_INCHES = 2.5
#: Height added to every row for its titles, in inches.
TITLE_INCHES = 0.3


@dataclass(frozen=True)
class MergeGroups:
    """The token every patch belongs to after some blocks of one forward pass.

    ``groups[k, b, y, x]`` is the group of patch (y, x) of image b after block
    ``blocks[k]``; ``tokens[k]`` is the number of tokens leaving that block,
    protected tokens included. The last entry is always the final block.
    """

    blocks: tuple[int, ...]
    groups: np.ndarray  # (len(blocks), B, grid_h, grid_w) int64
    tokens: tuple[int, ...]
    num_protected: int
    patch_size: tuple[int, int]
    r: schedules.Schedule

    @property
    def final(self) -> np.ndarray:
        """(B, grid_h, grid_w) groups after the final block."""
        return self.groups[-1]


@dataclass(frozen=True)
class Visualization:
    """Pictures as the model saw them, their merge groups, and the painted pictures."""

    pictures: np.ndarray  # (B, H, W, 3) float32 in [0, 1], resized and cropped, not normalised
    merges: MergeGroups
    painted: np.ndarray  # (B, len(merges.blocks), H, W, 3) float32 in [0, 1]


def open_image(path: str | Path) -> Image.Image:
    """An image file as RGB, with an error naming the file if it is missing or unreadable
    (the file itself checked as every file a user names is: :func:`tokenmerge.reading.check_file`)."""
    path = check_file(path, "image", "give the path of an image file")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from None


def prepare_images(
    model: torch.nn.Module, images: Sequence[Image.Image], img_size: Optional[tuple[int, int]] = None
) -> tuple[torch.Tensor, np.ndarray]:
    """Model inputs (B, 3, H, W) made with the model's own evaluation transform
    (resize, centre crop, normalisation from its timm data config), and the same
    pictures before normalisation (B, H, W, 3) in [0, 1], so that patches line up.

    ``img_size`` defaults to the size the model was built for, which can differ from
    the size in its pretrained config (a model created with ``img_size=112``)."""
    import timm

    size = tuple(img_size or model.patch_embed.img_size)
    config = timm.data.resolve_data_config({"input_size": (3, *size)}, model=model)
    transform = timm.data.create_transform(**config)
    inputs = torch.stack([transform(image) for image in images])
    mean = torch.tensor(config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["std"]).view(1, 3, 1, 1)
    pictures = (inputs * std + mean).clamp(0, 1).permute(0, 2, 3, 1)
    return inputs, pictures.numpy().astype(np.float32)


def patch_grid(model: torch.nn.Module, img_size: tuple[int, int]) -> tuple[int, int]:
    """(grid_h, grid_w) patches of an input of ``img_size``; an error for a size the
    model cannot take."""
    embed = model.patch_embed
    if getattr(model, "dynamic_img_size", False):
        if not embed.dynamic_img_pad and (img_size[0] % embed.patch_size[0] or img_size[1] % embed.patch_size[1]):
            raise ValueError(
                f"a {img_size[0]}x{img_size[1]} input is not a whole number of "
                f"{embed.patch_size[0]}x{embed.patch_size[1]} patches; resize the images, or create the model "
                "with dynamic_img_pad=True"
            )
        return tuple(embed.dynamic_feat_size(img_size))
    if tuple(img_size) != tuple(embed.img_size):
        raise ValueError(
            f"the model takes {embed.img_size[0]}x{embed.img_size[1]} inputs, got {img_size[0]}x{img_size[1]}; "
            "resize the images, or create the model with dynamic_img_size=True for other sizes"
        )
    return tuple(embed.grid_size)


def chosen_blocks(blocks: Optional[Sequence[int]], depth: int) -> tuple[int, ...]:
    """The blocks to show, sorted, without repeats, ending with the final block."""
    for block in blocks or ():
        if isinstance(block, bool) or not isinstance(block, (int, np.integer)):
            raise TypeError(f"blocks must be ints, got {block!r}")
        if not 0 <= block < depth:
            raise ValueError(f"block {block} does not exist: the model's blocks are numbered 0..{depth - 1}")
    return tuple(sorted({int(block) for block in blocks or ()} | {depth - 1}))


@contextmanager
def tracing_merges(
    model: torch.nn.Module, r: schedules.Schedule, prop_attn: Optional[bool] = None
) -> Iterator[MergeState]:
    """Patch ``model`` to merge with ``r`` and trace sources, in eval mode, for the
    duration; then put back what was there: no patch, or the previous settings.
    ``prop_attn`` None takes a schedule file's own, as :func:`tokenmerge.apply` does."""
    previous = None
    if tokenmerge.is_applied(model):
        state = tokenmerge.get_state(model)
        previous = dict(r=state.r, prop_attn=state.prop_attn, trace_source=state.trace_source, method=state.method)
    was_training = model.training
    tokenmerge.apply(model, r=r, prop_attn=prop_attn, trace_source=True)
    model.eval()
    try:
        yield tokenmerge.get_state(model)
    finally:
        model.train(was_training)
        if previous is None:
            tokenmerge.remove(model)
        else:
            tokenmerge.apply(model, **previous)


def merge_groups(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    r: schedules.Schedule,
    blocks: Optional[Sequence[int]] = None,
    prop_attn: Optional[bool] = None,
) -> MergeGroups:
    """Run ``model`` with token merging on normalised ``inputs`` (B, 3, H, W) and
    return the group of every patch after the final block and after ``blocks``.
    ``r`` and ``prop_attn`` are those of :func:`tokenmerge.apply` (a schedule file
    merges with the method and attention it was tuned with, unless ``prop_attn`` is given).

    The model is left as it was: unpatched if it was, otherwise with its previous
    merge settings (the sizes and sources of its last pass are those of this one)."""
    depth = find_adapter(model).depth(model)
    shown = chosen_blocks(blocks, depth)
    grid = patch_grid(model, tuple(inputs.shape[-2:]))
    parameter = next(model.parameters())
    with tracing_merges(model, r, prop_attn) as state, torch.inference_mode():
        model.forward_features(inputs.to(device=parameter.device, dtype=parameter.dtype))
        groups = [patch_groups(state, block, grid, len(inputs)) for block in shown]
        tokens = [tokens_leaving(state, block) for block in shown]
    return MergeGroups(
        blocks=shown,
        groups=np.stack(groups),
        tokens=tuple(tokens),
        num_protected=state.num_protected,
        patch_size=tuple(model.patch_embed.patch_size),
        r=r,
    )


def patch_groups(state: MergeState, block: int, grid: tuple[int, int], batch: int) -> np.ndarray:
    """(B, grid_h, grid_w) group of every patch after ``block``, from the traced sources."""
    source = state.sources.get(block + 1)
    if source is None:  # nothing merged up to this block: every token is its own
        source = initial_source(batch, state.num_input_tokens)
    p = state.num_protected
    return (source[:, p:] - p).reshape(-1, *grid).cpu().numpy().astype(np.int64)


def tokens_leaving(state: MergeState, block: int) -> int:
    """Tokens leaving ``block`` in the traced pass, protected tokens included."""
    size = state.sizes.get(block + 1)
    return state.num_input_tokens if size is None else size.shape[1]


def pixel_groups(groups: np.ndarray, patch_size: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """(H, W) group of every pixel of an image of ``shape`` covered by the patch grid
    ``groups``. A grid may overhang the image by less than a patch (a model that pads
    its input to whole patches): the overhang is cut off."""
    covered = [count * size for count, size in zip(np.shape(groups), patch_size)]
    if not all(size - patch < extent <= size for extent, size, patch in zip(shape, covered, patch_size)):
        raise ValueError(
            f"a grid of {np.shape(groups)[0]}x{np.shape(groups)[1]} patches of {patch_size[0]}x{patch_size[1]} "
            f"pixels does not cover a {shape[0]}x{shape[1]} image"
        )
    return np.repeat(np.repeat(groups, patch_size[0], axis=0), patch_size[1], axis=1)[:shape[0], :shape[1]]


def group_borders(groups: np.ndarray, patch_size: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: pixels next to a pixel of another group, on both sides of every
    edge between two patches of different groups."""
    pixels = pixel_groups(groups, patch_size, shape)
    border = np.zeros(pixels.shape, dtype=bool)
    across = pixels[:, 1:] != pixels[:, :-1]
    border[:, 1:] |= across
    border[:, :-1] |= across
    down = pixels[1:] != pixels[:-1]
    border[1:] |= down
    border[:-1] |= down
    return border


def group_mean_colours(image: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """(groups, 3) mean colour of the pixels of every group of the (H, W) map ``pixels``."""
    ids = pixels.ravel()
    count = np.bincount(ids)
    sums = [np.bincount(ids, weights=image[..., channel].ravel(), minlength=len(count)) for channel in range(3)]
    return np.stack(sums, axis=1) / np.maximum(count, 1)[:, None]


def paint_groups(
    image: np.ndarray, groups: np.ndarray, patch_size: tuple[int, int], border_colour: Colour = BORDER_COLOUR
) -> np.ndarray:
    """``image`` (H, W, 3), floats in [0, 1] or uint8, with every patch painted in the
    mean colour of all the pixels of its group and ``border_colour`` (RGB in [0, 1])
    between groups; same dtype as ``image``. ``groups`` (grid_h, grid_w) holds the
    group of every patch."""
    colours = as_unit_floats(image)
    pixels = pixel_groups(groups, patch_size, colours.shape[:2])
    painted = group_mean_colours(colours, pixels)[pixels]
    painted[group_borders(groups, patch_size, colours.shape[:2])] = border_colour
    if image.dtype == np.uint8:
        return np.round(painted * 255).astype(np.uint8)
    return painted.astype(image.dtype)


def as_unit_floats(image: np.ndarray) -> np.ndarray:
    """An (H, W, 3) uint8 or [0, 1] float image as float64 in [0, 1]."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float64) / 255
    if not np.issubdtype(image.dtype, np.floating):
        raise TypeError(f"expected a uint8 image or floats in [0, 1], got {image.dtype}")
    if image.size and (image.min() < 0 or image.max() > 1):
        raise ValueError("float images must hold values in [0, 1]; divide uint8 values by 255")
    return image.astype(np.float64)


def paint_merges(pictures: np.ndarray, merges: MergeGroups, border_colour: Colour = BORDER_COLOUR) -> np.ndarray:
    """(B, blocks, H, W, 3): every picture (B, H, W, 3) painted with its groups after
    every block of ``merges``."""
    return np.stack([
        np.stack([paint_groups(picture, groups[index], merges.patch_size, border_colour) for groups in merges.groups])
        for index, picture in enumerate(pictures)
    ])


def visualize(
    model: torch.nn.Module,
    images: Sequence[ImageInput],
    r: schedules.Schedule,
    blocks: Optional[Sequence[int]] = None,
    img_size: Optional[tuple[int, int]] = None,
    prop_attn: Optional[bool] = None,
) -> Visualization:
    """Merge groups and painted pictures for image files or PIL images, preprocessed
    with the model's own transform and run as one batch; ``r`` and ``prop_attn`` as
    in :func:`merge_groups`."""
    if not images:
        raise ValueError("no images given")
    opened = [image if isinstance(image, Image.Image) else open_image(image) for image in images]
    inputs, pictures = prepare_images(model, opened, img_size)
    merges = merge_groups(model, inputs, r, blocks, prop_attn)
    return Visualization(pictures, merges, paint_merges(pictures, merges))


def draw_figure(result: Visualization, names: Optional[Sequence[str]] = None, title: Optional[str] = None):
    """A matplotlib ``Figure``: one row per image, the picture as the model saw it,
    then the painted picture after every block of ``result.merges``, titled with
    the block and the tokens leaving it. Built without pyplot, so it changes no
    backend and needs no display."""
    from matplotlib.figure import Figure

    merges = result.merges
    rows, columns = len(result.pictures), 1 + len(merges.blocks)
    height, width = result.pictures.shape[1:3]
    row_inches = PANEL_INCHES * height / width + TITLE_INCHES
    figure = Figure(figsize=(PANEL_INCHES * columns, row_inches * rows + (TITLE_INCHES if title else 0)),
                    layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    for row in range(rows):
        panels = [result.pictures[row], *result.painted[row]]
        labels = [names[row] if names else "input"]
        labels += [f"block {block}: {tokens} tokens" for block, tokens in zip(merges.blocks, merges.tokens)]
        for ax, panel, label in zip(axes[row], panels, labels):
            ax.imshow(panel, interpolation="nearest")
            ax.set_title(label, fontsize=9)
            ax.set_axis_off()
    if title:
        figure.suptitle(title, fontsize=10)
    return figure


def save_figure(
    result: Visualization,
    path: str | Path,
    names: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
    dpi: int = 150,
) -> None:
    """Write :func:`draw_figure` to a .png, .pdf or .svg file."""
    check_figure_path(path, option="the figure file")
    write_figure(path, draw_figure(result, names, title), dpi)


def parse_blocks(text: str) -> list[int]:
    """Comma-separated block numbers: ``"2,5,8,11"``."""
    try:
        return [int(field) for field in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read blocks {text!r}; use block numbers like 2,5,8,11") from None


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "visualize",
        help=COMMANDS["visualize"][1],
        description="Paint every patch of each image with the mean colour of the token it was merged into, "
        "with borders between tokens: after the final block, and optionally after earlier blocks. "
        "Images are resized and cropped with the model's own evaluation transform. timm models only.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files, shown one per row")
    options.add_model_options(parser, default_model=options.DEFAULT_MODEL)
    options.add_schedule_option(parser, "four fifths of (patch tokens) // (blocks), so it follows the model: 13 for "
                                "a 197-token, 12-block ViT")
    options.add_prop_attn_option(parser, methods=False)
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("--blocks", type=parse_blocks, metavar="I,J,...",
                       help="also show the groups after these blocks, numbered from 0 (the final one is always shown)")
    shown.add_argument("--every-block", action="store_true", help="show the groups after every block")
    parser.add_argument("--output", default="merges.png", metavar="FILE",
                        help="the figure, a .png, .pdf or .svg file (default: merges.png)")
    parser.add_argument("--dpi", type=options.positive_int, default=150,
                        help="resolution of a .png figure (default: 150)")
    options.add_runtime_options(parser, dtype=False, amp=False)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    options.check_library(args, "visualize", ["timm"])
    check_figure_path(args.output, option="--output")
    check_apart(args, [Place("--output", args.output)], [Place("IMAGE", image) for image in args.images])
    device = options.check_runtime(args)
    images = [open_image(path) for path in args.images]
    model = load_model(args.library, args.model, args.checkpoint, num_classes=args.num_classes,
                       model_kwargs=args.model_kwargs, img_size=args.img_size).network.to(device)
    r = args.r if args.r is not None else round(0.8 * largest_r(model))
    depth = find_adapter(model).depth(model)
    blocks = range(depth) if args.every_block else args.blocks
    chosen_blocks(blocks, depth)
    check_schedule_files(model, [r], args)
    for text in cap_notes(model, [Setting("r", r)]):
        options.note("visualize", text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CappedRWarning)  # (said in the note)
        result = visualize(model, images, r, blocks, prop_attn=args.prop_attn)
    text = schedules.describe(r)
    save_figure(result, args.output, [Path(path).name for path in args.images], f"{args.model}, r={text}", args.dpi)
    merges = result.merges
    print(f"{args.model}, r={text}: {merges.tokens[-1]} tokens after block {merges.blocks[-1]} "
          f"({merges.num_protected} protected); wrote {args.output}")
