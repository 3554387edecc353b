"""One optimizer step and what it reads: the run's length in steps (:class:`Schedule`), this rank's batches
(:class:`Batches`), and :class:`Stepper`, which sets the learning rate, runs the forward pass (under AMP, with
the teacher), takes the loss (cross-entropy or distillation), back-propagates and updates."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunecli.config import FinetuneConfig
from prunecli.errors import ArchitectureError
from prunecli.io.data import ImageSet
from prunecli.training.distributed import Distributed, autocast, grad_scaler
from prunecli.training.hooks import TrainingHook
from prunecli.training.schedules import augment_batch, augment_padding, kd_loss, kd_temperature, learning_rate

DEVICE_DATA_BYTES = 2 << 30  # training sets up to this size are moved to the GPU once


def make_optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    """Weight decay on weights with more than one dimension only: biases and norm parameters are exempt."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() > 1]
    rest = [p for p in params if p.dim() <= 1]
    groups = [g for g in ({"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0})
              if g["params"]]
    if not groups:
        raise ArchitectureError("the model has no trainable parameters")
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0)


@dataclass(frozen=True)
class Schedule:
    """How long the run is, in optimizer steps."""

    steps_per_epoch: int
    total_steps: int
    epochs: int
    warmup: int  # steps of linear learning-rate warm-up

    @classmethod
    def of(cls, config: FinetuneConfig, images: int) -> Schedule:
        """``config.steps``, else ``config.epochs`` full epochs, of ``images // batch_size`` steps each."""
        per_epoch = images // config.batch_size
        total = config.steps if config.steps is not None else config.epochs * per_epoch
        return cls(per_epoch, total, math.ceil(total / per_epoch), round(config.warmup_epochs * per_epoch))

    def steps_in(self, epoch: int) -> int:
        """Steps of the 0-based ``epoch`` (the last one may be short)."""
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)


@dataclass(frozen=True)
class Batches:
    """The training images where the run reads them (on the GPU when they fit), cut into this rank's batches."""

    images: Tensor
    labels: Tensor
    padding: int  # augmentation's crop padding; 0: no augmentation
    batch_size: int
    dist: Distributed

    @classmethod
    def of(cls, train: ImageSet, config: FinetuneConfig, dist: Distributed) -> Batches:
        images, labels = train.images, train.labels
        if dist.device.type == "cuda" and images.numel() * images.element_size() <= DEVICE_DATA_BYTES:
            images, labels = images.to(dist.device), labels.to(dist.device)
        padding = augment_padding(tuple(images.shape[1:])) if config.augment == "auto" else 0
        return cls(images, labels, padding, config.batch_size, dist)

    def take(self, order: Tensor, i: int, augment_rng: torch.Generator) -> tuple[Tensor, Tensor]:
        """Batch ``i`` of ``order``, this rank's share of it, augmented."""
        device = self.dist.device
        index = order[i * self.batch_size : (i + 1) * self.batch_size][self.dist.rank :: self.dist.world]
        index = index.to(self.images.device)
        x = self.images[index].to(device, non_blocking=True)
        y = self.labels[index].to(device, non_blocking=True)
        if self.padding:
            x = augment_batch(x, augment_rng, self.padding)
        return x, y


@dataclass(frozen=True)
class StepOutput:
    loss: Tensor
    logits: Tensor  # float32
    lr: float  # the learning rate the step used
    temperature: float | None  # the distillation temperature it used; None without a teacher


class Stepper:
    """The optimizer (and float16's gradient scaler) of a run, and the step that uses them."""

    def __init__(self, model: nn.Module, config: FinetuneConfig, schedule: Schedule, device: torch.device,
                 amp: torch.dtype | None, teacher: nn.Module | None, hook: TrainingHook | None):
        self.config, self.schedule, self.device, self.amp = config, schedule, device, amp
        self.teacher, self.hook = teacher, hook
        self.optimizer = make_optimizer(model, config)
        self.scaler = grad_scaler(amp)

    def state(self) -> dict[str, Any]:
        """The optimizer's and scaler's state, for the checkpoint."""
        return {"optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load(self, saved: dict[str, Any]) -> None:
        """Restore what :meth:`state` saved (may raise ValueError, KeyError, RuntimeError when it does not fit)."""
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.scaler is not None and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])

    def __call__(self, net: nn.Module, x: Tensor, y: Tensor, step: int) -> StepOutput:
        """Global step ``step`` (0-based) on the batch ``x``, ``y``."""
        lr = learning_rate(step, self.schedule.total_steps, self.config.lr, self.schedule.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        logits, teacher_logits = self._forward(net, x)
        t = self._temperature(step) if teacher_logits is not None else None
        loss = self._loss(logits, teacher_logits, y, t)
        self._backward_and_update(loss)
        if self.hook is not None:
            self.hook.after_step(step + 1, self.schedule.total_steps, lr)
        return StepOutput(loss, logits, lr, t)

    def _forward(self, net: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
        teacher_logits = None
        with autocast(self.device, self.amp):
            logits = net(x)
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_logits = self.teacher(x)
        return logits.float(), teacher_logits

    def _temperature(self, step: int) -> float:
        return kd_temperature(self.config, step, self.schedule.total_steps)

    def _loss(self, logits: Tensor, teacher_logits: Tensor | None, y: Tensor, t: float | None) -> Tensor:
        """Cross-entropy, or the distillation loss at temperature ``t`` when there is a teacher."""
        smoothing = self.config.label_smoothing
        if teacher_logits is None:
            return F.cross_entropy(logits, y, label_smoothing=smoothing)
        return kd_loss(logits, teacher_logits, y, t, self.config.kd_alpha, smoothing)

    def _backward_and_update(self, loss: Tensor) -> None:
        """Gradients (scaled under float16 AMP), the hook's change to them, the optimizer's update."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        if self.hook is not None:
            self.hook.after_backward()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
