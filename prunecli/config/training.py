"""How to train: fine-tuning, and the training stages of soft pruning and EDP."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prunecli.config.common import (
    AMP_MODES,
    AUGMENTS,
    EDP_INITS,
    KD_MODES,
    KD_SCHEDULES,
    OPTIMIZERS,
    DataOptions,
    JsonConfig,
    check,
    choose,
)


@dataclass(frozen=True)
class FinetuneConfig(JsonConfig):
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
        check(checks)



@dataclass(frozen=True)
class EdpOptions(JsonConfig):
    """``prune --method edp``: its training stage and its regulariser (see ``prunecli.methods.edp``)."""

    training: FinetuneConfig
    lam: float = 1e-4
    threshold: float = 5e-3
    init: str = "svd"
    val: DataOptions | None = None

    def __post_init__(self):
        check([
            (self.lam < 0, f"--edp-lambda {self.lam} must not be negative"),
            (self.threshold < 0, f"--edp-threshold {self.threshold} must not be negative"),
            (self.init not in EDP_INITS, choose("--edp-init", self.init, EDP_INITS)),
        ])



@dataclass(frozen=True)
class SoftOptions(JsonConfig):
    """Soft pruning (LRMF/FPGM): train with the selected channels held at zero, re-selecting every few epochs."""

    training: FinetuneConfig
    reselect_every: int = 5  # epochs between selections; 0 keeps the first

    def __post_init__(self):
        check([(self.reselect_every < 0, f"--reselect-every {self.reselect_every} must not be negative")])


