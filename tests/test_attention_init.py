"""Impulse and mimetic initialisation of ViT attention layers (``passes.attention_init``) and the token analysis."""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from models import SequenceFirstViT, TinyResNet, tiny_vit
from torch import nn

import tcnn_fx
from tcnn_fx.passes.attention_init import (
    impulse_init,
    measure_target_mass,
    mimetic_init,
    target_logits,
    window_offsets,
)
from tcnn_fx.policy import PolicyError
from tcnn_fx.tokens import AttentionWeights, TokenModelError, find_attention_sites, find_token_grid

X16 = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _torchvision_vit(num_layers: int = 2) -> nn.Module:
    return torchvision.models.VisionTransformer(
        image_size=16, patch_size=4, num_layers=num_layers, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5
    )


def _mean(masses) -> float:
    values = [m for layer in masses for m in (layer.position_mass if hasattr(layer, "position_mass") else layer)]
    return sum(values) / len(values)


@pytest.mark.parametrize("build", [tiny_vit, _torchvision_vit, SequenceFirstViT])
def test_sites_and_grid_by_module_type(build):
    torch.manual_seed(0)
    model = build()
    sites = find_attention_sites(model)
    assert len(sites) == 2 and [s.index for s in sites] == [0, 1]
    assert all(s.num_heads * s.head_dim == s.embed_dim and math.isclose(s.scale, s.head_dim**-0.5) for s in sites)
    grid = find_token_grid(model, (X16,))
    assert grid.grid_size == (4, 4) and grid.positions.shape == (16, sites[0].embed_dim)
    assert grid.prefix == (0 if build is SequenceFirstViT else 1)


@pytest.mark.parametrize("build", [tiny_vit, _torchvision_vit, SequenceFirstViT])
def test_attention_maps_are_the_layers_own(build):
    """The maps the analysis computes reproduce the layer's output: softmax(q k^T) v, projected."""
    torch.manual_seed(0)
    model = build().eval()
    site = find_attention_sites(model)[0]
    module = model.get_submodule(site.name)
    weights = AttentionWeights(site, module)
    tokens = torch.randn(3, 7, site.embed_dim)
    maps = weights.maps(tokens)
    packed = module.qkv if site.kind == "timm" else None
    w, b = (packed.weight, packed.bias) if packed is not None else (module.in_proj_weight, module.in_proj_bias)
    width = site.num_heads * site.head_dim
    v = F.linear(tokens, w[2 * width :], None if b is None else b[2 * width :])
    v = v.reshape(3, 7, site.num_heads, site.head_dim).transpose(1, 2)
    mixed = (maps @ v).transpose(1, 2).reshape(3, 7, width)
    if site.kind == "timm":
        expected, actual = module.proj(mixed), module(tokens)
    else:
        expected = module.out_proj(mixed)
        sequence = tokens if module.batch_first else tokens.transpose(0, 1)
        actual = module(sequence, sequence, sequence, need_weights=False)[0]
        actual = actual if module.batch_first else actual.transpose(0, 1)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("build", [tiny_vit, _torchvision_vit, SequenceFirstViT])
