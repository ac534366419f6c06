"""``tokenmerge fidelity`` on a tiny random Stable Diffusion pipeline saved with
save_pretrained: a ratio that merges nothing gives the unmerged images exactly (PSNR
infinite, SSIM 1), the images and files are right, bad input is one line before any
work, and PSNR and SSIM are the standard ones. (Random weights: what this checks is
the mechanics, not the quality of any setting.)"""
import csv
import math
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from tokenmerge.tools import fidelity
from tokenmerge.tools.cli import main
from tokenmerge.tools.fidelity import UNMERGED, Result, frames_of, load_lpips, psnr, ssim, summarize, warnings_of

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from tests.adapters.diffusion_models import SIZE, tiny_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline") / "sd"
    tiny_pipeline().save_pretrained(folder)
    return folder


def run_fidelity(capsys, *args):
    try:
        status = main(["fidelity", *map(str, args), "--steps", "2", "--size", str(SIZE), "--warmup", "0"])
    except SystemExit as error:  # argparse's refusal of an option's value
        status = error.code
    out, err = capsys.readouterr()
    return status, out, err


def table_rows(out):
    """The rows of the printed table, by setting: the cells after the setting's name."""
    lines = [line.split() for line in out.splitlines()[3:] if line.strip()]
    return {line[0]: line[1:] for line in lines}


def test_a_ratio_of_zero_gives_the_unmerged_images_exactly(saved, capsys, tmp_path):
    images, output = tmp_path / "images", tmp_path / "scores.csv"
    status, out, err = run_fidelity(capsys, saved, "--prompt", "a cat", "--prompt", "a dog", "--seeds", "3",
                                    "--ratio", "0,0.5", "--output-dir", images, "--output", output)
    assert status == 0, err
    rows = table_rows(out)
    assert set(rows) == {UNMERGED, "ratio=0", "ratio=0.5"}
    for setting in (UNMERGED, "ratio=0"):
        samples, decibels, similarity = rows[setting][:3]
        assert (samples, decibels, similarity) == ("2", "inf", "1.0000"), setting
    assert math.isfinite(float(rows["ratio=0.5"][1])) and float(rows["ratio=0.5"][2]) < 1
    assert "LPIPS skipped" in err and "fewer than 5 samples" in err
    with output.open() as handle:
        scores = list(csv.DictReader(handle))
    assert len(scores) == 3 * 2
    assert {(row["psnr"], row["ssim"]) for row in scores if row["setting"] == "ratio=0"} == {("inf", "1.0")}
    written = sorted(path.relative_to(images).as_posix() for path in images.rglob("*.png"))
    assert written == sorted(f"{setting}/prompt{prompt:03d}-seed3.png" for setting in (UNMERGED, "ratio=0", "ratio=0.5")
                             for prompt in (0, 1))
    from PIL import Image

    with Image.open(images / UNMERGED / "prompt000-seed3.png") as image:
        assert image.size == (SIZE, SIZE)
    unmerged, zero = ((images / setting / "prompt001-seed3.png").read_bytes() for setting in (UNMERGED, "ratio=0"))
    assert unmerged == zero


def test_a_run_gives_the_same_merged_images_again(saved, capsys, tmp_path):
    """The random destinations are drawn from the sample's seed, not from torch's global generator."""
    for run in ("first", "second"):
        torch.manual_seed(len(run))
        status, _, err = run_fidelity(capsys, saved, "--seeds", "1", "--ratio", "0.5", "--output-dir", tmp_path / run)
        assert status == 0, err
    first, second = ((tmp_path / run / "ratio=0.5" / "prompt000-seed1.png").read_bytes() for run in ("first", "second"))
    assert first == second


def test_a_pipeline_in_memory_is_measured_by_measure_fidelity():
    found = fidelity.measure_fidelity(tiny_pipeline(), ["a cat"], seeds=[2], ratios=[0.0, 0.5], warmup=0,
                                      progress=False, call={"num_inference_steps": 2}, lpips=False, use_rand=False)
    assert [row["setting"] for row in found.rows] == [UNMERGED, "ratio=0", "ratio=0.5"]
    assert (found.rows[1]["psnr"], found.rows[1]["ssim"]) == (math.inf, 1.0) and found.rows[2]["ssim"] < 1
    assert [len(results) for results in found.results.values()] == [1, 1, 1] and found.samples[0].seed == 2
    assert found.lpips_skipped == "LPIPS not asked for"


