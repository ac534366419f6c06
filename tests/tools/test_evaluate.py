"""``tokenmerge eval`` and :func:`tokenmerge.evaluate.evaluate`: accuracy counts that
agree with plain timm, unreadable files reported and left out, the class-map layout,
outputs, and two torchrun processes giving exactly the figures of one."""
import csv
import json
import os
import shutil
import subprocess
import sys
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

import tokenmerge
from tests.conftest import CHECKPOINT, IMAGENET_SAMPLE, make_class_folder, require_shared
from tokenmerge.tools import distributed
from tokenmerge.tools.accuracy import correct_predictions
from tokenmerge.tools.cli import main
from tokenmerge.tools.data import (
    TolerantImageFiles,
    Unreadable,
    class_map_samples,
    collate_readable,
    folder_samples,
    synset_samples,
)
from tokenmerge.tools.distributed import shard_loader
from tokenmerge.tools.evaluate import evaluate
from tokenmerge.tools.evaluation import rotated
from tokenmerge.tools.models import create_timm_model, timm_transform
from tokenmerge.tools.train.splits import read_splits

MODEL = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
CLASSES = 16
BROKEN = ("corrupt.JPEG", "truncated.JPEG")
SETTINGS = ["unpatched", "r=0", "r=8"]
FAST = ["--sweep", "0,8", "--batch-size", "8", "--workers", "0"]  # torchrun reads --r as one of its own options
TORCHRUN = Path(sys.executable).with_name("torchrun")
TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "patch_size=8", "depth=2", "--img-size", "32"]


