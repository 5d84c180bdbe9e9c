"""The attention core's registered operators: what opcheck, torch.compile and the exporters see.

``tcnn_fx::attend_gather`` (the compiled inference kernel),
``tcnn_fx::attend_gather_training`` and its backward are ``torch.library``
operators with fake implementations: ``torch.compile`` captures one call per
layer, in training with the hand-written backward in the backward graph;
exporters get PyTorch's own operators, which ONNX can translate.
"""

import shutil
import warnings

import pytest
import torch
from functorch.compile import make_boxed_func
from strategies import relative_error
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch.fx.experimental.proxy_tensor import make_fx

from tcnn_fx import ConvAttention2d
from tcnn_fx.layers import native
from tcnn_fx.layers.backends import Backend, choose

TRAINING_OP = torch.ops.tcnn_fx.attend_gather_training.default
BACKWARD_OP = torch.ops.tcnn_fx.attend_gather_training_backward.default
KERNEL_OP = torch.ops.tcnn_fx.attend_gather.default


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled code does not outlive its test: it holds the backend choices (and kernel setting) of its test."""
    yield
    torch._dynamo.reset()


def operands(dtype=torch.float64, requires_grad=True, batch=2, heads=3, dim=4, queries=5, keys=7, channels=3):
    """``q, k, values, positional, weight`` as ``attention_backward.AttendGather`` takes them."""
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape, positive=False):
        t = torch.rand(*shape, generator=generator, dtype=dtype)
        return (t if positive else t * 2 - 1).requires_grad_(requires_grad)

    return (tensor(batch, heads, dim, queries), tensor(batch, heads, dim, keys), tensor(batch, channels, keys),
            tensor(heads, queries, keys, positive=True), tensor(heads))  # fmt: skip


def opened_layer(in_channels=3, out_channels=4) -> ConvAttention2d:
    """A small layer with content attention mixed in and soft positional maps: gradient reaches every parameter."""
    torch.manual_seed(0)
    layer = ConvAttention2d.from_conv(nn.Conv2d(in_channels, out_channels, 3, padding=1))
    with torch.no_grad():
        layer.gate.fill_(0.3)
        layer.locality.fill_(1.5)
    return layer


def tcnn_fx_ops(graph: torch.fx.Graph) -> list[str]:
    return [str(n.target) for n in graph.nodes if n.op == "call_function" and str(n.target).startswith("tcnn_fx.")]


class GraphRecorder:
    """A ``torch.compile`` backend through AOT autograd that keeps the forward and backward graphs and runs them."""

    def __init__(self) -> None:
        self.graphs: dict[str, list[torch.fx.GraphModule]] = {"forward": [], "backward": []}
        self.backend = aot_autograd(fw_compiler=self._keep("forward"), bw_compiler=self._keep("backward"))

    def _keep(self, kind: str):
        def compiler(module: torch.fx.GraphModule, _inputs):
            self.graphs[kind].append(module)
            return make_boxed_func(module.forward)

        return compiler


def test_training_op_passes_opcheck():
    torch.library.opcheck(TRAINING_OP, operands())  # schema, fake implementation, autograd registration


@pytest.mark.parametrize("needs", [[True] * 5, [False, False, True, False, False], [True, True, False, False, True]])
def test_backward_op_passes_opcheck(needs):
    inputs = operands(requires_grad=False)
    gathered, attention = TRAINING_OP(*inputs)
    torch.library.opcheck(BACKWARD_OP, (torch.randn_like(gathered), *inputs, attention, needs))


def test_registered_autograd_formula_passes_gradcheck():
    # The layer's eager path enters through AttendGather (tests/test_conv_attention_backward.py); compiled graphs
    # through the operator's registered formula: the same backward, checked here by that way in.
    assert torch.autograd.gradcheck(lambda *inputs: TRAINING_OP(*inputs)[0], operands())


def test_torch_func_transforms_still_differentiate_the_layer():
    # Eager code enters through AttendGather, which torch.func accepts (the operator's formula would not).
    layer = opened_layer()
    x = torch.randn(2, 3, 6, 5)
    params = dict(layer.named_parameters())
    grads = torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x,)).square().sum())(params)
    layer(x).square().sum().backward()
    for name, p in params.items():
        assert relative_error(grads[name], p.grad) <= 1e-6, name


@pytest.fixture
def kernel():
    """The compiled kernel where layers use it by default (AVX-512); skipped elsewhere, as in
    tests/test_conv_attention_native.py (a build costs ~30 s of the suite for a path nobody runs there), and
    where it cannot be built."""
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler to build the kernel")
    if not native.enabled():
        pytest.skip("the kernel is used on AVX-512 processors (TCNN_FX_NATIVE=1 elsewhere is unchecked)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a failed build warns; here it skips
        if native.attend_gather() is None:
            pytest.skip("the kernel could not be built here")
    return KERNEL_OP


def test_kernel_op_passes_opcheck(kernel):
    heads, dim, queries, keys, channels = 3, 4, 5, 7, 6
    q, k = torch.randn(2, heads * dim, queries), torch.randn(2, heads * dim, keys)
    values = torch.randn(2, channels, keys)
    base, weight = native.kernel_operands(torch.rand(heads, queries, keys), torch.rand(heads))
    torch.library.opcheck(kernel, (q, k, values, base, weight, heads))
    assert kernel(q, k, values, base, weight, heads).shape == (channels, 2 * heads, queries)


def test_compiled_inference_calls_the_kernel_once_per_layer(kernel):
    layer = opened_layer().eval()
    graphs = []

    def keep(module, _inputs):
        graphs.append(module.graph)
        return module.forward

    x = torch.randn(2, 3, 6, 5)
    with torch.no_grad():
        assert choose(x) is Backend.KERNEL
        expected = layer(x)
        actual = torch.compile(layer, backend=keep, fullgraph=True)(x)
    assert [tcnn_fx_ops(g) for g in graphs] == [["tcnn_fx.attend_gather.default"]]
    assert relative_error(actual, expected) <= 1e-6


def test_compiled_training_captures_one_op_each_way_with_eager_gradients():
    torch.manual_seed(1)
    model = nn.Sequential(opened_layer(), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 5, 3))
    x = torch.randn(2, 3, 6, 5)

    def gradients(module):
        model.zero_grad(set_to_none=True)
        module(x).square().sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    expected = gradients(model)
    recorder = GraphRecorder()
    actual = gradients(torch.compile(model, backend=recorder.backend, fullgraph=True))  # fullgraph: no break
    forward, backward = ([tcnn_fx_ops(m.graph) for m in recorder.graphs[k]] for k in ("forward", "backward"))
    assert forward == [["tcnn_fx.attend_gather_training.default"]]
    assert backward == [["tcnn_fx.attend_gather_training_backward.default"]]
    for name, grad in expected.items():
        assert relative_error(actual[name], grad) <= 1e-5, name


def probe(seen: list[Backend]) -> nn.Module:
    """A module that records in ``seen`` the backend ``choose`` picks as its forward runs or is captured.

    (A list outside the module: exporters trace a copy of it.)
    """

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(choose(x))
            return x * 2

    return Probe()


def _compile(module, x):
    return torch.compile(module, backend="eager", fullgraph=True)(x)


@pytest.mark.parametrize(
    ("capture", "expected"),
    [
        (_compile, Backend.TRAINING),
        (lambda m, x: torch.export.export(m, (x,)), Backend.COMPOSED),
        (lambda m, x: torch.jit.trace(m, (x,), check_trace=False), Backend.COMPOSED),  # ONNX, dynamo=False
        (lambda m, x: torch.fx.symbolic_trace(m), Backend.COMPOSED),
        (lambda m, x: make_fx(m)(x), Backend.COMPOSED),
    ],
    ids=["compile", "export", "jit-trace", "fx-symbolic-trace", "make-fx"],
)
@pytest.mark.filterwarnings("ignore:`torch.jit.trace.*` is deprecated:FutureWarning")
def test_only_torch_compile_gets_the_operators(capture, expected):
    # (Strict export drops the side effect that records the choice: test_export_holds_no_tcnn_fx_operator.)
    seen = []
    capture(probe(seen), torch.randn(2, 3, 4, 4, requires_grad=True))
    assert seen == [expected]


def test_compiled_inference_without_the_kernel_composes_operators(monkeypatch):
    monkeypatch.setenv(native.SETTING, "0")
    seen, x = [], torch.randn(1, 128, 4, 4)  # wide enough for the oneDNN gather in eager inference
    with torch.no_grad():
        _compile(probe(seen), x)
    assert seen == [Backend.COMPOSED]


@pytest.mark.parametrize("strict", [False, True])
def test_export_holds_no_tcnn_fx_operator(strict):
    layer = opened_layer()
    x = torch.randn(2, 3, 6, 5)
    exported = torch.export.export(layer, (x,), strict=strict)  # in training mode, with autograd on
    assert tcnn_fx_ops(exported.graph) == []
    assert relative_error(exported.module()(x), layer(x)) <= 1e-6


def test_export_with_the_kernel_holds_no_tcnn_fx_operator(kernel):
    layer = opened_layer().eval()
    x = torch.randn(2, 3, 6, 5)
    with torch.no_grad():
        exported = torch.export.export(layer, (x,))
        assert tcnn_fx_ops(exported.graph) == []
        assert relative_error(exported.module()(x), layer(x)) <= 1e-6
