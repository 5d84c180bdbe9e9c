"""Module contracts users rely on: modes are restored per submodule, and one call of a layer is one call.

A frozen batch norm inside a training model must stay frozen after anything
tcnn_fx does that evaluates the model; a converted layer called once on a
large batch must fire its hooks once and be measured on every image.
"""

import pytest
import torch
from torch import nn

import tcnn_fx
from tcnn_fx import analysis
from tcnn_fx.layers import ConvAttention2d
from tcnn_fx.layers.backends import INFERENCE_IMAGES
from tcnn_fx.modes import evaluating, restored_modes
from tcnn_fx.specs import load_model
from tcnn_fx.training.loop import evaluate_accuracy


def frozen_norm_model() -> nn.Module:
    """A training CIFAR ResNet-20 whose stem batch norm is frozen (eval mode), as fine-tuning recipes do."""
    model = load_model("cifar:resnet20").train()
    model.bn1.eval()
    return model


def modes(model: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


def test_helpers_restore_each_submodule_not_the_top_level_mode():
    model = frozen_norm_model()
    before = modes(model)
    with evaluating(model):
        assert not any(modes(model).values())
    assert modes(model) == before
    with restored_modes(model):
        model.train()
    assert modes(model) == before and model.bn1.training is False


def test_analysis_and_evaluation_keep_a_frozen_norm_frozen():
    torch.manual_seed(0)
    model = frozen_norm_model()
    hybrid = tcnn_fx.rewrite(model, "last", (torch.randn(1, 3, 32, 32),))
    assert hybrid.training and not hybrid.get_submodule("bn1").training  # the copy keeps the modes
    before = modes(hybrid)
    analysis.analyze_attention(hybrid, torch.randn(3, 3, 32, 32))
    assert modes(hybrid) == before
    data = torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long))
    evaluate_accuracy(hybrid, data, batch_size=2, progress=False)
    assert modes(hybrid) == before
    tcnn_fx.verify(model, hybrid, (torch.randn(2, 3, 32, 32),))
    assert modes(hybrid) == before and modes(model) == modes(frozen_norm_model())


CHANNELS = 128  # where CPU inference takes a chunked fast path (the oneDNN gather or the compiled kernel)


def layer() -> ConvAttention2d:
    torch.manual_seed(0)
    return ConvAttention2d.from_conv(nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1)).eval()


def test_one_call_on_a_large_batch_fires_hooks_once():
    attention = layer()
    images = INFERENCE_IMAGES * 2 + 4
    seen = []
    attention.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    attention.register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape)))
    x = torch.randn(images, CHANNELS, 8, 8)
    with torch.no_grad():
        out = attention(x)
        single = torch.cat([attention(x[i : i + 1]) for i in range(images)])
    assert seen[:2] == [(images, CHANNELS, 8, 8), (images, CHANNELS, 8, 8)]
    assert len(seen) == 2 + 2 * images
    torch.testing.assert_close(out, single, rtol=1e-5, atol=1e-5)


def test_analysis_measures_every_image_of_a_batch():
    attention = layer()
    with torch.no_grad():
        attention.gate.fill_(0.5)  # content attention: distances depend on each image
    model = nn.Sequential(attention)
    images = torch.randn(INFERENCE_IMAGES * 2 + 4, CHANNELS, 8, 8)
    (whole,) = analysis.analyze_attention(model, images, chunk=len(images))
    parts = [analysis.analyze_attention(model, images[i : i + 1], chunk=1)[0] for i in range(len(images))]
    for which in ("content_distance", "positional_distance"):
        mean = [sum(getattr(p, which)[h] for p in parts) / len(parts) for h in range(9)]
        assert getattr(whole, which) == pytest.approx(mean, rel=1e-6)
    last_chunk = analysis.analyze_attention(model, images[-4:], chunk=4)[0]
    assert whole.content_distance != pytest.approx(last_chunk.content_distance, rel=1e-3)
