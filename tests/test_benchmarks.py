"""Every benchmark script starts: its imports resolve and its options parse (the
measurements themselves take minutes and are not run here)."""
from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(path for path in BENCHMARKS.glob("*.py") if "__main__" in path.read_text())


def test_every_measuring_script_is_found():
    assert {path.name for path in SCRIPTS} >= {"speed.py", "onnx_speed.py", "train_speed.py", "tune_fidelity.py",
                                              "merge_rules.py", "rope_rules.py", "dense_fidelity.py"}


@pytest.mark.parametrize("script", SCRIPTS, ids=[path.stem for path in SCRIPTS])
def test_the_script_imports_and_prints_its_options(script, monkeypatch, capsys):
    """Run as ``python SCRIPT --help`` would run it, in this process (a fresh one
    would spend seconds importing torch again for every script)."""
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    monkeypatch.setattr(sys, "path", [str(script.parent), *sys.path])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code in (0, None)
    printed = capsys.readouterr().out
    assert printed.startswith("usage:") and "--" in printed


#: The table header every section of benchmarks/gpu.py prints, in order.
GPU_SECTIONS = {
    "eager-throughput": "| dtype | setting | tokens left | img/s | IQR % | speed-up | limit img/s | of limit |",
    "eager-latency": "| model | setting | tokens left | ms | IQR % | speed-up |",
    "training": "| setting | img/s | ms/step | IQR % | speed-up | of limit |",
    "attention": "| dtype | tokens | formulation | default µs | IQR % | flash µs |",
    "compiled-latency": "| model | setting | tokens left | ms | IQR % | speed-up | compile s |",
    "compiled-throughput": "| dtype | setting | tokens left | img/s | IQR % | speed-up | limit img/s | of limit | "
                           "compile s |",
}


def test_the_gpu_script_runs_every_section_small_on_the_cpu():
    """``gpu.py --smoke``: tiny models, float32, the CPU; every section prints its table
    (the attention one says it is skipped where no formulation= exists), none fails."""
    import inspect

    from tokenmerge.attention import proportional_attention

    done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu.py"), "--smoke"], capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "FAILED" not in done.stdout
    chunks = done.stdout.split("\n## ")[1:]
    assert [chunk.split("(", 1)[1].split(")", 1)[0] for chunk in chunks] == list(GPU_SECTIONS)
    has_formulations = "formulation" in inspect.signature(proportional_attention).parameters
    for chunk, (section, header) in zip(chunks, GPU_SECTIONS.items()):
        if section == "attention" and not has_formulations:
            assert "_skipped: " in chunk
            continue
        assert header in chunk, f"{section}:\n{chunk}"
        assert "| r=13 |" in chunk or section == "attention"


def test_the_speed_script_prints_its_table_on_a_tiny_run():
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "speed.py"), "--model", "vit_tiny_patch16_224", "--batch-sizes", "1",
         "--r", "16", "--runs", "2", "--warmup", "1", "--threads", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "| batch | setting | img/s | IQR % | speed-up | limit img/s | of limit |\n" in done.stdout
    assert "| 1 | r=16 |" in done.stdout
