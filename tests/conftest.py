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
