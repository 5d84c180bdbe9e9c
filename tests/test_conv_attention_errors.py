"""What the layer cannot reproduce exactly is refused with an error naming the cause."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from tcnn_fx import ConvAttention2d, ConvAttentionConfig


class SamePadConv2d(nn.Conv2d):
    """TensorFlow-style dynamic 'same' padding, as timm's Conv2dSame does."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (nn.ConvTranspose2d(3, 3, 3), "transposed"),
        (nn.ConvTranspose1d(3, 3, 3), "transposed"),
        (nn.Conv1d(3, 3, 3), "not 2-d"),
        (nn.Conv3d(3, 3, 3), "not 2-d"),
        (nn.Linear(3, 3), "expected an nn.Conv2d"),
    ],
)
def test_non_conv2d_modules_are_type_errors(module, message):
    with pytest.raises(TypeError, match=message):
        ConvAttention2d.from_conv(module)


def test_custom_forward_is_refused():
    with pytest.raises(ValueError, match=r"SamePadConv2d overrides forward\(\)"):
        ConvAttention2d.from_conv(SamePadConv2d(3, 3, 3, stride=2))


def test_hooks_are_refused():
    conv = nn.Conv2d(3, 3, 3)
    conv.register_forward_hook(lambda module, args, out: out * 2)
    with pytest.raises(ValueError, match="_forward_hooks"):
        ConvAttention2d.from_conv(conv)


def test_pruned_convolution_is_reproduced():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    prune.l1_unstructured(conv, "weight", amount=0.5)
    x = torch.randn(1, 4, 6, 6)
    out = ConvAttention2d.from_conv(conv)(x)
    assert ((out - conv(x)).abs().max() / conv(x).abs().max()) <= 1e-6


def test_lazy_convolution_must_be_materialised():
    with pytest.raises(ValueError, match="uninitialised"):
        ConvAttention2d.from_conv(nn.LazyConv2d(4, 3))


def test_complex_weights_are_refused():
    with pytest.raises(TypeError, match="complex"):
        ConvAttention2d.from_conv(nn.Conv2d(2, 2, 3, dtype=torch.complex64))


def test_wrong_input_channels_and_sizes():
    layer = ConvAttention2d(4, 4, 5)
    with pytest.raises(ValueError, match="4 channels"):
        layer(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="NCHW"):
        layer(torch.randn(4, 8, 8))
    with pytest.raises(ValueError, match="smaller than the dilated kernel 5x5"):
        layer(torch.randn(1, 4, 4, 8))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(padding="same", stride=2), "padding='same' needs stride 1"),
        (dict(padding="full"), "'same' or 'valid'"),
        (dict(padding_mode="mirror"), "padding_mode 'mirror'"),
        (dict(groups=3), "divisible by groups"),
        (dict(kernel_size=0), "kernel_size must be two positive ints"),
    ],
)
def test_bad_constructor_arguments(kwargs, message):
    arguments = dict(in_channels=4, out_channels=4, kernel_size=3) | kwargs
    with pytest.raises(ValueError, match=message):
        ConvAttention2d(**arguments)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(gate="tanh"), "gate must be"),
        (dict(locality_strength=-1.0), "locality_strength"),
        (dict(locality_strength=float("inf")), "locality_strength"),
        (dict(qk_dim=0), "qk_dim"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConvAttentionConfig(**kwargs)


def test_unknown_config_fields():
    with pytest.raises(ValueError, match="unknown ConvAttentionConfig fields"):
        ConvAttentionConfig.from_dict({"gate": "linear", "temperature": 2})


def test_the_source_convolution_is_not_modified():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3, 3).train()
    state = {k: v.clone() for k, v in conv.state_dict().items()}
    layer = ConvAttention2d.from_conv(conv)
    with torch.no_grad():
        layer.weight.add_(1.0)
    assert all(torch.equal(state[k], v) for k, v in conv.state_dict().items())
    assert layer.training and conv.training
