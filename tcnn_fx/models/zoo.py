"""The model zoo the compiler is checked against, in CI (capture and stages) and in ``benchmarks/coverage.py``.

Every entry of ``torchvision.models.list_models()`` that holds a 2-D image
CNN (classification, detection, segmentation, the float builds of the
quantisation models, RAFT's encoders) and a broad list of timm CNN
families.  An entry says which submodule is the CNN where the model is more
than one (a detector's ``backbone``: its forward resizes images and
post-processes boxes) and at which input size to capture it.  Video models
(3-D convolutions) are not entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

#: timm CNNs of many families, including ones plain symbolic_trace fails on (vgg11, dm_nfnet_f0).
TIMM_CNNS = [
    "resnet18", "resnet50", "resnet50d", "resnet101d", "resnetrs50", "resnetrs101", "resnet26t", "resnet10t",
    "seresnet50", "ecaresnet50d", "resnext50_32x4d", "seresnext26d_32x4d", "skresnet18", "resnetblur50",
    "regnetx_002", "regnety_008", "regnetz_b16", "efficientnet_b0", "efficientnet_b3", "tf_efficientnet_b0",
    "tf_efficientnetv2_s", "efficientnetv2_rw_t", "mobilenetv2_100", "mobilenetv3_large_100", "tf_mobilenetv3_small_100",
    "mnasnet_100", "fbnetc_100", "lcnet_050", "convnext_atto", "convnext_tiny", "convnextv2_atto", "densenet121",
    "dla34", "dla46_c", "res2net50_26w_4s", "res2next50", "cspresnet50", "cspdarknet53", "darknet53", "hrnet_w18_small",
    "vgg11", "vgg16_bn", "repvgg_a2", "dm_nfnet_f0", "nf_resnet50", "ghostnet_100", "ghostnetv2_100", "xception41",
    "legacy_xception", "inception_v3", "inception_v4", "inception_resnet_v2", "vovnet39a", "ese_vovnet19b_dw",
    "rexnet_100", "selecsls42b", "dpn68", "tresnet_m", "gernet_s", "hardcorenas_a", "mixnet_s", "tinynet_a",
    "resnest14d", "nasnetalarge", "pnasnet5large", "cs3darknet_s", "bat_resnext26ts", "botnet26t_256",
    "mobileone_s0", "fastvit_t8", "efficientvit_b0", "repghostnet_050",
]  # fmt: skip

_INPUT_SIZE = {
    "timm:inception_v3": 299, "timm:inception_v4": 299, "timm:inception_resnet_v2": 299, "timm:nasnetalarge": 331,
    "timm:pnasnet5large": 331, "timm:botnet26t_256": 256, "timm:bat_resnext26ts": 256,
    "torchvision:inception_v3": 299, "torchvision:quantized_inception_v3": 299,
    "torchvision:ssd300_vgg16": 300, "torchvision:ssdlite320_mobilenet_v3_large": 320,
}  # fmt: skip


@dataclass(frozen=True)
class ZooEntry:
    """One model: its spec, its task, the submodule that is the CNN (``None``: the whole model), input size."""

    spec: str
    task: str
    module: str | None = None
    input_size: int = 224

    def target(self, model: nn.Module) -> nn.Module:
        """The part of ``model`` (built from ``spec``) that is captured."""
        return model.get_submodule(self.module) if self.module else model


def torchvision_entries() -> list[ZooEntry]:
    """Every torchvision model with a 2-D image CNN in it (all of ``list_models()`` but the video models)."""
    import torchvision.models as models

    tasks = {
        "detection": (models.detection, "backbone"),
        "segmentation": (models.segmentation, None),
        "quantization": (models.quantization, None),  # built in float (quantize=False), as a user fine-tunes them
        "optical_flow": (models.optical_flow, "feature_encoder"),
    }
    entries = [ZooEntry(f"torchvision:{n}", "classification", None, _size(f"torchvision:{n}"))
               for n in models.list_models(module=models)]  # fmt: skip
    for task, (module, submodule) in tasks.items():
        size = 320 if task == "detection" else 224
        for name in models.list_models(module=module):
            spec = f"torchvision:{name}"
            entries.append(ZooEntry(spec, task, submodule, _INPUT_SIZE.get(spec, size)))
    return entries


def timm_entries() -> list[ZooEntry]:
    return [ZooEntry(f"timm:{name}", "classification", None, _size(f"timm:{name}")) for name in TIMM_CNNS]


def _size(spec: str) -> int:
    return _INPUT_SIZE.get(spec, 224)


def build_on_meta(spec: str) -> nn.Module:
    """The model ``spec`` names on the ``meta`` device (no memory, no initialisation), in eval mode.

    torchvision's RegNet builders compute their widths with tensor
    arithmetic that the meta device cannot answer; those are built for real.
    """
    from tcnn_fx.specs import build

    try:
        with torch.device("meta"):
            return build(spec).eval()
    except NotImplementedError:
        return build(spec).eval()


def randomise_norms(model: nn.Module) -> nn.Module:
    """Random affine parameters and statistics for every norm layer of ``model`` (in place), for checks.

    Libraries initialise the last norm of residual branches to zero (timm's
    ``zero_init_last``), which would hide converted convolutions from a
    whole-model comparison; random norms make every branch count.
    """
    with torch.no_grad():
        for module in model.modules():
            if "Norm" not in type(module).__name__:
                continue
            for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if not tensor.is_floating_point():
                    continue
                if name in ("weight", "running_var"):
                    tensor.uniform_(0.5, 1.0)
                elif name in ("bias", "running_mean"):
                    tensor.normal_(0.0, 0.05)
    return model
