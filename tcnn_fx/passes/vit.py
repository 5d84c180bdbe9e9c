"""The ViT passes as one step: convolutional stem, positional scale, attention initialisation.

``apply_vit_passes(model, example_inputs, ViTPasses(...))`` runs, in this
order, ``conv_stem`` (optionally removing the last block),
``scale_positions`` and ``impulse_init`` or ``mimetic_init``, and returns the
model with the records of what each pass did (``ViTPassRecords``: the conv
stem record ``checkpoint.save(conv_stem=...)`` needs, the positional factor,
the attention init report).  Settings that do not go together are refused
before any pass runs.

``measure_impulse_mass(model, report, data)`` measures, on a class-balanced
sample of real images, how much of each impulse-initialised head's attention
lands on its target inside the model (``measure_target_mass``), next to the
same mass on the positional embeddings alone (the report's).
"""

from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from tcnn_fx.errors import InvalidInputError
from tcnn_fx.passes.attention_init import AttentionInitReport
from tcnn_fx.passes.conv_stem import ConvStemReport
from tcnn_fx.settings import DictSettings

ATTENTION_INITS = ("default", "impulse", "mimetic")
IMPULSE_TARGETS = ("onehot", "distance")
IMPULSE_ORDERS = ("random", "fixed")


def _field(default, help: str, **metadata):
    return field(default=default, metadata={"help": help, **metadata})


@dataclass(frozen=True)
class ViTPasses(DictSettings):
    """Which ViT passes to apply, and how (the defaults apply none).

    Each field's ``metadata['help']`` describes it; ``tcnn-fx finetune``
    generates one flag per field (``--conv-stem``, ``--impulse-kernel`` ...).
    ``seed`` draws the impulse offsets (``order='random'``) and the mimetic noise.
    """

    conv_stem: bool = _field(False, "replace the patchify stem with a convolutional stem")
    remove_block: bool = _field(False, "with the conv stem: drop the last transformer block (keeps FLOPs matched)")
    position_scale: float | None = _field(
        None, "rescale the positional embedding to this multiple of the patch tokens' RMS (before any init)"
    )
    attention_init: str = _field(
        "default",
        "initialise the attention layers' queries/keys (and values for mimetic); default: as the model built them",
        choices=ATTENTION_INITS,
    )
    impulse_kernel: int | None = _field(None, "impulse window K: offsets within K x K (default 3)")
    impulse_target: str | None = _field(None, "impulse logit target (default onehot)", choices=IMPULSE_TARGETS)
    impulse_order: str | None = _field(
        None, "impulse offsets drawn at random per head (default) or walking the window row-major",
        choices=IMPULSE_ORDERS,
    )  # fmt: skip
    seed: int = 0

    def __post_init__(self) -> None:
        if self.attention_init not in ATTENTION_INITS:
            raise InvalidInputError(f"attention_init must be one of {ATTENTION_INITS}, not {self.attention_init!r}")
        if self.remove_block and not self.conv_stem:
            raise InvalidInputError(
                "remove_block (--remove-block) goes with conv_stem (--conv-stem): it keeps the stem's FLOPs matched"
            )
        if self.position_scale is not None and not self.position_scale > 0:
            raise InvalidInputError(f"position_scale (--position-scale) must be positive, not {self.position_scale}")
        impulse = {"impulse_kernel": self.impulse_kernel, "impulse_target": self.impulse_target,
                   "impulse_order": self.impulse_order}  # fmt: skip
        stray = [name for name, value in impulse.items() if value is not None]
        if stray and self.attention_init != "impulse":
            flags = ", ".join(f"{name} (--{name.replace('_', '-')})" for name in stray)
            raise InvalidInputError(
                f"{flags} need attention_init impulse (--attention-init impulse); it is {self.attention_init}"
            )
        if self.impulse_target is not None and self.impulse_target not in IMPULSE_TARGETS:
            raise InvalidInputError(f"impulse_target must be one of {IMPULSE_TARGETS}, not {self.impulse_target!r}")
        if self.impulse_order is not None and self.impulse_order not in IMPULSE_ORDERS:
            raise InvalidInputError(f"impulse_order must be one of {IMPULSE_ORDERS}, not {self.impulse_order!r}")
        if self.impulse_kernel is not None and (self.impulse_kernel < 1 or self.impulse_kernel % 2 == 0):
            raise InvalidInputError(
                f"impulse_kernel (--impulse-kernel) must be odd and positive (3 or 5 in the paper), "
                f"not {self.impulse_kernel}"
            )

    @property
    def any(self) -> bool:
        """Whether any pass is asked for."""
        return self.conv_stem or self.position_scale is not None or self.attention_init != "default"


