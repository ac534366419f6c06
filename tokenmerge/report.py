"""What the command-line tools print and write: the environment line, tables, and
JSON or CSV files of result rows."""
from __future__ import annotations

import csv
import json
import platform
from pathlib import Path
from typing import Any, Sequence

import torch


def environment(device: str = "cpu") -> dict[str, Any]:
    """Versions and threads, for every report: figures are only comparable with them."""
    import timm

    from . import __version__

    return {
        "tokenmerge": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "device": device,
        "threads": torch.get_num_threads(),
    }


def describe_environment(env: dict[str, Any]) -> str:
    return ", ".join(f"{key} {value}" for key, value in env.items())


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A plain-text table; ``columns`` are (key, heading, format spec) triples."""
    cells = [[format(row[key], spec) for key, _, spec in columns] for row in rows]
    widths = [max([len(heading)] + [len(line[i]) for line in cells]) for i, (_, heading, _) in enumerate(columns)]
    lines = ["  ".join(heading.rjust(width) for (_, heading, _), width in zip(columns, widths))]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def check_output_path(path: str | Path | None) -> None:
    """Fail before a long run, not after it, on a file name that cannot be written."""
    if path is not None and Path(path).suffix not in (".json", ".csv"):
        raise ValueError(f"cannot write {path}: use a .json or .csv file name")
    if path is not None and not Path(path).resolve().parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: its folder does not exist")


def write_rows(path: str | Path, rows: Sequence[dict[str, Any]], env: dict[str, Any] | None = None) -> None:
    """Write result rows as JSON (with the environment) or CSV, chosen by the suffix."""
    path = Path(path)
    if path.suffix == ".json":
        path.write_text(json.dumps({"environment": env or {}, "rows": list(rows)}, indent=2) + "\n")
    elif path.suffix == ".csv":
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else [])
            writer.writeheader()
            writer.writerows(rows)
    else:
        raise ValueError(f"cannot write {path}: use a .json or .csv file name")
