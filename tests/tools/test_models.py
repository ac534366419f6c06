"""Models of every supported library through the command line: ``--library`` with
``--model`` and ``--checkpoint`` for ``bench`` and ``eval``, and clear errors."""
import json

import pytest
import torch

from tests.conftest import make_class_folder
from tokenmerge.tools.cli import main
from tokenmerge.tools.models import ImageModel, load_model, unwrap

FAST = ["--runs", "1", "--warmup", "0", "--batch-size", "2"]
CLASSES = ["cat", "dog", "fish"]


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    """Three class folders of two random pictures each, and their class map."""
    return make_class_folder(tmp_path_factory.mktemp("classes"), CLASSES, 2)


@pytest.fixture(scope="module")
def transformers_folder(tmp_path_factory):
    """A small ViTForImageClassification and its image processor, written by save_pretrained."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf-vit")
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                                    image_size=32, patch_size=8, num_labels=len(CLASSES))
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def bench_rows(path):
    return {row["setting"]: row for row in json.loads(path.read_text())["rows"]}


def test_the_preprocessing_of_every_kind_of_model_is_described(transformers_folder, video_and_audio_folders):
    from tokenmerge.tools.models import describe_preprocessing

    described = describe_preprocessing(load_model("transformers", str(transformers_folder)))
    assert described == "ViTImageProcessor (resize to height 32, width 32, mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5])"
    torchvision = describe_preprocessing(load_model("torchvision", "vit_b_32"))
    assert torchvision.startswith("ImageClassification(crop_size=[224] resize_size=[256] mean=[0.485")
    assert "tensor itself" in describe_preprocessing(load_model("transformers", str(video_and_audio_folders["video"])))


def test_bench_a_transformers_folder(transformers_folder, tmp_path):
    output = tmp_path / "bench.json"
    assert main(["bench", "--library", "transformers", "--model", "vit-small-test", "--checkpoint",
                 str(transformers_folder), "--r", "0,2", "--output", str(output), *FAST]) == 0
    rows = bench_rows(output)
    assert rows["unpatched"]["tokens_left"] == 17 and rows["r=2"]["tokens_left"] == 11
    assert rows["r=2"]["gflops"] == pytest.approx(rows["r=2"]["counted_gflops"], rel=0.03)


def test_eval_a_transformers_classifier(transformers_folder, class_folder, tmp_path, capsys):
    root, class_map = class_folder
    output = tmp_path / "eval.json"
    assert main(["eval", "--library", "transformers", "--model", str(transformers_folder), "--data", str(root),
                 "--class-map", str(class_map), "--r", "0,2", "--batch-size", "4", "--output", str(output)]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header.count(str(transformers_folder)) == 1  # the folder is the model's name and its weights
    rows = {row["setting"]: row for row in json.loads(output.read_text())["rows"]}
    assert rows["unpatched"]["images"] == 6
    assert rows["r=0"]["top1_correct"] == rows["unpatched"]["top1_correct"]


def _video_and_audio_folders(root):
    """A small VideoMAEForVideoClassification and ASTForAudioClassification, written by save_pretrained."""
    transformers = pytest.importorskip("transformers")
    small = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96,
                 num_labels=len(CLASSES))
    video = transformers.VideoMAEConfig(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, **small)
    audio = transformers.ASTConfig(max_length=48, num_mel_bins=32, patch_size=8, frequency_stride=8, time_stride=8,
                                   **small)
    folders = {}
    for kind, model in (("video", transformers.VideoMAEForVideoClassification(video)),
                        ("audio", transformers.ASTForAudioClassification(audio))):
        folders[kind] = root / kind
        model.save_pretrained(folders[kind])
    return folders


@pytest.fixture(scope="module")
def video_and_audio_folders(tmp_path_factory):
    return _video_and_audio_folders(tmp_path_factory.mktemp("hf-media"))


@pytest.mark.parametrize("kind, shape, tokens", [("video", (4, 3, 32, 32), 32), ("audio", (48, 32), 2 + 24)])
def test_bench_and_export_take_video_and_audio_models_with_random_inputs(video_and_audio_folders, kind, shape, tokens,
                                                                         tmp_path):
    folder = video_and_audio_folders[kind]
    model = load_model("transformers", str(folder))
    assert model.input_shape == shape and model.num_classes == len(CLASSES)
    output = tmp_path / "bench.json"
    assert main(["bench", "--library", "transformers", "--model", str(folder), "--r", "0,2", "--cut-limit",
                 "--output", str(output), *FAST]) == 0
    rows = bench_rows(output)
    assert rows["unpatched"]["tokens_left"] == tokens and rows["r=2"]["tokens_left"] == tokens - 4
    assert rows["r=2"]["gflops"] == pytest.approx(rows["r=2"]["counted_gflops"], rel=0.03)
    assert "cut r=2" in rows
    pytest.importorskip("onnxruntime")
    assert main(["export", "--library", "transformers", "--model", str(folder), "--r", "2",
                 "--output", str(tmp_path / "model.onnx")]) == 0


def test_commands_that_read_images_refuse_video_models_in_one_line(video_and_audio_folders, class_folder, capsys):
    root, class_map = class_folder
    assert main(["eval", "--library", "transformers", "--model", str(video_and_audio_folders["video"]),
                 "--data", str(root), "--class-map", str(class_map)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' own weight-loading bar
    assert error.startswith("tokenmerge eval: error:") and "takes video inputs" in error and "tokenmerge bench" in error


def test_bench_a_torchvision_model(tmp_path):
    output = tmp_path / "bench.json"
    assert main(["bench", "--library", "torchvision", "--model", "vit_b_32", "--r", "0,4", "--output", str(output),
                 *FAST]) == 0
    rows = bench_rows(output)
    assert rows["unpatched"]["tokens_left"] == 50 and rows["r=4"]["tokens_left"] == 4


def test_torchvision_checkpoint_must_fit(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    small = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64)
    checkpoint = tmp_path / "small.pth"
    torch.save(small.state_dict(), checkpoint)
    with pytest.raises(ValueError, match="does not fit model vit_b_32"):
        load_model("torchvision", "vit_b_32", checkpoint)


def test_bench_and_zero_shot_eval_an_open_clip_model(class_folder, tmp_path):
    pytest.importorskip("open_clip")
    root, class_map = class_folder
    output = tmp_path / "bench.json"
    assert main(["bench", "--library", "open_clip", "--model", "ViT-B-32", "--r", "0,4", "--output", str(output),
                 *FAST]) == 0
    assert bench_rows(output)["r=4"]["tokens_left"] == 4
    output = tmp_path / "eval.json"
    assert main(["eval", "--library", "open_clip", "--model", "ViT-B-32", "--data", str(root),
                 "--class-map", str(class_map), "--r", "0,4", "--batch-size", "6", "--output", str(output)]) == 0
    rows = {row["setting"]: row for row in json.loads(output.read_text())["rows"]}
    assert rows["r=0"]["top1_correct"] == rows["unpatched"]["top1_correct"] and rows["r=4"]["images"] == 6


@pytest.mark.parametrize("args, message", [
    (["--library", "torchvision", "--model", "vit_b_99"], "torchvision has no model named 'vit_b_99'"),
    (["--library", "open_clip", "--model", "ViT-Q-99"], "open_clip has no model named 'ViT-Q-99'"),
    (["--library", "transformers", "--model", "no/such-model"], "give --checkpoint DIR"),
    (["--library", "torchvision", "--model", "vit_b_32", "--checkpoint", "missing.pth"], "does not exist"),
])
def test_unknown_models_are_clear_errors(args, message, capsys):
    assert main(["bench", *args, *FAST]) == 2
    assert message in capsys.readouterr().err


def test_image_model_wraps_the_network_that_gets_patched():
    model = load_model("timm", "vit_tiny_patch16_224")
    assert isinstance(model, ImageModel) and unwrap(model) is model.network and unwrap(model.network) is model.network
    assert model.num_classes == 1000 and model.transform is not None
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(images), model.network(images))


def test_works_without_the_optional_libraries():
    """With transformers and open_clip unimportable, timm models still merge, and asking
    for those libraries names the extra that installs them. (torchvision cannot be
    left out: timm itself needs it.)"""
    import subprocess
    import sys

    script = """
