"""Planning the budget and removing channels: traces of the unpruned model, ``--allocation sensitivity``'s
measurements, the plan, and its removal (holding the channels of modules whose forward breaks when narrowed)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from prunecli.allocate import Plan
from prunecli.budget import Budget
from prunecli.config import PlanOptions, RunOptions
from prunecli.errors import first_line
from prunecli.graph import DependencyGraph
from prunecli.graph.architectures import failing_module
from prunecli.io.data import ImageSet
from prunecli.latency_model import LatencyModel
from prunecli.measure import CostModel, LayerCost
from prunecli.planning import group_limits, plan_pruning
from prunecli.runtime import time_limit

Say = Callable[[str], None]
Sensitivity = dict[int, tuple[np.ndarray, np.ndarray]]
MAX_HOLDS = 8  # module types whose channels may be held before a model that still fails is refused
# How far from the budget a plan on the runtime's channel multiple may land before the multiple is halved: a
# multiple that is not the runtime's block costs more time than the MACs it saves (docs/benchmarks.md)
ROUNDING_TOLERANCE = 0.02


@dataclass
class Planner:
    """Plans the budget on fresh traces of the unpruned model: what removal, holding and the latency loop share."""

    model: nn.Module  # the unpruned model; never changed
    example: torch.Tensor
    costs: list[LayerCost]
    budget: Budget
    options: PlanOptions
    timeout: float | None
    scores: dict[int, torch.Tensor]
    sensitivity: Sensitivity | None = None

    def trace(self) -> DependencyGraph:
        return DependencyGraph(copy.deepcopy(self.model), self.example, self.options.ignore, self.timeout)

    def cost_model(self, graph: DependencyGraph) -> CostModel:
        return CostModel(self.model, self.costs, graph.groups)

    def plan(self, graph: DependencyGraph, latency: LatencyModel | None = None, target: float | None = None,
             budget: Budget | None = None) -> tuple[Plan, float]:
        """The plan for the budget (or for ``target`` of ``latency``'s predicted ms, or of another ``budget``'s
        cost) and the absolute target."""
        return plan_pruning(budget or self.budget, self.options, graph, self.cost_model(graph), self.scores,
                            latency=latency, target=target, sensitivity=self.sensitivity)


def plan_rounded(planner: Planner, graph: DependencyGraph) -> tuple[Plan, float, int | None]:
    """The plan for the budget. With ``--round-to auto``, a channel multiple so coarse that the plan misses the
    budget by more than ``ROUNDING_TOLERANCE`` of the target is halved until it does not, down to 1;
    ``planner.options`` keeps the multiple used. Returns the plan, the target and the multiple given up, if any."""
    plan, target = planner.plan(graph)
    coarser = None
    while (planner.options.narrow_groups and planner.options.round_to > 1
           and abs(plan.cost - target) > ROUNDING_TOLERANCE * target):
        coarser = coarser or planner.options.round_to
        planner.options = dataclasses.replace(planner.options, round_to=planner.options.round_to // 2)
        plan, target = planner.plan(graph)
    return plan, target, coarser


def measure_sensitivity(options: PlanOptions, graph: DependencyGraph, scores: dict[int, torch.Tensor],
                        images: ImageSet, batch_size: int, run: RunOptions, say: Say, step_progress) -> Sensitivity:
    """``--allocation sensitivity``: each group's damage to the output at a few widths, on the calibration images."""
    from prunecli.sensitivity import group_sensitivity

    say(f"measuring each group's sensitivity on {len(images)} images on {run.device}")
    with time_limit(run.score_timeout, "measuring group sensitivity",
                    "raise --score-timeout, or give fewer --calib-images"):
        return group_sensitivity(graph, scores, group_limits(options, graph), images.images.split(batch_size),
                                 torch.device(run.device), progress=step_progress)


def sensitivity_record(graph: DependencyGraph, sensitivity: Sensitivity, plan: Plan) -> dict[str, dict]:
    """Per group (by its root layer): the widths measured, the relative output error at each, the width kept and the
    error there (interpolated between the measured widths, as the allocation does)."""
    from prunecli.sensitivity import damage_at

    record = {}
    for g in graph.groups:
        if g.index in sensitivity:
            widths, damage = sensitivity[g.index]
            kept = int(plan.keep.get(g.index, g.channels))
            record[g.root] = {"channels": g.channels, "widths": [int(k) for k in widths],
                              "damage": [float(d) for d in damage], "kept": kept,
                              "damage_kept": damage_at(sensitivity[g.index], kept)}
    return record


@dataclass
class Removed:
    """A plan applied: the pruned model is ``graph.model``; ``kept`` names the output channels each layer kept."""

    graph: DependencyGraph
    plan: Plan
    target: float
    kept: dict[str, list[int]]


def remove(graph: DependencyGraph, plan: Plan, target: float) -> Removed:
    """Physically remove the planned channels from ``graph.model``."""
    kept = graph.kept_outputs(plan.removed)
    graph.prune(plan.removed)
    return Removed(graph, plan, target, kept)


def remove_until_it_runs(planner: Planner, removed: Removed, say: Say) -> Removed:
    """When the pruned model no longer runs, a module's forward reads a width its layers do not hold (timm's
    attention keeps ``head_dim``): hold the channels of every module of that type, plan again and remove again
    from a fresh copy, until the model runs. Models that run at once pay nothing."""
    held: list[type] = []
    while (failure := failing_module(removed.graph.model, planner.example)) is not None:
        module, exc = failure
        if module is removed.graph.model or type(module) in held or len(held) == MAX_HOLDS:
            break  # nothing narrower to hold; the output check after pruning refuses the model
        held.append(type(module))
        say(f"the pruned model fails in its {type(module).__name__} layers; keeping their channels and planning again")
        graph = planner.trace()
        graph.hold(held, f"a {'/'.join(t.__name__ for t in held)} layer's forward reads this width from elsewhere "
                         f"({type(exc).__name__}: {first_line(exc, 80)})")
        plan, target, _ = plan_rounded(planner, graph)
        removed = remove(graph, plan, target)
    return removed
