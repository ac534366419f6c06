"""``tokenmerge export``: ONNX files with a dynamic batch and standard operators, whose
ONNX Runtime outputs are the eager model's."""
import copy

import pytest
import torch

import tokenmerge
from tests.adapters.test_contract import CASES_BY_ID, R, images, make
from tests.adapters.test_torchvision_pretrained import torchvision_vit_tiny
from tests.adapters.test_transformers_pretrained import Logits, transformers_from_timm
from tests.test_tracing import MainOutput
from tokenmerge.tools.cli import main
from tokenmerge.tools.export import export_onnx, onnx_difference, onnx_outputs

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.mark.parametrize("case_id, method", [("timm_class_token", "tome"), ("transformers_vit", "tome"),
                                             ("torchvision_vit", "tome"),
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


@pytest.mark.parametrize("library, r", [("timm", 13), *(pytest.param(library, r, marks=pytest.mark.slow) for library, r
                                                         in [("timm", 0), ("transformers", 0), ("transformers", 13),
                                                             ("torchvision", 0), ("torchvision", 13)])])
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
