"""Fine-tuning and evaluation: a plain PyTorch training loop, distillation, BN recalibration, soft pruning, DDP.

Everything here is library code: functions take models, :class:`~prunecli.io.data.ImageSet` data and frozen
configs, and return dataclasses. Progress goes to an optional callback ``progress(dict)`` (rank 0 only), so the
CLI decides how to show it.

Reproducibility. Every random stream (the shuffling permutation, augmentation, dropout) is re-derived from
``(seed, epoch, rank)`` at the start of each epoch instead of being carried along, and the learning rate and
distillation temperature are pure functions of the global step. A checkpoint therefore needs only the
weights, the optimizer (and AMP scaler) state, the step counter, the history and the best model so far; a run
resumed from it ends with the same weights as an uninterrupted one (bit for bit on the CPU with the same
thread count; ``torch.use_deterministic_algorithms`` is not switched on: the CPU kernels used here are
deterministic already, and the call imports torch's compiler stack, which costs seconds).

Distributed. Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is started (gloo on CPU, nccl on
CUDA), the model is wrapped in DistributedDataParallel and each global batch of ``batch_size`` images, drawn
from the same seeded permutation on every rank, is split ``rank::world_size`` between the processes, as
DistributedSampler would. Metrics are all-reduced; only rank 0 writes the checkpoint and calls ``progress``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunecli.errors import ArchitectureError, CheckpointError, DataError, ExportError, PrunecliError
from prunecli.io.data import ImageSet, iterate_batches
from prunecli.io.files import atomic_output, check_output_path, write_through_memory

if TYPE_CHECKING:
    from prunecli.allocate import Plan
    from prunecli.config import PruneConfig, ScoringOptions
    from prunecli.graph import DependencyGraph
    from prunecli.measure import CostModel

OPTIMIZERS = ("sgd", "adamw")
KD_MODES = ("none", "fixed", "variable")
KD_SCHEDULES = ("cosine", "linear", "step", "constant")
AUGMENTS = ("auto", "none")
AMP_MODES = ("auto", "on", "off")
STEP_LEVELS = 4  # the "step" temperature schedule falls from T_max to T_min in this many equal levels
CHECKPOINT_FORMAT = "prunecli-finetune-checkpoint"
CHECKPOINT_VERSION = 1
DEVICE_DATA_BYTES = 2 << 30  # training sets up to this size are moved to the GPU once
# options that may differ between a run and its resumption without changing the result
_RESUME_FREE = ("checkpoint", "resume", "force", "device", "eval_batch_size")

Progress = Callable[[dict[str, Any]], None]


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune; embedded in the slim artifact's metadata (see :meth:`FinetuneResult.record`).

    Attributes:
        epochs: passes over the training data (ignored when ``steps`` is given).
        steps: total optimizer steps instead of ``epochs``; the last epoch is cut short.
        lr: peak learning rate, reached after the warm-up and then decayed to 0 by a cosine.
        optimizer: ``sgd`` (Nesterov momentum) or ``adamw``.
        weight_decay: applied to weights with more than one dimension, not to biases and norm parameters.
        label_smoothing: for the cross-entropy term (also inside the distillation loss).
        warmup_epochs: linear warm-up length in epochs; fractions allowed.
        batch_size: the global batch; under DDP each of the N processes takes ``batch_size / N`` images.
        eval_batch_size: validation batch (default: ``batch_size``).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; under torchrun CUDA runs use ``cuda:LOCAL_RANK``.
        amp: ``auto`` (mixed precision on CUDA only: bfloat16 where supported, else float16 with a scaler),
            ``on`` or ``off``.
        augment: ``auto`` (random crop after replicate padding plus horizontal flip; padding 2 for 1-channel
            images such as Fashion-MNIST, 1/8 of the side otherwise) or ``none``.
        kd: ``none``, ``fixed`` (temperature ``kd_t_max`` throughout) or ``variable`` (SFP's schedule from
            ``kd_t_max`` at the first step to ``kd_t_min`` at the last, evaluated per step at
            ``step / (total_steps - 1)`` rather than per epoch); needs a teacher.
        kd_alpha: weight of the distillation term; ``1 - kd_alpha`` weighs the cross-entropy.
        kd_schedule: shape of the variable temperature: ``cosine``, ``linear``, ``step`` or ``constant``.
        recalibrate_bn: before training, re-estimate BatchNorm statistics on this many training batches.
        checkpoint: file for the per-epoch resume state (an internal ``torch.save`` file).
        resume: continue the run saved in ``checkpoint``.
        force: overwrite an existing ``checkpoint`` when not resuming.
    """

    epochs: int = 10
    steps: int | None = None
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    warmup_epochs: float = 0.0
    batch_size: int = 128
    eval_batch_size: int | None = None
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    augment: str = "auto"
    kd: str = "none"
    kd_alpha: float = 0.7
    kd_t_max: float = 4.0
    kd_t_min: float = 1.0
    kd_schedule: str = "cosine"
    recalibrate_bn: int = 0
    checkpoint: Path | None = None
    resume: bool = False
    force: bool = False

    def __post_init__(self):
        checks = [
            (self.steps is None and self.epochs < 1, f"--epochs {self.epochs} must be at least 1"),
            (self.steps is not None and self.steps < 1, f"--steps {self.steps} must be at least 1"),
            (not self.lr > 0, f"--lr {self.lr} must be positive"),
            (self.optimizer not in OPTIMIZERS, f"--optimizer {self.optimizer!r}: choose {' or '.join(OPTIMIZERS)}"),
            (not 0 <= self.momentum < 1, f"--momentum {self.momentum} must lie in [0, 1)"),
            (self.weight_decay < 0, f"--weight-decay {self.weight_decay} must not be negative"),
            (not 0 <= self.label_smoothing < 1, f"--label-smoothing {self.label_smoothing} must lie in [0, 1)"),
            (self.warmup_epochs < 0, f"--warmup-epochs {self.warmup_epochs} must not be negative"),
            (self.batch_size < 1, f"--batch-size {self.batch_size} must be at least 1"),
            (self.eval_batch_size is not None and self.eval_batch_size < 1,
             f"--eval-batch-size {self.eval_batch_size} must be at least 1"),
            (self.amp not in AMP_MODES, f"--amp {self.amp!r}: choose {', '.join(AMP_MODES)}"),
            (self.augment not in AUGMENTS, f"--augment {self.augment!r}: choose {' or '.join(AUGMENTS)}"),
            (self.kd not in KD_MODES, f"--kd {self.kd!r}: choose {', '.join(KD_MODES)}"),
            (not 0 <= self.kd_alpha <= 1, f"--kd-alpha {self.kd_alpha} must lie in [0, 1]"),
            (not self.kd_t_min > 0, f"--kd-t-min {self.kd_t_min} must be positive"),
            (self.kd_t_max < self.kd_t_min, f"--kd-t-max {self.kd_t_max} must not be below --kd-t-min {self.kd_t_min}"),
            (self.kd_schedule not in KD_SCHEDULES, f"--kd-schedule {self.kd_schedule!r}: choose {', '.join(KD_SCHEDULES)}"),
            (self.recalibrate_bn < 0, f"--recalibrate-bn {self.recalibrate_bn} must not be negative"),
            (self.resume and self.checkpoint is None, "--resume needs the --checkpoint file of the run to continue"),
        ]
        for failed, message in checks:
            if failed:
                raise PrunecliError(message)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["checkpoint"] = str(self.checkpoint) if self.checkpoint is not None else None
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FinetuneConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if values.get("checkpoint") is not None:
            values["checkpoint"] = Path(values["checkpoint"])
        return cls(**values)


