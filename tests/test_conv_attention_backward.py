"""The training function's hand-written backward equals autograd through the composed operators.

``attention_backward.AttendGather`` replaces autograd's walk over the attention
maps with its own; it must give the same gradients for every parameter and
the input, for every geometry the layer supports, with gates open or closed.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import conv_cases

from tcnn_fx import ConvAttention2d, ConvAttentionConfig
from tcnn_fx.layers import conv_attention
from tcnn_fx.layers.attention_backward import attend_gather
from tcnn_fx.layers.backends import Backend, choose


def operands(seed: int, batch=2, heads=3, dim=4, queries=5, keys=7, channels=3):
    generator = torch.Generator().manual_seed(seed)

    def tensor(*shape, positive=False):
        t = torch.rand(*shape, generator=generator, dtype=torch.float64)
        return (t if positive else t * 2 - 1).requires_grad_()

    return (tensor(batch, heads, dim, queries), tensor(batch, heads, dim, keys), tensor(batch, channels, keys),
            tensor(heads, queries, keys, positive=True), tensor(heads))  # fmt: skip


def test_gradcheck_in_float64():
    assert torch.autograd.gradcheck(attend_gather, operands(0))


@pytest.mark.parametrize("wanted", [(0,), (2,), (3, 4), (0, 1, 2)])
def test_gradients_of_a_subset_of_the_inputs(wanted):
    inputs = operands(1)
    for i, t in enumerate(inputs):
        t.requires_grad_(i in wanted)
    assert torch.autograd.gradcheck(attend_gather, inputs)


def layer_gradients(layer, x, own_backward: bool, monkeypatch):
    backend = Backend.TRAINING if own_backward else Backend.COMPOSED
    monkeypatch.setattr(conv_attention, "choose", lambda _: backend)
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = layer(x)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape))
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    return out.detach(), grads | {"input": x.grad}


@settings(max_examples=30, deadline=None)
@given(case=conv_cases(max_size=9).filter(lambda c: c.magnitude <= 1), gate=st.sampled_from([0.0, 0.3, -0.6]), sigmoid=st.booleans())
def test_layer_gradients_equal_autograd_through_the_composed_operators(case, gate, sigmoid):
    with pytest.MonkeyPatch.context() as monkeypatch:
        config = ConvAttentionConfig(gate="sigmoid", gate_init=1.0) if sigmoid else ConvAttentionConfig()
        layer = ConvAttention2d.from_conv(case.conv(torch.float64), config)
        with torch.no_grad():
            layer.gate.add_(gate)
            layer.locality.fill_(1.5)  # soft positional maps: gradient reaches centres and locality
        x = case.input(torch.float64)
        own, own_grads = layer_gradients(layer, x, True, monkeypatch)
        composed, composed_grads = layer_gradients(layer, x, False, monkeypatch)
    # The same attention arithmetic; the projection sums in another order (one product instead of a convolution).
    assert (own - composed).abs().max() <= 1e-12 * composed.abs().max().clamp_min(1e-300)
    for name, expected in composed_grads.items():
        scale = expected.abs().max().clamp_min(1e-300)
        assert (own_grads[name] - expected).abs().max() / scale <= 1e-10, name


def test_training_uses_it_and_inference_does_not():
    layer = ConvAttention2d.from_conv(torch.nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(2, 8, 6, 6)
    assert choose(x) is Backend.TRAINING and choose(x.double()) is Backend.TRAINING
    with torch.no_grad():
        assert choose(x) is not Backend.TRAINING
    assert choose(x.half()) is Backend.COMPOSED  # the composed operators' softmax runs in float32 for it
    out = layer(x)
    assert type(out.grad_fn).__name__ != "AttendGatherBackward"  # the projection follows it
    names, seen, stack = set(), set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and id(node) not in seen:
            seen.add(id(node))
            names.add(type(node).__name__)
            stack += [n for n, _ in node.next_functions]
    assert "AttendGatherBackward" in names and "AddcmulBackward0" not in names  # the mix runs inside it


@pytest.mark.parametrize(("outputs", "queries"), [(3, 6), (30, 2)])  # weight gradient per image / contracted
def test_projection_backward_gradcheck_in_float64(outputs, queries):
    from tcnn_fx.layers.attention_backward import PER_IMAGE_WEIGHT_PRODUCTS, ProjectProduct

    assert (outputs <= PER_IMAGE_WEIGHT_PRODUCTS * queries) == (outputs == 3)  # one case each way
    torch.manual_seed(0)
    weight = torch.randn(2, outputs, 4, dtype=torch.float64, requires_grad=True)
    gathered = torch.randn(5, 2, 4, queries, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ProjectProduct.apply, (weight, gathered))
    assert torch.autograd.gradgradcheck(ProjectProduct.apply, (weight, gathered))
