"""Image folders for evaluation: ImageNet synset folders mapped to ImageNet-1k
indices, or class folders mapped to indices by a class map, and a dataset that
reports unreadable files instead of failing on them.

Every command finds images the same way (:func:`images_in`): at any depth, through
links to folders, each real folder once; labelled, those of every class folder,
without labels, those of the whole folder."""
from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from tokenmerge.reading import read_text

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
CLASS_MAP_HELP = "a class map: a text file with one class name per line, the line number (from 0) being the class index"


def check_folder(root: str | Path, kind: str = "image folder", holds: str = "the images") -> Path:
    """``root`` as a path, if it is a folder; a one-line error saying what it is
    otherwise: missing, or a file where a folder (that ``holds`` something) belongs."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ValueError(f"{kind} {root} is a file, not a folder; give the folder that holds {holds}")
    if not root.is_dir():
        raise FileNotFoundError(f"{kind} {root} does not exist")
    return root


def class_folders(root: str | Path) -> list[Path]:
    """The sub-folders of ``root`` (links to folders included), sorted; a missing
    ``root``, or a file, is an error."""
    root = check_folder(root)
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def images_in(folder: Path) -> list[Path]:
    """The image files in ``folder`` and in its sub-folders at any depth, sorted by
    path, hidden files and folders left out. Links to folders are followed, since
    data sets are often assembled from them; each real folder is read once and none
    that holds ``folder`` itself, so that a link loop ends and no image counts twice."""
    top = Path(os.path.realpath(folder))
    seen = {top}
    found = []
    for current, subfolders, files in os.walk(folder, followlinks=True):
        subfolders[:] = [name for name in sorted(subfolders)
                         if not name.startswith(".") and first_visit(Path(current, name), top, seen)]
        found += [path for name in files if not name.startswith(".")
                  and (path := Path(current, name)).suffix.lower() in IMAGE_SUFFIXES and path.is_file()]
    return sorted(found)


def first_visit(folder: Path, top: Path, seen: set[Path]) -> bool:
    """Whether a walk from ``top`` should enter ``folder``: not if its real folder was
    entered before or holds ``top`` (a link back up); it counts as entered from now on."""
    real = Path(os.path.realpath(folder))
    if real in seen or real in top.parents:
        return False
    seen.add(real)
    return True


def labelled_samples(root: str | Path, folders: Sequence[Path], index: dict[str, int]) -> list[tuple[Path, int]]:
    """(image path, index of its folder's name) for every image in ``folders``, at any
    depth (see :func:`images_in`); finding no image at all is an error, since there is
    nothing to evaluate."""
    samples = [(path, index[folder.name]) for folder in folders for path in images_in(folder)]
    if not samples:
        raise ValueError(f"no images found in {root}: expected <class folder>/<image> files "
                         f"with one of the suffixes {', '.join(sorted(IMAGE_SUFFIXES))}")
    return samples


def synset_samples(root: str | Path) -> list[tuple[Path, int]]:
    """(image path, ImageNet-1k class index) for a folder of ``<synset>/<image>`` files,
    such as ``n01440764/n01440764_tench.JPEG``. Folders that are not ImageNet-1k
    synsets are an error, since numbering them 0..K-1 would silently mislabel them."""
    from timm.data import ImageNetInfo

    folders = class_folders(root)
    info = ImageNetInfo()
    index = {info.index_to_label_name(i): i for i in range(info.num_classes())}
    for folder in folders:
        if folder.name not in index:
            raise ValueError(f"{folder} is not named by an ImageNet-1k synset (like n01440764); "
                             f"for other class folders give {CLASS_MAP_HELP}, or --no-labels to measure "
                             "the differences from the unpatched model only")
    return labelled_samples(root, folders, index)


def read_class_map(path: str | Path) -> list[str]:
    """The class names of a class map in timm's convention, a ``.txt`` file with one
    class name per line, in order: the position of a name is its class index. The
    file is read as every file a user names is (:func:`tokenmerge.reading.read_text`)."""
    path = Path(path)
    if path.suffix.lower() != ".txt":
        raise ValueError(f"cannot read class map {path}: expected {CLASS_MAP_HELP} (.txt)")
    names = [line.strip() for line in read_text(path, "class map", f"give {CLASS_MAP_HELP}").splitlines()]
    if not any(names):
        raise ValueError(f"class map {path} is empty: expected {CLASS_MAP_HELP}")
    return names


def class_map_samples(root: str | Path, class_map: str | Path) -> list[tuple[Path, int]]:
    """(image path, class index) for a folder of ``<class name>/<image>`` files, the
    index of every class name read from ``class_map`` (see :func:`read_class_map`).
    A folder whose name the map lacks, or names on more than one line, is an error
    rather than a silently wrong label."""
    folders = class_folders(root)
    lines_of: dict[str, list[int]] = {}
    for line, name in enumerate(read_class_map(class_map)):
        lines_of.setdefault(name, []).append(line)
    lines = {folder.name: lines_of.get(folder.name, []) for folder in folders}
    missing = [name for name, found in lines.items() if not found]
    if missing:
        raise ValueError(f"class map {class_map} has no line for the class folders {', '.join(missing)} in {root}")
    ambiguous = [f"{name} (lines {', '.join(map(str, found))})" for name, found in lines.items() if len(found) > 1]
    if ambiguous:
        raise ValueError(f"class map {class_map} names {', '.join(ambiguous)} more than once")
    return labelled_samples(root, folders, {name: found[0] for name, found in lines.items()})


def balanced_subset(samples: Sequence[tuple[Path, int]], count: int, seed: int = 0) -> list[tuple[Path, int]]:
    """``count`` of the labelled ``samples``, as evenly spread over their classes as
    ``count`` allows (classes drawn in a seeded order, images within each class
    drawn by the same seed), in the order of ``samples``; all of them if ``count``
    is not smaller. The same seed gives the same subset."""
    if count >= len(samples):
        return list(samples)
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for index, (_, label) in enumerate(samples):
        by_class.setdefault(label, []).append(index)
    queues = [rng.sample(indices, len(indices)) for indices in by_class.values()]
    rng.shuffle(queues)
    chosen: list[int] = []
    while len(chosen) < count:
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop())
    return [samples[index] for index in sorted(chosen)]


#: The label of an image without one: it counts in the fidelity measures, not in accuracy.
NO_LABEL = -1


def unlabelled_samples(root: str | Path) -> list[tuple[Path, int]]:
    """(image path, :data:`NO_LABEL`) for every image file under ``root``, at any depth
    (see :func:`images_in`), sorted by path."""
    paths = images_in(check_folder(root))
    if not paths:
        raise ValueError(f"no images found in {root} or below it (suffixes {', '.join(sorted(IMAGE_SUFFIXES))})")
    return [(path, NO_LABEL) for path in paths]


def folder_samples(
    root: str | Path, class_map: Optional[str | Path] = None, labels: bool = True
) -> list[tuple[Path, int]]:
    """The images of an image folder: labelled through ``class_map`` when given, or as
    ImageNet synset folders; without labels when ``labels`` is False or when the
    folder holds images and no sub-folders."""
    if not labels or (Path(root).is_dir() and not class_folders(root) and class_map is None):
        return unlabelled_samples(root)
    return synset_samples(root) if class_map is None else class_map_samples(root, class_map)


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


@dataclass(frozen=True)
class Unreadable:
    """An image file that could not be decoded, and why."""

    path: str
    reason: str


#: What Pillow raises on files that are not images, are truncated or are corrupt.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class TolerantImageFiles(ImageFiles):
    """:class:`ImageFiles` that return an :class:`Unreadable` marker for a file that
    fails to decode, so that one bad file does not end a long evaluation;
    :func:`collate_readable` drops the markers from the batch and passes them on."""

    def __getitem__(self, index: int):
        try:
            return super().__getitem__(index)
        except DECODE_ERRORS as error:
            return Unreadable(str(self.samples[index][0]), f"{type(error).__name__}: {error}")


class Batch(NamedTuple):
    """The readable images of a batch (``None`` if there are none), their labels,
    and the files of the batch that could not be read."""

    images: Optional[torch.Tensor]
    labels: torch.Tensor
    unreadable: list[Unreadable]


def collate_readable(items: Sequence) -> Batch:
    """Stack the (image, label) items of a batch and set the :class:`Unreadable` apart."""
    readable = [item for item in items if not isinstance(item, Unreadable)]
    unreadable = [item for item in items if isinstance(item, Unreadable)]
    if not readable:
        return Batch(None, torch.empty(0, dtype=torch.long), unreadable)
    images, labels = default_collate(readable)
    return Batch(images, torch.as_tensor(labels), unreadable)
