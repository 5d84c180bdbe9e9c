"""ONNX export of rewritten models, checked against ONNX Runtime."""

import json

import onnx
import pytest
import torch
from models import TinyResNet
from torch import nn

import tcnn_fx
from tcnn_fx.cli import main
from tcnn_fx.export import ExportError, to_onnx, verify_onnx
from tcnn_fx.export.bench import with_content_weight
from tcnn_fx.export.lowering import Lowering
from tcnn_fx.models import cifar_resnet


@pytest.fixture(scope="module")
def hybrid():
    torch.manual_seed(0)
    return tcnn_fx.rewrite(cifar_resnet(20).eval(), "last", (torch.randn(2, 3, 32, 32),), spec="cifar:resnet20")


@pytest.fixture(scope="module")
def exported(hybrid, tmp_path_factory):
    return to_onnx(hybrid, tmp_path_factory.mktemp("onnx") / "h.onnx", (torch.randn(2, 3, 32, 32),))


def test_export_runs_at_any_batch_and_matches(hybrid, exported):
    for batch in (1, 8, 32):
        (check,) = verify_onnx(hybrid, exported, (torch.randn(batch, 3, 32, 32),))
        assert check.passed and check.outputs[0].max_rel <= 1e-5


def test_exported_graph_is_plain_onnx(hybrid, exported, tmp_path):
    model = onnx.load(str(exported))
    onnx.checker.check_model(model)
    ops = [node.op_type for node in model.graph.node]
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}  # no custom ops
    assert "Einsum" not in ops and "Softmax" not in ops  # as converted, every layer is its convolution
    # With the gates open, the layer's own graph at a fixed size: one softmax per layer (content attention),
    # the positional maps constants.
    opened = with_content_weight(hybrid, 0.2)
    own = Lowering(positional="maps", content="matmul")
    path = to_onnx(opened, tmp_path / "o.onnx", (torch.randn(2, 3, 32, 32),), lowering=own, dynamic_resolution=False)
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops.count("Softmax") == len(tcnn_fx.report_of(hybrid).converted) and "Einsum" not in ops
    metadata = {p.key: p.value for p in model.metadata_props}
    assert metadata["base_model"] == "cifar:resnet20" and metadata["opset"] == "18"
    assert '"select": "last"' in metadata["policy"] and metadata["tcnn_fx_version"] == tcnn_fx.__version__


@pytest.mark.parametrize("opset", [18, 21, 23])  # the lowest, one between, the highest
def test_opsets(opset, tmp_path):
    model = with_content_weight(tcnn_fx.rewrite(TinyResNet().eval(), "all", (torch.randn(1, 3, 16, 16),)), 0.2)
    path = to_onnx(model, tmp_path / "t.onnx", (torch.randn(2, 3, 16, 16),), opset=opset)
    assert onnx.load(str(path)).opset_import[0].version == opset
    assert verify_onnx(model, path, (torch.randn(3, 3, 16, 16),))[0].passed


def test_failed_export_names_the_reason_and_writes_nothing(tmp_path):
    class DataDependent(nn.Module):
        def forward(self, x):
            return x[x > 0].sum() if x.sum() > 0 else x.mean()

    target = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match="cannot export DataDependent"):
        to_onnx(DataDependent(), target, (torch.randn(1, 3, 4, 4),))
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(hybrid, exported, tmp_path):
    x = (torch.randn(1, 3, 32, 32),)
    with pytest.raises(ValueError, match="opset 17 is not supported"):
        to_onnx(hybrid, tmp_path / "h.onnx", x, opset=17)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        to_onnx(hybrid, tmp_path / "missing" / "h.onnx", x)
    with pytest.raises(RuntimeError, match="is not available; available:"):
        verify_onnx(hybrid, exported, x, providers=("NoSuchExecutionProvider",))


def test_mismatch_raises_with_the_table(hybrid, exported):
    changed = tcnn_fx.rewrite(cifar_resnet(20).eval(), "last", (torch.randn(2, 3, 32, 32),))
    with pytest.raises(AssertionError, match="ONNX Runtime disagrees with PyTorch"):
        verify_onnx(changed, exported, (torch.randn(2, 3, 32, 32),))


def test_cli_convert_exports_onnx(tmp_path, capsys):
    main(["convert", "cifar:resnet20", "--policy", "last", "--out", str(tmp_path / "h.pt"),
          "--onnx", str(tmp_path / "h.onnx"), "--target", "gpu", "--opset", "23", "--fixed-resolution"])  # fmt: skip
    assert "CPUExecutionProvider: passed" in capsys.readouterr().out
    model = onnx.load(str(tmp_path / "h.onnx"))
    metadata = {p.key: p.value for p in model.metadata_props}
    assert json.loads(metadata["lowering"])["options"]["target"] == "gpu"
    assert json.loads(metadata["dynamic_axes"])["x"] == {"0": "batch"}  # height and width fixed


