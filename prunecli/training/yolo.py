"""Fine-tuning and validating a pruned Ultralytics YOLO model with Ultralytics' own trainer and validator.

Ultralytics' ``Model.train()`` builds a fresh model from the yaml the checkpoint records and loads only the weights
whose shapes match (``trainer.get_model(cfg=model.yaml, weights=model)``): a pruned model would silently train at
its original width, from mostly random weights. :func:`keeping_widths` makes a subclass of the task's trainer whose
``get_model`` returns the model it is given as it is, so the trainer (its losses, augmentation, EMA, mAP
validation, best.pt) trains the pruned model itself. It is a public extension point of Ultralytics' trainer, not a
patch: the same four lines work for users who call ``YOLO(...).train(trainer=...)`` themselves (docs/yolo.md).

With a :class:`Distillation`, the trainer also distils from a frozen teacher (prunecli's ``--kd`` semantics, on
the head's outputs): :class:`DistillingLoss` takes the place of the student's loss once the trainer is set up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunecli.config import FinetuneConfig
from prunecli.errors import DataError, OptionError, PrunecliError, first_line
from prunecli.training.schedules import kd_temperature

TASKS = ("detect", "segment", "pose", "obb", "classify")


def head_classes(model: nn.Module) -> int | None:
    """How many classes the model's head predicts (a detection head's ``nc``, a classifier's linear width)."""
    head = model.model[-1]
    if hasattr(head, "nc"):
        return int(head.nc)
    linear = getattr(head, "linear", None)
    return int(linear.out_features) if isinstance(linear, nn.Linear) else None


@dataclass(frozen=True)
class Distillation:
    """Distilling from ``teacher`` inside Ultralytics' trainer, as ``prunecli finetune --teacher`` distils with
    ``config``'s ``--kd`` options: ``(1 - kd_alpha) * Ultralytics' loss + kd_alpha * KD``, at the temperature
    :func:`~prunecli.training.schedules.kd_temperature` gives over the run's batches."""

    teacher: nn.Module
    config: FinetuneConfig


def check_teacher(student: nn.Module, teacher: nn.Module, name: str) -> None:
    """The teacher must predict what the student predicts, anchor for anchor: the same head class, classes, box
    bins (``reg_max``) and strides; a classifier is not distilled here."""
    if getattr(student, "task", None) == "classify" or not hasattr(student.model[-1], "reg_max"):
        raise OptionError("--teacher: an Ultralytics classifier is not distilled here; fine-tune it without --teacher")

    def head(model: nn.Module) -> str:
        layer = model.model[-1]
        strides = "/".join(str(int(s)) for s in getattr(layer, "stride", torch.zeros(0)).tolist())
        return (f"a {type(layer).__name__} head with {getattr(layer, 'nc', '?')} classes, "
                f"reg_max {getattr(layer, 'reg_max', '?')}, strides {strides or '?'}")

    if head(teacher) != head(student):
        raise OptionError(f"--teacher {name} has {head(teacher)}, the model {head(student)}; distil from the model it "
                          "was pruned from")


def _branches(preds: Any) -> list[dict[str, Tensor]]:
    """A head's training outputs (its eval output is (decoded, raw)) as dicts of ``boxes`` and ``scores``, one per
    branch of an end-to-end head."""
    raw = preds[1] if isinstance(preds, tuple) else preds
    return [raw[k] for k in ("one2many", "one2one") if k in raw] or [raw]


