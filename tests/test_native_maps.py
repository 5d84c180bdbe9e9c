"""The compiled kernel over the attention maps (``native_maps``): the same maps and gradients, used where enabled.

``csrc/attend_maps.cpp`` replaces the forward's content scores, softmax and
mix, and the backward's elementwise passes (softmax backward, batch sum,
content-weight reductions); the maps must equal the PyTorch operators' to
float32 rounding and every gradient to float rounding, for every subset of
inputs that needs one, and a failed build must leave the layer correct with
one warning.  The build (about 30 s) happens once per machine, cached under
``TORCH_EXTENSIONS_DIR``.
"""

import warnings

import pytest
import torch
from kernel_builds import built, counting
from strategies import relative_error
from torch import nn

from tcnn_fx import ConvAttention2d
from tcnn_fx.layers import cpp_kernels, native, native_maps
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
def module(monkeypatch):
    """The built kernel, enabled on any processor; skipped where it cannot be built (cached)."""
    return built(native_maps, monkeypatch)


@pytest.fixture
def calls(module, monkeypatch) -> list[str]:
    """The kernel enabled on any processor, its calls counted by name."""
    return counting(native_maps, module, ("content_mix", "content_mix_gather", "attend_backward"), monkeypatch)


def composed_maps(q, k, base, weight):
    """``M = base + w A`` and ``A = softmax(q^T k)`` from PyTorch operators."""
    attention = torch.matmul(q.mT, k).softmax(-1)
    return torch.addcmul(base, attention, weight[:, None, None]), attention


@pytest.mark.parametrize(
    ("batch", "heads", "dim", "queries", "keys"),
    [
        (1, 9, 8, 64, 64),
        (3, 2, 5, 7, 13),
        (2, 4, 28, 49, 196),
        (1, 1, 3, 1, 1),
        (2, 3, 32, 21, 17),
        (1, 2, 8, 6, 50),
        (2, 3, 4, 10, 24),
        (1, 2, 6, 5, 25),
        (2, 1, 3, 9, 47),
    ],
)
def test_forward_maps_equal_the_operators(module, batch, heads, dim, queries, keys):
    # Sizes on and off the kernel's vectors (8 or 16 keys), tiles (4 rows, 3 vectors: 24 or 48 keys, the last
    # one partial) and tasks (16 rows).
    generator = torch.Generator().manual_seed(batch * 1000 + keys)
    qk = torch.randn(batch, heads, 2 * dim, max(queries, keys), generator=generator) * 2
    q, k = qk[:, :, :dim, :queries], qk[:, :, dim:, :keys]  # views with strides the layer's products give
    base = torch.rand(heads, queries, keys, generator=generator)
    weight = torch.rand(heads, generator=generator)
    expected_mixed, expected_attention = composed_maps(q, k, base, weight)
    with torch.no_grad():
        mixed, attention = native_maps.content_mix(q, k, base, weight, keep=True)
        alone, nothing = native_maps.content_mix(q, k, base, weight, keep=False)
    assert relative_error(mixed, expected_mixed) <= 2e-6 and (attention - expected_attention).abs().max() <= 1e-6
    assert torch.equal(alone, mixed) and nothing.numel() == 0
    assert torch.allclose(attention.sum(-1), torch.ones(()), atol=1e-6)


def test_forward_with_shut_gates_is_the_positional_term_exactly(module):
    # w = 0 (a layer as converted): M must be (1 - w) P to the last bit, whatever the content scores.
    q, k = torch.randn(2, 3, 8, 30) * 50, torch.randn(2, 3, 8, 30)
    base = torch.rand(3, 30, 30)
    with torch.no_grad():
        mixed, _ = native_maps.content_mix(q, k, base, torch.zeros(3), keep=False)
    assert torch.equal(mixed, base.expand_as(mixed))


def on_thread_counts(compute) -> list:
    """``compute()`` without autograd on 1, 2 and 3 threads of PyTorch's pool (restored after)."""
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            with torch.no_grad():
                results.append(compute())
    finally:
        torch.set_num_threads(threads)
    return results


def test_forward_is_the_same_on_any_number_of_threads(module):
    # Tasks of 16 map rows split over the thread pool: each row is written by one thread, whatever the count.
    generator = torch.Generator().manual_seed(5)
    q, k = torch.randn(3, 4, 8, 50, generator=generator), torch.randn(3, 4, 8, 70, generator=generator)
    base, weight = torch.rand(4, 50, 70, generator=generator), torch.rand(4, generator=generator)
    (mixed, attention), *others = on_thread_counts(lambda: native_maps.content_mix(q, k, base, weight, keep=True))
    assert all(torch.equal(m, mixed) and torch.equal(a, attention) for m, a in others)


