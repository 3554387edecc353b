"""Zero-filter invariance: removing channels that are exactly dead must not change the model's output.

For each model we pick channels of every prunable group (the same positions in each block), make them
dead in the model (zero filters and biases of every producer, zero gamma/beta/running mean of every
norm: the channel is 0 wherever it is consumed), then remove them with ``DependencyGraph.prune`` and
compare outputs in float64. Any mistake in coupling (a residual partner left whole, a concat offset off
by one, a flatten fan-out mis-sized, a grouped conv resliced wrongly) shows up as a shape error or a
changed output. The same plans check the analytic cost model against a measured pruned model.
"""

from __future__ import annotations

import copy

import models as M
import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from prunecli.graph import DependencyGraph
from prunecli.measure import CostModel, Totals, count_params, layer_costs, totals
from prunecli.outputs import output_shapes, output_tensors
from prunecli.samples import resnet20

DTYPE = torch.float64


def tricky(cls):
    model = M.randomise_norms(cls()).eval().to(DTYPE)
    return model, M.example(cls, dtype=DTYPE)


def tricky_plan(cls, graph):
    plan = {}
    for i, (key, remove) in enumerate(cls.PLAN.items()):
        group = M.find_group(graph.groups, key)
        assert group.prunable, key
        plan[group.index] = M.spread_positions(group.channels, group.blocks, remove, seed=i)
    return plan


def quarter_plan(graph):
    """About a quarter of every prunable group, whole blocks' worth, at least one position per block."""
    plan = {}
    for group in graph.groups:
        if not group.prunable:
            continue
        per_block = group.channels // group.blocks
        remove = max(1, round(per_block / 4)) if per_block > 1 else 0
        plan[group.index] = M.spread_positions(group.channels, group.blocks, remove * group.blocks, seed=group.index)
    return plan


# The real models run in float32 (float64 depthwise convs are ~10x slower on CPU); their outputs are
# O(1) and removing exact zeros only reorders sums, so float32's default tolerances hold with margin.
def torchvision_model(name, **kwargs):
    def build():
        model = getattr(torchvision.models, name)(weights=None, **kwargs)
        return M.randomise_norms(model).eval(), torch.randn(1, 3, 64, 64)

    return build


def sample_resnet20():
    return M.randomise_norms(resnet20()).eval(), torch.randn(2, 1, 28, 28)


def prune_dead(model, x, plan_for):
    """(dead model, pruned graph, plan): the plan's channels killed in the model, then removed from a copy."""
    graph = DependencyGraph(copy.deepcopy(model), x)
    plan = plan_for(graph)
    assert plan and any(plan.values())
    dead = M.kill_and_prune(model, graph, plan)
    return dead, graph, plan


def assert_invariant(model, x, plan_for):
    dead, graph, plan = prune_dead(model, x, plan_for)
    with torch.no_grad():
        alive_out, dead_out, pruned_out = model(x), dead(x), graph.model.eval()(x)
    # the killed channels mattered, so equality below is not vacuous
    assert not all(torch.allclose(a, d) for a, d in zip(output_tensors(alive_out), output_tensors(dead_out), strict=True))
    torch.testing.assert_close(pruned_out, dead_out)  # every tensor of a dict output
    return dead, graph, plan


@pytest.fixture(scope="module", params=M.TRICKY_MODELS, ids=lambda c: c.__name__)
def tricky_pruned(request):
    """One tricky model pruned once by its PLAN: (class, model, x, dead model, graph, plan)."""
    cls = request.param
    model, x = tricky(cls)
    dead, graph, plan = prune_dead(model, x, lambda graph: tricky_plan(cls, graph))
    return cls, model, x, dead, graph, plan


def test_tricky_model_zero_invariance(tricky_pruned):
    _, model, x, dead, graph, _ = tricky_pruned
    with torch.no_grad():
        alive_out, dead_out, pruned_out = model(x), dead(x), graph.model.eval()(x)
    assert not all(torch.allclose(a, d) for a, d in zip(output_tensors(alive_out), output_tensors(dead_out), strict=True))
    torch.testing.assert_close(pruned_out, dead_out)  # every tensor of a dict output