def add_broken_images(folders):
    """A file of random bytes and a JPEG cut short, both named like photos: one in
    the first batch of 8 files, one in the second (which a second process takes)."""
    (folders[0] / BROKEN[0]).write_bytes(os.urandom(4096))
    photo = next(folders[8].glob("*.JPEG")).resolve().read_bytes()
    (folders[8] / BROKEN[1]).write_bytes(photo[: len(photo) // 3])


@pytest.fixture(scope="module")
def synset_folder(tmp_path_factory):
    """16 photos of the shared sample in their synset folders, and two broken files."""
    require_shared()
    root = tmp_path_factory.mktemp("synsets")
    folders = []
    for source in sorted(IMAGENET_SAMPLE.iterdir())[:CLASSES]:
        folder = root / source.name
        folder.mkdir()
        for photo in source.glob("*.JPEG"):
            (folder / photo.name).symlink_to(photo)
        folders.append(folder)
    add_broken_images(folders)
    return root


@pytest.fixture(scope="module")
def class_map_folder(synset_folder, tmp_path_factory):
    """The same files in class folders named in words, and a 1000-line class map
    that gives every name its ImageNet-1k index."""
    info = timm.data.ImageNetInfo()
    names = [f"{info.index_to_description(i).split(',')[0].replace(' ', '_')}-{i}" for i in range(1000)]
    root = tmp_path_factory.mktemp("named")
    index = {info.index_to_label_name(i): i for i in range(1000)}
    for synset in synset_folder.iterdir():
        shutil.copytree(synset, root / names[index[synset.name]], symlinks=True)
    class_map = root.parent / "class_map.txt"
    class_map.write_text("\n".join(names) + "\n")
    return root, class_map


@pytest.fixture(scope="module")
def pretrained():
    require_shared()
    return create_timm_model(MODEL, CHECKPOINT)


@pytest.fixture(scope="module")
def api_result(pretrained, synset_folder):
    dataset = TolerantImageFiles(synset_samples(synset_folder), timm_transform(pretrained))
    return evaluate(pretrained, dataset, [0, 8], batch_size=8, progress=False)


@pytest.fixture(scope="module")
def command_run(synset_folder, tmp_path_factory):
    """One single-process run of the command: its printed output, JSON and plot."""
    out = tmp_path_factory.mktemp("out")
    printed = StringIO()
    with redirect_stdout(printed):
        code = main(["eval", "--model", MODEL, "--checkpoint", str(CHECKPOINT), "--data", str(synset_folder),
                     "--r", "0,8", *FAST[2:], "--output", str(out / "eval.json"), "--plot", str(out / "eval.png")])
    assert code == 0
    return printed.getvalue(), json.loads((out / "eval.json").read_text()), out / "eval.png"


def counts(rows):
    return [(row["setting"], row["tokens_left"], row["images"], row["top1_correct"], row["top5_correct"],
             row["top1"], row["top5"]) for row in rows]


def plain_timm_correct(model, synset_folder):
    """Top-1 hits of the unpatched timm model on the readable images, computed apart
    from the code under test."""
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    samples = [(path, label) for path, label in synset_samples(synset_folder) if path.name not in BROKEN]
    images = torch.stack([transform(Image.open(path).convert("RGB")) for path, _ in samples])
    with torch.no_grad():
        predicted = model(images).argmax(-1)
    return int((predicted == torch.tensor([label for _, label in samples])).sum())


def test_accuracy_counts_agree_with_plain_timm(api_result, pretrained, synset_folder):
    rows = {row.setting: row for row in api_result.rows}
    assert list(rows) == SETTINGS
    assert all(row.images == CLASSES for row in rows.values()), "the broken files must not count as images"
    assert rows["unpatched"].top1_correct == plain_timm_correct(pretrained, synset_folder)
    assert rows["r=0"].top1_correct == rows["unpatched"].top1_correct
    assert rows["r=0"].top5_correct == rows["unpatched"].top5_correct
    assert rows["unpatched"].top1_correct >= 12, "the pretrained model should get most of these photos right"
    for row in rows.values():
        assert isinstance(row.top1_correct, int) and isinstance(row.top5_correct, int)
        assert 0 <= row.top1_correct <= row.top5_correct <= row.images
        assert row.top1 == pytest.approx(100 * row.top1_correct / row.images)
        assert row.top5 == pytest.approx(100 * row.top5_correct / row.images)
        assert row.images_per_second > 0
    assert [rows[s].tokens_left for s in SETTINGS] == [197, 197, 101]
    assert rows["unpatched"].speedup == 1.0
    assert not tokenmerge.is_applied(pretrained), "evaluation leaves the model unpatched"


def test_unreadable_files_are_reported_by_name(api_result):
    assert [Path(item.path).name for item in api_result.unreadable] == sorted(BROKEN)
    reasons = " ".join(item.reason for item in api_result.unreadable)
    assert "cannot identify image file" in reasons and "truncated" in reasons


def test_command_prints_table_and_unreadable_files(command_run, api_result):
    printed, report, _ = command_run
    lines = printed.splitlines()
    assert lines[0].startswith(f"{MODEL} (") and f"on {CLASSES + 2} image files" in lines[0] and "threads" in lines[0]
    assert "top-1 %" in lines[1] and "img/s" in lines[1]
    assert [line.split()[0] for line in lines[3:6]] == SETTINGS
    assert lines[6].startswith("2 unreadable images (not counted): ")
    assert all(name in lines[6] for name in BROKEN)
    assert counts(report["rows"]) == counts([vars(row) for row in api_result.rows])
    assert all(row["unreadable"] == 2 for row in report["rows"])
    assert report["environment"]["processes"] == 1 and report["environment"]["threads"] >= 1


def test_plot_is_a_png(command_run):
    _, _, plot = command_run
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.width > 400


def test_class_map_gives_the_same_figures_as_synset_folders(class_map_folder, command_run, tmp_path, capsys):
    root, class_map = class_map_folder
    output = tmp_path / "eval.csv"
    assert main(["eval", "--model", MODEL, "--checkpoint", str(CHECKPOINT), "--data", str(root),
                 "--class-map", str(class_map), *FAST, "--output", str(output)]) == 0
    assert "2 unreadable images" in capsys.readouterr().out
    with output.open() as handle:
        rows = list(csv.DictReader(handle))
    single = command_run[1]["rows"]
    assert [row["setting"] for row in rows] == SETTINGS
    for row, expected in zip(rows, single):
        for key in ("tokens_left", "images", "top1_correct", "top5_correct"):
            assert int(row[key]) == expected[key]
        assert float(row["top1"]) == pytest.approx(expected["top1"])


def test_two_torchrun_processes_give_exactly_the_single_process_figures(synset_folder, command_run, tmp_path):
    output = tmp_path / "eval.json"
    result = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "tokenmerge", "eval", "--model", MODEL,
         "--checkpoint", str(CHECKPOINT), "--data", str(synset_folder), *FAST, "--output", str(output)],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("top-1 %") == 1, "only the first process prints"
    assert ", 2 processes;" in result.stdout
    assert result.stdout.count("2 unreadable images (not counted)") == 1
    report = json.loads(output.read_text())
    assert report["environment"]["processes"] == 2
    assert counts(report["rows"]) == counts(command_run[1]["rows"])
    assert all(row["unreadable"] == 2 for row in report["rows"])


def test_processes_take_whole_batches_in_turn(monkeypatch):
    dataset = list(range(21))
    shares = []
    for process in range(3):
        monkeypatch.setattr(distributed, "rank", lambda process=process: process)
        monkeypatch.setattr(distributed, "world_size", lambda: 3)
        shares.append(list(shard_loader(dataset, batch_size=4, workers=0).batch_sampler))
    assert shares == [[[0, 1, 2, 3], [12, 13, 14, 15]], [[4, 5, 6, 7], [16, 17, 18, 19]], [[8, 9, 10, 11], [20]]]


def test_every_batch_starts_with_the_next_setting():
    settings = ["a", "b", "c"]
    assert [rotated(settings, turn) for turn in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


def test_collate_sets_unreadable_items_apart():
    broken = Unreadable("a/b.JPEG", "OSError: truncated")
    images, labels, unreadable = collate_readable([(torch.zeros(3), 4), broken, (torch.ones(3), 7)])
    assert images.shape == (2, 3) and labels.tolist() == [4, 7] and unreadable == [broken]
    images, labels, unreadable = collate_readable([broken])
    assert images is None and len(labels) == 0 and unreadable == [broken]


def test_correct_predictions_top1_and_top5():
    logits = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6], [6.0, 5, 4, 3, 2, 1, 0], [6.0, 5, 4, 3, 2, 1, 0]])
    assert correct_predictions(logits, torch.tensor([6, 3, 6])) == (1, 2)
    assert correct_predictions(logits[:, :3], torch.tensor([2, 0, 2])) == (2, 3), "fewer than 5 classes"


