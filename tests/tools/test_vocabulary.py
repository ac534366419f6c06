"""One vocabulary across the commands: the same options with the same words, checks
before any work, duplicate settings measured once, defaults that follow the model,
and result files that say what was run."""
import argparse
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

import tokenmerge
from tests.conftest import make_class_folder
from tokenmerge.tools.cli import build_parser, main
from tokenmerge.tools.data import balanced_subset
from tokenmerge.tools.models import load_model
from tokenmerge.tools.settings import default_sweep, sweep_settings, unique

TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "patch_size=8", "depth=2", "--img-size", "32"]
FAST = ["--runs", "2", "--warmup", "0", "--batch-size", "2"]


def help_of(command):
    parser = build_parser()
    subparsers = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return {option: action.help for action in subparsers.choices[command]._actions for option in action.option_strings}


@pytest.mark.parametrize("option", ["--library", "--model", "--checkpoint", "--num-classes", "--model-kwargs",
                                    "--img-size", "--device", "--threads", "--prop-attn", "--debug"])
def test_every_command_has_the_shared_options_with_the_same_words(option):
    helps = {command: help_of(command).get(option) for command in ("bench", "eval", "compare", "visualize", "train")}
    assert all(helps.values()), f"{option} missing in {[c for c, h in helps.items() if not h]}"
    if option not in ("--model", "--prop-attn"):  # (defaults differ and are stated)
        assert len(set(helps.values())) == 1, helps


@pytest.mark.parametrize("command", ["bench", "eval", "compare", "visualize", "train"])
def test_the_torchrun_safe_alias_of_r_is_everywhere(command):
    assert "--merge-r" in help_of(command) and "--r" in help_of(command)


