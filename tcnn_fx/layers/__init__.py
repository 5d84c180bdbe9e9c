"""Model-agnostic layers: nothing here knows about graphs, sites or models."""

from tcnn_fx.layers.conv_attention import AttentionMaps, ConvAttention2d, ConvAttentionConfig
from tcnn_fx.layers.conv_geometry import ConvGeometry
from tcnn_fx.layers.conv_stem import ConvStem, stem_widths

__all__ = ["AttentionMaps", "ConvAttention2d", "ConvAttentionConfig", "ConvGeometry", "ConvStem", "stem_widths"]
