"""Scores + budget -> which channels of each group to remove. Pure: tensors and dataclasses in and out.

Every allocation is a one-parameter family of plans, monotone in its knob (a uniform ratio, a global
score threshold, a dispersion scale). Bisection on the knob over the analytic cost model finds the
plan whose cost is closest to the target; the model itself is never run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from prunecli.errors import BudgetError
from prunecli.humanize import human

ALLOCATIONS = ("uniform", "global", "efficiency", "dispersion", "sensitivity")


@dataclass(frozen=True)
class GroupLimits:
    """What the allocator may do to one group."""

    channels: int
    blocks: int = 1
    prunable: bool = True
    max_ratio: float = 0.9
    round_to: int = 1
    parts: tuple[tuple[int, ...], ...] = ()  # positions held by one layer each (ChannelGroup.parts): one stays
    narrow_step: int = 0  # kept counts up to half a ``round_to`` also allowed at multiples of this (0: none)
    writers: int = 1  # non-depthwise convs and linears writing its channels (a residual stream: several); rounding_order

    def allowed_keeps(self) -> np.ndarray:
        """Kept counts this group may end with, ascending."""
        if not self.prunable:
            return np.array([self.channels])
        step = math.lcm(self.blocks, self.round_to)
        finer = math.lcm(self.blocks, self.narrow_step or step)
        floor = max(math.ceil(self.channels * (1 - self.max_ratio) - 1e-9), len(self.parts))
        counts = sorted({*range(finer, min(step // 2, self.channels - 1) + 1, finer), *range(step, self.channels, step)})
        return np.array([k for k in counts if k >= floor] + [self.channels])


@dataclass(frozen=True)
class Plan:
    """The outcome: per group index, the channel positions to remove, and the predicted cost."""

    removed: Mapping[int, tuple[int, ...]]
    keep: Mapping[int, int]
    cost: float
    knob: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "removed": {int(g): [int(p) for p in v] for g, v in self.removed.items()},
            "keep": {int(g): int(k) for g, k in self.keep.items()},
            "cost": float(self.cost),
            "knob": float(self.knob),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        return cls(
            {int(g): tuple(int(p) for p in v) for g, v in data["removed"].items()},
            {int(g): int(k) for g, k in data["keep"].items()},
            float(data["cost"]),
            float(data["knob"]),
        )


def _quantise(desired: float, allowed: np.ndarray, up: bool = False) -> int:
    """Nearest allowed keep count (ties to the larger, so the mapping is monotone); with ``up``, the nearest at or
    above ``desired``."""
    position = int(np.searchsorted(allowed, desired))
    if up:
        return int(allowed[min(position, len(allowed) - 1)])
    if position == 0:
        return int(allowed[0])
    if position >= len(allowed):
        return int(allowed[-1])
    low, high = allowed[position - 1], allowed[position]
    return int(low if desired - low < high - desired else high)


def removal_order(scores: Tensor, blocks: int, parts: tuple[tuple[int, ...], ...] = ()) -> list[int]:
    """Every channel position in the order plans remove them, lowest score first; with blocks, a position
    goes from every block at once (by its mean score over the blocks). The best channel of each of ``parts``
    goes last, so a plan that keeps ``len(parts)`` channels or more leaves every part one."""
    per_block = scores.numel() // blocks
    pooled = scores.double().reshape(blocks, per_block).mean(0)
    order = torch.argsort(pooled, stable=True).tolist()
    rank = {p: i for i, p in enumerate(order)}
    best = sorted({max((p % per_block for p in part), key=rank.__getitem__) for part in parts}, key=rank.__getitem__)
    order = [p for p in order if p not in best] + best
    return [b * per_block + p for p in order for b in range(blocks)]


def lowest_positions(scores: Tensor, remove: int, blocks: int, parts: tuple[tuple[int, ...], ...] = ()) -> tuple[int, ...]:
    """The ``remove`` lowest-scoring channels; with blocks, the same positions from every block; the best of
    each of ``parts`` last."""
    if remove <= 0:
        return ()
    return tuple(sorted(removal_order(scores, blocks, parts)[: remove - remove % blocks]))


def _plan(keep: dict[int, int], scores: Mapping[int, Tensor], limits: Mapping[int, GroupLimits], cost, knob):
    removed = {
        g: lowest_positions(scores[g], limits[g].channels - k, limits[g].blocks, limits[g].parts)
        for g, k in keep.items()
        if k < limits[g].channels
    }
    return Plan(removed, keep, cost, knob)


def allocate(
    scores: Mapping[int, Tensor],
    limits: Mapping[int, GroupLimits],
    cost: Callable[[Mapping[int, int]], float],
    target: float,
    allocation: str = "uniform",
    dispersion: Mapping[int, float] | None = None,
    iterations: int = 60,
    sensitivity: Mapping[int, tuple[np.ndarray, np.ndarray]] | None = None,
) -> Plan:
    """Find the plan whose ``cost`` (a function of kept counts per group) is closest to ``target``.

    Args:
        scores: per group index, one score per channel (higher = keep). Groups without scores keep
            everything.
        limits: per group index, its size and constraints.
        cost: kept counts -> cost (MACs, params, channels); must not increase when channels are removed.
        target: the cost to reach.
        allocation: ``uniform`` (the same ratio everywhere), ``global`` (one threshold on the
            normalised scores across groups), ``efficiency`` (one threshold on each channel's score per unit
            of the cost its removal saves, so the removal goes where it buys the most cost (MACs,
            milliseconds) for the least score) or ``dispersion`` (ratio per group proportional to
            ``1 - dispersion / max dispersion``, SFP's Kernel Dispersion) or ``sensitivity`` (each group at the
            width that minimises its measured damage plus the knob times its cost; ``sensitivity`` holds per group
            the widths measured and the damage at each, ``prunecli.sensitivity``).
    """
    candidates = [g for g in scores if limits[g].prunable and len(limits[g].allowed_keeps()) > 1]
    allowed = {g: limits[g].allowed_keeps() for g in candidates}
    fixed = {g: lim.channels for g, lim in limits.items()}
    damage = None  # per group, the measured damage at each allowed width (sensitivity only)

    if allocation == "uniform":
        def keep_at(r: float) -> dict[int, int]:
            return {g: _quantise(limits[g].channels * (1 - r), allowed[g], up=limits[g].writers > 1) for g in candidates}
        high = max((limits[g].max_ratio for g in candidates), default=0.0)
    elif allocation in ("global", "efficiency"):
        saving = _savings(candidates, allowed, fixed, cost) if allocation == "efficiency" else dict.fromkeys(candidates, 1.0)
        ordered = {g: np.sort(_per_saving(scores[g].double().numpy(), saving[g])) for g in candidates}

        def keep_at(t: float) -> dict[int, int]:
            out = {}
            for g in candidates:
                below = int(np.searchsorted(ordered[g], t, side="left"))
                out[g] = _quantise(limits[g].channels - below, allowed[g])
            return out
        high = float(max((o[-1] for o in ordered.values()), default=0.0)) + 1e-9
    elif allocation == "dispersion":
        if dispersion is None:
            raise BudgetError("dispersion allocation needs per-group kernel dispersion values")
        top = max((dispersion[g] for g in candidates), default=1.0) or 1.0

        def keep_at(s: float) -> dict[int, int]:
            out = {}
            for g in candidates:
                ratio = min(max(s * (1 - dispersion[g] / top), 0.0), limits[g].max_ratio)
                out[g] = _quantise(limits[g].channels * (1 - ratio), allowed[g])
            return out
        high = 1.0 / max(min((1 - dispersion[g] / top for g in candidates if dispersion[g] < top), default=1.0), 1e-6)
    elif allocation == "sensitivity":
        if sensitivity is None:
            raise BudgetError("sensitivity allocation needs each group's measured damage: pass --data")
        tradeoffs = {g: _tradeoff(allowed[g], *sensitivity[g], g, fixed, cost) for g in candidates}
        damage = {g: hurt for g, (hurt, _) in tradeoffs.items()}

        def keep_at(rate: float) -> dict[int, int]:
            return {g: _least_total(allowed[g], hurt, spent, rate) for g, (hurt, spent) in tradeoffs.items()}
        high = max((_steepest(*t) for t in tradeoffs.values()), default=0.0) * (1 + 1e-6) + 1e-12
    else:
        raise BudgetError(f"unknown allocation {allocation!r}; choose one of {', '.join(ALLOCATIONS)}")

    def total(keep: dict[int, int]) -> float:
        return cost({**fixed, **keep})

    low_knob, high_knob = 0.0, high
    if total(keep_at(high_knob)) > target:
        best = total(keep_at(high_knob))
        raise BudgetError(
            f"the budget cannot be reached: pruning as far as allowed still leaves {human(best)} (target {human(target)}); "
            "raise --max-layer-ratio, remove --ignore patterns or ask for less", least=best
        )
    for _ in range(iterations):
        middle = (low_knob + high_knob) / 2
        if total(keep_at(middle)) > target:
            low_knob = middle
        else:
            high_knob = middle
    order = rounding_order(limits, candidates)
    keep = _closest_between(keep_at(low_knob), keep_at(high_knob), allowed, total, target, order)
    if abs(total(keep) - target) > NUDGE_ABOVE * target:
        keep = _nudged(keep, allowed, total, target, order, damage)
    return _plan(keep, scores, limits, total(keep), high_knob)


NUDGE_ABOVE = 1e-3  # a plan further than this share of the target from it is nudged group by group
NUDGE_REACH = 0.05  # how far a nudged group may leave the width the knob gave it: this share of its choices, or one


def rounding_order(limits: Mapping[int, GroupLimits], groups) -> list[int]:
    """The order in which groups are moved when the knob's plan is rounded to the target: the groups fewer layers
    write first, a residual stream (written by every block of its stage) last. Where a coarse channel multiple lets
    many groups switch together (multiples of 16 in 16-64 channel groups), which of them narrow decides the accuracy:
    Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017, found the layers joined by a ResNet's shortcuts the
    most sensitive and pruned only the first conv of each block; on the sample ResNet-20 at half its MACs with
    multiples of 16, narrowing its residual streams first cost 1.7 points of top-1 after ``--reconstruct``. For the
    same reason ``uniform`` rounds a residual stream's width up, not to the nearest allowed count."""
    return sorted(groups, key=lambda g: (limits[g].writers, g))


