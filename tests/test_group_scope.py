"""``--group-scope``: the weight criteria score a coupled group's producers only, or every member of it."""

from __future__ import annotations

import math

import models as M
import pytest
import torch
from torch import nn

from prunecli.budget import parse_budget
from prunecli.config import GROUP_SCOPES, PruneConfig, ScoringOptions
from prunecli.criteria import get_criterion, list_criteria
from prunecli.criteria.base import in_weight, out_weight, reduce_members, score_weights, to_root
from prunecli.errors import PrunecliError
from prunecli.graph import DependencyGraph
from prunecli.layers import CONV_LINEAR

F64 = torch.float64


def _set(module: nn.Module, values) -> None:
    with torch.no_grad():
        module.weight.copy_(torch.as_tensor(values, dtype=torch.float32).reshape(module.weight.shape))


def _group(model: nn.Module, shape, root: str):
    graph = DependencyGraph(model.eval(), torch.randn(1, *shape))
    return graph, M.find_group(graph.groups, root)


def _scores(name: str, graph, group, scope: str, reduction: str = "mean") -> torch.Tensor:
    return score_weights(get_criterion(name)(), graph, [group], reduction, scope)[group.index]


class ConvBnConv(nn.Module):
    """stem (1 -> 3, 1x1) -> bn -> conv2 (3 -> 2, 1x1)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 3, 1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 2, 1)
        _set(self.stem, [1.0, -2.0, 3.0])  # l1 = l2 = 1, 2, 3
        _set(self.bn, [2.0, 1.0, -3.0])  # |gamma| 2, 1, 3
        _set(self.conv2, [[1.0, 0.0, 2.0], [3.0, -1.0, 0.0]])  # input slices (1, 3), (0, -1), (2, 0)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn(self.stem(x)))).mean((2, 3))


@pytest.fixture(scope="module")
def conv_bn_conv():
    return _group(ConvBnConv(), (1, 4, 4), "stem")


def test_the_group_has_a_producer_a_norm_and_a_consumer(conv_bn_conv):
    _, group = conv_bn_conv
    assert {(m.layer, m.dim) for m in group.members} == {("stem", "out"), ("bn", "out"), ("conv2", "in")}


@pytest.mark.parametrize(
    ("name", "consumer"),
    [
        ("l1", [4.0, 1.0, 2.0]),  # |1| + |3|, |0| + |-1|, |2| + |0|
        ("l2", [math.sqrt(10), 1.0, 2.0]),
    ],
)
def test_all_scope_normalises_filters_scales_and_input_slices_then_reduces(conv_bn_conv, name, consumer):
    graph, group = conv_bn_conv
    stem = torch.tensor([1.0, 2.0, 3.0], dtype=F64) / 2  # each member normalised to mean 1
    bn = torch.tensor([2.0, 1.0, 3.0], dtype=F64) / 2
    conv2 = torch.tensor(consumer, dtype=F64) / (sum(consumer) / 3)
    torch.testing.assert_close(_scores(name, graph, group, "all"), (stem + bn + conv2) / 3)
    torch.testing.assert_close(_scores(name, graph, group, "all", "max"), torch.stack([stem, bn, conv2]).max(0).values)
    torch.testing.assert_close(_scores(name, graph, group, "all", "sum"), stem + bn + conv2)
    # producers: the stem's filters alone, as before the option existed
    torch.testing.assert_close(_scores(name, graph, group, "producers"), stem)


def test_l1_all_scope_by_hand(conv_bn_conv):
    graph, group = conv_bn_conv
    # stem [0.5, 1, 1.5], bn [1, 0.5, 1.5], conv2 [4, 1, 2] / (7/3) = [12/7, 3/7, 6/7]
    expected = [(0.5 + 1 + 12 / 7) / 3, (1 + 0.5 + 3 / 7) / 3, (1.5 + 1.5 + 6 / 7) / 3]
    torch.testing.assert_close(_scores("l1", graph, group, "all"), torch.tensor(expected, dtype=F64))


class FlattenHead(nn.Module):
    """conv (1 -> 2, 1x1) -> 2x2 pool -> flatten -> fc (8 -> 3): channel c is fc's input columns 4c .. 4c + 3."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(8, 3)
        _set(self.conv, [2.0, -1.0])
        fc = torch.zeros(3, 8)
        fc[:, :4] = 1.0  # channel 0: l1 12, l2 sqrt(12)
        fc[0, 4], fc[2, 7] = 3.0, -4.0  # channel 1: l1 7, l2 5
        _set(self.fc, fc)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


