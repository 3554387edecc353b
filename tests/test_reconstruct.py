"""Reconstruction (``prune --reconstruct``) and the ``recon`` criterion: closed forms, exact cases, artifacts, CLI."""

from __future__ import annotations

import copy
import hashlib
import json
import threading

import models as M
import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from typer.testing import CliRunner

from prunecli.cli import app
from prunecli.config import ReconstructOptions
from prunecli.criteria import get_criterion
from prunecli.criteria.base import score_with_data
from prunecli.errors import OptionError
from prunecli.graph import DependencyGraph
from prunecli.io.slim import load, read_slim_metadata, save_slim
from prunecli.outputs import output_tensors
from prunecli.reconstruct import reconstruct
from prunecli.reconstruct.least_squares import GramStatistics, LayerView, removal_errors, ridge_fit

runner = CliRunner()
SAMPLE = "sample_models/resnet20_fmnist.safetensors"
CALIB = "sample_models/fmnist_calib.safetensors"


def squared_error(model: nn.Module, original: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """How far ``model``'s outputs on ``x`` are from ``original``'s."""
    with torch.no_grad():
        pairs = zip(output_tensors(model(x)), output_tensors(original(x)), strict=True)
        return sum((got - want).square().sum() for got, want in pairs)


def closed_form(x: np.ndarray, y: np.ndarray, prior: np.ndarray, ridge: float) -> np.ndarray:
    """argmin |[x 1] W^T - y|^2 + |Lambda^1/2 (W - prior)|^2, Lambda = ridge * mean diag (bias: 1e-6 of that)."""
    xa = np.hstack([x, np.ones((len(x), 1))])
    gram = xa.T @ xa
    lam = ridge * np.mean(np.diag(gram)[:-1])
    diagonal = np.full(xa.shape[1], lam)
    diagonal[-1] *= 1e-6
    return np.linalg.solve(gram + np.diag(diagonal), xa.T @ y + diagonal[:, None] * prior.T).T


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(6, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))