def _nudged(keep: dict[int, int], allowed: Mapping[int, np.ndarray], total, target: float, order: list[int],
            damage: Mapping[int, np.ndarray] | None = None) -> dict[int, int]:
    """Move one group at a time to its next allowed width, up or down, while that brings the cost nearer the target.

    Where one group's step is coarse (a ViT's embedding width narrows every block at once: 1% of the MACs per channel
    of timm's test_vit), the plan the knob gives can miss by more than the budget's tolerance; the other groups'
    finer steps make up the rest. Each stays within ``NUDGE_REACH`` of its choices (at least one step) of the width
    the knob gave it, so the allocation keeps its character; groups move in ``order``. Given each group's measured
    ``damage`` at its allowed widths (``sensitivity``), a move must add no damage, and the one that removes the most
    goes first: the knob's plan is the least damage for its cost, and on a channel multiple of 16 any narrowing to
    land 0.5 pp nearer the target cost the sample MobileNetV2 1-5 points of top-1 (docs/benchmarks.md)."""
    home = {g: int(np.searchsorted(allowed[g], k)) for g, k in keep.items()}
    reach = {g: max(1, int(NUDGE_REACH * len(allowed[g]))) for g in keep}
    best_gap = abs(total(keep) - target)
    improved = True
    while improved:
        improved = False
        moves = []  # with damage: every move that nears the target without adding damage
        for g in order:
            position = int(np.searchsorted(allowed[g], keep[g]))
            for step in (position - 1, position + 1):
                if 0 <= step < len(allowed[g]) and abs(step - home[g]) <= reach[g]:
                    trial = {**keep, g: int(allowed[g][step])}
                    gap = abs(total(trial) - target)
                    if gap < best_gap * (1 - 1e-9):
                        if damage is None:  # the first move in order is taken at once
                            keep, best_gap, improved = trial, gap, True
                        elif damage[g][step] <= damage[g][position]:
                            moves.append((damage[g][step] - damage[g][position], gap, trial))
        if moves:
            _, best_gap, keep = min(moves, key=lambda m: m[:2])
            improved = True
    return keep