@pytest.mark.parametrize(("name", "consumer"), [("l1", [12.0, 7.0]), ("l2", [math.sqrt(12), 5.0])])
def test_a_consumer_after_a_flatten_scores_all_the_columns_of_a_channel_at_once(name, consumer):
    graph, group = _group(FlattenHead(), (1, 4, 4), "conv")
    fc = next(m for m in group.members if m.layer == "fc")
    assert fc.dim == "in"
    assert fc.root_indices == (0, 0, 0, 0, 1, 1, 1, 1)
    conv = torch.tensor([4 / 3, 2 / 3], dtype=F64)
    columns = torch.tensor(consumer, dtype=F64) / (sum(consumer) / 2)
    torch.testing.assert_close(_scores(name, graph, group, "all"), (conv + columns) / 2)
    torch.testing.assert_close(_scores(name, graph, group, "producers"), conv)


def test_l2_after_a_flatten_is_the_norm_of_the_whole_slice_not_a_mean_of_column_norms():
    graph, group = _group(FlattenHead(), (1, 4, 4), "conv")
    # joined: sqrt(12) = 3.46 < 5, channel 1 reads more weight; columns averaged would be sqrt(3) = 1.73 vs 7/4
    got = _scores("l2", graph, group, "all")
    expected_fc = torch.tensor([math.sqrt(12), 5.0], dtype=F64) / ((math.sqrt(12) + 5) / 2)
    torch.testing.assert_close(got, (torch.tensor([4 / 3, 2 / 3], dtype=F64) + expected_fc) / 2)


class Transposed(nn.Module):
    """up (ConvTranspose 1 -> 2) -> conv (2 -> 2) -> out (ConvTranspose 2 -> 1): in/out dims swapped in storage."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(1, 2, 1, bias=False)  # weight [in 1, out 2, 1, 1]
        self.conv = nn.Conv2d(2, 2, 1, bias=False)
        self.out = nn.ConvTranspose2d(2, 1, 1, bias=False)  # weight [in 2, out 1, 1, 1]
        _set(self.up, [[1.0, -3.0]])  # filters of up's outputs: 1, 3
        _set(self.conv, [[1.0, 2.0], [0.0, -2.0]])  # filters 3, 2; input slices (1, 0), (2, -2)
        _set(self.out, [[5.0], [1.0]])  # input slices 5, 1

    def forward(self, x):
        return self.out(torch.relu(self.conv(torch.relu(self.up(x))))).mean((1, 2, 3))


def test_conv_transpose_members_read_the_swapped_dims():
    model = Transposed()
    graph = DependencyGraph(model.eval(), torch.randn(1, 1, 3, 3))
    up, conv = M.find_group(graph.groups, "up"), M.find_group(graph.groups, "conv")
    # up's group: up's filters [1, 3] / 2 and conv's input slices [1, 4] / 2.5
    expected_up = (torch.tensor([0.5, 1.5], dtype=F64) + torch.tensor([0.4, 1.6], dtype=F64)) / 2
    torch.testing.assert_close(_scores("l1", graph, up, "all"), expected_up)
    torch.testing.assert_close(_scores("l1", graph, up, "producers"), torch.tensor([0.5, 1.5], dtype=F64))
    # conv's group: conv's filters [3, 2] / 2.5 and out's (transposed) input slices [5, 1] / 3
    expected_conv = (torch.tensor([1.2, 0.8], dtype=F64) + torch.tensor([5 / 3, 1 / 3], dtype=F64)) / 2
    torch.testing.assert_close(_scores("l1", graph, conv, "all"), expected_conv)


def test_in_and_out_weights_of_grouped_layers_hold_what_each_channel_connects_to():
    conv = nn.Conv2d(4, 6, 1, groups=2)  # weight [6, 2, 1, 1]: output d of group d // 3 reads inputs 2g, 2g + 1
    rows = in_weight(conv)
    assert rows.shape == (4, 3, 1, 1)
    for c in range(4):
        g = c // 2
        torch.testing.assert_close(rows[c], conv.weight[3 * g : 3 * g + 3, c % 2])
    up = nn.ConvTranspose2d(4, 6, 1, groups=2)  # weight [4, 3, 1, 1]
    rows = out_weight(up)
    assert rows.shape == (6, 2, 1, 1)
    for d in range(6):
        g = d // 3
        torch.testing.assert_close(rows[d], up.weight[2 * g : 2 * g + 2, d % 3])
    torch.testing.assert_close(in_weight(up), up.weight)
    plain = nn.ConvTranspose2d(3, 5, 2)
    torch.testing.assert_close(out_weight(plain), plain.weight.transpose(0, 1))  # unchanged for groups=1


class Depthwise(nn.Module):
    """conv1 (1 -> 2) -> dw (depthwise 2 -> 2) -> bn_dw -> pw (2 -> 1)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 1, bias=False)
        self.dw = nn.Conv2d(2, 2, 1, groups=2, bias=False)
        self.bn_dw = nn.BatchNorm2d(2)
        self.pw = nn.Conv2d(2, 1, 1, bias=False)
        _set(self.conv1, [1.0, 3.0])
        _set(self.dw, [2.0, -2.0])
        _set(self.bn_dw, [0.5, 1.5])
        _set(self.pw, [[4.0, -1.0]])

    def forward(self, x):
        return self.pw(torch.relu(self.bn_dw(self.dw(torch.relu(self.conv1(x)))))).mean((1, 2, 3))


