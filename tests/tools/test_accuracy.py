"""The counters every tool shares: top-1/top-5 hits and the fidelity measures (top-1
differences from a reference model and the KL divergence from its outputs), against
hand-computed figures, and the fidelity columns of ``eval`` and ``compare``, with and
without labels."""
import json
import math

import pytest
import torch

from tests.conftest import make_class_folder
from tokenmerge.tools.accuracy import correct_predictions, disagreements, kl_divergence_sum
from tokenmerge.tools.cli import main

TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "depth=4", "--batch-size", "4"]


def test_fidelity_against_a_hand_computed_example():
    reference = torch.tensor([[math.log(0.5), math.log(0.5), -1e9], [3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    model = torch.tensor([[math.log(0.25), math.log(0.75), -1e9], [3.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    # image 1: top-1 0 -> 1, KL = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln(4/3); image 2: the same outputs;
    # image 3: the two top logits swap, KL = (p2 - p3)(2 - 1) with p = softmax(0, 2, 1)
    p = torch.tensor([0.0, 2.0, 1.0]).double().softmax(0)
    assert disagreements(model, reference) == 2
    assert kl_divergence_sum(model, reference) == pytest.approx(0.5 * math.log(4 / 3) + float(p[1] - p[2]), rel=1e-6)
    assert disagreements(reference, reference) == 0 and kl_divergence_sum(reference, reference) == 0.0
    assert disagreements(model[:0], reference[:0]) == 0 and kl_divergence_sum(model[:0], reference[:0]) == 0.0


def test_images_without_a_label_count_in_no_accuracy():
    logits = torch.tensor([[0.0, 5.0, 1.0], [2.0, 0.0, 1.0]])
    assert correct_predictions(logits, torch.tensor([1, -1])) == (1, 1)


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    return make_class_folder(tmp_path_factory.mktemp("classes"), ["ant", "bee", "cat"], 3)


def test_eval_reports_the_fidelity_of_every_setting(class_folder, tmp_path, capsys):
    root, class_map = class_folder
    output = tmp_path / "eval.json"
    assert main(["eval", *TINY, "--data", str(root), "--class-map", str(class_map), "--num-classes", "3",
                 "--r", "0,8", "--output", str(output)]) == 0
    assert "note: the model has random weights (no --checkpoint), so its top-1" in capsys.readouterr().err
    rows = {row["setting"]: row for row in json.loads(output.read_text())["rows"]}
    for setting in ("unpatched", "r=0"):  # r=0 gives the unpatched outputs exactly
        assert rows[setting]["disagreement"] == 0 and rows[setting]["kl"] == 0 and rows[setting]["disagreeing"] == 0
    merged = rows["r=8"]
    assert merged["kl"] > 0 and 0 <= merged["disagreeing"] <= merged["images"] == 9
    assert merged["disagreement"] == pytest.approx(100 * merged["disagreeing"] / 9)


def test_a_folder_without_labels_gets_the_fidelity_only(class_folder, tmp_path, capsys):
    root, _ = class_folder
    flat = tmp_path / "flat"
    flat.mkdir()
    for index, path in enumerate(sorted(root.rglob("*.png"))):
        (flat / f"{index}.png").write_bytes(path.read_bytes())
    for args in (["--data", str(flat)], ["--data", str(root), "--no-labels"]):
        output = tmp_path / "compare.json"
        assert main(["compare", *TINY, *args, "--methods", "tome,random", "--r", "8", "--output", str(output),
                     "--plot", str(tmp_path / "compare.png")]) == 0
        out = capsys.readouterr().out
        assert "no labels" in out.splitlines()[0] and "differs %" in out and "top-1 %" not in out
        rows = json.loads(output.read_text())["rows"]
        assert [row["images"] for row in rows] == [9, 9, 9] and all(row["top1"] is None for row in rows)
        assert rows[0]["kl"] == 0 and rows[1]["kl"] > 0 and rows[2]["kl"] > 0


def test_class_folders_not_named_by_synsets_point_to_no_labels(class_folder, capsys):
    root, _ = class_folder
    assert main(["eval", *TINY, "--data", str(root), "--r", "8"]) == 2
    assert "--no-labels" in capsys.readouterr().err


def test_one_batch_is_timed_again_until_every_setting_has_enough_repetitions_for_a_spread():
    """A run of one batch (50 images, batch 64) once gave every setting one timing and
    a speed-up of pure noise; every setting now has at least MIN_TIMED_ROUNDS timings,
    interleaved, and its row the median and spread of them."""
    import timm

    from tokenmerge.tools.evaluation import Setting, tally_batches
    from tokenmerge.tools.settings import UNPATCHED
    from tokenmerge.tools.timing import MIN_TIMED_ROUNDS

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3).eval()
    settings = [Setting(UNPATCHED), Setting("r=2", 2)]
    batch = (torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]), [])
    tallies, _ = tally_batches(model, [batch], settings, torch.device("cpu"), progress=False, total=4)
    assert [len(tally.per_image) for tally in tallies.values()] == [MIN_TIMED_ROUNDS] * 2
    assert tallies["r=2"].images == 4  # the repetitions time, they do not count again


def test_speed_figures_that_are_noise_or_below_one_are_named_in_a_warning():
    from tokenmerge.tools.timing import speed_warnings

    assert speed_warnings({"r=8": 1.4}, {"unpatched": 3.0, "r=8": 4.0}) == []
    noisy, slower = speed_warnings({"r=0": 0.98, "r=8": 1.4}, {"unpatched": 3.0, "r=0": 2.0, "r=8": 25.0})
    assert "r=8" in noisy and "25%" in noisy and "r=0" not in noisy
    assert slower.startswith("r=0 0.98x measured slower than the unpatched model")


def test_eval_rows_carry_their_spread_and_the_command_warns_about_noise(class_folder, tmp_path, capsys, monkeypatch):
    import tokenmerge
    from tokenmerge.tools import evaluation

    # a machine on which the merged setting looks slower than the unpatched model, its timings varying widely
    merged = iter([0.02, 0.05, 0.03, 0.09, 0.02, 0.04] * 50)

    def seconds(network):
        return next(merged) if tokenmerge.is_applied(evaluation.unwrap(network)) else 0.01

    monkeypatch.setattr(evaluation, "timed", lambda model, images: (model(images), seconds(model)))
    monkeypatch.setattr(evaluation, "time_interleaved",
                        lambda runners, images, runs, warmup, progress, description:
                        {name: [(0.01 if name == "unpatched" else next(merged)) for _ in range(runs)]
                         for name in runners})
    root, class_map = class_folder
    output = tmp_path / "eval.json"
    assert main(["eval", *TINY, "--data", str(root), "--class-map", str(class_map), "--num-classes", "3",
                 "--r", "8", "--output", str(output)]) == 0
    rows = {row["setting"]: row for row in json.loads(output.read_text())["rows"]}
    assert rows["r=8"]["iqr_percent"] > 10 and rows["r=8"]["speedup"] < 1
    err = capsys.readouterr().err
    assert "warning: the timings of every setting vary" in err and "measured slower than the unpatched model" in err
    assert "measure again on more images (every batch is one timing)" in err and "--runs" not in err
