"""Merge-group maps and painted pictures: what they mean, not how they look."""
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import tokenmerge
from tests.conftest import CHECKPOINT, IMAGENET_SAMPLE, require_shared
from tokenmerge.schedule import Linear
from tokenmerge.tools.cli import main
from tokenmerge.tools.models import create_timm_model
from tokenmerge.tools.visualize import (
    group_borders,
    group_mean_colours,
    merge_groups,
    paint_groups,
    pixel_groups,
    prepare_images,
    visualize,
)

PRETRAINED = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


@pytest.fixture(scope="module")
def tiny():
    return timm.create_model("vit_tiny_patch16_224").eval()


@pytest.fixture(scope="module")
def tiny_dynamic():
    return timm.create_model("vit_tiny_patch16_224", dynamic_img_size=True).eval()


@pytest.fixture(scope="module")
def tiny_padding():
    return timm.create_model("vit_tiny_patch16_224", dynamic_img_size=True, dynamic_img_pad=True).eval()


def random_photos(count, seed=0):
    """Smooth random pictures of different sizes, so that neighbouring patches look alike."""
    rng = np.random.default_rng(seed)
    photos = []
    for index in range(count):
        coarse = (rng.random((6, 5 + index, 3)) * 255).astype(np.uint8)
        photos.append(Image.fromarray(coarse).resize((150 + 40 * index, 120 + 30 * index), Image.BICUBIC))
    return photos


def assert_valid_groups(groups, tokens, num_protected):
    """Every patch is in exactly one group, ids are 0..K-1, K = tokens - protected."""
    expected = tokens - num_protected
    for image_groups in groups:
        assert image_groups.dtype == np.int64
        assert sorted(np.unique(image_groups)) == list(range(expected))


def test_final_groups_are_the_final_tokens_minus_protected(tiny):
    inputs = torch.randn(3, 3, 224, 224)
    for r in (8, Linear(10)):
        merges = merge_groups(tiny, inputs, r)
        final_tokens = tokenmerge.token_counts(tiny, r=r, img_size=(224, 224))[-1]
        assert merges.blocks == (11,) and merges.tokens == (final_tokens,)
        assert merges.final.shape == (3, 14, 14) and merges.num_protected == 1
        assert_valid_groups(merges.final, final_tokens, 1)


def test_groups_nest_across_blocks(tiny):
    merges = merge_groups(tiny, torch.randn(2, 3, 224, 224), r=10, blocks=range(12))
    counts = tokenmerge.token_counts(tiny, r=10)
    assert merges.blocks == tuple(range(12)) and merges.tokens == tuple(counts)
    for k, tokens in enumerate(counts):
        assert_valid_groups(merges.groups[k], tokens, 1)
    for earlier, later in zip(merges.groups[:-1], merges.groups[1:]):
        for image in range(2):
            pairs = set(zip(earlier[image].ravel(), later[image].ravel()))
            assert len(pairs) == len(np.unique(earlier[image])), "a group split between blocks"


def test_with_r_zero_every_patch_is_its_own_group(tiny):
    merges = merge_groups(tiny, torch.randn(2, 3, 224, 224), r=0, blocks=[3])
    assert merges.tokens == (197, 197)
    for groups in merges.groups:
        assert (groups == np.arange(196).reshape(14, 14)).all()


def test_register_tokens_are_not_patches():
    model = timm.create_model("vit_small_patch14_reg4_dinov2", img_size=112).eval()
    inputs, pictures = prepare_images(model, random_photos(2))
    assert inputs.shape == (2, 3, 112, 112) and pictures.shape == (2, 112, 112, 3)
    merges = merge_groups(model, inputs, r=4, blocks=[5])
    assert merges.num_protected == 5 and merges.patch_size == (14, 14)
    assert merges.tokens == (69 - 6 * 4, tokenmerge.token_counts(model, r=4)[-1])
    for groups, tokens in zip(merges.groups, merges.tokens):
        assert groups.shape == (2, 8, 8)
        assert_valid_groups(groups, tokens, 5)


@pytest.mark.parametrize("size, grid, padding", [((96, 160), (6, 10), False), ((100, 150), (7, 10), True)])
def test_any_input_size_with_a_dynamic_model(tiny_dynamic, tiny_padding, size, grid, padding):
    model = tiny_padding if padding else tiny_dynamic
    inputs, pictures = prepare_images(model, random_photos(2), img_size=size)
    assert pictures.shape == (2, *size, 3)
    merges = merge_groups(model, inputs, r=2)
    assert merges.final.shape == (2, *grid)
    assert_valid_groups(merges.final, tokenmerge.token_counts(model, r=2, img_size=size)[-1], 1)
    painted = paint_groups(pictures[0], merges.final[0], merges.patch_size)
    assert painted.shape == (*size, 3)


def test_a_fixed_size_model_rejects_other_sizes_and_unknown_blocks(tiny):
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        merge_groups(tiny, torch.randn(1, 3, 96, 160), r=4)
    with pytest.raises(ValueError, match="numbered 0..11"):
        merge_groups(tiny, torch.randn(1, 3, 224, 224), r=4, blocks=[12])
    assert not tokenmerge.is_applied(tiny)