def _savings(candidates, allowed, full: dict[int, int], cost) -> dict[int, float]:
    """Per group, the cost one channel's removal saves on average (full width down to its floor, the rest at full
    width: a long span, steady where the cost is a measured table), relative to the mean over the groups; a group
    whose removal saves nothing gets a tiny saving."""
    base = cost(full)
    per_channel = {g: (base - cost({**full, g: int(allowed[g][0])})) / (full[g] - int(allowed[g][0])) for g in candidates}
    mean = float(np.mean([max(v, 0.0) for v in per_channel.values()])) if per_channel else 0.0
    return {g: max(v / mean, 1e-6) if mean > 0 else 1.0 for g, v in per_channel.items()}


def _tradeoff(allowed: np.ndarray, widths: np.ndarray, damage: np.ndarray, group: int, full: dict[int, int], cost):
    """A group's damage and the model's cost at each of its allowed widths, the other groups at full width; both
    interpolated between the measured widths (a cost that is linear in one group's width, as MACs are, is exact)."""
    spent = np.array([cost({**full, group: int(k)}) for k in widths], dtype=float)
    return np.interp(allowed, widths, damage), np.interp(allowed, widths, spent)


def _least_total(allowed: np.ndarray, damage: np.ndarray, spent: np.ndarray, rate: float) -> int:
    """The width minimising damage + rate * cost (the widest of ties, so the width falls as the rate rises)."""
    total = damage + rate * spent
    return int(allowed[np.flatnonzero(total <= total.min() + 1e-12 * (abs(total.min()) + 1e-30))[-1]])


