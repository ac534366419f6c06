"""r schedules (how many tokens each block merges) and the token counts they give.

A schedule is one of:

* an ``int``: the same r in every block (the paper's constant schedule);
* a sequence of ints: one r per block, exactly as many as the model has blocks
  (``"16/16/8/..."`` as text);
* a :class:`Linear` schedule: r changes linearly over depth around a mean, like the
  paper's decreasing ("inflection") schedule;
* a :class:`Tuned` schedule: one r per block read from a file ``tokenmerge tune``
  wrote (:func:`load`; ``"@schedule.json"`` as text), which also names the method
  and attention it was tuned with and the model it was tuned for: a file given to a
  model of another depth is an error, and one tuned for another model is refused
  where that model is named (:func:`check_model`) unless that is said to be meant.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from .merge import max_merges
from .reading import read_text


@dataclass(frozen=True)
class Linear:
    """r varying linearly over the blocks with mean ``r``.

    ``slope`` in [-1, 1] sets the tilt: 0 is constant, 1 goes linearly from 2r in the
    first block down to 0 in the last (merging early, the fastest for a given mean),
    -1 from 0 up to 2r. Per-block values are rounded to whole tokens.

    Attributes:
        r: the mean r over the blocks, finite and >= 0.
        slope: the tilt, in [-1, 1].

    Raises:
        ValueError: ``r`` or ``slope`` is out of range or not a number (a bool is not).
    """

    r: float
    slope: float = 1.0

    def __post_init__(self) -> None:
        if not _is_real(self.r) or not 0 <= self.r < math.inf:
            raise ValueError(f"Linear schedule needs a finite mean r >= 0, got {self.r!r}")
        if not _is_real(self.slope) or not -1 <= self.slope <= 1:
            raise ValueError(f"Linear schedule needs a slope in [-1, 1], got {self.slope!r}")

    def per_block(self, depth: int) -> list[int]:
        """One r per block for a model of ``depth`` blocks, each rounded to a whole token
        (a single block takes the rounded mean).

        Args:
            depth: the number of blocks.

        Returns:
            ``depth`` ints, before any cap a block applies (:func:`capped`).
        """
        if depth == 1:
            return [round(self.r)]
        return [
            round(self.r * (1 + self.slope * (1 - 2 * i / (depth - 1))))
            for i in range(depth)
        ]


class Tuned(list):
    """One r per block, as tuned for a model by ``tokenmerge tune`` and read from its
    file by :func:`load`: a list of ints that also knows where it came from and what it
    was tuned with, so that :func:`tokenmerge.apply` uses the same method and attention
    and a file tuned for another model is caught (:func:`check_model`).

    Args:
        r: one r per block.
        path: the file it was read from (kept as a :class:`~pathlib.Path`).
        method: the reduction method it was tuned with.
        prop_attn: whether it was tuned with proportional attention.
        model: the name of the model it was tuned for, if the file names one.
        library: the library that names ``model`` (such as ``"timm"``), if known.
    """

    def __init__(self, r: Sequence[int], path: str | Path, method: str = "tome", prop_attn: bool = True,
                 model: Optional[str] = None, library: Optional[str] = None):
        super().__init__(r)
        self.path, self.method, self.prop_attn, self.model = Path(path), method, prop_attn, model
        self.library = library


def load(path: str | Path, model: Optional[str] = None, *, allow_other_model: bool = False) -> Tuned:
    """The schedule in a JSON file ``tokenmerge tune`` wrote: at least
    ``{"r": [one int per block]}``, and the ``method``, ``prop_attn`` and ``model`` it
    was tuned with.

    Args:
        path: the file.
        model: the name of the model the schedule is for, as ``tokenmerge tune
            --model`` takes it; a file tuned for another model is then refused, naming
            both (see :func:`check_model`).
        allow_other_model: use a file tuned for another model anyway.

    Returns:
        The :class:`Tuned` schedule, which :func:`tokenmerge.apply` takes as ``r``.

    Raises:
        ValueError: no file name; a file that is missing, a folder, not a regular
            file, unreadable or larger than
            :data:`~tokenmerge.reading.MAX_TEXT_BYTES`; one that is not such JSON; or
            one tuned for another model: one line naming the file and the problem.
    """
    if not str(path).strip():
        raise ValueError("a schedule file name is missing: give the path of a file tokenmerge tune wrote")
    schedule = _read(Path(path))
    if model is not None:
        check_model(schedule, model, allow_other_model)
    return schedule


def check_model(
    schedule: Schedule, model: str, allow_other_model: bool = False, allow_with: str = "allow_other_model=True"
) -> None:
    """Refuse a schedule file tuned for a model other than ``model``, unless
    ``allow_other_model``: a schedule is fitted to one model's speed and outputs, and
    applying it checks no more than the depth.

    Weights of one timm architecture share its schedules (a pretrained tag such as
    ``.augreg_in21k`` is not compared); schedules that are not files, and files that
    name no model, pass.

    Args:
        schedule: any schedule; only a :class:`Tuned` one is checked.
        model: the name of the model it is to be applied to.
        allow_other_model: pass a file tuned for another model anyway.
        allow_with: how the error tells the user to allow it, such as a command-line
            option.

    Raises:
        ValueError: ``schedule`` was tuned for another model, naming both.
    """
    if allow_other_model or not isinstance(schedule, Tuned) or schedule.model is None:
        return
    if _architecture(schedule.model, schedule.library) != _architecture(model, schedule.library):
        raise ValueError(f"schedule file {schedule.path} was tuned for {schedule.model}, not {model}; tune one for "
                         f"{model} with tokenmerge tune, or give {allow_with} to use it anyway")


def _architecture(name: str, library: Optional[str]) -> str:
    """A timm model name without its pretrained tag; any other name as it is."""
    return name.partition(".")[0] if library == "timm" else name


# What the errors about a schedule file tell the user to do.
_GIVE_A_TUNED_FILE = "give a file tokenmerge tune wrote"


def _read(path: Path) -> Tuned:
    """The schedule file ``path``, read as every file a user names is
    (:func:`tokenmerge.reading.read_text`) and checked field by field."""
    record = _json(path, read_text(path, "schedule file", _GIVE_A_TUNED_FILE))
    r = record.get("r") if isinstance(record, dict) else None
    if not isinstance(r, list) or not r or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in r):
        raise ValueError(f"schedule file {path} holds no per-block schedule: expected \"r\": [one int >= 0 per "
                         "block], as tokenmerge tune writes")
    method, prop_attn = record.get("method", "tome"), record.get("prop_attn", True)
    if not isinstance(method, str) or not isinstance(prop_attn, bool):
        raise ValueError(f"schedule file {path}: \"method\" must be a method name and \"prop_attn\" true or false")
    model, library = record.get("model"), record.get("library")
    if not all(value is None or isinstance(value, str) for value in (model, library)):
        raise ValueError(f"schedule file {path}: \"model\" and \"library\" must be names")
    return Tuned(r, path, method, prop_attn, model, library)


def _json(path: Path, text: str) -> Any:
    """The JSON value of the schedule file ``path`` holding ``text``; a one-line error
    for text that is not JSON, nests too deeply for the parser or holds a number too
    long to be read as an int."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"schedule file {path} is not JSON ({error}); {_GIVE_A_TUNED_FILE}") from None
    except RecursionError:
        raise ValueError(f"schedule file {path} is nested too deeply to be read; {_GIVE_A_TUNED_FILE}") from None
    except ValueError:  # (Python refuses to read ints of thousands of digits)
        raise ValueError(f"schedule file {path} holds a number too long to be an r; {_GIVE_A_TUNED_FILE}") from None


