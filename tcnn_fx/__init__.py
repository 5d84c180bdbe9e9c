"""tcnn_fx: recast a trained CNN's convolutions as self-attention that equals them at initialisation."""

from tcnn_fx import export, meta
from tcnn_fx.capture import CaptureError, capture
from tcnn_fx.checkpoint import load, save
from tcnn_fx.errors import TcnnFxError
from tcnn_fx.layers import AttentionMaps, ConvAttention2d, ConvAttentionConfig, ConvGeometry, ConvStem
from tcnn_fx.meta import recipe_of, report_of
from tcnn_fx.passes.attention_init import (
    AttentionInitReport,
    impulse_init,
    measure_target_mass,
    mimetic_init,
    scale_positions,
)
from tcnn_fx.passes.conv_stem import ConvStemReport, conv_stem
from tcnn_fx.passes.vit import ViTPasses, apply_vit_passes, measure_impulse_mass
from tcnn_fx.policy import Plan, Policy, PolicyError
from tcnn_fx.recipe import RewriteRecipe, RewriteReport
from tcnn_fx.rewrite import rewrite, trace
from tcnn_fx.sites import Site, find_sites, site_graph
from tcnn_fx.tokens import AttentionSite, find_attention_sites, find_token_grid
from tcnn_fx.verify import VerifyReport, verify

__version__ = "0.1.0"

__all__ = [
    "AttentionInitReport",
    "AttentionMaps",
    "AttentionSite",
    "CaptureError",
    "ConvAttention2d",
    "ConvAttentionConfig",
    "ConvGeometry",
    "ConvStem",
    "ConvStemReport",
    "Plan",
    "Policy",
    "PolicyError",
    "RewriteRecipe",
    "RewriteReport",
    "Site",
    "TcnnFxError",
    "VerifyReport",
    "ViTPasses",
    "__version__",
    "apply_vit_passes",
    "capture",
    "conv_stem",
    "export",
    "find_attention_sites",
    "find_sites",
    "find_token_grid",
    "impulse_init",
    "load",
    "measure_impulse_mass",
    "measure_target_mass",
    "meta",
    "mimetic_init",
    "recipe_of",
    "report_of",
    "rewrite",
    "save",
    "scale_positions",
    "site_graph",
    "trace",
    "verify",
]
