"""Stages by structure: what users call stage N is stage N, whatever the family, dilation or capture leaves."""

import warnings

import pytest
import torch
from models import StaticSameNet, TinyResNet

import tcnn_fx
from tcnn_fx import PolicyError, meta
from tcnn_fx.models.zoo import build_on_meta
from tcnn_fx.specs import build
from tcnn_fx.stages import stage_table

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")


def sites_of(model, size=224, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = tcnn_fx.trace(model, (torch.empty(1, 3, size, size, device="meta"),), **kwargs)
    return graph.meta["tcnn_fx.sites"], graph


def stage_of(sites, prefix):
    """The stage numbers of the sites under module ``prefix``."""
    return {s.stage for s in sites if s.name == prefix or s.name.startswith(prefix + ".")}


def assert_stages(sites, expected):
    """Every site under each module path is in that stage, and no site of another module is."""
    for prefix, stage in expected.items():
        assert stage_of(sites, prefix) == {stage}, f"{prefix}: {stage_of(sites, prefix)} != {stage}"
        others = {s.name for s in sites if s.stage == stage and not (s.name == prefix or s.name.startswith(prefix + "."))}
        assert not others, f"stage {stage} also holds {sorted(others)[:5]}"


RESNETS = ["torchvision:resnet50", "torchvision:resnext50_32x4d", "torchvision:wide_resnet50_2", "timm:resnet18",
           "timm:resnet50d", "timm:resnest14d", "timm:seresnet50", "timm:resnext50_32x4d"]  # fmt: skip


@pytest.mark.parametrize("spec", RESNETS)
def test_resnet_layers_are_stages(spec):
    sites, _ = sites_of(build_on_meta(spec))
    assert_stages(sites, {f"layer{i}": i for i in range(1, 5)})
    assert {s.stage for s in sites if s.stem} == {0} and all(s.stage == 0 for s in sites if not s.name.startswith("layer"))


def test_avg_down_blocks_belong_to_the_stage_they_open():
    """ResNeSt pools after its 3x3 convolution: layer4's 3x3 outputs 14x14, yet it is stage 4."""
    sites, _ = sites_of(build_on_meta("timm:resnest14d"))
    by_name = {s.name: s for s in sites}
    assert by_name["layer4.0.conv2.conv"].output_size == (14, 14) and by_name["layer4.0.conv2.conv"].stage == 4


@pytest.mark.parametrize("name", ["deeplabv3_resnet50", "fcn_resnet50"])
def test_dilated_backbones_keep_their_stages(name):
    """layer3/layer4 stay at 1/8 resolution with dilation 2 and 4: they are still stages 3 and 4."""
    model = build_on_meta(f"torchvision:{name}")
    for sites in (sites_of(model.backbone)[0], [s for s in sites_of(model)[0] if s.name.startswith("backbone.")]):
        prefix = "backbone." if sites[0].name.startswith("backbone.") else ""
        for i in range(1, 5):
            assert stage_of(sites, f"{prefix}layer{i}") == {i}
        assert {s.output_size for s in sites if s.name.startswith(f"{prefix}layer4.")} == {(28, 28)}


def test_a_dilated_resnet_without_declaration():
    with torch.device("meta"):
        model = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True]).eval()
    sites, _ = sites_of(model)
    assert_stages(sites, {f"layer{i}": i for i in range(1, 5)})


def test_convnext_regnet_and_their_stems():
    sites, _ = sites_of(build_on_meta("timm:convnext_tiny"))
    assert_stages(sites, {"stem": 0, "stages.0": 1, "stages.1": 2, "stages.2": 3, "stages.3": 4})
    sites, _ = sites_of(build_on_meta("torchvision:convnext_tiny"))
    assert stage_of(sites, "features.0") == {0} and stage_of(sites, "features.7") == {4}
    assert stage_of(sites, "features.6") == {4}  # the downsampling layer opens stage 4
    sites, _ = sites_of(build_on_meta("timm:regnety_008"))
    assert_stages(sites, {"stem": 0, "s1": 1, "s2": 2, "s3": 3, "s4": 4})
    sites, _ = sites_of(build_on_meta("torchvision:regnet_y_400mf"))
    assert_stages(sites, {"stem": 0, **{f"trunk_output.block{i}": i for i in range(1, 5)}})


