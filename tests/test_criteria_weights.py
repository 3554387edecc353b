"""Weight criteria against hand-computed values, the group reduction of coupled layers, and the registry."""

from __future__ import annotations

import math
import sys

import models as M
import pytest
import torch
from torch import nn

import prunecli.criteria as registry
from prunecli.criteria import get_criterion, list_criteria, register_criterion
from prunecli.criteria.base import Criterion, normalise, score_weights
from prunecli.errors import PrunecliError
from prunecli.graph import DependencyGraph

WEIGHT_CRITERIA = ("l1", "l2", "fpgm", "bn", "random")


def scores(name, weight, **kwargs):
    return get_criterion(name)(**kwargs).weight_scores(weight)


# --- per-filter values -----------------------------------------------------------------------------------


def test_l1_by_hand():
    # three 1x1x2 "conv" filters
    w = torch.tensor([[1.0, -2.0], [0.0, 0.0], [3.0, 1.0]]).reshape(3, 1, 1, 2)
    torch.testing.assert_close(scores("l1", w), torch.tensor([3.0, 0.0, 4.0]))


def test_l2_by_hand():
    w = torch.tensor([[1.0, -2.0], [0.0, 0.0], [3.0, 1.0]]).reshape(3, 2, 1, 1)
    torch.testing.assert_close(scores("l2", w), torch.tensor([math.sqrt(5), 0.0, math.sqrt(10)]))


def test_fpgm_by_hand():
    # a=(0,0), b=(3,4), c=(6,8): |ab| = 5, |ac| = 10, |bc| = 5 -> sums 15, 10, 15; b is the median
    w = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]]).reshape(3, 1, 2, 1)
    got = scores("fpgm", w)
    torch.testing.assert_close(got.double(), torch.tensor([15.0, 10.0, 15.0], dtype=torch.float64))
    assert int(got.argmin()) == 1


def test_fpgm_four_filters_by_hand():
    # unit square corners plus its centre: corner sums 1 + 1 + sqrt2 + sqrt2/2, centre 4 * sqrt2/2
    w = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 0.5]])
    corner = 2 + math.sqrt(2) + math.sqrt(2) / 2
    torch.testing.assert_close(
        scores("fpgm", w).double(), torch.tensor([corner] * 4 + [2 * math.sqrt(2)], dtype=torch.float64)
    )


def test_bn_is_absolute_gamma():
    gamma = torch.tensor([-2.0, 0.5, 0.0, 1.25])
    torch.testing.assert_close(scores("bn", gamma), torch.tensor([2.0, 0.5, 0.0, 1.25]))


def test_random_is_reproducible_by_seed():
    w = torch.randn(12, 3, 3, 3)
    a, b, c = scores("random", w, seed=7), scores("random", w, seed=7), scores("random", w, seed=8)
    assert a.shape == (12,)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert ((a >= 0) & (a < 1)).all()
    # independent of the weights
    assert torch.equal(a, scores("random", torch.zeros(12, 5), seed=7))


@pytest.mark.parametrize("name", ["l1", "l2"])
def test_a_zero_filter_scores_lowest(name):
    w = torch.randn(8, 4, 3, 3)
    w[5] = 0
    got = scores(name, w)
    assert int(got.argmin()) == 5
    assert got[5] == 0
    assert (got[torch.arange(8) != 5] > 0).all()


def test_fpgm_ranks_by_distance_to_the_others_not_by_norm():
    """The filter at the centre of a cross goes first under FPGM although its norm is the largest-but-one."""
    w = torch.tensor([[10.0, 10.0], [12.0, 10.0], [8.0, 10.0], [10.0, 12.0], [10.0, 8.0]])
    # centre: 4 neighbours at 2 -> 8; (12, 10): 2 + 4 + 2 sqrt2 + 2 sqrt2
    expected = [8.0] + [6 + 4 * math.sqrt(2)] * 4
    torch.testing.assert_close(scores("fpgm", w).double(), torch.tensor(expected, dtype=torch.float64))
    assert int(scores("fpgm", w).argmin()) == 0
    assert int(scores("l2", w).argmin()) in (2, 4)  # (8, 10) and (10, 8) have the smallest norm


# --- score_weights: coupled layers -----------------------------------------------------------------------


