"""How far each ConvAttention2d parameterisation is from its convolution at initialisation.

For every configuration below, the layer is built from a random convolution
and compared with it on random inputs: relative error max|y_attn - y_conv| /
max|y_conv| in float32 and float64, and, to separate rounding from
construction, the float32 convolution's own error against float64.  Also
reports the largest gradient reaching the positional parameters on a unit
loss, which shows how saturated the positional softmax is.

    python benchmarks/conv_attention_error.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from tcnn_fx import ConvAttention2d, ConvAttentionConfig

CONFIGS = {
    "exact (default)": ConvAttentionConfig.exact(),
    "convit (locality 1, sigmoid gate 1)": ConvAttentionConfig.convit(),
    "convit, locality 5": ConvAttentionConfig.convit(locality_strength=5.0),
    "linear gate 0, locality 1": ConvAttentionConfig(locality_strength=1.0),
    "linear gate 0, locality 10": ConvAttentionConfig(locality_strength=10.0),
    "linear gate 0, locality 20": ConvAttentionConfig(locality_strength=20.0),
}
#: (in, out, kernel, stride, input size): late-stage ResNet shapes and a small odd one.
SHAPES = [(256, 256, 3, 1, 14), (512, 512, 3, 1, 7), (256, 512, 3, 2, 14), (16, 24, 5, 1, 9)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def measure(name: str, config: ConvAttentionConfig, shape: tuple) -> dict:
    c_in, c_out, kernel, stride, size = shape
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2)
    x = torch.randn(2, c_in, size, size)
    row = {"config": name, "shape": f"{c_in}->{c_out} k{kernel} s{stride} @{size}"}
    with torch.no_grad():
        reference = conv.double()(x.double())
        layer64 = ConvAttention2d.from_conv(conv, config)
        row["float64"] = relative_error(layer64(x.double()), reference)
        conv.float()
        layer = ConvAttention2d.from_conv(conv, config)
        row["float32"] = relative_error(layer(x), conv(x))
        row["float32 conv vs float64"] = relative_error(conv(x), reference)
    layer(x).square().mean().backward()
    row["max |grad| centres"] = layer.centres.grad.abs().max().item()
    row["max |grad| locality"] = layer.locality.grad.abs().max().item()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    rows = [measure(name, config, shape) for name, config in CONFIGS.items() for shape in SHAPES]
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = [f"{v:.1e}" if isinstance(v, float) else v for v in row.values()]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=2)


if __name__ == "__main__":
    main()
