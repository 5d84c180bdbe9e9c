"""Tiny ImageFolder datasets written to disk for the fine-tuning and robustness tests."""

from pathlib import Path

import numpy as np
from PIL import Image

#: Class colours: the classes are separable by mean colour, so a few steps learn them.
COLOURS = {"blue": (30, 60, 200), "green": (40, 190, 60), "red": (210, 40, 30)}


def write_imagefolder(root: Path, per_class: dict[str, int] | None = None, size: int = 16, seed: int = 0) -> Path:
    """``root/{train,val}/<class>/*.png``: noisy images of each class colour; returns ``root``."""
    rng = np.random.default_rng(seed)
    per_class = per_class or {"train": 24, "val": 8}
    for split, count in per_class.items():
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root
