"""Small models for the compiler tests: each exercises one way convolutions appear in real code."""

import math

import torch
import torch.nn.functional as F
from torch import nn


class TinyResNet(nn.Module):
    """Stem, two residual stages (the second opened by a stride-2 conv), a 1x1 shortcut, a head."""

    def __init__(self, width: int = 8, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.a1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.a1_bn = nn.BatchNorm2d(width)
        self.b1 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.b1_bn = nn.BatchNorm2d(2 * width)
        self.b2 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.shortcut = nn.Conv2d(width, 2 * width, 1, stride=2)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        x = x + self.a1_bn(self.a1(x)).relu()
        y = torch.relu(self.b1_bn(self.b1(x)))
        x = F.silu(self.b2(y)) + self.shortcut(x)
        return self.head(x.mean((2, 3)))


def same_padding(x, kernel, stride):
    """F.pad amounts of TensorFlow's 'same' padding: computed from the input size, so wrapped for tracing."""
    ih, iw = x.shape[-2:]
    ph = max((-(-ih // stride[0]) - 1) * stride[0] + kernel[0] - ih, 0)
    pw = max((-(-iw // stride[1]) - 1) * stride[1] + kernel[1] - iw, 0)
    return [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]


torch.fx.wrap("same_padding")


class SameConv(nn.Conv2d):
    """TensorFlow-style 'same' padding before a functional convolution, as timm's Conv2dSame does."""

    def forward(self, x):
        x = F.pad(x, same_padding(x, self.kernel_size, self.stride))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class FunctionalNet(nn.Module):
    """A 'same' conv with a custom forward, a shared conv, and a conv whose weight is computed."""

    def __init__(self):
        super().__init__()
        self.same = SameConv(3, 6, 3, stride=2)
        self.shared = nn.Conv2d(6, 6, 3, padding=1)
        self.scale = nn.Parameter(torch.ones(6, 1, 1, 1))
        self.raw = nn.Parameter(torch.randn(6, 6, 3, 3) * 0.1)
        self.norm = nn.GroupNorm(2, 6)

    def forward(self, x):
        x = self.norm(self.same(x)).relu()
        x = self.shared(self.shared(x))
        return F.conv2d(x, self.raw * self.scale, padding=1)


class Untraceable(nn.Module):
    """Python control flow on tensor values: symbolic tracing fails inside it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return -self.conv(x)


class WithUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Untraceable()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(self.inner(x))


def tiny_vit(
    num_classes: int = 5, img_size: int = 16, patch_size: int = 4, embed_dim: int = 32, num_heads: int = 2, **kwargs
):
    """A timm ViT small enough for the tests: a 4x4 token grid and a class token at the default size."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=2, num_heads=num_heads,
                             mlp_ratio=2, num_classes=num_classes, **kwargs)  # fmt: skip


class SequenceFirstViT(nn.Module):
    """A ViT built on ``nn.MultiheadAttention`` with sequence-first tensors and no class token (mean pooling)."""

    def __init__(self, num_classes: int = 5, width: int = 24, grid: int = 4, patch: int = 4):
        super().__init__()
        self.patchify = nn.Conv2d(3, width, patch, stride=patch)
        self.pos_embedding = nn.Parameter(torch.randn(1, grid * grid, width) * 0.02)
        self.norms = nn.ModuleList([nn.LayerNorm(width) for _ in range(2)])
        self.attentions = nn.ModuleList([nn.MultiheadAttention(width, 3) for _ in range(2)])
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        tokens = self.patchify(x).flatten(2).transpose(1, 2) + self.pos_embedding
        tokens = tokens.transpose(0, 1)  # (L, B, D)
        for norm, attention in zip(self.norms, self.attentions, strict=True):
            normed = norm(tokens)
            tokens = tokens + attention(normed, normed, normed, need_weights=False)[0]
        return self.head(tokens.mean(0))


class StaticSamePadConv(nn.Conv2d):
    """A convolution that owns its TensorFlow-style 'same' padding as a child module, fixed for one image
    size (``nn.ZeroPad2d``, or ``nn.Identity`` where none is needed), and calls it in ``forward`` before
    ``F.conv2d``: how widely used third-party EfficientNet/MobileNet packages write their convolutions."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, image_size=16, **kwargs):
        super().__init__(in_channels, out_channels, kernel_size, stride, **kwargs)
        pads = []
        for size, kernel, step, dilation in zip((image_size, image_size), self.kernel_size, self.stride, self.dilation):
            pads.append(max((-(-size // step) - 1) * step + (kernel - 1) * dilation + 1 - size, 0))
        pad_h, pad_w = pads
        if pad_h > 0 or pad_w > 0:
            self.static_padding = nn.ZeroPad2d((pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        else:
            self.static_padding = nn.Identity()

    def forward(self, x):
        x = self.static_padding(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StaticSameNet(nn.Module):
    """An EfficientNet-like net built from ``StaticSamePadConv``: stem, a depthwise block with a residual,
    a stride-2 depthwise block, a 1x1 conv (its padding child is an ``nn.Identity``) and a head."""

    def __init__(self, image_size: int = 16, width: int = 8, classes: int = 4):
        super().__init__()
        self._conv_stem = StaticSamePadConv(3, width, 3, stride=2, image_size=image_size, bias=False)
        self._bn0 = nn.BatchNorm2d(width)
        size = image_size // 2
        self._depthwise_conv = StaticSamePadConv(width, width, 3, groups=width, image_size=size, bias=False)
        self._bn1 = nn.BatchNorm2d(width)
        self._reduce_conv = StaticSamePadConv(width, 2 * width, 3, stride=2, image_size=size, bias=False)
        self._project_conv = StaticSamePadConv(2 * width, 2 * width, 1, image_size=size // 2, bias=False)
        self._conv_head = StaticSamePadConv(2 * width, 2 * width, 3, image_size=size // 2)
        self._fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = F.silu(self._bn0(self._conv_stem(x)))
        x = x + F.silu(self._bn1(self._depthwise_conv(x)))
        x = self._project_conv(F.silu(self._reduce_conv(x)))
        x = x + self._conv_head(x)
        return self._fc(x.mean((2, 3)))


def drop_connect(x, p, training):
    """Functional stochastic depth, as third-party EfficientNets write it: its code depends on the mode."""
    if not training:
        return x
    keep = torch.floor(1 - p + torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device))
    return x / (1 - p) * keep


class DropConnectBlock(nn.Module):
    """A residual block whose own forward differs between train and eval: capture keeps it whole."""

    def __init__(self, width: int, image_size: int):
        super().__init__()
        self.expand = StaticSamePadConv(width, 2 * width, 1, image_size=image_size, bias=False)
        self.bn0 = nn.BatchNorm2d(2 * width)
        self.depthwise = StaticSamePadConv(2 * width, 2 * width, 3, groups=2 * width, image_size=image_size, bias=False)
        self.bn1 = nn.BatchNorm2d(2 * width)
        self.project = nn.Conv2d(2 * width, width, 1, bias=False)

    def forward(self, x, drop_rate: float = 0.2):
        y = F.silu(self.bn0(self.expand(x)))
        y = self.project(F.silu(self.bn1(self.depthwise(y))))
        return x + drop_connect(y, drop_rate, self.training)


class DataDependent(nn.Module):
    """Python control flow on tensor values around two convolutions, one of them called twice."""

    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.shared = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if y.mean() > 100:  # never, but tracing cannot know
            y = -y
        return self.shared(self.shared(y))


class KeptWholeNet(nn.Module):
    """Convolutions that capture can only reach inside modules it keeps whole."""

    def __init__(self, width: int = 8, image_size: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.block = DropConnectBlock(width, image_size // 2)
        self.down = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.tail = DataDependent(width)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        x = self.block(F.relu(self.stem(x)))
        return self.head(self.tail(F.relu(self.down(x))).mean((2, 3)))


class DynamicSamePadConv(nn.Conv2d):
    """TensorFlow 'same' padding computed in ``forward`` with Python arithmetic on the input size (as the
    dynamic variant of third-party EfficientNets does): it cannot be traced, so capture keeps it whole."""

    def forward(self, x):
        ih, iw = x.size()[-2:]
        kh, kw = self.weight.size()[-2:]
        pad_h = max((math.ceil(ih / self.stride[0]) - 1) * self.stride[0] + kh - ih, 0)
        pad_w = max((math.ceil(iw / self.stride[1]) - 1) * self.stride[1] + kw - iw, 0)
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
