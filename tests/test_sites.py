"""Sites: matching by type, geometry, stages, stem, blocks, cost, convertibility, site graph."""

import networkx as nx
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import tcnn_fx
from models import FunctionalNet, TinyResNet
from tcnn_fx import ConvAttention2d


def sites_of(model, size=16):
    graph_module = tcnn_fx.trace(model, (torch.randn(1, 3, size, size),))
    return {s.name: s for s in graph_module.meta["tcnn_fx.sites"]}, graph_module


def test_norms_and_activations_are_matched_by_type_in_every_spelling():
    sites, _ = sites_of(TinyResNet())
    assert (sites["stem"].norm_type, sites["stem"].activation_type) == ("BatchNorm2d", "relu")  # F.relu
    assert (sites["a1"].norm_type, sites["a1"].activation_type) == ("BatchNorm2d", "relu")  # x.relu()
    assert (sites["b1"].norm_type, sites["b1"].activation_type) == ("BatchNorm2d", "relu")  # torch.relu
    assert (sites["b2"].norm_type, sites["b2"].activation_type) == (None, "silu")
    assert sites["shortcut"].norm_type is None


def test_stages_resolutions_stem_and_blocks():
    sites, _ = sites_of(TinyResNet(), size=32)
    assert sites["stem"].stem and not sites["a1"].stem
    assert [sites[n].stage for n in ("stem", "a1", "b1", "b2", "shortcut")] == [0, 1, 2, 2, 2]
    assert sites["b1"].input_size == (32, 32) and sites["b1"].output_size == (16, 16)
    assert sites["a1"].block != sites["b2"].block


def test_torchvision_resnet50_stage_convention():
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        model = torchvision.models.resnet50()
    sites, _ = sites_of(model, size=224)
    assert sites["conv1"].stage == 0 and sites["conv1"].stem
    for stage, resolution in zip(range(1, 5), (56, 28, 14, 7)):
        assert sites[f"layer{stage}.1.conv2"].stage == stage
        assert sites[f"layer{stage}.1.conv2"].output_size == (resolution, resolution)
    assert sites["layer4.0.conv2"].stage == 4  # the stride-2 conv opening stage 4 belongs to it


def test_functional_shared_and_computed_weight_convolutions():
    sites, _ = sites_of(FunctionalNet(), size=16)
    same = sites["same"]
    # Its pad amounts are computed from the input size: the pad stays before the site, which sees the padded input.
    assert same.kind == "functional" and same.convertible and same.pad_node is None and not same.absorbed
    assert same.geometry.padding == (0, 0, 0, 0) and same.input_size == (17, 17) and same.output_size == (8, 8)
    assert same.norm_type == "GroupNorm" and same.activation_type == "relu"
    assert not sites["shared"].convertible and "2 places" in sites["shared"].reason
    computed = next(s for s in sites.values() if s.kind == "functional" and s.name != "same")
    assert not computed.convertible and "computed in forward" in computed.reason


def test_costs_match_the_flop_counter():
    sites, _ = sites_of(TinyResNet(), size=16)
    site = sites["b1"]
    conv = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
    layer = ConvAttention2d.from_conv(conv)
    x = torch.randn(1, 8, 16, 16)
    for module, expected in ((conv, site.conv_flops), (layer, site.attention_flops)):
        with FlopCounterMode(display=False) as counter:
            module(x)
        assert counter.get_total_flops() == expected
    assert site.attention_params == sum(p.numel() for p in layer.parameters())
    assert site.conv_params == conv.weight.numel()


def test_site_graph_exports(tmp_path):
    sites, graph_module = sites_of(TinyResNet())
    graph = tcnn_fx.site_graph(graph_module, list(sites.values()))
    assert graph.has_edge("stem", "a1") and graph.has_edge("a1", "b1") and graph.has_edge("a1", "shortcut")
    assert graph.has_edge("b1", "b2") and not graph.has_edge("stem", "b2")
    nx.write_graphml(graph, tmp_path / "sites.graphml")
    assert nx.read_graphml(tmp_path / "sites.graphml").number_of_nodes() == 5


def test_fixed_filter_buffers_are_not_converted():
    class Blur(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("filt", torch.ones(3, 1, 3, 3) / 9)

        def forward(self, x):
            return torch.nn.functional.conv2d(x, self.filt, padding=1, groups=3)

    sites, _ = sites_of(torch.nn.Sequential(Blur(), torch.nn.Conv2d(3, 3, 3)))
    blur = sites["0"]
    assert not blur.convertible and "buffer" in blur.reason
    assert sites["1"].convertible


def test_pruned_convolution_site_is_convertible_and_hooked_one_is_not():
    from torch.nn.utils import prune

    model = TinyResNet()
    prune.l1_unstructured(model.a1, "weight", amount=0.5)
    model.b2.register_forward_hook(lambda module, args, out: out * 2)
    sites, _ = sites_of(model)
    assert sites["a1"].convertible
    assert not sites["b2"].convertible and "_forward_hooks" in sites["b2"].reason


def test_a_convolution_that_pads_in_an_untraceable_forward_is_reported_not_convertible():
    from models import DynamicSamePadConv

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=4, padding=1), DynamicSamePadConv(4, 4, 5, stride=2))
    sites, graph_module = sites_of(model, size=16)  # the second one sees 4x4: its kernel only fits its own padding
    site = sites["1"]
    assert "1" in graph_module.meta["tcnn_fx.capture"].fallback_leaves
    assert not site.convertible and "overrides forward()" in site.reason
    assert site.output_size == (2, 2) and site.conv_flops == 2 * 2 * 2 * 4 * 4 * 25 and site.attention_flops == 0