def test_prompts_come_from_a_file_one_per_line(saved, capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red house\n\na blue boat\n")
    status, out, err = run_fidelity(capsys, saved, "--prompts", prompts, "--seeds", "0", "--ratio", "0.5")
    assert status == 0, err
    assert table_rows(out)["ratio=0.5"][0] == "2" and "2 prompts x 1 seed," in out


@pytest.mark.parametrize("args, message", [
    (["{missing}"], "no model_index.json"),
    (["{pipeline}", "--output", "{folder}"], "is a folder"),
    (["{pipeline}", "--output-dir", "{file}"], "is a file"),
    (["{pipeline}", "--output-dir", "{pipeline}/out"], "inside PIPELINE"),
    (["{pipeline}", "--prompts", "{missing}"], "no such file"),
    (["{pipeline}", "--prompts", "{empty}"], "holds no prompts"),
    (["{pipeline}", "--device", "cuda:7"], "--device cuda:7"),
])
def test_bad_input_is_one_line_before_any_work(saved, capsys, tmp_path, args, message):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty.txt").write_text("\n")
    places = {"pipeline": saved, "missing": tmp_path / "missing", "folder": tmp_path, "file": tmp_path / "file.txt",
              "empty": tmp_path / "empty.txt"}
    status, out, err = run_fidelity(capsys, *(arg.format(**places) for arg in args))
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1 and "generating" not in err
    assert not (saved / "out").exists()


@pytest.mark.parametrize("ratios, message", [("1.5", "[0, 1)"), ("-0.1", "[0, 1)"), ("half", "shares")])
def test_a_bad_ratio_is_refused_as_the_option_is_read(saved, capsys, ratios, message):
    status, _, err = run_fidelity(capsys, saved, "--ratio", ratios)
    assert status == 2 and message in err.splitlines()[-1]


def test_an_option_tokenmerge_refuses_is_one_line_before_any_work(saved, capsys):
    status, _, err = run_fidelity(capsys, saved, "--ratio", "0.5", "--merge-kwargs", "no_such_option=1")
    errors = [line for line in err.splitlines() if line.startswith("tokenmerge fidelity: error: ratio=0.5: ")]
    assert status == 2 and len(errors) == 1 and "no_such_option" in errors[0] and "generating" not in err


def test_a_pipeline_of_a_denoiser_tokenmerge_does_not_merge_is_refused_by_name(capsys, tmp_path):
    transformer = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                  num_layers=1, sample_size=8, norm_num_groups=8)
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)
    diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=diffusers.DDIMScheduler()).save_pretrained(
        tmp_path / "dit")
    capsys.readouterr()
    status, _, err = run_fidelity(capsys, tmp_path / "dit")
    errors = [line for line in err.splitlines() if line.startswith("tokenmerge fidelity: error: ")]
    assert status == 2 and len(errors) == 1 and "DiTTransformer2DModel" in errors[0] and "generating" not in err


# --- the distances -------------------------------------------------------------------------


def test_psnr_is_ten_log_of_the_peak_over_the_mean_squared_error():
    image = torch.rand(1, 3, 16, 16, dtype=torch.float64) * 0.5
    assert psnr(image + 0.1, image) == pytest.approx(20.0, abs=1e-9)
    assert psnr(image, image) == math.inf


