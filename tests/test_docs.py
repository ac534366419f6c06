"""The Python examples of the README and of every documentation page run as written:
page by page, in order, each page's examples sharing their names as a reader's session
would, and an example followed by "prints `...`" prints exactly that; and the warnings a
page records under a command's table are those the command prints for that table now."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import tokenmerge
from tests.conftest import CHECKPOINT, require_shared

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
EXAMPLE = re.compile(r"```python\n(.*?)```\n(?:\s*\n(?:It )?prints `([^`]*)`)?", re.S)
#: Libraries an example may need that a minimal install lacks: their pages skip, saying so.
OPTIONAL = {"transformers", "onnxruntime", "onnx", "onnxscript", "open_clip", "torchvision"}


@dataclass(frozen=True)
class Example:
    page: Path
    code: str
    prints: str | None


def examples(page: Path) -> list[Example]:
    return [Example(page, textwrap.dedent(code), prints) for code, prints in EXAMPLE.findall(page.read_text())]


ALL = [example for page in PAGES for example in examples(page)]

#: Examples that need a file or a model made for them run in their own tests below,
#: found by a line they contain.
RUN_APART = {
    "pretrained_cfg_overlay=dict(file=weights)": "test_the_local_checkpoint_recipe_loads_the_weights",
    "runs/ft/model.safetensors": "test_the_fine_tuned_recipe_keeps_the_classifier",
    "fast = tokenmerge.compile(model)": "test_the_compile_recipe_compiles_the_patched_model",
    'tokenmerge.load_schedule("vit-tiny-1.5x.json")': "test_the_tuned_schedule_recipe_applies_the_file",
    'folder = "llava-1.5-7b-hf"': "test_the_vision_language_recipe_reduces_a_saved_llava",
    'folder = "stable-diffusion-v1-5"': "test_the_diffusion_recipe_merges_a_saved_pipeline",
    "found = measure_fidelity(pipe": "test_the_fidelity_recipe_measures_a_saved_pipeline",
}


def run_apart(example: Example) -> bool:
    return any(line in example.code for line in RUN_APART)


def run(code: str, folder: Path, names: dict) -> str:
    """Run ``code`` in ``folder`` with ``names`` (updated), returning what it printed."""
    printed = io.StringIO()
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(printed):
            exec(compile(code, "example", "exec"), names)
    except ModuleNotFoundError as error:
        if error.name not in OPTIONAL:
            raise
        pytest.skip(f"needs {error.name}, which is not installed")
    finally:
        os.chdir(cwd)
    return printed.getvalue()


def the_one(line: str) -> Example:
    (example,) = [example for example in ALL if line in example.code]
    return example


def run_on_its_page(example: Example) -> bool:
    """Whether the page test runs ``example``: not where a test of its own does, nor
    where an earlier page opens with the same self-contained example (the README's
    first example is also the first of Getting started)."""
    first_of_earlier_pages = [examples(page)[0].code for page in PAGES[:PAGES.index(example.page)] if examples(page)]
    repeated = example == examples(example.page)[0] and example.code in first_of_earlier_pages
    return not run_apart(example) and not repeated


@pytest.mark.parametrize("page", sorted({example.page for example in ALL}), ids=lambda page: page.name)
def test_the_examples_of_a_page_run_in_order_and_print_what_it_says(page, tmp_path):
    names: dict = {}
    for example in examples(page):
        if not run_on_its_page(example):
            continue
        printed = run(example.code, tmp_path, names)
        if example.prints is not None:
            assert printed.strip() == example.prints, example.code


def test_the_readme_opens_with_an_example_that_says_what_it_prints():
    first = examples(ROOT / "README.md")[0]
    assert first.prints and "tokenmerge.apply" in first.code and "tokenmerge.remove" in first.code


def test_every_example_run_apart_exists_and_has_its_test():
    for line, test in RUN_APART.items():
        the_one(line)
        assert callable(globals()[test])


def test_the_local_checkpoint_recipe_loads_the_weights(tmp_path):
    require_shared()
    example = the_one("pretrained_cfg_overlay=dict(file=weights)")
    assert '"/path/to/' in example.code  # a path the reader replaces, not a bare name that fails where copied
    code = example.code.replace("/path/to/", f"{CHECKPOINT.parent}/")
    names: dict = {}
    run(code, tmp_path, names)
    from safetensors.torch import load_file

    assert torch.equal(names["model"].head.weight, load_file(CHECKPOINT)["head.weight"])


def test_the_fine_tuned_recipe_keeps_the_classifier(tmp_path):
    import timm
    from safetensors.torch import save_file

    tuned = timm.create_model("vit_tiny_patch16_224", num_classes=10)
    (tmp_path / "runs" / "ft").mkdir(parents=True)
    save_file(tuned.state_dict(), tmp_path / "runs" / "ft" / "model.safetensors")
    names: dict = {}
    run(the_one("runs/ft/model.safetensors").code, tmp_path, names)
    assert torch.equal(names["model"].head.weight, tuned.head.weight)


def test_the_compile_recipe_compiles_the_patched_model(tmp_path):
    from tests.adapters.test_contract import CASES_BY_ID, make

    names = {"model": make(CASES_BY_ID["timm_class_token"]), "tokenmerge": tokenmerge}
    run(the_one("fast = tokenmerge.compile(model)").code, tmp_path, names)
    assert isinstance(names["fast"], torch._dynamo.eval_frame.OptimizedModule)
    assert tokenmerge.get_state(names["fast"]).r == 13


def test_the_tuned_schedule_recipe_applies_the_file(tmp_path):
    import timm

    r = [8, 10, 11, 14, 15, 18, 18, 20, 21, 21, 19, 6]
    (tmp_path / "vit-tiny-1.5x.json").write_text(json.dumps(
        {"r": r, "method": "tome-attended", "prop_attn": True, "model": "vit_tiny_patch16_224"}))
    names = {"model": timm.create_model("vit_tiny_patch16_224").eval(), "tokenmerge": tokenmerge}
    run(the_one('tokenmerge.load_schedule("vit-tiny-1.5x.json")').code, tmp_path, names)
    state = tokenmerge.get_state(names["model"])
    assert list(state.r) == r and state.method == "tome-attended"


def test_the_vision_language_recipe_reduces_a_saved_llava(tmp_path):
    """The recipe on a tiny random LLaVA saved as the folder it names (64 tokens per image,
    so it keeps 16 of them instead of 144 of 576), with a photo of its own."""
    pytest.importorskip("transformers")
    from tests.adapters.vlm_models import FAMILIES, make, pictures

    model, processor = make(FAMILIES[0])
    model.save_pretrained(tmp_path / "llava-1.5-7b-hf")
    processor.save_pretrained(tmp_path / "llava-1.5-7b-hf")
    pictures(1)[0].save(tmp_path / "photo.jpg")
    example = the_one('folder = "llava-1.5-7b-hf"')
    assert example.prints == "[(576, 144)]"
    printed = run(example.code.replace("visual_tokens=144", "visual_tokens=16"), tmp_path, {})
    assert printed.strip() == "[(64, 16)]"


def test_the_diffusion_recipe_merges_a_saved_pipeline(tmp_path):
    """The recipe on a tiny random Stable Diffusion pipeline saved as the folder it names,
    in two steps instead of thirty."""
    from tests.adapters.diffusion_models import tiny_pipeline

    tiny_pipeline().save_pretrained(tmp_path / "stable-diffusion-v1-5")
    example = the_one('folder = "stable-diffusion-v1-5"')
    names: dict = {}
    printed = run(example.code.replace("num_inference_steps=30", "num_inference_steps=2"), tmp_path, names)
    assert printed.strip() == example.prints == "1"
    assert not tokenmerge.is_applied(names["pipe"]) and names["image"].size == (32, 32)


def test_the_fidelity_recipe_measures_a_saved_pipeline(tmp_path):
    """The recipe on the tiny pipeline above, in two steps and of one seed."""
    from tests.adapters.diffusion_models import tiny_pipeline

    tiny_pipeline().save_pretrained(tmp_path / "stable-diffusion-v1-5")
    code = the_one("found = measure_fidelity(pipe").code
    code = code.replace("seeds=[0, 1, 2, 3, 4]", "seeds=[0], warmup=0").replace('"num_inference_steps": 30',
                                                                             '"num_inference_steps": 2')
    printed = run(code, tmp_path, {})
    unmerged, merged = printed.strip().splitlines()
    assert unmerged.startswith("unmerged: PSNR inf dB, SSIM 1.000, 1.00x") and merged.startswith("ratio=0.5: PSNR ")


#: A command's output as the pages record it: the command line, its table, its warnings.
RECORDED = re.compile(r"```\n(\$ tokenmerge (bench|eval|compare) .*?)```", re.S)


def recorded_runs() -> list[tuple[str, str, str]]:
    """(page, command, output) of every recorded bench, eval and compare run with a
    table, but for runs on a GPU, which this machine cannot print again."""
    return [(page.name, command, output) for page in PAGES for output, command in RECORDED.findall(page.read_text())
            if "--device cuda" not in output and "-----" in output]


def table_rows(lines: list[str]) -> list[dict[str, str]]:
    """The rows of the table in ``lines``, by the spans of its dashed rule."""
    rule = next(index for index, line in enumerate(lines) if set(line) == {"-", " "})
    spans = [match.span() for match in re.finditer(r"-+", lines[rule])]
    header = [lines[rule - 1][start:end].strip() for start, end in spans]
    rows = []
    for line in lines[rule + 1:]:
        if line.startswith(("tokenmerge ", "wrote ")):
            break
        rows.append(dict(zip(header, (line[start:end].strip() for start, end in spans))))
    return rows


def warnings_for(command: str, rows: list[dict[str, str]], first_line: str) -> list[str]:
    from tokenmerge.tools.bench import BenchRow, bench_warnings
    from tokenmerge.tools.evaluation import MORE_BATCHES
    from tokenmerge.tools.timing import speed_warnings

    if command == "bench":
        runs = int(re.search(r"(\d+) timed rounds", first_line).group(1))
        bench = [BenchRow(row["setting"], [], 0, 0.0, 0.0, float(row["img/s"]), float(row["IQR %"]), 0.0,
                          float(row["speed-up"]), float(row["of limit"].rstrip("%")) / 100 if row.get("of limit")
                          else None) for row in rows]
        return bench_warnings(bench, runs)
    return speed_warnings({row["setting"]: float(row["speed-up"]) for row in rows[1:]},
                          {row["setting"]: float(row["IQR %"]) for row in rows}, remedy=MORE_BATCHES)


@pytest.mark.parametrize("page, command, output", recorded_runs(), ids=lambda value: str(value)[:20])
def test_the_warnings_a_page_records_are_those_the_command_prints_for_its_table(page, command, output):
    lines = output.splitlines()
    recorded = [line.removeprefix(f"tokenmerge {command}: warning: ") for line in lines
                if line.startswith(f"tokenmerge {command}: warning: ")]
    assert recorded == warnings_for(command, table_rows(lines), lines[1] if command == "bench" else "")
