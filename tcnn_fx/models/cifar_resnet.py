"""ResNets for 32x32 CIFAR images (He et al., 2016, section 4.2).

The architecture of the widely used CIFAR-10 ResNet-20/32/44/56 checkpoints:
a 3x3 stem with 16 channels, three stages of basic blocks with 16, 32 and 64
channels at 32x32, 16x16 and 8x8, parameter-free shortcuts ("option A":
subsample and zero-pad channels) where the shape changes, global average
pooling and a linear classifier.  Parameter names match those checkpoints
(``conv1``, ``bn1``, ``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}``, ``linear``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from tcnn_fx.errors import InvalidInputError

#: Blocks per stage for each depth: depth = 6 * blocks + 2.
CIFAR_DEPTHS = {20: 3, 32: 5, 44: 7, 56: 9, 110: 18}


class _PadShortcut(nn.Module):
    """Option-A shortcut: take every other pixel and zero-pad the channels on both sides."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _PadShortcut(planes) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, blocks: int, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            stage = []
            for i in range(blocks):
                stage.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(out.mean((2, 3)))


def cifar_resnet(depth: int, num_classes: int = 10) -> CifarResNet:
    """The CIFAR ResNet of the given depth (20, 32, 44, 56 or 110)."""
    if depth not in CIFAR_DEPTHS:
        raise InvalidInputError(f"CIFAR ResNet depth {depth} is not one of {sorted(CIFAR_DEPTHS)}")
    return CifarResNet(CIFAR_DEPTHS[depth], num_classes)