# ----------------------------------------------------------------------------- losses and schedules


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


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """``(1 - alpha) * CE(y, z_s) + alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))`` (METHODS.md 4(e)).

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


# ----------------------------------------------------------------------------- evaluation


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


def _device(name: str | torch.device) -> torch.device:
    if isinstance(name, torch.device):
        return name
    from prunecli.api import resolve_device

    return resolve_device(name)


def _model_device(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _num_classes(model: nn.Module, sample: Tensor, device: torch.device, what: str = "the model") -> int:
    """Output size of ``model`` for one image; the output must be ``[batch, classes]``."""
    was_training = model.training
    model.eval()
    try:
        out = model(sample[:1].to(device))
    except Exception as exc:
        raise ArchitectureError(
            f"{what} does not run on images of shape {'x'.join(map(str, sample.shape[1:]))} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else ''}); check the data"
        ) from exc
    finally:
        model.train(was_training)
    if not isinstance(out, Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ArchitectureError(f"{what} returns {shape}, not [batch, classes] logits; only classifiers can be trained")
    return int(out.shape[1])


def _check_labels(data: ImageSet, num_classes: int, what: str) -> Tensor:
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


@torch.no_grad()
def _eval_sums(
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


def _eval_result(sums: Tensor, seconds: float) -> EvalResult:
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
    target = _device(device)
    original, was_training = _model_device(model), model.training
    model.to(target).eval()
    try:
        if len(data) == 0:
            raise DataError(f"the evaluation data ({data.description}) holds no images")
        classes = _num_classes(model, data.images, target)
        _check_labels(data, classes, "the evaluation data")
        _synchronize(target)
        started = time.perf_counter()
        sums = _eval_sums(model, data, batch_size, target)
        _synchronize(target)
        seconds = time.perf_counter() - started
    finally:
        model.train(was_training)
        model.to(original)
    return _eval_result(sums, seconds)


# ----------------------------------------------------------------------------- BN recalibration


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
    target = _device(device) if device is not None else _model_device(model)
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


# ----------------------------------------------------------------------------- results


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


_TIMING = ("seconds", "images_per_second")


@dataclass(frozen=True)
class FinetuneResult:
    """What a fine-tuning run did. ``model`` is the trained model itself (the best epoch's weights when there
    was validation data, else the last), in eval mode on the device it was given on."""

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
    model: nn.Module = field(repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("model", "history")}
        out["history"] = [dataclasses.asdict(r) for r in self.history]
        return out

    def record(self) -> dict[str, Any]:
        """The fine-tuning record for the slim artifact's metadata: no timings or paths, so identical runs
        write identical files."""
        config = {k: v for k, v in self.config.items() if k not in _RESUME_FREE}
        history = [{k: v for k, v in dataclasses.asdict(r).items() if k not in _TIMING} for r in self.history]
        return {
            "config": config,
            "history": history,
            "best_epoch": self.best_epoch,
            "best_top1": self.best_top1,
            "epochs": self.epochs,
            "steps": self.steps,
            "amp": self.amp,
            "world_size": self.world_size,
        }


def main_process() -> bool:
    """True unless this is a torchrun worker of rank > 0: only the main process writes files."""
    return int(os.environ.get("RANK", "0") or 0) == 0


# ----------------------------------------------------------------------------- distributed


@dataclass
class _Distributed:
    rank: int
    world: int
    device: torch.device
    owns_group: bool = False

    def all_reduce(self, tensor: Tensor) -> Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor)
        return tensor

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _setup_distributed(device_name: str) -> _Distributed:
    device = _device(device_name)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or not torch.distributed.is_available():
        return _Distributed(0, 1, device)
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        except Exception as exc:
            first = str(exc).splitlines()[0][:150] if str(exc) else ""
            raise PrunecliError(
                f"cannot start distributed training ({type(exc).__name__}: {first}); launch with torchrun"
            ) from exc
        owns = True
    return _Distributed(dist.get_rank(), dist.get_world_size(), device, owns)


def _mix(*values: int) -> int:
    """A 63-bit seed from several integers (FNV-1a style), so each random stream can be re-derived."""
    h = 0xCBF29CE484222325
    for value in values:
        h = ((h ^ (int(value) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3) % (1 << 64)
    return h % (1 << 63)


# ----------------------------------------------------------------------------- soft pruning masks


class _SoftMask:
    """Zeroes the selected channels of every out-member of their groups and keeps them zero.

    Conv/linear weights and biases and BatchNorm weight and bias are zeroed (LRMF's code zeroes only the conv
    weights; with the norm zeroed too, a masked channel outputs exactly 0, so validation during soft training
    already measures the physically pruned model). A channel that a later selection releases gets its norm
    reset to weight 1, bias 0, from which its filter regrows.
    """

    def __init__(self, graph: DependencyGraph):
        self.graph = graph
        self.removed: dict[int, tuple[int, ...]] = {}
        self._entries: list[tuple[Tensor, int, Tensor]] = []

    def _targets(self, removed: Mapping[int, Iterable[int]]) -> Iterator[tuple[nn.Module, list[int]]]:
        by_index = {g.index: g for g in self.graph.groups}
        for index, positions in removed.items():
            chosen = set(int(p) for p in positions)
            if not chosen:
                continue
            for member in by_index[index].members:
                if member.dim != "out":
                    continue
                channels = sorted({i for i, r in zip(member.indices, member.root_indices, strict=True) if r in chosen})
                yield self.graph.module(member.layer), channels

    @staticmethod
    def _params(module: nn.Module) -> list[tuple[Tensor, int]]:
        found: list[tuple[Tensor | None, int]] = []
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            found = [(module.weight, 1), (module.bias, 0)]
        elif isinstance(module, nn.modules.conv._ConvNd | nn.Linear | nn.modules.batchnorm._BatchNorm):
            found = [(module.weight, 0), (module.bias, 0)]
        return [(p, dim) for p, dim in found if isinstance(p, Tensor)]

    @torch.no_grad()
    def set(self, removed: Mapping[int, Iterable[int]]) -> int:
        """Mask ``removed`` ({group index: root positions}) instead of the previous selection; returns how
        many channels changed state."""
        new = {int(g): tuple(sorted(int(p) for p in v)) for g, v in removed.items() if len(tuple(v))}
        released = {g: set(old) - set(new.get(g, ())) for g, old in self.removed.items()}
        changed = sum(len(v) for v in released.values())
        changed += sum(len(set(v) - set(self.removed.get(g, ()))) for g, v in new.items())
        for module, channels in self._targets(released):
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                index = torch.as_tensor(channels, device=module.weight.device if module.affine else None)
                if module.affine:
                    module.weight.index_fill_(0, index, 1.0)
                    module.bias.index_fill_(0, index, 0.0)
                if module.running_mean is not None:
                    module.running_mean.index_fill_(0, index.to(module.running_mean.device), 0.0)
                    module.running_var.index_fill_(0, index.to(module.running_var.device), 1.0)
        self._entries = []
        for module, channels in self._targets(new):
            for param, dim in self._params(module):
                self._entries.append((param, dim, torch.as_tensor(channels, dtype=torch.long, device=param.device)))
        self.removed = new
        self.apply()
        return changed

    @torch.no_grad()
    def apply(self) -> None:
        for param, dim, index in self._entries:
            if index.device != param.device:
                index = index.to(param.device)
            param.index_fill_(dim, index, 0.0)

    @torch.no_grad()
    def mask_grads(self) -> None:
        for param, dim, index in self._entries:
            if param.grad is not None:
                param.grad.index_fill_(dim, index.to(param.grad.device), 0.0)

    def refresh(self) -> None:
        """Re-bind to the parameters after the model moved to another device."""
        self.set(dict(self.removed))


def _plan_to_dict(plan: Plan) -> dict[str, Any]:
    return {
        "removed": {int(g): [int(p) for p in v] for g, v in plan.removed.items()},
        "keep": {int(g): int(k) for g, k in plan.keep.items()},
        "cost": float(plan.cost),
        "knob": float(plan.knob),
    }


def _plan_from_dict(data: Mapping[str, Any]) -> Plan:
    from prunecli.allocate import Plan

    return Plan(
        {int(g): tuple(int(p) for p in v) for g, v in data["removed"].items()},
        {int(g): int(k) for g, k in data["keep"].items()},
        float(data["cost"]),
        float(data["knob"]),
    )


class TrainingHook(Protocol):
    """What a training-aware pruning method adds to the fine-tuning loop (soft pruning, EDP's regulariser).

    The trainer calls ``begin`` before the first epoch of a fresh run, ``after_backward`` before each optimiser
    step, ``after_step`` after it, ``end_epoch`` after each epoch, and saves ``state()`` in its checkpoints.
    """

    keeps_best: bool  # False: the last epoch's weights are the result, whatever validation says

    def refresh(self) -> None: ...  # re-bind to the parameters after the model moved to another device
    def begin(self) -> dict[str, Any]: ...
    def after_backward(self) -> None: ...
    def after_step(self, step: int, total_steps: int, lr: float) -> None: ...
    def end_epoch(self, epochs_done: int, epochs: int) -> dict[str, Any] | None: ...
    def state(self) -> dict[str, Any]: ...
    def load(self, state: Mapping[str, Any], history: bool = True) -> None: ...


class _SoftPruning:
    """The soft-pruning side of a run: selection before training and every ``every`` epochs, masks in between."""

    keeps_best = True

    def __init__(self, graph: DependencyGraph, select: Callable[[], tuple[Plan, float]], every: int):
        self.mask = _SoftMask(graph)
        self.select = select
        self.every = every
        self.plan: Plan | None = None
        self.target = math.nan
        self.selections: list[dict[str, Any]] = []

    def choose(self, epoch: int) -> dict[str, Any]:
        plan, self.target = self.select()
        changed = self.mask.set(plan.removed)
        self.plan = plan
        entry = {"epoch": epoch, "removed": sum(len(v) for v in plan.removed.values()), "changed": changed}
        self.selections.append(entry)
        return {"event": "select", **entry}

    def refresh(self) -> None:
        self.mask.refresh()

    def begin(self) -> dict[str, Any]:
        return self.choose(0)

    def after_backward(self) -> None:
        self.mask.mask_grads()

    def after_step(self, step: int, total_steps: int, lr: float) -> None:
        self.mask.apply()  # momentum and weight decay must not regrow masked filters

    def end_epoch(self, epochs_done: int, epochs: int) -> dict[str, Any] | None:
        if self.every > 0 and epochs_done % self.every == 0 and epochs_done < epochs:
            return self.choose(epochs_done)
        return None

    def state(self) -> dict[str, Any]:
        return {"plan": _plan_to_dict(self.plan), "target": float(self.target),
                "selections": [dict(s) for s in self.selections]}

    def load(self, state: Mapping[str, Any], history: bool = True) -> None:
        """Restore the plan and mask of ``state``; with ``history``, also the list of selections made."""
        self.plan = _plan_from_dict(state["plan"])
        self.target = float(state["target"])
        if history:
            self.selections = [dict(s) for s in state["selections"]]
        self.mask.removed = {}
        self.mask.set(self.plan.removed)


# ----------------------------------------------------------------------------- fine-tuning


def _amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        raise PrunecliError(f"--amp on needs a CUDA device, but the run is on {device}; use --amp auto or off")
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
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


def _fingerprint(config: FinetuneConfig, train: ImageSet, val: ImageSet | None, teacher: nn.Module | None) -> dict:
    """What must match between a run and its resumption for the result to be the same."""
    options = {k: v for k, v in config.to_dict().items() if k not in _RESUME_FREE}
    options["train_images"] = len(train)
    options["val_images"] = len(val) if val is not None else 0
    options["teacher"] = teacher is not None
    return options


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _read_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"--resume: checkpoint {path} does not exist; drop --resume to start a new run")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"--resume: {path} is not a readable fine-tuning checkpoint ({type(exc).__name__}); "
            "pass --force without --resume to start over"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"--resume: {path} is not a prunecli fine-tuning checkpoint; give the --checkpoint of the run")
    if int(state.get("version", 0)) > CHECKPOINT_VERSION:
        raise CheckpointError(f"--resume: {path} was written by a newer prunecli; upgrade prunecli to resume it")
    return state


def _check_resumable(path: Path, state: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    stored = state.get("options", {})
    differ = [k for k in sorted(set(stored) | set(expected)) if stored.get(k) != expected.get(k)]
    if differ:
        shown = ", ".join(f"{k} {stored.get(k)!r} there, {expected.get(k)!r} here" for k in differ[:4])
        raise CheckpointError(
            f"--resume: {path} belongs to a run with other options or data ({shown}); "
            "use the same options, or pass --force without --resume to start over"
        )


def finetune(
    model: nn.Module,
    train: ImageSet,
    val: ImageSet | None,
    config: FinetuneConfig,
    teacher: nn.Module | None = None,
    progress: Progress | None = None,
) -> FinetuneResult:
    """Train ``model`` in place on ``train``, validating on ``val`` after each epoch, and keep the best epoch.

    Args:
        model: a classifier returning ``[batch, classes]`` logits (for example a pruned slim model).
        train: labelled, normalised training images.
        val: labelled validation images, or None (then the last epoch's weights are kept).
        config: the options; ``config.checkpoint`` gets the resume state after every epoch (rank 0).
        teacher: the distillation teacher for ``config.kd`` fixed/variable; run in eval mode without grad.
        progress: called (rank 0 only) with ``{"event": "step", ...}`` after every step, ``{"event": "epoch",
            ...}`` after every epoch, and ``{"event": "recalibrate"|"select", ...}`` for those phases.

    Returns:
        the result; ``result.model`` is ``model`` with the best epoch's weights, in eval mode.

    Raises:
        DataError: unlabelled data, labels outside the model's classes, a teacher with another number of
            outputs, fewer training images than one batch.
        CheckpointError: ``config.resume`` with a missing, unreadable or foreign checkpoint.
        ExportError: the checkpoint exists and neither ``resume`` nor ``force`` was given.
    """
    return _run(model, train, val, config, teacher, progress, None)


def _run(
    model: nn.Module,
    train: ImageSet,
    val: ImageSet | None,
    config: FinetuneConfig,
    teacher: nn.Module | None,
    progress: Progress | None,
    hook: TrainingHook | None,
) -> FinetuneResult:
    if config.kd != "none" and teacher is None:
        raise PrunecliError(f"--kd {config.kd} needs a --teacher model to distil from")
    if config.kd == "none" and teacher is not None:
        raise PrunecliError("a teacher was given but --kd is none; pass --kd fixed or --kd variable")
    distributed = _setup_distributed(config.device)
    try:
        device = distributed.device
        devices = []
        if device.type == "cuda":
            devices = [device.index if device.index is not None else torch.cuda.current_device()]
        with torch.random.fork_rng(devices=devices):
            return _Trainer(model, train, val, config, teacher, progress, hook, distributed).run()
    finally:
        distributed.close()


class _Trainer:
    """One fine-tuning run; split into steps only for readability, the state lives in its attributes."""

    def __init__(self, model, train, val, config, teacher, progress, hook, distributed: _Distributed):
        self.model: nn.Module = model
        self.train, self.val, self.config = train, val, config
        self.teacher, self.hook, self.dist = teacher, hook, distributed
        self.say = progress if distributed.rank == 0 else None
        self.device = distributed.device
        self.home = _model_device(model)

    # --- setup

    def _validate(self) -> int:
        config, world = self.config, self.dist.world
        if self.train.labels is None:
            _check_labels(self.train, 1, "the training data")
        if config.batch_size % world:
            raise PrunecliError(
                f"--batch-size {config.batch_size} is the global batch and must divide evenly among {world} processes"
            )
        if len(self.train) < config.batch_size:
            raise DataError(
                f"the training data ({self.train.description}) has {len(self.train)} images, fewer than one batch "
                f"of {config.batch_size}; give more images or a smaller --batch-size"
            )
        classes = _num_classes(self.model, self.train.images, self.device)
        _check_labels(self.train, classes, "the training data")
        if self.val is not None:
            _check_labels(self.val, classes, "the validation data")
        if self.teacher is not None:
            self.teacher.to(self.device).eval()  # it runs under no_grad: the caller's model is not frozen
            taught = _num_classes(self.teacher, self.train.images, self.device, "the teacher")
            if taught != classes:
                raise DataError(
                    f"the teacher has {taught} outputs but the student has {classes}; "
                    "distil from a model trained on the same classes"
                )
        return classes

    def _prepare_checkpoint(self, expected: dict[str, Any]) -> dict[str, Any] | None:
        path = self.config.checkpoint
        if path is None:
            return None
        path = Path(path)
        if self.config.resume:
            state = _read_checkpoint(path)
            _check_resumable(path, state, expected)
            return state
        if path.exists() and not self.config.force:
            raise ExportError(
                f"checkpoint {path} already exists; pass --resume to continue that run or --force to start over"
            )
        check_output_path(path, force=True, option="--checkpoint")
        return None

    def _save(self, payload: dict[str, Any]) -> None:
        if self.config.checkpoint is None or self.dist.rank != 0:
            return
        with atomic_output(Path(self.config.checkpoint), force=True) as tmp:
            write_through_memory(tmp, lambda buffer: torch.save(payload, buffer))

    # --- the run

    def run(self) -> FinetuneResult:
        started = time.perf_counter()
        config, train, device = self.config, self.train, self.device
        self.model.to(device)
        if self.hook is not None:
            self.hook.refresh()
        self._validate()
        expected = _fingerprint(config, train, self.val, self.teacher)
        resume_state = self._prepare_checkpoint(expected)
        amp_dtype = _amp_dtype(config.amp, device)
        steps_per_epoch = len(train) // config.batch_size
        total_steps = config.steps if config.steps is not None else config.epochs * steps_per_epoch
        epochs = math.ceil(total_steps / steps_per_epoch)
        warmup = round(config.warmup_epochs * steps_per_epoch)
        optimizer = _optimizer(self.model, config)
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

        history: list[EpochRecord] = []
        best: dict[str, Any] | None = None
        start_epoch, step, resumed_from, elapsed_before = 0, 0, None, 0.0
        if resume_state is not None:
            from prunecli.io.slim import load_strict

            load_strict(self.model, resume_state["model"])
            try:
                optimizer.load_state_dict(resume_state["optimizer"])
                if scaler is not None and resume_state.get("scaler"):
                    scaler.load_state_dict(resume_state["scaler"])
            except (ValueError, KeyError, RuntimeError) as exc:
                raise CheckpointError(
                    f"--resume: the optimizer state in {config.checkpoint} does not fit this model ({exc}); start over"
                ) from exc
            if self.hook is not None:
                self.hook.load(resume_state["hook"])
            history = [EpochRecord(**r) for r in resume_state["history"]]
            best = resume_state.get("best")
            start_epoch = resumed_from = int(resume_state["epoch"])
            step = int(resume_state["step"])
            elapsed_before = float(resume_state.get("seconds", 0.0))
        else:
            if self.hook is not None:
                self._tell(self.hook.begin())
            if config.recalibrate_bn:
                used = recalibrate_bn(
                    self.model, iterate_batches(train, config.batch_size, shuffle=True, seed=_mix(config.seed, 3)),
                    config.recalibrate_bn, device,
                )
                self._tell({"event": "recalibrate", "batches": used})

        net: nn.Module = self.model
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)

        images, labels = train.images, train.labels
        if device.type == "cuda" and images.numel() * images.element_size() <= DEVICE_DATA_BYTES:
            images, labels = images.to(device), labels.to(device)
        padding = augment_padding(tuple(images.shape[1:])) if config.augment == "auto" else 0
        eval_batch = config.eval_batch_size or config.batch_size
        train_images_seen, train_seconds = 0, 0.0
        lr, temp = config.lr, None

        for epoch in range(start_epoch, epochs):
            epoch_started = time.perf_counter()
            torch.manual_seed(_mix(config.seed, epoch, self.dist.rank, 2))  # dropout and the like
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(_mix(config.seed, epoch, 0)))
            augment_rng = torch.Generator().manual_seed(_mix(config.seed, epoch, self.dist.rank, 1))
            epoch_steps = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
            sums = torch.zeros(3, dtype=torch.float64, device=device)
            net.train()
            for i in range(epoch_steps):
                index = order[i * config.batch_size : (i + 1) * config.batch_size][self.dist.rank :: self.dist.world]
                index = index.to(images.device)
                x = images[index].to(device, non_blocking=True)
                y = labels[index].to(device, non_blocking=True)
                if padding:
                    x = augment_batch(x, augment_rng, padding)
                lr = learning_rate(step, total_steps, config.lr, warmup)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                autocast = torch.autocast(device.type, amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
                with autocast:
                    logits = net(x)
                    if self.teacher is not None:
                        with torch.no_grad():
                            teacher_logits = self.teacher(x)
                logits = logits.float()
                if self.teacher is not None:
                    temp = config.kd_t_max if config.kd == "fixed" else temperature(
                        step / max(1, total_steps - 1), config.kd_t_max, config.kd_t_min, config.kd_schedule
                    )
                    loss = kd_loss(logits, teacher_logits, y, temp, config.kd_alpha, config.label_smoothing)
                else:
                    loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                else:
                    loss.backward()
                if self.hook is not None:
                    self.hook.after_backward()
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                step += 1
                if self.hook is not None:
                    self.hook.after_step(step, total_steps, lr)
                with torch.no_grad():
                    hits = (logits.argmax(1) == y).sum()
                    sums += torch.stack([loss.detach().double() * len(y), hits.double(), sums.new_tensor(len(y))])
                if self.say is not None:
                    seconds = time.perf_counter() - epoch_started
                    done = (i + 1) * config.batch_size
                    self._tell({
                        "event": "step", "epoch": epoch + 1, "epochs": epochs, "step": step, "total_steps": total_steps,
                        "loss": float(loss.detach()), "accuracy": float(hits) / len(y), "lr": lr, "temperature": temp,
                        "images_per_second": done / seconds if seconds > 0 else 0.0,
                    })
            _synchronize(device)
            seconds_training = time.perf_counter() - epoch_started
            self.dist.all_reduce(sums)
            self._average_buffers()
            train_loss, train_hits, seen = (float(v) for v in sums.cpu())
            if not math.isfinite(train_loss):
                raise PrunecliError(
                    f"the training loss became {train_loss} in epoch {epoch + 1}; lower --lr or check the data's "
                    "normalisation"
                )
            train_images_seen += int(seen)
            train_seconds += seconds_training
            val_result = self._validate_epoch(eval_batch) if self.val is not None else None
            record = EpochRecord(
                epoch + 1, step, train_loss / seen, train_hits / seen,
                val_result.top1 if val_result else None, val_result.top5 if val_result else None,
                val_result.loss if val_result else None, lr, temp, time.perf_counter() - epoch_started,
                seen / seconds_training if seconds_training > 0 else 0.0,
            )
            history.append(record)
            keeps_best = self.hook is None or self.hook.keeps_best
            if val_result is not None and keeps_best and (best is None or val_result.top1 > best["top1"]):
                best = {"epoch": epoch + 1, "top1": val_result.top1, "state": _cpu_state(self.model),
                        "hook": self.hook.state() if self.hook is not None else None}
            if self.hook is not None and (event := self.hook.end_epoch(epoch + 1, epochs)) is not None:
                self._tell(event)
            self._save({
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "options": expected,
                "world_size": self.dist.world, "epoch": epoch + 1, "step": step, "model": _cpu_state(self.model),
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
                "history": [dataclasses.asdict(r) for r in history], "best": best,
                "hook": self.hook.state() if self.hook is not None else None,
                "seconds": elapsed_before + time.perf_counter() - started,
            })
            self._tell({"event": "epoch", **dataclasses.asdict(record), "epochs": epochs,
                        "best_epoch": best["epoch"] if best else None, "best_top1": best["top1"] if best else None})

        if best is not None:
            self.model.load_state_dict(best["state"])
            if self.hook is not None and best["hook"] is not None:
                self.hook.load(best["hook"], history=False)
        self.model.eval()
        self.model.to(self.home)
        if self.hook is not None:
            self.hook.refresh()
        last = history[-1].epoch if history else None
        return FinetuneResult(
            config.to_dict(), history, best["epoch"] if best else last, best["top1"] if best else None, epochs, step,
            elapsed_before + time.perf_counter() - started,
            train_images_seen / train_seconds if train_seconds > 0 else 0.0, str(device),
            str(amp_dtype).removeprefix("torch.") if amp_dtype is not None else None, self.dist.world, resumed_from,
            self.model,
        )

    @torch.no_grad()
    def _average_buffers(self) -> None:
        """Average the BatchNorm running statistics over the ranks (each rank saw its own shard), so every rank
        validates, keeps and saves the same model (timm's ``distribute_bn`` with reduce)."""
        if self.dist.world < 2:
            return
        for buffer in self.model.buffers():
            if buffer.is_floating_point():
                self.dist.all_reduce(buffer)
                buffer.div_(self.dist.world)

    def _validate_epoch(self, batch_size: int) -> EvalResult:
        _synchronize(self.device)
        started = time.perf_counter()
        self.model.eval()
        sums = _eval_sums(self.model, self.val, batch_size, self.device, self.dist.rank, self.dist.world)
        self.dist.all_reduce(sums)
        _synchronize(self.device)
        return _eval_result(sums, time.perf_counter() - started)

    def _tell(self, event: dict[str, Any]) -> None:
        if self.say is not None:
            self.say(event)


# ----------------------------------------------------------------------------- soft pruning


@dataclass(frozen=True)
class SoftPruneResult:
    """Outcome of :func:`soft_prune`: the plan in force for the returned weights (the masked channels), the
    absolute budget target, every selection made, and the fine-tuning record.

    ``graph`` is the dependency graph of the trained (still full-size, masked) model; :meth:`remove_channels`
    applies the plan to it.
    """

    plan: Plan
    target: float
    selections: list[dict[str, Any]]
    finetune: FinetuneResult
    graph: DependencyGraph = field(repr=False, compare=False)

    def remove_channels(self) -> nn.Module:
        """Physically remove the masked channels, in place; returns the slim model (also ``finetune.model``)."""
        self.graph.prune(self.plan.removed)
        return self.graph.model.eval()

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": _plan_to_dict(self.plan),
            "target": self.target,
            "selections": [dict(s) for s in self.selections],
            "finetune": self.finetune.to_dict(),
        }


def _soft_scores(scoring: ScoringOptions, graph: DependencyGraph, train: ImageSet) -> dict[int, Tensor]:
    """Score every prunable group on the current weights; data criteria read a seeded subset of ``train``."""
    from prunecli.criteria import get_criterion
    from prunecli.criteria.base import score_weights, score_with_data

    criterion = get_criterion(scoring.method)(seed=scoring.seed, **scoring.options)
    groups = [g for g in graph.groups if g.prunable]
    if not criterion.needs_data:
        return score_weights(criterion, graph, groups, scoring.group_reduction, scoring.group_scope)
    limit = scoring.data.calib_images if scoring.data is not None else 256
    batch_size = scoring.data.batch_size if scoring.data is not None else 64
    chosen = torch.randperm(len(train), generator=torch.Generator().manual_seed(scoring.seed))[:limit].sort().values
    subset = ImageSet(train.images[chosen], train.labels[chosen] if train.labels is not None else None, train.description)
    device = _model_device(graph.model)
    return score_with_data(criterion, graph, groups, iterate_batches(subset, batch_size), scoring.group_reduction, device)


def trace_for_training(model: nn.Module, example_input: Tensor, prune: PruneConfig) -> tuple[DependencyGraph, CostModel]:
    """The channel groups and cost model of a model that is about to be trained in place (traced in eval mode)."""
    from prunecli.graph import DependencyGraph
    from prunecli.measure import CostModel, layer_costs

    example_input = example_input.to(_model_device(model))
    was_training = model.training
    model.eval()
    graph = DependencyGraph(model, example_input, prune.ignore, prune.timeout)
    cost_model = CostModel(model, layer_costs(model, example_input), graph.groups)
    model.train(was_training)
    return graph, cost_model


def soft_prune(
    model: nn.Module,
    example_input: Tensor,
    train: ImageSet,
    val: ImageSet | None,
    config: FinetuneConfig,
    prune: PruneConfig,
    *,
    reselect_every: int = 5,
    teacher: nn.Module | None = None,
    progress: Progress | None = None,
) -> SoftPruneResult:
    """Training-aware (soft) pruning, as in LRMF/FPGM, with any registered criterion.

    Before the first epoch the channels are scored with ``prune.method`` and a plan for ``prune.budget`` is made
    (``plan_pruning``: same allocation, limits and rounding as ``prune``); the planned channels are zeroed and
    held at zero (gradients masked after backward, weights re-zeroed after each optimizer step). After every
    ``reselect_every`` epochs, except the last, the model is scored and planned again and the mask replaced.
    Data criteria score a seeded subset (``prune.data.calib_images``, default 256) of the training images.

    Deviations from LRMF's code: BatchNorm weight and bias of masked channels are zeroed too (see
    :class:`_SoftMask`), no selection follows the last epoch (the returned weights are trained under their
    mask), and the returned plan is the one in force for the best epoch.

    Args:
        model: trained in place at full size; call :meth:`SoftPruneResult.remove_channels` to shrink it.
        example_input: a batch the model accepts, to trace its channel groups.
        config: the fine-tuning options; ``config.epochs`` (or ``steps``) is the soft-training length.
        prune: budget, criterion, allocation and limits (its ``source`` and ``output`` are not used).
        reselect_every: epochs between selections (LRMF: 5); 0 keeps the first selection.
    """
    from prunecli.api import plan_pruning
    from prunecli.criteria import get_criterion

    if reselect_every < 0:
        raise PrunecliError(f"--reselect-every {reselect_every} must not be negative")
    if get_criterion(prune.method).needs_labels and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise PrunecliError(
            f"--method {prune.method} scores with gradients, which would clash with DDP's gradient hooks; "
            "soft-prune with it in a single process, or use a weight or activation criterion"
        )
    graph, cost_model = trace_for_training(model, example_input, prune)

    def select() -> tuple[Plan, float]:
        return plan_pruning(prune, graph, cost_model, _soft_scores(prune.scoring, graph, train))

    soft = _SoftPruning(graph, select, reselect_every)
    result = _run(model, train, val, config, teacher, progress, soft)
    return SoftPruneResult(soft.plan, soft.target, soft.selections, result, graph)
