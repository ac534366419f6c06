import json
import os
from pathlib import Path

import pytest

from tokenmerge import schedule
from tokenmerge.reading import MAX_TEXT_BYTES
from tokenmerge.schedule import Linear


def test_constant_and_per_block():
    assert schedule.resolve(8, 4) == [8, 8, 8, 8]
    assert schedule.resolve([1, 2, 3], 3) == [1, 2, 3]
    assert schedule.resolve((0, 0), 2) == [0, 0]


def test_linear_schedules_keep_the_mean_and_direction():
    decreasing = schedule.resolve(Linear(8, 1.0), 12)
    assert decreasing[0] == 16 and decreasing[-1] == 0
    assert decreasing == sorted(decreasing, reverse=True)
    increasing = schedule.resolve(Linear(8, -1.0), 12)
    assert increasing == decreasing[::-1]
    assert abs(sum(decreasing) / 12 - 8) <= 0.5
    assert schedule.resolve(Linear(8, 0.0), 5) == [8] * 5


def test_parse_round_trips():
    for text in ["13", "1/2/3", "linear:13:0.5", "decreasing:13", "increasing:8"]:
        assert schedule.describe(schedule.parse(text)) == text
    assert schedule.parse("decreasing:8") == Linear(8, 1.0)
    assert schedule.parse("increasing:8") == Linear(8, -1.0)
    assert schedule.describe(schedule.parse("linear:8:-1")) == "increasing:8", "shown by its name"


@pytest.mark.parametrize("text", ["", "abc", "linear:", "linear:1:2:3", "decreasing:x", "1//2"])
def test_parse_rejects_nonsense(text):
    with pytest.raises(ValueError, match="r schedule"):
        schedule.parse(text)


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (-1, ValueError, ">= 0"),
        ([1, -2], ValueError, ">= 0"),
        (2.5, TypeError, "must be an int"),
        ("8", TypeError, "schedule.parse"),
        (True, TypeError, "must be an int"),
        ([1, 2.0], TypeError, "must be an int"),
        ([1] * 13, ValueError, "12 blocks but the schedule has 13"),
        ([1] * 11, ValueError, "12 blocks but the schedule has 11"),
        (None, TypeError, "must be an int"),
    ],
)
def test_bad_schedules_say_what_to_do(bad, error, message):
    with pytest.raises(error, match=message):
        schedule.resolve(bad, 12)


