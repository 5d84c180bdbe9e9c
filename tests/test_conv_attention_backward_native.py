"""The compiled kernel of the training backward (``native_backward``): the same gradients, used where enabled.

``csrc/attend_backward.cpp`` replaces the backward's elementwise passes over
the attention maps (softmax backward, batch sum, content-weight reductions);
every gradient must equal the PyTorch operators' to float rounding, for every
subset of inputs that needs one, and a failed build must leave training
correct with one warning.  The build (about 40 s) happens once per machine,
cached under ``TORCH_EXTENSIONS_DIR``.
"""

import shutil
import warnings
from types import SimpleNamespace

import pytest
import torch
from strategies import relative_error
from torch import nn

from tcnn_fx import ConvAttention2d
from tcnn_fx.layers import cpp_kernels, native, native_backward
from tcnn_fx.layers.attention_backward import attend_gather

NEEDS = [(0, 1, 2, 3, 4), (0,), (1,), (2,), (3,), (4,), (3, 4), (0, 1, 2), (0, 4), (2, 3)]


def operands(seed: int, dtype=torch.float64, batch=2, heads=3, dim=4, queries=5, keys=7, channels=3):
    """``q, k, values, positional, weight`` as ``AttendGather`` takes them (weights in (0, 1): the gate open)."""
    generator = torch.Generator().manual_seed(seed)

    def tensor(*shape, positive=False):
        t = torch.rand(*shape, generator=generator, dtype=dtype)
        return (t if positive else t * 2 - 1).requires_grad_()

    q, k, values = tensor(batch, heads, dim, queries), tensor(batch, heads, dim, keys), tensor(batch, channels, keys)
    return q, k, values, tensor(heads, queries, keys, positive=True), tensor(heads, positive=True)


@pytest.fixture
def calls(monkeypatch) -> list[int]:
    """The kernel enabled on any processor, its calls counted; skipped where it cannot be built (cached)."""
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler to build the kernel")
    monkeypatch.setenv(native_backward.SETTING, "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a failed build warns; here it skips
        module = native_backward._module()
    if module is None:
        pytest.skip("the kernel could not be built here")
    counted: list[int] = []

    def attend_backward(*args):
        counted.append(1)
        return module.attend_backward(*args)

    monkeypatch.setattr(native_backward, "_module", lambda: SimpleNamespace(attend_backward=attend_backward))
    return counted


def gradients(inputs, wanted, kernel: bool, monkeypatch) -> list[torch.Tensor]:
    """The gradients of the ``wanted`` inputs of ``attend_gather`` for a fixed output gradient."""
    inputs = [t.detach().requires_grad_(i in wanted) for i, t in enumerate(inputs)]
    with monkeypatch.context() as patch:
        patch.setenv(native_backward.SETTING, "1" if kernel else "0")
        out = attend_gather(*inputs)
        grad = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
        return list(torch.autograd.grad(out, [inputs[i] for i in wanted], grad))


def test_gradcheck_in_float64_through_the_kernel(calls):
    assert torch.autograd.gradcheck(attend_gather, operands(0))
    assert calls  # the analytical gradients came from the kernel


@pytest.mark.parametrize("wanted", NEEDS, ids=str)
def test_kernel_equals_operators_for_every_needs_mask(wanted, calls, monkeypatch):
    # Sizes off every block: 3 x 70 rows of 67 keys span blocks of 61 rows with a tail; one image and several.
    for seed, batch in ((1, 1), (2, 5)):
        inputs = operands(seed, torch.float32, batch=batch, heads=3, dim=6, queries=70, keys=67, channels=5)
        before = len(calls)
        fused = gradients(inputs, wanted, True, monkeypatch)
        assert len(calls) == before + (wanted != (2,))  # dV alone needs no map gradients
        for i, actual, expected in zip(wanted, fused, gradients(inputs, wanted, False, monkeypatch), strict=True):
            assert relative_error(actual, expected) <= 2e-6, (i, batch)


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_layer_gradients_equal_with_the_gate_open(kernel_size, calls, monkeypatch):
    torch.manual_seed(kernel_size)
    layer = ConvAttention2d.from_conv(nn.Conv2d(6, 8, kernel_size, padding=kernel_size // 2))
    with torch.no_grad():
        layer.gate.fill_(0.4)
        layer.locality.fill_(1.5)  # soft positional maps: gradient reaches centres and locality
    x = torch.randn(3, 6, 7, 9)

    def layer_gradients(kernel: bool):
        with monkeypatch.context() as patch:
            patch.setenv(native_backward.SETTING, "1" if kernel else "0")
            layer.zero_grad(set_to_none=True)
            inputs = x.clone().requires_grad_()
            layer(inputs).square().sum().backward()
        return {name: p.grad.clone() for name, p in layer.named_parameters()} | {"input": inputs.grad}

    fused = layer_gradients(True)
    assert calls
    for name, expected in layer_gradients(False).items():
        assert relative_error(fused[name], expected) <= 1e-5, name


def test_used_by_default_where_measured_faster(monkeypatch):
    monkeypatch.delenv(native_backward.SETTING, raising=False)
    monkeypatch.delenv(native.SETTING, raising=False)
    for capability, expected in (("AVX2", True), ("AVX512", False), ("DEFAULT", False)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert native_backward.enabled() is expected
    monkeypatch.setenv(native.SETTING, "0")  # no compiled kernels at all
    assert not native_backward.enabled()
    monkeypatch.setenv(native_backward.SETTING, "1")  # unless this one is asked for
    assert native_backward.enabled()
    monkeypatch.setenv(native_backward.SETTING, "0")
    monkeypatch.delenv(native.SETTING)
    assert not native_backward.enabled()


def test_not_used_on_tensors_it_cannot_read(calls):
    # torch.func hands the backward wrapped tensors, which have no memory of their own: operators run instead.
    inputs = operands(3)
    wrapped = torch.func.grad(lambda q: attend_gather(q, *inputs[1:]).square().sum())(inputs[0])
    assert not calls
    (plain,) = torch.autograd.grad(attend_gather(*inputs).square().sum(), inputs[0])
    assert calls
    assert relative_error(wrapped, plain) <= 1e-12


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    def fail(**_):
        raise RuntimeError("Error building extension 'tcnn_fx_attend_backward': no compiler")

    inputs = operands(4, torch.float32)
    expected = gradients(inputs, (0, 1, 2, 3, 4), False, monkeypatch)
    monkeypatch.setattr(cpp_kernels._cpp_extension(), "load", fail)
    cpp_kernels.build.cache_clear()
    try:
        expected_warning = "could not build its CPU attention kernel attend_backward.*no compiler"
        with pytest.warns(RuntimeWarning, match=expected_warning):
            first = gradients(inputs, (0, 1, 2, 3, 4), True, monkeypatch)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the failure is remembered: no second build, no second warning
            again = gradients(inputs, (0, 1, 2, 3, 4), True, monkeypatch)
        for a, b, c in zip(first, again, expected, strict=True):
            assert torch.equal(a, c) and torch.equal(b, c)
    finally:
        cpp_kernels.build.cache_clear()  # later tests load the real build again
