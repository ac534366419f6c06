"""The files the commands write, and what they must not write over.

Every file a command writes (a result table, a figure, a schedule file, an ONNX file,
a training run's files) goes through :func:`write_atomically`: whole or not at all,
through a symlink to its target (the link kept), with the mode of the file it
replaces. Its path is checked before any work (:func:`check_output_path`) without
opening, creating or deleting anything of the user's, and an output that is an input
of the same run, or lies in a folder the run reads, is refused (:func:`check_apart`).
"""
from __future__ import annotations

import csv
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from tokenmerge import schedule as schedules

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


@dataclass(frozen=True)
class Place:
    """A path a run reads or writes, and the option that names it (``--r``, ``IMAGE``);
    None for an output option not given."""

    option: str
    path: Optional[str | Path]


def check_apart(args: Any, outputs: Iterable[Place], more_inputs: Iterable[Place] = ()) -> None:
    """Refuse, before any work, an output that is an input of the same run (see
    :func:`inputs_of`, and ``more_inputs``, such as the images a command is given), lies
    inside a folder the run reads (``--data``) or holds an input (a training run's
    checkpoint folder): writing it would destroy or change what the run reads. Paths
    are compared by their real paths, so that a symlink or another spelling of a path
    hides nothing."""
    inputs = [(place, destination(place.path)) for place in [*inputs_of(args), *more_inputs]]
    for output in (output for output in outputs if output.path is not None):
        written = destination(output.path)
        for source, read in inputs:
            if written == read:
                raise ValueError(f"{output.option} would write {output.path}, which is {source.option} {source.path}, "
                                 f"an input of this run; give {output.option} another path")
            if read in written.parents:
                raise ValueError(f"{output.option} would write {output.path} inside {source.option} {source.path}, "
                                 f"which this run reads; give {output.option} a path outside it")
            if written in read.parents:
                raise ValueError(f"{output.option} would replace {output.path}, which holds {source.option} "
                                 f"{source.path}, an input of this run; give {output.option} another path")


def inputs_of(args: Any) -> list[Place]:
    """What a command's options (or a training configuration's fields, of the same
    names) name to read: the schedule files of ``--r`` and ``--eval-r``,
    ``--checkpoint`` (a folder with all it holds), a transformers ``--model`` folder,
    ``--class-map``, and the image folders of ``--data``: those of its train and
    validation splits for a training run (which has ``val_split``), the whole folder
    otherwise."""
    places = [Place(f"--{name.replace('_', '-')}", schedule.path) for name in ("r", "eval_r")
              for schedule in _schedules(getattr(args, name, None)) if isinstance(schedule, schedules.Tuned)]
    places += [Place(f"--{name.replace('_', '-')}", getattr(args, name))
               for name in ("checkpoint", "class_map") if getattr(args, name, None)]
    if getattr(args, "library", None) == "transformers" and Path(args.model).is_dir():
        places.append(Place("--model", args.model))
    if getattr(args, "data", None):
        data = Path(args.data)
        splits = [data / "train", data / args.val_split] if hasattr(args, "val_split") else [data]
        places += [Place("--data", folder) for folder in splits]
    return places


def _schedules(value: Any) -> list[Any]:
    """The schedules of an ``--r``: a sweep (a list of them), or one (or None) as a list."""
    return value if isinstance(value, list) and not isinstance(value, schedules.Tuned) else [value]


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