def test_impulse_heads_attend_to_their_offsets(build):
    torch.manual_seed(0)
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    initialised, report = impulse_init(model, (X16,), seed=3)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the user's model was changed"
    window = set(window_offsets(3))
    assert len(report.layers) == 2 and all(set(layer.offsets) <= window for layer in report.layers)
    heads = {s.name: s.num_heads for s in find_attention_sites(model)}
    assert all(len(layer.offsets) == heads[layer.name] for layer in report.layers)
    assert min(m for layer in report.layers for m in layer.position_mass) > 0.9  # rank head_dim (8 to 16) of 16 tokens
    # Only the query and key weights (and biases) changed
    changed = {k for k, v in initialised.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(("qkv" in k or "in_proj" in k) for k in changed)
    # Reproducible from the seed; another seed draws other offsets
    assert impulse_init(model, (X16,), seed=3)[1].layers == report.layers
    assert any(
        a.offsets != b.offsets
        for a, b in zip(report.layers, impulse_init(model, (X16,), seed=4)[1].layers, strict=True)
    )


def test_positions_drowned_by_content_unless_rescaled():
    """timm's 0.02 positions vanish under the patch content; position_scale restores the structure in the model."""
    torch.manual_seed(0)
    model = tiny_vit().eval()
    plain, report = impulse_init(model, (X16,), seed=0)
    scaled, scaled_report = impulse_init(model, (X16,), position_scale=1.0, seed=0)
    uniform = 1 / 17
    assert _mean(measure_target_mass(model, report, X16).values()) < 2 * uniform
    assert _mean(measure_target_mass(plain, report, X16).values()) < 3 * uniform
    assert _mean(measure_target_mass(scaled, scaled_report, X16).values()) > 0.6
    table = scaled.pos_embed.detach()  # the same RMS as the patch tokens
    with torch.no_grad():
        patches = scaled.patch_embed.proj(X16)
    assert table.square().mean().sqrt() == pytest.approx(float(patches.square().mean().sqrt()), rel=1e-4)


def test_scale_positions_alone():
    torch.manual_seed(0)
    model = tiny_vit().eval()
    scaled, factor = tcnn_fx.scale_positions(model, (X16,), 2.0)
    assert factor > 10  # 0.02 positions against patch tokens of RMS ~0.5
    torch.testing.assert_close(scaled.pos_embed, model.pos_embed * factor)
    with torch.no_grad():
        rms = scaled.patch_embed.proj(X16).square().mean().sqrt()
    assert float(scaled.pos_embed.detach().square().mean().sqrt()) == pytest.approx(2 * float(rms), rel=1e-5)
    with pytest.raises(ValueError, match="positive"):
        tcnn_fx.scale_positions(model, (X16,), 0.0)


def test_fixed_order_walks_the_window():
    torch.manual_seed(0)
    _, report = impulse_init(tiny_vit(embed_dim=64, num_heads=4), (X16,), order="fixed", kernel_size=3)
    assert report.layers[0].offsets == tuple(window_offsets(3)[:4])


def test_distance_target_on_sinusoidal_positions():
    """Smooth embeddings cannot express the one-hot target; the low-rank distance target still peaks on the offset."""
    model = tiny_vit(img_size=32, embed_dim=64)  # 8x8 grid
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(16) / 15)
    y, x = rows.flatten()[:, None] * omega, cols.flatten()[:, None] * omega
    with torch.no_grad():
        model.pos_embed[0, 1:] = torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)
    image = torch.randn(1, 3, 32, 32)
    _, distance = impulse_init(model, (image,), target="distance", refine_steps=0)
    _, onehot = impulse_init(model, (image,), target="onehot", refine_steps=0)
    assert _mean(distance.layers) > 0.6
    assert _mean(onehot.layers) < 0.2


def test_refinement_beats_the_rank_limit():
    """head_dim 8 against 64 tokens: the closed form blurs the shift; a few Adam steps make the target win."""
    torch.manual_seed(0)
    model = tiny_vit(img_size=32, embed_dim=64, num_heads=8)
    image = torch.randn(1, 3, 32, 32)
    closed = _mean(impulse_init(model, (image,), refine_steps=0)[1].layers)
    refined_model, refined = impulse_init(model, (image,), refine_steps=100)
    assert closed < 0.3 and _mean(refined.layers) > 0.99
    assert refined.settings["refine_steps"] == 100
    # the report's mass is the model's: recomputed from the written weights
    grid = find_token_grid(refined_model, (image,))
    site = find_attention_sites(refined_model)[0]
    positions = F.layer_norm(grid.positions, grid.positions.shape[-1:])
    maps = AttentionWeights(site, refined_model.get_submodule(site.name)).maps(positions[None])
    index, valid = grid.target_index(refined.layers[0].offsets[0])
    mass = maps[0, 0, torch.arange(64)[valid], index[valid]].mean().item()
    assert mass == pytest.approx(refined.layers[0].position_mass[0], abs=1e-5)