def test_tricky_model_pruned_shapes(tricky_pruned):
    cls, model, x, _, graph, _ = tricky_pruned
    pruned = graph.model
    weighted = {name: m for name, m in pruned.named_modules() if getattr(m, "weight", None) is not None}
    assert set(weighted) == set(cls.EXPECTED_SHAPES)
    for name, shape in cls.EXPECTED_SHAPES.items():
        module = weighted[name]
        assert tuple(module.weight.shape) == shape, name
        if isinstance(module, nn.Conv2d):
            assert module.out_channels == shape[0], name
            assert module.in_channels == shape[1] * module.groups, name
            assert module.groups == getattr(cls, "EXPECTED_CONV_GROUPS", {}).get(name, 1), name
            if module.bias is not None:
                assert module.bias.shape == (shape[0],), name
        elif isinstance(module, nn.Linear):
            assert (module.out_features, module.in_features) == shape, name
        elif isinstance(module, nn.BatchNorm2d):
            assert module.num_features == shape[0], name
            for buffer in (module.bias, module.running_mean, module.running_var):
                assert buffer.shape == shape, name
    with torch.no_grad():
        assert output_shapes(pruned(x)) == output_shapes(model(x))


def assert_cost_model_exact(model, x, graph, plan):
    costs = layer_costs(model, x)
    cost_model = CostModel(model, costs, graph.groups)
    before = Totals(count_params(model), sum(c.macs for c in costs))
    assert cost_model.evaluate(np.array([g.channels for g in graph.groups], dtype=float)) == (before.macs, before.params)
    keep = np.array([g.channels - len(plan.get(g.index, ())) for g in graph.groups], dtype=float)
    macs, params = cost_model.evaluate(keep)
    after = totals(graph.model, x)
    assert (macs, params) == (after.macs, after.params)
    assert after.macs < before.macs and after.params < before.params


def test_tricky_model_cost_model_is_exact(tricky_pruned):
    _, model, x, _, graph, plan = tricky_pruned
    assert_cost_model_exact(model, x, graph, plan)


def test_shared_layer_costs_by_hand():
    """The shared 3x3 conv runs twice per image, at 16x16: its MACs count twice."""
    model, x = tricky(M.SharedLayer)
    hw = 16 * 16
    before = totals(model, x)
    assert before.macs == (8 * 3 * 9 + 16 * 8 * 9 + 16 * 8 + 2 * 12 * 16 * 9 + 8 * 12) * hw + 8 * 5
    shared = next(c for c in layer_costs(model, x) if c.name == "shared")
    assert (shared.macs, shared.positions, shared.params) == (2 * 12 * 16 * 9 * hw, 2 * hw, 12 * 16 * 9 + 12)
    _, graph, _ = prune_dead(model, x, lambda graph: tricky_plan(M.SharedLayer, graph))
    after = totals(graph.model, x)
    # widths after PLAN: stem 6, branches 12, shared 9, head 6
    assert after.macs == (6 * 3 * 9 + 12 * 6 * 9 + 12 * 6 + 2 * 9 * 12 * 9 + 6 * 9) * hw + 6 * 5
    convs = 6 * 27 + 12 * 6 * 9 + 12 * 6 + (9 * 12 * 9 + 9) + 6 * 9
    norms = 2 * (6 + 12 + 12 + 6)
    assert after.params == convs + norms + (5 * 6 + 5)


def test_flatten_linear_costs_by_hand():
    model, x = tricky(M.FlattenLinear)
    _, graph, _ = prune_dead(model, x, lambda graph: tricky_plan(M.FlattenLinear, graph))
    after = totals(graph.model, x)
    # conv 6 x 3 x 9 at 16x16, fc1 96 -> 12, fc2 12 -> 5
    assert after.macs == 6 * 27 * 256 + 96 * 12 + 12 * 5
    assert after.params == (6 * 27 + 6) + 2 * 6 + (96 * 12 + 12) + (12 * 5 + 5)


REAL_MODELS = {
    "resnet18": torchvision_model("resnet18"),
    "mobilenet_v2": torchvision_model("mobilenet_v2"),
    "shufflenet_v2_x0_5": torchvision_model("shufflenet_v2_x0_5"),  # channel shuffle between the branches
    "resnet20": sample_resnet20,
}


