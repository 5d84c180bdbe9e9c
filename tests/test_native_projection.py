"""The compiled projection kernel (``native_projection``): the convolution's sums, in the convolution's order.

``csrc/project_taps.cpp`` replaces the strided convolution that projects the
heads' gathered taps in CPU inference.  It adds the products in the order of
oneDNN's direct convolution, so on the processors it is used on by default
(AVX2) it equals ``F.conv2d`` to the last bit where oneDNN runs that; a layer
uses it for taps of a given signature only once it has reproduced the
strided convolution there, so a layer's results are the strided
convolution's, bit for bit, with or without the kernel.  A failed build must
leave the layer correct, with one warning.  The build (about 30 s) happens
once per machine, cached under ``TORCH_EXTENSIONS_DIR``.
"""

import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_builds import built, counting
from strategies import conv_cases, relative_error, term_scale
from torch import nn

from tcnn_fx import ConvAttention2d
from tcnn_fx.layers import cpp_kernels, native, native_projection

#: Where the kernel's order was measured to be oneDNN's (its default processors); elsewhere only rounding holds.
MEASURED = torch.backends.cpu.get_cpu_capability() in native_projection.DEFAULT_CAPABILITIES


@pytest.fixture
def module(monkeypatch):
    """The built kernel, enabled on any processor; skipped where it cannot be built (cached)."""
    return built(native_projection, monkeypatch)


@pytest.fixture
def calls(module, monkeypatch) -> list[str]:
    """The kernel enabled on any processor, its calls counted."""
    return counting(native_projection, module, ("project_taps",), monkeypatch)


def taps_of(x, conv: nn.Conv2d) -> torch.Tensor:
    """What the heads gather at initialisation: every tap of every output pixel, ``(B, C, taps, Q)``."""
    kh, kw = conv.kernel_size
    cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    return cols.reshape(x.shape[0], conv.in_channels, kh * kw, -1)


def projected(conv: nn.Conv2d, taps: torch.Tensor) -> torch.Tensor:
    ops = native_projection.operands(conv.weight, conv.groups)
    with torch.no_grad():
        return native_projection.project(taps, ops, conv.bias, conv.out_channels)


@st.composite
def projections(draw):
    """A zero-padded convolution and an input: channel counts on and off oneDNN's blocks of 8, output rows on and
    off the kernel's tiles of 6, output pixel counts on and off its panels of 16, groups (depthwise too)."""
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    in_per_group = 1 if draw(st.booleans()) else draw(st.integers(1, 20))
    out_per_group = draw(st.integers(1, 14))
    kernel = (draw(st.integers(1, 5)), draw(st.integers(1, 4)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    spans = [d * (k - 1) + 1 - 2 * p for k, d, p in zip(kernel, dilation, padding)]
    size = [draw(st.integers(max(1, s), max(1, s) + 20)) for s in spans]
    torch.manual_seed(draw(st.integers(0, 2**16)))
    conv = nn.Conv2d(
        in_per_group * groups, out_per_group * groups, kernel, stride, padding, dilation, groups,
        bias=draw(st.booleans()),
    )  # fmt: skip
    return conv, torch.randn(draw(st.integers(1, 3)), conv.in_channels, *size)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=projections())
def test_the_convolutions_function_to_rounding(case, module):
    # Whichever order PyTorch sums in here: two orders of K float32 additions differ by at most 2 K u times the
    # sum of the terms' magnitudes (u = 2^-24, recursive summation's bound).
    conv, x = case
    with torch.no_grad():
        expected = conv(x)
        actual = projected(conv, taps_of(x, conv)).reshape(expected.shape)
    terms = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1] + 1
    magnitude = term_scale(x, conv.weight) + (0 if conv.bias is None else conv.bias.abs().max())
    assert (actual - expected).abs().max() <= 2 * terms * 2**-24 * magnitude


