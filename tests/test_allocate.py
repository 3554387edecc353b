"""Allocation on synthetic scores and costs: limits, quantisation, the three allocations, budgets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prunecli.allocate import GroupLimits, _quantise, allocate, lowest_positions, removal_order, rounding_order
from prunecli.errors import BudgetError


def channel_count(weights):
    """A linear cost: sum over groups of weight * kept channels."""
    return lambda keep: float(sum(weights[g] * k for g, k in keep.items()))


# --- GroupLimits.allowed_keeps ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        (GroupLimits(10, max_ratio=0.5), [5, 6, 7, 8, 9, 10]),
        (GroupLimits(10, max_ratio=0.9), list(range(1, 11))),
        (GroupLimits(10, max_ratio=1.0), list(range(1, 11))),  # never down to zero channels
        (GroupLimits(10, max_ratio=0.7), list(range(3, 11))),  # 10 * (1 - 0.7) = 3.0000000000000004 -> 3
        (GroupLimits(10, max_ratio=0.0), [10]),
        (GroupLimits(16, round_to=4), [4, 8, 12, 16]),
        (GroupLimits(16, blocks=4, max_ratio=0.5), [8, 12, 16]),
        (GroupLimits(24, blocks=2, round_to=3), [6, 12, 18, 24]),  # step lcm(2, 3) = 6
        (GroupLimits(10, round_to=8, max_ratio=0.5), [8, 10]),  # keeping all is always allowed
        (GroupLimits(16, round_to=32), [16]),
        (GroupLimits(16, prunable=False), [16]),
        # --round-to auto on a 16-channel block: under one block, only counts up to half of it (a 12-channel conv
        # runs no faster than a 16-channel one under onnxruntime)
        (GroupLimits(16, round_to=16, narrow_step=4), [4, 8, 16]),
        (GroupLimits(32, round_to=16, narrow_step=8), [8, 16, 32]),
        (GroupLimits(48, round_to=16, narrow_step=8), [8, 16, 32, 48]),
        (GroupLimits(24, round_to=16, narrow_step=4, max_ratio=0.5), [16, 24]),  # 12 would be over half a block
        (GroupLimits(8, round_to=16, narrow_step=2), [2, 4, 6, 8]),
    ],
)
def test_allowed_keeps(limits, expected):
    assert limits.allowed_keeps().tolist() == expected


# --- _quantise -------------------------------------------------------------------------------------------


def test_quantise_nearest_with_ties_up():
    allowed = np.array([4, 8, 12, 16])
    assert _quantise(5.9, allowed) == 4
    assert _quantise(6.0, allowed) == 8  # tie -> the larger
    assert _quantise(6.1, allowed) == 8
    assert _quantise(-3.0, allowed) == 4
    assert _quantise(0.0, allowed) == 4
    assert _quantise(16.0, allowed) == 16
    assert _quantise(99.0, allowed) == 16
    assert _quantise(12.0, allowed) == 12


@pytest.mark.parametrize(
    "allowed", [[1, 2, 3, 4, 5], [4, 8, 12, 16], [3, 4, 7, 10], [8, 10], [16]], ids=str
)
def test_quantise_is_monotone_and_lands_on_allowed(allowed):
    allowed = np.array(allowed)
    values = [_quantise(d, allowed) for d in np.linspace(-2, allowed[-1] + 2, 997)]
    assert all(v in allowed for v in values)
    assert values == sorted(values)
    assert values[0] == allowed[0] and values[-1] == allowed[-1]


# --- lowest_positions ------------------------------------------------------------------------------------


def test_lowest_positions_without_blocks():
    scores = torch.tensor([0.5, 0.1, 0.9, 0.1, 0.3])
    assert lowest_positions(scores, 0, 1) == ()
    assert lowest_positions(scores, 2, 1) == (1, 3)  # the tie keeps index order
    assert lowest_positions(scores, 3, 1) == (1, 3, 4)


def test_lowest_positions_with_blocks_removes_the_same_positions_per_block():
    # block 0: [5, 1, 7, 3], block 1: [1, 9, 2, 4] -> position means 3, 5, 4.5, 3.5 -> order 0, 3, 2, 1
    scores = torch.tensor([5.0, 1.0, 7.0, 3.0, 1.0, 9.0, 2.0, 4.0])
    assert lowest_positions(scores, 2, 2) == (0, 4)
    assert lowest_positions(scores, 4, 2) == (0, 3, 4, 7)
    assert lowest_positions(scores, 6, 2) == (0, 2, 3, 4, 6, 7)
    # channel 1 alone is the lowest, but its partner in block 1 (9) outweighs it
    assert 1 not in lowest_positions(scores, 4, 2)


def test_lowest_positions_four_blocks():
    scores = torch.arange(16, dtype=torch.float32).flip(0)  # position p of every block: means fall with p
    assert lowest_positions(scores, 4, 4) == (3, 7, 11, 15)


def test_the_best_channel_of_each_part_goes_last():
    # positions 0-1 are one concat branch, 2-5 the other: the 4 lowest would empty the first branch
    scores = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    parts = ((0, 1), (2, 3, 4, 5))
    assert removal_order(scores, 1, parts) == [0, 2, 3, 4, 1, 5]
    assert lowest_positions(scores, 4, 1) == (0, 1, 2, 3)
    assert lowest_positions(scores, 4, 1, parts) == (0, 2, 3, 4)
    assert GroupLimits(6, parts=parts).allowed_keeps().tolist() == [2, 3, 4, 5, 6]  # one channel per part stays


# --- uniform ---------------------------------------------------------------------------------------------


def three_groups():
    gen = torch.Generator().manual_seed(1)
    channels = {0: 16, 1: 32, 2: 64}
    scores = {g: torch.rand(c, generator=gen) for g, c in channels.items()}
    limits = {g: GroupLimits(c) for g, c in channels.items()}
    return channels, scores, limits


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.77])
def test_uniform_reaches_a_linear_target_within_one_channel_step(fraction):
    channels, scores, limits = three_groups()
    weights = {0: 3.0, 1: 1.0, 2: 0.5}
    cost = channel_count(weights)
    full = cost(channels)
    target = fraction * full
    plan = allocate(scores, limits, cost, target, "uniform")
    assert plan.cost == cost(plan.keep)
    assert abs(plan.cost - target) <= max(weights.values())  # one channel of the dearest group
    # the same ratio everywhere, up to rounding to whole channels
    for g, c in channels.items():
        assert abs(plan.keep[g] / c - (1 - plan.knob)) <= 0.5 / c + 1e-9
    # removed: exactly the lowest scores
    for g, c in channels.items():
        removed = plan.removed.get(g, ())
        assert len(removed) == c - plan.keep[g]
        kept = sorted(set(range(c)) - set(removed))
        assert scores[g][list(removed)].max() <= scores[g][kept].min()


def test_a_coarse_multiple_rounds_residual_streams_up_and_narrows_single_layer_groups_first():
    """Uniform at a ratio no multiple of 16 can hold: the stream four blocks write (group 0) keeps the multiple at or
    above the ratio's width, and the plan reaches the target by narrowing the groups one conv writes."""
    channels = {0: 32, 1: 32, 2: 32, 3: 32}
    limits = {g: GroupLimits(c, round_to=16, narrow_step=8, writers=4 if g == 0 else 1) for g, c in channels.items()}
    assert rounding_order(limits, [3, 0, 2, 1]) == [1, 2, 3, 0]
    scores = {g: torch.arange(c, dtype=torch.float32) for g, c in channels.items()}
    cost = channel_count(dict.fromkeys(channels, 1.0))
    plan = allocate(scores, limits, cost, 0.7 * 128, "uniform")  # 22.4 channels a group
    assert plan.keep == {0: 32, 1: 8, 2: 16, 3: 32}  # 88 channels, the nearest to 89.6 on the grid
    assert plan.cost == 88 and plan.removed[1] == tuple(range(24))


