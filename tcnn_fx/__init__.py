"""tcnn_fx: recast a trained CNN's convolutions as self-attention that equals them at initialisation."""

from tcnn_fx import export
from tcnn_fx.capture import CaptureError, capture
from tcnn_fx.checkpoint import load, save
from tcnn_fx.layers import AttentionMaps, ConvAttention2d, ConvAttentionConfig, ConvGeometry
from tcnn_fx.policy import Plan, Policy, PolicyError
from tcnn_fx.rewrite import RewriteReport, report_of, rewrite, trace
from tcnn_fx.sites import Site, find_sites, site_graph
from tcnn_fx.verify import VerifyReport, verify

__version__ = "0.1.0"

__all__ = [
    "AttentionMaps",
    "CaptureError",
    "ConvAttention2d",
    "ConvAttentionConfig",
    "ConvGeometry",
    "Plan",
    "Policy",
    "PolicyError",
    "RewriteReport",
    "Site",
    "VerifyReport",
    "__version__",
    "capture",
    "export",
    "find_sites",
    "load",
    "report_of",
    "rewrite",
    "save",
    "site_graph",
    "trace",
    "verify",
]
