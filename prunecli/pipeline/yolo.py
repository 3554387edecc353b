"""``finetune`` and ``evaluate`` of an Ultralytics YOLO model: Ultralytics' own trainer and validator on the
dataset yaml, the pruned widths kept (``prunecli.training.yolo``), a fine-tuned model written back as an
Ultralytics checkpoint."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prunecli.config import EvaluateConfig, FinetuneJob
from prunecli.errors import OptionError
from prunecli.io.formats import LoadedModel
from prunecli.io.formats.ultralytics import UltralyticsFormat, chosen_model, read_checkpoint
from prunecli.measure import costs_and_output, count_params
from prunecli.pipeline.opening import example_input, open_model, profile, summary
from prunecli.provenance import finetune_metadata
from prunecli.results import EvaluateResult, FinetuneRunResult, Totals
from prunecli.runtime import main_process
from prunecli.tasks import prunable_part
from prunecli.training.loop import check_kd
from prunecli.training.yolo import (
    Distillation,
    check_dataset,
    check_teacher,
    reported,
    scratch,
    train,
    ultralytics_device,
    validate,
)
from prunecli.yolo import is_ultralytics

Say = Callable[[str], None]
NO_AUGMENTATION = {"mosaic": 0.0, "mixup": 0.0, "cutmix": 0.0, "fliplr": 0.0, "scale": 0.0, "translate": 0.0,
                   "hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0, "erasing": 0.0}


def task_of(loaded: LoadedModel) -> str:
    """The Ultralytics task (``detect``, ``segment``, ``pose``, ``obb``, ``classify``) of the model."""
    from ultralytics.nn.tasks import guess_model_task

    return getattr(loaded.deployed, "task", None) or guess_model_task(loaded.deployed)


def _refuse_unused(job: FinetuneJob) -> None:
    """Options of prunecli's own trainer that Ultralytics' has no counterpart for are refused, not ignored."""
    training = job.training
    unused = [option for option, given in (
        ("--steps", training.steps is not None), ("--val-data", job.val is not None),
        ("--train-limit", job.train_limit is not None), ("--val-limit", job.val_limit is not None),
        ("--checkpoint", training.checkpoint is not None), ("--resume", training.resume),
        ("--recalibrate-bn", training.recalibrate_bn > 0), ("--label-smoothing", training.label_smoothing > 0),
    ) if given]
    if unused:
        raise OptionError(f"{', '.join(unused)}: not for an Ultralytics model, which Ultralytics' trainer fine-tunes "
                          "on the dataset yaml's train and val splits; drop it")


def training_arguments(job: FinetuneJob, loaded: LoadedModel) -> dict[str, Any]:
    """The fine-tuning options as Ultralytics' training arguments."""
    training = job.training
    arguments = {"epochs": training.epochs, "batch": training.batch_size, "imgsz": max(loaded.input.shape[-2:]),
                 "lr0": training.lr, "optimizer": {"sgd": "SGD", "adamw": "AdamW"}[training.optimizer],
                 "momentum": training.momentum, "weight_decay": training.weight_decay,
                 "warmup_epochs": training.warmup_epochs, "seed": training.seed,
                 "device": ultralytics_device(training.device), "amp": training.amp != "off"}
    if training.augment == "none":
        arguments.update(NO_AUGMENTATION)
    return arguments


def distillation(job: FinetuneJob, loaded: LoadedModel) -> tuple[Distillation | None, str | None]:
    """``--teacher`` read like the model and checked against its head, as prunecli's KD options say (``--kd``,
    ``--kd-alpha``, ``--kd-t-max``, ``--kd-t-min``, ``--kd-schedule``); with its file's sha256."""
    check_kd(job.training, job.teacher is not None)
    if job.teacher is None:
        return None, None
    teacher = open_model(dataclasses.replace(job.teacher, input_shape=job.teacher.input_shape or
                                             tuple(loaded.input.shape)))
    if not is_ultralytics(teacher.deployed):
        raise OptionError(f"--teacher {job.teacher.path} is no Ultralytics model; distil from the checkpoint the "
                          "model was pruned from")
    check_teacher(loaded.deployed, teacher.deployed, str(job.teacher.path))
    return Distillation(teacher.deployed, job.training), teacher.sha256


