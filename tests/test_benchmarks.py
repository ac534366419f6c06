"""Every benchmark script starts: its imports resolve and its options parse (the
measurements themselves take minutes and are not run here)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(path for path in BENCHMARKS.glob("*.py") if "__main__" in path.read_text())


def test_every_measuring_script_is_found():
    assert {path.name for path in SCRIPTS} >= {"speed.py", "onnx_speed.py", "train_speed.py", "tune_fidelity.py",
                                              "merge_rules.py"}


@pytest.mark.parametrize("script", SCRIPTS, ids=[path.stem for path in SCRIPTS])
def test_the_script_imports_and_prints_its_options(script):
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:") and "--" in done.stdout