def test_forward_not_used_where_it_cannot_read(calls):
    q, k, base, weight = torch.randn(1, 2, 4, 5), torch.randn(1, 2, 4, 6), torch.rand(2, 5, 6), torch.rand(2)
    assert native_maps.content_mix(q.double(), k.double(), base.double(), weight.double(), keep=False) is None
    assert native_maps.content_mix(q.requires_grad_(), k, base, weight, keep=False) is None  # grad enabled
    with torch.no_grad():
        assert native_maps.content_mix(q, k, base, weight, keep=False) is not None
    assert calls == ["content_mix"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": 3, "padding": 1},
        {"kernel_size": 3, "stride": 2, "padding": 1},
        {"kernel_size": (2, 3), "padding": "same", "dilation": 2, "padding_mode": "reflect"},  # keys on the padded grid
        {"kernel_size": 5, "padding": 2, "groups": 4, "padding_mode": "circular"},
        {"kernel_size": 1, "bias": False},
    ],
    ids=["3x3", "stride2", "dilated-reflect", "grouped-circular", "1x1"],
)
@pytest.mark.parametrize("size", [(11, 9), (7, 7)], ids=["gathered-in-kernel", "49-keys"])
def test_layer_inference_equals_the_operators_with_the_gate_open(kwargs, size, calls, monkeypatch):
    torch.manual_seed(len(calls))
    layer = ConvAttention2d.from_conv(nn.Conv2d(16, 24, **kwargs)).eval()
    with torch.no_grad():
        layer.gate.uniform_(0.1, 0.9)
        layer.locality.fill_(1.5)
    x = torch.randn(3, 16, *size)
    keys = layer.geometry.padded_size(*size) if kwargs.get("padding_mode", "zeros") != "zeros" else size

    def run(kernel: bool):
        with monkeypatch.context() as patch, torch.no_grad():
            patch.setenv(native_maps.SETTING, "1" if kernel else "0")
            return layer(x)

    fused = run(True)
    assert calls == ["content_mix_gather" if keys[0] * keys[1] >= native_maps.GATHER_MIN_KEYS else "content_mix"]
    assert relative_error(fused, run(False)) <= 2e-6


def gather_operands(seed, batch, heads, dim, queries, keys, channels):
    generator = torch.Generator().manual_seed(seed)
    qk = torch.randn(batch, heads, 2 * dim, max(queries, keys), generator=generator) * 2
    q, k = qk[:, :, :dim, :queries], qk[:, :, dim:, :keys]  # views with strides the layer's products give
    values = torch.randn(batch, channels + 3, keys, generator=generator)[:, 3:]  # a view: row stride != keys
    return q, k, values, torch.rand(heads, queries, keys, generator=generator), torch.rand(heads, generator=generator)


@pytest.mark.parametrize(
    ("batch", "heads", "dim", "queries", "keys", "channels"),
    [(2, 9, 8, 64, 64, 64), (1, 3, 5, 17, 70, 13), (2, 2, 28, 49, 196, 7), (1, 4, 8, 1, 64, 1), (3, 1, 3, 33, 65, 5)],
)
def test_gather_is_the_maps_applied_to_the_values(module, batch, heads, dim, queries, keys, channels):
    # Sizes on and off the panels (16 queries), the channel tiles (6, 4, 2, 1) and the transposes (8 keys).
    q, k, values, base, weight = gather_operands(keys, batch, heads, dim, queries, keys, channels)
    with torch.no_grad():
        gathered, attention = native_maps.content_mix_gather(q, k, base, weight, values, keep=True)
        alone, nothing = native_maps.content_mix_gather(q, k, base, weight, values)
        mixed, expected_attention = native_maps.content_mix(q, k, base, weight, keep=True)
    assert gathered.shape == (batch, channels, heads, queries)
    # The softmax a training forward keeps is content_mix's, bit for bit; keeping it changes nothing else.
    assert torch.equal(attention, expected_attention) and torch.equal(alone, gathered) and nothing.numel() == 0
    # The same maps, summed over the keys in float32: within recursive summation's bound of the exact sums.
    exact = torch.einsum("bhqk,bck->bchq", mixed.double(), values.double())
    bound = keys * 2.0**-24 * torch.einsum("bhqk,bck->bchq", mixed.double().abs(), values.double().abs())
    assert ((gathered.double() - exact).abs() <= bound).all()


def test_gather_with_shut_gates_and_one_hot_maps_is_exact(module):
    # A layer as converted: each map row picks one key (or none, a tap off the image); the gather copies values.
    generator = torch.Generator().manual_seed(3)
    q, k, values, _, _ = gather_operands(3, 2, 3, 8, 40, 80, 11)
    picked = torch.randint(-1, 80, (3, 40), generator=generator)
    base = torch.nn.functional.one_hot(picked.clamp(min=0), 80).float() * (picked >= 0)[..., None]
    with torch.no_grad():
        gathered, _ = native_maps.content_mix_gather(q * 50, k, base, torch.zeros(3), values)
    expected = values[:, :, picked.clamp(min=0)] * (picked >= 0)
    assert torch.equal(gathered, expected)


