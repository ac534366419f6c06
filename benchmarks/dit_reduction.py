"""How to reduce the image tokens of a diffusion transformer: merge them (tokenmerge's
diffusion transformers: every branch run on merged tokens, each at its destination's
rotary position, and its output copied back) or keep every query and merge only the
keys and values of the self-attention (ToDo-like: nothing to unmerge, every rotary
position kept as the keys were rotated before they merge; with ``-proportional``, each
merged key's logit raised by the log of the tokens it stands for). Both on the same
inputs, with the same grid destinations (one per 2 x 2 cell, tomesd's with
use_rand=False) and the same ratio.

    python benchmarks/dit_reduction.py --threads 2                      # tiny widths, about a minute
    python benchmarks/dit_reduction.py --threads 1 --cpu-time --width 768 --grid 64 --layers 1   # 4096 tokens

No trained diffusion transformer can be loaded here, so the models have random weights
(diffusers' own init) and the latents are smooth random fields (bilinear upsampling of
a 4x coarser noise plus a little noise), so that neighbouring tokens are alike as in a
real latent. What is measured is how far each reduction moves one denoiser call from
the unreduced one (relative L2 and PSNR of the output) and how much faster the call
is; it says nothing about image quality, which needs trained weights (random attention
is diffuse, which flatters averaged keys).

Prints one Markdown table: for each family, strategy and ratio, the relative L2
distance and PSNR of the output to the unreduced model's and the time of the call
over the unreduced one's (median of interleaved repeats, by the wall clock or, with
``--cpu-time``, the process's CPU time).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tokenmerge
from tokenmerge.merge import grid_bipartite_matching, grid_destinations, merge_mean

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.adapters import diffusion_models as dm  # noqa: E402

# --- Keys and values merged, queries kept ------------------------------------------------


@dataclass
class KeyReduction:
    """What the innermost wrapped self-attention does to its image keys and values:
    merged on ``grid`` at ``ratio``; ``proportional``: every key's logit raised by the
    log of the tokens it stands for. ``start`` and ``trailing``: the text keys before
    and after the image keys, set per call."""

    grid: tuple[int, int, int]
    ratio: float
    proportional: bool
    start: int = 0
    trailing: int = 0


_REDUCTIONS: list[KeyReduction] = []
_SDPA = F.scaled_dot_product_attention


def merged_keys_and_values(keys: Tensor, values: Tensor, reduction: KeyReduction) -> tuple[Tensor, Tensor, Tensor]:
    """(B, H, N, D) image keys and values merged on the grid, matched on the keys summed
    over heads, with the (B, N - r) tokens every merged key stands for."""
    frames, height, width = reduction.grid
    destinations, sources = grid_destinations(height, width, 2, 2, frames=frames)
    destinations, sources = destinations.to(keys.device), sources.to(keys.device)
    r = min(int(keys.shape[2] * reduction.ratio), sources.shape[0])
    matching = grid_bipartite_matching(keys.sum(dim=1), destinations, sources, r)
    heads, head_dim = keys.shape[1], keys.shape[3]
    joined = torch.cat([keys.transpose(1, 2).flatten(2), values.transpose(1, 2).flatten(2)], dim=-1)
    merged_keys, merged_values = merge_mean(joined, matching).unflatten(-1, (2, heads, head_dim)).permute(2, 0, 3, 1, 4)
    size = torch.ones(keys.shape[0], keys.shape[2] - r, device=keys.device)
    joins = torch.ones_like(matching.partner, dtype=size.dtype)
    size[:, sources.shape[0] - r:].scatter_add_(1, matching.partner, joins)  # destinations follow the kept sources
    return merged_keys, merged_values, size


def reduced_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                      **kwargs: object) -> Tensor:
    """SDPA with the image keys and values of the innermost :class:`KeyReduction` merged."""
    if not _REDUCTIONS or attn_mask is not None:
        return _SDPA(query, key, value, attn_mask=attn_mask, **kwargs)
    reduction = _REDUCTIONS[-1]
    start, stop = reduction.start, key.shape[2] - reduction.trailing
    merged_keys, merged_values, size = merged_keys_and_values(key[:, :, start:stop], value[:, :, start:stop],
                                                              reduction)
    key = torch.cat([key[:, :, :start], merged_keys, key[:, :, stop:]], dim=2)
    value = torch.cat([value[:, :, :start], merged_values, value[:, :, stop:]], dim=2)
    if not reduction.proportional:
        return _SDPA(query, key, value, **kwargs)
    text_before, text_after = key.new_zeros(key.shape[0], start), key.new_zeros(key.shape[0], reduction.trailing)
    log_size = torch.cat([text_before, size.log().to(key.dtype), text_after], dim=1)
    return _SDPA(query, key, value, attn_mask=log_size[:, None, None, :], **kwargs)


@dataclass(frozen=True)
class Layout:
    """A family's blocks, whether its joint key sequence puts the text before the image
    tokens, and the name of a block's self-attention."""

    blocks: Callable[[nn.Module], list[nn.Module]]
    text_first: bool
    self_attention: str