def test_bad_linear_parameters():
    with pytest.raises(ValueError, match="slope"):
        Linear(8, 2.0)
    with pytest.raises(ValueError, match="mean r"):
        Linear(-1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_linear_parameters_are_refused_when_made(bad):
    """Not later, as a conversion error deep in a forward pass."""
    with pytest.raises(ValueError, match="finite mean r"):
        Linear(bad)
    with pytest.raises(ValueError, match="slope"):
        Linear(8, bad)
    with pytest.raises(ValueError, match="finite mean r"):
        schedule.parse(f"linear:{bad}")


def test_token_counts_apply_caps():
    assert schedule.token_counts(197, [8] * 3, 1) == [189, 181, 173]
    # 11 tokens, 1 protected: at most 5, then 2 (5 mergeable), then 1, then 1.
    assert schedule.token_counts(11, [9, 9, 9, 9], 1) == [6, 4, 3, 2]
    assert schedule.capped([9, 9, 9, 9], 11, 1) == [5, 2, 1, 1]


def test_a_schedule_file_for_another_model_is_refused_unless_meant(tmp_path):
    path = tmp_path / "small.json"
    path.write_text(json.dumps({"r": [4] * 12, "model": "vit_small_patch16_224.augreg_in21k", "library": "timm"}))
    with pytest.raises(ValueError, match="tuned for vit_small_patch16_224.augreg_in21k, not vit_tiny_patch16_224; "
                                         ".*or give allow_other_model=True"):
        schedule.load(path, model="vit_tiny_patch16_224")
    assert schedule.load(path, model="vit_tiny_patch16_224", allow_other_model=True) == [4] * 12
    assert schedule.load(path, model="vit_small_patch16_224") == [4] * 12, "other weights of the same architecture"
    assert schedule.load(path) == [4] * 12, "no model named, nothing to compare"


@pytest.mark.parametrize("text,message", [("@", "file name is missing"), ("@ ", "file name is missing"),
                                          ("@.", "is a folder")])
def test_a_schedule_file_that_is_not_named_or_not_a_file_says_so(text, message):
    with pytest.raises(ValueError, match=message):
        schedule.parse(text)


def test_capped_notes_name_every_capped_block_in_ranges_with_plurals():
    from tokenmerge.schedule import block_ranges, capped_note

    assert block_ranges([0, 3, 4, 5, 9]) == "0, 3-5, 9" and block_ranges([7]) == "7"
    assert capped_note(4, [4, 4], 17, 1) is None
    assert capped_note(16, [16, 16, 16], 17, 1) == (
        "r=16 is more than blocks 0-2 can merge (1 protected token, at most half of the others per block); they "
        "merge 8/4/2 instead, leaving 3 tokens")
    assert capped_note([8, 0, 8], [8, 0, 8], 11, 5) == (
        "r=8/0/8 is more than blocks 0, 2 can merge (5 protected tokens, at most half of the others per block); "
        "they merge 3/0/1 instead, leaving 7 tokens")
    assert capped_note(9, [9], 3, 1).startswith("r=9 is more than block 0 can merge") and "it merges 1 instead, " \
        "leaving 2 tokens" in capped_note(9, [9], 3, 1)


#: Schedule files that cannot be used, and what the one-line error says of each.
UNUSABLE = {
    "nested too deeply": "is nested too deeply",
    "a 5001-digit r": "holds a number too long",
    "a memory file": "cannot be read (Input/output error)",
    "unreadable": "cannot be read (Permission denied)",
    "a FIFO": "is not a regular file",
    "a device": "is not a regular file",
    "too large": "is larger than",
}


def unusable_schedule(case, tmp_path):
    """The path of a schedule file that is ``case`` (a key of :data:`UNUSABLE`), made in
    ``tmp_path`` where it can be; skips where this system cannot make one."""
    path = tmp_path / "schedule.json"
    if case == "nested too deeply":
        path.write_text("[" * 100_000 + "]" * 100_000)
    elif case == "a 5001-digit r":
        path.write_text('{"r": [' + "1" * 5001 + "]}")
    elif case == "a memory file":
        path = Path("/proc/self/mem")
    elif case == "unreadable":
        path.write_text('{"r": [1]}')
        os.chmod(path, 0)
        if os.access(path, os.R_OK):  # root reads anyway; a write-only /proc file stops it
            path = Path("/proc/sys/vm/compact_memory")
    elif case == "a FIFO":
        os.mkfifo(path)
    elif case == "a device":
        path = Path("/dev/zero")
    elif case == "too large":
        with path.open("wb") as handle:
            handle.truncate(MAX_TEXT_BYTES + 1)  # (sparse: nothing is written)
    if not (path.exists() or path.is_fifo()):
        pytest.skip(f"this system has no {path}")
    return path


@pytest.mark.parametrize("case", list(UNUSABLE))
def test_a_schedule_file_that_cannot_be_used_is_a_one_line_error_naming_it(case, tmp_path):
    """Never a traceback (RecursionError, OSError, PermissionError), never a read that
    blocks on a FIFO or fills memory from a device."""
    path = unusable_schedule(case, tmp_path)
    with pytest.raises(ValueError) as error:
        schedule.load(path)
    message = str(error.value)
    assert f"schedule file {path} {UNUSABLE[case]}" in message and "\n" not in message
    assert message.endswith("give a file tokenmerge tune wrote"), "it says what to do"