@dataclass(frozen=True)
class ViTPassRecords:
    """What ``apply_vit_passes`` did: each pass's report, ``None`` for a pass not applied."""

    conv_stem: ConvStemReport | None = None
    remove_block: bool = False
    position_factor: float | None = None  # the factor the positional embedding was multiplied by
    attention_init: AttentionInitReport | None = None

    @property
    def stem_record(self) -> dict | None:
        """The ``conv_stem=`` record of ``tcnn_fx.save``, so that ``tcnn_fx.load`` replays the stem."""
        if self.conv_stem is None:
            return None
        return {"widths": list(self.conv_stem.widths), "remove_block": self.remove_block}

    def lines(self, position_scale: float | None = None) -> list[str]:
        """What was done, as text lines (the passes' tables)."""
        lines = []
        if self.conv_stem is not None:
            lines.append(self.conv_stem.table())
        if self.position_factor is not None:
            target = f" to {position_scale} x the patch tokens' RMS" if position_scale is not None else ""
            lines.append(f"positional embedding scaled by {self.position_factor:.3g}{target}")
        if self.attention_init is not None:
            lines.append(self.attention_init.table())
        return lines


def apply_vit_passes(
    model: nn.Module, example_inputs: tuple, passes: ViTPasses, *, inplace: bool = False
) -> tuple[nn.Module, ViTPassRecords]:
    """Apply ``passes`` to ``model`` in order: conv stem, positional scale, attention init; see the module docstring.

    ``example_inputs`` fixes the token grid (the model's input size).  The
    model is copied unless ``inplace=True``.
    """
    if not inplace:
        import copy

        model = copy.deepcopy(model)
    stem = factor = report = None
    if passes.conv_stem:
        from tcnn_fx.passes.conv_stem import conv_stem

        model, stem = conv_stem(model, example_inputs, remove_block=passes.remove_block, inplace=True)
    if passes.position_scale is not None:
        from tcnn_fx.passes.attention_init import scale_positions

        model, factor = scale_positions(model, example_inputs, passes.position_scale, inplace=True)
    if passes.attention_init == "impulse":
        from tcnn_fx.passes.attention_init import impulse_init

        model, report = impulse_init(
            model, example_inputs, kernel_size=passes.impulse_kernel or 3, target=passes.impulse_target or "onehot",
            order=passes.impulse_order or "random", seed=passes.seed, inplace=True,
        )  # fmt: skip
    elif passes.attention_init == "mimetic":
        from tcnn_fx.passes.attention_init import mimetic_init

        model, report = mimetic_init(model, seed=passes.seed, inplace=True)
    return model, ViTPassRecords(stem, passes.remove_block and stem is not None, factor, report)


@dataclass(frozen=True)
class ImpulseMass:
    """Per impulse-initialised layer and head: attention mass on the head's target, on positions alone and in the model."""

    report: AttentionInitReport
    in_model: dict[str, list[float]]  # layer -> per head, inside the model on ``images`` real images
    images: int

    def lines(self) -> list[str]:
        """One line per layer: the mean over heads of both masses."""
        lines = []
        for layer in self.report.layers:
            positions = sum(layer.position_mass) / len(layer.position_mass)
            in_model = sum(self.in_model[layer.name]) / len(self.in_model[layer.name])
            lines.append(f"  {layer.name}: target mass {positions:.3f} on positions alone, {in_model:.3f} in the model "
                         f"on {self.images} images")  # fmt: skip
        return lines

    def to_dict(self) -> dict:
        """The JSON record: the init report, the in-model masses, the number of images."""
        return {"report": dataclasses.asdict(self.report), "in_model_mass": self.in_model, "images": self.images}


def measure_impulse_mass(
    model: nn.Module, report: AttentionInitReport, data, *, images: int = 256, seed: int = 0
) -> ImpulseMass:
    """How convolutional the impulse-initialised heads of ``model`` are on real images; see the module docstring.

    ``data`` is a labelled image dataset (``tcnn_fx.training.ImageFolderData``
    or a ``Subset`` of one: ``(image, label)`` items, ``targets``); up to
    ``images`` of its images are used, the same number per class (drawn with
    ``seed``), at most as many per class as the smallest class has.
    """
    from tcnn_fx.passes.attention_init import measure_target_mass
    from tcnn_fx.training.data import balanced_subset

    if report.method != "impulse":
        raise InvalidInputError(f"a {report.method} init report has no target offsets to measure")
    targets = _targets(data)
    if not targets:
        raise InvalidInputError("no images to measure the impulse heads on: the dataset is empty")
    counts = collections.Counter(targets)
    chosen = balanced_subset(targets, min(min(counts.values()), max(1, images // len(counts))), seed=seed)
    batch = torch.stack([data[i][0] for i in chosen])
    return ImpulseMass(report, measure_target_mass(model, report, batch), len(batch))


def _targets(data) -> list[int]:
    """The labels of ``data`` without decoding its images where it can say them (a dataset or a ``Subset`` of one)."""
    if isinstance(data, torch.utils.data.Subset):
        labels = _targets(data.dataset)
        return [labels[i] for i in data.indices]
    if hasattr(data, "targets"):
        return list(data.targets)
    return [data[i][1] for i in range(len(data))]
