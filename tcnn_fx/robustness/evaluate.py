"""Clean and corrupted top-1 of a classifier: the CIFAR-10-C / ImageNet-C protocol on any ImageFolder split.

Each corrupted copy of the evaluation split is generated on the fly, image by
image, with a generator seeded by (seed, corruption, severity, image index):
every model evaluated with the same seed sees the same corrupted pixels.
Corruptions apply to the uint8 image after the evaluation resize/crop and
before normalisation, as the benchmark images are stored.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from tcnn_fx.errors import InvalidInputError
from tcnn_fx.robustness.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from tcnn_fx.training.data import ImageFolderData, Preprocessing, balanced_subset
from tcnn_fx.training.loop import evaluate_accuracy


class CorruptedData(Dataset):
    """``data`` with one corruption at one severity, reproducibly."""

    def __init__(
        self, data: ImageFolderData, preprocessing: Preprocessing, corruption: str, severity: int, seed: int = 0
    ):
        self.data, self.corruption, self.severity = data, corruption, severity
        self.geometry, self.normalise = preprocessing.geometry(), preprocessing.normalise()
        self.base_seed = zlib.crc32(f"{seed}/{corruption}/{severity}".encode())

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        generator = torch.Generator().manual_seed(self.base_seed + index)
        image = corrupt(self.geometry(self.data.image(index)), self.corruption, self.severity, generator)
        return self.normalise(image), self.data.samples[index][1]


@dataclass
class RobustnessReport:
    """Clean top-1 and top-1 per corruption and severity; ``mean_corrupted`` averages them all."""

    clean: float
    corrupted: dict[str, dict[int, float]] = field(default_factory=dict)
    images: int = 0
    corrupted_images: int = 0

    @property
    def per_corruption(self) -> dict[str, float]:
        return {name: sum(by.values()) / len(by) for name, by in self.corrupted.items()}

    @property
    def mean_corrupted(self) -> float:
        values = [v for by in self.corrupted.values() for v in by.values()]
        return sum(values) / len(values) if values else float("nan")

    def to_dict(self) -> dict:
        return {"clean_top1": self.clean, "mean_corruption_top1": self.mean_corrupted, "images": self.images,
                "corrupted_images": self.corrupted_images, "per_corruption": self.per_corruption,
                "corrupted": {k: {str(s): v for s, v in by.items()} for k, by in self.corrupted.items()}}  # fmt: skip

    def table(self) -> str:
        severities = sorted({s for by in self.corrupted.values() for s in by})
        lines = [(f"clean top-1 {self.clean:.4f} ({self.images} images); "
                 f"mean over corruptions and severities {self.mean_corrupted:.4f} ({self.corrupted_images} images each)"),
                 "corruption        " + " ".join(f"  s{s}  " for s in severities) + "  mean"]  # fmt: skip
        for name, by in self.corrupted.items():
            values = " ".join(f"{by[s]:.4f}" for s in severities)
            lines.append(f"{name:<17} {values} {self.per_corruption[name]:.4f}")
        return "\n".join(lines)


def evaluate_robustness(
    model: nn.Module,
    data: ImageFolderData,
    preprocessing: Preprocessing,
    *,
    corruptions: tuple[str, ...] = CORRUPTIONS,
    severities: tuple[int, ...] = SEVERITIES,
    per_class: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = True,
) -> RobustnessReport:
    """Top-1 of ``model`` on ``data`` (clean, all of it) and on its corrupted copies.

    ``per_class`` evaluates the corrupted copies on a fixed class-balanced
    sample of that many images per class (the same sample for every model),
    to bound the cost: 10 corruptions x 5 severities is 50 passes over it.
    """
    unknown = sorted(set(corruptions) - set(CORRUPTIONS))
    if unknown:
        raise InvalidInputError(f"unknown corruptions {unknown}; known: {', '.join(CORRUPTIONS)}")
    wrong = sorted(set(severities) - set(SEVERITIES))
    if wrong:
        raise InvalidInputError(f"severities must be among {SEVERITIES}, not {wrong}")
    clean = evaluate_accuracy(model, data, batch_size=batch_size, progress=progress, description="clean")
    indices = balanced_subset(data.targets, per_class, seed) if per_class else range(len(data))
    report = RobustnessReport(clean["val_top1"], images=clean["val_images"], corrupted_images=len(indices))
    jobs = [(name, severity) for name in corruptions for severity in severities]
    for name, severity in tqdm(jobs, desc="corruptions", disable=not progress):
        corrupted = Subset(CorruptedData(data, preprocessing, name, severity, seed), indices)
        result = evaluate_accuracy(model, corrupted, batch_size=batch_size)
        report.corrupted.setdefault(name, {})[severity] = result["val_top1"]
    return report
