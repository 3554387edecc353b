"""Channel groups of the hand-made tricky models match the answers they carry (tests/models.py)."""

from __future__ import annotations

import copy
import fnmatch

import models as M
import pytest
import torch
from torch import nn

from prunecli.errors import ArchitectureError
from prunecli.graph import DependencyGraph

MODEL_IDS = [cls.__name__ for cls in M.TRICKY_MODELS]


def build(cls, ignore=()):
    model = cls().eval()
    return model, DependencyGraph(copy.deepcopy(model), M.example(cls), ignore=ignore)


@pytest.fixture(scope="module", params=M.TRICKY_MODELS, ids=MODEL_IDS)
def built(request):
    cls = request.param
    model, graph = build(cls)
    return cls, model, graph


def test_groups_are_exactly_the_expected_ones(built):
    cls, _, graph = built
    assert len(graph.groups) == len(cls.EXPECTED_GROUPS)
    assert [g.index for g in graph.groups] == list(range(len(graph.groups)))
    seen = set()
    for key, want in cls.EXPECTED_GROUPS.items():
        group = M.find_group(graph.groups, key)
        seen.add(group.index)
        assert group.root in want.out, f"root {group.root} is not a producer of the {key} group"
        assert group.channels == want.channels, key
        assert group.blocks == want.blocks, key
        assert set(group.layers("out")) == want.out, key
        assert set(group.layers("in")) == want.ins, key
        assert group.prunable == want.prunable, key
        assert group.reason == want.reason, key
    assert seen == {g.index for g in graph.groups}