@pytest.mark.parametrize(
    ("channels", "out", "size", "stride", "batch", "groups"),
    [
        (64, 64, 8, 1, 4, 1), (32, 64, 16, 2, 4, 1), (256, 256, 14, 1, 1, 1), (512, 512, 7, 1, 2, 1),
        (256, 512, 14, 2, 1, 1), (20, 24, 9, 1, 2, 1), (3, 16, 12, 1, 2, 1), (64, 128, 10, 1, 2, 4),
        (64, 64, 10, 1, 2, 64), (96, 96, 10, 2, 2, 2), (16, 16, 3, 2, 5, 1),
    ],
    ids=[
        "cifar", "cifar-stride2", "14x14", "7x7", "14x14-stride2", "channels-off-blocks", "three-channels",
        "grouped", "depthwise", "grouped-stride2", "2x2-maps-five-to-a-tile",
    ],
)  # fmt: skip
def test_the_convolutions_sums_where_onednn_convolves_directly(channels, out, size, stride, batch, groups, module):
    # Shapes oneDNN runs as its direct convolution (ONEDNN_VERBOSE=1 says jit:avx2 or jit_uni_dw): on the
    # processors the kernel is used on by default, its sums are the convolution's to the last bit.
    torch.manual_seed(channels + size)
    conv = nn.Conv2d(channels, out, 3, stride, 1, groups=groups)
    x = torch.randn(batch, channels, size, size)
    with torch.no_grad():
        expected = conv(x)
        actual = projected(conv, taps_of(x, conv)).reshape(expected.shape)
    if MEASURED:
        assert torch.equal(actual, expected)
    assert relative_error(actual, expected) <= 1e-6


def test_the_same_on_any_number_of_threads(module):
    # Tasks are (image, group, 16 pixels, output rows): each output written by one thread, in one order.
    torch.manual_seed(1)
    conv = nn.Conv2d(24, 40, 3, padding=1)
    taps = taps_of(torch.randn(3, 24, 9, 11), conv)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(projected(conv, taps))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results[1:])


def layer_outputs(layer, x, monkeypatch, kernel: bool, calls: int = 2) -> list[torch.Tensor]:
    """The layer's inference outputs on ``x`` over ``calls`` calls, the kernel enabled or not."""
    with monkeypatch.context() as patch, torch.no_grad():
        patch.setenv(native_projection.SETTING, "1" if kernel else "0")
        return [layer(x) for _ in range(calls)]


@pytest.mark.parametrize(
    ("kwargs", "uses_kernel"),
    [
        ({"kernel_size": 3, "padding": 1}, True),
        ({"kernel_size": 3, "stride": 2, "padding": 1, "bias": False}, True),
        ({"kernel_size": 3, "padding": 1, "padding_mode": "reflect", "groups": 2}, True),
        ({"kernel_size": (2, 3), "padding": "same", "dilation": 2, "padding_mode": "circular"}, True),
        ({"kernel_size": 3, "padding": 1, "groups": 4}, False),  # 4 channels a group: oneDNN multiplies matrices
    ],
    ids=["3x3", "stride2", "reflect-grouped", "same-dilated-circular", "grouped-off-blocks"],
)
def test_layers_use_it_where_it_reproduces_the_convolution(kwargs, uses_kernel, calls, monkeypatch):
    torch.manual_seed(7)
    conv = nn.Conv2d(16, 32, **kwargs)
    layer = ConvAttention2d.from_conv(conv).eval()
    x = torch.randn(4, 16, 11, 9)
    first, second = layer_outputs(layer, x, monkeypatch, kernel=True)
    # The first call checks the kernel against the convolution; the second uses it only if they agreed.
    assert calls == ["project_taps"] * (1 + uses_kernel)
    reference = layer_outputs(layer, x, monkeypatch, kernel=False)[0]
    assert torch.equal(first, reference) and torch.equal(second, reference)
    with torch.no_grad():
        assert relative_error(first, conv(x)) <= 1e-6
    with torch.no_grad():  # open gates, soft maps: the taps are mixtures; still the convolution's sums
        layer.gate.uniform_(0.1, 0.9)
        layer.locality.fill_(1.5)
    opened = layer_outputs(layer, x, monkeypatch, kernel=True)
    assert all(torch.equal(out, layer_outputs(layer, x, monkeypatch, kernel=False)[0]) for out in opened)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=conv_cases())
def test_a_layer_answers_the_same_bits_with_and_without_it(case, module, monkeypatch):
    # Every kind of convolution nn.Conv2d takes: whatever oneDNN or PyTorch runs, the first call and every later one.
    layer = ConvAttention2d.from_conv(case.conv()).eval()
    x = case.input()
    reference = layer_outputs(layer, x, monkeypatch, kernel=False, calls=1)[0]
    assert all(torch.equal(out, reference) for out in layer_outputs(layer, x, monkeypatch, kernel=True))


