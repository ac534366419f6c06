import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[2] / "shared"
CHECKPOINT = SHARED / "models" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"
IMAGENET_SAMPLE = SHARED / "data" / "imagenet-sample"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def require_shared():
    if not SHARED.is_dir():
        pytest.skip(f"needs the shared checkpoint and images in {SHARED}, which is absent")


VIT_TINY = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


@pytest.fixture(scope="session")
def timm_vit_tiny():
    """The shared ViT-Ti AugReg checkpoint as a timm model, in eval mode."""
    require_shared()
    import timm

    return timm.create_model(VIT_TINY, pretrained=True, pretrained_cfg_overlay=dict(file=str(CHECKPOINT))).eval()


@pytest.fixture(scope="session")
def imagenet_sample(timm_vit_tiny):
    """The 500 shared ImageNet photographs through the ViT-Ti's own timm evaluation
    transform, (500, 3, 224, 224), and their ImageNet-1k labels (500,)."""
    import timm
    from torch.utils.data import DataLoader

    from tokenmerge.tools.data import ImageFiles, synset_samples

    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=timm_vit_tiny))
    loader = DataLoader(ImageFiles(synset_samples(IMAGENET_SAMPLE), transform), batch_size=100, num_workers=2)
    images, labels = zip(*loader)
    return torch.cat(images), torch.cat(labels)


def predict(model, images, batch_size=100):
    """Top-1 class of every image, in batches, without gradients."""
    with torch.no_grad():
        return torch.cat([model(batch).argmax(-1) for batch in images.split(batch_size)])


@pytest.fixture(scope="session")
def timm_sample_predictions(timm_vit_tiny, imagenet_sample):
    """``predictions(r)``: the shared ViT-Ti's top-1 class for every image of the shared
    sample, unpatched (``r=None``) or merged with ``r``; each computed once per session."""
    import tokenmerge

    images = imagenet_sample[0]
    cache = {}

    def predictions(r=None):
        if r not in cache:
            if r is not None:
                tokenmerge.apply(timm_vit_tiny, r=r)
            try:
                cache[r] = predict(timm_vit_tiny, images)
            finally:
                if r is not None:
                    tokenmerge.remove(timm_vit_tiny)
        return cache[r]

    return predictions


def make_class_folder(root, classes, per_class):
    """``root/<class>/<i>.png`` random pictures for every class name, and a class map
    beside ``root`` (one name per line); returns (root, class map path)."""
    import numpy as np
    from PIL import Image

    generator = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir()
        for index in range(per_class):
            Image.fromarray(generator.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(root / name / f"{index}.png")
    class_map = root.parent / f"{root.name}-classes.txt"
    class_map.write_text("\n".join(classes) + "\n")
    return root, class_map