def test_linear_refit_equals_the_closed_form_ridge_solution():
    original = TwoLinear().double()
    pruned = copy.deepcopy(original)
    kept = [0, 1, 3]
    with torch.no_grad():
        pruned.l1 = nn.Linear(6, 3).double()
        pruned.l1.weight.copy_(original.l1.weight[kept])
        pruned.l1.bias.copy_(original.l1.bias[kept])
        pruned.l2 = nn.Linear(3, 3).double()
        pruned.l2.weight.copy_(original.l2.weight[:, kept])
        pruned.l2.bias.copy_(original.l2.bias)
    prior = torch.cat([pruned.l2.weight, pruned.l2.bias[:, None]], 1).detach().numpy()
    x = torch.randn(200, 6, dtype=torch.float64)
    report = reconstruct(original, pruned, {"l1": kept}, list(x.split(50)), ReconstructOptions(ridge=0.05, holdout_every=0))
    with torch.no_grad():
        hidden, target = torch.relu(pruned.l1(x)).numpy(), original(x).numpy()
    expected = closed_form(hidden, target, prior, 0.05)
    np.testing.assert_allclose(pruned.l2.weight.detach().numpy(), expected[:, :-1], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(pruned.l2.bias.detach().numpy(), expected[:, -1], rtol=1e-9, atol=1e-12)
    fits = {f.layer: f for f in report.layers}
    assert not fits["l1"].refit  # its kept outputs are already exact: nothing to gain
    assert fits["l2"].refit and fits["l2"].bias == "refit" and fits["l2"].error_after < fits["l2"].error_before
    assert report.images == 200


@pytest.mark.parametrize(
    "conv",
    [
        dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
        dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, groups=2),
        dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4),
        dict(in_channels=3, out_channels=5, kernel_size=3, stride=2, dilation=2, padding=2),
        dict(in_channels=3, out_channels=5, kernel_size=3, padding=1, padding_mode="reflect"),
        dict(in_channels=3, out_channels=5, kernel_size=(1, 3), padding="same"),
    ],
    ids=["plain", "grouped", "depthwise", "strided-dilated", "reflect", "same"],
)
def test_conv_fit_recovers_the_weights_that_made_the_targets(conv):
    """Targets made by a known conv are fit exactly (every group on its own inputs, every padding mode)."""
    truth = nn.Conv2d(**conv).double()
    view = LayerView(nn.Conv2d(**conv).double())
    x = torch.randn(8, conv["in_channels"], 9, 9, dtype=torch.float64)
    stats = GramStatistics(view.groups, view.inputs, conv["out_channels"] // view.groups)
    with torch.no_grad():
        stats.add(view.columns(x), view.targets(truth(x), None))
    solution = ridge_fit(stats, view.matrix(), 1e-12)
    expected = torch.cat([truth.weight.reshape(view.groups, -1, view.inputs), truth.bias.reshape(view.groups, -1, 1)], 2)
    torch.testing.assert_close(solution, expected.detach(), rtol=1e-6, atol=1e-8)
    assert stats.error(solution) < 1e-12


def test_a_singular_system_gives_no_fit():
    stats = GramStatistics(1, 2, 1)
    stats.gram[:] = -torch.eye(3, dtype=torch.float64)  # not positive definite at any ridge tried
    assert ridge_fit(stats, torch.zeros(1, 1, 3), 1e-3) is None


class LinearlyDependent(nn.Module):
    """conv1's channel 3 is channel 0 + 2 x channel 1, so after BN it is an affine mix of BN'd channels 0 and 1."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 2)
        with torch.no_grad():
            self.conv1.weight[3] = self.conv1.weight[0] + 2 * self.conv1.weight[1]

    def forward(self, x):
        x = torch.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        return self.fc(x.mean((2, 3)))


def test_removing_a_linear_combination_and_reconstructing_leaves_the_output_unchanged():
    original = M.randomise_norms(LinearlyDependent()).eval().double()
    x = torch.randn(64, 3, 8, 8, dtype=torch.float64)
    graph = DependencyGraph(copy.deepcopy(original), x[:2])
    group = M.find_group(graph.groups, "conv1")
    plan = {group.index: [3]}
    kept = graph.kept_outputs(plan)
    assert kept == {"conv1": [0, 1, 2]}
    graph.prune(plan)
    pruned = graph.model.eval()
    with torch.no_grad():
        reference, before = original(x), pruned(x)
    assert not torch.allclose(before, reference, atol=1e-3)  # the channel mattered
    threads = threading.active_count()
    report = reconstruct(original, pruned, kept, list(x.split(16)), ReconstructOptions(ridge=1e-10),
                         graph.sole_norm_consumer)
    assert threading.active_count() == threads  # every paused forward has finished
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), reference, rtol=1e-6, atol=1e-7)
    fits = {f.layer: f for f in report.layers}
    assert fits["conv2"].refit and fits["conv2"].bias == "folded into bn2"
    assert pruned.conv2.bias is None  # the bias went into bn2's running mean: no new parameter
    assert fits["conv2"].error_after < 1e-12 < fits["conv2"].error_before


class ConvRelu(nn.Module):
    """A bias-free conv read by a ReLU, not a norm: a fitted bias must become a parameter."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1, bias=False)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


def conv_relu(**kwargs):
    return ConvRelu()


def test_an_added_bias_round_trips_through_the_slim_file_strictly(tmp_path):
    original = ConvRelu().eval()
    x = torch.randn(128, 1, 8, 8)
    graph = DependencyGraph(copy.deepcopy(original), x[:1])
    plan = {M.find_group(graph.groups, "conv1").index: [1, 4]}
    kept = graph.kept_outputs(plan)
    graph.prune(plan)
    pruned = graph.model.eval()
    report = reconstruct(original, pruned, kept, list(x.split(32)), bias_sink=graph.sole_norm_consumer)
    assert {f.layer: f.bias for f in report.layers}["conv2"] == "added"
    assert pruned.conv2.bias is not None and pruned.conv2.bias.shape == (4,)
    path = save_slim(pruned, tmp_path / "slim.safetensors", arch=f"{__file__}:conv_relu", input_shape=(1, 8, 8))
    reloaded = load(path, trust_code=True)  # the strict load names any missing or unexpected key
    assert reloaded.conv2.bias is not None
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), pruned(x))