LAYOUTS = {
    "sd3": Layout(lambda m: list(m.transformer_blocks), False, "attn"),
    "flux": Layout(lambda m: [*m.transformer_blocks, *m.single_transformer_blocks], True, "attn"),
    "pixart": Layout(lambda m: list(m.transformer_blocks), False, "attn1"),
    "wan": Layout(lambda m: list(m.blocks), False, "attn1"),
}


def reducing_self_attention(attention: nn.Module, text_first: bool, reduction: KeyReduction) -> Callable:
    """The attention's forward under ``reduction``: the text keys lead the key sequence
    in Flux and trail it in SD3; single-stream blocks take them in ``hidden_states``."""
    forward = attention.forward
    num_image = reduction.grid[0] * reduction.grid[1] * reduction.grid[2]

    def run(hidden_states: Tensor, encoder_hidden_states: Tensor | None = None, *args: object,
            **kwargs: object) -> object:
        text = hidden_states.shape[1] - num_image
        if encoder_hidden_states is not None and not getattr(attention, "is_cross_attention", False):
            text = encoder_hidden_states.shape[1]
        reduction.start, reduction.trailing = (text, 0) if text_first else (0, text)
        _REDUCTIONS.append(reduction)
        try:
            return forward(hidden_states, encoder_hidden_states, *args, **kwargs)
        finally:
            _REDUCTIONS.pop()

    return run


@contextlib.contextmanager
def keys_and_values_reduced(name: str, model: nn.Module, ratio: float, grid: tuple[int, int, int],
                            proportional: bool) -> Iterator[None]:
    """``model`` with the image keys and values of every self-attention merged."""
    layout = LAYOUTS[name]
    attentions = [getattr(block, layout.self_attention) for block in layout.blocks(model)]
    for attention in attentions:
        attention.forward = reducing_self_attention(attention, layout.text_first,
                                                    KeyReduction(grid, ratio, proportional))
    F.scaled_dot_product_attention = reduced_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _SDPA
        for attention in attentions:
            del attention.forward


@contextlib.contextmanager
def merged(model: nn.Module, ratio: float, every_branch: bool) -> Iterator[None]:
    """``model`` under tokenmerge with fixed destinations: self-attention only (tomesd's
    default) or every branch."""
    tokenmerge.apply(model, ratio=ratio, use_rand=False, merge_crossattn=every_branch, merge_mlp=every_branch)
    try:
        yield
    finally:
        tokenmerge.remove(model)


def reduced(name: str, model: nn.Module, strategy: str, ratio: float, grid: tuple[int, int, int]
            ) -> contextlib.AbstractContextManager[None]:
    """``model`` under one of :data:`STRATEGIES`."""
    if strategy.startswith("merge"):
        return merged(model, ratio, strategy == "merge-all")
    return keys_and_values_reduced(name, model, ratio, grid, strategy == "kv-proportional")


# --- Models, inputs and the table --------------------------------------------------------