def _steepest(damage: np.ndarray, spent: np.ndarray) -> float:
    """The rate above which a group's floor is its best width: the most damage per unit of cost saved from any
    width down to the floor."""
    saved = spent - spent[0]
    return float(np.max(np.where(saved > 0, (damage[0] - damage) / np.where(saved > 0, saved, 1.0), 0.0)))


def _per_saving(scores: np.ndarray, saving: float) -> np.ndarray:
    """Scores per unit of saving, monotone in the score (a negative score is scaled the other way)."""
    return np.where(scores >= 0, scores / saving, scores * saving)


def _closest_between(above: dict[int, int], below: dict[int, int], allowed: Mapping[int, np.ndarray], total,
                     target: float, order: list[int]) -> dict[int, int]:
    """Step from the plan just above the target to the one just below, one group and one allowed width at a time.

    Where quantisation makes many groups switch at the same knob value (equal widths, grouped convs), or one group
    jumps several widths at once (``sensitivity``: its best width moves past widths that never win), the
    intermediate plans are much closer to the target than either end.
    """
    current = dict(above)
    best, best_gap = dict(current), abs(total(current) - target)
    for g in (g for g in order if above[g] != below[g]):
        low, high = sorted((above[g], below[g]))
        between = allowed[g][(allowed[g] >= low) & (allowed[g] <= high) & (allowed[g] != above[g])]
        for width in between[::-1] if below[g] < above[g] else between:  # from above's width to below's, step by step
            current[g] = int(width)
            gap = abs(total(current) - target)
            if gap < best_gap:
                best, best_gap = dict(current), gap
    return best