def test_bench_limit_points_to_the_cut_limit(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--limit"])
    assert "--cut-limit" in capsys.readouterr().err


def test_every_variant_is_a_method_everywhere(tmp_path):
    output = tmp_path / "bench.json"
    assert main(["bench", *TINY, "--r", "2", "--method", "tome-no-prop-attn", "--output", str(output), *FAST]) == 0
    rows = json.loads(output.read_text())["rows"]
    assert [row["setting"] for row in rows] == ["unpatched", "tome-no-prop-attn r=2"]
    settings = sweep_settings([2], "tome", prop_attn=False)
    assert (settings[1].method, settings[1].prop_attn) == ("tome", False)


@pytest.mark.parametrize("command", ["visualize", "train"])
def test_commands_for_timm_only_say_so(command, tmp_path, capsys):
    args = {"visualize": ["any.jpg"], "train": ["--data", str(tmp_path), "--output", str(tmp_path / "out")]}[command]
    assert main([command, *args, "--library", "torchvision", "--model", "vit_b_32"]) == 2
    err = capsys.readouterr().err
    assert f"tokenmerge {command} supports timm models only; bench, eval and compare take --library torchvision" in err


def test_duplicate_settings_are_measured_once_with_a_note(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    root, class_map = make_class_folder(tmp_path / "images", ["cat", "dog"], 2)
    output = tmp_path / "eval.json"
    assert main(["eval", *TINY, "--data", str(root), "--class-map", str(class_map), "--num-classes", "2",
                 "--r", "2,2,3", "--batch-size", "2", "--output", str(output)]) == 0
    assert "note: r=2 is given more than once; it is measured once" in capsys.readouterr().err
    rows = json.loads(output.read_text())["rows"]
    assert [row["setting"] for row in rows] == ["unpatched", "r=2", "r=3"]
    assert {row["images"] for row in rows} == {4}, "no setting counted twice"
    kept, notes = unique(sweep_settings([8, 8], "tome"))
    assert len(kept) == 2 and len(notes) == 1


def test_default_sweep_follows_the_model():
    import timm

    assert default_sweep(timm.create_model("vit_tiny_patch16_224")) == [0, 8, 13, 16]
    assert default_sweep(timm.create_model("vit_base_patch32_224")) == [0, 2, 3, 4]
    assert default_sweep(timm.create_model("vit_base_patch32_224"), with_zero=False) == [2, 3, 4]


@pytest.mark.parametrize("args, message", [
    (["--output", "{tmp}"], "is a folder"),
    (["--output", "{tmp}/afile/out.json"], "cannot be made"),
    (["--output", "{tmp}/readonly/out.json"], "cannot be written"),
    (["--device", "cuda:7"], "torch sees no CUDA GPU here"),
    (["--device", "mps"], "torch sees no MPS"),
    (["--device", "nonsense"], "not a device name"),
    (["--r", "linear:inf"], "finite mean r"),
    (["--r", "linear:nan"], "finite mean r"),
])
def test_bench_checks_before_any_work(args, message, tmp_path, capsys):
    if torch.cuda.is_available() and "cuda" in args[-1]:
        pytest.skip("this machine has a GPU")
    (tmp_path / "afile").write_text("")
    (tmp_path / "readonly").mkdir()
    os.chmod(tmp_path / "readonly", 0o500)
    if "readonly" in " ".join(args) and os.access(tmp_path / "readonly", os.W_OK):
        pytest.skip("this user can write into a read-only folder (root)")
    args = [arg.format(tmp=tmp_path) for arg in args]
    try:
        code = main(["bench", *TINY, *args, *FAST])
    except SystemExit as usage:
        code = usage.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) <= 20


@pytest.mark.parametrize("threads", ["0", "-1"])
def test_threads_must_be_positive(threads, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--threads", threads])
    assert "argument --threads: must be at least 1" in capsys.readouterr().err


def test_output_records_what_was_run(tmp_path):
    json_path, csv_path = tmp_path / "runs" / "bench.json", tmp_path / "bench.csv"  # (a missing folder is made)
    for path in (json_path, csv_path):
        assert main(["bench", *TINY, "--r", "2", "--output", str(path), *FAST]) == 0
    report = json.loads(json_path.read_text())
    assert report["run"]["model"] == "vit_tiny_patch16_224" and report["run"]["batch_size"] == 2
    assert report["run"]["r"] == ["2"] and report["run"]["runs"] == 2 and report["run"]["dtype"] == "float32"
    assert report["run"]["model_kwargs"] == {"patch_size": 8, "depth": 2}
    with csv_path.open() as handle:
        row = next(csv.DictReader(handle))
    assert row["run_model"] == "vit_tiny_patch16_224" and row["run_warmup"] == "0" and row["env_torch"]


def test_bench_says_when_its_timings_are_not_to_be_trusted():
    from tokenmerge.tools.timing import untrusted

    assert untrusted({"r=8": 3.0}) == ""
    assert "r=13" in untrusted({"r=8": 3.0, "r=13": 35.0}) and "not to be trusted" in untrusted({"r=13": 35.0})
    assert untrusted({"unpatched": 30.0, "r=8": 40.0}).startswith("the timings of every setting vary by up to 40%")


def bench_row(setting: str, speedup: float, spread: float = 2.0, of_limit=None):
    from tokenmerge.tools.bench import BenchRow

    return BenchRow(setting, [197], 197, 1.0, 1.0, 100.0, spread, 1.0, speedup, of_limit)


def test_bench_warns_for_speedups_below_one_beyond_the_cut_limit_or_from_too_few_rounds():
    from tokenmerge.tools.bench import bench_warnings

    quiet = [bench_row("unpatched", 1.0), bench_row("r=8", 1.4, of_limit=0.9), bench_row("cut r=8", 1.55)]
    assert bench_warnings(quiet, runs=8) == []
    slower, beyond = bench_warnings([quiet[0], bench_row("r=0", 0.97), bench_row("r=8", 1.6, of_limit=1.03),
                                     quiet[2]], runs=8)
    assert slower.startswith("r=0 0.97x measured slower") and beyond.startswith("r=8 103% of the cut limit")
    (few,) = bench_warnings(quiet, runs=3)
    assert few.startswith("every setting (3) timed over fewer than 5 rounds")
    (noisy,) = bench_warnings([*quiet[:2], bench_row("cut r=8", 1.5, spread=30.0)], runs=8)
    assert "cut r=8" in noisy and "30%" in noisy


def test_limit_takes_a_seeded_class_balanced_sample():
    samples = [(f"{label}/{index}.jpg", label) for label in range(4) for index in range(10)]
    chosen = balanced_subset(samples, 8, seed=0)
    assert sorted(label for _, label in chosen) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert chosen == balanced_subset(samples, 8, seed=0) != balanced_subset(samples, 8, seed=1)
    assert len({label for _, label in balanced_subset(samples, 3, seed=0)}) == 3
    assert balanced_subset(samples, 100) == samples


def test_a_class_map_of_another_size_than_the_model_is_refused(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    root, class_map = make_class_folder(tmp_path / "images", ["cat", "dog"], 1)
    assert main(["eval", *TINY, "--data", str(root), "--class-map", str(class_map)]) == 2
    assert "names 2 classes, but the model has 1000" in capsys.readouterr().err


def test_bugs_keep_their_traceback_and_debug_shows_every_one(monkeypatch, capsys):
    from tokenmerge.tools import bench

    def broken(args):
        raise TypeError("a bug")

    with pytest.raises(ValueError):
        main(["bench", *TINY, "--r", "1/2/3", "--debug"])
    monkeypatch.setattr(bench, "run", broken)
    with pytest.raises(TypeError, match="a bug"):
        main(["bench"])


def test_fine_tuned_models_load_with_their_class_count(tmp_path):
    import timm
    from safetensors.torch import save_file

    tuned = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10)
    save_file(tuned.state_dict(), tmp_path / "model.safetensors")
    kwargs = dict(model_kwargs={"patch_size": 8, "depth": 2}, img_size=(32, 32))
    with pytest.raises(ValueError, match="give --num-classes 10"):
        load_model("timm", "vit_tiny_patch16_224", tmp_path / "model.safetensors", **kwargs)
    model = load_model("timm", "vit_tiny_patch16_224", tmp_path / "model.safetensors", num_classes=10, **kwargs)
    assert model.num_classes == 10 and model.weights == str(tmp_path / "model.safetensors")
    assert torch.equal(model.network.head.weight, tuned.head.weight)


def test_capped_r_warning_points_at_the_callers_line():
    import timm

    model = tokenmerge.apply(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), r=12)
    with pytest.warns(tokenmerge.CappedRWarning) as caught:
        model(torch.randn(1, 3, 32, 32))
    assert caught[0].filename == __file__


def test_visualize_is_reachable_after_import_tokenmerge_without_importing_plotting():
    script = ("import sys, tokenmerge; assert 'matplotlib' not in sys.modules and 'PIL' not in sys.modules; "
              "assert callable(tokenmerge.visualize.visualize)")
    subprocess.run([sys.executable, "-c", script], check=True)


def test_merge_state_help_shows_no_internals():
    import pydoc

    text = pydoc.render_doc(tokenmerge.MergeState, renderer=pydoc.plaintext)
    for internal in ("block_pass", "pass_of", "adopt", "warn_capped"):
        assert f"\n |  {internal}(" not in text


@pytest.mark.parametrize("command, args", [
    ("eval", ["--output", "/proc/tokenmerge.json"]),
    ("eval", ["--plot", "/proc/tokenmerge.png"]),
    ("compare", ["--plot", "/sys/tokenmerge.svg"]),
    ("bench", ["--output", "/sys/tokenmerge.csv"]),
    ("tune", ["--output", "/proc/tokenmerge.json"]),
    ("visualize", ["--output", "/proc/tokenmerge.png"]),
    ("train", ["--output", "/proc/tokenmerge-run"]),
])
def test_outputs_that_cannot_be_created_are_refused_before_any_work(command, args, tmp_path, capsys):
    """Even for root, whom permission bits do not stop."""
    if not os.path.isdir("/proc/self") or not os.path.isdir("/sys/kernel"):
        pytest.skip("needs Linux's /proc and /sys, where no file can be created")
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        make_class_folder(tmp_path / split, ["cat", "dog"], 2)
    images = tmp_path / "val"
    inputs = {"eval": ["--data", str(images), "--no-labels"], "compare": ["--data", str(images), "--no-labels"],
              "bench": FAST, "tune": ["--data", str(images), "--flops", "70%"],
              "visualize": [str(images / "cat" / "0.png")], "train": ["--data", str(tmp_path)]}[command]
    assert main([command, *inputs, *TINY, *args]) == 2
    captured = capsys.readouterr()
    assert f"{args[1]} cannot be written" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert captured.out == "", "nothing ran"


@pytest.mark.parametrize("command", ["eval", "compare", "tune", "train"])
def test_data_given_a_file_says_it_is_a_file(command, tmp_path, capsys):
    picture = tmp_path / "photo.png"
    picture.write_bytes(b"")
    extra = {"tune": ["--flops", "70%", "--output", str(tmp_path / "s.json")],
             "train": ["--output", str(tmp_path / "run")]}.get(command, [])
    assert main([command, *TINY, "--data", str(picture), *extra]) == 2
    err = capsys.readouterr().err
    assert f"{picture} is a file, not a folder; give the folder that holds" in err and "does not exist" not in err


@pytest.mark.parametrize("command, args", [
    ("bench", ["--r", "@"]),
    ("eval", ["--r", "0,@"]),
    ("visualize", ["--r", " @ "]),
    ("train", ["--merge-r", "@"]),
    ("train", ["--eval-r", "@"]),
])
def test_an_at_sign_without_a_file_name_says_the_name_is_missing(command, args, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, *args])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "a file name is missing after '@'" in err and "schedule file ." not in err


