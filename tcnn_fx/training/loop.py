"""The fine-tuning loop: train, evaluate each epoch, checkpoint each epoch, resume after a crash.

One process trains on one device; under ``torchrun`` (``WORLD_SIZE`` > 1)
each process trains its share through ``DistributedDataParallel`` and rank 0
alone writes checkpoints, metrics and progress.  The loop takes any
``nn.Module`` classifier: a hybrid from ``tcnn_fx.rewrite`` or the CNN it
came from, so both are trained by the same code with the same recipe.

An output folder holds ``last.pt`` (model, optimiser, schedule, scaler,
random states, recipe; written atomically after each epoch) and
``metrics.jsonl`` (one JSON object per epoch; epoch 0 is the model before
any step).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from tcnn_fx.errors import DivergenceError, FileConflictError, InvalidInputError, MissingFileError
from tcnn_fx.files import atomic_write
from tcnn_fx.modes import evaluating
from tcnn_fx.training.recipe import Recipe

CHECKPOINT = "last.pt"
METRICS = "metrics.jsonl"
FORMAT = "tcnn_fx.finetune/1"


def model_signature(model: nn.Module) -> str:
    """A digest of the state dict's names and shapes: which model a checkpoint belongs to."""
    layout = [(name, tuple(t.shape)) for name, t in model.state_dict().items()]
    return hashlib.sha256(repr(layout).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Processes:
    """This process's place among ``torchrun`` workers (one process, rank 0, without it)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_env(cls) -> Processes:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cuda = torch.cuda.is_available()
        if world == 1:
            return cls(device=torch.device("cuda" if cuda else "cpu"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        return cls(dist.get_rank(), world, torch.device(f"cuda:{local}" if cuda else "cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def total(self, *values: float) -> list[float]:
        """Sum ``values`` over all processes."""
        if self.world == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()


@dataclass
class FinetuneResult:
    """The trained model (unwrapped) and one metrics record per epoch, epoch 0 being the start."""

    model: nn.Module
    history: list[dict] = field(default_factory=list)

    @property
    def final_top1(self) -> float:
        return self.history[-1]["val_top1"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _amp_dtype(recipe: Recipe, device: torch.device) -> torch.dtype | None:
    """bfloat16 where the GPU has it, else float16 (which needs gradient scaling); None: no mixed precision."""
    if not (recipe.amp and device.type == "cuda"):
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def evaluate_accuracy(
    model: nn.Module, data: Dataset | DataLoader, *, batch_size: int = 256, workers: int = 0,
    processes: Processes | None = None, progress: bool = False, description: str = "evaluating",
) -> dict:  # fmt: skip
    """Top-1 accuracy and mean cross-entropy of ``model`` (in eval mode) on ``data``.

    Under ``torchrun`` each process takes every ``world``-th sample and the
    counts are summed, so no sample is counted twice.
    """
    if processes is None:
        parameter = next(model.parameters(), None)
        processes = Processes(device=parameter.device if parameter is not None else torch.device("cpu"))
    if not isinstance(data, DataLoader):
        if processes.world > 1:
            data = torch.utils.data.Subset(data, range(processes.rank, len(data), processes.world))
        data = DataLoader(data, batch_size=batch_size, num_workers=workers)
    correct = loss = count = 0.0
    with evaluating(model), torch.no_grad():
        for images, labels in tqdm(
            data,
            desc=description,
            leave=False,
            disable=not (progress and processes.main),
        ):
            images, labels = images.to(processes.device), labels.to(processes.device)
            logits = model(images).float()
            loss += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(1) == labels).sum().item()
            count += len(labels)
    correct, loss, count = processes.total(correct, loss, count)
    return {
        "val_top1": correct / count,
        "val_loss": loss / count,
        "val_images": int(count),
    }


def check_run_folder(out_dir: str | Path | None, resume: bool) -> None:
    """Refuse a run that would overwrite a checkpoint, or resume from none; before anything is computed or written."""
    checkpoint = Path(out_dir) / CHECKPOINT if out_dir is not None else None
    if checkpoint is not None and checkpoint.exists() and not resume:
        raise FileConflictError(
            f"{checkpoint} exists: pass resume=True (--resume) to continue it, or choose another output folder"
        )
    if resume and (checkpoint is None or not checkpoint.is_file()):
        raise MissingFileError(f"nothing to resume: no {CHECKPOINT} in {out_dir}")
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise FileConflictError(f"the output folder {out_dir} is a file")


def check_batches(images: int, batch_size: int, processes: int = 1) -> None:
    """Refuse a training set smaller than one batch per process (the loader drops incomplete batches)."""
    if images < batch_size * processes:
        raise InvalidInputError(
            f"the training set has {images} images, fewer than one batch of {batch_size} per process"
            + (f" ({processes} processes)" if processes > 1 else "")
        )


class _Run:
    """Checkpoint and metrics files of one run; the folder is made when the first file is written."""

    def __init__(self, out_dir: Path | None, main: bool):
        self.dir, self.main = out_dir, main and out_dir is not None

    @property
    def checkpoint(self) -> Path | None:
        return self.dir / CHECKPOINT if self.dir else None

    def save(self, state: dict) -> None:
        if self.main:
            self.dir.mkdir(parents=True, exist_ok=True)
            with atomic_write(self.checkpoint) as temporary:
                torch.save(state, temporary)

    def log(self, history: list[dict]) -> None:
        """Rewrite the metrics file to ``history`` (so a resumed run drops the records of lost epochs)."""
        if self.main:
            self.dir.mkdir(parents=True, exist_ok=True)
            with atomic_write(self.dir / METRICS) as temporary:
                Path(temporary).write_text("".join(json.dumps(record) + "\n" for record in history))


def _load_checkpoint(path: Path, model: nn.Module, recipe: Recipe) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unreadable for any reason: say which file
        raise InvalidInputError(f"cannot read checkpoint {path}: {error}") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InvalidInputError(f"{path} is not a tcnn_fx fine-tuning checkpoint ({FORMAT})")
    if state["signature"] != model_signature(model):
        raise InvalidInputError(
            f"checkpoint {path} was written for another model ({state.get('identity') or 'unnamed'}); "
            f"this model is {type(model).__name__} with a different set of parameters"
        )
    saved = Recipe.from_dict(state["recipe"])
    different = {
        k: (v, getattr(recipe, k)) for k, v in saved.to_dict().items() if v != getattr(recipe, k) and k != "workers"
    }
    if different:
        raise InvalidInputError(
            f"checkpoint {path} was made with another recipe: {different} (saved, asked); resume with the saved one"
        )
    return state


def finetune(
    model: nn.Module,
    train: Dataset,
    evaluation: Dataset,
    recipe: Recipe | None = None,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    identity: dict | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` in place on ``train``, evaluating on ``evaluation`` before training and after each epoch.

    With ``out_dir``, a checkpoint is written after every epoch and
    ``resume=True`` continues from it (same model and recipe, else a clear
    error); without ``resume`` an existing checkpoint is never overwritten.
    ``identity`` (e.g. the model spec and policy) is stored for error messages.
    A non-finite loss stops the run with ``DivergenceError`` (a ``FloatingPointError``).
    Submodules the caller put in eval mode inside a model in train mode (a
    frozen batch norm) stay in eval mode throughout; evaluation restores every
    submodule's mode.
    """
    recipe = recipe or Recipe()
    processes = Processes.from_env()
    check_run_folder(out_dir, resume)
    check_batches(len(train), recipe.batch_size, processes.world)
    run = _Run(Path(out_dir) if out_dir is not None else None, processes.main)

    seed_everything(recipe.seed)
    model.to(processes.device)
    signature = model_signature(model)
    optimizer = recipe.build_optimizer(model)
    sampler = (
        DistributedSampler(train, processes.world, processes.rank, seed=recipe.seed) if processes.world > 1 else None
    )
    generator = torch.Generator().manual_seed(recipe.seed)
    loader = DataLoader(
        train, batch_size=recipe.batch_size, shuffle=sampler is None, sampler=sampler, generator=generator, drop_last=True,
        num_workers=recipe.workers, persistent_workers=recipe.workers > 0, pin_memory=processes.device.type == "cuda",
    )  # fmt: skip
    schedule = recipe.build_schedule(optimizer, len(loader))
    amp_dtype = _amp_dtype(recipe, processes.device)
    autocast = torch.autocast("cuda", dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    history: list[dict] = []
    start = 1
    if resume:
        state = _load_checkpoint(run.checkpoint, model, recipe)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["scaler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history, start = state["history"], state["epoch"] + 1
    if not model.training:  # a model handed over in eval mode trains whole; a training one keeps frozen parts frozen
        model.train()
    trained = nn.parallel.DistributedDataParallel(model) if processes.world > 1 else model

    def evaluate() -> dict:
        return evaluate_accuracy(model, evaluation, batch_size=recipe.batch_size * 2, workers=recipe.workers,
                                 processes=processes, progress=progress)  # fmt: skip

    if not history:
        history.append({"epoch": 0, **evaluate()})
        run.log(history)
    for epoch in range(start, recipe.epochs + 1):
        if sampler is not None:
            sampler.set_epoch(epoch)
        began = time.perf_counter()
        loss_sum = correct = seen = 0.0
        bar = tqdm(
            loader,
            desc=f"epoch {epoch}/{recipe.epochs}",
            disable=not (progress and processes.main),
            leave=False,
        )
        for step, (images, labels) in enumerate(bar):
            images = images.to(processes.device, non_blocking=True)
            labels = labels.to(processes.device, non_blocking=True)
            with autocast:
                logits = trained(images)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=recipe.label_smoothing)
            if not math.isfinite(loss.item()):
                raise DivergenceError(f"the loss is {loss.item()} at epoch {epoch}, step {step}: training diverged")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if recipe.clip_grad_norm is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            loss_sum += loss.item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
            bar.set_postfix(
                loss=f"{loss_sum / seen:.3f}",
                acc=f"{correct / seen:.3f}",
                lr=f"{schedule.get_last_lr()[0]:.2e}",
            )
        loss_sum, correct, seen = processes.total(loss_sum, correct, seen)
        seconds = time.perf_counter() - began
        record = {"epoch": epoch, "train_loss": loss_sum / seen, "train_top1": correct / seen,
                  "lr": schedule.get_last_lr()[0], "seconds": seconds, "images_per_second": seen / seconds}  # fmt: skip
        history.append(record | evaluate())
        if progress and processes.main:
            tqdm.write(f"epoch {epoch}: train loss {record['train_loss']:.4f} top-1 {record['train_top1']:.4f}, "
                       f"val top-1 {history[-1]['val_top1']:.4f} ({seconds:.0f} s)")  # fmt: skip
        run.save({
            "format": FORMAT, "epoch": epoch, "signature": signature, "identity": identity, "recipe": recipe.to_dict(),
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
            "scaler": scaler.state_dict(), "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
            "history": history,
        })  # fmt: skip
        run.log(history)
    return FinetuneResult(model, history)
