"""What keeps runs and model files safe: resuming computes what an uninterrupted run
would (whatever the number of loading workers) and refuses checkpoints that changed,
are truncated or do not fit; a loss that stops being finite ends the run with the
finished epochs kept; model files that are truncated, not weights or hold pickled
objects are refused in one line (the pickle never runs); devices torch cannot see
and impossible thread counts are refused before any work. Tiny models throughout."""
import hashlib
import importlib.util
import json
import os
import shlex
import shutil

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import make_class_folder
from tests.test_schedule import UNUSABLE, unusable_schedule
from tests.tools.test_train import CLASSES, TINY_ARGS, config, read_csv
from tokenmerge.tools.cli import main
from tokenmerge.tools.models import load_model
from tokenmerge.tools.train import TrainConfig, checkpoints, loop, train

FAST = ["--runs", "2", "--warmup", "0", "--batch-size", "1"]
#: One epoch of 3 steps with augmentation and drop path: every random draw of a run.
RUN = dict(epochs=1, augment=True, drop_path=0.1)
#: The same run on the command line (TINY_ARGS and config's defaults).
RUN_ARGS = ["--epochs", "1", "--batch-size", "8", "--merge-r", "2", "--lr", "1e-3", "--drop-path", "0.1"]
TIMM_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 2}
HAS_OPEN_CLIP = importlib.util.find_spec("open_clip") is not None
LOADERS = [
    ("timm", "vit_tiny_patch16_224", TIMM_KWARGS),
    ("torchvision", "vit_b_32", {"image_size": 32}),
    pytest.param("open_clip", "ViT-B-32", {}, marks=pytest.mark.skipif(not HAS_OPEN_CLIP, reason="no open_clip")),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3 classes of random pictures: 8 per class to train on (3 batches of 8), 2 to validate."""
    root = tmp_path_factory.mktemp("data")
    for split, count in (("train", 8), ("val", 2)):
        (root / split).mkdir()
        make_class_folder(root / split, CLASSES, count)
    return root


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """The output folder of :data:`RUN` with 0 and with 2 data loading workers."""
    folders = {}
    for workers in (0, 2):
        folders[workers] = tmp_path_factory.mktemp(f"workers-{workers}") / "out"
        train(config(data, folders[workers], workers=workers, **RUN))
    return folders


@pytest.fixture
def finished(runs, tmp_path):
    """A copy of the finished 0-worker run, to damage."""
    output = tmp_path / "out"
    shutil.copytree(runs[0], output)
    return output


def assert_one_line_error(err, command, *parts):
    assert err.startswith(f"tokenmerge {command}: error: "), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in err, err


def write_checksum(folder, name):
    """Record the current SHA-256 of ``folder/name`` in ``folder/state.json``, as if
    the checkpoint had been written so."""
    state = json.loads((folder / "state.json").read_text())
    state["sha256"][name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    (folder / "state.json").write_text(json.dumps(state))


# --- resuming --------------------------------------------------------------------------


def test_the_number_of_workers_does_not_change_the_weights(runs):
    for name in ("model.safetensors", "epoch-1/model.safetensors", "epoch-1/optimizer.safetensors"):
        without, with_workers = load_file(runs[0] / name), load_file(runs[2] / name)
        assert without.keys() == with_workers.keys()
        assert all(torch.equal(without[key], with_workers[key]) for key in without), name
    assert read_csv(runs[0] / "steps.csv") == read_csv(runs[2] / "steps.csv")


def test_a_checkpoint_resumes_with_other_workers_but_not_on_another_device(data, finished, capsys):
    before = (finished / "epoch-1" / "model.safetensors").read_bytes()
    history = train(config(data, finished, workers=2, **RUN))
    assert [row["epoch"] for row in history] == [1]
    assert "resuming after epoch 1" in capsys.readouterr().out
    assert (finished / "epoch-1" / "model.safetensors").read_bytes() == before

    plain = dict(model="m", data="d", output="o")
    assert TrainConfig(**plain, workers=0).identity() == TrainConfig(**plain, workers=2).identity()
    assert TrainConfig(**plain).identity()["device"] == "cpu"
    assert TrainConfig(**plain, device="cuda:1").identity()["device"] == "cuda"
    state_path = finished / "epoch-1" / "state.json"
    state = json.loads(state_path.read_text())
    state["config"]["device"] = "cuda"  # as if written on a GPU
    state_path.write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"another configuration \(device: 'cuda' there, 'cpu' here\)"):
        train(config(data, finished, **RUN))


def flip_middle_bytes(path, count=16):
    """Invert ``count`` bytes in the middle of a safetensors file's tensor data, its header intact."""
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    middle = (start + len(raw)) // 2
    raw[middle:middle + count] = bytes(byte ^ 0xFF for byte in raw[middle:middle + count])
    path.write_bytes(bytes(raw))


def test_a_checkpoint_changed_after_writing_is_refused(data, finished, capsys):
    path = finished / "epoch-1" / "model.safetensors"
    before = {key: value.clone() for key, value in load_file(path).items()}
    flip_middle_bytes(path)
    after = load_file(path)  # still a readable safetensors file: only the checksum tells
    assert after.keys() == before.keys() and not all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="does not match the checksum") as error:
        train(config(data, finished, **RUN))
    assert str(path) in str(error.value)

    assert main(["train", *TINY_ARGS, "--data", str(data), "--output", str(finished), *RUN_ARGS]) == 2
    assert_one_line_error(capsys.readouterr().err, "train", str(path), "does not match the checksum")


