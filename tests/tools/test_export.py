"""``tokenmerge export``: ONNX files with a dynamic batch and standard operators, whose
ONNX Runtime outputs are the eager model's."""
import copy
import json

import pytest
import timm
import torch

import tokenmerge
from tests.adapters.test_contract import CASES_BY_ID, R, images, make
from tests.adapters.test_torchvision_pretrained import torchvision_vit_tiny
from tests.adapters.test_transformers_pretrained import Logits, transformers_from_timm
from tests.test_tracing import MainOutput
from tokenmerge.tools.bench import onnx_runners
from tokenmerge.tools.cli import main
from tokenmerge.tools.onnx_files import export_onnx, onnx_difference, onnx_outputs
from tokenmerge.tools.settings import UNPATCHED, Setting, configure

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.mark.parametrize("case_id, method", [("timm_class_token", "tome"), ("timm_dinov3_rope_registers", "tome"),
                                             ("transformers_vit", "tome"), ("torchvision_vit", "tome"),
                                             pytest.param("timm_class_token", "random", marks=pytest.mark.slow),
                                             pytest.param("timm_class_token", "evit", marks=pytest.mark.slow)])
def test_a_merging_model_exports_to_onnx_with_the_eager_outputs_at_every_batch_size(case_id, method, tmp_path):
    case = CASES_BY_ID[case_id]
    model = tokenmerge.apply(make(case), r=R, method=method)
    path = export_onnx(MainOutput(case, model), tmp_path / "model.onnx", images(2))
    import onnx

    operators = {node.op_type for node in onnx.load(path).graph.node}
    assert "TopK" in operators or method != "tome", "the stable sort of the matching is an ONNX TopK"
    assert all(node.domain in ("", "ai.onnx") for node in onnx.load(path).graph.node), "standard operators only"
    for batch in (1, 3):
        assert onnx_difference(path, MainOutput(case, model), images(batch, seed=batch)) < 1e-5


def test_the_export_command_writes_and_checks_the_file(tmp_path, capsys):
    output = tmp_path / "vit.onnx"
    assert main(["export", "--model", "vit_tiny_patch16_224", "--model-kwargs", "depth=2", "--img-size", "64",
                 "--r", "4", "--output", str(output)]) == 0
    out = capsys.readouterr().out
    assert output.is_file() and "dynamic batch" in out and "max abs difference" in out
    assert "input 'images' float (batch, 3, 64, 64); output 'output' float (batch, 1000); preprocessing: Resize(" in out
    assert "CenterCrop(size=(64, 64))" in out and "Normalize(mean=tensor([0.5" in out
    difference = float(out.rsplit("max abs difference ", 1)[1].split()[0])
    assert difference < 1e-5


def test_the_export_command_checks_its_output_first(tmp_path, capsys):
    assert main(["export", "--output", str(tmp_path / "model.txt")]) == 2
    assert "use a .onnx file name" in capsys.readouterr().err


def real_vit_tiny(library, timm_model):
    """The shared ViT-Ti's weights in ``library``'s own ViT class, as a function of images."""
    if library == "timm":
        return timm_model
    if library == "torchvision":
        return torchvision_vit_tiny(timm_model)
    return Logits(transformers_from_timm(timm_model))


@pytest.mark.slow
@pytest.mark.parametrize("library, r", [(library, r) for library in ("timm", "transformers", "torchvision")
                                        for r in (0, 13)])
def test_onnx_runtime_gives_the_eager_outputs_on_real_photographs(library, r, timm_vit_tiny, imagenet_sample,
                                                                  tmp_path):
    model = real_vit_tiny(library, copy.deepcopy(timm_vit_tiny))
    tokenmerge.apply(model.model if library == "transformers" else model, r=r)
    path = export_onnx(model, tmp_path / "vit.onnx", imagenet_sample[0][:2])
    for photographs in (imagenet_sample[0][:1], imagenet_sample[0][100:116]):
        with torch.no_grad():
            expected = model(photographs)
        output = onnx_outputs(path, photographs)
        torch.testing.assert_close(output, expected, atol=1e-4, rtol=1e-4)
        assert torch.equal(output.argmax(-1), expected.argmax(-1))


def test_onnx_runtime_runners_give_the_eager_outputs_of_every_setting():
    model = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=64).eval()
    settings = [Setting(UNPATCHED), Setting("r=4", 4), Setting("cut r=4", 4, "cut")]
    runners, seconds = onnx_runners(model, settings, (3, 64, 64))
    assert not tokenmerge.is_applied(model), "the model is left unpatched"
    assert set(runners) == set(seconds) == {s.name for s in settings} and min(seconds.values()) > 0
    photographs = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for setting in settings:
        configure(model, setting)
        with torch.no_grad():
            expected = model(photographs)
        torch.testing.assert_close(runners[setting.name](photographs), expected, atol=1e-5, rtol=1e-5)


def test_bench_times_onnx_runtime_with_the_export_times_apart(tmp_path, capsys):
    report_path = tmp_path / "bench.json"
    assert main(["bench", "--model", "vit_tiny_patch16_224", "--model-kwargs", "depth=2", "--img-size", "64",
                 "--r", "4", "--cut-limit", "--runtime", "onnxruntime", "--runs", "2", "--warmup", "0",
                 "--batch-size", "2", "--output", str(report_path)]) == 0
    out = capsys.readouterr().out
    assert "ONNX Runtime" in out.splitlines()[0] and "export s" in out
    rows = json.loads(report_path.read_text())["rows"]
    assert [row["setting"] for row in rows] == ["unpatched", "r=4", "cut r=4"]
    assert [row["tokens_left"] for row in rows] == [17, 9, 9]
    assert all(row["export_seconds"] > 0 and row["compile_seconds"] is None for row in rows)


@pytest.mark.parametrize("args, message", [
    (["--compile"], "does not take --compile"),
    (["--dtype", "bfloat16"], "does not take --dtype"),
    (["--amp", "bfloat16"], "does not take --amp"),
])
def test_bench_refuses_what_onnx_runtime_cannot_time_before_loading_the_model(args, message, capsys):
    assert main(["bench", "--runtime", "onnxruntime", "--checkpoint", "missing.safetensors", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "does not exist" not in err and len(err.strip().splitlines()) == 1


def test_an_export_traced_with_one_image_takes_any_batch(tmp_path, capsys):
    output = tmp_path / "vit.onnx"
    assert main(["export", "--model", "vit_tiny_patch16_224", "--model-kwargs", "depth=2", "patch_size=8",
                 "--img-size", "32", "--r", "4", "--batch-size", "1", "--no-check", "--output", str(output)]) == 0
    assert "(dynamic batch)" in capsys.readouterr().out
    for batch in (1, 3):
        assert onnx_outputs(output, torch.randn(batch, 3, 32, 32)).shape == (batch, 1000)


def test_a_method_the_model_cannot_run_is_refused_before_tracing(tmp_path, capsys):
    output = tmp_path / "vit.onnx"
    assert main(["export", "--model", "vit_tiny_patch16_224", "--model-kwargs", "depth=2", "class_token=False",
                 "global_pool=avg", "--img-size", "32", "--r", "2", "--method", "tome-attended",
                 "--output", str(output)]) == 2
    captured = capsys.readouterr()
    assert "tokenmerge export: error: tome-attended spares the tokens a class token attends to" in captured.err
    assert "PyTorch" not in captured.out + captured.err and not output.exists()