def _is_real(value: object) -> bool:
    """An int or float, not a bool; NaN fails every comparison made with it afterwards."""
    return not isinstance(value, bool) and isinstance(value, (int, float))


#: Every form of r schedule that :func:`tokenmerge.apply` and :func:`resolve` take.
Schedule = Union[int, Sequence[int], Linear, Tuned]


def describe(schedule: Schedule) -> str:
    """A short text for a schedule, the inverse of :func:`parse`: how reports and
    records name it (``"13"``, ``"8/8/4"``, ``"decreasing:13"``, ``"@schedule.json"``)."""
    if isinstance(schedule, Linear):
        named = {1.0: "decreasing", -1.0: "increasing"}.get(schedule.slope)
        return f"{named}:{schedule.r:g}" if named else f"linear:{schedule.r:g}:{schedule.slope:g}"
    if isinstance(schedule, int):
        return str(schedule)
    if isinstance(schedule, Tuned):
        return f"@{schedule.path}"
    return "/".join(str(r) for r in schedule)


def parse(text: str) -> Schedule:
    """Read a schedule from text, as the command-line tools take it.

    Args:
        text: ``"13"``, ``"8/8/4/..."`` (one per block), ``"linear:13"`` or
            ``"linear:13:0.5"`` (mean r, slope), ``"decreasing:13"`` (slope 1),
            ``"increasing:13"`` (slope -1) or ``"@schedule.json"`` (a file
            ``tokenmerge tune`` wrote, see :func:`load`).

    Returns:
        An int, a list of ints, a :class:`Linear` or a :class:`Tuned` schedule.

    Raises:
        ValueError: text that is none of these, naming what is wrong.
    """
    text = text.strip()
    if text == "@":
        raise ValueError("a file name is missing after '@': give @FILE, a schedule file tokenmerge tune wrote")
    if text.startswith("@"):
        return load(text[1:])
    name, _, rest = text.partition(":")
    try:
        if name in ("linear", "decreasing", "increasing"):
            fields = rest.split(":") if rest else []
            if name == "linear" and len(fields) in (1, 2):
                return Linear(float(fields[0]), float(fields[1]) if len(fields) == 2 else 1.0)
            if name != "linear" and len(fields) == 1:
                return Linear(float(fields[0]), 1.0 if name == "decreasing" else -1.0)
        elif "/" in text:
            return [int(field) for field in text.split("/")]
        else:
            return int(text)
    except ValueError as error:
        raise ValueError(f"cannot read r schedule {text!r}: {error}") from None
    raise ValueError(
        f"cannot read r schedule {text!r}; use an int ('13'), one int per block ('8/8/4'), "
        "'linear:R[:SLOPE]', 'decreasing:R', 'increasing:R' or '@FILE' (a file tokenmerge tune wrote)"
    )


