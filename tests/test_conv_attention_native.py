"""The compiled CPU kernel for ConvAttention2d inference: same function as the composed operators, safe fallback."""

import copy
import shutil
import statistics
import warnings

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from strategies import ConvCase, assert_equals_convolution, conv_cases, relative_error, term_scale
from torch import nn

from tcnn_fx import ConvAttention2d, ConvAttentionConfig
from tcnn_fx.layers import cpp_kernels, native

# The kernel is checked where layers use it: a C++ compiler to build it, a processor it is used on by default.
needs_compiler = pytest.mark.skipif(
    shutil.which("c++") is None or not native.enabled(),
    reason="the kernel is used on AVX-512 processors with a C++ compiler (TCNN_FX_NATIVE=1 elsewhere is unchecked)",
)


def opened(layer: ConvAttention2d, gate: float) -> ConvAttention2d:
    """``layer`` with content attention mixed in and soft positional maps (every key contributes)."""
    with torch.no_grad():
        layer.gate.fill_(gate)
        layer.centres.add_(0.3)
        layer.locality.fill_(0.7)
    return layer


def composed(layer: nn.Module, x: torch.Tensor, monkeypatch) -> torch.Tensor:
    """The layer's inference output from PyTorch operators alone."""
    with monkeypatch.context() as patch, torch.no_grad():
        patch.setenv(native.SETTING, "0")
        return layer(x)


@needs_compiler
def test_kernel_builds_where_a_compiler_is():
    assert native.attend_gather() is not None


@needs_compiler
@settings(max_examples=150, deadline=None)
@given(case=conv_cases(), gate=st.floats(0.05, 1.0), qk_dim=st.sampled_from([None, 1, 5, 16]))
@example(  # one output, the taps' terms nearly cancel: rounding is relative to the terms, not the output
    case=ConvCase(
        kwargs={"in_channels": 1, "out_channels": 1, "kernel_size": (3, 2), "bias": False},
        height=3, width=2, batch=1, seed=0, magnitude=1.0,
    ),
    gate=0.05,
    qk_dim=None,
)  # fmt: skip
def test_kernel_equals_composed_operators_with_content_attention_on(case, gate, qk_dim):
    layer = opened(ConvAttention2d.from_conv(case.conv(), ConvAttentionConfig(qk_dim=qk_dim)), gate)
    x = case.input() / max(case.magnitude, 1.0)  # large inputs: next test
    with torch.no_grad():
        fused = layer(x)
    with pytest.MonkeyPatch.context() as patch:
        expected = composed(layer, x, patch)
    assert fused.shape == expected.shape
    # Float32 rounding is relative to the terms summed, which may cancel: bound by their scale.
    assert (fused - expected).abs().max() <= 1e-5 * max(expected.abs().max(), term_scale(x, layer.weight))


@needs_compiler
def test_kernel_is_as_accurate_as_operators_on_large_inputs(monkeypatch):
    # Inputs scaled by 100 make the content softmax nearly an argmax: float32 rounding of near-tied
    # scores shows in the output on both paths (1e-5 relative is typical). Against float64, over many
    # layers, the kernel is no less accurate than the composed operators.
    kernel_errors, operator_errors = [], []
    for seed in range(24):
        torch.manual_seed(seed)
        channels, size = 2 + seed % 15, 3 + seed % 8
        layer = opened(ConvAttention2d.from_conv(nn.Conv2d(channels, channels, 3, padding=1)), 1.0)
        x = torch.randn(2, channels, size, size) * 100
        with torch.no_grad():
            fused = layer(x)
            reference = copy.deepcopy(layer).double()(x.double())  # float64: composed operators
        scale = reference.abs().max()
        kernel_errors.append(((fused.double() - reference).abs().max() / scale).item())
        operator_errors.append(((composed(layer, x, monkeypatch).double() - reference).abs().max() / scale).item())
    assert statistics.median(kernel_errors) <= 2 * statistics.median(operator_errors)
    assert max(kernel_errors) <= 1e-3


@needs_compiler
@settings(max_examples=150, deadline=None)
@given(case=conv_cases())
@example(  # one output of 0.036 from terms of scale 14: the convolution itself is 1e-6 from float64
    case=ConvCase(
        kwargs={"in_channels": 4, "out_channels": 1, "kernel_size": (5, 5), "stride": (2, 1), "padding": "valid",
                "dilation": (1, 3)},
        height=6, width=13, batch=1, seed=139, magnitude=1.0,
    )
)  # fmt: skip
def test_kernel_equals_convolution_at_init(case):
    conv = case.conv()
    layer = ConvAttention2d.from_conv(conv)
    x = case.input()
    with torch.no_grad():
        expected, actual = conv(x), layer(x)
    assert_equals_convolution(actual, expected, x, conv, 1e-6)


@needs_compiler
@pytest.mark.parametrize("shape", [(512, 7, 1), (512, 14, 2), (256, 14, 1), (128, 28, 1)])
def test_kernel_at_benchmark_shapes(shape, monkeypatch):
    # Wide layers, query blocks with and without tails (49, 196, 784 queries), the ConViT parameterisation.
    channels, size, stride = shape
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, channels, 3, stride=stride, padding=1)
    x = torch.randn(2, channels, size, size)
    exact = ConvAttention2d.from_conv(conv)
    with torch.no_grad():
        assert relative_error(exact(x), conv(x)) <= 1e-6
    convit = ConvAttention2d.from_conv(conv, ConvAttentionConfig.convit())
    with torch.no_grad():
        fused = convit(x)
    assert relative_error(fused, composed(convit, x, monkeypatch)) <= 1e-5


def test_setting_zero_keeps_layers_on_operators(monkeypatch):
    monkeypatch.setenv(native.SETTING, "0")
    assert native.attend_gather() is None
    conv = nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        assert relative_error(ConvAttention2d.from_conv(conv)(x), conv(x)) <= 1e-6


def test_kernel_is_used_by_default_only_on_avx512(monkeypatch):
    monkeypatch.delenv(native.SETTING, raising=False)
    for capability, expected in (("AVX512", True), ("AVX2", False), ("DEFAULT", False)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert native.enabled() is expected
    monkeypatch.setenv(native.SETTING, "1")
    assert native.enabled()
    monkeypatch.setenv(native.SETTING, "0")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert not native.enabled()


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    def fail(**_):
        raise RuntimeError("Error building extension 'tcnn_fx_attend_gather': no compiler")

    monkeypatch.setattr(cpp_kernels._cpp_extension(), "load", fail)
    monkeypatch.setenv(native.SETTING, "1")  # the build is attempted on any processor
    cpp_kernels.build.cache_clear()
    try:
        conv = nn.Conv2d(8, 8, 3, padding=1)
        layer = ConvAttention2d.from_conv(conv)
        x = torch.randn(2, 8, 6, 6)
        with (
            pytest.warns(RuntimeWarning, match="could not build its CPU attention kernel.*no compiler"),
            torch.no_grad(),
        ):
            out = layer(x)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("error")  # the failure is remembered: no second build, no second warning
            again = layer(x)
        assert relative_error(out, conv(x)) <= 1e-6
        assert torch.equal(out, again)
    finally:
        cpp_kernels.build.cache_clear()  # later tests load the real build again
