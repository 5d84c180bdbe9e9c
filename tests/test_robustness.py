"""Corruptions: each matches its definition, grows with severity, is reproducible; the evaluation protocol."""

import colorsys
import io

import pytest
import torch
from imagefolders import write_imagefolder
from PIL import Image

from tcnn_fx.robustness import CORRUPTIONS, PARAMETERS, SEVERITIES, CorruptedData, corrupt, evaluate_robustness
from tcnn_fx.robustness.corruptions import _disk_kernel, parameter
from tcnn_fx.training import ImageFolderData, Preprocessing


def photo(size: int = 32, seed: int = 0) -> torch.Tensor:
    """A smooth image with structure (gradients and a square), uint8 (3, size, size)."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    image = torch.stack([x, y, (x + y) / 2]) * 0.6 + 0.2
    image[:, size // 4 : size // 2, size // 4 : size // 2] = torch.rand(3, 1, 1, generator=g)
    return (image * 255).to(torch.uint8)


def g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", CORRUPTIONS)
@pytest.mark.parametrize("size", [32, 96])
def test_every_corruption_keeps_shape_and_worsens_with_severity(name, size):
    image = photo(size)
    outputs = [corrupt(image, name, s, g()) for s in SEVERITIES]
    assert all(o.shape == image.shape and o.dtype == torch.uint8 for o in outputs)
    change = [(o.float() - image.float()).abs().mean().item() for o in outputs]
    assert change[0] > 0
    assert change[-1] > change[0]
    assert torch.equal(corrupt(image, name, 3, g(7)), corrupt(image, name, 3, g(7)))


def test_parameters_follow_the_image_size():
    assert parameter("gaussian_noise", 1, 32) == 0.04 and parameter("gaussian_noise", 1, 224) == 0.08
    assert parameter("jpeg_compression", 5, 64) == 40 and parameter("jpeg_compression", 5, 65) == 7
    assert all(len(cifar) == len(imagenet) == 5 for cifar, imagenet in PARAMETERS.values())
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        parameter("fog", 1, 32)
    with pytest.raises(ValueError, match="severity"):
        parameter("contrast", 6, 32)
    with pytest.raises(ValueError, match="uint8 RGB"):
        corrupt(photo().float(), "contrast", 1, g())


def test_noise_has_the_specified_statistics():
    grey = torch.full((3, 64, 64), 128, dtype=torch.uint8)
    noisy = corrupt(grey, "gaussian_noise", 5, g()).float() / 255  # std 0.38 on a 64 px image (ImageNet-C table)
    assert noisy.mean().item() == pytest.approx(128 / 255, abs=0.02)
    assert noisy.std().item() == pytest.approx(0.10, rel=0.1)  # 32-64 px: CIFAR table, severity 5 is 0.10
    shot = corrupt(grey, "shot_noise", 5, g()).float() / 255  # Poisson(x c) / c: variance x / c
    assert shot.var().item() == pytest.approx((128 / 255) / 50, rel=0.15)
    impulse = corrupt(grey, "impulse_noise", 5, g())
    share = ((impulse == 0) | (impulse == 255)).float().mean().item()
    assert share == pytest.approx(0.07, abs=0.01)


def test_brightness_equals_the_hsv_definition():
    image = photo()
    out = corrupt(image, "brightness", 4, g())
    c = parameter("brightness", 4, 32)
    expected = torch.empty(3, 32, 32)
    pixels = image.float().permute(1, 2, 0).reshape(-1, 3) / 255
    for i, (r, gr, b) in enumerate(pixels.tolist()):
        h, s, v = colorsys.rgb_to_hsv(r, gr, b)
        expected.view(3, -1)[:, i] = torch.tensor(colorsys.hsv_to_rgb(h, s, min(1.0, v + c)))
    assert (out.float() - (expected * 255).floor()).abs().max() <= 1


def test_contrast_keeps_the_mean_and_scales_deviations():
    image = photo()
    out = corrupt(image, "contrast", 5, g()).float() / 255
    x = image.float() / 255
    c = parameter("contrast", 5, 32)
    expected = (x - x.mean((1, 2), keepdim=True)) * c + x.mean((1, 2), keepdim=True)
    assert (out - expected).abs().max() <= 1 / 255 + 1e-6


def test_blurs_and_codecs():
    kernel = _disk_kernel(1.5, 0.1)
    assert kernel.shape == (17, 17) and kernel.sum().item() == pytest.approx(1, abs=1e-5)
    assert torch.allclose(kernel, kernel.flip(0)) and torch.allclose(kernel, kernel.T)
    flat = torch.full((3, 32, 32), 90, dtype=torch.uint8)
    for name in ("gaussian_blur", "defocus_blur"):  # blurs preserve flat images (up to 8-bit truncation)
        assert (corrupt(flat, name, 5, g()).int() - 90).abs().max() <= 1
    image = photo()
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, "JPEG", quality=40)
    reference = torch.from_numpy(__import__("numpy").array(Image.open(buffer).convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(corrupt(image, "jpeg_compression", 5, g()), reference)
    pixelated = corrupt(image, "pixelate", 5, g())  # 32 -> 20 -> 32 with box filters: blocks of equal pixels
    assert len(pixelated.reshape(3, -1).unique(dim=1).T) < len(image.reshape(3, -1).unique(dim=1).T)


def test_corrupted_copies_are_identical_for_every_model(tmp_path):
    root = write_imagefolder(tmp_path, {"train": 2, "val": 6})
    preprocessing = Preprocessing(16)
    split = ImageFolderData(root / "val", preprocessing.eval(), in_memory=True)
    a = CorruptedData(split, preprocessing, "gaussian_noise", 3, seed=0)
    b = CorruptedData(split, preprocessing, "gaussian_noise", 3, seed=0)
    other = CorruptedData(split, preprocessing, "gaussian_noise", 3, seed=1)
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(len(a)))
    assert not torch.equal(a[0][0], other[0][0]) and not torch.equal(a[0][0], a[1][0])


def test_evaluate_robustness_reports_every_cell(tmp_path):
    root = write_imagefolder(tmp_path, {"train": 2, "val": 6})
    preprocessing = Preprocessing(16)
    split = ImageFolderData(root / "val", preprocessing.eval(), in_memory=True)

    class MeanColour(torch.nn.Module):  # classifies by the dominant channel, exactly the data's classes
        def forward(self, x):
            means = x.mean((2, 3))
            return torch.stack([means[:, 2], means[:, 1], means[:, 0]], 1) * 10  # blue, green, red

    report = evaluate_robustness(MeanColour(), split, preprocessing, corruptions=("contrast", "gaussian_noise"),
                                 severities=(1, 5), per_class=4, progress=False)  # fmt: skip
    assert report.clean == 1.0 and report.images == 18 and report.corrupted_images == 12
    assert set(report.corrupted) == {"contrast", "gaussian_noise"} and set(report.corrupted["contrast"]) == {1, 5}
    values = [v for by in report.corrupted.values() for v in by.values()]
    assert report.mean_corrupted == pytest.approx(sum(values) / 4)
    assert (
        "gaussian_noise" in report.table()
        and report.to_dict()["corrupted"]["contrast"]["5"] == report.corrupted["contrast"][5]
    )
    with pytest.raises(ValueError, match="unknown corruptions"):
        evaluate_robustness(MeanColour(), split, preprocessing, corruptions=("snow",), progress=False)
