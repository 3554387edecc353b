"""``--allocation sensitivity``: measured per-group damage (exact against real pruning) and the allocation on it."""

from __future__ import annotations

import copy
import json

import models as M
import numpy as np
import pytest
import torch
import torchvision
from rich.console import Console
from typer.testing import CliRunner

from prunecli.allocate import GroupLimits, _nudged, _tradeoff, allocate, lowest_positions
from prunecli.cli import app
from prunecli.errors import BudgetError
from prunecli.graph import DependencyGraph
from prunecli.io.slim import read_slim_metadata
from prunecli.outputs import output_tensors
from prunecli.report.console import render_sensitivity
from prunecli.sensitivity import group_sensitivity, sensitivity_widths

runner = CliRunner()
SAMPLE = "sample_models/mobilenetv2_fmnist.safetensors"
CALIB = "sample_models/fmnist_calib.safetensors"


@pytest.mark.parametrize(
    ("limits", "levels", "expected"),
    [
        (GroupLimits(16), 8, [2, 4, 6, 8, 10, 12, 14, 16]),  # 2..16 of 15 choices, 8 evenly spaced by position
        (GroupLimits(16, round_to=4), 8, [4, 8, 12, 16]),  # fewer choices than levels: all of them
        (GroupLimits(10, max_ratio=0.6), 3, [4, 7, 10]),
    ],
)
def test_widths_span_the_floor_to_full_width(limits, levels, expected):
    assert sensitivity_widths(limits, levels).tolist() == expected


def relative_error(out, reference) -> float:
    pairs = list(zip(output_tensors(out), output_tensors(reference), strict=True))
    return sum(float((o.double() - r.double()).square().sum()) for o, r in pairs) / sum(
        float(r.double().square().sum()) for _, r in pairs)


@pytest.mark.parametrize("cls", [M.ResidualAdd, M.ConcatBranches, M.DepthwiseSeparable, M.GroupedConv, M.SqueezeExcite,
                                 M.FlattenLinear, M.ChannelSlice, M.SharedLayer])
def test_damage_equals_the_output_error_of_the_really_pruned_model(cls):
    """Zeroing a group's removed channels at the layers that read them is what removing them does: the damage at
    every measured width is the relative squared error of the model with those channels physically removed."""
    model = M.randomise_norms(cls().eval()).double()  # float64: the two routes agree to rounding
    x = M.example(cls, batch=6, dtype=torch.float64)
    graph = DependencyGraph(copy.deepcopy(model), x[:1])
    limits = {g.index: GroupLimits(g.channels, g.blocks, g.prunable, 0.9, 1, g.parts) for g in graph.groups}
    generator = torch.Generator().manual_seed(3)
    scores = {g.index: torch.rand(g.channels, generator=generator) for g in graph.groups if g.prunable}
    curves = group_sensitivity(graph, scores, limits, x.split(4), torch.device("cpu"), levels=4)
    assert set(curves) == {g.index for g in graph.groups if g.prunable and len(limits[g.index].allowed_keeps()) > 1}
    reference = model(x).detach()
    for group in graph.groups:
        if group.index not in curves:
            continue
        widths, damage = curves[group.index]
        true = []
        for keep in widths:
            removed = lowest_positions(scores[group.index], group.channels - int(keep), group.blocks, group.parts)
            pruned = DependencyGraph(copy.deepcopy(model), x[:1])
            pruned.prune({group.index: removed} if removed else {})
            true.append(relative_error(pruned.model(x).detach(), reference))
        envelope = np.maximum.accumulate(np.array(true)[::-1])[::-1]
        np.testing.assert_allclose(damage, envelope, rtol=1e-9, atol=1e-12)
        assert damage[-1] == 0.0 and widths[-1] == group.channels


@pytest.mark.parametrize("build", [M.SharedLayer, lambda: torchvision.models.resnet18(num_classes=10)],
                         ids=["shared conv", "resnet18"])
