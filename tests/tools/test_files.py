"""The files the commands write: whole or not at all, through a symlink to its target
(the link kept), with the mode of the file they replace; and never over what the same
run reads, however the path is spelled. Tiny models throughout."""
import importlib.util
import json
import os
import stat

import pytest

from tests.conftest import make_class_folder
from tests.tools.test_safety import assert_one_line_error
from tokenmerge.tools.cli import main
from tokenmerge.tools.files import check_output_path, write_atomically

TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "patch_size=8", "depth=2", "--img-size", "32"]
FAST = ["--runs", "2", "--warmup", "0", "--batch-size", "2"]
HAS_ONNX = all(importlib.util.find_spec(name) for name in ("onnxscript", "onnxruntime"))


@pytest.fixture
def images(tmp_path):
    """An unlabelled image folder of 4 pictures."""
    (tmp_path / "images").mkdir()
    root, _ = make_class_folder(tmp_path / "images", ["cat", "dog"], 2)
    return root


def command_writing(command, images, output):
    """The arguments of a quick run of ``command`` that writes ``output``."""
    args = {
        "bench": ["bench", *TINY, "--r", "2", *FAST],
        "eval": ["eval", *TINY, "--data", str(images), "--no-labels", "--r", "2", "--batch-size", "2"],
        "tune": ["tune", *TINY, "--data", str(images), "--flops", "70%", "--budget-minutes", "0.05", "--images", "4",
                 "--runs", "2", "--batch-size", "2"],
        "visualize": ["visualize", str(images / "cat" / "0.png"), *TINY, "--r", "2"],
        "export": ["export", *TINY, "--r", "2", "--no-check"],
    }[command]
    return [*args, "--output", str(output)]


COMMANDS = [
    ("bench", ".json"), ("eval", ".csv"), ("tune", ".json"), ("visualize", ".png"),
    pytest.param("export", ".onnx", marks=pytest.mark.skipif(not HAS_ONNX, reason="no onnx extra")),
]


@pytest.mark.parametrize("command, suffix", COMMANDS)
def test_a_dangling_symlink_as_output_is_followed_and_kept(command, suffix, images, tmp_path, capsys):
    """The result lands at the link's target; the link stays a link, nothing else is left."""
    (tmp_path / "results").mkdir()
    target = tmp_path / "results" / f"result{suffix}"
    link = tmp_path / f"link{suffix}"
    link.symlink_to(target)
    assert main(command_writing(command, images, link)) == 0, capsys.readouterr().err
    assert link.is_symlink() and os.readlink(link) == str(target), "the user's link is kept"
    assert target.is_file() and target.stat().st_size > 0
    if suffix == ".json":
        json.loads(target.read_text())
    assert sorted(path.name for path in (tmp_path / "results").iterdir()) == [target.name], "no temporary left"


@pytest.mark.parametrize("command, suffix", COMMANDS[:4])
def test_an_existing_result_is_replaced_keeping_its_mode(command, suffix, images, tmp_path, capsys):
    output = tmp_path / f"result{suffix}"
    output.write_text("old")
    os.chmod(output, 0o640)
    assert main(command_writing(command, images, output)) == 0, capsys.readouterr().err
    assert output.read_bytes() != b"old" and stat.S_IMODE(output.stat().st_mode) == 0o640


@pytest.fixture
def schedule_file(tmp_path):
    """A schedule file for the tiny 2-block model, and its bytes."""
    path = tmp_path / "schedule.json"
    path.write_text(json.dumps({"r": [2, 1], "method": "tome", "prop_attn": True}))
    return path


@pytest.mark.parametrize("command, spelling", [("eval", "same"), ("eval", "dotted"), ("eval", "link"),
                                               ("bench", "same")])
def test_an_output_that_is_the_schedule_file_read_is_refused_before_any_work(
        command, spelling, schedule_file, images, capsys):
    """``--r @FILE`` and ``--output FILE`` naming one file, however spelled: the
    schedule would be overwritten by the results."""
    before = schedule_file.read_bytes()
    output = {"same": schedule_file, "dotted": images / ".." / schedule_file.name,
              "link": schedule_file.parent / "link.json"}[spelling]
    if spelling == "link":
        output.symlink_to(schedule_file)
    assert main([*command_writing(command, images, output), "--r", f"0,@{schedule_file}"]) == 2
    captured = capsys.readouterr()
    assert_one_line_error(captured.err, command, f"--output would write {output}", f"--r {schedule_file}",
                          "an input of this run", "give --output another path")
    assert captured.out == "", "nothing ran"
    assert schedule_file.read_bytes() == before and (spelling != "link" or output.is_symlink())


def test_an_image_given_to_visualize_is_not_its_output(images, capsys):
    picture = images / "cat" / "0.png"
    before = picture.read_bytes()
    assert main(["visualize", str(picture), *TINY, "--output", str(picture)]) == 2
    assert_one_line_error(capsys.readouterr().err, "visualize", f"--output would write {picture}", f"IMAGE {picture}")
    assert picture.read_bytes() == before


@pytest.mark.parametrize("command, option, name", [("eval", "--output", "eval.json"), ("eval", "--plot", "plot.png"),
                                                   ("tune", "--output", "schedule.json")])
def test_a_result_inside_the_folder_a_run_reads_is_refused(command, option, name, images, capsys):
    """A figure written among the images would be read as one of them by the next run."""
    inside = images / "cat" / name
    args = command_writing(command, images, images.parent / "elsewhere.json")
    assert main([*args, option, str(inside)]) == 2
    assert_one_line_error(capsys.readouterr().err, command, f"{option} would write {inside} inside --data {images}",
                          f"give {option} a path outside it")
    assert not inside.exists()


# --- the writer and the checks, alone ----------------------------------------------------


def test_checking_an_output_opens_creates_and_deletes_nothing_of_the_users(tmp_path):
    link, target = tmp_path / "link.json", tmp_path / "target.json"
    link.symlink_to(target)
    check_output_path(link)
    assert link.is_symlink() and not target.exists() and os.listdir(tmp_path) == ["link.json"]


def test_a_symlink_in_a_loop_is_refused(tmp_path):
    (tmp_path / "a.json").symlink_to(tmp_path / "b.json")
    (tmp_path / "b.json").symlink_to(tmp_path / "a.json")
    with pytest.raises(ValueError, match="a.json is a symlink that leads round in a loop"):
        check_output_path(tmp_path / "a.json")


def test_a_read_only_result_is_refused(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("kept")
    os.chmod(path, 0o444)
    if os.access(path, os.W_OK):
        pytest.skip("this user can write a read-only file (root)")
    with pytest.raises(ValueError, match="cannot be written \\(it is read-only\\)"):
        check_output_path(path)


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("old")

    def half_then_fail(file):
        file.write_text("half")
        raise OSError("no space left")

    with pytest.raises(OSError, match="no space left"):
        write_atomically(path, half_then_fail)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["result.json"]


def test_files_a_write_adds_beside_its_file_move_with_it(tmp_path):
    """As an ONNX file over 2 GB brings its external weights, named after it."""
    def graph_and_weights(file):
        file.write_text("graph")
        file.with_name(f"{file.name}.data").write_text("weights")

    assert write_atomically(tmp_path / "model.onnx", graph_and_weights) == tmp_path / "model.onnx"
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.onnx.data"]
    assert (tmp_path / "model.onnx.data").read_text() == "weights"
