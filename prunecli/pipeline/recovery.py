"""Recovery around the removal: BN recalibration and reconstruction on the calibration images, and the methods
that train while they prune (soft pruning, EDP) on the training images."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunecli.config import EdpOptions, FinetuneConfig, ReconstructOptions, RunOptions, SoftOptions
from prunecli.errors import OptionError, PrunecliError
from prunecli.humanize import plural
from prunecli.io.data import ImageSet, iterate_batches
from prunecli.io.formats import LoadedModel
from prunecli.pipeline.removal import Removed, remove
from prunecli.planning import Selection
from prunecli.reconstruct import ReconstructReport, reconstruct
from prunecli.report.events import messages_to
from prunecli.runtime import time_limit

Say = Callable[[str], None]


def check_recalibration(batches: int, images: ImageSet, batch_size: int) -> None:
    """``--recalibrate-bn N`` runs N whole batches of the calibration images; asking for more is refused."""
    available = math.ceil(len(images) / batch_size)
    if batches > available:
        raise OptionError(
            f"--recalibrate-bn {batches} asks for {batches} batches of {batch_size} images, but the calibration "
            f"images are {len(images)} ({plural(available, 'batch', 'batches')}); give --recalibrate-bn {available}, "
            f"or --calib-images {batches * batch_size} of a --data that holds that many"
        )


def check_finetune_recalibration(training: FinetuneConfig, train: ImageSet) -> None:
    """``finetune --recalibrate-bn N`` re-estimates the statistics on N batches of the training images before
    training; asking for more batches than they hold is refused, as :func:`check_recalibration` refuses it for
    ``prune``, rather than run quietly on fewer."""
    batches, batch_size = training.recalibrate_bn, training.batch_size
    available = math.ceil(len(train) / batch_size)
    if batches > available:
        raise OptionError(
            f"--recalibrate-bn {batches} asks for {batches} batches of {batch_size} images, but the training images "
            f"({train.description}) are {len(train)} ({available} batches); give --recalibrate-bn {available}"
        )


def recalibrate(model: nn.Module, batches: int, images: ImageSet, batch_size: int, say: Say) -> dict[str, Any]:
    """Re-estimate the BatchNorm statistics of ``model`` on the first ``batches`` batches of ``images``."""
    from prunecli.training import recalibrate_bn

    say(f"re-estimating batch-norm statistics on {plural(batches, 'batch', 'batches')} of {batch_size} images")
    used = recalibrate_bn(model, iterate_batches(images, batch_size), batches)
    return {"batches": used, "images": min(len(images), used * batch_size), "data": images.description}


def reconstruct_layers(options: ReconstructOptions, unpruned: nn.Module, removed: Removed, images: ImageSet,
                       batch_size: int, run: RunOptions, say: Say, step_progress) -> ReconstructReport:
    """Refit the changed layers of the pruned model so they reproduce ``unpruned`` on the calibration images."""
    say(f"reconstructing the pruned layers on {len(images)} images on {run.device}")

    def tell(layer: str, done: int, total: int) -> None:
        say(f"reconstructing {layer}")
        if step_progress is not None:
            step_progress(done, total)

    graph = removed.graph
    with time_limit(run.score_timeout, "reconstructing the pruned layers",
                    "raise --score-timeout, or give fewer --calib-images"):
        try:
            return reconstruct(unpruned, graph.model, removed.kept, images.images.split(batch_size), options,
                               graph.sole_norm_consumer, torch.device(run.device), tell)
        except torch.cuda.OutOfMemoryError as exc:
            raise PrunecliError(
                f"CUDA ran out of memory while reconstructing {len(images)} images at once; give fewer --calib-images"
            ) from exc
        finally:
            unpruned.to("cpu")
            graph.model.to("cpu")


@dataclass
class SoftPruned:
    """Soft pruning's outcome: the channels removed after training, the trained weights before removal, the record."""

    removed: Removed
    unpruned: nn.Module
    record: dict[str, Any]


def soft_prune_step(soft: SoftOptions, selection: Selection, loaded: LoadedModel, example: torch.Tensor,
                    train: ImageSet, say: Say) -> SoftPruned:
    """LRMF/FPGM-style soft pruning: train with the selected channels held at zero, re-selecting as it goes."""
    from prunecli.methods.soft import soft_prune

    say(f"soft pruning: {plural(soft.training.epochs, 'epoch')} on {len(train)} images, re-selecting every "
        f"{soft.reselect_every}")
    result = soft_prune(copy.deepcopy(loaded.model), example, train, None, soft, selection,
                        progress=messages_to(say))
    record = {"selections": len(result.selections), "reselect_every": soft.reselect_every,
              "training": result.finetune.record()}
    unpruned = copy.deepcopy(result.graph.model)
    return SoftPruned(remove(result.graph, result.plan, result.target), unpruned, record)


@dataclass
class EdpPruned:
    """EDP's outcome: the pruned (partly still decomposed) model, the target and what was removed."""

    model: nn.Module
    target: float
    channels_removed: int
    groups_pruned: int
    record: dict[str, Any]


def edp_step(edp: EdpOptions, selection: Selection, loaded: LoadedModel, example: torch.Tensor, train: ImageSet,
             val: ImageSet | None, say: Say) -> EdpPruned:
    """EDP: decompose, train towards the budget, Pruning & Merging (see ``prunecli.methods.edp``)."""
    from prunecli.methods.edp import edp_prune

    say(f"EDP: decomposing the convolutions, then {plural(edp.training.epochs, 'epoch')} on {len(train)} images")
    result = edp_prune(copy.deepcopy(loaded.model), example, train, val, edp, selection, progress=messages_to(say))
    record = result.record()
    channels = record["channels_removed"] + record["basis_filters_removed"]
    return EdpPruned(result.model, result.target, channels, len(result.prune_merge.removed), record)