@pytest.mark.parametrize(
    ("spec", "policy"),
    [
        ("torchvision:resnet50", "name:layer4.*conv2 | name:layer3.5.conv2"),  # a custom policy
        ("torchvision:mobilenet_v3_large", "last"),
        ("torchvision:convnext_tiny", "last"),
        ("timm:resnetrs50", "stage4"),
    ],  # grouped layers: tests/test_export_lowering.py (suite time: RegNetY, 40 s here, dropped)
)
def test_model_zoo_exports_and_matches_onnx_runtime(spec, policy, tmp_path):
    from tcnn_fx.specs import build

    torch.manual_seed(0)
    model = build(spec).eval()
    hybrid = tcnn_fx.rewrite(model, policy, (torch.randn(2, 3, 96, 96),))
    assert tcnn_fx.report_of(hybrid).converted
    hybrid = with_content_weight(hybrid, 0.2)  # as after fine-tuning: the content branch is exported too
    path = to_onnx(hybrid, tmp_path / "m.onnx", (torch.randn(2, 3, 96, 96),))
    (check,) = verify_onnx(hybrid, path, (torch.randn(3, 3, 128, 80),))  # another batch and size
    assert check.outputs[0].max_rel <= 1e-5


def test_fp16_export(hybrid, tmp_path):
    hybrid = with_content_weight(hybrid, 0.2)
    path = to_onnx(hybrid, tmp_path / "h16.onnx", (torch.randn(2, 3, 32, 32),), fp16=True)
    model = onnx.load(str(path))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert {p.key: p.value for p in model.metadata_props}["fp16"] == "true"
    (check,) = verify_onnx(hybrid, path, (torch.randn(16, 3, 32, 32),))
    assert check.passed and 1e-6 < check.outputs[0].max_rel <= 1e-2 and "top-1 agrees" in check.outputs[0].name
    assert hybrid.get_submodule("layer3.0.conv1").weight.dtype == torch.float32  # the model itself is untouched


def test_ort_fusions_are_offered_and_counted(hybrid, tmp_path):
    path = to_onnx(hybrid, tmp_path / "f.onnx", (torch.randn(2, 3, 32, 32),), ort_fusions=True)
    metadata = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert "ort_fusions" in metadata  # the transformer fusions find nothing to fuse in this graph: "{}"
    assert verify_onnx(hybrid, path, (torch.randn(2, 3, 32, 32),))[0].passed


def test_bench_times_both_models_on_both_runtimes(hybrid, tmp_path, capsys):
    from tcnn_fx.export.bench import bench, plot

    model = cifar_resnet(20).eval()
    hybrid_of_model = tcnn_fx.rewrite(model, "last", (torch.randn(1, 3, 32, 32),))
    rows = bench(model, hybrid_of_model, (3, 32, 32), batches=(1, 2), rounds=2, warmup=1)
    assert [(r.batch, r.runtime) for r in rows] == [(1, "torch"), (1, "ort"), (2, "torch"), (2, "ort")]
    assert all(r.cnn > 0 and r.hybrid > 0 and r.flop_ratio > 1 for r in rows)
    plot(rows, tmp_path / "ratios.png")
    assert (tmp_path / "ratios.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="unknown runtimes"):
        bench(model, hybrid_of_model, (3, 32, 32), runtimes=("tensorflow",))
    main(["bench", "cifar:resnet20", "--policy", "last", "--batch", "1", "--rounds", "1", "--runtime", "torch",
          "--json", str(tmp_path / "b.json")])  # fmt: skip
    assert "hybrid / CNN" in capsys.readouterr().out and (tmp_path / "b.json").exists()


def _cuda_provider_usable() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(not _cuda_provider_usable(), reason="needs CUDA and onnxruntime-gpu")
def test_cuda_execution_provider(hybrid, exported, tmp_path):
    x = (torch.randn(8, 3, 32, 32),)
    (check,) = verify_onnx(hybrid, exported, x, providers=("CUDAExecutionProvider",))
    assert check.outputs[0].max_rel <= 1e-4
    half = to_onnx(hybrid, tmp_path / "h16.onnx", x, fp16=True)
    assert verify_onnx(hybrid, half, x, providers=("CUDAExecutionProvider",))[0].passed
