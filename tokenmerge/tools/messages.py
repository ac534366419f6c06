"""Error messages of the commands: one line each, whole."""
from __future__ import annotations

import re


class UnusableFile(Exception):
    """A file an option names (``--r @FILE``) that cannot be used, found while the
    options are read: said in one line, like an error of the work (see
    :func:`tokenmerge.tools.cli.main`), without the usage text argparse gives a
    mistyped option, which has nothing to do with a file's problem. (Not a
    ``ValueError``: argparse would turn that into such a usage error.)"""


def error_summary(error: BaseException, keys_shown: int = 3) -> str:
    """An exception's message on one line, whole: lines joined with "; ", and a line
    that lists many quoted names (a state dict's missing or unexpected keys) shortened
    to its first ``keys_shown`` and how many more, never cut mid-word."""
    parts = []
    for line in str(error).strip().splitlines():
        line = " ".join(line.split())
        names = re.findall(r'"([^"]+)"', line)
        if len(names) > keys_shown and ":" in line:
            line = f"{line.split(':', 1)[0]}: {', '.join(names[:keys_shown])} and {len(names) - keys_shown} more"
        if line and parts and parts[-1].endswith(":"):
            parts[-1] = f"{parts[-1]} {line}"
        elif line:
            parts.append(line)
    return "; ".join(parts) or type(error).__name__


def model_title(name: str, weights: str | None) -> str:
    """How a command's header names its model: the name and where its weights came
    from, the path once where the model is named by its folder."""
    if weights is None:
        return f"{name} (random weights)"
    return name if weights == name else f"{name} ({weights})"
