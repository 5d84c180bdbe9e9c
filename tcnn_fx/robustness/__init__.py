"""Robustness evaluation: common corruptions (CIFAR-10-C / ImageNet-C style) and the accuracy under them."""

from tcnn_fx.robustness.corruptions import CORRUPTIONS, PARAMETERS, SEVERITIES, corrupt
from tcnn_fx.robustness.evaluate import CorruptedData, RobustnessReport, evaluate_robustness

__all__ = [
    "CORRUPTIONS",
    "PARAMETERS",
    "SEVERITIES",
    "CorruptedData",
    "RobustnessReport",
    "corrupt",
    "evaluate_robustness",
]
