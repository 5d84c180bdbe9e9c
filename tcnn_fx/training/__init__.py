"""Fine-tuning a hybrid (or its CNN) on an image-classification folder."""

from tcnn_fx.training.data import (
    ImageFolderData,
    Preprocessing,
    balanced_subset,
    extract,
    find_splits,
    load_splits,
)
from tcnn_fx.training.loop import (
    FinetuneResult,
    evaluate_accuracy,
    finetune,
    model_signature,
)
from tcnn_fx.training.recipe import Recipe

__all__ = [
    "FinetuneResult",
    "ImageFolderData",
    "Preprocessing",
    "Recipe",
    "balanced_subset",
    "evaluate_accuracy",
    "extract",
    "find_splits",
    "finetune",
    "load_splits",
    "model_signature",
]