def test_a_kernel_that_disagrees_is_not_used(module, monkeypatch):
    # A build summing in another order (here: off by one unit in the last place) loses to the convolution.
    counted = []

    def off_by_an_ulp(taps, packed, channels, tap_index, bias, out, scratch):
        counted.append(1)
        module.project_taps(taps, packed, channels, tap_index, bias, out, scratch)
        out.copy_(torch.nextafter(out, torch.full_like(out, float("inf"))))

    monkeypatch.setattr(native_projection, "_module", lambda: SimpleNamespace(project_taps=off_by_an_ulp))
    torch.manual_seed(2)
    layer = ConvAttention2d.from_conv(nn.Conv2d(8, 8, 3, padding=1)).eval()
    x = torch.randn(2, 8, 6, 6)
    outputs = layer_outputs(layer, x, monkeypatch, kernel=True, calls=3)
    assert counted == [1]  # the check, then never again
    reference = layer_outputs(layer, x, monkeypatch, kernel=False, calls=1)[0]
    assert all(torch.equal(out, reference) for out in outputs)


def test_a_call_on_zeros_settles_nothing(calls, monkeypatch):
    # Every order sums zeros alike: a warm-up on zeros must not let a kernel through unchecked.
    torch.manual_seed(6)
    layer = ConvAttention2d.from_conv(nn.Conv2d(8, 8, 3, padding=1)).eval()
    zeros, x = torch.zeros(2, 8, 6, 6), torch.randn(2, 8, 6, 6)
    layer_outputs(layer, zeros, monkeypatch, kernel=True)
    assert not calls
    layer_outputs(layer, x, monkeypatch, kernel=True)
    assert calls == ["project_taps"] * 2  # checked on real taps, then used


def test_layout_with_images_along_the_rows(module, monkeypatch):
    # The compiled attention kernel and the oneDNN gather hand the projection (1, C, images * heads, queries).
    monkeypatch.setenv(native_projection.SETTING, "1")
    torch.manual_seed(3)
    layer = ConvAttention2d.from_conv(nn.Conv2d(16, 16, 3, padding=1)).eval()
    gathered = torch.randn(3, 16, 9, 30)
    rows = gathered.transpose(0, 1).reshape(1, 16, 27, 30)
    with torch.no_grad():
        expected = layer._project_convolution(gathered)
        for _ in range(2):  # the check, then the kernel
            assert torch.equal(layer._project(gathered), expected)
            assert torch.equal(layer._project(rows), expected)


def test_not_used_in_training_in_float64_or_when_off(calls, monkeypatch):
    torch.manual_seed(4)
    layer = ConvAttention2d.from_conv(nn.Conv2d(8, 8, 3, padding=1)).eval()
    x = torch.randn(2, 8, 6, 6)
    layer(x)  # autograd records: training projects with a matrix product
    with torch.no_grad():
        ConvAttention2d.from_conv(nn.Conv2d(8, 8, 3, padding=1).double())(x.double())
        monkeypatch.setenv(native_projection.SETTING, "0")
        layer(x)
    assert not calls
    monkeypatch.setenv(native_projection.SETTING, "1")
    with torch.no_grad():
        layer(x)
    assert calls == ["project_taps"]


def test_used_by_default_where_measured_faster(monkeypatch):
    monkeypatch.delenv(native_projection.SETTING, raising=False)
    monkeypatch.delenv(native.SETTING, raising=False)
    for capability, expected in (("AVX2", True), ("AVX512", False), ("DEFAULT", False)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert native_projection.enabled() is expected
    monkeypatch.setenv(native.SETTING, "0")  # no compiled kernels at all
    assert not native_projection.enabled()
    monkeypatch.setenv(native_projection.SETTING, "1")  # unless this one is asked for
    assert native_projection.enabled()


def test_reduction_order_is_onednns():
    channels, taps = native_projection.reduction_order(10, 2, 8)
    # Channels 0-7 at tap 0, then at tap 1, then the partial block of channels 8-9 at tap 0 and tap 1.
    assert channels.tolist() == [*range(8), *range(8), 8, 9, 8, 9]
    assert taps.tolist() == [0] * 8 + [1] * 8 + [0, 0, 1, 1]


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    def fail(**_):
        raise RuntimeError("Error building extension 'tcnn_fx_project_taps': no compiler")

    torch.manual_seed(5)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    layer = ConvAttention2d.from_conv(conv).eval()
    x = torch.randn(2, 8, 6, 6)
    monkeypatch.setenv(native_projection.SETTING, "1")
    monkeypatch.setattr(cpp_kernels._cpp_extension(), "load", fail)
    cpp_kernels.build.cache_clear()
    try:
        expected_warning = "could not build its CPU attention kernel project_taps.*no compiler"
        with pytest.warns(RuntimeWarning, match=expected_warning), torch.no_grad():
            first = layer(x)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("error")  # the failure is remembered: no second build, no second warning
            again = layer(x)
        with torch.no_grad():
            assert relative_error(first, conv(x)) <= 1e-6
        assert torch.equal(first, again)
    finally:
        cpp_kernels.build.cache_clear()  # later tests load the real build again
