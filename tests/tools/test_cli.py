import csv
import json
import subprocess
import sys

import pytest

from tests.conftest import CHECKPOINT, make_class_folder, require_shared
from tokenmerge.tools.cli import COMMANDS, main

FAST = ["--runs", "2", "--warmup", "0", "--batch-size", "1"]


def table_rows(out):
    lines = out.splitlines()
    return {line.split()[0]: line.split() for line in lines[3:] if line.strip() and not line.startswith("wrote")}


def test_bench_prints_a_row_per_setting(capsys):
    assert main(["bench", "--model", "vit_tiny_patch16_224", "--r", "0,8,decreasing:4", *FAST]) == 0
    out = capsys.readouterr().out
    assert "vit_tiny_patch16_224 (random weights), batch 1" in out.splitlines()[0]
    assert "threads" in out.splitlines()[0]
    rows = table_rows(out)
    assert set(rows) == {"unpatched", "r=0", "r=8", "r=decreasing:4"}
    assert rows["unpatched"][1] == rows["r=0"][1] == "197"
    assert rows["r=8"][1] == "101"
    assert rows["unpatched"][-1] == "1.00"
    assert float(rows["r=8"][2]) < float(rows["r=0"][2])


def test_bench_limit_rows_outputs_and_dtypes(tmp_path, capsys):
    json_path, csv_path = tmp_path / "bench.json", tmp_path / "bench.csv"
    args = ["bench", "--model", "vit_tiny_patch16_224", "--r", "0,8", "--cut-limit", "--per-block", *FAST]
    assert main([*args, "--output", str(json_path)]) == 0
    out = capsys.readouterr().out
    assert "cut r=8" in out and "of limit" in out and "189 181 173" in out
    report = json.loads(json_path.read_text())
    assert [row["setting"] for row in report["rows"]] == ["unpatched", "r=0", "r=8", "cut r=8"]
    assert report["rows"][2]["tokens_per_block"][-1] == 101 and report["rows"][2]["of_limit"] > 0
    assert report["environment"]["threads"] >= 1 and report["environment"]["timm"]
    for row in report["rows"]:  # the analytic GFLOPs agree with FlopCounterMode's count
        assert row["gflops"] == pytest.approx(row["counted_gflops"], rel=0.03)
    assert report["rows"][2]["counted_gflops"] < 0.8 * report["rows"][1]["counted_gflops"]
    assert main(["bench", "--model", "vit_tiny_patch16_224", "--r", "4", "--dtype", "bfloat16",
                 "--output", str(csv_path), *FAST]) == 0
    with csv_path.open() as handle:
        assert [row["setting"] for row in csv.DictReader(handle)] == ["unpatched", "r=4"]


def test_bench_runs_as_a_module():
    result = subprocess.run(
        [sys.executable, "-m", "tokenmerge", "bench", "--model", "vit_tiny_patch16_224", "--r", "4", *FAST],
        capture_output=True, text=True, check=True,
    )
    assert "r=4" in result.stdout and "speed-up" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "vit_tiniest_patch16_224"], "timm has no model named 'vit_tiniest_patch16_224'"),
        (["--model", "vit_tiny_patch16_224", "--r", "0,-1"], ">= 0"),
        (["--model", "vit_tiny_patch16_224", "--r", "1/2/3"], "12 blocks"),
        (["--model", "resnet18"], "does not support timm's ResNet"),
        (["--model", "vit_tiny_patch16_224", "--checkpoint", "missing.safetensors"], "does not exist"),
        (["--model", "vit_tiny_patch16_224", "--output", "bench.txt"], "use a .json or .csv"),
    ],
)
def test_bench_errors_say_what_is_wrong(args, message, capsys):
    assert main(["bench", *args, *FAST]) == 2
    assert message in capsys.readouterr().err


def test_unreadable_r_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--r", "eight"])
    assert info.value.code == 2
    assert "cannot read r schedule 'eight'" in capsys.readouterr().err


def test_checkpoint_that_does_not_fit_the_model(capsys):
    require_shared()
    assert main(["bench", "--model", "vit_small_patch16_224", "--checkpoint", str(CHECKPOINT), *FAST]) == 2
    assert "does not fit model vit_small_patch16_224" in capsys.readouterr().err


def test_bench_times_another_method_against_its_limit(tmp_path):
    output = tmp_path / "bench.json"
    assert main(["bench", "--model", "vit_tiny_patch16_224", "--r", "8", "--method", "evit", "--cut-limit",
                 "--output", str(output), *FAST]) == 0
    rows = {row["setting"]: row for row in json.loads(output.read_text())["rows"]}
    assert set(rows) == {"unpatched", "evit r=8", "cut evit r=8"}
    assert rows["evit r=8"]["tokens_left"] == rows["cut evit r=8"]["tokens_left"] == 101
    assert rows["evit r=8"]["of_limit"] > 0
    # pruning computes no matching similarities: its FLOPs are those of the cut model
    assert rows["evit r=8"]["gflops"] == rows["cut evit r=8"]["gflops"]


def test_unknown_method_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--method", "pruning"])
    assert "invalid choice: 'pruning'" in capsys.readouterr().err


@pytest.mark.parametrize("option, choices", [
    ("--opt", ["adamw", "sgd", "lamb"]),
    ("--sched", ["cosine", "step", "poly"]),
])
def test_train_names_an_unknown_timm_option_and_its_choices(option, choices, tmp_path, capsys):
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        make_class_folder(tmp_path / split, ["cat", "dog"], 2)
    assert main(["train", "--model", "vit_tiny_patch16_224", "--data", str(tmp_path), "--output",
                 str(tmp_path / "run"), "--batch-size", "2", option, "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tokenmerge train: error: {option} nope: timm has no ") and "choose one of" in err
    assert all(choice in err for choice in choices) and not (tmp_path / "run").exists()


def test_help_imports_no_model_library():
    """``tokenmerge --help`` (and any command's) builds the parser without importing timm,
    transformers, open_clip, torchvision or matplotlib: they load when a command runs."""
    script = ("import sys; from tokenmerge.tools.cli import build_parser; build_parser(); "
              "loaded = {'timm', 'transformers', 'open_clip', 'torchvision', 'matplotlib'} & set(sys.modules); "
              "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", script], check=True)


@pytest.mark.parametrize("argv, imported", [(["--help"], set()), (["--version"], set()),
                                            (["bench", "--help"], {"torch", "tokenmerge.tools.bench"})])
def test_the_command_list_imports_no_torch_and_a_command_only_its_own_module(argv, imported):
    """``tokenmerge --help`` answers at once; a command's help imports that command alone."""
    commands = {f"tokenmerge.tools.{module}" for module, _ in COMMANDS.values()}
    script = (f"import sys\nfrom tokenmerge.tools.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n"
              f"    pass\nprint(sorted(set({sorted(commands | {'torch'})!r}) & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    assert done.stdout.strip().splitlines()[-1] == str(sorted(imported))
