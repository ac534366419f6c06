"""``tokenmerge export``: ONNX files with a dynamic batch and standard operators, whose
ONNX Runtime outputs are the eager model's."""
import pytest

import tokenmerge
from tests.adapters.test_contract import CASES_BY_ID, R, images, make
from tokenmerge.tools.cli import main
from tokenmerge.tools.export import export_onnx, onnx_difference

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.mark.parametrize("method", ["tome", pytest.param("random", marks=pytest.mark.slow),
                                    pytest.param("evit", marks=pytest.mark.slow)])
def test_a_merging_model_exports_to_onnx_with_the_eager_outputs_at_every_batch_size(method, tmp_path):
    model = tokenmerge.apply(make(CASES_BY_ID["timm_class_token"]), r=R, method=method)
    path = export_onnx(model, tmp_path / "model.onnx", images(2))
    import onnx

    operators = {node.op_type for node in onnx.load(path).graph.node}
    assert "TopK" in operators or method != "tome", "the stable sort of the matching is an ONNX TopK"
    for batch in (1, 3):
        assert onnx_difference(path, model, images(batch, seed=batch)) < 1e-5


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
