"""Scoring channels: the criterion checked before any work, then scored on the calibration images or weights."""

from __future__ import annotations

from collections.abc import Callable

import torch

from prunecli.config import DataOptions, RunOptions, ScoringOptions
from prunecli.criteria import get_criterion, score_channels
from prunecli.errors import DataError, OptionError, PrunecliError
from prunecli.graph import DependencyGraph
from prunecli.io.data import ImageSet
from prunecli.io.scores import read_scores
from prunecli.runtime import time_limit

Say = Callable[[str], None]
TRAINED_METHOD = "edp"  # prune --method edp trains instead of scoring


def check_criterion(scoring: ScoringOptions, has_data: bool) -> None:
    """Fail before any work when the criterion is unknown, its options are wrong, or it needs images not given."""
    if scoring.scores is not None or scoring.method == TRAINED_METHOD:
        return
    criterion = get_criterion(scoring.method)(seed=0, **scoring.options)
    if criterion.needs_data and not has_data:  # a missing option: a usage error
        raise OptionError(
            f"method {scoring.method} scores feature maps and needs calibration data: pass --data "
            "(an image folder, a tensor file such as sample_models/fmnist_calib.safetensors, or fashion-mnist)"
        )


def score(scoring: ScoringOptions, graph: DependencyGraph, images: ImageSet | None, data: DataOptions | None,
          run: RunOptions, say: Say, batch_progress=None) -> dict[int, torch.Tensor]:
    """Per-channel scores of every prunable group, on ``run.device``, within ``run.score_timeout`` seconds; a data
    criterion reads ``images``, loaded from ``data``, in its batches (fewer images than one batch is refused)."""
    batch_size = data.batch_size if data is not None else 1
    with time_limit(run.score_timeout, f"scoring channels with {scoring.method}",
                    "raise --score-timeout, or give fewer --calib-images"):
        criterion = get_criterion(scoring.method)
        if criterion.needs_data:
            if len(images) < batch_size and len(images) < data.calib_images:
                raise DataError(f"--data {data.source} has {len(images)} images, fewer than one batch of "
                                f"{batch_size}; give more images or a smaller --batch-size")
            if criterion.needs_labels and images.labels is None:
                raise DataError(f"method {scoring.method} needs labelled data; {images.description} has no labels")
            say(f"scoring {len(images)} images with {scoring.method} on {run.device}")
        device = torch.device(run.device)
        graph.model.to(device)
        try:
            return score_channels(scoring, run.seed, graph, images, batch_size, device, batch_progress)
        except torch.cuda.OutOfMemoryError as exc:
            raise PrunecliError(
                f"CUDA ran out of memory while scoring; try --batch-size {max(1, batch_size // 2)}"
            ) from exc
        finally:
            graph.model.to("cpu")


def prune_scores(scoring: ScoringOptions, sha256: str, graph: DependencyGraph, images: ImageSet | None,
                 data: DataOptions | None, run: RunOptions, say: Say,
                 batch_progress=None) -> tuple[dict[int, torch.Tensor], str]:
    """The scores ``prune`` plans with and the method that made them: a ``--scores`` file's, or scored now."""
    if scoring.scores is not None:
        return read_scores(scoring.scores, sha256, graph.groups, scoring.method)
    say(f"scoring channels with {scoring.method}")
    return score(scoring, graph, images, data, run, say, batch_progress), scoring.method
