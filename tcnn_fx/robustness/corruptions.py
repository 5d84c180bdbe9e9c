"""Common image corruptions at five severities, after Hendrycks & Dietterich (ICLR 2019).

Re-implemented on tensors (and PIL for JPEG and pixelation) with the
parameters of the authors' generators, ``make_cifar_c.py`` for images up to
64 pixels and ``make_imagenet_c.py`` above (CIFAR-10-C and ImageNet-C); the
tables below are those parameters.  Each corruption maps a float image in
[0, 1], ``(3, H, W)``, to another, drawing its noise from the generator it is
given, so a corrupted test set is the same for every model evaluated.

The package index's ``imagecorruptions`` needs OpenCV, scikit-image and
Wand/ImageMagick and pins old versions of them; the seven-plus corruptions
used here need none of that.  Not offered: the corruptions that need
ImageMagick or image assets (motion blur, snow, frost, fog, glass blur,
elastic transform, spatter, zoom blur).
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from tcnn_fx.errors import InvalidInputError

SEVERITIES = (1, 2, 3, 4, 5)
#: Images at most this many pixels on a side use the CIFAR-10-C parameters, larger ones ImageNet-C's.
SMALL = 64

#: corruption: (CIFAR-10-C parameters, ImageNet-C parameters), one per severity.
PARAMETERS: dict[str, tuple[tuple, tuple]] = {
    "gaussian_noise": ((0.04, 0.06, 0.08, 0.09, 0.10), (0.08, 0.12, 0.18, 0.26, 0.38)),  # noise std
    "shot_noise": ((500, 250, 100, 75, 50), (60, 25, 12, 5, 3)),  # photons at full intensity
    "impulse_noise": ((0.01, 0.02, 0.03, 0.05, 0.07), (0.03, 0.06, 0.09, 0.17, 0.27)),  # salt-and-pepper share
    "speckle_noise": ((0.06, 0.1, 0.12, 0.16, 0.2), (0.15, 0.2, 0.35, 0.45, 0.6)),  # multiplicative noise std
    "gaussian_blur": ((0.4, 0.6, 0.7, 0.8, 1.0), (1, 2, 3, 4, 6)),  # sigma in pixels
    "defocus_blur": (  # disk radius, anti-aliasing sigma
        ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
        ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
    ),
    "contrast": ((0.75, 0.5, 0.4, 0.3, 0.15), (0.4, 0.3, 0.2, 0.1, 0.05)),  # contrast factor
    "brightness": ((0.05, 0.1, 0.15, 0.2, 0.3), (0.1, 0.2, 0.3, 0.4, 0.5)),  # added to HSV value
    "jpeg_compression": ((80, 65, 58, 50, 40), (25, 18, 15, 10, 7)),  # JPEG quality
    "pixelate": ((0.95, 0.9, 0.85, 0.75, 0.65), (0.6, 0.5, 0.4, 0.3, 0.25)),  # down-sampling factor
}
CORRUPTIONS = tuple(PARAMETERS)


def parameter(name: str, severity: int, size: int):
    """The parameter of corruption ``name`` at ``severity`` for images of ``size`` pixels."""
    if name not in PARAMETERS:
        raise InvalidInputError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise InvalidInputError(f"severity must be one of {SEVERITIES}, not {severity}")
    return PARAMETERS[name][0 if size <= SMALL else 1][severity - 1]


@functools.lru_cache(maxsize=64)
def _gaussian_kernel(sigma: float, radius: int) -> Tensor:
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def _filter(x: Tensor, kernel: Tensor, mode: str) -> Tensor:
    """Each channel of ``x`` correlated with a 2-D ``kernel``, borders padded by ``mode``."""
    kh, kw = kernel.shape
    padded = F.pad(x[:, None], (kw // 2, kw // 2, kh // 2, kh // 2), mode=mode)
    return F.conv2d(padded, kernel[None, None].to(x.dtype).contiguous())[:, 0]


def gaussian_noise(x: Tensor, c: float, generator: torch.Generator) -> Tensor:
    return x + torch.randn(x.shape, generator=generator) * c


def shot_noise(x: Tensor, c: float, generator: torch.Generator) -> Tensor:
    return torch.poisson(x.double() * c, generator=generator).to(x.dtype) / c


def impulse_noise(x: Tensor, c: float, generator: torch.Generator) -> Tensor:
    """Salt and pepper: a share ``c`` of the values (per channel) set to 0 or 1, evenly."""
    hit = torch.rand(x.shape, generator=generator) < c
    salt = torch.rand(x.shape, generator=generator) < 0.5
    return torch.where(hit, salt.to(x.dtype), x)


def speckle_noise(x: Tensor, c: float, generator: torch.Generator) -> Tensor:
    return x + x * torch.randn(x.shape, generator=generator) * c


def gaussian_blur(x: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
    """Separable Gaussian, truncated at 4 sigma, nearest-pixel borders (scikit-image's ``gaussian``)."""
    kernel = _gaussian_kernel(sigma, int(4 * sigma + 0.5))
    return _filter(_filter(x, kernel[None], "replicate"), kernel[:, None], "replicate")


@functools.lru_cache(maxsize=16)
def _disk_kernel(radius: float, alias_sigma: float) -> Tensor:
    """OpenCV-style anti-aliased disk: a normalised disk blurred by a 3x3 (5x5 beyond radius 8) Gaussian."""
    extent = 8 if radius <= 8 else math.ceil(radius)
    offsets = torch.arange(-extent, extent + 1, dtype=torch.float64)
    disk = ((offsets[:, None] ** 2 + offsets[None] ** 2) <= radius**2).double()
    alias = _gaussian_kernel(alias_sigma, 1 if radius <= 8 else 2)
    kernel = _filter(_filter((disk / disk.sum())[None], alias[None], "reflect"), alias[:, None], "reflect")[0]
    return kernel.float()


def defocus_blur(x: Tensor, c: tuple[float, float], generator: torch.Generator) -> Tensor:
    """A disk of radius ``c[0]`` anti-aliased with sigma ``c[1]``; mirrored borders (OpenCV's default)."""
    kernel = _disk_kernel(*c)
    # Mirrored padding needs an image wider than the kernel's half-width; tiny images repeat their edge.
    mode = "reflect" if min(x.shape[-2:]) > kernel.shape[-1] // 2 else "replicate"
    return _filter(x, kernel, mode)


def contrast(x: Tensor, c: float, generator: torch.Generator) -> Tensor:
    mean = x.mean(dim=(-2, -1), keepdim=True)
    return (x - mean) * c + mean


def brightness(x: Tensor, c: float, generator: torch.Generator) -> Tensor:
    """Add ``c`` to the HSV value, hue and saturation unchanged (so RGB scales by the new value over the old)."""
    value = x.amax(dim=0, keepdim=True)
    brighter = (value + c).clamp(0, 1)
    return torch.where(value > 0, x * brighter / value.clamp_min(1e-12), brighter)


def _pil(x: Tensor) -> Image.Image:
    return Image.fromarray((x.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy())


def _tensor(image: Image.Image) -> Tensor:
    return (
        torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        .reshape(image.height, image.width, 3)
        .permute(2, 0, 1)
        / 255.0
    )


def jpeg_compression(x: Tensor, quality: int, generator: torch.Generator) -> Tensor:
    buffer = io.BytesIO()
    _pil(x).save(buffer, "JPEG", quality=quality)
    with Image.open(buffer) as image:
        return _tensor(image.convert("RGB"))


def pixelate(x: Tensor, c: float, generator: torch.Generator) -> Tensor:
    image = _pil(x)
    small = image.resize((int(image.width * c), int(image.height * c)), Image.Resampling.BOX)
    return _tensor(small.resize(image.size, Image.Resampling.BOX))


FUNCTIONS: dict[str, Callable[[Tensor, object, torch.Generator], Tensor]] = {
    name: globals()[name] for name in CORRUPTIONS
}


def corrupt(image: Tensor, name: str, severity: int, generator: torch.Generator) -> Tensor:
    """``image`` (uint8 ``(3, H, W)``) with corruption ``name`` at ``severity``, as uint8.

    Values are clipped to [0, 1] and truncated to 8 bits, as the reference
    generators store their images.
    """
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise InvalidInputError(f"expected a uint8 RGB image (3, H, W), got {image.dtype} {tuple(image.shape)}")
    c = parameter(name, severity, max(image.shape[-2:]))
    out = FUNCTIONS[name](image.float() / 255.0, c, generator)
    return (out.clamp(0, 1) * 255).to(torch.uint8)