def test_target_logits_peak_on_the_offset():
    logits = target_logits((5, 6), (1, -1), "distance", 4.0)
    assert logits.shape == (30, 30) and torch.allclose(logits.mean(1), torch.zeros(30, dtype=logits.dtype))
    assert logits[0 * 6 + 3].argmax() == 1 * 6 + 2  # (0, 3) looks at (1, 2)
    assert torch.linalg.matrix_rank(logits) <= 4
    onehot = target_logits((5, 6), (1, -1), "onehot", 16.0)
    assert onehot[0 * 6 + 3].argmax() == 1 * 6 + 2


def test_policy_selects_layers():
    torch.manual_seed(0)
    model = tiny_vit()
    assert [layer.name for layer in impulse_init(model, (X16,), policy="depth>=1")[1].layers] == ["blocks.1.attn"]
    assert [layer.name for layer in impulse_init(model, (X16,), policy="name:blocks.0.*")[1].layers] == [
        "blocks.0.attn"
    ]
    assert len(impulse_init(model, (X16,), policy=lambda s: s.index == 0)[1].layers) == 1
    assert len(impulse_init(model, (X16,), policy=["blocks.0.attn", "blocks.1.attn"])[1].layers) == 2
    with pytest.raises(PolicyError, match="layers are"):
        impulse_init(model, (X16,), policy=["blocks.7.attn"])
    with pytest.raises(PolicyError, match="unknown attention policy"):
        impulse_init(model, (X16,), policy="stage4")
    with pytest.raises(TokenModelError, match=r"layers are \['blocks.0.attn \(depth 0\)'"):
        impulse_init(model, (X16,), policy="depth>5")
    assert impulse_init(model, (X16,), policy="none")[1].layers == ()


@pytest.mark.parametrize("build", [lambda: tiny_vit(embed_dim=48, num_heads=1), lambda: SequenceFirstViT(width=48)])
def test_mimetic_query_key_product_one_head(build):
    """With one head the rank is the full width, so Wq^T Wk is exactly a1 Z + b1 I: check its statistics."""
    torch.manual_seed(0)
    model = build()
    site = find_attention_sites(model)[0]
    if site.num_heads != 1:
        model = SequenceFirstViT(width=48)
        model.attentions = nn.ModuleList([nn.MultiheadAttention(48, 1) for _ in range(2)])
        site = find_attention_sites(model)[0]
    initialised, _ = mimetic_init(model, seed=0)
    module = initialised.get_submodule(site.name)
    packed = module.qkv.weight if site.kind == "timm" else module.in_proj_weight
    product = packed[:48].T @ packed[48:96]
    assert torch.diagonal(product).mean().item() == pytest.approx(0.7, abs=0.03)
    off = product - torch.diag(torch.diagonal(product))
    assert off.std().item() == pytest.approx(0.7 / 48**0.5, rel=0.15)


def test_mimetic_products():
    torch.manual_seed(0)
    model = tiny_vit(embed_dim=64, num_heads=2)
    initialised, report = mimetic_init(model, seed=0)
    assert all(layer.value_output for layer in report.layers)
    site = find_attention_sites(initialised)[0]
    module = initialised.get_submodule(site.name)
    weights = AttentionWeights(site, module)
    width = site.num_heads * site.head_dim
    value_output = module.qkv.weight[2 * width :].T @ module.proj.weight.T  # x -> x @ Wv^T @ Wo^T
    assert torch.diagonal(value_output).mean().item() == pytest.approx(-0.4, abs=0.03)
    off = value_output - torch.diag(torch.diagonal(value_output))
    assert off.std().item() == pytest.approx(0.4 / 64**0.5, rel=0.15)
    # Per head, a token scores itself above other tokens: the identity part of Wq^T Wk
    tokens = torch.randn(1, 40, 64)
    logits = weights.maps(tokens).log()
    eye = torch.eye(40, dtype=torch.bool)
    assert (logits[..., eye].mean() - logits[..., ~eye].mean()).item() > 0.5
    assert mimetic_init(model, seed=0)[1] == report