@pytest.mark.parametrize("cls", M.TRICKY_MODELS, ids=lambda c: c.__name__)
def test_reconstruction_keeps_dead_channel_pruning_exact_and_repairs_live_pruning(cls):
    """On every tricky model: removing dead channels stays exact through reconstruction; removing live ones, the
    refit brings the output closer to the original's."""
    model = M.randomise_norms(cls()).eval().double()
    x = torch.randn(96, *cls.INPUT_SHAPE, dtype=torch.float64)
    graph = DependencyGraph(copy.deepcopy(model), x[:2])
    plan = {}
    for i, (key, remove) in enumerate(cls.PLAN.items()):
        group = M.find_group(graph.groups, key)
        plan[group.index] = M.spread_positions(group.channels, group.blocks, remove, seed=i)
    live_graph = DependencyGraph(copy.deepcopy(model), x[:2])
    kept = graph.kept_outputs(plan)
    dead = M.kill_and_prune(model, graph, plan)
    reconstruct(dead, graph.model, kept, list(x.split(32)), ReconstructOptions(ridge=1e-8), graph.sole_norm_consumer)
    with torch.no_grad():
        torch.testing.assert_close(graph.model(x), dead(x))
    live_graph.prune(plan)
    live = live_graph.model.eval()
    error_before = squared_error(live, model, x)
    report = reconstruct(model, live, kept, list(x.split(32)), bias_sink=live_graph.sole_norm_consumer)
    assert any(f.refit for f in report.layers)
    assert squared_error(live, model, x) < error_before


def test_reconstruction_with_fewer_images_than_inputs_falls_back_on_the_ridge():
    """Two images for a 96-input layer: the ridge towards the pruned weights keeps the system solvable."""
    original = ConvRelu().eval()
    x = torch.randn(2, 1, 4, 4)
    graph = DependencyGraph(copy.deepcopy(original), x[:1])
    plan = {M.find_group(graph.groups, "conv1").index: [0]}
    kept = graph.kept_outputs(plan)
    graph.prune(plan)
    report = reconstruct(original, graph.model, kept, [x], ReconstructOptions(holdout_every=2))
    assert "conv2" in {f.layer for f in report.layers}
    assert all(np.isfinite(p.detach().numpy()).all() for p in graph.model.parameters())


def test_options_refuse_bad_values():
    with pytest.raises(OptionError, match="--recon-ridge"):
        ReconstructOptions(ridge=0)
    with pytest.raises(OptionError, match="hold-out"):
        ReconstructOptions(holdout_every=1)
    assert ReconstructOptions.from_dict(ReconstructOptions(ridge=0.5).to_dict()) == ReconstructOptions(ridge=0.5)


def test_removal_errors_equal_a_brute_force_refit_without_each_channel():
    """OBS in block form: the error left after dropping a unit and refitting the rest by least squares."""
    layer = nn.Linear(5, 3).double()
    view = LayerView(layer)
    x = torch.randn(400, 5, dtype=torch.float64) + torch.arange(5.0, dtype=torch.float64)  # non-zero means
    stats = GramStatistics(1, 5, None)
    stats.add(x.T[None, None])  # [B=1, G=1, D=5, L=400]
    units = [[0], [1], [2], [3], [4], [2, 3], [0, 4]]
    errors = torch.cat([removal_errors(view, stats, units[:5], ridge=1e-12),  # one call per width of unit
                        removal_errors(view, stats, units[5:], ridge=1e-12)])
    with torch.no_grad():
        y = layer(x)
    for unit, error in zip(units, errors, strict=True):
        rest = [c for c in range(5) if c not in unit]
        design = torch.cat([x[:, rest], torch.ones(len(x), 1, dtype=torch.float64)], 1)
        solution = torch.linalg.lstsq(design, y).solution
        expected = (design @ solution - y).square().sum()
        torch.testing.assert_close(error, expected, rtol=1e-7, atol=1e-9)


def test_a_channel_the_others_reproduce_costs_nothing_to_remove():
    layer = nn.Linear(4, 3).double()
    x = torch.randn(400, 4, dtype=torch.float64)
    x[:, 3] = x[:, 0] - 2 * x[:, 1] + 0.5  # affine in channels 0 and 1: the bias column takes the 0.5
    stats = GramStatistics(1, 4, None)
    stats.add(x.T[None, None])
    errors = removal_errors(LayerView(layer), stats, [[0], [1], [2], [3]], ridge=1e-9)
    assert errors[[0, 1, 3]].max() < 1e-6 * errors[2]  # any one of 0, 1, 3 is rebuilt from the other two


