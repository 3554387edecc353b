"""Evaluation: top-1/top-5 accuracy, loss and throughput on labelled data, and the checks that the data and
the model fit each other (labels within the model's classes, ``[batch, classes]`` logits, a teacher with as
many classes, at least one batch of training images)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunecli.errors import ArchitectureError, DataError, PrunecliError, first_line
from prunecli.io.data import ImageSet
from prunecli.runtime import model_device, resolve_device


@dataclass(frozen=True)
class EvalResult:
    """Accuracy (fractions in [0, 1]) and mean cross-entropy of a model on labelled data."""

    top1: float
    top5: float
    loss: float
    images: int
    images_per_second: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a timing covers it (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def count_classes(model: nn.Module, sample: Tensor, device: torch.device, what: str = "the model") -> int:
    """Output size of ``model`` for one image; the output must be ``[batch, classes]``."""
    was_training = model.training
    model.eval()
    try:
        out = model(sample[:1].to(device))
    except Exception as exc:
        raise ArchitectureError(
            f"{what} does not run on images of shape {'x'.join(map(str, sample.shape[1:]))} "
            f"({type(exc).__name__}: {first_line(exc, 150)}); check the data"
        ) from exc
    finally:
        model.train(was_training)
    if not isinstance(out, Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ArchitectureError(f"{what} returns {shape}, not [batch, classes] logits; only classifiers can be trained")
    return int(out.shape[1])


def check_labels(data: ImageSet, num_classes: int, what: str) -> Tensor:
    """``data``'s labels, refused when missing, empty or outside ``[0, num_classes)``; ``what`` names the data."""
    if data.labels is None:
        raise DataError(
            f"{what} ({data.description}) has no labels; use an image folder with one sub-folder per class, "
            "a tensor file with 'labels', or fashion-mnist"
        )
    if len(data) == 0:
        raise DataError(f"{what} ({data.description}) holds no images")
    low, high = int(data.labels.min()), int(data.labels.max())
    if low < 0 or high >= num_classes:
        raise DataError(
            f"{what} ({data.description}) has labels {low}..{high} but the model has {num_classes} classes "
            f"(0..{num_classes - 1}); use data labelled for this model"
        )
    return data.labels


def check_training_inputs(
    model: nn.Module, train: ImageSet, val: ImageSet | None, teacher: nn.Module | None, batch_size: int, world: int,
    device: torch.device,
) -> int:
    """Refuse training data, validation data and a teacher that do not fit the model, before anything is
    trained; the model's number of classes. The teacher is moved to ``device`` in eval mode."""
    if train.labels is None:
        check_labels(train, 1, "the training data")
    if batch_size % world:
        raise PrunecliError(
            f"--batch-size {batch_size} is the global batch and must divide evenly among {world} processes"
        )
    if len(train) < batch_size:
        raise DataError(
            f"the training data ({train.description}) has {len(train)} images, fewer than one batch "
            f"of {batch_size}; give more images or a smaller --batch-size"
        )
    classes = count_classes(model, train.images, device)
    check_labels(train, classes, "the training data")
    if val is not None:
        check_labels(val, classes, "the validation data")
    if teacher is not None:
        teacher.to(device).eval()  # it runs under no_grad: the caller's model is not frozen
        taught = count_classes(teacher, train.images, device, "the teacher")
        if taught != classes:
            raise DataError(
                f"the teacher has {taught} outputs but the student has {classes}; "
                "distil from a model trained on the same classes"
            )
    return classes


@torch.no_grad()
def eval_sums(
    model: nn.Module, data: ImageSet, batch_size: int, device: torch.device, rank: int = 0, world: int = 1
) -> Tensor:
    """``[top-1 hits, top-5 hits, summed loss, images]`` over this rank's share ``rank::world`` of ``data``."""
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    positions = torch.arange(rank, len(data), world)
    for start in range(0, len(positions), batch_size):
        index = positions[start : start + batch_size]
        x = data.images[index].to(device, non_blocking=True)
        y = data.labels[index].to(device, non_blocking=True)
        logits = model(x).float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, 1).indices
        hits = top == y[:, None]
        sums += torch.stack(
            [
                hits[:, 0].sum().double(),
                hits.any(1).sum().double(),
                F.cross_entropy(logits, y, reduction="sum").double(),
                torch.tensor(float(len(y)), dtype=torch.float64, device=device),
            ]
        )
    return sums


def eval_result(sums: Tensor, seconds: float) -> EvalResult:
    """The :class:`EvalResult` of ``eval_sums``'s totals (all ranks' together) measured in ``seconds``."""
    hits1, hits5, loss, images = (float(v) for v in sums.cpu())
    n = max(images, 1.0)
    return EvalResult(hits1 / n, hits5 / n, loss / n, int(images), images / seconds if seconds > 0 else 0.0, seconds)


def evaluate(
    model: nn.Module, data: ImageSet, batch_size: int = 256, device: str | torch.device = "cpu"
) -> EvalResult:
    """Top-1/top-5 accuracy, mean cross-entropy and throughput of ``model`` (in eval mode) on ``data``.

    Top-5 counts a hit among the ``min(5, classes)`` highest logits. The model's mode and device are restored.

    Raises:
        DataError: the data has no labels, or labels outside ``[0, classes)``.
    """
    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size} must be at least 1")
    target = resolve_device(device)
    original, was_training = model_device(model), model.training
    model.to(target).eval()
    try:
        if len(data) == 0:
            raise DataError(f"the evaluation data ({data.description}) holds no images")
        classes = count_classes(model, data.images, target)
        check_labels(data, classes, "the evaluation data")
        synchronize(target)
        started = time.perf_counter()
        sums = eval_sums(model, data, batch_size, target)
        synchronize(target)
        seconds = time.perf_counter() - started
    finally:
        model.train(was_training)
        model.to(original)
    return eval_result(sums, seconds)
