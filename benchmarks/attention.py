"""Proportional attention's two formulations against attention without any bias.

Times single ``F.scaled_dot_product_attention`` calls, interleaved, at the token counts
ViT-S/16 (6 heads of 64) has under ToMe r=13 (197 tokens, then 13 fewer every block),
and prints a Markdown table of medians over the runs (warm-up excluded) with their
interquartile range:

    python benchmarks/attention.py --threads 2
    python benchmarks/attention.py --batch-sizes 1,32 --runs 50 --dtype bfloat16

"no mask" is plain SDPA without the log-size bias: the limit, as if the sizes were not
there. "mask" passes the bias as a float ``attn_mask``; "channel" as an extra query
and key channel, the head dim padded to a multiple of 8; "channel, unpadded" the same
without the padding. ``tokenmerge.attention`` picks its CPU formulation from this.
"""
from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenmerge.attention import attention_with_channel, attention_with_mask
from tokenmerge.tools.reports import describe_environment, environment
from tokenmerge.tools.timing import interquartile_range, time_interleaved

HEADS, HEAD_DIM, TOKENS, R = 6, 64, 197, 13
#: Blocks of ViT-S/16 whose token counts are timed: 197 - 13 * block tokens.
BLOCKS = (0, 3, 6, 9, 11)


def formulations(k: Tensor, v: Tensor, size: Tensor) -> dict[str, Callable[[Tensor], Tensor]]:
    return {
        "no mask": lambda q: F.scaled_dot_product_attention(q, k, v),
        "mask": lambda q: attention_with_mask(q, k, v, size),
        "channel": lambda q: attention_with_channel(q, k, v, size),
        "channel, unpadded": lambda q: attention_with_channel(q, k, v, size, multiple=1),
    }


def repeated(run: Callable[[Tensor], Tensor], calls: int) -> Callable[[Tensor], Tensor]:
    def many(q: Tensor) -> Tensor:
        for _ in range(calls):
            out = run(q)
        return out

    return many


def measure(batch: int, tokens: int, dtype: torch.dtype, runs: int, warmup: int, calls: int) -> dict[str, list[float]]:
    """Milliseconds per attention call of every formulation, one value per run."""
    q, k, v = torch.randn(3, batch, HEADS, tokens, HEAD_DIM, dtype=dtype).unbind(0)
    size = torch.randint(1, 8, (batch, tokens, 1)).to(dtype)
    runners = {name: repeated(run, calls) for name, run in formulations(k, v, size).items()}
    times = time_interleaved(runners, q, runs, warmup, progress=False)
    return {name: [1000 * seconds / calls for seconds in values] for name, values in times.items()}


def markdown(rows: list[tuple[int, int, dict[str, list[float]]]]) -> str:
    names = list(rows[0][2])
    lines = ["| batch | tokens | " + " | ".join(f"{name} ms (IQR)" for name in names) + " | channel / mask |",
             "|---|---|" + "---|" * (len(names) + 1)]
    for batch, tokens, times in rows:
        median = {name: statistics.median(values) for name, values in times.items()}
        cells = [f"{median[name]:.3f} ({interquartile_range(times[name]):.3f})" for name in names]
        lines.append(f"| {batch} | {tokens} | " + " | ".join(cells) + f" | {median['channel'] / median['mask']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per setting (default: 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first (default: 3)")
    parser.add_argument("--calls", type=int, default=10, help="attention calls per timed run (default: 10)")
    parser.add_argument("--batch-sizes", default="1,32", help="comma-separated (default: 1,32)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    batch_sizes = [int(batch) for batch in args.batch_sizes.split(",")]
    print(f"ViT-S/16 attention ({HEADS} heads of {HEAD_DIM}), {args.dtype}, {args.runs} runs of {args.calls} calls; "
          f"{describe_environment(environment())}\n")
    rows = []
    with torch.inference_mode():
        measure(max(batch_sizes), TOKENS, dtype, 1, args.warmup, args.calls)  # thread pools and allocator up
        for batch in batch_sizes:
            for block in BLOCKS:
                tokens = TOKENS - R * block
                rows.append((batch, tokens, measure(batch, tokens, dtype, args.runs, args.warmup, args.calls)))
    print(markdown(rows))


if __name__ == "__main__":
    main()