def resolve(schedule: Schedule, depth: int) -> list[int]:
    """Validate a schedule and return one r per block for a model of ``depth`` blocks.

    Args:
        schedule: an int, a sequence of ints, a :class:`Linear` or a :class:`Tuned`
            schedule.
        depth: the number of blocks of the model.

    Returns:
        ``depth`` ints, before any cap a block applies (:func:`capped`).

    Raises:
        TypeError: a schedule or an r of the wrong type, such as a bool, a float or
            text (pointing text to :func:`parse`).
        ValueError: a negative r, or a per-block schedule with another number of
            entries than blocks.
    """
    if isinstance(schedule, Linear):
        return schedule.per_block(depth)
    if isinstance(schedule, bool) or isinstance(schedule, (str, bytes)):
        raise TypeError(_type_message(schedule))
    if isinstance(schedule, int):
        _check_non_negative(schedule)
        return [schedule] * depth
    if isinstance(schedule, Sequence):
        values = list(schedule)
        for value in values:
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"every r in a per-block schedule must be an int, got {value!r}")
            _check_non_negative(value)
        if len(values) != depth and isinstance(schedule, Tuned):
            tuned_for = f" ({schedule.model})" if schedule.model else ""
            raise ValueError(f"schedule file {schedule.path} was tuned for a {len(values)}-block model{tuned_for}, "
                             f"but this model has {depth} blocks; tune one for it with tokenmerge tune")
        if len(values) != depth:
            raise ValueError(
                f"a per-block r schedule needs exactly one r per block: the model has {depth} "
                f"blocks but the schedule has {len(values)} entries"
            )
        return values
    raise TypeError(_type_message(schedule))


