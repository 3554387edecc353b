"""What a fine-tuning run returns: one :class:`EpochRecord` per epoch and the :class:`FinetuneResult`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from prunecli.training.checkpoint import RESUME_FREE

_TIMING = ("seconds", "images_per_second")


@dataclass(frozen=True)
class EpochRecord:
    epoch: int  # 1-based
    steps: int  # global optimizer steps done at the end of this epoch
    train_loss: float
    train_top1: float
    val_top1: float | None
    val_top5: float | None
    val_loss: float | None
    lr: float  # at the epoch's last step
    temperature: float | None  # distillation temperature at the epoch's last step
    seconds: float
    images_per_second: float


@dataclass(frozen=True)
class FinetuneResult:
    """What a fine-tuning run did. ``model`` is the trained model itself (the best epoch's weights when there
    was validation data, else the last), in eval mode on the device it was given on. ``best_epoch`` 0 and
    ``kept_input``: no trained epoch beat the input's validation top-1, and the model holds the input's weights."""

    config: dict[str, Any]
    history: list[EpochRecord]
    best_epoch: int | None
    best_top1: float | None
    epochs: int
    steps: int
    seconds: float
    images_per_second: float
    device: str
    amp: str | None
    world_size: int
    resumed_from: int | None  # epochs already done in the checkpoint this run resumed
    kept_input: bool  # the input's weights are the result: no trained epoch improved on them
    model: nn.Module = field(repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("model", "history")}
        out["history"] = [dataclasses.asdict(r) for r in self.history]
        return out

    def record(self) -> dict[str, Any]:
        """The fine-tuning record for the slim artifact's metadata: no timings or paths, so identical runs
        write identical files."""
        config = {k: v for k, v in self.config.items() if k not in RESUME_FREE}
        history = [{k: v for k, v in dataclasses.asdict(r).items() if k not in _TIMING} for r in self.history]
        return {
            "config": config,
            "history": history,
            "best_epoch": self.best_epoch,
            "best_top1": self.best_top1,
            "kept_input": self.kept_input,
            "epochs": self.epochs,
            "steps": self.steps,
            "amp": self.amp,
            "world_size": self.world_size,
        }
