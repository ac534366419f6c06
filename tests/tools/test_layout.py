"""The tools' house: no command imports another, one registry names every library's
pieces, and the figures say what they show."""
import ast
import importlib
from pathlib import Path

import pytest

import tokenmerge
from tokenmerge.libraries import LIBRARIES

TOOLS = Path(tokenmerge.__file__).parent / "tools"
COMMANDS = {"bench", "evaluate", "compare", "tune", "visualize", "train", "export", "agree", "fidelity"}


def imported_tools(path: Path) -> set[str]:
    """The tools modules a file imports (first name below ``tokenmerge.tools``)."""
    names = set()
    package = path.relative_to(TOOLS).parts[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[:len(package) - node.level + 1]) + (node.module or "").split(".")
            elif (node.module or "").startswith("tokenmerge.tools."):
                base = node.module.split(".")[2:]
            else:
                continue
            base = [part for part in base if part]
            names |= {base[0]} if base else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {alias.name.split(".")[2] for alias in node.names if alias.name.startswith("tokenmerge.tools.")}
    return names


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_no_command_imports_another(command):
    files = sorted((TOOLS / command).rglob("*.py")) if (TOOLS / command).is_dir() else [TOOLS / f"{command}.py"]
    for path in files:
        assert not (imported_tools(path) & (COMMANDS - {command})), path


def test_the_core_imports_no_tool():
    entries = {"__main__.py", "visualize.py"}  # the command's entry point, and a documented import path
    for path in Path(tokenmerge.__file__).parent.rglob("*.py"):
        if TOOLS in path.parents or path.parent == TOOLS.parent and path.name in entries:
            continue
        text = path.read_text()
        assert "from .tools" not in text and "from tokenmerge.tools" not in text, path


@pytest.mark.parametrize("name", sorted(LIBRARIES))
def test_every_library_is_one_entry_naming_its_pieces(name):
    entry = LIBRARIES[name]
    module, function = entry.loader.split(":")
    assert callable(getattr(importlib.import_module(module), function))
    assert entry.adapter == f"tokenmerge.adapters.{name}"
    assert (Path(tokenmerge.__file__).parent / "adapters" / f"{name}.py").is_file()


def test_the_training_figure_plots_speed_and_learning_rate():
    from tokenmerge.tools.train.metrics import draw_metrics

    history = [{"epoch": e, "train_loss": 1.0 / e, "train_top1": 10.0 * e, "val_top1": 9.0 * e,
                "images_per_second": 30.0 + e, "lr": 1e-4 / e} for e in (1, 2)]
    labels = [ax.get_ylabel() for ax in draw_metrics(history, "run").axes]
    assert labels == ["training loss", "top-1 accuracy (%)", "training images / s", "learning rate (end of epoch)"]


def test_comparison_points_are_labelled_with_their_r():
    from tokenmerge.tools.compare import draw_comparison
    from tokenmerge.tools.evaluation import EvalRow

    def row(setting, r, speed):
        return EvalRow(setting, "tome", r, 10, 80.0, 90.0, 8, 9, 10, speed, 1.0)

    figure = draw_comparison([row("unpatched", "", 10.0), row("tome r=8", "8", 12.0), row("tome r=13", "13", 14.0)])
    assert sorted(text.get_text() for text in figure.axes[0].texts) == ["r=13", "r=8"]


def test_a_size_the_model_cannot_take_is_refused_before_timing():
    import timm

    from tokenmerge.tools.bench import benchmark

    model = timm.create_model("vit_tiny_patch16_224", depth=1)
    with pytest.raises(ValueError, match="cannot take 32x32 inputs"):
        benchmark(model, [2], img_size=(32, 32), runs=1, warmup=0, batch_size=1, progress=False)


def test_a_comparison_with_a_method_twice_measures_it_once():
    from tokenmerge.tools.settings import comparison_settings, unique

    kept, notes = unique(comparison_settings(["tome", "tome", "tome-no-prop-attn"], [8]))
    assert [setting.name for setting in kept] == ["unpatched", "tome r=8", "tome-no-prop-attn r=8"]
    assert notes == ["tome r=8 is given more than once; it is measured once"]
    kept, notes = unique(comparison_settings(["tome-no-prop-attn"], [8]) + comparison_settings(["tome"], [8], False))
    assert len(kept) == 2 and "the same as tome-no-prop-attn r=8" in notes[-1]