def test_a_dynamic_model_without_padding_needs_whole_patches(tiny_dynamic):
    with pytest.raises(ValueError, match="dynamic_img_pad=True"):
        merge_groups(tiny_dynamic, torch.randn(1, 3, 100, 150), r=2)


def test_the_model_is_left_as_it_was(tiny):
    inputs = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        before = tiny(inputs)
    merge_groups(tiny, inputs, r=8, blocks=[2])
    assert not tokenmerge.is_applied(tiny) and not tiny.training
    with torch.no_grad():
        assert torch.equal(tiny(inputs), before)

    tokenmerge.apply(tiny, r=[2] * 12, prop_attn=False, method="cut")
    tiny.train()
    try:
        merge_groups(tiny, inputs, r=8)
        state = tokenmerge.get_state(tiny)
        assert (state.r, state.prop_attn, state.trace_source, state.method) == ([2] * 12, False, False, "cut")
        assert tiny.training
    finally:
        tokenmerge.remove(tiny)
        tiny.eval()


def test_borders_lie_exactly_between_different_groups():
    groups = np.array([[0, 0], [1, 0]])
    border = group_borders(groups, (4, 4), (8, 8))
    expected = np.zeros((8, 8), dtype=bool)
    expected[3:5, 0:4] = True  # between the top-left and bottom-left patches
    expected[4:8, 3:5] = True  # between the bottom-left and bottom-right patches
    assert (border == expected).all()


def test_painted_groups_have_their_mean_colour():
    rng = np.random.default_rng(1)
    image = rng.random((48, 64, 3))
    groups = rng.integers(0, 5, size=(6, 8))
    groups[0, 0], groups[-1, -1] = 0, 4  # ids 0..4 all used
    painted = paint_groups(image, groups, (8, 8), border_colour=(1.0, 0.0, 1.0))
    pixels = pixel_groups(groups, (8, 8), (48, 64))
    border = group_borders(groups, (8, 8), (48, 64))
    assert (painted[border] == [1, 0, 1]).all()
    for group in range(5):
        inside = (pixels == group) & ~border
        assert inside.any()
        np.testing.assert_allclose(painted[inside], np.broadcast_to(image[pixels == group].mean(0), (inside.sum(), 3)))

    as_uint8 = (image * 255).round().astype(np.uint8)
    painted8 = paint_groups(as_uint8, groups, (8, 8))
    assert painted8.dtype == np.uint8
    for group in range(5):
        inside = (pixels == group) & ~border
        mean = as_uint8[pixels == group].mean(0)
        assert np.abs(painted8[inside].astype(float) - mean).max() <= 0.5


def test_a_grid_overhanging_the_image_is_cut_off():
    image = np.random.default_rng(2).random((20, 27, 3))
    painted = paint_groups(image, np.array([[0, 1], [1, 1]]), (16, 16), border_colour=(0.0, 0.0, 0.0))
    assert np.allclose(painted[:15, :15], image[:16, :16].reshape(-1, 3).mean(0))
    rest = np.ones((20, 27), dtype=bool)
    rest[:16, :16] = False
    assert np.allclose(painted[17:, 17:], image[rest].mean(0))
    with pytest.raises(ValueError, match="does not cover"):
        paint_groups(image, np.array([[0, 1]]), (16, 16))


def test_visualize_paints_every_picture_after_every_block(tiny):
    result = visualize(tiny, random_photos(3), r=8, blocks=[4])
    assert result.pictures.shape == (3, 224, 224, 3) and 0 <= result.pictures.min() <= result.pictures.max() <= 1
    assert result.painted.shape == (3, 2, 224, 224, 3)
    for image in range(3):
        for k in range(2):
            groups = result.merges.groups[k, image]
            expected = paint_groups(result.pictures[image], groups, (16, 16))
            assert np.array_equal(result.painted[image, k], expected)
            inside = ~group_borders(groups, (16, 16), (224, 224))
            assert len(np.unique(expected[inside], axis=0)) == len(np.unique(groups))


def test_cli_writes_a_figure_with_a_row_per_image(tmp_path, capsys):
    paths = []
    for index, photo in enumerate(random_photos(2)):
        paths.append(tmp_path / f"photo{index}.png")
        photo.save(paths[-1])
    output = tmp_path / "merges.png"
    args = ["visualize", *map(str, paths), "--model", "vit_tiny_patch16_224", "--r", "8", "--dpi", "60"]
    assert main([*args, "--blocks", "2,5", "--output", str(output)]) == 0
    assert "101 tokens after block 11 (1 protected)" in capsys.readouterr().out
    with Image.open(output) as figure:
        assert figure.format == "PNG"
        width, height = figure.size
    assert 1.4 < width / height < 2.2  # 4 columns by 2 rows of square pictures with titles

    wide = tmp_path / "wide.png"
    assert main([*args[:2], *args[3:], "--every-block", "--output", str(wide)]) == 0
    with Image.open(wide) as figure:
        assert figure.size[0] > 8 * figure.size[1]  # 13 columns, 1 row


