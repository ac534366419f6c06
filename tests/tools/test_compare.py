"""``tokenmerge compare``: every method at every r against the unpatched model in one
run, a table, JSON and a figure with one curve per method; clear errors."""
import dataclasses
import json

import pytest
import torch

from tests.conftest import make_class_folder
from tokenmerge import methods
from tokenmerge.tools.cli import main
from tokenmerge.tools.compare import curves, point_label
from tokenmerge.tools.evaluation import evaluate_settings
from tokenmerge.tools.options import parse_methods
from tokenmerge.tools.settings import UNPATCHED, Setting, comparison_settings, merging, variant, variants

CLASSES = ["ant", "bee", "cat"]


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    return make_class_folder(tmp_path_factory.mktemp("classes"), CLASSES, 3)


def test_settings_are_the_unpatched_model_then_every_method_at_every_r():
    settings = comparison_settings(["tome", "tome-no-prop-attn", "evit"], [4, 8])
    assert settings[0] == Setting(UNPATCHED)
    assert [(s.name, s.method, s.prop_attn) for s in settings[1:]] == [
        ("tome r=4", "tome", True), ("tome r=8", "tome", True),
        ("tome-no-prop-attn r=4", "tome", False), ("tome-no-prop-attn r=8", "tome", False),
        ("evit r=4", "evit", True), ("evit r=8", "evit", True),
    ]


def test_compare_writes_a_row_per_setting_and_a_curve_per_method(class_folder, tmp_path):
    root, class_map = class_folder
    output, plot = tmp_path / "compare.json", tmp_path / "compare.png"
    methods = "tome,tome-no-prop-attn,random,evit-fuse"
    assert main(["compare", "--model", "vit_tiny_patch16_224", "--data", str(root), "--class-map", str(class_map),
                 "--methods", methods, "--r", "4,8", "--batch-size", "5", "--num-classes", "3", "--output", str(output),
                 "--plot", str(plot)]) == 0
    rows = json.loads(output.read_text())["rows"]
    assert [row["setting"] for row in rows] == ["unpatched"] + [
        f"{m} r={r}" for m in methods.split(",") for r in (4, 8)]
    assert {row["images"] for row in rows} == {9}
    by_setting = {row["setting"]: row for row in rows}
    assert by_setting["tome r=8"]["tokens_left"] == by_setting["random r=8"]["tokens_left"] == 197 - 12 * 8
    assert by_setting["tome-no-prop-attn r=4"]["method"] == "tome without prop_attn"
    assert by_setting["evit-fuse r=4"]["r"] == "4"
    assert plot.stat().st_size > 10_000


def test_curves_group_rows_by_method():
    from tokenmerge.tools.evaluation import EvalRow

    def row(setting, r):
        return EvalRow(setting, "", r, 10, 50.0, 80.0, 1, 2, 2, 10.0, 1.0)

    rows = [row("unpatched", ""), row("tome r=4", "4"), row("tome r=8", "8"), row("evit-fuse r=4", "4"),
            row("tome r=@runs/tuned.json", "@runs/tuned.json")]
    grouped = curves(rows)
    assert list(grouped) == ["tome", "evit-fuse", "tome, tuned"] and [r.r for r in grouped["tome"]] == ["4", "8"]
    assert [point_label(r) for r in grouped["tome"] + grouped["tome, tuned"]] == ["r=4", "r=8", "tuned.json"]


def test_unknown_method_is_a_usage_error_listing_the_known_ones(class_folder, capsys):
    root, _ = class_folder
    with pytest.raises(SystemExit):
        main(["compare", "--model", "vit_tiny_patch16_224", "--data", str(root), "--methods", "tome,pruning"])
    err = capsys.readouterr().err
    assert "unknown method pruning" in err and ", ".join(variants()) in err


def test_the_first_setting_must_be_the_unpatched_model():
    with pytest.raises(ValueError, match="first setting must be the unpatched model"):
        evaluate_settings(torch.nn.Identity(), [(torch.zeros(3), 0)], [Setting("tome r=4", 4)])


def test_the_variants_are_every_method_and_every_merging_one_without_proportional_attention():
    assert {name: variants()[name] for name in (
        "tome", "tome-no-prop-attn", "tome-attended", "tome-random-split", "tome-unweighted", "tome-features",
        "random", "evit", "evit-fuse")} == {
        "tome": ("tome", True), "tome-no-prop-attn": ("tome", False), "tome-attended": ("tome-attended", True),
        "tome-random-split": ("tome-random-split", True), "tome-unweighted": ("tome-unweighted", True),
        "tome-features": ("tome-features", True), "random": ("random", True), "evit": ("evit", True),
        "evit-fuse": ("evit-fuse", True)}
    assert {name for name, (_, prop_attn) in variants().items() if not prop_attn} == {
        f"{name}-no-prop-attn" for name, method in methods.METHODS.items() if method.merges}
    assert "cut" not in variants() and "evit-no-prop-attn" not in variants()
    assert merging("tome-features-no-prop-attn") and not merging("evit-fuse") and not merging("tome, tuned")


def test_a_registered_method_is_a_variant_of_every_command():
    methods.register("evit-again", dataclasses.replace(methods.resolve("evit")))
    methods.register("tome-again", dataclasses.replace(methods.resolve("tome")))
    try:
        assert parse_methods("evit-again,tome-again-no-prop-attn") == ["evit-again", "tome-again-no-prop-attn"]
        assert "evit-again-no-prop-attn" not in variants()
        assert variant("tome-again-no-prop-attn") == ("tome-again", False)
        settings = comparison_settings(["evit-again", "tome-again-no-prop-attn"], [4])
        assert [(s.name, s.method, s.prop_attn) for s in settings[1:]] == [
            ("evit-again r=4", "evit-again", True), ("tome-again-no-prop-attn r=4", "tome-again", False)]
    finally:
        methods.unregister("evit-again")
        methods.unregister("tome-again")
    assert "tome-again" not in variants()