def test_member_indices(built):
    """Every member covers every group channel; offsets and flatten fan-out are as worked out by hand."""
    cls, _, graph = built
    special = getattr(cls, "EXPECTED_IN_INDICES", {})
    partial = getattr(cls, "EXPECTED_PARTIAL", set())
    for key, want in cls.EXPECTED_GROUPS.items():
        group = M.find_group(graph.groups, key)
        roots = tuple(range(want.channels))
        if group.grouped_conv:  # channel c of conv group c // width sits at (c % width) * groups + c // width
            width, groups = group.blocks, group.channels // group.blocks
            roots = tuple((c % width) * groups + c // width for c in range(want.channels))
        for member in group.members:
            assert len(member.indices) == len(member.root_indices)
            if (key, member.layer) in partial:  # reads, or adds into, a split's part: some of the group's channels
                assert 0 < len(set(member.root_indices)) < group.channels, (key, member.layer)
                continue
            assert set(member.root_indices) == set(range(group.channels)), (key, member.layer)
            if (key, member.layer) in special:
                assert member.dim == "in"
                assert member.indices == special[(key, member.layer)]
            else:
                assert member.indices == tuple(range(want.channels)), (key, member.layer)
                assert member.root_indices == roots, (key, member.layer)


def test_concat_consumer_sees_offset_indices():
    _, graph = build(M.ConcatBranches)
    b = M.find_group(graph.groups, "branch_b")
    (merge,) = [m for m in b.members if m.layer == "merge"]
    assert merge.dim == "in"
    assert merge.indices == tuple(range(8, 20))
    assert merge.root_indices == tuple(range(12))
    a = M.find_group(graph.groups, "branch_a")
    (merge_a,) = [m for m in a.members if m.layer == "merge"]
    assert merge_a.indices == tuple(range(8))


def test_flatten_linear_fans_each_channel_out_to_spatial_inputs():
    _, graph = build(M.FlattenLinear)
    group = M.find_group(graph.groups, "conv")
    (fc1,) = [m for m in group.members if m.layer == "fc1"]
    assert fc1.dim == "in"
    assert len(fc1.indices) == group.channels * M.FlattenLinear.SPATIAL == 128
    # channel c of the conv is fc1 inputs 16c .. 16c+15 (row-major flatten of a 4x4 map)
    for index, root in zip(fc1.indices, fc1.root_indices, strict=True):
        assert root == index // 16


def test_residual_branches_are_one_group():
    _, graph = build(M.ResidualAdd)
    group = M.find_group(graph.groups, "stem")
    assert group is M.find_group(graph.groups, "conv2")
    assert {"stem", "conv2"} <= set(group.layers("out"))


def test_shared_layer_couples_both_branches():
    _, graph = build(M.SharedLayer)
    assert M.find_group(graph.groups, "branch_a") is M.find_group(graph.groups, "branch_b")


@pytest.mark.parametrize(
    ("cls", "pattern", "key"),
    [
        (M.ResidualAdd, "conv1", "conv1"),
        (M.ResidualAdd, "conv[12]", "stem"),  # any out layer of the group matches: conv2 pins the residual group
        (M.ConcatBranches, "branch_*", "branch_a"),
        (M.SqueezeExcite, "excite", "conv"),
    ],
)
def test_ignore_glob_pins_the_group(cls, pattern, key):
    _, graph = build(cls, ignore=("nothing*", pattern))
    group = M.find_group(graph.groups, key)
    assert not group.prunable
    assert group.reason == f"ignored ({pattern})"
    for other, want in cls.EXPECTED_GROUPS.items():
        if want.prunable and not any(fnmatch.fnmatchcase(layer, pattern) for layer in want.out):
            assert M.find_group(graph.groups, other).prunable, other


def test_ignore_glob_on_concat_pins_both_branches():
    _, graph = build(M.ConcatBranches, ignore=("branch_*",))
    for key in ("branch_a", "branch_b"):
        assert M.find_group(graph.groups, key).reason == "ignored (branch_*)"
    assert M.find_group(graph.groups, "stem").prunable
    assert M.find_group(graph.groups, "merge").prunable


def test_ignore_matches_only_out_layers():
    """``fc`` is only a consumer of the head group: ignoring it must not pin that group."""
    _, graph = build(M.ResidualAdd, ignore=("fc",))
    assert M.find_group(graph.groups, "head").prunable
    assert M.find_group(graph.groups, "fc").reason == "ignored (fc)"


def test_a_group_without_consumers_is_not_prunable():
    _, graph = build(M.FlattenLinear)
    out = M.find_group(graph.groups, "fc2")
    assert (out.prunable, out.reason, out.channels) == (False, "feeds the model output", 5)


def test_depthwise_with_multiplier_pins_its_input_group():
    """groups == in_channels < out_channels is not depthwise: each input channel is a whole conv group."""
    _, graph = build(M.DepthwiseMultiplier)
    group = M.find_group(graph.groups, "conv1")
    assert (group.channels, group.blocks, group.prunable, group.reason) == (8, 8, False, "too few channels")
    dw = M.find_group(graph.groups, "dw")
    assert (dw.channels, dw.blocks, dw.prunable) == (16, 8, True)


def test_graph_keeps_the_training_flag():
    model = M.ResidualAdd().train()
    DependencyGraph(model, M.example(M.ResidualAdd))
    assert model.training


def test_untraceable_model_raises_architecture_error():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            raise RuntimeError("boom")

    with pytest.raises(ArchitectureError, match="cannot trace"):
        DependencyGraph(Broken(), torch.randn(1, 3, 8, 8))


def test_prune_refuses_to_empty_a_layer():
    _, graph = build(M.ResidualAdd)
    group = M.find_group(graph.groups, "conv1")
    with pytest.raises(ArchitectureError, match="empty a layer"):
        graph.prune({group.index: list(range(group.channels))})


def test_prune_with_empty_plan_changes_nothing():
    model, graph = build(M.ResidualAdd)
    graph.prune({g.index: [] for g in graph.groups})
    for (name, a), (_, b) in zip(model.state_dict().items(), graph.model.state_dict().items(), strict=True):
        assert a.shape == b.shape, name


def test_a_frozen_model_is_traced_and_stays_frozen():
    """Tracing follows autograd; a model loaded with requires_grad=False must still show its groups."""
    from prunecli.samples import resnet20

    model = resnet20().requires_grad_(False)
    graph = DependencyGraph(model, torch.randn(1, 1, 28, 28))
    assert sum(g.prunable for g in graph.groups) == 12
    assert not any(p.requires_grad for p in model.parameters())


def test_a_time_limit_swallowed_by_library_code_still_stops_the_stage():
    import contextlib
    import time

    from prunecli.runtime import time_limit

    def library_call():  # catches everything, as some tracing and hook code does
        deadline = time.perf_counter() + 0.2
        while time.perf_counter() < deadline:
            with contextlib.suppress(Exception):
                time.sleep(0.01)

    def wrapping_call():  # turns every error into its own
        try:
            time.sleep(0.2)
        except ArchitectureError as exc:
            raise ValueError("wrapped by the library") from exc

    tracing = pytest.raises(ArchitectureError, match=r"^tracing took longer than 0\.02 s; raise --timeout")
    with tracing, time_limit(0.02, "tracing", "raise --timeout"):
        library_call()
    scoring = pytest.raises(ArchitectureError, match=r"^scoring took longer than 0\.02 s; hint$")
    with scoring as caught, time_limit(0.02, "scoring", "hint"):
        wrapping_call()
    assert isinstance(caught.value.__cause__, ValueError)
    with time_limit(5, "quick"):
        pass


def test_prune_holds_the_channels_of_a_module_that_keeps_widths_in_attributes(tmp_path, saved_models):
    """The plan that ignores Heads' attributes breaks its reshape; prune finds the module, holds every group with a
    layer inside it, and meets the budget with fc1's hidden channels."""
    from prunecli.api import prune_model
    from prunecli.budget import parse_budget
    from prunecli.config import ModelSource, OutputOptions, PruneConfig
    from prunecli.graph.architectures import failing_module
    from prunecli.io.slim import load

    torch.manual_seed(0)
    model = M.HeadsInAttribute().eval()
    x = M.example(M.HeadsInAttribute)
    graph = DependencyGraph(copy.deepcopy(model), x)
    proj = next(g for g in graph.groups if g.root == "attn.proj")
    graph.prune({proj.index: [0]})
    module, exc = failing_module(graph.model, x)
    assert module is graph.model.attn and isinstance(exc, RuntimeError)
    assert failing_module(model, x) is None

    source = tmp_path / "heads.pt"
    torch.save(model.state_dict(), source)
    config = PruneConfig(ModelSource(source, arch="models:HeadsInAttribute", input_shape=M.HeadsInAttribute.INPUT_SHAPE),
                         parse_budget("macs", "0.5"), output=OutputOptions(tmp_path / "slim.safetensors"))
    result = prune_model(config)
    assert abs(result.macs_kept - 0.5) <= 0.005, result.macs_kept
    (pruned,) = saved_models
    assert (pruned.stem.out_channels, pruned.attn.proj.out_features, pruned.attn.out.out_features) == (8, 8, 8)
    assert pruned.fc1.out_features < 64
    loaded = load(tmp_path / "slim.safetensors", trust_code=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), pruned(x))


