"""Measuring a candidate: latency ratio side by side with the CNN, accuracy after a short fine-tune.

The accuracy of a hybrid at conversion is the CNN's, whatever the mask, so
accuracy is measured after fine-tuning on the user's data: a short
fine-tune (``Recipe`` of a few epochs on a subset), or a cheaper proxy, the
same with a handful of steps on fewer images (``proxy``).  How well the proxy
ranks candidates against the short fine-tune is measured by
``benchmarks/search_proxy.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from tcnn_fx.errors import InvalidInputError
from tcnn_fx.rewrite import rewrite
from tcnn_fx.search.space import SearchSpace
from tcnn_fx.training import FinetuneResult, Recipe, finetune


@dataclass
class CandidateEvaluator:
    """``evaluate(mask, objective)`` for ``run_search`` on a real model and dataset."""

    model: nn.Module
    example_inputs: tuple
    space: SearchSpace
    train: Dataset | None = None
    evaluation: Dataset | None = None
    recipe: Recipe | None = None
    runtime: str = "torch"
    batch: int = 8
    rounds: int = 10

    def __call__(self, mask: tuple[bool, ...], objective: str) -> float:
        if objective == "latency_ratio":
            if not any(mask):
                # Nothing converted: the candidate is the CNN. (Measured, it once came out at 1.45 as the
                # first measurement of a search, and at 0.99-1.07 when repeated.)
                return 1.0
            from tcnn_fx.export.bench import bench

            shape = tuple(self.example_inputs[0].shape[1:])
            (row,) = bench(
                self.model,
                self.hybrid(mask).eval(),
                shape,
                batches=(self.batch,),
                runtimes=(self.runtime,),
                rounds=self.rounds,
            )
            return row.ratio
        if objective == "accuracy":
            return self.finetuned(mask).final_top1
        raise InvalidInputError(f"cannot measure {objective!r}; measured objectives are latency_ratio and accuracy")

    def hybrid(self, mask: tuple[bool, ...]) -> nn.Module:
        """The model with the sites of ``mask`` converted."""
        return rewrite(self.model, self.space.policy(mask), self.example_inputs)

    def finetuned(self, mask: tuple[bool, ...]) -> FinetuneResult:
        """The hybrid of ``mask`` after the recipe's fine-tune, with its per-epoch metrics (top-1 and loss)."""
        if self.train is None or self.evaluation is None or self.recipe is None:
            raise InvalidInputError("the accuracy objective needs training data, evaluation data and a recipe")
        hybrid = self.hybrid(mask)
        torch.manual_seed(self.recipe.seed)
        return finetune(hybrid, self.train, self.evaluation, self.recipe, progress=False)
