"""Soft (training-aware) pruning, as in LRMF and FPGM, with any registered criterion.

The selected channels are zeroed and held at zero while the model trains at full size, and re-selected every few
epochs; the fine-tuning loop (``prunecli.training``) runs it through its :class:`~prunecli.training.TrainingHook`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from prunecli.allocate import Plan
from prunecli.criteria import get_criterion, score_channels
from prunecli.errors import PrunecliError
from prunecli.graph import DependencyGraph
from prunecli.io.data import ImageSet
from prunecli.layers import NORMS, channel_params
from prunecli.planning import Selection
from prunecli.runtime import model_device, world_size
from prunecli.training import FinetuneResult, Progress, finetune

if TYPE_CHECKING:
    from prunecli.config import SoftOptions


class _SoftMask:
    """Zeroes the selected channels of every out-member of their groups and keeps them zero.

    The parameters ``prunecli.layers.channel_params`` names are zeroed: conv/linear weights and biases and the
    norm layers' weight and bias (LRMF's code zeroes only the conv weights; with the norm zeroed too, a masked
    channel outputs exactly 0, so validation during soft training already measures the physically pruned model).
    A channel that a later selection releases gets its norm reset to weight 1, bias 0, from which its filter
    regrows.
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

    @torch.no_grad()
    def set(self, removed: Mapping[int, Iterable[int]]) -> int:
        """Mask ``removed`` ({group index: root positions}) instead of the previous selection; returns how
        many channels changed state."""
        new = {int(g): tuple(sorted(int(p) for p in v)) for g, v in removed.items() if len(tuple(v))}
        released = {g: set(old) - set(new.get(g, ())) for g, old in self.removed.items()}
        changed = sum(len(v) for v in released.values())
        changed += sum(len(set(v) - set(self.removed.get(g, ()))) for g, v in new.items())
        for module, channels in self._targets(released):
            if isinstance(module, NORMS):
                index = torch.as_tensor(channels)
                for name, fill in (("weight", 1.0), ("bias", 0.0)):
                    param = getattr(module, name, None)
                    if isinstance(param, nn.Parameter):
                        param.index_fill_(0, index.to(param.device), fill)
                if getattr(module, "running_mean", None) is not None:
                    module.running_mean.index_fill_(0, index.to(module.running_mean.device), 0.0)
                    module.running_var.index_fill_(0, index.to(module.running_var.device), 1.0)
        self._entries = []
        for module, channels in self._targets(new):
            for param, dim in channel_params(module, "out"):
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
        return {"plan": self.plan.to_dict(), "target": float(self.target),
                "selections": [dict(s) for s in self.selections]}

    def load(self, state: Mapping[str, Any], history: bool = True) -> None:
        """Restore the plan and mask of ``state``; with ``history``, also the list of selections made."""
        self.plan = Plan.from_dict(state["plan"])
        self.target = float(state["target"])
        if history:
            self.selections = [dict(s) for s in state["selections"]]
        self.mask.removed = {}
        self.mask.set(self.plan.removed)


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
            "plan": self.plan.to_dict(),
            "target": self.target,
            "selections": [dict(s) for s in self.selections],
            "finetune": self.finetune.to_dict(),
        }


def soft_prune(
    model: nn.Module,
    example_input: Tensor,
    train: ImageSet,
    val: ImageSet | None,
    soft: SoftOptions,
    selection: Selection,
    *,
    teacher: nn.Module | None = None,
    progress: Progress | None = None,
) -> SoftPruneResult:
    """Training-aware (soft) pruning, as in LRMF/FPGM, with any registered criterion.

    Before the first epoch the channels are scored with ``selection.scoring`` and a plan for ``selection.budget``
    is made (``plan_pruning``: same allocation, limits and rounding as ``prune``); the planned channels are zeroed
    and held at zero (gradients masked after backward, weights re-zeroed after each optimizer step). After every
    ``soft.reselect_every`` epochs, except the last, the model is scored and planned again and the mask replaced.
    Data criteria score ``selection.calibration`` (prune's calibration images, a seeded subset of ``train``).

    Deviations from LRMF's code: BatchNorm weight and bias of masked channels are zeroed too (see
    :class:`_SoftMask`), no selection follows the last epoch (the returned weights are trained under their
    mask), and the returned plan is the one in force for the best epoch.

    Args:
        model: trained in place at full size; call :meth:`SoftPruneResult.remove_channels` to shrink it.
        example_input: a batch the model accepts, to trace its channel groups.
        soft: the training (``soft.training.epochs`` or ``steps`` is the soft-training length) and the epochs
            between selections (LRMF: 5; 0 keeps the first selection).
    """
    scoring = selection.scoring
    if get_criterion(scoring.method).needs_labels and world_size() > 1:
        raise PrunecliError(
            f"--method {scoring.method} scores with gradients, which would clash with DDP's gradient hooks; "
            "soft-prune with it in a single process, or use a weight or activation criterion"
        )
    graph, cost_model = selection.trace(model, example_input)

    def select() -> tuple[Plan, float]:
        scores = score_channels(scoring, selection.seed, graph, selection.calibration, selection.batch_size,
                                model_device(graph.model))
        return selection.plan_on(graph, cost_model, scores)

    hook = _SoftPruning(graph, select, soft.reselect_every)
    result = finetune(model, train, val, soft.training, teacher=teacher, progress=progress, hook=hook)
    return SoftPruneResult(hook.plan, hook.target, hook.selections, result, graph)