def _check_non_negative(r: int) -> None:
    if r < 0:
        raise ValueError(f"r is the number of tokens merged per block and must be >= 0, got {r}")


def _type_message(schedule: object) -> str:
    return (
        f"r must be an int, a list of ints (one per block) or a tokenmerge.schedule.Linear, "
        f"got {type(schedule).__name__} {schedule!r}"
        + ("; use tokenmerge.schedule.parse() for text" if isinstance(schedule, str) else "")
    )


def capped(r_per_block: Sequence[int], num_tokens: int, num_protected: int) -> list[int]:
    """The r each block actually merges: never more than half of its mergeable tokens
    (:func:`tokenmerge.merge.max_merges`), counted after the blocks before it.

    Args:
        r_per_block: one r per block, as :func:`resolve` gives it.
        num_tokens: tokens entering the first block, protected tokens included.
        num_protected: leading tokens never merged.

    Returns:
        One r per block.
    """
    effective = []
    for r in r_per_block:
        r = min(r, max_merges(num_tokens, num_protected))
        effective.append(r)
        num_tokens -= r
    return effective


def token_counts(num_tokens: int, r_per_block: Sequence[int], num_protected: int = 0) -> list[int]:
    """Tokens left after every block (protected tokens included), caps applied
    (:func:`capped`).

    Args:
        num_tokens: tokens entering the first block, protected tokens included.
        r_per_block: one r per block, as :func:`resolve` gives it.
        num_protected: leading tokens never merged.

    Returns:
        One count per block.
    """
    counts = []
    for r in capped(r_per_block, num_tokens, num_protected):
        num_tokens -= r
        counts.append(num_tokens)
    return counts


def capped_note(
    schedule: Schedule, r_per_block: Sequence[int], num_tokens: int, num_protected: int, first_block: int = 0
) -> Optional[str]:
    """What a schedule that asks some blocks for more than they can merge does instead,
    in one sentence naming every such block (None if it asks no block for too much):
    "r=16 is more than blocks 9-11 can merge (1 protected token, at most half of the
    others per block); they merge 16/.../12/6/3 instead, leaving 7 tokens".

    Args:
        schedule: the schedule as given, for its name.
        r_per_block: one r per block, as :func:`resolve` gives it.
        num_tokens: tokens entering the first block, protected tokens included.
        num_protected: leading tokens never merged.
        first_block: the index of the block ``r_per_block`` and ``num_tokens`` start at.
    """
    taken = capped(r_per_block, num_tokens, num_protected)
    blocks = [first_block + index for index, (want, take) in enumerate(zip(r_per_block, taken)) if want != take]
    if not blocks:
        return None
    left = token_counts(num_tokens, r_per_block, num_protected)[-1]
    return (f"r={describe(schedule)} is more than {_plural(len(blocks), 'block')} {block_ranges(blocks)} can merge "
            f"({_counted(num_protected, 'protected token')}, at most half of the others per block); "
            f"{'they merge' if len(taken) > 1 else 'it merges'} {'/'.join(map(str, taken))} instead, "
            f"leaving {_counted(left, 'token')}")


def block_ranges(blocks: Sequence[int]) -> str:
    """Block indices, runs of consecutive ones as ranges: ``[0, 3, 4, 5, 9]`` -> "0, 3-5, 9"."""
    runs: list[list[int]] = []
    for block in blocks:
        if runs and block == runs[-1][-1] + 1:
            runs[-1].append(block)
        else:
            runs.append([block])
    return ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)


def _plural(count: int, noun: str) -> str:
    return noun if count == 1 else f"{noun}s"


def _counted(count: int, noun: str) -> str:
    words = noun.split()
    return f"{count} {' '.join(words[:-1] + [_plural(count, words[-1])])}"
