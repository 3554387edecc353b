"""Fine-tuning and evaluation: a plain PyTorch training loop, distillation, BN recalibration, DDP.

Training-aware pruning methods (``prunecli.methods``) plug into the loop through :class:`TrainingHook`.

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
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunecli.config import KD_SCHEDULES, FinetuneConfig
from prunecli.errors import ArchitectureError, CheckpointError, DataError, ExportError, PrunecliError, first_line
from prunecli.io.data import ImageSet, iterate_batches
from prunecli.io.files import atomic_output, check_output_path, write_through_memory
from prunecli.runtime import model_device, resolve_device, world_size

STEP_LEVELS = 4  # the "step" temperature schedule falls from T_max to T_min in this many equal levels
CHECKPOINT_FORMAT = "prunecli-finetune-checkpoint"
CHECKPOINT_VERSION = 1
DEVICE_DATA_BYTES = 2 << 30  # training sets up to this size are moved to the GPU once
# options that may differ between a run and its resumption without changing the result
_RESUME_FREE = ("checkpoint", "resume", "force", "device", "eval_batch_size")

Progress = Callable[[dict[str, Any]], None]


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
            f"({type(exc).__name__}: {first_line(exc, 150)}); check the data"
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
    target = resolve_device(device)
    original, was_training = model_device(model), model.training
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
    device = resolve_device(device_name)
    world = world_size()
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
            first = first_line(exc, 150)
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
    hook: TrainingHook | None = None,
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
        hook: what a training-aware pruning method adds to the loop (``prunecli.methods.soft``, ``.edp``).

    Returns:
        the result; ``result.model`` is ``model`` with the best epoch's weights, in eval mode.

    Raises:
        DataError: unlabelled data, labels outside the model's classes, a teacher with another number of
            outputs, fewer training images than one batch.
        CheckpointError: ``config.resume`` with a missing, unreadable or foreign checkpoint.
        ExportError: the checkpoint exists and neither ``resume`` nor ``force`` was given.
    """
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
        self.home = model_device(model)

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
