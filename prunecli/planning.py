"""Planning: scores plus a budget -> a plan of channels to remove, over a model's channel groups and costs.

Used by ``prune`` and ``score --preview`` (``prunecli.api``) and, every few epochs, by the training-aware methods
(``prunecli.methods.soft``, ``prunecli.methods.edp``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from prunecli.allocate import GroupLimits, Plan, allocate, removal_order
from prunecli.criteria.base import out_weight
from prunecli.criteria.sfp import kernel_dispersion
from prunecli.errors import BudgetError
from prunecli.graph import ChannelGroup, DependencyGraph
from prunecli.latency_model import LatencyModel
from prunecli.layers import CONV_LINEAR, is_depthwise
from prunecli.measure import CostModel, layer_costs
from prunecli.runtime import model_device

if TYPE_CHECKING:
    from prunecli.budget import Budget
    from prunecli.config import PlanOptions, ScoringOptions
    from prunecli.io.data import ImageSet


@dataclass(frozen=True)
class Selection:
    """What a training-aware method plans with, every few epochs: the budget, how it is spent, how channels are
    scored (data criteria on ``calibration`` in batches of ``batch_size``), the seed and the tracing time limit."""

    budget: Budget
    plan: PlanOptions
    scoring: ScoringOptions
    calibration: ImageSet | None = None
    batch_size: int = 64
    seed: int = 0
    timeout: float | None = 120.0

    def trace(self, model: nn.Module, example_input: Tensor) -> tuple[DependencyGraph, CostModel]:
        return trace_for_training(model, example_input, self.plan.ignore, self.timeout)

    def plan_on(self, graph: DependencyGraph, cost_model: CostModel, scores: Mapping[int, torch.Tensor],
                evaluate: Callable[[np.ndarray], tuple[float, float]] | None = None) -> tuple[Plan, float]:
        return plan_pruning(self.budget, self.plan, graph, cost_model, scores, evaluate)


def cost_function(budget_kind: str, evaluate: Callable[[np.ndarray], tuple[float, float]], groups: list[ChannelGroup],
                  latency: Callable[[np.ndarray], float] | None = None):
    """Kept counts per group -> the budgeted cost: MACs, params, predicted milliseconds (``latency``, kept
    counts in ``groups`` order -> ms) or kept channels."""
    order = [g.index for g in groups]

    def vector(keep: Mapping[int, int]) -> np.ndarray:
        return np.array([keep[i] for i in order], dtype=float)

    if budget_kind == "latency":
        if latency is None:
            raise BudgetError("a latency budget needs a latency model (prune measures one for --latency-target)")
        return lambda keep: latency(vector(keep))
    if budget_kind == "macs":
        return lambda keep: evaluate(vector(keep))[0]
    if budget_kind == "params":
        return lambda keep: evaluate(vector(keep))[1]
    return lambda keep: float(sum(keep[g.index] for g in groups if g.prunable))


def group_limits(options: PlanOptions, graph: DependencyGraph) -> dict[int, GroupLimits]:
    """What the allocator may do to each group under ``options``."""
    limits = {}
    for g in graph.groups:
        multiple, narrow_step = options.channel_grid(g.channels)
        limits[g.index] = GroupLimits(g.channels, g.blocks, g.prunable, options.max_layer_ratio, multiple, g.parts,
                                      narrow_step, _writers(graph, g))
    return limits


def _writers(graph: DependencyGraph, group) -> int:
    """The convs and linears that compute a group's channels: one per block adding to a residual stream; depthwise
    convs and norms only carry them on."""
    return sum(isinstance(m := graph.module(name), CONV_LINEAR) and not is_depthwise(m) for name in group.layers("out"))


def plan_pruning(
    budget: Budget,
    options: PlanOptions,
    graph: DependencyGraph,
    cost_model: CostModel,
    scores: Mapping[int, torch.Tensor],
    evaluate: Callable[[np.ndarray], tuple[float, float]] | None = None,
    latency: LatencyModel | None = None,
    target: float | None = None,
    sensitivity: Mapping[int, tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[Plan, float]:
    """Turn scores and the budget into a plan; returns it with the absolute target.

    ``evaluate`` (kept counts per group -> MACs, params) replaces ``cost_model.evaluate``, e.g. with EDP's cost
    after merging. ``latency`` predicts a latency budget's cost from the layers' channel counts; ``target``
    replaces the budget's own (the latency correction loop asks for other predicted costs); ``sensitivity`` is each
    group's measured damage for ``--allocation sensitivity`` (``prunecli.sensitivity.group_sensitivity``)."""
    limits = group_limits(options, graph)
    exact = cost_model
    if evaluate is None:
        orders = {g: removal_order(scores[g], limits[g].blocks, limits[g].parts) for g in scores}  # as plans remove
        exact = cost_model.removing_in_order(orders)
        evaluate = exact.evaluate
    predict = (lambda keep: latency.predict(*exact.dims(keep))) if latency is not None else None
    cost = cost_function(budget.kind, evaluate, graph.groups, predict)
    original = cost({g.index: g.channels for g in graph.groups})
    target = budget.target(original) if target is None else target
    if not any(g.prunable for g in graph.groups):
        raise BudgetError("the model has no prunable channel group; check --ignore (see `prunecli analyze`)")
    dispersion = group_dispersion(graph, scores) if options.allocation == "dispersion" else None
    plan = allocate(scores, limits, cost, target, options.allocation, dispersion, sensitivity=sensitivity)
    return plan, target


def group_dispersion(graph: DependencyGraph, scores: Mapping[int, torch.Tensor]) -> dict[int, float]:
    """SFP's Kernel Dispersion of each scored group: the mean over its conv/linear producers."""
    values = {}
    for group in graph.groups:
        if group.index not in scores:
            continue
        found = []
        for member in group.members:
            module = graph.module(member.layer)
            if member.dim == "out" and isinstance(module, CONV_LINEAR):
                weight = out_weight(module).detach()[torch.as_tensor(member.indices)]
                found.append(float(kernel_dispersion(weight)))
        values[group.index] = sum(found) / len(found) if found else 0.0
    return values


def trace_for_training(model: nn.Module, example_input: Tensor, ignore: tuple[str, ...],
                       timeout: float | None) -> tuple[DependencyGraph, CostModel]:
    """The channel groups and cost model of a model that is about to be trained in place (traced in eval mode)."""
    example_input = example_input.to(model_device(model))
    was_training = model.training
    model.eval()
    graph = DependencyGraph(model, example_input, ignore, timeout)
    cost_model = CostModel(model, layer_costs(model, example_input), graph.groups)
    model.train(was_training)
    return graph, cost_model
