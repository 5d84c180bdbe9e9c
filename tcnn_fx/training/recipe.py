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
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Recipe(DictSettings):
    """How to fine-tune: every number that changes the result, saved with each checkpoint."""

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.01
    attention_lr: float | None = None  # None: the same as lr
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.0
    label_smoothing: float = 0.1
    clip_grad_norm: float | None = None
    amp: bool = True  # mixed precision on CUDA; ignored on the CPU
    seed: int = 0
    workers: int = 2

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