def test_a_depthwise_conv_is_scored_once_as_a_producer():
    graph, group = _group(Depthwise(), (1, 3, 3), "conv1")
    assert {(m.layer, m.dim) for m in group.members} == {
        ("conv1", "out"), ("dw", "out"), ("bn_dw", "out"), ("pw", "in")
    }
    # conv1 [0.5, 1.5], dw [1, 1], bn_dw [0.5, 1.5], pw [1.6, 0.4]
    torch.testing.assert_close(_scores("l1", graph, group, "all"), torch.tensor([0.9, 1.1], dtype=F64))
    torch.testing.assert_close(_scores("l1", graph, group, "producers"), torch.tensor([0.75, 1.25], dtype=F64))


def test_fpgm_takes_the_consumers_input_slices_but_not_the_norms(conv_bn_conv):
    graph, group = conv_bn_conv
    # stem filters 1, -2, 3: distance sums 3 + 2, 3 + 5, 2 + 5 = 5, 8, 7
    stem = torch.tensor([5.0, 8.0, 7.0], dtype=F64) / (20 / 3)
    # conv2 slices (1, 3), (0, -1), (2, 0): |ab| = sqrt 17, |ac| = sqrt 10, |bc| = sqrt 5
    a, b, c = math.sqrt(17), math.sqrt(10), math.sqrt(5)
    sums = torch.tensor([a + b, a + c, b + c], dtype=F64)
    torch.testing.assert_close(_scores("fpgm", graph, group, "all"), (stem + sums / sums.mean()) / 2)


@pytest.mark.parametrize(
    "name", [n for n in list_criteria() if not get_criterion(n).needs_data and not get_criterion(n).group_members]
)
def test_weight_criteria_without_group_members_ignore_the_scope(name, conv_bn_conv):
    graph, group = conv_bn_conv
    got = {scope: score_weights(get_criterion(name)(seed=3), graph, [group], "mean", scope) for scope in GROUP_SCOPES}
    torch.testing.assert_close(got["all"], got["producers"])


def _before_the_option(criterion, graph, groups, reduction):
    """Producer scoring exactly as score_weights did it before --group-scope existed."""
    per_group = {}
    for group in groups:
        for member in group.members:
            module = graph.module(member.layer)
            if member.dim != "out" or not isinstance(module, criterion.scored_types):
                continue
            weight = out_weight(module)
            if weight is None:
                continue
            rows = weight.detach()[torch.as_tensor(member.indices)].float()
            per_group.setdefault(group.index, []).append(to_root(member, criterion.weight_scores(rows), group.channels))
    return {i: reduce_members(found, reduction) for i, found in per_group.items()}