def test_ssim_of_flat_images_is_its_closed_form():
    """Without variance, SSIM is the luminance term (2ab + C1) / (a^2 + b^2 + C1)."""
    a, b, c1 = 0.2, 0.7, 0.01 ** 2
    flat = [torch.full((1, 3, 16, 16), value, dtype=torch.float64) for value in (a, b)]
    assert ssim(*flat) == pytest.approx(
        (2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)


def test_ssim_is_the_mean_over_every_11_by_11_gaussian_window_inside_the_image():
    """Against a window-by-window computation of Wang et al.'s formula on a 13 x 14 image."""
    x, y = torch.rand(2, 1, 13, 14, dtype=torch.float64)
    offsets = torch.arange(11, dtype=torch.float64) - 5
    weights = torch.exp(-offsets[:, None] ** 2 / 4.5 - offsets[None, :] ** 2 / 4.5)
    weights /= weights.sum()
    values = []
    for top in range(13 - 10):
        for left in range(14 - 10):
            u, v = x[0, top:top + 11, left:left + 11], y[0, top:top + 11, left:left + 11]
            mu, mv = (weights * u).sum(), (weights * v).sum()
            su, sv = (weights * (u - mu) ** 2).sum(), (weights * (v - mv) ** 2).sum()
            cov = (weights * (u - mu) * (v - mv)).sum()
            c1, c2 = 0.01 ** 2, 0.03 ** 2
            values.append((2 * mu * mv + c1) * (2 * cov + c2) / ((mu ** 2 + mv ** 2 + c1) * (su + sv + c2)))
    assert ssim(x, y) == pytest.approx(torch.stack(values).mean().item(), rel=1e-9)
    assert ssim(x, x) == 1.0 and ssim(x, y) == pytest.approx(ssim(y, x), rel=1e-12)


def test_ssim_refuses_images_smaller_than_its_window():
    with pytest.raises(ValueError, match="at least 11 x 11"):
        ssim(torch.rand(1, 3, 8, 32), torch.rand(1, 3, 8, 32))


def test_lpips_is_skipped_without_the_package_and_used_where_its_weights_are(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lpips", None)  # as if not installed
    distance, reason = load_lpips(torch.device("cpu"))
    assert distance is None and "lpips package is not installed" in reason

    class FakeLPIPS(torch.nn.Module):
        def __init__(self, net, verbose):
            super().__init__()

        def forward(self, image, reference, normalize):
            assert normalize  # images in [0, 1]
            return (image - reference).abs().mean(dim=(1, 2, 3), keepdim=True)

    pytest.importorskip("torchvision")
    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=FakeLPIPS))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    distance, reason = load_lpips(torch.device("cpu"))
    assert distance is None and "AlexNet weights" in reason and str(tmp_path) in reason
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "alexnet-owt-7be5be79.pth").write_bytes(b"")
    distance, reason = load_lpips(torch.device("cpu"))
    assert reason == "" and distance(torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)) == 1.0


def test_a_video_is_scored_frame_by_frame():
    video = torch.rand(1, 5, 3, 12, 12)  # (batch, frames, channels, height, width), as output_type="pt" gives
    assert frames_of(SimpleNamespace(frames=video)).shape == (5, 3, 12, 12)
    assert frames_of(SimpleNamespace(images=video[0, :1])).shape == (1, 3, 12, 12)


# --- the summary ---------------------------------------------------------------------------


def test_speed_ups_are_medians_of_per_sample_ratios():
    results = {UNMERGED: [Result(2.0, math.inf, 1.0), Result(3.0, math.inf, 1.0), Result(4.0, math.inf, 1.0)],
               "ratio=0.5": [Result(1.0, 30.0, 0.9), Result(2.0, 20.0, 0.7), Result(1.0, 25.0, 0.8)]}
    unmerged, merged = summarize(results)
    assert (unmerged["speedup"], unmerged["psnr"], unmerged["ssim"]) == (1.0, math.inf, 1.0)
    assert merged["speedup"] == 2.0 and merged["psnr"] == 25.0 and merged["ssim"] == pytest.approx(0.8)
    assert merged["seconds"] == 1.0 and math.isnan(merged["lpips"])
    assert any("fewer than 5 samples" in warning for warning in warnings_of([unmerged, merged]))


def test_the_tomesd_options_given_reach_every_setting():
    parser_args = ["fidelity", "folder", "--ratio", "0.3,0.5,0.3", "--max-downsample", "2", "--no-use-rand",
                   "--merge-mlp", "--merge-kwargs", "seed=7"]
    from tokenmerge.tools.cli import build_parser

    args = build_parser(parser_args).parse_args(parser_args)
    settings = fidelity.settings_of(args.ratio, fidelity.merge_options_of(args))
    assert [setting.name for setting in settings] == [UNMERGED, "ratio=0.3", "ratio=0.5"]
    assert settings[2].apply == {"ratio": 0.5, "max_downsample": 2, "use_rand": False, "merge_mlp": True, "seed": 7}
