"""What the tools print and write: the environment, tables, and result files that say
what was run (written, and their paths checked, as :mod:`tokenmerge.tools.files` says)."""
from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from tokenmerge import __version__
from tokenmerge import schedule as schedules

from .files import write_csv, write_text


def environment(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Versions, device and threads, for every report: figures are only comparable with them."""
    return {
        "tokenmerge": __version__,
        "torch": torch.__version__,
        "timm": metadata.version("timm"),
        "python": platform.python_version(),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }


def describe_environment(env: dict[str, Any]) -> str:
    return ", ".join(f"{key} {value}" for key, value in env.items())


def run_record(args: argparse.Namespace) -> dict[str, Any]:
    """The command and every option it was run with, as JSON values: what a result
    file needs to say how it was made."""
    record = {}
    for key, value in vars(args).items():
        if callable(value) or key == "debug":
            continue
        record[key] = _jsonable(value)
    return record


def _jsonable(value: Any) -> Any:
    """``value`` as JSON: schedules as their text, containers item by item, anything
    else unknown as its text."""
    if isinstance(value, schedules.Linear):
        return schedules.describe(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A plain-text table; ``columns`` are (key, heading, format spec) triples."""
    cells = [[format(row[key], spec) for key, _, spec in columns] for row in rows]
    widths = [max([len(heading)] + [len(line[i]) for line in cells]) for i, (_, heading, _) in enumerate(columns)]
    lines = ["  ".join(heading.rjust(width) for (_, heading, _), width in zip(columns, widths))]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def write_rows(
    path: str | Path, rows: Sequence[dict[str, Any]], run: dict[str, Any], env: dict[str, Any]
) -> None:
    """Write result rows with what was run and where, atomically: JSON as ``{"run",
    "environment", "rows"}``, CSV with the run's options and the environment as columns
    of every row (prefixed ``run_`` and ``env_``), chosen by the suffix."""
    if Path(path).suffix.lower() == ".json":
        write_text(path, json.dumps({"run": run, "environment": env, "rows": list(rows)}, indent=2) + "\n")
        return
    context = {f"run_{key}": _csv_value(value) for key, value in run.items()}
    context |= {f"env_{key}": value for key, value in env.items()}
    table = [{key: _csv_value(value) for key, value in row.items()} | context for row in rows]
    write_csv(path, list(table[0]) if table else list(context), table)


def _csv_value(value: Any) -> Any:
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return value