@pytest.mark.parametrize("name", list(REAL_MODELS))
def test_real_model_zero_invariance_and_costs(name):
    model, x = REAL_MODELS[name]()
    _, graph, plan = assert_invariant(model, x, quarter_plan)
    assert_cost_model_exact(model, x, graph, plan)
    # every prunable group lost exactly its planned channels at every producer
    pruned = dict(graph.model.named_modules())
    for group in graph.groups:
        removed = len(plan.get(group.index, ()))
        for member in group.members:
            if member.dim != "out":
                continue
            module = pruned[member.layer]
            size = module.weight.shape[0] if isinstance(module, (nn.Conv2d, nn.Linear)) else module.num_features
            assert size == group.channels - removed, member.layer


def timm_model(name):
    def build():
        timm = pytest.importorskip("timm")
        model = M.randomise_norms(timm.create_model(name, pretrained=False)).eval().to(DTYPE)
        return model, torch.randn(1, 3, 64, 64, dtype=DTYPE)  # float64: 50 layers deep, float32 drifts by 4e-5

    return build


# Models whose groups pass a split or chunk: (build, groups, prunable groups). Before each split's parts were read
# from the trace (Torch-Pruning guessed them from an autograd attribute that torch 2.x renamed, and paired parts with
# readers in the order it met them), cspresnet50 pruned 34 of 43 groups, res2net50_26w_4s 17 of 34 and
# shufflenet_v2_x0_5 18 of 41 (its chunks cut the channel shuffle's output, whose groups stay whole).
SPLIT_MODELS = {
    "shufflenet_v2_x0_5": (torchvision_model("shufflenet_v2_x0_5"), 54, 18),
    "cspresnet50": (timm_model("cspresnet50"), 43, 42),  # CrossStage: conv_exp's output split in two halves
    "res2net50_26w_4s": (timm_model("res2net50_26w_4s"), 46, 45),  # conv1's output split in 4 parts of 26
}


@pytest.mark.parametrize("name", ["shufflenet_v2_x0_5", "cspresnet50", pytest.param("res2net50_26w_4s",
                                                                                     marks=pytest.mark.slow)])
def test_groups_through_a_split_prune_and_removing_dead_channels_leaves_the_output(name):
    build, groups, prunable = SPLIT_MODELS[name]
    model, x = build()
    _, graph, plan = assert_invariant(model, x, quarter_plan)
    assert (len(graph.groups), sum(g.prunable for g in graph.groups), len(plan)) == (groups, prunable, prunable)
    assert_cost_model_exact(model, x, graph, plan)


MORE_MODELS = {
    "mobilenet_v3_small": {},  # squeeze-excite with hardsigmoid gates, hardswish
    "efficientnet_b0": {},  # squeeze-excite, stochastic depth (identity in eval)
    "regnet_x_400mf": {},  # grouped convs
    "resnext50_32x4d": {},  # 32 groups
    "squeezenet1_0": {},  # fire modules: concat
    "googlenet": {"aux_logits": False, "init_weights": False},  # four-way concat
    "densenet121": {},  # dense concatenation
    "vgg11_bn": {},  # 7x7 adaptive pool flattened into a Linear
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MORE_MODELS))
def test_more_torchvision_models_zero_invariance_and_costs(name):
    model, x = torchvision_model(name, **MORE_MODELS[name])()
    _, graph, plan = assert_invariant(model, x, quarter_plan)
    assert_cost_model_exact(model, x, graph, plan)


def test_monai_3d_unet_zero_invariance_through_its_skip_connections():
    """MONAI's UNet joins every level to its decoder by ``torch.cat([x, submodule(x)], dim=1)`` behind PReLUs with
    one shared weight, where Torch-Pruning's width inference gave up (issue 26): every group prunes, and removing
    dead channels from all of them (the skips' offsets included) leaves the 3-D output as it was."""
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    model = nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32, 64), strides=(2, 2, 2),
                      num_res_units=2).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    graph = DependencyGraph(copy.deepcopy(model), x)
    assert [g.reason for g in graph.groups if not g.prunable] == ["feeds the model output"]
    _, graph, plan = assert_invariant(model, x, quarter_plan)
    assert len(plan) == len(graph.groups) - 1
    assert_cost_model_exact(model, x, graph, plan)  # a PReLU's one shared slope stays as channels go
