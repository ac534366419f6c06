"""The files the commands write.

Every file a command writes (a result table, a figure, a schedule file, an ONNX file,
a training run's files) goes through :func:`write_atomically`: whole or not at all,
through a symlink to its target (the link kept), with the mode of the file it
replaces. Its path is checked before any work (:func:`check_output_path`) without
opening, creating or deleting anything of the user's.
"""
from __future__ import annotations

import csv
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

TABLE_SUFFIXES = (".json", ".csv")
FIGURE_SUFFIXES = (".png", ".pdf", ".svg")


def destination(path: str | Path) -> Path:
    """Where writing ``path`` lands: its real path, a symlink (dangling or not)
    followed to its target, so that the target is written and the link kept."""
    return Path(os.path.realpath(path))


# --- before the work ---------------------------------------------------------------


def check_output_path(
    path: str | Path | None, suffixes: Sequence[str] = TABLE_SUFFIXES, option: str = "--output"
) -> None:
    """Fail before a long run, not after it, on a file that cannot be written: a
    folder, a wrong suffix, a symlink in a loop, a folder that cannot be made or take
    new files, a read-only file. A missing folder is made, as for a training run's
    output folder."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        example = path / f"results{suffixes[0]}"
        raise ValueError(f"{option} {path} is a folder; give a file name inside it, such as {example}")
    if path.suffix.lower() not in suffixes:
        either = ", ".join(suffixes[:-1]) + f" or {suffixes[-1]}" if len(suffixes) > 1 else suffixes[0]
        raise ValueError(f"{option} {path}: use a {either} file name")
    target = destination(path)
    if target.is_symlink():
        raise ValueError(f"{option} {path} is a symlink that leads round in a loop; give another file")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{option} {path}: its folder {target.parent} cannot be made ({error.strerror})") from None
    try:
        check_writable_folder(target.parent)
    except OSError as error:
        raise ValueError(f"{option} {path} cannot be written ({error.strerror}); choose another file") from None
    if target.exists() and not os.access(target, os.W_OK):
        raise ValueError(f"{option} {path} cannot be written (it is read-only); choose another file")


def check_figure_path(path: str | Path | None, option: str = "--plot") -> None:
    check_output_path(path, FIGURE_SUFFIXES, option)


def check_writable_folder(folder: Path) -> None:
    """Raise the ``OSError`` of a folder that cannot take new files: found by making
    (and removing) a uniquely named file of our own in it, since permission bits do not
    stop root and say nothing of file systems such as /proc."""
    descriptor, name = tempfile.mkstemp(dir=folder, prefix=".tokenmerge-check-")
    os.close(descriptor)
    os.unlink(name)


# --- writing -----------------------------------------------------------------------


def write_atomically(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Write ``path`` whole or not at all, and return where it landed (see
    :func:`destination`): ``write(file)`` writes a new file of the same name in a
    hidden folder beside the destination, which then replaces the destination in one
    step, with the mode of the file it replaces. Files ``write`` adds beside it (an
    ONNX file's external weights) are moved beside the destination first. A write
    that fails or is interrupted leaves the destination as it was."""
    target = destination(path)
    folder = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
    try:
        written = folder / target.name
        write(written)
        if target.exists():
            os.chmod(written, stat.S_IMODE(target.stat().st_mode))
        _flush(written)
        for companion in sorted(folder.iterdir()):
            if companion != written:
                os.replace(companion, target.parent / companion.name)
        os.replace(written, target)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return target


def _flush(path: Path) -> None:
    """Make the file's bytes durable before it replaces another, so that a crash
    cannot leave an empty file under the destination's name."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`write_atomically`)."""
    return write_atomically(path, lambda file: file.write_text(text, encoding="utf-8"))


def write_csv(path: str | Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> Path:
    """Write ``rows`` under a header of ``columns`` to the CSV file ``path`` atomically
    (a column a row lacks is left empty)."""
    def write(file: Path) -> None:
        with file.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(columns), restval="")
            writer.writeheader()
            writer.writerows(rows)

    return write_atomically(path, write)


def write_figure(path: str | Path, figure: Any, dpi: int) -> Path:
    """Write a matplotlib ``figure`` to ``path`` atomically, in the format its suffix names."""
    file_format = Path(path).suffix.lower().lstrip(".")
    return write_atomically(path, lambda file: figure.savefig(file, format=file_format, dpi=dpi))
