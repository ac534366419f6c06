"""Image folders for evaluation: ImageNet synset folders mapped to ImageNet-1k indices."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from PIL import Image
from torch.utils.data import Dataset

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def synset_samples(root: str | Path) -> list[tuple[Path, int]]:
    """(image path, ImageNet-1k class index) for a folder of ``<synset>/<image>`` files,
    such as ``n01440764/n01440764_tench.JPEG``. Folders that are not ImageNet-1k
    synsets are an error, since numbering them 0..K-1 would silently mislabel them."""
    from timm.data import ImageNetInfo

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    info = ImageNetInfo()
    index = {info.index_to_label_name(i): i for i in range(info.num_classes())}
    samples = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name not in index:
            raise ValueError(f"{folder} is not named by an ImageNet-1k synset (like n01440764)")
        samples += [
            (path, index[folder.name])
            for path in sorted(folder.iterdir())
            if path.suffix.lower() in IMAGE_SUFFIXES
        ]
    if not samples:
        raise ValueError(f"no images found in {root}")
    return samples


class ImageFiles(Dataset):
    """Labelled image files, loaded as RGB and transformed."""

    def __init__(self, samples: list[tuple[Path, int]], transform: Optional[Callable] = None):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        with Image.open(path) as image:
            image = image.convert("RGB")
        return (self.transform(image) if self.transform else image), label