@pytest.mark.parametrize("content, message", [(None, "does not exist"), ("not an image", "cannot read image")])
def test_cli_names_an_image_it_cannot_use(tmp_path, capsys, content, message):
    path = tmp_path / "photo.jpg"
    if content is not None:
        path.write_text(content)
    assert main(["visualize", str(path), "--model", "vit_tiny_patch16_224", "--output", str(tmp_path / "m.png")]) == 2
    err = capsys.readouterr().err
    assert "tokenmerge visualize: error:" in err and message in err and path.name in err
    assert not (tmp_path / "m.png").exists()


def test_cli_rejects_a_figure_name_it_cannot_write(tmp_path, capsys):
    assert main(["visualize", "any.jpg", "--output", str(tmp_path / "merges.txt")]) == 2
    assert "use a .png, .pdf or .svg file name" in capsys.readouterr().err


def test_pretrained_model_merges_patches_that_look_alike(tmp_path, capsys):
    """On a real photo, the groups a trained model forms are far more uniform in colour
    than random groups of the same sizes."""
    require_shared()
    photo = next((IMAGENET_SAMPLE / "n01440764").glob("*.JPEG"))
    output = tmp_path / "tench.png"
    assert main(["visualize", str(photo), "--model", PRETRAINED, "--checkpoint", str(CHECKPOINT),
                 "--r", "13", "--blocks", "5", "--output", str(output)]) == 0
    assert "41 tokens after block 11" in capsys.readouterr().out
    with Image.open(output) as figure:
        assert figure.size[0] > figure.size[1]

    result = visualize(create_timm_model(PRETRAINED, CHECKPOINT), [photo], r=13)
    picture, groups = result.pictures[0], result.merges.final[0]
    shuffled = np.random.default_rng(0).permutation(groups.ravel()).reshape(groups.shape)
    error, random_error = (colour_spread(picture, candidate) for candidate in (groups, shuffled))
    assert error < 0.8 * random_error, (error, random_error)


def colour_spread(picture, groups):
    """Mean distance of a pixel's colour from the mean colour of its group."""
    pixels = pixel_groups(groups, (16, 16), picture.shape[:2])
    return np.abs(picture - group_mean_colours(picture, pixels)[pixels]).mean()


TINY_ARGS = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "patch_size=8", "depth=6", "--img-size", "64"]


def noise_picture(tmp_path):
    path = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (73, 73, 3), dtype=np.uint8)).save(path)
    return path


def schedule_file(tmp_path, **fields):
    path = tmp_path / "schedule.json"
    path.write_text(json.dumps({"r": [5] * 6, "method": "tome", "model": "vit_tiny_patch16_224", "library": "timm"}
                               | fields))
    return path


def sharp_attention_checkpoint(tmp_path):
    """Random weights whose attention matters (at timm's initial scale it barely
    moves the tokens, and proportional attention would change no matching)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", patch_size=8, depth=6, img_size=64)
    weights = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    for name in weights:
        if name.endswith(("attn.qkv.weight", "attn.proj.weight")):
            weights[name] = torch.randn(weights[name].shape) * 0.2
    save_file(weights, tmp_path / "sharp.safetensors")
    return tmp_path / "sharp.safetensors"


def test_cli_merges_with_the_attention_of_a_schedule_file_unless_told(tmp_path):
    picture, schedule = noise_picture(tmp_path), schedule_file(tmp_path, prop_attn=False)
    checkpoint = ["--checkpoint", str(sharp_attention_checkpoint(tmp_path))]
    figures = {}
    for name, attention in (("file", []), ("off", ["--no-prop-attn"]), ("on", ["--prop-attn"])):
        output = tmp_path / f"{name}.png"
        assert main(["visualize", str(picture), *TINY_ARGS, *checkpoint, "--r", f"@{schedule}", *attention,
                     "--output", str(output)]) == 0
        figures[name] = output.read_bytes()
    assert figures["file"] == figures["off"], "the file's prop_attn: false"
    assert figures["on"] != figures["off"], "proportional attention groups these patches differently"


def test_cli_refuses_a_schedule_file_tuned_for_another_model(tmp_path, capsys):
    picture, schedule = noise_picture(tmp_path), schedule_file(tmp_path, model="vit_small_patch16_224")
    output = tmp_path / "merges.png"
    assert main(["visualize", str(picture), *TINY_ARGS, "--r", f"@{schedule}", "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert f"schedule file {schedule} was tuned for vit_small_patch16_224, not vit_tiny_patch16_224" in err
    assert "--allow-other-model" in err and not output.exists()


def test_cli_uses_a_schedule_file_for_another_model_when_told(tmp_path):
    picture, schedule = noise_picture(tmp_path), schedule_file(tmp_path, model="vit_small_patch16_224")
    assert main(["visualize", str(picture), *TINY_ARGS, "--r", f"@{schedule}", "--allow-other-model",
                 "--output", str(tmp_path / "m.png")]) == 0