WEIGHT_CRITERIA = [n for n in list_criteria() if not get_criterion(n).needs_data]
TRICKY = [M.ResidualAdd, M.ConcatBranches, M.DepthwiseSeparable, M.DepthwiseMultiplier, M.GroupedConv,
          M.SqueezeExcite, M.FlattenLinear, M.SharedLayer]


@pytest.mark.parametrize("cls", TRICKY, ids=lambda c: c.__name__)
def test_producers_scope_reproduces_the_scores_before_the_option(cls):
    model = M.randomise_norms(cls()).eval()
    graph = DependencyGraph(model, M.example(cls))
    groups = [g for g in graph.groups if g.prunable]
    for name in WEIGHT_CRITERIA:
        for reduction in ("mean", "max"):
            got = score_weights(get_criterion(name)(seed=2), graph, groups, reduction, "producers")
            expected = _before_the_option(get_criterion(name)(seed=2), graph, groups, reduction)
            assert got.keys() == expected.keys(), name
            for index in got:
                assert torch.equal(got[index], expected[index]), (cls.__name__, name, reduction)


@pytest.mark.parametrize("cls", TRICKY, ids=lambda c: c.__name__)
def test_all_scope_gives_every_group_one_finite_score_per_channel_and_reads_more_members(cls):
    model = M.randomise_norms(cls()).eval()
    graph = DependencyGraph(model, M.example(cls))
    groups = [g for g in graph.groups if g.prunable]
    for name in ("l1", "l2", "fpgm"):
        got = score_weights(get_criterion(name)(), graph, groups, "mean", "all")
        assert set(got) == {g.index for g in groups}, name
        for g in groups:
            assert got[g.index].shape == (g.channels,)
            assert torch.isfinite(got[g.index]).all()
    consumers = [g for g in groups if any(m.dim == "in" and isinstance(graph.module(m.layer), CONV_LINEAR)
                                         for m in g.members)]
    assert consumers
    for g in consumers:  # a consumer's input slices take part: the scores move away from the producers'
        assert not torch.equal(score_weights(get_criterion("l1")(), graph, [g], "mean", "all")[g.index],
                               score_weights(get_criterion("l1")(), graph, [g], "mean", "producers")[g.index])


def test_zero_channels_score_zero_in_the_all_scope():
    model = M.ResidualAdd().eval()
    graph = DependencyGraph(model, M.example(M.ResidualAdd))
    group = M.find_group(graph.groups, "stem")
    M.kill_channels(model, group, [2, 6])  # filters and norms
    with torch.no_grad():  # and the consumers' input slices
        for member in group.members:
            if member.dim == "in":
                rows = [i for i, r in zip(member.indices, member.root_indices, strict=True) if r in (2, 6)]
                graph.module(member.layer).weight[:, rows] = 0
    for name in ("l1", "l2"):
        got = _scores(name, graph, group, "all")
        torch.testing.assert_close(got[[2, 6]], torch.zeros(2, dtype=F64))
        assert (got[[i for i in range(group.channels) if i not in (2, 6)]] > 0).all()


def test_the_scope_is_a_validated_config_field_recorded_in_the_provenance(tmp_path):
    assert GROUP_SCOPES == ("producers", "all")
    assert ScoringOptions(group_scope="all").to_dict()["group_scope"] == "all"
    with pytest.raises(PrunecliError, match="--group-scope"):
        ScoringOptions(group_scope="consumers")
    from prunecli.config import ModelSource

    config = PruneConfig(ModelSource(tmp_path / "m.safetensors"), parse_budget("macs", "0.5"),
                         scoring=ScoringOptions(group_scope="all"))
    assert config.provenance()["scoring"]["group_scope"] == "all"
    assert PruneConfig.from_dict(config.provenance()).scoring.group_scope == "all"
    with pytest.raises(ValueError, match="group scope"):
        score_weights(get_criterion("l1")(), None, [], "mean", "everything")
