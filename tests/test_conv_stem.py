"""The convolutional stem pass for ViTs (``passes.conv_stem``) and its layer."""

import pytest
import torch
import torchvision
from models import TinyResNet, tiny_vit

import tcnn_fx
from tcnn_fx.layers import ConvStem, stem_widths
from tcnn_fx.passes.conv_stem import conv_stem
from tcnn_fx.tokens import TokenModelError, find_patch_stem

X16 = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_widths_follow_the_paper():
    assert stem_widths(192, 16) == [24, 48, 96, 192]  # ViT_C-1GF
    assert stem_widths(384, 16) == [48, 96, 192, 384]  # ViT_C-4GF
    assert stem_widths(128, 4) == [64, 128]
    assert stem_widths(32, 16) == [8, 8, 16, 32]
    with pytest.raises(ValueError, match="not a power of 2"):
        stem_widths(192, 14)


@pytest.mark.parametrize("remove_block", [False, True])
def test_timm_vit_keeps_its_tokens(remove_block):
    torch.manual_seed(0)
    model = tiny_vit().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted, report = conv_stem(model, (X16,), remove_block=remove_block)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the user's model was changed"
    stem = converted.patch_embed.proj
    assert isinstance(stem, ConvStem) and stem.widths == (16, 32) and report.widths == (16, 32)
    assert [type(m).__name__ for m in stem] == ["Conv2d", "BatchNorm2d", "ReLU"] * 2 + ["Conv2d"]
    assert converted.patch_embed(X16).shape == model.patch_embed(X16).shape
    assert converted(X16).shape == model(X16).shape
    assert len(converted.blocks) == len(model.blocks) - remove_block
    assert report.removed_block == ("blocks.1" if remove_block else None)
    # untouched parts keep their weights
    assert torch.equal(converted.head.weight, model.head.weight)
    # reported FLOPs are the model's (per image); the stem adds, a removed block takes away
    with torch.no_grad():
        flops = tcnn_fx.timing.count_flops(lambda: converted(X16[:1]))
    assert report.flops_after == flops
    assert (report.flops_after < report.flops_before) == remove_block


def test_torchvision_vit_paper_preset():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=192, mlp_dim=64, num_classes=5
    ).eval()
    x = torch.randn(1, 3, 32, 32)
    converted, report = conv_stem(model, (x,), remove_block=True)
    assert report.stem == "conv_proj" and report.widths == (24, 48, 96, 192) and report.grid_size == (2, 2)
    assert report.removed_block == "encoder.layers.1" and len(converted.encoder.layers) == 1
    assert converted(x).shape == (1, 5)
    assert find_patch_stem(converted, (x,)).kind == "conv_stem"
    # attention counted (MHA's fused eval path is invisible to the counter): the train-mode count is the same
    with torch.no_grad():
        train_mode = tcnn_fx.timing.count_flops(lambda: model.train()(x))
    assert report.flops_before == train_mode and not converted.training


def test_checkpoint_replays_the_stem(tmp_path):
    torch.manual_seed(0)
    model, _ = conv_stem(tiny_vit().eval(), (X16,), remove_block=True)
    hybrid = tcnn_fx.rewrite(model, "none", (X16[:1],))
    assert isinstance(hybrid.get_submodule("patch_embed.proj"), ConvStem)  # kept whole by the capture
    tcnn_fx.save(hybrid, tmp_path / "m.pt", conv_stem={"widths": [16, 32], "remove_block": True})
    with pytest.raises(ValueError, match="records no model spec"):
        tcnn_fx.load(tmp_path / "m.pt")
    loaded = tcnn_fx.load(tmp_path / "m.pt", model=tiny_vit())
    torch.testing.assert_close(loaded.eval()(X16), hybrid(X16))


def test_bad_input():
    with pytest.raises(TokenModelError, match="no patchify stem"):
        conv_stem(TinyResNet(), (X16,))
    model = tiny_vit()
    with pytest.raises(ValueError, match="make 8x8 patches, not 4x4"):
        conv_stem(model, (X16,), widths=[8, 16, 32])
    with pytest.raises(TokenModelError, match="already is a convolutional stem"):
        conv_stem(conv_stem(model, (X16,))[0], (X16,))
    with pytest.raises(ValueError, match="not a power of 2"):
        conv_stem(tiny_vit(img_size=18, patch_size=6), (torch.randn(1, 3, 18, 18),))
    with pytest.raises(TokenModelError, match="multiple of the patch size"):
        conv_stem(tiny_vit(img_size=18, patch_size=4, dynamic_img_pad=False), (torch.randn(1, 3, 18, 18),))
