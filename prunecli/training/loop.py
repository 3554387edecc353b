"""The fine-tuning loop: ``finetune`` and the trainer behind it (epochs and steps, distillation, the best
epoch, progress events and the calls into a :class:`~prunecli.training.hooks.TrainingHook`).

"Keeps the best epoch" counts the input as epoch 0: with validation data (and no hook), a trained epoch is kept
only if its validation top-1 beats the input's; if none does, the result is the input's weights
(``best_epoch`` 0, ``kept_input``), so fine-tuning never hands back a model worse than it was given.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from prunecli.config import FinetuneConfig
from prunecli.errors import CheckpointError, PrunecliError
from prunecli.io.data import ImageSet, iterate_batches
from prunecli.runtime import model_device
from prunecli.training.batchnorm import recalibrate_bn
from prunecli.training.checkpoint import cpu_state, fingerprint, prepare_checkpoint, write_checkpoint
from prunecli.training.distributed import Distributed, amp_dtype, setup_distributed
from prunecli.training.evaluate import EvalResult, check_training_inputs, eval_result, eval_sums, synchronize
from prunecli.training.hooks import Progress, TrainingHook
from prunecli.training.results import EpochRecord, FinetuneResult
from prunecli.training.schedules import mix_seed
from prunecli.training.step import Batches, Schedule, Stepper


def check_kd(config: FinetuneConfig, teacher_given: bool) -> None:
    """``--kd`` and ``--teacher`` go together: distillation without a teacher, or a teacher left unused, is refused."""
    if config.kd != "none" and not teacher_given:
        raise PrunecliError(f"--kd {config.kd} needs a --teacher model to distil from")
    if config.kd == "none" and teacher_given:
        raise PrunecliError("a teacher was given but --kd is none; pass --kd fixed or --kd variable")


def finetune(
    model: nn.Module,
    train: ImageSet,
    val: ImageSet | None,
    config: FinetuneConfig,
    teacher: nn.Module | None = None,
    progress: Progress | None = None,
    hook: TrainingHook | None = None,
    baseline: EvalResult | None = None,
) -> FinetuneResult:
    """Train ``model`` in place on ``train``, validating on ``val`` after each epoch, and keep the best epoch,
    the input itself (epoch 0) when no trained epoch beats its validation top-1.

    Args:
        model: a classifier returning ``[batch, classes]`` logits (for example a pruned slim model).
        train: labelled, normalised training images.
        val: labelled validation images, or None (then the last epoch's weights are kept).
        config: the options; ``config.checkpoint`` gets the resume state after every epoch (rank 0).
        teacher: the distillation teacher for ``config.kd`` fixed/variable; run in eval mode without grad.
        progress: called (rank 0 only) with ``{"event": "step", ...}`` after every step, ``{"event": "epoch",
            ...}`` after every epoch, and ``{"event": "recalibrate"|"select", ...}`` for those phases.
        hook: what a training-aware pruning method adds to the loop (``prunecli.methods.soft``, ``.edp``).
            With a hook the input is no candidate: the method changes the model from its first step.
        baseline: the input model's result on ``val`` when the caller has measured it already (``evaluate``,
            as ``finetune_model`` reports "before"), so epoch 0 is not validated twice; else measured here.

    Returns:
        the result; ``result.model`` is ``model`` with the best epoch's weights (the input's when
        ``result.kept_input``), in eval mode.

    Raises:
        DataError: unlabelled data, labels outside the model's classes, a teacher with another number of
            outputs, fewer training images than one batch.
        CheckpointError: ``config.resume`` with a missing, unreadable or foreign checkpoint.
        ExportError: the checkpoint exists and neither ``resume`` nor ``force`` was given.
    """
    check_kd(config, teacher is not None)
    if baseline is not None and (val is None or baseline.images != len(val)):
        raise PrunecliError(
            f"the baseline was measured on {baseline.images} images, but the validation data holds "
            f"{len(val) if val is not None else 0}; measure it on the validation data"
        )
    distributed = setup_distributed(config.device)
    try:
        with distributed.isolated_rng():
            return _Trainer(model, train, val, config, teacher, progress, hook, distributed, baseline).run()
    finally:
        distributed.close()


@dataclass
class _RunState:
    """What changes as the run goes on, and what a checkpoint restores."""

    lr: float
    history: list[EpochRecord] = field(default_factory=list)
    best: dict[str, Any] | None = None  # {"epoch", "top1", "state" (weights on the CPU), "hook"}
    start_epoch: int = 0
    step: int = 0
    resumed_from: int | None = None
    seconds_before: float = 0.0  # spent in the runs this one resumes
    images_seen: int = 0
    train_seconds: float = 0.0
    temperature: float | None = None


class _Trainer:
    """One fine-tuning run, split into steps for readability; the run's settings live in its attributes, what
    changes as it goes in a :class:`_RunState`."""

    def __init__(self, model, train, val, config, teacher, progress, hook, distributed: Distributed, baseline=None):
        self.model: nn.Module = model
        self.train, self.val, self.config, self.baseline = train, val, config, baseline
        self.teacher, self.hook, self.dist = teacher, hook, distributed
        self.say = progress if distributed.rank == 0 else None
        self.device = distributed.device
        self.home = model_device(model)
        self.eval_batch = config.eval_batch_size or config.batch_size
        self.started = time.perf_counter()

    def run(self) -> FinetuneResult:
        self.model.to(self.device)
        if self.hook is not None:
            self.hook.refresh()
        check_training_inputs(self.model, self.train, self.val, self.teacher, self.config.batch_size, self.dist.world,
                              self.device)
        self.expected = fingerprint(self.config, self.train, self.val, self.teacher)
        saved = prepare_checkpoint(self.config, self.expected)
        amp = amp_dtype(self.config.amp, self.device)
        self.schedule = Schedule.of(self.config, len(self.train))
        self.stepper = Stepper(self.model, self.config, self.schedule, self.device, amp, self.teacher, self.hook)
        state = self._resume(saved) if saved is not None else self._start()
        net = self.dist.wrap(self.model)
        batches = Batches.of(self.train, self.config, self.dist)
        for epoch in range(state.start_epoch, self.schedule.epochs):
            self._run_epoch(net, batches, epoch, state)
        return self._finish(state, amp)

    # --- before the first step

    def _start(self) -> _RunState:
        """A fresh run: the input as epoch 0's candidate, the hook's first selection, then BatchNorm
        recalibration when asked for."""
        state = _RunState(lr=self.config.lr, best=self._input_candidate())
        if self.hook is not None:
            self._tell(self.hook.begin())
        if self.config.recalibrate_bn:
            config = self.config
            batches = iterate_batches(self.train, config.batch_size, shuffle=True, seed=mix_seed(config.seed, 3))
            used = recalibrate_bn(self.model, batches, config.recalibrate_bn, self.device)
            self._tell({"event": "recalibrate", "batches": used})
        return state

    def _input_candidate(self) -> dict[str, Any] | None:
        """Epoch 0: the input model, which a trained epoch must beat on validation to be kept. None without
        validation data, or with a hook (its method changes the model from the first step: the input is no
        result of it)."""
        if self.val is None or self.hook is not None:
            return None
        self.dist.broadcast(self.model)  # under torchrun the run starts from rank 0's model, as DDP would
        if self.baseline is not None:
            top1 = self.baseline.top1
        else:
            was_training = self.model.training
            top1 = self._validate().top1
            self.model.train(was_training)
        return {"epoch": 0, "top1": top1, "state": cpu_state(self.model), "hook": None}

    def _resume(self, saved: dict[str, Any]) -> _RunState:
        """The model, optimizer, scaler and hook as the checkpoint left them, and the run's state."""
        from prunecli.io.slim import load_strict

        load_strict(self.model, saved["model"])
        try:
            self.stepper.load(saved)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(
                f"--resume: the optimizer state in {self.config.checkpoint} does not fit this model ({exc}); start over"
            ) from exc
        if self.hook is not None:
            self.hook.load(saved["hook"])
        done = int(saved["epoch"])
        return _RunState(
            lr=self.config.lr, history=[EpochRecord(**r) for r in saved["history"]], best=saved.get("best"),
            start_epoch=done, step=int(saved["step"]), resumed_from=done,
            seconds_before=float(saved.get("seconds", 0.0)),
        )

    # --- an epoch

    def _run_epoch(self, net: nn.Module, batches: Batches, epoch: int, state: _RunState) -> None:
        """Train one epoch, validate, keep the model if it is the best so far, save the checkpoint, report."""
        started = time.perf_counter()
        sums = self._train_epoch(net, batches, epoch, state, started)
        synchronize(self.device)
        seconds = time.perf_counter() - started
        self.dist.all_reduce(sums)
        self.dist.average_buffers(self.model)
        train_loss, train_hits, seen = (float(v) for v in sums.cpu())
        if not math.isfinite(train_loss):
            raise PrunecliError(
                f"the training loss became {train_loss} in epoch {epoch + 1}; lower --lr or check the data's "
                "normalisation"
            )
        state.images_seen += int(seen)
        state.train_seconds += seconds
        val = self._validate() if self.val is not None else None
        record = EpochRecord(
            epoch + 1, state.step, train_loss / seen, train_hits / seen, val.top1 if val else None,
            val.top5 if val else None, val.loss if val else None, state.lr, state.temperature,
            time.perf_counter() - started, seen / seconds if seconds > 0 else 0.0,
        )
        state.history.append(record)
        self._keep_if_best(epoch + 1, val, state)
        if self.hook is not None and (event := self.hook.end_epoch(epoch + 1, self.schedule.epochs)) is not None:
            self._tell(event)
        self._save_checkpoint(epoch + 1, state)
        best = state.best
        self._tell({"event": "epoch", **dataclasses.asdict(record), "epochs": self.schedule.epochs,
                    "best_epoch": best["epoch"] if best else None, "best_top1": best["top1"] if best else None})

    def _train_epoch(self, net: nn.Module, batches: Batches, epoch: int, state: _RunState, started: float) -> Tensor:
        """The epoch's steps; ``[summed loss, top-1 hits, images]`` of this rank's batches."""
        seed, rank = self.config.seed, self.dist.rank
        torch.manual_seed(mix_seed(seed, epoch, rank, 2))  # dropout and the like
        order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(mix_seed(seed, epoch, 0)))
        augment_rng = torch.Generator().manual_seed(mix_seed(seed, epoch, rank, 1))
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        net.train()
        for i in range(self.schedule.steps_in(epoch)):
            x, y = batches.take(order, i, augment_rng)
            out = self.stepper(net, x, y, state.step)
            state.step, state.lr, state.temperature = state.step + 1, out.lr, out.temperature
            with torch.no_grad():
                hits = (out.logits.argmax(1) == y).sum()
                sums += torch.stack([out.loss.detach().double() * len(y), hits.double(), sums.new_tensor(len(y))])
            if self.say is not None:
                seconds = time.perf_counter() - started
                self._tell({
                    "event": "step", "epoch": epoch + 1, "epochs": self.schedule.epochs, "step": state.step,
                    "total_steps": self.schedule.total_steps, "loss": float(out.loss.detach()),
                    "accuracy": float(hits) / len(y), "lr": state.lr, "temperature": state.temperature,
                    "images_per_second": (i + 1) * self.config.batch_size / seconds if seconds > 0 else 0.0,
                })
        return sums

    def _validate(self) -> EvalResult:
        """The model on the validation data, each rank on its share, the counts summed over the ranks."""
        synchronize(self.device)
        started = time.perf_counter()
        self.model.eval()
        sums = eval_sums(self.model, self.val, self.eval_batch, self.device, self.dist.rank, self.dist.world)
        self.dist.all_reduce(sums)
        synchronize(self.device)
        return eval_result(sums, time.perf_counter() - started)

    def _keep_if_best(self, epoch: int, val: EvalResult | None, state: _RunState) -> None:
        keeps_best = self.hook is None or self.hook.keeps_best
        if val is not None and keeps_best and (state.best is None or val.top1 > state.best["top1"]):
            state.best = {"epoch": epoch, "top1": val.top1, "state": cpu_state(self.model),
                          "hook": self.hook.state() if self.hook is not None else None}

    def _save_checkpoint(self, epochs_done: int, state: _RunState) -> None:
        """The resume state after ``epochs_done`` epochs (rank 0, when there is a checkpoint path)."""
        if self.config.checkpoint is None or self.dist.rank != 0:
            return
        write_checkpoint(
            self.config.checkpoint, options=self.expected, world_size=self.dist.world, epoch=epochs_done,
            step=state.step, model=cpu_state(self.model), **self.stepper.state(),
            history=[dataclasses.asdict(r) for r in state.history], best=state.best,
            hook=self.hook.state() if self.hook is not None else None,
            seconds=state.seconds_before + time.perf_counter() - self.started,
        )

    # --- after the last step

    def _finish(self, state: _RunState, amp: torch.dtype | None) -> FinetuneResult:
        """The best epoch's weights (and hook state) back in the model, in eval mode on its own device."""
        best = state.best
        if best is not None:
            self.model.load_state_dict(best["state"])
            if self.hook is not None and best["hook"] is not None:
                self.hook.load(best["hook"], history=False)
        self.model.eval()
        self.model.to(self.home)
        if self.hook is not None:
            self.hook.refresh()
        last = state.history[-1].epoch if state.history else None
        return FinetuneResult(
            self.config.to_dict(), state.history, best["epoch"] if best else last, best["top1"] if best else None,
            self.schedule.epochs, state.step, state.seconds_before + time.perf_counter() - self.started,
            state.images_seen / state.train_seconds if state.train_seconds > 0 else 0.0, str(self.device),
            str(amp).removeprefix("torch.") if amp is not None else None, self.dist.world,
            state.resumed_from, best is not None and best["epoch"] == 0, self.model,
        )

    def _tell(self, event: dict[str, Any]) -> None:
        if self.say is not None:
            self.say(event)