class TinyResidual(nn.Module):
    """stem (1 -> 3, 1x1) + [conv1 (3 -> 4) -> conv2 (4 -> 3)] residual add -> head (3 -> 2)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 3, 1, bias=False)
        self.conv1 = nn.Conv2d(3, 4, 1, bias=False)
        self.conv2 = nn.Conv2d(4, 3, 1, bias=False)
        self.head = nn.Conv2d(3, 2, 1)
        with torch.no_grad():
            self.stem.weight.copy_(torch.tensor([1.0, -2.0, 3.0]).reshape(3, 1, 1, 1))  # l1 1, 2, 3
            self.conv2.weight.copy_(  # l1 6, 2, 4
                torch.tensor([[1.0, 2.0, -3.0, 0.0], [0.0, 0.0, 1.0, -1.0], [4.0, 0.0, 0.0, 0.0]]).reshape(3, 4, 1, 1)
            )

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + self.conv2(torch.relu(self.conv1(x)))
        return self.head(x).mean((2, 3))


@pytest.fixture(scope="module")
def tiny():
    graph = DependencyGraph(TinyResidual().eval(), torch.randn(1, 1, 4, 4))
    return graph, M.find_group(graph.groups, "stem")


@pytest.mark.parametrize(
    ("reduction", "expected"),
    [
        # per layer normalised to mean 1: stem [1, 2, 3] / 2, conv2 [6, 2, 4] / 4
        ("mean", [(0.5 + 1.5) / 2, (1.0 + 0.5) / 2, (1.5 + 1.0) / 2]),
        ("max", [1.5, 1.0, 1.5]),
        ("sum", [2.0, 1.5, 2.5]),
    ],
)
def test_residual_group_score_is_the_reduction_of_normalised_layer_scores(tiny, reduction, expected):
    graph, group = tiny
    assert set(group.layers("out")) == {"stem", "conv2"}
    got = score_weights(get_criterion("l1")(), graph, [group], reduction, "producers")
    assert set(got) == {group.index}
    assert got[group.index].dtype == torch.float64
    torch.testing.assert_close(got[group.index], torch.tensor(expected, dtype=torch.float64))


def test_score_weights_covers_every_group_with_one_score_per_channel():
    model = M.randomise_norms(M.ConcatBranches()).eval()
    graph = DependencyGraph(model, M.example(M.ConcatBranches))
    groups = [g for g in graph.groups if g.prunable]
    for name in WEIGHT_CRITERIA:
        got = score_weights(get_criterion(name)(seed=1), graph, groups)
        assert set(got) == {g.index for g in groups}, name
        for g in groups:
            assert got[g.index].shape == (g.channels,), name
            # one layer per group here, so the mean |score| is exactly 1 after normalisation
            torch.testing.assert_close(got[g.index].abs().mean(), torch.tensor(1.0, dtype=torch.float64))


def test_branch_b_scores_come_from_its_own_filters():
    model = M.ConcatBranches().eval()
    graph = DependencyGraph(model, M.example(M.ConcatBranches))
    group = M.find_group(graph.groups, "branch_b")
    got = score_weights(get_criterion("l1")(), graph, [group], scope="producers")[group.index]
    expected = normalise(model.branch_b.weight.detach().flatten(1).abs().sum(1).double())
    torch.testing.assert_close(got, expected)


def test_bn_criterion_averages_the_norms_of_a_residual_group():
    model = M.ResidualAdd().eval()
    with torch.no_grad():
        model.bn0.weight.copy_(torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8]))  # mean 4.5
        model.bn2.weight.copy_(torch.tensor([-2.0, 2, 2, 2, 2, 2, 2, 2]))  # |.| mean 2
    graph = DependencyGraph(model, M.example(M.ResidualAdd))
    group = M.find_group(graph.groups, "stem")
    got = score_weights(get_criterion("bn")(), graph, [group])[group.index]
    expected = (torch.arange(1, 9, dtype=torch.float64) / 4.5 + 1.0) / 2
    torch.testing.assert_close(got, expected)
    # a group with no norm layer gets no score
    head = M.find_group(graph.groups, "head")
    assert score_weights(get_criterion("bn")(), graph, [head]) == {}


def test_zero_filters_of_a_residual_group_score_lowest():
    model = M.ResidualAdd().eval()
    graph = DependencyGraph(model, M.example(M.ResidualAdd))
    group = M.find_group(graph.groups, "stem")
    M.kill_channels(model, group, [2, 6])
    for name in ("l1", "l2"):
        got = score_weights(get_criterion(name)(), graph, [group], scope="producers")[group.index]
        assert sorted(torch.argsort(got)[:2].tolist()) == [2, 6], name
        torch.testing.assert_close(got[[2, 6]], torch.zeros(2, dtype=torch.float64))


def test_flatten_linear_group_is_scored_by_the_conv_filters():
    model = M.FlattenLinear().eval()
    graph = DependencyGraph(model, M.example(M.FlattenLinear))
    group = M.find_group(graph.groups, "conv")
    got = score_weights(get_criterion("l2")(), graph, [group], scope="producers")[group.index]
    torch.testing.assert_close(got, normalise(model.conv.weight.detach().flatten(1).norm(dim=1).double()))


# --- registry --------------------------------------------------------------------------------------------


def test_builtins_are_registered_with_their_papers():
    names = list_criteria()
    assert set(WEIGHT_CRITERIA) <= set(names)
    for name in WEIGHT_CRITERIA:
        cls = get_criterion(name)
        assert cls.name == name
        assert cls.paper and cls.summary
        assert not cls.needs_data and not cls.needs_labels
        module_doc = sys.modules[cls.__module__].__doc__ or ""
        assert module_doc.strip(), f"{cls.__module__} must cite its paper in its docstring"


def test_duplicate_registration_raises(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    class Again(Criterion):
        name = "l1"

    with pytest.raises(ValueError, match="'l1' is already registered"):
        register_criterion(Again)
    assert get_criterion("l1") is not Again

    class Fresh(Criterion):
        name = "test-fresh"

    assert register_criterion(Fresh) is Fresh
    assert get_criterion("test-fresh") is Fresh
    with pytest.raises(ValueError, match="already registered"):
        register_criterion(Fresh)


def test_unknown_name_lists_the_choices():
    with pytest.raises(PrunecliError) as info:
        get_criterion("nope")
    message = str(info.value)
    assert "'nope'" in message
    for name in list_criteria():
        assert name in message
