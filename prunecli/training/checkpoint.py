"""The resume checkpoint: what must match for a run to be resumed (its fingerprint), reading and checking
one, and writing one atomically after each epoch.

Because every random stream is re-derived from ``(seed, epoch, rank)`` and the learning rate and temperature
are functions of the step, a checkpoint holds only the weights, the optimizer (and AMP scaler) state, the step
counter, the history, the best model so far and the hook's state. It is read with ``weights_only``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prunecli.config import FinetuneConfig
from prunecli.errors import CheckpointError, ExportError
from prunecli.io.data import ImageSet
from prunecli.io.files import atomic_output, check_output_path, write_through_memory

CHECKPOINT_FORMAT = "prunecli-finetune-checkpoint"
CHECKPOINT_VERSION = 1
# options that may differ between a run and its resumption without changing the result
RESUME_FREE = ("checkpoint", "resume", "force", "device", "eval_batch_size")


def fingerprint(config: FinetuneConfig, train: ImageSet, val: ImageSet | None, teacher: nn.Module | None) -> dict:
    """What must match between a run and its resumption for the result to be the same."""
    options = {k: v for k, v in config.to_dict().items() if k not in RESUME_FREE}
    options["train_images"] = len(train)
    options["val_images"] = len(val) if val is not None else 0
    options["teacher"] = teacher is not None
    return options


def cpu_state(model: nn.Module) -> dict[str, Tensor]:
    """A copy of ``model``'s state dict on the CPU, which later training does not change."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def prepare_checkpoint(config: FinetuneConfig, expected: Mapping[str, Any]) -> dict[str, Any] | None:
    """The state to resume from (``config.resume``), else None once ``config.checkpoint`` may be written.

    Raises:
        CheckpointError: resuming from a missing, unreadable or foreign checkpoint, or one of another run.
        ExportError: the checkpoint exists and neither ``resume`` nor ``force`` was given.
    """
    if config.checkpoint is None:
        return None
    path = Path(config.checkpoint)
    if config.resume:
        state = _read_checkpoint(path)
        _check_resumable(path, state, expected)
        return state
    if path.exists() and not config.force:
        raise ExportError(
            f"checkpoint {path} already exists; pass --resume to continue that run or --force to start over"
        )
    check_output_path(path, force=True, option="--checkpoint")
    return None


def write_checkpoint(path: Path, **fields: Any) -> None:
    """The run's state ``fields``, marked with the checkpoint format and version, to ``path`` atomically: an
    interrupted write leaves the previous checkpoint intact."""
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **fields}
    with atomic_output(Path(path), force=True) as tmp:
        write_through_memory(tmp, lambda buffer: torch.save(payload, buffer))


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