def head_distillation(student: dict[str, Tensor], teacher: dict[str, Tensor], t: float) -> tuple[Tensor, Tensor]:
    """The KD terms between two heads' raw outputs at temperature ``t``: classes and box distributions.

    Classes: Ultralytics scores each class by its own sigmoid, so the term is the binary KL divergence of
    ``sigmoid(z_t / t)`` from ``sigmoid(z_s / t)``, summed over classes and anchors. Boxes: the KL divergence of the
    softmax over each side's ``reg_max`` bins (``boxes`` is (batch, 4 * reg_max, anchors)), summed over the 4
    sides and weighted per anchor by the teacher's top class probability, so background anchors' boxes count
    little (zero for a head without bins, ``reg_max`` 1). Both are divided by the sum of those weights (at least
    1), as Ultralytics divides its own losses by the targets' scores, and scaled by ``t**2`` like prunecli's KD.
    """
    s_scores, t_scores = student["scores"].float(), teacher["scores"].float()
    soft = torch.sigmoid(t_scores / t)
    binary_kl = (F.binary_cross_entropy_with_logits(s_scores / t, soft, reduction="none")
                 - F.binary_cross_entropy_with_logits(t_scores / t, soft, reduction="none"))
    weight = torch.sigmoid(t_scores).amax(1)  # (batch, anchors)
    norm = weight.sum().clamp(min=1)
    n, channels, anchors = student["boxes"].shape
    s_bins, t_bins = (x.float().view(n, 4, channels // 4, anchors) / t for x in (student["boxes"], teacher["boxes"]))
    box_kl = (F.softmax(t_bins, 2) * (F.log_softmax(t_bins, 2) - F.log_softmax(s_bins, 2))).sum((1, 2))
    return t * t * binary_kl.sum() / norm, t * t * (box_kl * weight).sum() / norm


class DistillingLoss:
    """The student's Ultralytics loss ``loss`` with the KD term of :func:`head_distillation` added.

    Returns what Ultralytics' losses return: the loss components times the batch size, here the student's own
    weighted by ``1 - alpha`` and the KD term (the class term at Ultralytics' ``cls`` gain, the box term at its
    ``dfl`` gain) by ``alpha``; and the detached items, with ``kd_loss`` beside the student's own. The temperature
    follows the batches: ``total_steps`` calls make the run."""

    def __init__(self, loss: Any, distillation: Distillation, total_steps: int, gains: Any):
        self.loss, self.distillation, self.total_steps, self.gains = loss, distillation, total_steps, gains
        self.step = 0

    def __call__(self, preds: Any, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        own, items = self.loss(preds, batch)
        with torch.no_grad():
            taught = self.distillation.teacher(batch["img"])
        t = kd_temperature(self.distillation.config, self.step, self.total_steps)
        self.step += 1
        pairs = list(zip(_branches(preds), _branches(taught), strict=True))
        kd = sum(self.gains.cls * classes + self.gains.dfl * boxes
                 for classes, boxes in (head_distillation(s, tt, t) for s, tt in pairs)) / len(pairs)
        alpha = self.distillation.config.kd_alpha
        total = torch.cat([(1 - alpha) * own, (alpha * kd * batch["img"].shape[0]).reshape(1)])
        return total, {**items, "kd_loss": kd.detach()}

    def update(self) -> None:
        """Ultralytics' per-epoch update of the loss it wraps (end-to-end heads reweigh their branches)."""
        if hasattr(self.loss, "update"):
            self.loss.update()


def keeping_widths(trainer: type, distillation: Distillation | None = None) -> type:
    """A subclass of the Ultralytics task trainer ``trainer`` that trains the model it is handed, at its widths.

    ``get_model(weights=model)`` returns ``model`` itself instead of a model built from ``cfg`` with ``model``'s
    matching weights copied in; a dataset with another number of classes than the model's head is refused (the
    head cannot be rebuilt without its trained weights). With ``distillation``, the model's loss becomes a
    :class:`DistillingLoss` when training starts (after the EMA copy is made, which keeps the plain loss for
    validation)."""

    class KeepingWidths(trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if distillation is not None:  # a copy of the callbacks: the YOLO object's own stay as they were
                self.callbacks = {event: list(hooks) for event, hooks in self.callbacks.items()}
                self.add_callback("on_train_start", _distil)

        def get_model(self, cfg=None, weights=None, verbose=True):
            if not isinstance(weights, nn.Module):
                return super().get_model(cfg=cfg, weights=weights, verbose=verbose)
            classes, wanted = head_classes(weights), self.data.get("nc")
            if classes is not None and wanted is not None and classes != wanted:
                raise DataError(f"--data has {wanted} classes and the model's head predicts {classes}; fine-tune on "
                                "data with the classes it was pruned with")
            for param in weights.parameters():
                param.requires_grad_(True)
            return weights

    def _distil(run) -> None:
        student = getattr(run.model, "module", run.model)  # unwrapped from DDP
        teacher = distillation.teacher.to(run.device).float().eval().requires_grad_(False)
        steps = run.epochs * len(run.train_loader)
        student.criterion = DistillingLoss(student.init_criterion(), dataclasses.replace(distillation, teacher=teacher),
                                           steps, run.args)

    KeepingWidths.__name__ = KeepingWidths.__qualname__ = f"WidthKeeping{trainer.__name__}"
    return KeepingWidths


def task_trainer(task: str, distillation: Distillation | None = None) -> type:
    """Ultralytics' trainer of ``task`` (``detect``, ``segment``, ...), keeping the model's widths (and distilling
    with ``distillation``)."""
    from ultralytics.models import yolo

    if task not in TASKS:
        raise OptionError(f"an Ultralytics {task} model cannot be fine-tuned here; prunecli trains {', '.join(TASKS)}")
    trainers = {"detect": yolo.detect.DetectionTrainer, "segment": yolo.segment.SegmentationTrainer,
                "pose": yolo.pose.PoseTrainer, "obb": yolo.obb.OBBTrainer,
                "classify": yolo.classify.ClassificationTrainer}
    return keeping_widths(trainers[task], distillation)


def check_dataset(data: str | None, task: str) -> Path:
    """The ``--data`` an Ultralytics trainer reads: a dataset yaml (a folder of class folders for a classifier), which
    must exist here (nothing is downloaded)."""
    want = ("a folder with train/ and val/ class folders" if task == "classify"
            else "a dataset yaml (path, train, val, names)")
    if data is None:
        raise OptionError(f"give --data: {want}, as Ultralytics trains on")
    path = Path(data)
    if not path.exists():
        raise DataError(f"--data {data}: no such file or folder; give {want}")
    if task != "classify" and (path.is_dir() or path.suffix.lower() not in (".yaml", ".yml")):
        raise DataError(f"--data {data} is not a .yaml file; give {want}")
    return path


def ultralytics_device(device: str) -> str:
    """prunecli's device name as Ultralytics spells it: ``cpu``, ``0`` for ``cuda:0``."""
    if device.startswith("cuda"):
        return device.partition(":")[2] or "0"
    return device


# Ultralytics' metric keys, and the names prunecli reports them under
METRICS = {"metrics/mAP50-95(B)": "mAP50-95", "metrics/mAP50(B)": "mAP50", "metrics/precision(B)": "precision",
           "metrics/recall(B)": "recall", "metrics/mAP50-95(M)": "mask mAP50-95", "metrics/mAP50(M)": "mask mAP50",
           "metrics/mAP50-95(P)": "pose mAP50-95", "metrics/mAP50(P)": "pose mAP50",
           "metrics/accuracy_top1": "top1", "metrics/accuracy_top5": "top5"}


def metrics_of(results: Any) -> dict[str, float]:
    """An Ultralytics validation's metrics (its metrics object, or the dict a trainer keeps) under plain names:
    ``mAP50-95``, ``mAP50``, ``precision``, ``recall`` (masks and keypoints their own mAPs), a classifier's ``top1``
    and ``top5``."""
    raw = results if isinstance(results, dict) else getattr(results, "results_dict", None) or {}
    return {METRICS[k]: float(v) for k, v in raw.items() if k in METRICS}


@dataclass
class YoloRun:
    """A finished Ultralytics training or validation: the metrics it reports and, trained, the checkpoint it kept."""

    metrics: dict[str, float]
    best: Path | None = None


def _as_pt(path: Path, workdir: Path) -> Path:
    """``path``, or a copy of it named ``.pt`` in ``workdir``: Ultralytics reads checkpoints by that suffix only."""
    if path.suffix == ".pt":
        return path
    return Path(shutil.copyfile(path, workdir / f"{path.stem}.pt"))


def train(path: Path, task: str, data: Path, options: dict[str, Any], workdir: Path,
          distillation: Distillation | None = None) -> YoloRun:
    """Train the Ultralytics checkpoint ``path`` with its task's trainer, widths kept, on ``data`` (distilling with
    ``distillation``); the run's files go under ``workdir``. ``options`` are Ultralytics' training arguments
    (epochs, batch, imgsz, lr0, ...)."""
    from ultralytics import YOLO

    model = YOLO(str(_as_pt(path, workdir)), task=task)
    with quiet():
        model.train(trainer=task_trainer(task, distillation), data=str(data), project=str(workdir), name="train",
                    exist_ok=True, plots=False, verbose=False, **options)
    trainer = model.trainer
    return YoloRun(metrics_of(trainer.metrics), trainer.best if trainer.best.exists() else trainer.last)


def validate(path: Path, task: str, data: Path, options: dict[str, Any], workdir: Path) -> YoloRun:
    """Ultralytics' validator on ``data``'s val split for the checkpoint ``path``: mAP50-95 and mAP50 (top-1 and
    top-5 for a classifier)."""
    from ultralytics import YOLO

    model = YOLO(str(_as_pt(path, workdir)), task=task)
    with quiet():
        results = model.val(data=str(data), project=str(workdir), name="val", exist_ok=True, plots=False,
                            verbose=False, **options)
    return YoloRun(metrics_of(results))


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Ultralytics' log lines and progress bars (its ``ultralytics`` logger, stdout) held back: prunecli reports
    the run itself; its errors still raise."""
    logger = logging.getLogger("ultralytics")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    """A folder for an Ultralytics run's files (args, results.csv, weights), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="prunecli-yolo-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def reported(what: str) -> Iterator[None]:
    """What Ultralytics raises while ``what`` (its dataset checks, loaders, losses) as a one-line DataError."""
    try:
        yield
    except PrunecliError:
        raise
    except Exception as exc:
        raise DataError(f"Ultralytics' {what} failed ({type(exc).__name__}: {first_line(exc, 200)})") from exc