import sys
for name in ("transformers", "open_clip"):
    sys.modules[name] = None
import timm, torch, tokenmerge
from tokenmerge.adapters import load_adapter
from tokenmerge.libraries import install_command
from tokenmerge.tools.cli import main
model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).eval()
tokenmerge.apply(model, r=2)
assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
try:
    load_adapter("transformers")
except ImportError as error:
    assert install_command("transformers") in str(error), error
    hint = install_command("transformers")
    assert hint.startswith("pip install") and "[transformers]" in hint
else:
    raise AssertionError("no error")
assert main(["bench", "--library", "open_clip", "--model", "ViT-B-32"]) == 2
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "pip install" in result.stderr and '[open-clip]"' in result.stderr


def test_a_folder_without_an_image_processor_is_told_how_to_write_one(class_folder, tmp_path, capsys):
    """The error gives a command that writes the model type's default processor; run as
    printed, it makes the folder one that eval takes."""
    import shlex
    import subprocess
    import sys

    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "no-processor"
    config = transformers.ViTConfig(hidden_size=48, num_hidden_layers=1, num_attention_heads=3, intermediate_size=96,
                                    image_size=32, patch_size=8, num_labels=len(CLASSES))
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    root, class_map = class_folder
    command = ["eval", "--library", "transformers", "--model", str(folder), "--data", str(root),
               "--class-map", str(class_map), "--r", "0", "--batch-size", "4"]
    assert main(command) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "has no image processor configuration" in error and "ViTImageProcessor" in error
    suggested = error.split("32x32: ", 1)[1].split(" (give the mean", 1)[0]
    subprocess.run([sys.executable if word == "python" else word for word in shlex.split(suggested)], check=True)
    assert main(command) == 0


def test_a_timm_vit_converts_to_a_transformers_folder_that_eval_takes(class_folder, tmp_path):
    """The conversion recipe: the same logits on the same input tensors, and a folder
    with weights and an image processor that eval merges."""
    import timm

    from tokenmerge.tools.conversion import transformers_from_timm

    pytest.importorskip("transformers")
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3).eval()
    model, processor = transformers_from_timm(vit)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits, vit(x), atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path / "hf")
    processor.save_pretrained(tmp_path / "hf")
    root, class_map = class_folder
    assert main(["eval", "--library", "transformers", "--model", str(tmp_path / "hf"), "--data", str(root),
                 "--class-map", str(class_map), "--r", "0,2", "--batch-size", "4"]) == 0
    with pytest.raises(ValueError, match="LayerScale"):
        transformers_from_timm(timm.create_model("vit_tiny_patch16_224", depth=1, init_values=1e-5))
