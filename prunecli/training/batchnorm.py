"""BatchNorm recalibration: re-estimating running statistics on a few batches, a cheap first repair after
pruning (``prune --recalibrate-bn``) and before fine-tuning (``finetune --recalibrate-bn``)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from prunecli.errors import DataError, PrunecliError
from prunecli.runtime import model_device, resolve_device


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor | None]] | Iterable[Tensor],
    n_batches: int,
    device: str | torch.device | None = None,
) -> int:
    """Re-estimate every BatchNorm's running mean and variance on up to ``n_batches`` batches.

    The statistics are reset and accumulated as a cumulative average (``momentum=None``): running_mean ends
    as the mean of the batch means, running_var as the mean of the unbiased batch variances. Only the norm
    layers run in train mode (dropout stays off); nothing gets a gradient. The model's mode and the norms'
    momentum are restored. A cheap first repair after pruning, whose removed channels shift the statistics.

    Returns:
        the number of batches used (0 when the model has no BatchNorm with running statistics).
    """
    if n_batches < 1:
        raise PrunecliError(f"--recalibrate-bn {n_batches} must be at least 1")
    norms = _batch_norms(model)
    if not norms:
        return 0
    target = resolve_device(device) if device is not None else model_device(model)
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:
        raise DataError("no batches to recalibrate BatchNorm statistics with; give some images")
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.eval()
    for norm in norms:
        norm.train()
    used = 0
    try:
        for item in _chain(first, iterator):
            if used >= n_batches:
                break
            x = item[0] if isinstance(item, tuple | list) else item
            model(x.to(target))
            used += 1
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        model.train(was_training)
    return used


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest
