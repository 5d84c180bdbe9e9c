"""tcnn_fx: recast a trained CNN's convolutions as self-attention that equals them at initialisation."""

from tcnn_fx.layers import AttentionMaps, ConvAttention2d, ConvAttentionConfig, ConvGeometry

__version__ = "0.1.0"

__all__ = ["AttentionMaps", "ConvAttention2d", "ConvAttentionConfig", "ConvGeometry", "__version__"]