def test_conv_attention_content_branch():
    """Mimetic init reaches ConvAttention2d's content queries/keys and keeps the layer exact; impulse refuses it."""
    torch.manual_seed(0)
    model = TinyResNet().eval()
    x = torch.randn(2, 3, 16, 16)
    hybrid = tcnn_fx.rewrite(model, "stage>=1", (x,))
    sites = find_attention_sites(hybrid)
    assert sites and {s.kind for s in sites} == {"conv_attention"}
    initialised, report = mimetic_init(hybrid, seed=0)
    assert not any(layer.value_output for layer in report.layers)
    layer = initialised.get_submodule(sites[0].name)
    assert not torch.equal(layer.query_weight, hybrid.get_submodule(sites[0].name).query_weight)
    torch.testing.assert_close(initialised(x), model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(TokenModelError, match="patchify"):
        impulse_init(hybrid, (x,))


def test_bad_input():
    torch.manual_seed(0)
    with pytest.raises(TokenModelError, match="no self-attention layer"):
        mimetic_init(TinyResNet())
    model = tiny_vit()
    with pytest.raises(ValueError, match="larger than the"):
        impulse_init(model, (X16,), kernel_size=5)
    with pytest.raises(ValueError, match="odd"):
        impulse_init(model, (X16,), kernel_size=2)
    with pytest.raises(TokenModelError, match="does not fit"):
        impulse_init(model, (torch.randn(1, 3, 32, 32),))
    with pytest.raises(TokenModelError, match="no positional embedding"):
        impulse_init(tiny_vit(pos_embed="none"), (X16,))
    with pytest.raises(TokenModelError, match="qk_norm"):
        impulse_init(tiny_vit(qk_norm=True), (X16,))
    with pytest.raises(ValueError, match="target"):
        impulse_init(model, (X16,), target="gaussian")
    with pytest.raises(TokenModelError, match="scale_norm"):
        mimetic_init(tiny_vit(scale_attn_norm=True))
    bias_kv = SequenceFirstViT()
    bias_kv.attentions[0] = nn.MultiheadAttention(24, 3, add_bias_kv=True)
    with pytest.raises(TokenModelError, match="add_bias_kv"):
        mimetic_init(bias_kv)


def test_sites_survive_capture():
    """A captured or rewritten ViT keeps its attention layers whole, so the passes still find them."""
    torch.manual_seed(0)
    model = tiny_vit().eval()
    graph_module = tcnn_fx.rewrite(model, "none", (X16,))
    assert [s.name for s in find_attention_sites(graph_module)] == ["blocks.0.attn", "blocks.1.attn"]
    torch.testing.assert_close(graph_module(X16), model(X16))


def _deit_distilled():
    import timm

    return timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False)


@pytest.mark.parametrize(
    ("build", "prefix"),
    [
        (_deit_distilled, 2),  # class and distillation tokens, with positions
        (lambda: tiny_vit(reg_tokens=4, no_embed_class=True), 5),  # class + registers, positions for the grid only
        (lambda: tiny_vit(class_token=False, global_pool="avg"), 0),
    ],
)
def test_timm_token_layouts(build, prefix):
    """Class, distillation and register tokens (with and without positions of their own) are found and skipped."""
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(1, 3, *model.patch_embed.img_size)
    grid = find_token_grid(model, (x,))
    assert grid.prefix == prefix and grid.grid_size == model.patch_embed.grid_size
    initialised, report = impulse_init(model, (x,), policy="depth<1", refine_steps=20)
    assert len(report.layers) == 1 and _mean(report.layers) > 0.9
    # the reported mass is over the whole sequence, prefix tokens included as keys
    site = find_attention_sites(initialised)[0]
    tokens = torch.cat([grid.prefix_tokens, grid.positions])
    maps = AttentionWeights(site, initialised.get_submodule(site.name)).maps(
        F.layer_norm(tokens, (site.embed_dim,))[None]
    )
    index, valid = grid.target_index(report.layers[0].offsets[0])
    direct = maps[0, 0, prefix + torch.arange(len(valid))[valid], prefix + index[valid]].mean().item()
    assert direct == pytest.approx(report.layers[0].position_mass[0], abs=1e-5)
    # in the model, before and after capture (which drops Python attributes such as num_prefix_tokens)
    masses = measure_target_mass(initialised, report, x)
    captured = tcnn_fx.rewrite(initialised, "none", (x,))
    assert masses["blocks.0.attn"] == pytest.approx(measure_target_mass(captured, report, x)["blocks.0.attn"], abs=1e-5)
    assert set(masses) == {"blocks.0.attn"}
