"""Fine-tuning and evaluation: a plain PyTorch training loop, distillation, BN recalibration, AMP, DDP and
resumable checkpoints. Training-aware pruning methods (``prunecli.methods``) plug into the loop through
:class:`TrainingHook`.

Everything here is library code: functions take models, :class:`~prunecli.io.data.ImageSet` data and frozen
configs, and return dataclasses. Progress goes to an optional callback ``progress(dict)`` (rank 0 only), so the
caller decides how to show it (``prunecli.report.events.messages_to`` turns the events into lines of text).

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

Modules: ``loop`` (``finetune`` and the trainer), ``schedules`` (loss, temperature, learning rate,
augmentation, seeds), ``evaluate``, ``batchnorm`` (``recalibrate_bn``), ``distributed`` (DDP and AMP),
``checkpoint`` (the resume state), ``results`` and ``hooks``.
"""

from prunecli.training.batchnorm import recalibrate_bn
from prunecli.training.evaluate import EvalResult, evaluate
from prunecli.training.hooks import Progress, TrainingHook
from prunecli.training.loop import finetune
from prunecli.training.results import EpochRecord, FinetuneResult
from prunecli.training.schedules import augment_batch, augment_padding, kd_loss, learning_rate, temperature

__all__ = [
    "EpochRecord",
    "EvalResult",
    "FinetuneResult",
    "Progress",
    "TrainingHook",
    "augment_batch",
    "augment_padding",
    "evaluate",
    "finetune",
    "kd_loss",
    "learning_rate",
    "recalibrate_bn",
    "temperature",
]
