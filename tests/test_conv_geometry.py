"""ConvGeometry agrees with nn.Conv2d on sizes, padding and cost."""

import dataclasses

import pytest
from hypothesis import given, settings
from torch.utils.flop_counter import FlopCounterMode

from strategies import conv_cases
from tcnn_fx import ConvGeometry


@settings(max_examples=100)
@given(case=conv_cases())
def test_output_size_and_flops_match_the_convolution(case):
    conv = case.conv()
    geometry = ConvGeometry.of(conv)
    x = case.input()
    with FlopCounterMode(display=False) as counter:
        out = conv(x)
    assert geometry.output_size(case.height, case.width) == tuple(out.shape[-2:])
    flops = geometry.conv_flops(conv.in_channels, conv.out_channels, case.height, case.width)
    assert flops * case.batch == counter.get_total_flops()


def test_same_padding_puts_the_odd_pixel_last():
    assert ConvGeometry.resolve(4, padding="same").padding == (1, 2, 1, 2)
    assert ConvGeometry.resolve((3, 2), padding="same", dilation=(2, 3)).padding == (2, 2, 1, 2)
    assert ConvGeometry.resolve(3, padding="valid").padding == (0, 0, 0, 0)
    assert ConvGeometry.resolve(3, padding=(1, 2)).pad_last_first == (2, 2, 1, 1)


def test_tap_offsets_are_centred():
    assert ConvGeometry.resolve(3).tap_offsets()[4] == (0.0, 0.0)
    assert ConvGeometry.resolve(3, dilation=2).tap_offsets()[0] == (-2.0, -2.0)
    assert ConvGeometry.resolve(2).tap_offsets() == [(-0.5, -0.5), (-0.5, 0.5), (0.5, -0.5), (0.5, 0.5)]


def test_query_origin_inside_and_outside():
    assert ConvGeometry.resolve(3, padding=1).query_origin(7, 7) == (0, 0)
    assert ConvGeometry.resolve(3, padding=4).query_origin(7, 7) is None  # centres fall in the padding
    assert ConvGeometry.resolve(3, stride=2).query_origin(7, 7) == (1, 1)


def test_geometry_is_hashable_and_frozen():
    geometry = ConvGeometry.resolve(3, padding=1)
    assert hash(geometry) == hash(ConvGeometry.resolve(3, padding=(1, 1)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        geometry.groups = 2