def test_a_norm_without_bias_prunes():
    """Torch-Pruning 1.6 resized a GroupNorm's bias even where it has none (timm's PoolFormerV2 norms): it stays None."""
    torch.manual_seed(0)
    norm = nn.GroupNorm(1, 8)
    norm.bias = None
    model = nn.Sequential(nn.Conv2d(3, 8, 3), norm, nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        model[0].weight[[0, 1]] = 0
        model[0].bias[[0, 1]] = 0
        model[2].weight[:, [0, 1]] = 0
    graph = DependencyGraph(copy.deepcopy(model), x)
    group = next(g for g in graph.groups if g.root == "0")
    graph.prune({group.index: [0, 1]})
    pruned = graph.model
    assert pruned[1].weight.shape == (6,) and pruned[1].bias is None and pruned[2].in_channels == 6
    assert pruned(x).shape == model(x).shape


def test_a_conv_subclass_keeps_its_per_channel_parameters_in_step():
    """timm's ScaledStdConv2d holds a ``gain`` per output channel; it loses the removed channels with the weight."""

    class GainConv(nn.Conv2d):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.gain = nn.Parameter(torch.arange(float(self.out_channels)).view(-1, 1, 1, 1))

        def forward(self, x):
            return self._conv_forward(x, self.weight * self.gain, self.bias)

    model = nn.Sequential(GainConv(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    graph = DependencyGraph(model, torch.randn(1, 3, 8, 8))
    group = next(g for g in graph.groups if g.root == "0")
    graph.prune({group.index: [1, 5]})
    assert model[0].gain.flatten().tolist() == [0, 2, 3, 4, 6, 7]
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 4, 4, 4)


def test_a_removal_torch_pruning_cannot_do_is_an_architecture_error(monkeypatch):
    import torch_pruning as tp

    def fail(self, layer, idxs):
        raise RuntimeError("no such layer")

    for name in ("prune_out_channels", "prune_in_channels"):  # one function under two names
        monkeypatch.setattr(tp.pruner.function.BatchnormPruner, name, fail)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3)).eval()
    graph = DependencyGraph(model, torch.randn(1, 3, 8, 8))
    group = next(g for g in graph.groups if g.root == "0")
    with pytest.raises(ArchitectureError, match=r"Torch-Pruning cannot remove channels of group 0 \(RuntimeError: no such"):
        graph.prune({group.index: [0, 1]})