def test_uniform_respects_blocks_and_round_to():
    channels = {0: 16, 1: 24}
    scores = {g: torch.rand(c) for g, c in channels.items()}
    limits = {0: GroupLimits(16, blocks=4), 1: GroupLimits(24, round_to=8)}
    plan = allocate(scores, limits, channel_count({0: 1, 1: 1}), 20, "uniform")
    assert plan.keep[0] % 4 == 0 and plan.keep[1] % 8 == 0
    removed = plan.removed[0]
    offsets = [sorted(p % 4 for p in removed if p // 4 == b) for b in range(4)]
    assert all(o == offsets[0] for o in offsets)


def test_unscored_and_unprunable_groups_keep_everything():
    scores = {0: torch.rand(16), 1: torch.rand(16)}
    limits = {0: GroupLimits(16), 1: GroupLimits(16, prunable=False), 2: GroupLimits(8)}
    seen = []

    def cost(keep):
        seen.append(dict(keep))
        return float(sum(keep.values()))

    plan = allocate(scores, limits, cost, 30, "uniform")
    assert set(plan.keep) == {0}
    assert plan.keep[0] == 6 and plan.cost == 30
    assert all(k[1] == 16 and k[2] == 8 for k in seen)  # cost sees every group, the others whole
    assert set(plan.removed) == {0}


# --- global ----------------------------------------------------------------------------------------------


def test_global_removes_the_globally_lowest_scores_first():
    scores = {
        0: torch.tensor([0.1, 0.5, 0.9, 1.3]),
        1: torch.tensor([0.2, 0.3, 1.0, 1.5, 2.0, 0.05]),
    }
    limits = {0: GroupLimits(4), 1: GroupLimits(6)}
    cost = channel_count({0: 1, 1: 1})
    # remove 3: the three lowest overall are 0.05 (g1 #5), 0.1 (g0 #0), 0.2 (g1 #0)
    plan = allocate(scores, limits, cost, 7, "global")
    assert plan.keep == {0: 3, 1: 4}
    assert plan.removed == {0: (0,), 1: (0, 5)}
    assert 0.2 < plan.knob <= 0.3
    # remove 5: then 0.3 (g1 #1) and 0.5 (g0 #1)
    plan = allocate(scores, limits, cost, 5, "global")
    assert plan.keep == {0: 2, 1: 3}
    assert plan.removed == {0: (0, 1), 1: (0, 1, 5)}


def test_global_respects_max_ratio():
    scores = {0: torch.tensor([0.01, 0.02, 0.03, 0.04]), 1: torch.tensor([1.0, 2.0, 3.0, 4.0])}
    limits = {0: GroupLimits(4, max_ratio=0.5), 1: GroupLimits(4, max_ratio=0.5)}
    plan = allocate(scores, limits, channel_count({0: 1, 1: 1}), 5, "global")
    # group 0 alone holds the 3 lowest scores but may lose only 2; the third comes from group 1
    assert plan.keep == {0: 2, 1: 3}
    assert plan.removed == {0: (0, 1), 1: (0,)}


# --- dispersion ------------------------------------------------------------------------------------------


def test_dispersion_prunes_low_dispersion_groups_more():
    channels = {0: 20, 1: 20, 2: 20}
    scores = {g: torch.rand(c) for g, c in channels.items()}
    limits = {g: GroupLimits(c) for g, c in channels.items()}
    dispersion = {0: 1.0, 1: 0.5, 2: 0.1}  # ratios s*0, s*0.5, s*0.9
    plan = allocate(scores, limits, channel_count({0: 1, 1: 1, 2: 1}), 45, "dispersion", dispersion)
    assert plan.keep[0] == 20  # the most dispersed group is never pruned
    assert plan.keep[2] < plan.keep[1] < 20
    assert sum(plan.keep.values()) == 45
    # hand check: 15 removed = 20 * s * (0.5 + 0.9) -> s = 15 / 28; g1 loses 20 * 0.5 * s = 5.36 -> 5
    assert (plan.keep[1], plan.keep[2]) == (15, 10)


def test_dispersion_needs_values():
    scores = {0: torch.rand(8)}
    with pytest.raises(BudgetError, match="dispersion"):
        allocate(scores, {0: GroupLimits(8)}, channel_count({0: 1}), 4, "dispersion")


def test_a_coarse_group_is_made_up_by_the_fine_ones():
    """Group 0 has 3 channels of 10 each, groups 1 and 2 have 100 channels of 1. Uniform ratios give 120 (0 keeps 2)
    or 110 (0 keeps 1) around the target 115; nudging the fine groups, each at most 4 of its 91 widths away from the
    knob's (NUDGE_REACH), reaches 115."""
    scores = {0: torch.rand(3), 1: torch.rand(100), 2: torch.rand(100)}
    limits = {g: GroupLimits(len(s)) for g, s in scores.items()}
    plan = allocate(scores, limits, channel_count({0: 10, 1: 1, 2: 1}), 115, "uniform")
    assert plan.cost == 115
    assert plan.keep[0] in (1, 2) and abs(plan.keep[1] - plan.keep[2]) <= 1  # the fine groups stay near one ratio


def test_a_nudge_stays_near_the_knob():
    """The same groups with 100 per coarse channel: 300 or 200 around 250, too far for the fine groups' reach; the
    plan moves each of them by at most 4 widths and stays the closest it can."""
    scores = {0: torch.rand(3), 1: torch.rand(100), 2: torch.rand(100)}
    limits = {g: GroupLimits(len(s)) for g, s in scores.items()}
    plan = allocate(scores, limits, channel_count({0: 100, 1: 1, 2: 1}), 250, "uniform")
    assert plan.keep in ({0: 2, 1: 46, 2: 46}, {0: 1, 1: 54, 2: 54})
    assert plan.cost in (292, 208)


# --- errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_unreachable_budget_names_the_knobs(allocation):
    scores = {0: torch.rand(10), 1: torch.rand(10)}
    limits = {0: GroupLimits(10, max_ratio=0.5), 1: GroupLimits(10, max_ratio=0.5)}
    with pytest.raises(BudgetError, match="--max-layer-ratio") as info:
        allocate(scores, limits, channel_count({0: 1, 1: 1}), 9, allocation)
    assert "10" in str(info.value) and info.value.least == 10  # what is reachable: 5 + 5


def test_unknown_allocation():
    with pytest.raises(BudgetError, match="uniform, global, efficiency, dispersion"):
        allocate({0: torch.rand(4)}, {0: GroupLimits(4)}, channel_count({0: 1}), 2, "greedy")


def test_target_above_the_original_cost_prunes_nothing():
    scores = {0: torch.rand(8)}
    plan = allocate(scores, {0: GroupLimits(8)}, channel_count({0: 1}), 100, "uniform")
    assert plan.keep == {0: 8} and dict(plan.removed) == {}