def test_class_map_errors(class_map_folder, tmp_path):
    root, class_map = class_map_folder
    names = class_map.read_text().splitlines()
    partial = tmp_path / "partial.txt"
    partial.write_text("\n".join(names[:5]))
    with pytest.raises(ValueError, match="has no line for the class folders"):
        class_map_samples(root, partial)
    folder = sorted(root.iterdir())[0].name
    twice = tmp_path / "twice.txt"
    twice.write_text("\n".join(names + [folder]))
    with pytest.raises(ValueError, match=f"names {folder} \\(lines \\d+, 1000\\) more than once"):
        class_map_samples(root, twice)
    with pytest.raises(FileNotFoundError, match="class map"):
        folder_samples(root, tmp_path / "missing.txt")


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("empty", "no images found in"),
        ("named", "is not named by an ImageNet-1k synset (like n01440764); for other class folders give a class map"),
        ("unknown class", "has no line for the class folders tench"),
        ("unknown model", "timm has no model named 'vit_tiniest'"),
        ("plot suffix", "use a .png, .pdf or .svg file name"),
        ("limit", "argument --limit: must be at least 1, got 0"),
        ("index too large", "names 1001 classes, but the model has 1000; give the class map of the model's classes"),
        ("21k model", "labelled with ImageNet-1k indices, but the model has 21843 classes; give --class-map"),
        ("no gpu", "torch sees no CUDA GPU here; use --device cpu"),
    ],
)
def test_errors_say_what_to_do(case, message, tmp_path, capsys):
    data, extra, model = tmp_path / "images", [], "vit_tiny_patch16_224"
    if case != "missing":
        data.mkdir()
    if case in ("named", "unknown class", "index too large"):
        (data / "tench").mkdir()
        Image.new("RGB", (8, 8)).save(data / "tench" / "photo.jpg")
    if case == "unknown class":
        (tmp_path / "map.txt").write_text("goldfish\n")
        extra = ["--class-map", str(tmp_path / "map.txt")]
    if case == "index too large":
        (tmp_path / "map.txt").write_text("\n" * 1000 + "tench\n")
        extra = ["--class-map", str(tmp_path / "map.txt")]
    if case in ("unknown model", "21k model"):
        model = {"unknown model": "vit_tiniest", "21k model": "vit_tiny_patch16_224.augreg_in21k"}[case]
        (data / "n01440764").mkdir()
        Image.new("RGB", (8, 8)).save(data / "n01440764" / "photo.jpg")
    if case == "plot suffix":
        extra = ["--plot", str(tmp_path / "plot.txt")]
    if case == "limit":
        extra = ["--limit", "0"]
    if case == "no gpu":
        if torch.cuda.is_available():
            pytest.skip("this machine has a CUDA GPU")
        extra = ["--device", "cuda"]
    try:
        code = main(["eval", "--model", model, "--data", str(data), *extra])
    except SystemExit as usage:  # argparse's own errors
        code = usage.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("tokenmerge eval: error: ") and message in err