def test_replaying_the_layers_before_a_group_gives_the_numbers_of_a_full_rerun_for_less_work(build, monkeypatch):
    """The conv outputs computed before a group's first reader cannot change, so they are replayed: the damage is
    bit for bit that of rerunning the whole model per width (resnet18 calls one ReLU module twice per block, the toy
    one conv twice), and fewer convolutions run."""
    torch.manual_seed(0)
    model = M.randomise_norms(build().eval())
    x = torch.randn(4, 3, 32, 32)
    graph = DependencyGraph(copy.deepcopy(model), x[:1])
    limits = {g.index: GroupLimits(g.channels, g.blocks, g.prunable, 0.9, 1, g.parts) for g in graph.groups}
    scores = {g.index: torch.rand(g.channels) for g in graph.groups if g.prunable}
    convolutions = []
    real = torch.nn.Conv2d._conv_forward
    monkeypatch.setattr(torch.nn.Conv2d, "_conv_forward", lambda *a: convolutions.append(1) or real(*a))
    curves = {}
    for replay in (False, True):
        convolutions.clear()
        curves[replay] = group_sensitivity(graph, scores, limits, x.split(2), torch.device("cpu"), levels=3,
                                           replay=replay)
        curves[replay, "convolutions"] = len(convolutions)
    assert curves[True].keys() == curves[False].keys()
    for index, (widths, damage) in curves[False].items():
        np.testing.assert_array_equal(curves[True][index][0], widths)
        np.testing.assert_array_equal(curves[True][index][1], damage)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    cuts = sum(len(w) - 1 for w, _ in curves[False].values())
    expected_rerun = 2 * (cuts + 1) * (convs + (1 if build is M.SharedLayer else 0))  # 2 batches; shared runs twice
    assert curves[False, "convolutions"] == expected_rerun
    assert curves[True, "convolutions"] < 0.75 * expected_rerun


def linear_cost(weights):
    return lambda keep: float(sum(weights[g] * k for g, k in keep.items()))


# Two groups of 4 channels (floor 1), cost 10 per channel of group 0 and 1 per channel of group 1. Group 0 at width
# 4, 3, 2, 1 does damage 0, 0.1, 0.3, 0.8; group 1 does 0, 0.01, 0.02, 0.05. Minimising damage + rate * cost per group:
# group 0 steps to 3 above rate 0.01, to 2 above 0.02, to 1 above 0.05; group 1 to 2 above 0.01 (3 never wins) and to 1
# above 0.03. The plans along the rate cost 44, 32 (3, 2), 22 (2, 2), 21 (2, 1) and 11 (1, 1).
CURVES = {0: (np.array([1, 2, 3, 4]), np.array([0.8, 0.3, 0.1, 0.0])),
          1: (np.array([1, 2, 3, 4]), np.array([0.05, 0.02, 0.01, 0.0]))}


@pytest.mark.parametrize(("target", "keep"), [(32, {0: 3, 1: 2}), (22, {0: 2, 1: 2}), (21, {0: 2, 1: 1}),
                                              (11, {0: 1, 1: 1})])
def test_sensitivity_allocation_minimises_damage_per_unit_of_cost(target, keep):
    limits = {g: GroupLimits(4, max_ratio=0.75) for g in (0, 1)}
    scores = {g: torch.tensor([0.4, 0.1, 0.3, 0.2]) for g in (0, 1)}
    plan = allocate(scores, limits, linear_cost({0: 10, 1: 1}), target, "sensitivity", sensitivity=CURVES)
    assert dict(plan.keep) == keep and plan.cost == target
    assert plan.removed.get(0, ()) == tuple(sorted([1, 3, 2, 0][: 4 - keep[0]]))  # lowest scores first


@pytest.mark.parametrize(("target", "keep"), [(27, {0: 3, 1: 2}), (23.5, {0: 2, 1: 3})])
def test_a_plan_off_the_target_moves_only_where_that_adds_no_damage(target, keep):
    """Between the plans at 32 (3, 2) and 22 (2, 2): for 27 the knob's 32 stays (narrowing group 1 to 31 is nearer
    but adds 0.03 of damage, which a nudge in group order took); for 23.5 the nearer 22 widens group 1 to 23, which
    removes 0.01."""
    limits = {g: GroupLimits(4, max_ratio=0.75) for g in (0, 1)}
    scores = {g: torch.tensor([0.4, 0.1, 0.3, 0.2]) for g in (0, 1)}
    cost = linear_cost({0: 10, 1: 1})
    plan = allocate(scores, limits, cost, target, "sensitivity", sensitivity=CURVES)
    assert dict(plan.keep) == keep and plan.cost == cost(keep)
    allowed = {g: np.array([1, 2, 3, 4]) for g in (0, 1)}
    damage = {g: CURVES[g][1] for g in (0, 1)}
    assert _nudged(keep, allowed, cost, target, [0, 1], damage) == keep
    if target == 27:  # without the damage, the same plan is nudged to 31
        assert _nudged(keep, allowed, cost, target, [0, 1]) == {0: 3, 1: 1}


