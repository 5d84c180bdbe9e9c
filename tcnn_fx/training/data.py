"""Image-classification data for fine-tuning and evaluation: ImageFolder splits, tar archives, transforms.

A dataset is a folder with one sub-folder per split (``train`` and ``val``
or ``test``), each holding one folder per class (torchvision's
``ImageFolder`` layout), or a ``.tar`` archive of such a tree, extracted
once into a cache folder and never into the working tree.

Images are decoded into uint8 tensors and augmented with
``torchvision.transforms.v2`` on tensors.  ``in_memory=True`` decodes every
image once up front (small datasets such as CIFAR-10: 60,000 images take a
few seconds and 180 MB) and skips undecodable files with a count; streaming
datasets decode per sample and fail naming the file.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from tcnn_fx.errors import InvalidInputError, MissingFileError

#: ImageNet statistics; the CIFAR-10 ResNets of the shared weights were trained with them too.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Split folder names accepted for evaluation, in order of preference.
EVAL_SPLITS = ("val", "test")
#: Images up to this size are augmented CIFAR-style (pad and crop), larger ones ImageNet-style.
SMALL_IMAGE = 64


def default_cache_dir() -> Path:
    return Path(os.environ.get("TCNN_FX_CACHE", Path.home() / ".cache" / "tcnn_fx")) / "datasets"


def extract(archive: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Extract ``archive`` once into ``cache_dir`` and return the folder; later calls reuse it.

    Extraction goes to a temporary folder renamed into place at the end, so an
    interrupted extraction never leaves a half-filled dataset behind.
    """
    archive = Path(archive)
    if not archive.is_file():
        raise MissingFileError(f"dataset archive {archive} does not exist")
    target = Path(cache_dir or default_cache_dir()) / archive.name.split(".")[0]
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(staging, filter="data")
        staging.rename(target)
    except (tarfile.TarError, OSError) as error:
        shutil.rmtree(staging, ignore_errors=True)
        if target.is_dir():  # another process finished the same extraction first
            return target
        raise InvalidInputError(f"cannot extract dataset archive {archive}: {error}") from error
    return target


def find_splits(root: str | Path) -> tuple[Path, Path]:
    """The train and evaluation split folders under ``root`` (which may hold them one level down)."""
    root = Path(root)
    if not root.exists():
        raise MissingFileError(f"dataset {root} does not exist")
    if root.is_file():
        root = extract(root)
    candidates = [root, *sorted(p for p in root.iterdir() if p.is_dir())]
    for folder in candidates:
        evaluation = next((folder / s for s in EVAL_SPLITS if (folder / s).is_dir()), None)
        if (folder / "train").is_dir() and evaluation is not None:
            return folder / "train", evaluation
    raise MissingFileError(
        f"dataset {root} has no train/ and val/ (or test/) split folders, each with one folder per class "
        f"(found {sorted(p.name for p in root.iterdir())[:10]})"
    )


def _decode(path: str) -> Tensor:
    """The image at ``path`` as uint8 RGB ``(3, H, W)``; ``OSError`` if it cannot be decoded."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


class ImageFolderData(Dataset):
    """One split: ``(image, label)`` pairs, the image a transformed tensor, from an ImageFolder tree."""

    def __init__(
        self,
        root: str | Path,
        transform=None,
        *,
        in_memory: bool = False,
        classes: list[str] | None = None,
    ):
        from torchvision.datasets import ImageFolder

        root = Path(root)
        if not root.is_dir():
            raise MissingFileError(f"dataset split {root} does not exist")
        try:
            folder = ImageFolder(str(root))
        except (FileNotFoundError, RuntimeError) as error:
            raise MissingFileError(
                f"dataset split {root} is not an ImageFolder (one folder per class): {error}"
            ) from error
        if classes is not None and folder.classes != classes:
            raise InvalidInputError(
                f"{root} has classes {folder.classes[:10]}, unlike the training split's {classes[:10]}"
            )
        self.root, self.classes, self.transform = root, folder.classes, transform
        self.samples: list[tuple[str, int]] = folder.samples
        self.skipped: list[str] = []
        self._images: list[Tensor] | None = None
        if in_memory:
            self._decode_all()

    def _decode_all(self) -> None:
        images, samples = [], []
        for path, label in self.samples:
            try:
                images.append(_decode(path))
            except OSError:
                self.skipped.append(path)
                continue
            samples.append((path, label))
        if self.skipped:
            warnings.warn(
                f"{self.root}: skipped {len(self.skipped)} undecodable images, e.g. {self.skipped[0]}",
                stacklevel=3,
            )
        if not samples:
            raise InvalidInputError(f"{self.root}: no image could be decoded")
        self.samples, self._images = samples, images

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def image(self, index: int) -> Tensor:
        """The decoded uint8 image ``(3, H, W)``, before any transform."""
        if self._images is not None:
            return self._images[index]
        path = self.samples[index][0]
        try:
            return _decode(path)
        except OSError as error:
            raise InvalidInputError(
                f"cannot decode image {path}: {error}; remove it or use in_memory=True to skip such files"
            ) from error

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.image(index)
        return (self.transform(image) if self.transform else image), self.samples[index][1]


def balanced_subset(targets: list[int], per_class: int, seed: int) -> list[int]:
    """``per_class`` indices of each class, drawn with ``seed``: a fixed, class-balanced sample."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor(targets)
    chosen = []
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        if len(members) < per_class:
            raise InvalidInputError(f"class {label} has {len(members)} images, fewer than the {per_class} asked for")
        chosen += members[torch.randperm(len(members), generator=generator)[:per_class]].tolist()
    return sorted(chosen)


@dataclass(frozen=True)
class Preprocessing:
    """Input size and normalisation, and the train / eval transforms built from them."""

    size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def normalise(self):
        from torchvision.transforms import v2

        return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)])

    def train(self):
        """Random crop and flip: pad-and-crop for small images (CIFAR), random-resized crop otherwise."""
        from torchvision.transforms import v2

        if self.size <= SMALL_IMAGE:
            crop = [
                v2.Resize(self.size, antialias=True),
                v2.RandomCrop(self.size, padding=self.size // 8, padding_mode="reflect"),
            ]
        else:
            crop = [v2.RandomResizedCrop(self.size, antialias=True)]
        return v2.Compose([*crop, v2.RandomHorizontalFlip(), self.normalise()])

    def geometry(self):
        """The deterministic resize and centre crop of evaluation, before normalisation (uint8 stays uint8)."""
        from torchvision.transforms import v2

        resize = self.size if self.size <= SMALL_IMAGE else round(self.size / 0.875)
        return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(self.size)])

    def eval(self):
        from torchvision.transforms import v2

        return v2.Compose([self.geometry(), self.normalise()])


def load_splits(
    data: str | Path, preprocessing: Preprocessing, *, in_memory: bool = False
) -> tuple[ImageFolderData, ImageFolderData]:
    """The train and evaluation splits of ``data`` (folder or ``.tar``), with their transforms."""
    train_root, eval_root = find_splits(data)
    train = ImageFolderData(train_root, preprocessing.train(), in_memory=in_memory)
    evaluation = ImageFolderData(eval_root, preprocessing.eval(), in_memory=in_memory, classes=train.classes)
    return train, evaluation
