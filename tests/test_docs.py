"""The README's Python examples run as printed, and the public API is typed."""
import inspect
import os
import re
from pathlib import Path

import pytest
import torch

import tokenmerge
from tests.conftest import CHECKPOINT, require_shared

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def run_block(block: str, folder: Path, names: dict | None = None) -> dict:
    names = dict(names or {})
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        exec(compile(block, "README.md", "exec"), names)
    finally:
        os.chdir(cwd)
    return names


def test_the_first_example_runs_offline_and_prints_what_the_readme_says(tmp_path, capsys):
    names = run_block(python_blocks()[0], tmp_path)
    assert names["logits"].shape == (8, 1000) and not tokenmerge.is_applied(names["model"])
    printed = capsys.readouterr().out.strip()
    assert f"prints `{printed}`" in README.read_text()


def test_the_local_checkpoint_recipe_loads_the_weights(tmp_path):
    require_shared()
    block = next(block for block in python_blocks() if "augreg_in21k_ft_in1k.safetensors" in block)
    assert '"/path/to/' in block  # a path the reader replaces, not a bare name that fails where copied
    model = run_block("import timm\n" + block.replace("/path/to/", f"{CHECKPOINT.parent}/"), tmp_path)["model"]
    from safetensors.torch import load_file

    assert torch.equal(model.head.weight, load_file(CHECKPOINT)["head.weight"])


def test_the_fine_tuned_recipe_keeps_the_classifier(tmp_path):
    import timm
    from safetensors.torch import save_file

    tuned = timm.create_model("vit_tiny_patch16_224", num_classes=10)
    (tmp_path / "runs" / "ft").mkdir(parents=True)
    save_file(tuned.state_dict(), tmp_path / "runs" / "ft" / "model.safetensors")
    block = next(block for block in python_blocks() if "runs/ft/model.safetensors" in block)
    model = run_block("import timm\n" + block, tmp_path)["model"]
    assert torch.equal(model.head.weight, tuned.head.weight)


PUBLIC = [*(getattr(tokenmerge, name) for name in tokenmerge.__all__ if inspect.isfunction(getattr(tokenmerge, name)))]


@pytest.mark.parametrize("function", PUBLIC + ["tools"], ids=lambda f: getattr(f, "__name__", f))
def test_public_functions_are_typed(function):
    if function == "tools":
        from tokenmerge.tools.bench import benchmark
        from tokenmerge.tools.evaluate import evaluate
        from tokenmerge.tools.models import load_model
        from tokenmerge.tools.train import train
        from tokenmerge.tools.visualize import visualize

        functions = [benchmark, evaluate, load_model, train, visualize]
    else:
        functions = [function]
    for item in functions:
        signature = inspect.signature(item)
        untyped = [name for name, parameter in signature.parameters.items()
                   if parameter.annotation is inspect.Parameter.empty and parameter.kind not in (
                       inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
        assert not untyped and signature.return_annotation is not inspect.Signature.empty, (item.__name__, untyped)


def test_the_compile_recipe_compiles_the_patched_model(tmp_path):
    import textwrap

    from tests.adapters.test_contract import CASES_BY_ID, make

    block = next(block for block in python_blocks() if "tokenmerge.compile(model)" in block)
    names = run_block(textwrap.dedent(block), tmp_path, {"model": make(CASES_BY_ID["timm_class_token"]),
                                                         "tokenmerge": tokenmerge})
    assert isinstance(names["fast"], torch._dynamo.eval_frame.OptimizedModule)
    assert tokenmerge.get_state(names["fast"]).r == 13