@pytest.fixture
def linked_synset_folder(tmp_path):
    """4 synset folders of 2 pictures each, 2 of them links to folders elsewhere, and
    two links that lead back: one to the root, one to its own folder."""
    info = timm.data.ImageNetInfo()
    synsets = [info.index_to_label_name(i) for i in range(4)]
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "images").mkdir()
    make_class_folder(tmp_path / "elsewhere", synsets[2:], 2)
    root, _ = make_class_folder(tmp_path / "images", synsets[:2], 2)
    for name in synsets[2:]:
        (root / name).symlink_to(tmp_path / "elsewhere" / name, target_is_directory=True)
    (root / synsets[0] / "loop").symlink_to(root, target_is_directory=True)
    (root / synsets[1] / "again").symlink_to(root / synsets[1], target_is_directory=True)
    return root


def test_every_command_sees_the_images_behind_folder_links(linked_synset_folder, tmp_path, capsys):
    root = linked_synset_folder
    assert len(folder_samples(root)) == len(folder_samples(root, labels=False)) == 8
    for labels in ([], ["--no-labels"]):
        assert main(["eval", *TINY, "--data", str(root), *labels, "--r", "2", "--batch-size", "8"]) == 0
        assert "on 8 image files" in capsys.readouterr().out.splitlines()[0]
    assert main(["tune", *TINY, "--data", str(root), "--flops", "70%", "--budget-minutes", "0.01", "--images", "100",
                 "--runs", "1", "--batch-size", "2", "--output", str(tmp_path / "tuned.json")]) == 0
    assert "calibrating on 8 image files" in capsys.readouterr().out
    assert json.loads((tmp_path / "tuned.json").read_text())["calibration"]["images"] == 8
    (tmp_path / "data").mkdir()
    for split in ("train", "val"):
        (tmp_path / "data" / split).symlink_to(root, target_is_directory=True)
    splits = read_splits(tmp_path / "data")
    assert len(splits.train) == len(splits.val) == 8
