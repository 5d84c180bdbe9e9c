"""The fine-tuning recipe: optimiser, schedule, regularisation, as one serialisable value.

Parameter groups follow common practice for fine-tuning attention models:
no weight decay on biases, norm parameters, and the attention layers' gates
and positional parameters (decay would pull the gates and the heads' centres
towards zero, i.e. towards content attention at the image centre); the new
attention parameters (content queries/keys, gates, positional parameters,
not the value/projection weights taken from the convolution) may have their
own learning rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from tcnn_fx.errors import InvalidInputError
from tcnn_fx.layers import ConvAttention2d
from tcnn_fx.settings import DictSettings

OPTIMIZERS = ("sgd", "adamw")
#: Parameters of ConvAttention2d that the convolution did not provide.
ATTENTION_PARAMETERS = ("query_weight", "key_weight", "centres", "locality", "gate")
#: Of those, the ones weight decay must leave alone.
NO_DECAY_ATTENTION = ("centres", "locality", "gate")


def _field(default, help: str, **metadata):
    """A field with its one-line description (``metadata['help']``): the CLI's flags are generated from these."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass(frozen=True)
class Recipe(DictSettings):
    """How to fine-tune: every number that changes the result, saved with each checkpoint.

    Each field's ``metadata['help']`` describes it (and ``metadata['choices']``
    lists the allowed values where there are few); ``tcnn-fx finetune`` and
    ``tcnn-fx search`` generate one flag per field from them.
    """

    epochs: int = _field(10, "training epochs")
    batch_size: int = _field(128, "training batch size per process (evaluation uses twice as many)")
    optimizer: str = _field("sgd", "sgd (Nesterov momentum) or adamw", choices=OPTIMIZERS)
    lr: float = _field(0.01, "peak learning rate after warm-up")
    attention_lr: float | None = _field(
        None, "peak learning rate of the new attention parameters (default: the same as lr)"
    )
    momentum: float = _field(0.9, "SGD (Nesterov) momentum")
    weight_decay: float = _field(5e-4, "weight decay; not applied to norms, biases, gates, head centres, locality")
    warmup_epochs: float = _field(1.0, "epochs of linear warm-up (fractions allowed)")
    min_lr_ratio: float = _field(0.0, "the cosine decay ends at this fraction of the peak learning rate")
    label_smoothing: float = _field(0.1, "label smoothing of the cross-entropy")
    clip_grad_norm: float | None = _field(None, "clip the global gradient norm to this value (default: no clipping)")
    amp: bool = _field(True, "mixed precision on CUDA (bfloat16, else float16); the CPU always trains in float32")
    seed: int = _field(0, "seed of the data order, augmentation and anything else drawn at random while training")
    workers: int = _field(2, "data-loading processes")

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise InvalidInputError(f"optimizer {self.optimizer!r} is not one of {OPTIMIZERS}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in (
            "lr",
            "weight_decay",
            "warmup_epochs",
            "label_smoothing",
            "workers",
        ):
            if getattr(self, name) < 0:
                raise InvalidInputError(f"{name} must not be negative, not {getattr(self, name)}")
        if self.attention_lr is not None and self.attention_lr < 0:
            raise InvalidInputError(f"attention_lr must not be negative, not {self.attention_lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise InvalidInputError(f"min_lr_ratio must be in [0, 1], not {self.min_lr_ratio}")

    def parameter_groups(self, model: nn.Module) -> list[dict]:
        """Four groups: (CNN | attention) x (decay | no decay); empty groups are left out."""
        attention_lr = self.lr if self.attention_lr is None else self.attention_lr
        groups = {key: [] for key in ((False, True), (False, False), (True, True), (True, False))}
        norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
        for module in model.modules():
            for name, parameter in module.named_parameters(recurse=False):
                if not parameter.requires_grad:
                    continue
                new = isinstance(module, ConvAttention2d) and name in ATTENTION_PARAMETERS
                decay = not (
                    parameter.ndim <= 1 or isinstance(module, norm_types) or (new and name in NO_DECAY_ATTENTION)
                )
                groups[(new, decay)].append(parameter)
        return [
            {"params": params, "lr": attention_lr if new else self.lr, "weight_decay": self.weight_decay if decay else 0.0,
             "name": f"{'attention' if new else 'cnn'}{'' if decay else ' (no decay)'}"}
            for (new, decay), params in groups.items() if params
        ]  # fmt: skip

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        groups = self.parameter_groups(model)
        if self.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, nesterov=self.momentum > 0)
        return torch.optim.AdamW(groups, lr=self.lr)

    def build_schedule(
        self, optimizer: torch.optim.Optimizer, steps_per_epoch: int
    ) -> torch.optim.lr_scheduler.LambdaLR:
        """Per-step schedule: linear warm-up, then cosine decay to ``min_lr_ratio`` of each group's rate."""
        warmup = round(self.warmup_epochs * steps_per_epoch)
        total = self.epochs * steps_per_epoch

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = (step - warmup) / max(1, total - warmup)
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
