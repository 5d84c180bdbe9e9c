"""Train/eval modes: switch them for a while and put every submodule's own mode back.

``model.train(was_training)`` is not a restore: it sets every submodule to
the top-level mode, so a frozen batch norm inside a training model (a
detector's ``FrozenBatchNorm``-style eval submodule, a fine-tuning recipe's
frozen stem) would come back in train mode.  Everything in the project that
changes modes temporarily goes through these helpers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def restored_modes(*models: nn.Module) -> Iterator[None]:
    """Let the body switch the models between train and eval; every submodule's mode is restored after."""
    saved = [(module, module.training) for model in models for module in model.modules()]
    try:
        yield
    finally:
        for module, training in saved:
            module.training = training


@contextlib.contextmanager
def evaluating(*models: nn.Module) -> Iterator[None]:
    """Run the body with the models in eval mode; every submodule's own mode is restored after."""
    with restored_modes(*models):
        for model in models:
            model.eval()
        yield
