"""What the loop computes from the step alone: the distillation loss and temperature, the learning rate,
the augmentation of a batch and the seeds of every random stream.

Each is a pure function of its arguments (augmentation draws only from the generator it is given), which is
what lets a resumed run end bit for bit where an uninterrupted one does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from prunecli.config import KD_SCHEDULES, FinetuneConfig
from prunecli.errors import PrunecliError

STEP_LEVELS = 4  # the "step" temperature schedule falls from T_max to T_min in this many equal levels


def temperature(progress: float, t_max: float = 4.0, t_min: float = 1.0, schedule: str = "cosine") -> float:
    """Distillation temperature at ``progress`` in [0, 1] of the run (SFP's variable temperature, [INFERRED]).

    ``cosine``: ``T_min + (T_max - T_min) * (1 + cos(pi * e)) / 2``; ``linear``: straight from T_max to T_min;
    ``step``: T_max to T_min in ``STEP_LEVELS`` equal levels; ``constant``: T_max. Every schedule starts at
    T_max (soft targets early) and all but ``constant`` end at T_min.
    """
    e = min(max(float(progress), 0.0), 1.0)
    if schedule == "cosine":
        return t_min + (t_max - t_min) * 0.5 * (1.0 + math.cos(math.pi * e))
    if schedule == "linear":
        return t_max + (t_min - t_max) * e
    if schedule == "step":
        level = min(int(e * STEP_LEVELS), STEP_LEVELS - 1)
        return t_max - (t_max - t_min) * level / (STEP_LEVELS - 1)
    if schedule == "constant":
        return t_max
    raise PrunecliError(f"--kd-schedule {schedule!r}: choose {', '.join(KD_SCHEDULES)}")


def kd_temperature(config: FinetuneConfig, step: int, total_steps: int) -> float:
    """The distillation temperature at ``step`` (from 0) of a run of ``total_steps``: ``kd_t_max`` throughout with
    ``--kd fixed``, else from ``kd_t_max`` at the first step to ``kd_t_min`` at the last along ``kd_schedule``."""
    if config.kd == "fixed":
        return config.kd_t_max
    return temperature(step / max(1, total_steps - 1), config.kd_t_max, config.kd_t_min, config.kd_schedule)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """``(1 - alpha) * CE(y, z_s) + alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))`` (docs/methods.md 4(e)).

    The KL term is averaged over the batch (``batchmean``); ``T^2`` keeps its gradient scale independent of T.
    """
    t = float(temperature)
    student, teacher = student_logits.float(), teacher_logits.float()
    kl = F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher / t, 1), reduction="batchmean")
    ce = F.cross_entropy(student, labels, label_smoothing=label_smoothing)
    return (1 - alpha) * ce + alpha * t * t * kl


def learning_rate(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0) -> float:
    """Linear warm-up to ``base_lr`` over ``warmup_steps``, then cosine decay towards 0 at ``total_steps``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def augment_padding(shape: tuple[int, ...]) -> int:
    """Crop padding ``augment="auto"`` uses for images of ``shape`` (C, H, W); 0 means no augmentation."""
    if len(shape) != 3 or min(shape[1:]) < 8:
        return 0
    return 2 if shape[0] == 1 else max(1, round(min(shape[1:]) / 8))


def augment_batch(images: Tensor, generator: torch.Generator, padding: int, flip: bool = True) -> Tensor:
    """Random crop after replicate padding, and a random horizontal flip, for a whole batch in one gather.

    The images are already normalised, so the border is replicated rather than filled with a constant that
    would mean something different for every dataset. Random numbers come from ``generator`` (CPU).
    """
    n, channels, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding,) * 4, mode="replicate") if padding else images
    dy = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator)
    flipped = torch.rand(n, 1, generator=generator) < 0.5 if flip else torch.zeros(n, 1, dtype=torch.bool)
    rows = (dy + torch.arange(h)).to(device)
    cols = (dx + torch.where(flipped, torch.arange(w - 1, -1, -1), torch.arange(w))).to(device)
    batch = torch.arange(n, device=device)[:, None, None, None]
    chans = torch.arange(channels, device=device)[None, :, None, None]
    return padded[batch, chans, rows[:, None, :, None], cols[:, None, None, :]]


def mix_seed(*values: int) -> int:
    """A 63-bit seed from several integers (FNV-1a style), so each random stream can be re-derived from
    ``(seed, epoch, rank, stream)`` instead of being carried along."""
    h = 0xCBF29CE484222325
    for value in values:
        h = ((h ^ (int(value) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3) % (1 << 64)
    return h % (1 << 63)