def test_a_group_that_jumps_past_widths_still_meets_the_budget():
    """A damage curve with a cliff: any cut costs 1, so the best width jumps from 20 straight to the floor (2). The
    plan steps through the widths in between and lands on the target (before, it kept 19 or 3: 8 channels off)."""
    widths = np.arange(2, 21)
    damage = np.where(widths == 20, 0.0, 1.0 + 1e-6 * (20 - widths))
    plan = allocate({0: torch.arange(20.0)}, {0: GroupLimits(20)}, linear_cost({0: 1}), 11, "sensitivity",
                    sensitivity={0: (widths, damage)})
    assert plan.keep == {0: 11} and plan.cost == 11


def test_damage_and_cost_between_measured_widths_are_interpolated():
    """Group 0 measured at 2, 6 and 10 of 10 channels; its cost is timed (here: 3 per channel plus 7 for group 1)
    at those widths only."""
    damage, spent = _tradeoff(np.array([2, 4, 6, 8, 10]), np.array([2, 6, 10]), np.array([1.0, 0.2, 0.0]), 0,
                              {0: 10, 1: 7}, linear_cost({0: 3, 1: 1}))
    np.testing.assert_allclose(damage, [1.0, 0.6, 0.2, 0.1, 0.0])
    np.testing.assert_allclose(spent, [13, 19, 25, 31, 37])


def test_sensitivity_allocation_needs_the_measurements():
    with pytest.raises(BudgetError, match="needs each group's measured damage"):
        allocate({0: torch.ones(4)}, {0: GroupLimits(4)}, linear_cost({0: 1}), 2, "sensitivity")


def test_cli_sensitivity_keeps_more_of_the_sample_models_accuracy_than_efficiency(tmp_path):
    """On the sample MobileNetV2 at half the MACs, the plan on measured damage keeps more accuracy (no training,
    BN recalibration only) than the plan on score per MACs saved."""
    top1 = {}
    for allocation in ("efficiency", "sensitivity"):
        out = tmp_path / f"{allocation}.safetensors"
        result = runner.invoke(app, ["prune", SAMPLE, "--flops-target", "0.5", "--allocation", allocation,
                                     "--data", CALIB, "--calib-images", "128", "--recalibrate-bn", "2",
                                     "--eval-data", CALIB, "--device", "cpu", "-o", str(out), "--json"])
        assert result.exit_code == 0, result.output
        payload = json.loads(result.stdout)
        assert abs(payload["macs_kept"] - 0.5) < 0.005
        assert read_slim_metadata(out)["config"]["plan"]["allocation"] == allocation
        top1[allocation] = payload["accuracy"]["pruned_top1"]
        if allocation == "sensitivity":
            groups = payload["sensitivity"]
            assert len(groups) == 13  # every prunable group of the sample MobileNetV2 (`analyze`: 13 of 14)
            for group in groups.values():
                assert group["widths"][-1] == group["channels"] and group["damage"][-1] == 0.0
                assert group["damage"] == sorted(group["damage"], reverse=True)  # narrower never hurts less
                assert group["widths"][0] <= group["kept"] <= group["channels"]
                assert group["damage_kept"] == pytest.approx(np.interp(group["kept"], group["widths"], group["damage"]))
        else:
            assert payload["sensitivity"] is None
    assert top1["sensitivity"] > top1["efficiency"] + 0.05, top1


def test_the_report_names_the_cuts_that_move_the_output_most():
    console = Console(record=True, width=400)
    render_sensitivity({"a": {"channels": 16, "kept": 8, "damage_kept": 0.125},
                        "b": {"channels": 32, "kept": 4, "damage_kept": 0.5},
                        "c": {"channels": 8, "kept": 8, "damage_kept": 0.0},
                        "d": {"channels": 8, "kept": 6, "damage_kept": 0.25}}, console)
    assert console.export_text().strip() == (
        "sensitivity: the cuts that move the output most, each measured alone (relative squared error): "
        "b 4/32 (0.5000), d 6/8 (0.2500), a 8/16 (0.1250)")


def test_cli_sensitivity_without_images_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "slim.safetensors"
    result = runner.invoke(app, ["prune", SAMPLE, "--flops-target", "0.5", "--allocation", "sensitivity",
                                 "-o", str(out)])
    assert result.exit_code == 2, result.output  # a usage error
    assert "--allocation sensitivity need images: pass --data" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()