def test_gather_is_the_same_on_any_number_of_threads(module):
    q, k, values, base, weight = gather_operands(7, 3, 4, 8, 50, 70, 9)
    results = on_thread_counts(lambda: native_maps.content_mix_gather(q, k, base, weight, values)[0].clone())
    assert all(torch.equal(r, results[0]) for r in results[1:])


def test_gather_not_used_below_its_keys_or_where_it_cannot_read(calls):
    q, k, values, base, weight = gather_operands(1, 1, 2, 4, 5, 64, 3)
    short = gather_operands(1, 1, 2, 4, 5, native_maps.GATHER_MIN_KEYS - 1, 3)
    assert native_maps.content_mix_gather(*(t.double() for t in (q, k, base, weight, values))) is None
    assert native_maps.content_mix_gather(q.requires_grad_(), k, base, weight, values) is None  # grad enabled
    with torch.no_grad():
        assert native_maps.content_mix_gather(short[0], short[1], short[3], short[4], short[2]) is None
        assert native_maps.content_mix_gather(q, k, base, weight, values) is not None
    assert calls == ["content_mix_gather"]


def gradients(inputs, wanted, kernel: bool, monkeypatch) -> list[torch.Tensor]:
    """The gradients of the ``wanted`` inputs of ``attend_gather`` for a fixed output gradient."""
    inputs = [t.detach().requires_grad_(i in wanted) for i, t in enumerate(inputs)]
    with monkeypatch.context() as patch:
        patch.setenv(native_maps.SETTING, "1" if kernel else "0")
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
        before = calls.count("attend_backward")
        fused = gradients(inputs, wanted, True, monkeypatch)
        assert calls.count("attend_backward") == before + (wanted != (2,))  # dV alone needs no map gradients
        for i, actual, expected in zip(wanted, fused, gradients(inputs, wanted, False, monkeypatch), strict=True):
            assert relative_error(actual, expected) <= 2e-6, (i, batch)


@pytest.mark.parametrize("size", [(7, 9), (9, 9)], ids=["63-keys", "gathered-in-kernel"])
@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_layer_gradients_equal_with_the_gate_open(kernel_size, size, calls, monkeypatch):
    torch.manual_seed(kernel_size)
    layer = ConvAttention2d.from_conv(nn.Conv2d(6, 8, kernel_size, padding=kernel_size // 2))
    with torch.no_grad():
        layer.gate.fill_(0.4)
        layer.locality.fill_(1.5)  # soft positional maps: gradient reaches centres and locality
    x = torch.randn(3, 6, *size)

    def layer_gradients(kernel: bool):
        with monkeypatch.context() as patch:
            patch.setenv(native_maps.SETTING, "1" if kernel else "0")
            layer.zero_grad(set_to_none=True)
            inputs = x.clone().requires_grad_()
            layer(inputs).square().sum().backward()
        return {name: p.grad.clone() for name, p in layer.named_parameters()} | {"input": inputs.grad}

    fused = layer_gradients(True)
    # The forward's maps (gathered in the kernel from GATHER_MIN_KEYS keys) and the backward's.
    forward = "content_mix_gather" if size[0] * size[1] >= native_maps.GATHER_MIN_KEYS else "content_mix"
    assert set(calls) == {forward, "attend_backward"}
    for name, expected in layer_gradients(False).items():
        assert relative_error(fused[name], expected) <= 1e-5, name


def test_used_by_default_where_measured_faster(monkeypatch):
    monkeypatch.delenv(native_maps.SETTING, raising=False)
    monkeypatch.delenv(native.SETTING, raising=False)
    for capability, expected in (("AVX2", True), ("AVX512", False), ("DEFAULT", False)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert native_maps.enabled() is expected
    monkeypatch.setenv(native.SETTING, "0")  # no compiled kernels at all
    assert not native_maps.enabled()
    monkeypatch.setenv(native_maps.SETTING, "1")  # unless this one is asked for
    assert native_maps.enabled()
    monkeypatch.setenv(native_maps.SETTING, "0")
    monkeypatch.delenv(native.SETTING)
    assert not native_maps.enabled()


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
        raise RuntimeError("Error building extension 'tcnn_fx_attend_maps': no compiler")

    inputs = operands(4, torch.float32)
    expected = gradients(inputs, (0, 1, 2, 3, 4), False, monkeypatch)
    monkeypatch.setattr(cpp_kernels._cpp_extension(), "load", fail)
    cpp_kernels.build.cache_clear()
    try:
        expected_warning = "could not build its CPU attention kernel attend_maps.*no compiler"
        with pytest.warns(RuntimeWarning, match=expected_warning):
            first = gradients(inputs, (0, 1, 2, 3, 4), True, monkeypatch)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the failure is remembered: no second build, no second warning
            again = gradients(inputs, (0, 1, 2, 3, 4), True, monkeypatch)
        for a, b, c in zip(first, again, expected, strict=True):
            assert torch.equal(a, c) and torch.equal(b, c)
    finally:
        cpp_kernels.build.cache_clear()  # later tests load the real build again
