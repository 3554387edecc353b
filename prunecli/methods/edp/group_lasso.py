"""EDP's training stage, as a hook of the fine-tuning loop: the proximal group-lasso step on the coefficients and
the decay of the selected groups towards exactly zero."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from prunecli.allocate import Plan
from prunecli.layers import DecomposedConv, decomposed_layers
from prunecli.methods.edp.blocks import GroupSlice, channel_norms, group_slices, scale_channels

if TYPE_CHECKING:
    from prunecli.graph import DependencyGraph


@torch.no_grad()
def proximal_group_lasso(blocks: Mapping[str, DecomposedConv], step: float) -> None:
    """Hinge's proximal operator on every row and column of every ``A``: ``a <- a max(0, 1 - step / ||a||)``."""
    if step <= 0:
        return
    for block in blocks.values():
        a = block.coeff.weight[:, :, 0, 0]
        a.mul_((1 - step / a.norm(dim=1, keepdim=True).clamp_min(1e-30)).clamp_min(0))
        a.mul_((1 - step / a.norm(dim=0, keepdim=True).clamp_min(1e-30)).clamp_min(0))


def zero_coefficient_groups(blocks: Mapping[str, DecomposedConv]) -> int:
    """How many rows and columns of all coefficient matrices are exactly zero (the sparsity reached so far)."""
    count = 0
    for block in blocks.values():
        a = block.coeff.weight.detach()[:, :, 0, 0]
        count += int((a.norm(dim=1) == 0).sum()) + int((a.norm(dim=0) == 0).sum())
    return count


class EdpTraining:
    """The training side of EDP, as a hook of the fine-tuning loop (``prunecli.training.TrainingHook``).

    ``select`` returns the plan that meets the budget from the current coefficient norms. A selected channel
    keeps its radius (its group norm when first selected) and the step it was selected at, so re-selecting it
    continues its decay; a channel no longer selected is released and regrows from where it is.
    """

    keeps_best = False  # only the last step has the selected groups exactly at zero

    def __init__(self, graph: DependencyGraph, select: Callable[[], tuple[Plan, float]], lam: float):
        self.graph, self.select, self.lam = graph, select, lam
        self.blocks = decomposed_layers(graph.model)
        self.by_index = {g.index: g for g in graph.groups}
        self.plan: Plan | None = None
        self.target = math.nan
        self.radius: dict[int, dict[int, tuple[float, int]]] = {}  # group -> channel -> (radius, step selected)
        self.selections: list[dict[str, Any]] = []
        self.step = 0
        self._slices: dict[int, list[GroupSlice]] = {}

    def refresh(self) -> None:
        self.blocks = decomposed_layers(self.graph.model)
        self._slices = {g: group_slices(self.graph, self.by_index[g]) for g in self.radius}

    def _choose(self, epoch: int) -> dict[str, Any]:
        plan, self.target = self.select()
        self._slices = {g: group_slices(self.graph, self.by_index[g]) for g in plan.removed}
        radius = {}
        for g, positions in plan.removed.items():
            norms, current = channel_norms(self._slices[g], self.by_index[g].channels), self.radius.get(g, {})
            radius[g] = {p: current.get(p, (float(norms[p]), self.step)) for p in positions}
        self.plan, self.radius = plan, radius
        entry = {"epoch": epoch, "removed": sum(len(v) for v in plan.removed.values()),
                 "zero_coefficient_groups": zero_coefficient_groups(self.blocks), "estimated_cost": plan.cost}
        self.selections.append(entry)
        return {"event": "select", **entry}

    def begin(self) -> dict[str, Any]:
        return self._choose(0)

    def after_backward(self) -> None:
        pass

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int, lr: float) -> None:
        self.step = step
        proximal_group_lasso(self.blocks, lr * self.lam)
        for g, chosen in self.radius.items():
            group = self.by_index[g]
            factors = torch.ones(group.channels, dtype=torch.float64)
            norms = channel_norms(self._slices[g], group.channels)
            for p, (start, since) in chosen.items():
                left = max(0.0, (total_steps - step) / max(1, total_steps - since))
                factors[p] = min(1.0, start * left / float(norms[p])) if norms[p] > 0 else 0.0
            scale_channels(self._slices[g], factors)

    def end_epoch(self, epochs_done: int, epochs: int) -> dict[str, Any] | None:
        return self._choose(epochs_done) if epochs_done < epochs else None

    def state(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict(), "target": float(self.target), "step": self.step,
                "radius": [[g, p, r, s] for g, chosen in self.radius.items() for p, (r, s) in chosen.items()],
                "selections": [dict(s) for s in self.selections]}

    def load(self, state: Mapping[str, Any], history: bool = True) -> None:
        self.plan, self.target, self.step = Plan.from_dict(state["plan"]), float(state["target"]), int(state["step"])
        self.radius = {}
        for g, p, r, s in state["radius"]:
            self.radius.setdefault(int(g), {})[int(p)] = (float(r), int(s))
        if history:
            self.selections = [dict(s) for s in state["selections"]]
        self.refresh()
