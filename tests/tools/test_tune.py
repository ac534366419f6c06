"""``tokenmerge tune`` and schedule files: a tuned schedule meets its FLOP target,
its file round-trips through every command and ``tokenmerge.load_schedule``, a file
for another depth and targets merging cannot meet are one-line errors, and the search
keeps the best schedule within its budget with any score. Tiny random models and a
handful of images throughout."""
import itertools
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import tokenmerge
from tokenmerge import schedule as schedules
from tokenmerge.tools import tune as tuning
from tokenmerge.tools.cli import main
from tokenmerge.tools.settings import sweep_settings, variant
from tokenmerge.tools.tuning import measuring
from tokenmerge.tools.tuning.search import SLOPES, Score, Space, search
from tokenmerge.tools.tuning.targets import CostLine, Target

MODEL = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "patch_size=8", "depth=4", "--img-size", "64"]
QUICK = ["--budget-minutes", "0.1", "--images", "8", "--runs", "2", "--batch-size", "2"]


def tiny(depth=4, **kwargs):
    return timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, depth=depth, **kwargs).eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """train/<class>/*.png and val/<class>/*.png: 2 classes of random 48x48 pictures."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for name in ("cat", "dog"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tuned(data, tmp_path_factory):
    path = tmp_path_factory.mktemp("tuned") / "schedule.json"
    assert main(["tune", *MODEL, "--data", str(data), "--flops", "60%", *QUICK, "--output", str(path)]) == 0
    return path


def test_tune_meets_a_flop_target_and_writes_the_schedule(tuned):
    record = json.loads(tuned.read_text())
    assert len(record["r"]) == 4 and all(isinstance(r, int) and r >= 0 for r in record["r"])
    assert record["method"] in ("tome", "tome-attended") and record["prop_attn"] is True
    assert record["target"] == {"flops": pytest.approx(0.6 * record["unpatched_gflops"])}
    assert record["gflops"] <= 0.6 * record["unpatched_gflops"]
    model = tiny()
    schedule = tokenmerge.load_schedule(tuned)
    assert list(schedule) == record["r"] and schedule.method == record["method"]
    assert tokenmerge.flops_per_image(model, schedule, method=schedule.method) == pytest.approx(record["gflops"] * 1e9)
    assert record["measured_speedup"] > 0 and record["calibration"]["images"] == 8
    assert record["measured_spread_percent"] >= 0
    assert record["environment"]["torch"] and record["depth"] == 4


def test_the_schedule_file_round_trips_through_every_command(tuned, data, tmp_path):
    r = json.loads(tuned.read_text())["r"]
    counts = schedules.token_counts(65, r, 1)
    at = f"@{tuned}"
    assert main(["bench", *MODEL, "--r", at, "--runs", "1", "--warmup", "0", "--batch-size", "1", "--per-block",
                 "--output", str(tmp_path / "bench.json")]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert rows[1]["tokens_per_block"] == counts
    for command in ("eval", "compare"):
        methods = ["--methods", "tome"] if command == "compare" else []
        assert main([command, *MODEL, "--data", str(data / "val"), "--no-labels", "--r", at, *methods,
                     "--batch-size", "4", "--output", str(tmp_path / f"{command}.json")]) == 0
        rows = json.loads((tmp_path / f"{command}.json").read_text())["rows"]
        assert rows[1]["tokens_left"] == counts[-1] and rows[1]["r"] == f"@{tuned}"
    picture = next((data / "val").rglob("*.png"))
    assert main(["visualize", str(picture), *MODEL, "--r", at, "--output", str(tmp_path / "merges.png")]) == 0
    assert main(["train", *MODEL, "--data", str(data), "--output", str(tmp_path / "run"), "--epochs", "1",
                 "--batch-size", "4", "--merge-r", at, "--workers", "0"]) == 0
    pytest.importorskip("onnxscript")
    assert main(["export", *MODEL, "--r", at, "--output", str(tmp_path / "tuned.onnx")]) == 0


def test_a_schedule_runs_with_the_method_it_was_tuned_with_unless_told(tmp_path):
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"r": [3, 3, 2, 2], "method": "tome-attended", "prop_attn": False}))
    schedule = tokenmerge.load_schedule(path)
    state = tokenmerge.get_state(tokenmerge.apply(tiny(), r=schedule))
    assert (state.method, state.prop_attn) == ("tome-attended", False)
    assert tokenmerge.get_state(tokenmerge.apply(tiny(), r=schedule, method="tome")).method == "tome"
    setting = sweep_settings([schedule])[1]
    assert (setting.name, setting.method, setting.prop_attn) == (f"tome-attended r=@{path}", "tome-attended", False)
    assert sweep_settings([schedule], "tome")[1].method == "tome"


def test_a_schedule_tuned_for_another_depth_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "deep.json"
    path.write_text(json.dumps({"r": [8] * 12, "model": "vit_base_patch16_224"}))
    message = "was tuned for a 12-block model (vit_base_patch16_224), but this model has 6 blocks"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tokenmerge.apply(tiny(depth=6), r=tokenmerge.load_schedule(path))
    assert main(["bench", "--model", "vit_tiny_patch16_224", "--model-kwargs", "depth=6", "--r", f"@{path}"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("{not json", "is not JSON"),
    (json.dumps({"method": "tome"}), "holds no per-block schedule"),
    (json.dumps({"r": [1, -2]}), "holds no per-block schedule"),
    (json.dumps({"r": [1, 2], "prop_attn": "yes"}), "true or false"),
])
def test_unreadable_schedule_files_say_why(content, message, tmp_path):
    path = tmp_path / "schedule.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        schedules.parse(f"@{path}")


@pytest.mark.parametrize("target, message", [
    (["--speedup", "1"], "must be more than 1"),
    (["--speedup", "0.5"], "must be more than 1"),
    (["--flops", "0"], "expected a positive number"),
    (["--flops", "120%"], "below 100%"),
    (["--latency-ms", "-3"], "expected a positive number"),
])
def test_bad_targets_are_usage_errors(target, message, data, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["tune", *MODEL, "--data", str(data), *target, "--output", str(tmp_path / "s.json")])
    assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("target, message", [
    (["--flops", "0.001"], "cannot be reached: with every block merging as much as it can the model takes"),
    (["--flops", "50"], "the unpatched model takes"),
    (["--speedup", "40"], "cannot be reached here: with every block merging as much as it can the model is about"),
    (["--latency-ms", "1000"], "the unpatched model takes"),
])
def test_targets_merging_cannot_meet_say_what_it_can(target, message, data, tmp_path, capsys):
    output = tmp_path / "s.json"
    assert main(["tune", *MODEL, "--data", str(data), *target, *QUICK, "--output", str(output)]) == 2
    *progress, error = capsys.readouterr().err.strip().splitlines()
    assert message in error and error.startswith("tokenmerge tune: error:") and not output.exists()
    assert all(line.startswith("timing:") for line in progress)  # the FLOP line's timing, as it went


def test_a_model_without_a_class_token_is_tuned_with_tome_only(data, tmp_path):
    path = tmp_path / "gap.json"
    assert main(["tune", "--model", "vit_tiny_patch16_224", "--model-kwargs", "patch_size=8", "depth=4",
                 "class_token=False", "global_pool=avg", "--img-size", "64", "--data", str(data), "--flops", "70%",
                 *QUICK, "--output", str(path)]) == 0
    assert json.loads(path.read_text())["search"]["methods"] == ["tome"]


def test_schedules_are_fitted_to_a_flop_budget_keeping_their_shape():
    space = Space(tiny(depth=6), (64, 64))
    budget = 0.55 * space.flops([0] * 6)
    for slope in (1.0, 0.0, -1.0):
        r = space.shaped(slope, budget, "tome")
        assert 0.97 * budget <= space.flops(r) <= budget
    early, late = space.shaped(1.0, budget, "tome"), space.shaped(-1.0, budget, "tome")
    assert early[0] > early[-1] and late[0] < late[-1]
    assert space.fit([4] * 6, space.flops([4] * 6), "tome") == [4] * 6
    doubled = space.fit([2, 2, 2, 1, 1, 1], space.flops([4, 4, 4, 2, 2, 2]), "tome")
    assert doubled[:3] == [4, 4, 4] and space.flops(doubled) <= space.flops([4, 4, 4, 2, 2, 2])


def test_the_search_keeps_the_least_score_within_the_flop_budget():
    """No model is run or timed: a made-up score that prefers late merges and
    ``tome-attended``, and a clock that never moves, so only the moves end the search."""
    space = Space(tiny(depth=6), (64, 64))
    budget = 0.6 * space.flops([0] * 6)
    scored = {}

    def score(r, name):
        scored[tuple(r), name] = Score(sum((6 - i) * v for i, v in enumerate(r)) + (name == "tome"), 0.0)
        return scored[tuple(r), name]

    state = search(space, score, ["tome", "tome-attended"], budget, deadline=1.0, progress=False, clock=lambda: 0.0)
    assert state.scored == len(scored) > 2 * len(SLOPES)
    assert all(space.flops(r, variant(name)[0]) <= budget for r, name in scored)
    assert state.best.name == "tome-attended" and state.best.score == min(scored.values())
    assert state.best.score <= score(space.shaped(-1.0, budget, "tome-attended"), "tome-attended")


def test_the_search_stops_at_its_deadline():
    space = Space(tiny(depth=6), (64, 64))
    ticks = itertools.count()
    state = search(space, lambda r, name: Score(0.0, 0.0), ["tome"], 0.6 * space.flops([0] * 6), deadline=3.0,
                   progress=False, clock=lambda: float(next(ticks)))
    assert 1 <= state.scored < len(SLOPES)


def test_the_cost_line_goes_through_timings_and_measured_points():
    line = CostLine.fit([(1.0, 3.0), (2.0, 5.0), (3.0, 7.0)])
    assert (line.intercept, line.slope) == pytest.approx((1.0, 2.0))
    assert line.flops_for(5.0) == pytest.approx(2.0)
    assert line.through(2.0, 6.0).seconds(2.0) == pytest.approx(6.0)


@pytest.mark.parametrize("minutes, message", [
    ("inf", "expected a finite number"),
    ("nan", "expected a finite number"),
    ("0", "expected a positive number"),
    ("-1", "expected a positive number"),
])
def test_a_search_budget_must_be_positive_and_finite(minutes, message, data, tmp_path, capsys):
    output = tmp_path / "s.json"
    with pytest.raises(SystemExit) as info:
        main(["tune", *MODEL, "--data", str(data), "--flops", "60%", *QUICK, "--budget-minutes", minutes,
              "--output", str(output)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"--budget-minutes: {message}, got {minutes}" in err and not output.exists()
    with pytest.raises(ValueError, match="positive, finite number of minutes"):
        tuning.tune(tiny(), Space(tiny(), (64, 64)), torch.zeros(1, 3, 64, 64), Target("flops", 0.01), ["tome"],
                    float(minutes))


@pytest.mark.parametrize("spread, busy", [(0.0, False), (0.4, True)])
def test_an_unreachable_speedup_says_how_noisy_the_timings_were(spread, busy, data, tmp_path, capsys, monkeypatch):
    """Timings as a quiet and as a busy machine gives them: the same medians, every
    setting a little faster than the one before, and no spread or a wide one."""
    def timings(runners, inputs, runs, warmup, progress=True, description=""):
        rounds = [1 - spread, 1 - spread / 2, 1.0, 1 + spread / 2, 1 + spread]
        return {name: [(1 - 0.01 * index) * value for value in rounds] for index, name in enumerate(runners)}

    monkeypatch.setattr(measuring, "time_interleaved", timings)
    assert main(["tune", *MODEL, "--data", str(data), "--speedup", "50", *QUICK,
                 "--output", str(tmp_path / "s.json")]) == 2
    *progress, err = capsys.readouterr().err.strip().splitlines()
    assert "--speedup 50 cannot be reached here" in err and all(line.startswith("timing:") for line in progress)
    if busy:
        assert "vary by up to 60%" in err and "the machine was busy" in err and "more --runs" in err
    else:
        assert "the timings vary by up to 0% between runs" in err and "busy" not in err


def test_tuning_keeps_its_budget_with_every_timing_included():
    """The search, the final measurement (20 rounds asked, fewer where they do not fit)
    and a second one if the first is noisy all come out of the budget: a run asked
    for 9 seconds ends within 10% of them."""
    model, images = timm.create_model("vit_tiny_patch16_224", depth=4).eval(), torch.randn(8, 3, 224, 224)
    result = tuning.tune(model, Space(model, (224, 224)), images, Target("flops", 0.6), ["tome"], 0.15,
                         batch_size=8, runs=20, progress=False)
    assert result.seconds <= 1.1 * 9
    assert result.measured_spread_percent >= 0


def test_affordable_runs_shrink_to_the_budget_but_not_below_a_spread():
    from tokenmerge.tools.tuning.tuner import affordable_runs

    assert affordable_runs(20, pass_seconds=0.01, settings=9, budget_seconds=600) == 20
    assert affordable_runs(20, pass_seconds=1.0, settings=9, budget_seconds=120) == 5  # 0.3 * 120 / 9 - 2 = 2 -> 5
    assert affordable_runs(2, pass_seconds=1.0, settings=9, budget_seconds=120) == 2  # what the user asked for


def test_a_tuned_schedule_measured_slower_than_unpatched_is_written_with_a_warning(data, tmp_path, capsys,
                                                                                  monkeypatch):
    from tokenmerge.tools.tuning import tuner

    monkeypatch.setattr(tuner, "measure", lambda *args, **kwargs: measuring.Measured(0.54, 10.0, 3.0))
    output = tmp_path / "s.json"
    assert main(["tune", *MODEL, "--data", str(data), "--flops", "60%", *QUICK, "--output", str(output)]) == 0
    record = json.loads(output.read_text())
    assert record["measured_speedup"] == 0.54 and record["measured_spread_percent"] == 3.0
    assert "warning: the tuned schedule 0.54x measured slower than the unpatched model" in capsys.readouterr().err
