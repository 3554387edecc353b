"""Fine-tuning and validating a pruned Ultralytics YOLO model with Ultralytics' own trainer and validator.

Ultralytics' ``Model.train()`` builds a fresh model from the yaml the checkpoint records and loads only the weights
whose shapes match (``trainer.get_model(cfg=model.yaml, weights=model)``): a pruned model would silently train at
its original width, from mostly random weights. :func:`keeping_widths` makes a subclass of the task's trainer whose
``get_model`` returns the model it is given as it is, so the trainer (its losses, augmentation, EMA, mAP
validation, best.pt) trains the pruned model itself. It is a public extension point of Ultralytics' trainer, not a
patch: the same four lines work for users who call ``YOLO(...).train(trainer=...)`` themselves (docs/yolo.md).
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from prunecli.errors import DataError, OptionError, PrunecliError, first_line

TASKS = ("detect", "segment", "pose", "obb", "classify")


def head_classes(model: nn.Module) -> int | None:
    """How many classes the model's head predicts (a detection head's ``nc``, a classifier's linear width)."""
    head = model.model[-1]
    if hasattr(head, "nc"):
        return int(head.nc)
    linear = getattr(head, "linear", None)
    return int(linear.out_features) if isinstance(linear, nn.Linear) else None


def keeping_widths(trainer: type) -> type:
    """A subclass of the Ultralytics task trainer ``trainer`` that trains the model it is handed, at its widths.

    ``get_model(weights=model)`` returns ``model`` itself instead of a model built from ``cfg`` with ``model``'s
    matching weights copied in; a dataset with another number of classes than the model's head is refused (the
    head cannot be rebuilt without its trained weights)."""

    class KeepingWidths(trainer):
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

    KeepingWidths.__name__ = KeepingWidths.__qualname__ = f"WidthKeeping{trainer.__name__}"
    return KeepingWidths


def task_trainer(task: str) -> type:
    """Ultralytics' trainer of ``task`` (``detect``, ``segment``, ...), keeping the model's widths."""
    from ultralytics.models import yolo

    if task not in TASKS:
        raise OptionError(f"an Ultralytics {task} model cannot be fine-tuned here; prunecli trains {', '.join(TASKS)}")
    trainers = {"detect": yolo.detect.DetectionTrainer, "segment": yolo.segment.SegmentationTrainer,
                "pose": yolo.pose.PoseTrainer, "obb": yolo.obb.OBBTrainer,
                "classify": yolo.classify.ClassificationTrainer}
    return keeping_widths(trainers[task])


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


def train(path: Path, task: str, data: Path, options: dict[str, Any], workdir: Path) -> YoloRun:
    """Train the Ultralytics checkpoint ``path`` with its task's trainer, widths kept, on ``data``; the run's files
    go under ``workdir``. ``options`` are Ultralytics' training arguments (epochs, batch, imgsz, lr0, ...)."""
    from ultralytics import YOLO

    model = YOLO(str(_as_pt(path, workdir)), task=task)
    with quiet():
        model.train(trainer=task_trainer(task), data=str(data), project=str(workdir), name="train", exist_ok=True,
                    plots=False, verbose=False, **options)
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