@pytest.mark.parametrize("items", [["@a"], ["0", "@a", "2"], ["@a,b", "8"], ["0", "@a,b,c"], ["@a,b", "@a"]])
def test_a_schedule_file_whose_name_holds_commas_is_one_item_of_a_sweep(items, tmp_path):
    """An @ item takes in the commas after it as far as that names an existing file."""
    for name in ("a", "a,b", "a,b,c"):
        (tmp_path / name).write_text(json.dumps({"r": [len(name), 1]}))
    items = [item.replace("@", f"@{tmp_path}/") for item in items]
    args = build_parser(["bench"]).parse_args(["bench", "--r", ",".join(items)])
    assert [tokenmerge.schedule.describe(r) for r in args.r] == items


def test_a_checkpoint_that_does_not_fit_is_named_with_its_whole_reason(tmp_path):
    """No message is cut mid-word: a state dict's long key lists are shortened to their
    first names and a count, and every mismatch is said in full."""
    import timm
    from safetensors.torch import save_file

    other = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, num_classes=10)
    state = {key: value for key, value in other.state_dict().items() if not key.startswith("blocks.2.")}
    state["head.weight"] = torch.zeros(10, 7)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as caught:
        load_model("timm", "vit_tiny_patch16_224", tmp_path / "model.safetensors", num_classes=10,
                   model_kwargs={"patch_size": 8, "depth": 3}, img_size=(32, 32))
    message = str(caught.value)
    assert "\n" not in message and message.endswith(")")
    assert "and " in message and " more" in message  # the missing keys of block 2, shortened
    assert "size mismatch for head.weight" in message and "torch.Size([10, 7])" in message


@pytest.mark.parametrize("name, first", [("vit_tiny_patch16", "vit_tiny_patch16_224"),
                                         ("vit_tiny_patch16_244", "vit_tiny_patch16_224"),
                                         ("eva02_smal_patch14_224", "eva02_small_patch14_224")])
def test_an_unknown_timm_name_suggests_the_names_meant(name, first):
    with pytest.raises(ValueError, match=f"timm has no model named '{name}'; similar: {first}, "):
        load_model("timm", name)