def test_recon_criterion_ranks_channels_by_their_refit_error():
    """Group scores: the consumer's removal error of each channel, normalised like every criterion's."""
    model = TwoLinear().double().eval()
    x = torch.randn(300, 6, dtype=torch.float64)
    graph = DependencyGraph(model, x[:2])
    group = M.find_group(graph.groups, "l1")
    scores = score_with_data(get_criterion("recon")(), graph, [group], ((b, None) for b in x.split(100)))[group.index]
    with torch.no_grad():
        hidden = torch.relu(model.l1(x))
    stats = GramStatistics(1, 4, None)
    stats.add(hidden.T[None, None])
    expected = removal_errors(LayerView(model.l2), stats, [[0], [1], [2], [3]], 1e-3)
    torch.testing.assert_close(scores, expected / expected.mean())


def test_cli_prune_reconstruct_writes_a_reloadable_model_and_reports_the_fit(tmp_path):
    out = tmp_path / "slim.safetensors"
    result = runner.invoke(app, ["prune", SAMPLE, "--flops-target", "0.5", "--reconstruct", "--data", CALIB,
                                 "--calib-images", "128", "--method", "recon", "-o", str(out), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    recon = payload["reconstruction"]
    assert recon["images"] == 128 and recon["layers_refit"] >= 15
    assert recon["mean_error_after"] < recon["mean_error_before"]
    model = load(out)
    document = read_slim_metadata(out)
    assert document["reconstruct"]["layers_refit"] == recon["layers_refit"]
    assert document["config"]["recovery"]["reconstruct"] == ReconstructOptions().to_dict()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "--soft-epochs and --allocation sensitivity need images: pass --data"),
        (["--method", "edp", "--data", CALIB], "--reconstruct does not apply to --method edp"),
        (["--data", CALIB, "--recon-ridge", "0"], "--recon-ridge 0.0 must be positive"),
    ],
)
def test_cli_reconstruct_bad_input_is_one_line_and_writes_nothing(tmp_path, extra, message):
    out = tmp_path / "slim.safetensors"
    result = runner.invoke(app, ["prune", SAMPLE, "--flops-target", "0.5", "--reconstruct", "-o", str(out), *extra])
    assert result.exit_code == 2, result.output  # usage errors
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def tiny_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=10)
    nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero: every output would be 0
    return model


@pytest.mark.parametrize(
    ("build", "shape"),
    [
        (lambda: torchvision.models.resnet18(weights=None, num_classes=10), (3, 64, 64)),
        (lambda: torchvision.models.mobilenet_v2(weights=None, num_classes=10), (3, 64, 64)),
        (lambda: torchvision.models.efficientnet_b0(weights=None, num_classes=10), (3, 64, 64)),
        (tiny_vit, (3, 32, 32)),
    ],
    ids=["resnet18", "mobilenet_v2", "efficientnet_b0", "vit"],
)
def test_reconstruction_brings_real_architectures_closer_to_the_original(build, shape, one_thread):
    """Residual, depthwise + squeeze-excite and ViT blocks: a quarter of every group removed, then reconstructed."""
    model = M.randomise_norms(build()).eval()
    x = torch.randn(48, *shape)
    graph = DependencyGraph(copy.deepcopy(model), x[:1])
    plan = {}
    for group in graph.groups:
        per_block = group.channels // group.blocks
        if group.prunable and per_block >= 4:
            plan[group.index] = M.spread_positions(group.channels, group.blocks, per_block // 4 * group.blocks, group.index)
    kept = graph.kept_outputs(plan)
    graph.prune(plan)
    pruned = graph.model.eval()
    before = squared_error(pruned, model, x)
    report = reconstruct(model, pruned, kept, list(x.split(16)), bias_sink=graph.sole_norm_consumer)
    assert sum(f.refit for f in report.layers) >= 4
    assert squared_error(pruned, model, x) < 0.8 * before
    if isinstance(model, torchvision.models.VisionTransformer):
        assert any("functional" in why for why in report.skipped.values())  # attention's out_proj


def test_cli_reconstruct_writes_the_same_bytes_twice(tmp_path):
    """The lockstep threads compute one at a time in a fixed order: the same command gives the same file."""
    out = tmp_path / "slim.safetensors"
    args = ["prune", SAMPLE, "--flops-target", "0.5", "--reconstruct", "--data", CALIB, "--calib-images", "64",
            "-o", str(out), "--force", "-q", "--device", "cpu"]
    digests = []
    for _ in range(2):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]
