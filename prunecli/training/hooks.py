"""The seam training-aware pruning methods plug into: :class:`TrainingHook`, and ``Progress``, the callback
the loop reports its events to."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

Progress = Callable[[dict[str, Any]], None]


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
