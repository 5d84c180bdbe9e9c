"""The cost model: what a convolution, its attention layer, a model and its hybrid cost.

Every cost figure the project reports comes from here: the site table, the
policy budgets, the search constraints, the rewrite report and the CLI.

* A site's ``conv_flops`` / ``attention_flops`` are FLOPs per image as
  ``torch.utils.flop_counter`` counts them (2 per multiply-accumulate);
  ``conv_params`` / ``attention_params`` count weights and bias.
* A model's cost (``ModelCost``) is over the **whole model**: every FLOP
  shape propagation counted in one forward pass (convolutions, matrix
  products, attention: whatever the flop counter sees), per image, and every
  parameter of the traced model.
* A hybrid costs the model's cost plus, for each converted site, its
  attention layer's cost minus its convolution's.  Ratios are hybrid / CNN.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tcnn_fx.layers import ConvAttention2d, ConvAttentionConfig, ConvGeometry


@dataclass(frozen=True)
class SiteCost:
    """FLOPs per image and parameters of one convolution and of the attention layer that would replace it."""

    conv_flops: int
    attention_flops: int
    conv_params: int
    attention_params: int


def conv_params(in_channels: int, out_channels: int, groups: int, taps: int, bias: bool) -> int:
    return out_channels * (in_channels // groups) * taps + (out_channels if bias else 0)


def convertible_site_cost(
    geometry: ConvGeometry,
    in_channels: int,
    out_channels: int,
    input_size: tuple[int, int],
    *,
    bias: bool,
    config: ConvAttentionConfig | None,
) -> SiteCost:
    """The cost of a convolution whose geometry fits its input, and of its ``ConvAttention2d``."""
    attention_flops, attention_params = ConvAttention2d.cost(
        geometry, in_channels, out_channels, *input_size, bias=bias, config=config
    )
    return SiteCost(
        conv_flops=geometry.conv_flops(in_channels, out_channels, *input_size),
        attention_flops=attention_flops,
        conv_params=conv_params(in_channels, out_channels, geometry.groups, geometry.num_taps, bias),
        attention_params=attention_params,
    )


def measured_conv_cost(
    in_channels: int, out_channels: int, groups: int, taps: int, output_size: tuple[int, int], *, bias: bool
) -> SiteCost:
    """The cost of a convolution known only by its weight and output size (it pads in its own code, or cannot be
    converted); its attention cost is 0: it has no attention layer."""
    weights = conv_params(in_channels, out_channels, groups, taps, bias=False)
    return SiteCost(
        conv_flops=2 * output_size[0] * output_size[1] * weights,
        attention_flops=0,
        conv_params=weights + (out_channels if bias else 0),
        attention_params=0,
    )


@dataclass(frozen=True)
class ModelCost:
    """A traced model's FLOPs per image (every FLOP the flop counter saw) and parameters (all of them)."""

    flops: int
    params: int

    def hybrid(self, converted: Iterable) -> ModelCost:
        """The cost of the hybrid converting the sites ``converted`` (``Site``s)."""
        converted = list(converted)
        return ModelCost(
            flops=self.flops + sum(s.attention_flops - s.conv_flops for s in converted),
            params=self.params + sum(s.attention_params - s.conv_params for s in converted),
        )

    def flop_ratio(self, converted: Iterable) -> float:
        return self.hybrid(converted).flops / self.flops if self.flops else 1.0

    def param_ratio(self, converted: Iterable) -> float:
        return self.hybrid(converted).params / self.params if self.params else 1.0


#: What every ratio is over, in one sentence for docs and help texts.
RATIOS = "hybrid / CNN over the whole model: all FLOPs of one forward pass per image, and all parameters"