class UnevenBlocks(nn.Module):
    """cat(a: 4 ch, b: 6 ch from a conv with 3 groups) + c (10 ch) -> fc: 3 blocks do not divide the 10 channels."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1, groups=3)
        self.c = nn.Conv2d(3, 10, 1)
        self.fc = nn.Conv2d(10, 5, 1)

    def forward(self, x):
        return self.fc(torch.cat([self.a(x), self.b(x)], 1) + self.c(x)).mean((2, 3))


def test_blocks_that_do_not_divide_a_group_make_it_unprunable():
    graph = DependencyGraph(UnevenBlocks().eval(), torch.randn(1, 3, 4, 4))
    (group,) = [g for g in graph.groups if g.root in ("a", "b", "c")]
    assert (group.channels, group.blocks, group.prunable) == (10, 3, False)
    assert group.reason == "its grouped layers need 3 equal blocks, which 10 channels do not make"


def _items(group, exact: bool) -> dict:
    return {(item.dep.target, item.dep.handler): (list(item.idxs), list(item.root_idxs)) if exact else set(item.idxs)
            for item in group.items}


@pytest.mark.parametrize(("build", "exact"), [
    (lambda: M.WidenAndAdd(blocks=3), False), (M.ConcatBranches, True), (M.ChannelSlice, True),
    (M.FlattenLinear, True), (M.ResidualAdd, True),
])
def test_the_group_walk_finds_what_torch_pruning_finds(build, exact):
    """Each (layer, handler, index) is walked once, and every group holds the same items and indices as Torch-Pruning's
    own walk, in the same order with the same root indices. In WidenAndAdd one index of a layer is reached from
    several root channels (the adds couple them); the root index kept for it, the first walked, depends on the order
    of the walk, so there the indices are compared as sets. (A split's parts are mapped by our walk alone, from the
    trace: the tricky models ChunkBranches and C2fBlock check them.)"""
    import torch_pruning as tp

    model = build().eval()
    graph = DependencyGraph(model, M.example(type(model)))
    raw = graph._graph
    for group in graph.groups:
        root = graph.module(group.root)
        fn = raw.get_pruner_of_module(root).prune_out_channels
        ours = raw.get_pruning_group(root, fn, list(range(group.channels)))
        theirs = tp.DependencyGraph.get_pruning_group(raw, root, fn, list(range(group.channels)))
        assert _items(ours, exact) == _items(theirs, exact), group.root


def test_a_long_chain_of_widening_blocks_traces():
    """Torch-Pruning's walk grows with every subset of indices it is handed (7 blocks: 20 s, and about sevenfold for
    each block more); ours visits each index once."""
    graph = DependencyGraph(M.WidenAndAdd(blocks=10).eval(), M.example(M.WidenAndAdd), timeout=60)
    reasons = {g.root: g.reason for g in graph.groups}  # the adds couple every layer into the last block's group
    assert reasons == {"fc": "feeds the model output",
                       "blocks.9": M.SLICE}


def test_an_op_whose_mapping_cannot_be_inferred_holds_only_the_groups_through_it(monkeypatch):
    """A concat whose input widths Torch-Pruning cannot infer (it summed None and raised, failing the whole trace:
    timm's CoaT, CSPNet) and the trace does not record (a torch without autograd's input metadata): the branches
    it joins stay, the layers elsewhere prune."""
    from torch_pruning.dependency import shape_infer

    from prunecli.graph import torch_pruning_graph

    monkeypatch.setattr(shape_infer, "infer_channels_between", lambda graph, a, b: None)
    monkeypatch.setattr(torch_pruning_graph, "_traced_concat_sizes", lambda node, unwrapped: None)
    graph = DependencyGraph(M.ConcatBranches().eval(), M.example(M.ConcatBranches))
    held = {g.root: g for g in graph.groups if not g.prunable}
    assert set(held) == {"branch_b", "fc"}  # unmapped, the concat couples the branches index by index: one group
    assert set(held["branch_b"].layers("out")) == {"branch_a", "bn_a", "branch_b", "bn_b"}
    assert held["branch_b"].reason == ("passes through a concat whose channel mapping cannot be inferred "
                                "(TypeError: unsupported operand type(s) for +: 'int' and 'NoneType')")
    assert {g.root for g in graph.groups if g.prunable} == {"stem", "merge"}
    merge = next(g for g in graph.groups if g.root == "merge")
    graph.prune({merge.index: [0, 1]})
    assert graph.module("merge").out_channels == 14 and graph.module("fc").in_features == 14

    import torch_pruning as tp

    with pytest.raises(TypeError):  # Torch-Pruning's own graphs (its pruners build them) behave as they did
        tp.DependencyGraph().build_dependency(M.ConcatBranches().eval(), M.example(M.ConcatBranches))


def test_a_skip_concat_behind_shared_prelus_is_mapped_from_the_traced_widths():
    """MONAI's UNet (issue 26): Torch-Pruning inferred no width for a one-slope PReLU's output and held every skip;
    the traced widths place inner's channels at merge's inputs 8..19, and removal keeps the forward exact."""
    cls = M.SkipConcatPReLU
    model, graph = build(cls)
    for key, want in cls.EXPECTED_GROUPS.items():
        group = M.find_group(graph.groups, key)
        assert (set(group.layers("out")), set(group.layers("in")), group.reason) == (want.out, want.ins, want.reason)
    for (key, consumer), indices in cls.EXPECTED_IN_INDICES.items():
        member = next(m for m in M.find_group(graph.groups, key).members if m.layer == consumer)
        assert member.indices == indices
    model = M.randomise_norms(model).to(torch.float64)
    x = M.example(cls, dtype=torch.float64)
    graph = DependencyGraph(copy.deepcopy(model), x)
    plan = {M.find_group(graph.groups, key).index: M.spread_positions(M.find_group(graph.groups, key).channels, 1, n)
            for key, n in cls.PLAN.items()}
    dead = M.kill_and_prune(model, graph, plan)
    shapes = {name: tuple(p.shape) for name, p in graph.model.named_parameters() if name.endswith("weight")}
    assert shapes == {f"{name}.weight": shape for name, shape in cls.EXPECTED_SHAPES.items()}
    with torch.no_grad():
        torch.testing.assert_close(graph.model.eval()(x), dead.eval()(x))


def test_a_concat_whose_first_operand_is_not_traced_is_held():
    """cat([input, conv(x)]): Torch-Pruning's offsets count traced operands only and put conv's channels at merge's
    inputs 0..7 (they are 3..10); such a concat is held, with the reason, and the layers after it still prune."""
    _, graph = build(M.InputConcat)
    reasons = {g.root: g.reason for g in graph.groups}
    assert reasons == {"head": "feeds the model output", "merge": "",
                       "conv": "passes through a concat whose channel mapping cannot be inferred "
                               "(TypeError: an untraced operand (input, constant) precedes a traced one)"}


def test_a_group_that_spreads_past_the_limit_is_held(monkeypatch):
    """Reshapes that Torch-Pruning reads as flattens can spread one group over millions of positions; past
    MAX_SPREAD the group is held with the reason and its walk stops. conv's group reaches fc1's 128 inputs; fc1's
    group (16 channels into fc2) stays well under 64."""
    from prunecli.graph import torch_pruning_graph

    monkeypatch.setattr(torch_pruning_graph, "MAX_SPREAD", 64)
    graph = DependencyGraph(M.FlattenLinear().eval(), M.example(M.FlattenLinear))
    reasons = {g.root: g.reason for g in graph.groups}
    assert reasons["conv"] == "its channels spread over 64 positions through reshapes read as flattens"
    assert reasons["fc1"] == ""


def test_a_layer_whose_channels_each_feed_two_root_channels_makes_blocks():
    """GhostModule: removing root position j must take j + 6 too, as blocks do; zeroing exactly those channels and
    pruning them leaves the output unchanged."""
    torch.manual_seed(0)
    model = M.GhostModule().eval()
    x = M.example(M.GhostModule)
    graph = DependencyGraph(model, x)
    group = next(g for g in graph.groups if g.root == "conv_dw")
    assert (group.channels, group.blocks, group.prunable) == (12, 2, True)
    assert {m.layer for m in group.members if m.dim == "out"} == {"primary", "cheap", "conv_dw"}
    with torch.no_grad():
        for layer, rows in (("primary", [1, 4]), ("cheap", [1, 4]), ("conv_dw", [1, 4, 7, 10])):
            getattr(model, layer).weight[rows] = 0
        want = model(x)
    graph.prune({group.index: [1, 4, 7, 10]})
    assert (model.primary.out_channels, model.cheap.out_channels, model.conv_dw.out_channels) == (4, 4, 8)
    assert model.pw.in_channels == 8
    with torch.no_grad():
        torch.testing.assert_close(model(x), want)


def test_a_feature_map_shaped_parameter_is_pruned_along_its_channels():
    """A position embedding of shape (1, C, H, W) added to a conv's output (timm's Visformer): removing channels of the
    conv removes the same channels of the embedding, and removing channels that are zero everywhere changes nothing."""

    class PosEmbed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.pos = nn.Parameter(torch.randn(1, 8, 4, 4))
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.head(torch.relu(self.conv(x) + self.pos)).mean((2, 3))

    torch.manual_seed(0)
    model = PosEmbed().eval()
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        model.conv.weight[[2, 6]] = 0
        model.conv.bias[[2, 6]] = 0
        model.pos[:, [2, 6]] = 0
        want = model(x)
    graph = DependencyGraph(model, x)
    group = next(g for g in graph.groups if g.root == "conv")
    graph.prune({group.index: [2, 6]})
    assert model.pos.shape == (1, 6, 4, 4) and model.head.in_channels == 6
    with torch.no_grad():
        torch.testing.assert_close(model(x), want)


def test_a_token_shaped_parameter_keeps_its_last_dimension_as_channels():
    """NesT's position embedding is (1, blocks, tokens, C): not a square feature map, so its channels stay the last
    dimension (Torch-Pruning's default) and follow the linear layer it is added to."""

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(3, 8)
            self.pos = nn.Parameter(torch.randn(1, 2, 5, 8))
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            return self.head(torch.relu(self.embed(x) + self.pos)).mean((1, 2))

    model = Tokens().eval()
    x = torch.randn(2, 2, 5, 3)
    graph = DependencyGraph(model, x)
    group = next(g for g in graph.groups if g.root == "embed")
    graph.prune({group.index: [0, 3]})
    assert model.pos.shape == (1, 2, 5, 6) and model.head.in_features == 6
    assert model(x).shape == (2, 4)


class ChunkOfConcat(nn.Module):
    """cat(left: 4 ch, right: 4 ch) -> chunk(2) -> e, f; g reads the whole concat."""

    def __init__(self):
        super().__init__()
        self.left, self.right = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.e, self.f, self.g = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1), nn.Conv2d(8, 2, 1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        z = torch.cat([torch.relu(self.left(x)), torch.relu(self.right(x))], 1)
        e, f = z.chunk(2, 1)
        return self.fc(torch.cat([self.e(e).mean((2, 3)), self.f(f).mean((2, 3)), self.g(z).mean((2, 3))], 1))


def test_a_chunk_of_a_concat_holds_the_groups_it_cuts(monkeypatch):
    """Removing left's channels would move right's across chunk's cut, so a split whose input is not one group's
    channels in order holds the groups. Torch-Pruning's width inference holds this concat anyway (it reads a split's
    last part as the width after the concat): without it, the split's own rule holds left and right."""
    from torch_pruning.dependency import shape_infer

    reasons = {g.root: g.reason for g in DependencyGraph(ChunkOfConcat().eval(), torch.randn(1, 3, 8, 8)).groups}
    assert reasons["right"] == ("passes through a concat whose channel mapping cannot be inferred "
                                "(TypeError: the width read after it is not its inputs' sum)")
    monkeypatch.setattr(shape_infer, "infer_in_channels_recursively", lambda graph, node, recursive_depth: None)
    graph = DependencyGraph(ChunkOfConcat().eval(), torch.randn(1, 3, 8, 8))
    held = "split into parts that hold other channels too (the split's input is not this group's channels in order)"
    assert {g.root: g.reason for g in graph.groups} == {"fc": "feeds the model output", "e": "", "f": "", "g": "",
                                                        "left": held, "right": held}
    assert {g.root: set(g.layers("in")) for g in graph.groups if g.reason == held} == {"left": {"e", "g"},
                                                                                      "right": {"f", "g"}}


class ChunkIntoGroupedConvs(nn.Module):
    """stem (8 ch) -> chunk(2) -> each half into a conv in two groups of 2 -> concat -> fc: Res2NeXt's block in
    small (timm res2next50, where removing the stem's channels misplaced positions within the grouped convs)."""

    INPUT_SHAPE = (3, 6, 6)

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.ga, self.gb = nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        a, b = torch.relu(self.stem(x)).chunk(2, 1)
        return self.fc(torch.cat([self.ga(a), self.gb(b)], 1).mean((2, 3)))


def test_chunk_parts_that_grouped_convs_read_stay_whole_and_the_rest_prunes_exactly():
    model, graph = build(ChunkIntoGroupedConvs)
    stem, ga = M.find_group(graph.groups, "stem"), M.find_group(graph.groups, "ga")
    assert (stem.prunable, stem.reason) == (False, "split into parts that grouped convolutions read")
    assert (ga.prunable, ga.channels, ga.blocks) == (True, 4, 2)
    x = M.example(ChunkIntoGroupedConvs)
    dead = M.kill_and_prune(model, graph, {ga.index: M.spread_positions(4, 2, 2)})
    assert tuple(graph.model.ga.weight.shape) == (2, 2, 3, 3) and graph.model.fc.in_features == 6
    with torch.no_grad():
        torch.testing.assert_close(graph.model.eval()(x), dead.eval()(x))