def test_a_truncated_state_is_a_one_line_error_naming_it(data, finished, capsys):
    path = finished / "epoch-1" / "state.json"
    text = path.read_text()
    path.write_text(text[:len(text) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt") as error:
        train(config(data, finished, **RUN))
    assert str(path) in str(error.value) and "\n" not in str(error.value)

    assert main(["train", *TINY_ARGS, "--data", str(data), "--output", str(finished), *RUN_ARGS]) == 2
    assert_one_line_error(capsys.readouterr().err, "train", f"cannot read checkpoint state {path}")


def test_a_checkpoint_of_another_model_is_refused(data, finished):
    with pytest.raises(ValueError, match=r"another configuration \(model_kwargs: .*'depth': 2.* there, "
                                         r".*'depth': 1.* here\)"):
        train(config(data, finished, model_kwargs={"patch_size": 8, "depth": 1}, **RUN))


def test_weights_that_do_not_fit_are_refused_even_with_a_matching_checksum(data, finished):
    folder = finished / "epoch-1"
    weights = load_file(folder / "model.safetensors")
    del weights["head.bias"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    write_checksum(folder, "model.safetensors")
    with pytest.raises(ValueError, match="does not fit this run's model") as error:
        train(config(data, finished, **RUN))
    assert "head.bias" in str(error.value) and str(folder) in str(error.value)


def test_a_loss_that_is_not_finite_stops_the_run_keeping_finished_epochs(data, tmp_path, monkeypatch):
    output = tmp_path / "out"
    real_step, calls = loop.train_step, []

    def nan_from_epoch_two(*args, **kwargs):
        calls.append(1)
        return (float("nan"), 0) if len(calls) >= 4 else real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", nan_from_epoch_two)
    with pytest.raises(ValueError, match=r"the training loss became nan at step 4 \(epoch 2\)"):
        train(config(data, output, epochs=2, max_steps_per_epoch=2, augment=False, drop_path=0.0))
    assert len(calls) == 4, "the run stops at the first loss that is not finite"
    assert [folder.name for _, folder in checkpoints.finished_checkpoints(output)] == ["epoch-1"]
    assert [row["epoch"] for row in read_csv(output / "metrics.csv")] == ["1"]
    latest, kept = load_file(output / "model.safetensors"), load_file(output / "epoch-1" / "model.safetensors")
    assert all(torch.equal(latest[key], kept[key]) and torch.isfinite(kept[key]).all() for key in kept)


@pytest.mark.parametrize("name", ["model.safetensors", "classes.txt"])
def test_an_input_the_output_folder_would_overwrite_is_refused_before_any_work(name, data, tmp_path, capsys):
    """``--checkpoint OUTPUT/model.safetensors`` would be replaced after the first epoch."""
    output = tmp_path / "out"
    output.mkdir()
    weights = output / name
    model = timm.create_model("vit_tiny_patch16_224", num_classes=len(CLASSES), **TIMM_KWARGS)
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, weights)
    before = weights.read_bytes()
    assert main(["train", *TINY_ARGS, "--data", str(data), "--checkpoint", str(weights), "--output", str(output),
                 *RUN_ARGS]) == 2
    captured = capsys.readouterr()
    assert_one_line_error(captured.err, "train", f"--output would write {weights}", f"--checkpoint {weights}",
                          "an input of this run", "give --output another path")
    assert captured.out == "" and weights.read_bytes() == before and os.listdir(output) == [name]


def test_an_input_in_a_checkpoint_folder_of_the_output_is_refused(tmp_path):
    """Checkpoint folders are replaced, and older ones deleted, as a run goes on."""
    weights = tmp_path / "out" / "epoch-1" / "model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match=f"--output would replace {weights.parent}, which holds --checkpoint "
                                         f"{weights}, an input of this run"):
        train(TrainConfig(model="vit_tiny_patch16_224", data=str(tmp_path), output=str(tmp_path / "out"),
                          checkpoint=str(weights)))


def test_an_input_in_the_output_folder_that_the_run_does_not_write_is_read(data, tmp_path):
    """A schedule kept beside the run it is used for is no output of the run."""
    output = tmp_path / "out"
    output.mkdir()
    schedule = output / "schedule.json"
    schedule.write_text(json.dumps({"r": [2, 2]}))
    history = train(config(data, output, r=f"@{schedule}", epochs=1, max_steps_per_epoch=1))
    assert [row["epoch"] for row in history] == [1] and json.loads(schedule.read_text()) == {"r": [2, 2]}


# --- model files -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def ten_classes(tmp_path_factory):
    """A tiny timm ViT with a 10-class classifier, as safetensors, and its weights."""
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, **TIMM_KWARGS)
    weights = {key: value.contiguous() for key, value in model.state_dict().items()}
    path = tmp_path_factory.mktemp("ten") / "ten.safetensors"
    save_file(weights, path)
    return path, weights