def test_cifar_resnet_stem_at_full_resolution_is_stage_zero():
    sites, _ = sites_of(build("cifar:resnet20"), size=32)
    assert_stages(sites, {"conv1": 0, "layer1": 1, "layer2": 2, "layer3": 3})
    assert [stage.resolution for stage in stage_table(sites)] == [(32, 32), (32, 32), (16, 16), (8, 8)]


@pytest.mark.parametrize("spec", ["timm:efficientnet_b0", "timm:mobilenetv3_large_100", "timm:ghostnet_100"])
def test_block_groups_follow_timm_feature_info(spec):
    """timm declares where each stage ends (feature_info); a stage's blocks stay whole and 'last' is stride 32."""
    model = build_on_meta(spec)
    sites, graph = sites_of(model)
    assert graph.meta[meta.DECLARED_STAGES] == tuple(d["module"] for d in model.feature_info)
    last = max(s.stage for s in sites)
    assert stage_table(sites)[-1].resolution == (7, 7) and stage_table(sites)[-1].index == last
    assert stage_of(sites, model.feature_info[-1]["module"]) == {last}
    assert [s.stage for s in sites] == sorted(s.stage for s in sites)  # block groups in order


def test_efficientnet_first_block_is_not_the_stem():
    sites, _ = sites_of(build_on_meta("timm:efficientnet_b0"))
    assert_stages(sites, {"conv_stem": 0, "blocks.0": 1, "blocks.1": 2})


def test_stage_numbers_do_not_depend_on_capture_leaves():
    model = build_on_meta("torchvision:resnet18")
    for leaves in (["layer1"], ["layer2", "layer4.1"]):
        sites, _ = sites_of(model, leaf_modules=leaves)
        for i in range(1, 5):
            assert stage_of(sites, f"layer{i}") <= {i}
        assert max(s.stage for s in sites) == 4 and {s.stage for s in sites if s.name.startswith("layer3")} == {3}


def test_an_inconsistent_declaration_is_ignored():
    model = build_on_meta("timm:resnet18")
    model.feature_info = [{"module": "layer4", "reduction": 32}, {"module": "layer1", "reduction": 4}]
    sites, _ = sites_of(model)
    assert_stages(sites, {f"layer{i}": i for i in range(1, 5)})


def test_padding_owning_convolutions_are_staged_and_the_stage_table_names_modules():
    sites, _ = sites_of(StaticSameNet(), size=16)
    assert [s.stage for s in sites] == [0, 1, 2, 2, 2]
    table = stage_table(sites)
    assert [stage.describe() for stage in table] == [
        "0 (8x8: _conv_stem)", "1 (8x8: _depthwise_conv)", "2 (4x4: _reduce_conv .. _conv_head)",
    ]  # fmt: skip


def test_missing_stage_error_lists_stages_with_resolution_and_modules():
    sites, _ = sites_of(build_on_meta("torchvision:resnet18"))
    with pytest.raises(PolicyError, match=r"no stage \[5\]; its stages are 0 \(112x112: conv1\), 1 \(56x56: layer1\), "
                       r"2 \(28x28: layer2\), 3 \(14x14: layer3\), 4 \(7x7: layer4\)"):  # fmt: skip
        tcnn_fx.Policy("stage5").plan(sites)


def test_resolution_rules_are_their_own_axis():
    """res<=N reads each convolution's own output; stage reads the block: layer4.0.conv1 is stage 4 at 14x14."""
    sites, _ = sites_of(build_on_meta("torchvision:resnet50"))
    plan = tcnn_fx.Policy("stage4 & res<=7", include_pointwise=True).plan(sites)
    assert "layer4.0.conv1" not in plan.names and "layer4.0.conv2" in plan.names
    assert {s.stage for s in sites if s.name == "layer4.0.conv1"} == {4}


def test_tiny_resnet_numbers():
    sites, _ = sites_of(TinyResNet(), size=16)
    assert [s.stage for s in sites] == [0, 1, 2, 2, 2]


def test_rewrite_with_a_leaf_still_finds_stage4():
    model = torchvision.models.resnet18().eval()
    hybrid = tcnn_fx.rewrite(model, "stage4", (torch.randn(1, 3, 64, 64),), leaf_modules=["layer1"])
    assert tcnn_fx.report_of(hybrid).converted == ("layer4.0.conv1", "layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2")