def smooth(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """A random field as smooth as a latent: 4x coarser noise upsampled, plus a little noise."""
    *lead, rows, columns = shape
    coarse = torch.randn(*lead, max(rows // 4, 1), max(columns // 4, 1), generator=generator)
    flat = coarse.flatten(0, -3).unsqueeze(1) if len(lead) > 1 else coarse.unsqueeze(0)
    field = F.interpolate(flat, size=(rows, columns), mode="bilinear", align_corners=False).reshape(shape)
    return field + 0.1 * torch.randn(shape, generator=generator)


def family_models(width: int, grid: int, layers: int, frames: int) -> dict[str, tuple[nn.Module, dict, tuple]]:
    """Every family at ``width`` (heads of 64 channels; Flux's RoPE axes scaled to fit),
    ``grid`` x ``grid`` image tokens and ``layers`` blocks of each kind, with smooth latents."""
    heads, generator = max(width // 64, 1), torch.Generator().manual_seed(0)
    head_dim = width // heads
    latent = 2 * grid
    torch.manual_seed(0)
    axes = (head_dim - 2 * (3 * head_dim // 8), 3 * head_dim // 8, 3 * head_dim // 8)
    models = {
        "sd3": (dm.sd3_transformer(sample_size=latent, num_layers=layers, attention_head_dim=head_dim,
                                   num_attention_heads=heads, caption_projection_dim=width, pos_embed_max_size=latent),
                {**dm.sd3_inputs(1), "hidden_states": smooth((1, 4, latent, latent), generator)}, (1, grid, grid)),
        "flux": (dm.flux_transformer(num_layers=layers, num_single_layers=layers, attention_head_dim=head_dim,
                                     num_attention_heads=heads, axes_dims_rope=axes),
                 {**dm.flux_inputs(1), "img_ids": dm.flux_image_ids(grid, grid),
                  "hidden_states": smooth((1, 16, grid, grid), generator).flatten(2).mT}, (1, grid, grid)),
        "pixart": (dm.pixart_transformer(num_layers=layers, attention_head_dim=head_dim, num_attention_heads=heads,
                                         cross_attention_dim=width, sample_size=latent),
                   {**dm.pixart_inputs(1), "hidden_states": smooth((1, 4, latent, latent), generator)},
                   (1, grid, grid)),
        "wan": (dm.wan_transformer(num_layers=layers, attention_head_dim=head_dim, num_attention_heads=heads,
                                   ffn_dim=4 * width, rope_max_seq_len=1024),
                {**dm.wan_inputs(1), "hidden_states": smooth((1, 4, frames, latent, latent), generator)},
                (frames, grid, grid)),
    }
    return {name: (model.eval(), inputs, shape) for name, (model, inputs, shape) in models.items()}


def denoiser_call(name: str, model: nn.Module, inputs: dict, grid: tuple[int, int, int], strategy: str | None,
                  ratio: float) -> Callable[[], Tensor]:
    """One denoiser call of ``model`` under ``strategy`` (``None``: unreduced)."""

    def call() -> Tensor:
        with contextlib.nullcontext() if strategy is None else reduced(name, model, strategy, ratio, grid):
            return dm.denoise(model, inputs)

    return call


def timed(call: Callable[[], Tensor], clock: Callable[[], float]) -> float:
    start = clock()
    call()
    return clock() - start


def compare(reference: Tensor, output: Tensor) -> tuple[float, float]:
    """(relative L2, PSNR in dB over the reference's peak-to-peak range)."""
    error = (output - reference).float()
    relative = float(error.norm() / reference.float().norm())
    peak = float(reference.max() - reference.min())
    return relative, float(10 * torch.log10(peak ** 2 / error.pow(2).mean()))


STRATEGIES = ("merge-attn", "merge-all", "kv", "kv-proportional")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=128, help="model width (heads of 64 channels)")
    parser.add_argument("--grid", type=int, default=32, help="image tokens per side")
    parser.add_argument("--frames", type=int, default=2, help="Wan's latent frames")
    parser.add_argument("--layers", type=int, default=4, help="blocks of each kind")
    parser.add_argument("--ratios", default="0.25,0.5", help="comma-separated shares of the image tokens merged")
    parser.add_argument("--families", default=",".join(LAYOUTS), help="comma-separated families")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timings per setting")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time by the process's CPU time, not the wall clock: steadier on a shared machine "
                             "(with --threads 1, where CPU time is the work done)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.ratios.split(",")]
    clock = time.process_time if args.cpu_time else time.perf_counter
    models = family_models(args.width, args.grid, args.layers, args.frames)
    print(f"width {args.width}, {args.grid}x{args.grid} image tokens ({args.frames} frames for Wan), "
          f"{args.layers} blocks of each kind, {torch.get_num_threads()} threads, batch 1, "
          f"{'CPU time' if args.cpu_time else 'wall clock'}\n")
    print("| family | strategy | ratio | rel. L2 | PSNR (dB) | time / unreduced |")
    print("|---|---|---|---|---|---|")
    for name in args.families.split(","):
        model, inputs, grid = models[name]
        reference = dm.denoise(model, inputs)
        for ratio in ratios:
            settings = [None, *STRATEGIES]
            calls = {setting: denoiser_call(name, model, inputs, grid, setting, ratio) for setting in settings}
            times: dict[str | None, list[float]] = {setting: [] for setting in settings}
            for setting in settings:  # warm-up
                calls[setting]()
            for _ in range(args.repeats):
                for setting in settings:
                    times[setting].append(timed(calls[setting], clock))
            base = statistics.median(times[None])
            for strategy in STRATEGIES:
                relative, psnr = compare(reference, calls[strategy]())
                speed = statistics.median(times[strategy]) / base
                print(f"| {name} | {strategy} | {ratio} | {relative:.2e} | {psnr:.1f} | {speed:.2f} |")


if __name__ == "__main__":
    main()