@pytest.fixture(params=["truncated", "random bytes", "cut short of its tensors"])
def unreadable_safetensors(request, ten_classes, tmp_path):
    raw = ten_classes[0].read_bytes()
    content = {"truncated": raw[:100], "random bytes": os.urandom(4096), "cut short of its tensors": raw[:-100]}
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content[request.param])
    return path


@pytest.mark.parametrize("special", ["a FIFO", "a device"])
def test_weights_that_are_no_regular_file_are_refused_unread(special, tmp_path, capsys):
    """Read, a FIFO would wait for a writer and /dev/zero never end."""
    path = unusable_schedule(special, tmp_path)
    assert main(["bench", *TINY_ARGS, "--checkpoint", str(path), *FAST]) == 2
    assert_one_line_error(capsys.readouterr().err, "bench", f"checkpoint {path} is not a regular file")


def test_a_class_map_that_is_no_regular_file_is_refused_unread(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    root, _ = make_class_folder(tmp_path / "images", ["cat"], 1)
    fifo = tmp_path / "classes.txt"
    os.mkfifo(fifo)
    assert main(["eval", *TINY_ARGS, "--data", str(root), "--class-map", str(fifo)]) == 2
    assert_one_line_error(capsys.readouterr().err, "eval", f"class map {fifo} is not a regular file")


@pytest.mark.parametrize("library, name, kwargs", LOADERS)
def test_an_unreadable_safetensors_file_is_a_clear_error(library, name, kwargs, unreadable_safetensors, capsys):
    with pytest.raises(ValueError, match="is not a readable safetensors file") as error:
        load_model(library, name, unreadable_safetensors, model_kwargs=kwargs)
    assert str(unreadable_safetensors) in str(error.value)
    assert main(["bench", "--library", library, "--model", name, "--checkpoint", str(unreadable_safetensors),
                 *FAST]) == 2
    assert_one_line_error(capsys.readouterr().err, "bench", "is not a readable safetensors file")


class RunsACommand:
    """Unpickled, runs ``touch MARKER``: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


class NotATensor:
    pass


@pytest.mark.parametrize("library, name, kwargs", LOADERS)
def test_a_pickle_of_other_objects_is_refused_and_never_runs(library, name, kwargs, tmp_path, capsys):
    control = tmp_path / "control-ran"
    torch.save({"w": torch.zeros(1), "evil": RunsACommand(control)}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.exists(), "the payload is real: unpickling it without care runs it"

    marker = tmp_path / "payload-ran"
    malicious = tmp_path / "malicious.pt"
    torch.save({"w": torch.zeros(1), "evil": RunsACommand(marker)}, malicious)
    with pytest.raises(ValueError, match="holds pickled objects other than tensors") as error:
        load_model(library, name, malicious, model_kwargs=kwargs)
    assert f"{os.system.__module__}.system" in str(error.value), "the reason names what was refused"
    assert main(["bench", "--library", library, "--model", name, "--checkpoint", str(malicious), *FAST]) == 2
    assert_one_line_error(capsys.readouterr().err, "bench", "holds pickled objects other than tensors")
    assert not marker.exists(), "the payload never runs"

    other = tmp_path / "other.pt"
    torch.save({"w": torch.zeros(1), "other": NotATensor()}, other)
    with pytest.raises(ValueError, match="holds pickled objects other than tensors") as error:
        load_model(library, name, other, model_kwargs=kwargs)
    assert "NotATensor" in str(error.value) and "\x1b" not in str(error.value)


def test_a_folder_is_not_a_timm_checkpoint(ten_classes, tmp_path, capsys):
    folder = tmp_path / "weights"
    folder.mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        load_model("timm", "vit_tiny_patch16_224", folder, model_kwargs=TIMM_KWARGS)
    shutil.copy(ten_classes[0], folder / "model.safetensors")
    assert main(["bench", *TINY_ARGS, "--checkpoint", str(folder), *FAST]) == 2
    assert_one_line_error(capsys.readouterr().err, "bench", f"checkpoint {folder} is a folder",
                          f"such as {folder / 'model.safetensors'}")


def test_a_fine_tuned_classifier_loads_with_its_number_of_classes(ten_classes, capsys):
    path, weights = ten_classes
    model = load_model("timm", "vit_tiny_patch16_224", path, num_classes=10, model_kwargs=TIMM_KWARGS)
    assert model.num_classes == 10 and model.weights == str(path)
    loaded = model.network.state_dict()
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[key], weights[key]) for key in weights)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)

    with pytest.raises(ValueError, match="its classifier has 10 classes: give --num-classes 10"):
        load_model("timm", "vit_tiny_patch16_224", path, model_kwargs=TIMM_KWARGS)
    assert main(["bench", *TINY_ARGS, "--checkpoint", str(path), "--r", "0", *FAST]) == 2
    assert_one_line_error(capsys.readouterr().err, "bench", "give --num-classes 10")
    assert main(["bench", *TINY_ARGS, "--checkpoint", str(path), "--num-classes", "10", "--r", "0", *FAST]) == 0
    assert f"vit_tiny_patch16_224 ({path})" in capsys.readouterr().out


@pytest.mark.parametrize("case", list(UNUSABLE))
def test_a_schedule_file_that_cannot_be_used_is_one_line_naming_it(case, tmp_path, capsys):
    path = unusable_schedule(case, tmp_path)
    assert main(["bench", *TINY_ARGS, "--r", f"0,@{path}", *FAST]) == 2
    assert_one_line_error(capsys.readouterr().err, "bench", f"schedule file {path} {UNUSABLE[case]}")


# --- where and how ---------------------------------------------------------------------


@pytest.mark.parametrize("device, name", [
    pytest.param("cuda", "CUDA GPU", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU")),
    pytest.param("mps", "MPS (Apple GPU)",
                 marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="has MPS")),
])
def test_a_device_torch_cannot_see_is_refused(device, name, capsys):
    assert main(["bench", *TINY_ARGS, "--device", device, *FAST]) == 2
    assert_one_line_error(capsys.readouterr().err, "bench", f"--device {device}: torch sees no {name} here")


@pytest.mark.parametrize("threads", ["0", "-1"])
def test_threads_must_be_positive(threads, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *TINY_ARGS, "--threads", threads, *FAST])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and f"argument --threads: must be at least 1, got {threads}" in err


def transformers_folder(tmp_path):
    """A tiny ViTForImageClassification written by save_pretrained."""
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=64, num_labels=3,
                                    architectures=["ViTForImageClassification"])
    folder = tmp_path / "vit"
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    return folder


def test_a_transformers_folder_with_a_malicious_pickle_is_refused_and_never_runs(tmp_path, capsys):
    folder = transformers_folder(tmp_path)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "payload-ran"
    torch.save({"evil": RunsACommand(marker)}, folder / "pytorch_model.bin")
    capsys.readouterr()
    with pytest.raises(ValueError, match="hold pickled objects other than tensors") as error:
        load_model("transformers", str(folder))
    assert "posix.system" in str(error.value) and "weights_only` set to `False`" not in str(error.value)
    assert main(["bench", "--library", "transformers", "--model", str(folder), *FAST]) == 2
    assert_one_line_error(capsys.readouterr().err, "bench", "hold pickled objects other than tensors")
    assert not marker.exists(), "the payload never runs"


def test_a_transformers_model_names_the_folder_its_weights_came_from(tmp_path):
    folder = transformers_folder(tmp_path)
    assert load_model("transformers", str(folder)).weights == str(folder)
    assert load_model("transformers", "vit", folder).weights == str(folder)