def finetune_yolo(job: FinetuneJob, loaded: LoadedModel, output: Path, say: Say) -> FinetuneRunResult:
    """Fine-tune with Ultralytics' trainer at the pruned widths, validating before and after on the yaml's val
    split, and write the best epoch's weights (Ultralytics' best.pt) as an Ultralytics checkpoint."""
    _refuse_unused(job)
    task = task_of(loaded)
    data = check_dataset(job.train.source, task)
    arguments = training_arguments(job, loaded)
    teacher, teacher_sha256 = distillation(job, loaded)
    check = {k: arguments[k] for k in ("batch", "imgsz", "device")}
    with scratch() as workdir:
        say(f"validating the input on {data}")
        with reported("validator"):
            before = validate(job.source.path, task, data, check, workdir).metrics
        say(f"fine-tuning with Ultralytics' {task} trainer for {job.training.epochs} epochs at {arguments['imgsz']}")
        with reported("trainer"):
            run = train(job.source.path, task, data, arguments, workdir, teacher)
        checkpoint = read_checkpoint(run.best, True)
        _, model = chosen_model(checkpoint, run.best)
    dtype = next(p.dtype for p in model.parameters())
    model = model.float().eval()
    part = prunable_part(model)
    costs, _ = costs_and_output(part, example_input(loaded))
    record = {"trainer": "ultralytics", "task": task, "arguments": arguments, "metrics": run.metrics}
    if teacher is not None:
        record["distillation"] = {"kd": teacher.kd, "alpha": teacher.alpha, "t_max": teacher.t_max,
                                  "t_min": teacher.t_min, "schedule": teacher.schedule}
    if main_process():
        container = {k: v for k, v in checkpoint.items() if k not in ("model", "ema")}
        document = finetune_metadata(job, loaded, record, teacher_sha256, None)
        UltralyticsFormat(container, dtype).write(loaded, model, output, document, force=job.force,
                                                  inputs=(job.source.path,))
    return FinetuneRunResult(summary(loaded, Totals(count_params(part), sum(c.macs for c in costs))), str(output),
                             record, before, run.metrics, str(data), None, None, [*loaded.notes])


def evaluate_yolo(config: EvaluateConfig, loaded: LoadedModel) -> EvaluateResult:
    """mAP50-95 and mAP50 (precision, recall; a classifier's top-1 and top-5) from Ultralytics' validator on the
    dataset's val split, at the model's input size; with ``compare``, the original validated alike."""
    if config.limit is not None:
        raise OptionError("--eval-limit: Ultralytics' validator reads the whole val split of the dataset yaml; drop it")
    task = task_of(loaded)
    data = check_dataset(config.data.source, task)
    options = {"imgsz": max(loaded.input.shape[-2:]), "batch": config.data.batch_size,
               "device": ultralytics_device(config.device)}
    other = None
    if config.compare is not None:  # validated and costed at this model's size
        other = open_model(dataclasses.replace(config.compare, input_shape=config.compare.input_shape or
                                               tuple(loaded.input.shape)))
    if other is not None and not is_ultralytics(other.deployed):
        raise OptionError(f"--compare {config.compare.path} is no Ultralytics model; compare with the checkpoint it "
                          "was pruned from")
    with scratch() as workdir, reported("validator"):
        metrics = validate(config.source.path, task, data, options, workdir).metrics
        compared = validate(config.compare.path, task, data, options, workdir).metrics if other else None
    model = summary(loaded, profile(loaded).totals)
    compare = None
    if other is not None:
        original = summary(other, profile(other).totals)
        compare = {"model": dataclasses.asdict(original), "metrics": compared,
                   "macs_ratio": original.macs / model.macs if model.macs else None}
    return EvaluateResult(model, f"{data} (val split, {options['imgsz']} pixels)", metrics, compare,
                          [*loaded.notes])
