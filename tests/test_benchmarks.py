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


def test_the_vlm_script_prints_every_setting_at_tiny_widths(monkeypatch, capsys):
    """``vlm.py --quick``: LLaVA-1.5 and Qwen2.5-VL at tiny widths but the real token
    counts (576 and 256 visual tokens), every setting a row with the counts the
    processor gave it, ratios to the unpatched model, and Qwen2.5-VL's refusal of ``r``."""
    pytest.importorskip("transformers")
    script = BENCHMARKS / "vlm.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--quick", "--runs", "2", "--warmup", "1", "--threads", "1"])
    monkeypatch.setattr(sys, "path", [str(script.parent), *sys.path])
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    header = lines.index("| model | setting | visual tokens | prompt tokens | TTFT ms | TTFT ratio | IQR | "
                         "prefill ms | prefill ratio | IQR | reduction ms | of prefill | KV cache MiB | KV ratio |")
    rows = [line.strip("|").split(" | ") for line in lines[header + 2:] if line.startswith("| ")]
    cells = [(row[0].strip(), row[1], int(row[2]), int(row[3]), row[5], row[13].strip()) for row in rows]
    # 50 text tokens around the image (Qwen2.5-VL's also has its vision start and end tokens); LLaVA's tower
    # merges in the 2 of its 3 layers the model reads (CLIP's class token dropped after)
    assert [(model, setting, visual, prompt) for model, setting, visual, prompt, *_ in cells] == [
        ("LLaVA-1.5-7B", "unpatched", 576, 626), ("LLaVA-1.5-7B", "visual_tokens=576 (all)", 576, 626),
        ("LLaVA-1.5-7B", "visual_tokens=144", 144, 194), ("LLaVA-1.5-7B", "visual_tokens=64", 64, 114),
        ("LLaVA-1.5-7B", "r=8", 560, 610), ("LLaVA-1.5-7B", "r=16", 544, 594),
        ("Qwen2.5-VL-7B", "unpatched", 256, 308), ("Qwen2.5-VL-7B", "visual_tokens=256 (all)", 256, 308),
        ("Qwen2.5-VL-7B", "visual_tokens=144", 144, 196), ("Qwen2.5-VL-7B", "visual_tokens=64", 64, 116),
    ]
    for model, setting, _, prompt, ttft_ratio, kv_ratio in cells:
        base = 626 if model.startswith("LLaVA") else 308
        assert kv_ratio == f"{prompt / base:.3f}"  # the cache holds every prompt token
        assert setting != "unpatched" or ttft_ratio == "1.000"
    assert printed.count("r=8: refused: tokenmerge cannot merge inside Qwen2.5-VL's vision tower") == 1
    assert "- LLaVA-1.5-7B: decoder of 2 of 4 layers built and timed, scaled to 4" in lines
    assert any(line.startswith("- target TTFT at 144 of 576 visual tokens <= 0.40") for line in lines)


def test_the_dit_reduction_script_prints_every_strategy_at_tiny_widths(monkeypatch, capsys):
    """``dit_reduction.py`` at tiny widths: a row per family, strategy and ratio, with the
    distance to the unreduced output (nonzero: every strategy reduces) and the time ratio."""
    pytest.importorskip("diffusers")
    script = BENCHMARKS / "dit_reduction.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--width", "32", "--grid", "8", "--layers", "1", "--repeats", "1",
                                      "--ratios", "0.5", "--families", "sd3,flux", "--threads", "1"])
    monkeypatch.setattr(sys, "path", [str(script.parent), *sys.path])
    runpy.run_path(str(script), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    header = lines.index("| family | strategy | ratio | rel. L2 | PSNR (dB) | time / unreduced |")
    rows = [line.strip("| ").split(" | ") for line in lines[header + 2:] if line.startswith("| ")]
    assert [(row[0], row[1], row[2]) for row in rows] == [
        (family, strategy, "0.5") for family in ("sd3", "flux")
        for strategy in ("merge-attn", "merge-all", "kv", "kv-proportional")]
    assert all(float(row[3]) > 0 and float(row[5]) > 0 for row in rows)
