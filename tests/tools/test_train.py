"""``tokenmerge train`` and :mod:`tokenmerge.train`: merging in training mode (loss
falls, gradients reach every parameter, sizes keep float32 under autocast), the files
of a run, resuming to the same weights, two torchrun processes taking the steps of
one, and clear errors. Tiny models and images throughout."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

import tokenmerge
from tokenmerge.tools.cli import main
from tokenmerge.tools.train import TrainConfig, checkpoints, evaluate_accuracy, loop, train, train_step
from tokenmerge.tools.train import splits as train_splits

TINY = dict(model="vit_tiny_patch16_224", model_kwargs={"patch_size": 8, "depth": 2}, img_size=32)
CLASSES = ("cat", "dog", "fox")
TORCHRUN = Path(sys.executable).with_name("torchrun")
TINY_ARGS = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "patch_size=8", "depth=2", "--img-size", "32"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3 classes of random 24x24 PNGs: 8 per class to train on, 2 to validate."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 2)):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def tiny_model(drop_path=0.0):
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3,
                             drop_path_rate=drop_path)


def config(data, output, **changes):
    values = dict(TINY, data=str(data), output=str(output), epochs=2, batch_size=8, lr=1e-3, r=2,
                  progress=False) | changes
    return TrainConfig(**values)


def read_csv(path):
    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_loss_falls_on_a_fixed_batch_with_merging(dtype):
    model = tokenmerge.apply(tiny_model(drop_path=0.1), r=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, labels = torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    losses = [train_step(model, optimizer, images, labels, autocast_dtype=dtype)[0] for _ in range(12)]
    assert model.training, "train_step trains with dropout and drop path active"
    assert losses[-1] < 0.5 * losses[0], losses
    size = tokenmerge.get_state(model).size
    assert size.dtype == torch.float32, "sizes keep float32 under autocast"
    assert torch.equal(size.sum(dim=1), torch.full((8, 1), 17.0)), "16 patches and the class token"
    assert tokenmerge.token_counts(model) == [13, 9]


def test_train_step_counts_correct_predictions():
    model = tokenmerge.apply(tiny_model(), r=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        expected = int((model.train()(images).argmax(-1) == labels).sum())
    assert train_step(model, optimizer, images, labels)[1] == expected


def gradients(model, images, labels):
    model.train().zero_grad()
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.mark.parametrize("prop_attn", [True, False])
def test_gradients_reach_every_parameter_they_reach_unmerged(prop_attn):
    model = tiny_model()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    unmerged = gradients(model, images, labels)
    merged = gradients(tokenmerge.apply(model, r=4, prop_attn=prop_attn), images, labels)
    assert set(merged) == set(unmerged) == {name for name, _ in model.named_parameters()}
    assert all(torch.isfinite(grad).all() for grad in merged.values())
    assert not torch.allclose(merged["blocks.0.attn.qkv.weight"], unmerged["blocks.0.attn.qkv.weight"])


def test_evaluate_accuracy_counts_top1():
    model = tokenmerge.apply(tiny_model(), r=4)
    images = torch.randn(10, 3, 32, 32)
    with torch.no_grad():
        predicted = model.eval()(images).argmax(-1)
    labels = predicted.clone()
    labels[:3] = (labels[:3] + 1) % 3
    batches = [(images[:6], labels[:6]), (images[6:], labels[6:])]
    assert evaluate_accuracy(model, batches, "cpu") == pytest.approx(70.0)


@pytest.fixture(scope="module")
def command_run(data, tmp_path_factory):
    """One run of the command: 2 epochs of 3 steps, merging 2 tokens per block while
    training and 4 while validating."""
    output = tmp_path_factory.mktemp("run") / "out"
    code = main(["train", *TINY_ARGS, "--data", str(data), "--output", str(output), "--epochs", "2",
                 "--batch-size", "8", "--merge-r", "2", "--eval-r", "4", "--lr", "1e-3"])
    assert code == 0
    return output


def test_command_writes_checkpoint_and_metrics(command_run, capsys):
    output = command_run
    assert sorted(path.name for path in output.iterdir()) == [
        "classes.txt", "epoch-2", "metrics.csv", "metrics.png", "model.safetensors", "steps.csv"]
    assert sorted(path.name for path in (output / "epoch-2").iterdir()) == [
        "model.safetensors", "optimizer.safetensors", "state.json"]
    assert (output / "classes.txt").read_text().split() == list(CLASSES)
    rows = read_csv(output / "metrics.csv")
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert list(rows[0]) == [
        "epoch", "train_loss", "train_top1", "val_top1", "images_per_second", "images_per_second_iqr_percent",
        "epoch_seconds", "lr"]
    assert all(float(row["val_top1"]) in (0.0, 100 / 6, 200 / 6, 50.0, 400 / 6, 500 / 6, 100.0) for row in rows)
    steps = read_csv(output / "steps.csv")
    assert [int(row["step"]) for row in steps] == list(range(1, 7))
    assert float(rows[1]["train_loss"]) == pytest.approx(np.mean([float(row["loss"]) for row in steps[3:]]))
    with Image.open(output / "metrics.png") as image:
        assert image.format == "PNG" and image.width > 400
    state = json.loads((output / "epoch-2" / "state.json").read_text())
    assert (state["epoch"], state["step"], state["config"]["r"], state["config"]["eval_r"]) == (2, 6, "2", "4")
    weights = load_file(output / "model.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in load_file(output / "epoch-2" / "model.safetensors").items())
    model = tiny_model()
    model.load_state_dict(weights)


def test_training_speed_leaves_out_the_first_step_and_is_labelled_when_untrustworthy():
    from tokenmerge.tools.timing import steady_throughput
    from tokenmerge.tools.train.loop import speed_warning

    speed, spread, timed = steady_throughput([8] * 7, [5.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert (speed, spread, timed) == (8.0, 0.0, 6)
    assert steady_throughput([8], [2.0]) == (4.0, 0.0, 1)
    row = {"epoch": 2, "images_per_second": speed, "images_per_second_iqr_percent": spread, "timed_steps": timed}
    assert speed_warning(row) == ""
    few = speed_warning(row | {"timed_steps": 2})
    assert few.startswith("train img/s of epoch 2 (2) timed over fewer than 5 steps after the first: the spread is "
                          "unknown") and few.endswith("give an epoch more steps (--max-steps-per-epoch), fewer "
                                                      "--threads or a quieter machine")
    assert speed_warning(row | {"images_per_second_iqr_percent": 40.0}).startswith(
        "the timings of train img/s of epoch 2 vary by up to 40%")


def test_finished_run_is_not_trained_again(command_run, data, capsys):
    before = (command_run / "model.safetensors").read_bytes()
    history = train(config(data, command_run, r=2, eval_r=4, drop_path=0.1))
    assert [row["epoch"] for row in history] == [1, 2]
    assert (command_run / "model.safetensors").read_bytes() == before
    assert "resuming after epoch 2" in capsys.readouterr().out


def test_resuming_continues_with_identical_state(data, tmp_path, monkeypatch):
    """Augmentation and drop path on: the resumed run draws what the whole one drew."""
    whole = config(data, tmp_path / "whole", drop_path=0.1, augment=True, warmup_epochs=1)
    history = train(whole)

    interrupted = config(data, tmp_path / "interrupted", drop_path=0.1, augment=True, warmup_epochs=1)
    real_step, calls = loop.train_step, []

    def interrupt_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", interrupt_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(interrupted)
    monkeypatch.setattr(loop, "train_step", real_step)
    assert [folder.name for _, folder in checkpoints.finished_checkpoints(tmp_path / "interrupted")] == ["epoch-1"]
    (tmp_path / "interrupted" / ".epoch-2.partial").mkdir()  # as if cut off while writing
    resumed = train(interrupted)

    def comparable(rows):
        return [{key: row[key] for key in ("epoch", "train_loss", "train_top1", "val_top1", "lr")} for row in rows]

    assert comparable(resumed) == comparable(history)
    for name in ("model.safetensors", "optimizer.safetensors"):
        expected = load_file(tmp_path / "whole" / "epoch-2" / name)
        got = load_file(tmp_path / "interrupted" / "epoch-2" / name)
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert read_csv(tmp_path / "interrupted" / "steps.csv") == read_csv(tmp_path / "whole" / "steps.csv")
    assert [row["epoch"] for row in read_csv(tmp_path / "interrupted" / "metrics.csv")] == ["1", "2"]

    with pytest.raises(ValueError, match=r"another configuration \(lr: 0\.001 there, 0\.002 here\)"):
        train(config(data, tmp_path / "interrupted", drop_path=0.1, augment=True, warmup_epochs=1, lr=2e-3))


def test_two_torchrun_processes_take_the_steps_of_one(data, tmp_path):
    common = dict(epochs=1, max_steps_per_epoch=2, augment=False, drop_path=0.0, seed=3)
    single = train(config(data, tmp_path / "single", **common))
    result = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "tokenmerge", "train", *TINY_ARGS,
         "--data", str(data), "--output", str(tmp_path / "double"), "--epochs", "1", "--max-steps-per-epoch", "2",
         "--batch-size", "8", "--merge-r", "2", "--lr", "1e-3", "--no-augment", "--drop-path", "0", "--seed", "3"],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("train loss") == 1, "only the first process prints"
    assert "(4 per process x 2 processes)" in result.stdout
    one, two = read_csv(tmp_path / "single" / "steps.csv"), read_csv(tmp_path / "double" / "steps.csv")
    assert [row["step"] for row in two] == ["1", "2"]
    for a, b in zip(one, two):
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), abs=1e-4)
        assert b["lr"] == a["lr"]
    assert float(read_csv(tmp_path / "double" / "metrics.csv")[0]["val_top1"]) == single[0]["val_top1"]


def test_splits_are_labelled_by_the_training_classes(data, tmp_path):
    root = tmp_path / "data"
    (root / "test").mkdir(parents=True)
    (root / "train").symlink_to(data / "train")
    (root / "test" / "fox").symlink_to(data / "val" / "fox")
    splits = train_splits.read_splits(root, "test")
    assert splits.classes == list(CLASSES) and len(splits.train) == 24
    assert [(path.parent.name, label) for path, label in splits.val] == [("fox", 2), ("fox", 2)]
    (root / "test" / "owl").mkdir()
    with pytest.raises(ValueError, match="test has classes that .*train lacks: owl"):
        train_splits.read_splits(root, "test")


def test_global_batch_must_split_evenly_between_processes(data, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "world_size", lambda: 3)
    with pytest.raises(ValueError, match="the global batch of 8 images cannot be shared evenly by 3 processes"):
        train(config(data, tmp_path / "out"))


def test_an_r_beyond_a_block_is_capped_with_a_note_as_everywhere(data, tmp_path, capsys):
    args = ["train", *TINY_ARGS, "--data", str(data), "--output", str(tmp_path / "out"), "--batch-size", "8",
            "--epochs", "1", "--max-steps-per-epoch", "1", "--merge-r", "6"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "note: r=6 is more than block 1 can merge" in err and "they merge 6/5 instead, leaving 6 tokens" in err


@pytest.mark.parametrize(
    "case, extra, message",
    [
        ("missing data", [], "data folder {data}/missing does not exist"),
        ("no val", [], "has no val/ folder"),
        ("unknown model", ["--model", "vit_tiniest"], "timm has no model named 'vit_tiniest'"),
        ("eval r per block", ["--eval-r", "2/2/2"], "eval r 2/2/2: a per-block r schedule needs exactly one r per "
                                                    "block: the model has 2 blocks"),
        ("float16 on cpu", ["--amp", "float16"], "--amp float16 needs a GPU"),
        ("plateau", ["--sched", "plateau"], "sched 'plateau' needs a metric every epoch"),
        ("batch too large", ["--batch-size", "100"], "24 training images are fewer than one batch of 100"),
        ("unknown optimizer", ["--opt", "adamx"], "adamx"),
    ],
)
def test_errors_say_what_is_wrong(case, extra, message, data, tmp_path, capsys):
    root = data
    if case == "missing data":
        root = tmp_path / "missing"
        message = message.format(data=tmp_path)
    if case == "no val":
        root = tmp_path / "flat"
        (root / "train" / "cat").mkdir(parents=True)
    args = ["train", *TINY_ARGS, "--data", str(root), "--output", str(tmp_path / "out"), "--batch-size", "8", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("tokenmerge train: error: ") and message in err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def with_broken_files(data, root, train=True, val=True):
    """A copy of ``data`` in ``root`` with a file of random bytes in train/cat and a
    JPEG cut short in val/dog (or, without ``val``, a validation split of that file alone)."""
    import io
    import shutil

    shutil.copytree(data / "train", root / "train")
    if train:
        (root / "train" / "cat" / "corrupt.jpg").write_bytes(np.random.default_rng(0).bytes(2048))
    photo = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(photo, "JPEG")
    if val:
        shutil.copytree(data / "val", root / "val")
    (root / "val" / "dog").mkdir(parents=True, exist_ok=True)
    (root / "val" / "dog" / "truncated.jpg").write_bytes(photo.getvalue()[:len(photo.getvalue()) // 3])
    return root


def test_unreadable_images_are_skipped_and_named_once(data, tmp_path, capsys):
    root, output = with_broken_files(data, tmp_path / "data"), tmp_path / "run"
    assert main(["train", *TINY_ARGS, "--data", str(root), "--output", str(output), "--epochs", "2",
                 "--batch-size", "5", "--workers", "0"]) == 0
    captured = capsys.readouterr()
    assert "on 25 training and 7 validation images" in captured.out
    notes = [line for line in captured.err.splitlines() if "unreadable" in line]
    assert len(notes) == 2, "each file is named once, not every epoch"
    assert "1 unreadable training image" in notes[0] and str(root / "train" / "cat" / "corrupt.jpg") in notes[0]
    assert "1 unreadable validation image" in notes[1] and str(root / "val" / "dog" / "truncated.jpg") in notes[1]
    rows = read_csv(output / "metrics.csv")
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert all(round(float(row["val_top1"]) * 6 / 100, 6).is_integer() for row in rows), "6 readable images"
    assert [row["step"] for row in read_csv(output / "steps.csv")] == [str(step) for step in range(1, 11)]


def test_a_validation_split_none_of_which_can_be_read_keeps_the_epoch(data, tmp_path, capsys):
    root, output = with_broken_files(data, tmp_path / "data", train=False, val=False), tmp_path / "run"
    assert main(["train", *TINY_ARGS, "--data", str(root), "--output", str(output), "--epochs", "2",
                 "--batch-size", "8", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "none of the 1 validation images could be read" in err and "truncated.jpg" in err
    assert "epoch 1 is saved" in err.splitlines()[-1]
    assert (output / "epoch-1" / "state.json").is_file() and not (output / "epoch-2").exists()


def write_schedule(path, r, **fields):
    path.write_text(json.dumps({"r": r, "method": "tome", "prop_attn": True, "model": "vit_tiny_patch16_224",
                                "library": "timm"} | fields))
    return path


def test_a_schedule_file_changed_before_a_resume_is_another_run(data, tmp_path, capsys):
    schedule = write_schedule(tmp_path / "schedule.json", [2, 2], method="tome-attended", prop_attn=False)
    args = ["train", *TINY_ARGS, "--data", str(data), "--output", str(tmp_path / "out"), "--batch-size", "8",
            "--epochs", "1", "--max-steps-per-epoch", "1", "--merge-r", f"@{schedule}"]
    assert main(args) == 0
    recorded = json.loads((tmp_path / "out" / "epoch-1" / "state.json").read_text())["config"]
    assert [recorded[key] for key in ("r", "method", "prop_attn")] == ["2/2", "tome-attended", False]
    write_schedule(schedule, [3, 1], method="tome-attended", prop_attn=False)
    assert main(args) == 2
    assert "another configuration (eval_r: '2/2' there, '3/1' here; r: '2/2' there, '3/1' here)" in \
        capsys.readouterr().err


def test_a_training_config_takes_method_and_attention_from_its_schedule_file(data, tmp_path):
    schedule = write_schedule(tmp_path / "schedule.json", [2, 2], method="tome-attended", prop_attn=False)
    taken = config(data, tmp_path / "out", r=f"@{schedule}")
    assert (taken.method, taken.prop_attn) == ("tome-attended", False)
    told = config(data, tmp_path / "out", r=f"@{schedule}", method="tome", prop_attn=True)
    assert (told.method, told.prop_attn) == ("tome", True)


def test_a_schedule_file_tuned_for_another_model_is_refused_unless_meant(data, tmp_path, capsys):
    schedule = write_schedule(tmp_path / "schedule.json", [2, 2], model="vit_small_patch16_224")
    args = ["train", *TINY_ARGS, "--data", str(data), "--output", str(tmp_path / "out"), "--batch-size", "8",
            "--epochs", "1", "--max-steps-per-epoch", "1", "--merge-r", f"@{schedule}"]
    assert main(args) == 2
    assert "was tuned for vit_small_patch16_224, not vit_tiny_patch16_224" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    history = train(config(data, tmp_path / "out", r=f"@{schedule}", epochs=1, max_steps_per_epoch=1,
                           allow_other_model=True))
    assert [row["epoch"] for row in history] == [1]


@pytest.mark.parametrize("model", ["resnet18", "convit_tiny"])
def test_a_model_tokenmerge_cannot_merge_in_is_refused_before_training(model, data, tmp_path, capsys):
    args = ["train", "--model", model, "--data", str(data), "--output", str(tmp_path / "out"), "--batch-size", "8",
            "--merge-r", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("tokenmerge train: error: ") and "does not support timm's" in err
    assert "Traceback" not in err and not (tmp_path / "out" / "model.safetensors").exists()
