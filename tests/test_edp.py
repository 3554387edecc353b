"""EDP (prunecli/methods/edp/): exact swap and merge, the proximal step, the merge-aware budget, exact Pruning &
Merging, a short training run that reaches the budget, the slim round trip and the refusals."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import models as M
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.testing import assert_close
from typer.testing import CliRunner

from prunecli.allocate import Plan
from prunecli.budget import parse_budget
from prunecli.cli import app
from prunecli.config import EdpOptions, FinetuneConfig, PlanOptions, ScoringOptions
from prunecli.graph import DependencyGraph
from prunecli.io.data import ImageSet
from prunecli.io.slim import load, save_slim
from prunecli.layers import DecomposedConv, decomposed_layers
from prunecli.measure import CostModel, layer_costs, totals
from prunecli.methods.edp import edp_prune
from prunecli.methods.edp.blocks import (
    MergeAwareCost,
    decomposable,
    decompose,
    eligible_groups,
    group_slices,
    merge_unprofitable,
)
from prunecli.methods.edp.group_lasso import proximal_group_lasso
from prunecli.methods.edp.prune_merge import prune_and_merge
from prunecli.planning import Selection
from prunecli.samples import resnet20

# what prune --method edp --flops-target 0.5 plans with
HALF_MACS = Selection(parse_budget("macs", "0.5"), PlanOptions("global"), ScoringOptions("edp"))

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_models" / "resnet20_fmnist.safetensors"
CALIB = ROOT / "sample_models" / "fmnist_calib.safetensors"


pytestmark = pytest.mark.usefixtures("one_thread")


def conv(in_channels=6, out_channels=5, bias=True, **geometry) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(in_channels, out_channels, 3, bias=bias, **{"padding": 1, **geometry})


@pytest.mark.parametrize("init", ["svd", "identity"])
@pytest.mark.parametrize("geometry", [{}, {"stride": 2, "dilation": 2, "padding": 2}, {"padding_mode": "reflect"}])
def test_block_computes_what_the_conv_computed(init, geometry):
    layer = conv(**geometry)
    block = DecomposedConv.of(layer, init)
    x = torch.randn(2, 6, 9, 9)
    assert block.rank == (5 if init == "identity" else min(5, 6 * 9))
    assert block.coeff.bias is not None and block.basis.bias is None
    tolerance = 1e-6 if init == "identity" else 1e-5  # identity: only the bias is added in another order
    assert_close(block(x), layer(x), rtol=tolerance, atol=tolerance)


def test_svd_rank_is_bounded_by_the_filter_size():
    block = DecomposedConv.of(nn.Conv2d(1, 16, 3), "svd")  # 16 filters in a 9-dimensional space
    assert block.rank == 9 and tuple(block.coeff.weight.shape) == (16, 9, 1, 1)


def test_merge_is_exact_and_follows_the_mac_rule():
    layer = conv(16, 16)
    block = DecomposedConv.of(layer, "svd")
    x = torch.randn(2, 16, 7, 7)
    assert_close(block.merged()(x), layer(x), rtol=1e-5, atol=1e-5)
    # rank 4: 4 * (16*9 + 16) = 640 MACs per position < 16*16*9 = 2304, so decomposing pays
    small = DecomposedConv(layer, 16, 16, 4)
    assert small.saves_macs()
    assert_close(small.merged()(x), small(x), rtol=1e-5, atol=1e-5)
    # rank 15: 15 * 160 = 2400 >= 2304, so it is merged back
    assert not DecomposedConv(layer, 16, 16, 15).saves_macs()


def test_proximal_step_by_hand():
    block = DecomposedConv(conv(2, 2), 2, 2, 2)
    with torch.no_grad():
        block.coeff.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 0.1]])[:, :, None, None])
    proximal_group_lasso({"b": block}, 1.0)
    # rows: [3, 4] (norm 5) * 0.8 = [2.4, 3.2]; [0, 0.1] (norm 0.1 < 1) -> 0
    # columns: [2.4, 0] (norm 2.4) * (1 - 1/2.4) = [1.4, 0]; [3.2, 0] * (1 - 1/3.2) = [2.2, 0]
    assert_close(block.coeff.weight[:, :, 0, 0], torch.tensor([[1.4, 2.2], [0.0, 0.0]]))


def decomposed_residual(init="svd"):
    model = M.randomise_norms(M.ResidualAdd()).eval()
    x = M.example(M.ResidualAdd, batch=4)
    reference = model(x)
    decompose(model, decomposable(model), init)
    return model, x, reference


def test_decomposing_a_model_keeps_its_outputs():
    model, x, reference = decomposed_residual()
    assert sorted(decomposed_layers(model)) == ["conv1", "conv2", "head", "stem"]
    with torch.no_grad():
        assert_close(model(x), reference, rtol=1e-5, atol=1e-5)
    sample = resnet20(num_classes=10, in_channels=1).eval()
    y = torch.randn(2, 1, 28, 28)
    expected = sample(y)
    decompose(sample, decomposable(sample, ignore=("layer3.*",)), "svd")
    assert not any(name.startswith("layer3") for name in decomposed_layers(sample))
    with torch.no_grad():
        assert_close(sample(y), expected, rtol=1e-4, atol=1e-4)


def zero_channels(graph, group, positions):
    """What EDP's training leaves for a selected channel: its whole group of parameters at zero."""
    with torch.no_grad():
        for s in group_slices(graph, group):
            rows = torch.as_tensor([i for i, r in zip(s.index.tolist(), s.roots.tolist(), strict=True) if r in positions])
            if len(rows):
                s.param.index_fill_(s.dim, rows, 0.0)


def test_prune_and_merge_of_zeroed_groups_is_exact_and_meets_the_predicted_cost():
    model, x, _ = decomposed_residual()
    graph = DependencyGraph(model, x[:1])
    blocks = decomposed_layers(model)
    groups = eligible_groups(graph, blocks)
    cost_model = CostModel(model, layer_costs(model, x[:1]), graph.groups)
    by_root = {name: g for g in graph.groups for name in g.layers("out")}
    # the residual group of stem (8 channels) loses 3; conv1's rank group (SVD rank min(16, 8*9) = 16) loses 12
    # basis filters, so conv1 stays decomposed (4 * (5*9 + 16) < 16 * 5*9); head's output channels lose 5
    plan = {by_root["stem.coeff"].index: (0, 3, 5), by_root["conv1.basis"].index: tuple(range(4, 16)),
            by_root["head.coeff"].index: (1, 2, 6, 7, 11)}
    assert {g.index for g in groups} >= set(plan)
    for index, positions in plan.items():
        zero_channels(graph, next(g for g in graph.groups if g.index == index), set(positions))
    with torch.no_grad():
        before = model(x)
    keep = {g.index: g.channels - len(plan.get(g.index, ())) for g in graph.groups}
    predicted = MergeAwareCost(cost_model, list(blocks)).evaluate(np.array([keep[g.index] for g in graph.groups]))

    record = prune_and_merge(graph, Plan(plan, keep, 0.0, 0.0), groups, x, threshold=0.0)
    slim = graph.model
    with torch.no_grad():
        assert_close(slim(x), before, rtol=1e-5, atol=1e-5)
    assert record.max_output_change < 1e-5
    assert record.channels_removed == 8 and record.basis_removed == 12
    assert record.decomposed == {"conv1": 4}
    assert sorted(record.merged) == ["conv2", "head", "stem"]
    assert isinstance(slim.stem, nn.Conv2d) and slim.stem.out_channels == 5 and slim.head.out_channels == 7
    measured = totals(slim, x[:1])
    assert (measured.macs, measured.params) == (predicted[0], predicted[1])


def test_a_dead_row_leaves_a_constant_that_is_folded_into_the_next_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    decompose(model, ["0"], "identity")
    with torch.no_grad():
        model[0].coeff.weight[1] = 0  # the paper's case: the row is zero, the bias is not
        model[0].coeff.bias[1] = 0.5  # so the channel is relu(0.5) = 0.5 everywhere
    x = torch.randn(3, 2, 8, 8)
    with torch.no_grad():
        before = model(x)
    graph = DependencyGraph(model, x[:1])
    groups = eligible_groups(graph, decomposed_layers(model))
    record = prune_and_merge(graph, Plan({}, {}, 0.0, 0.0), groups, x, threshold=5e-3)
    assert record.zero_rows_folded == 1 and model[0].out_channels == 3 and model[2].in_channels == 3
    with torch.no_grad():
        assert_close(model(x), before, rtol=1e-5, atol=1e-5)  # no padding in the consumer: the fold is exact


def test_slim_round_trip_keeps_decomposed_blocks(tmp_path):
    from prunecli.io.formats import load_model

    loaded = load_model(SAMPLE)
    model = loaded.model
    decompose(model, ["layer1.0.conv1", "layer2.0.conv2"], "svd")
    x = torch.randn(2, 1, 28, 28)
    graph = DependencyGraph(model, x[:1])
    by_root = {name: g for g in graph.groups for name in g.layers("out")}
    graph.prune({by_root["layer1.0.conv1.basis"].index: tuple(range(4, 16))})
    assert merge_unprofitable(model) == ["layer2.0.conv2"]  # full rank 32: 32 * (32*9 + 32) >= 32*32*9
    path = save_slim(model, tmp_path / "edp.safetensors", arch=loaded.arch, input_shape=(1, 28, 28))
    document = json.loads(safe_open(str(path), "pt").metadata()["prunecli"])
    assert document["decomposed"] == {"layer1.0.conv1": [16, 16, 4]}
    again = load(path)
    assert isinstance(again.layer1[0].conv1, DecomposedConv) and again.layer1[0].conv1.rank == 4
    assert again.layer1[0].conv1.basis.in_channels == 16 and again.layer1[0].conv1.coeff.out_channels == 16
    with torch.no_grad():
        assert_close(again(x), model.eval()(x), rtol=0, atol=0)


def labelled(n=192, seed=0) -> ImageSet:
    data = load_file(str(CALIB))
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(data["images"]), generator=generator)[:n]
    return ImageSet(data["images"][index], data["labels"][index].long(), "calib")


def test_short_training_reaches_the_budget_with_exact_zeros():
    from prunecli.io.slim import load as load_slim

    model = load_slim(SAMPLE)
    original = copy.deepcopy(model)
    x = torch.randn(1, 1, 28, 28)
    train = labelled()
    events = []
    result = edp_prune(model, x, train, None, EdpOptions(FinetuneConfig(epochs=2, lr=0.01, batch_size=64, device="cpu")),
                       HALF_MACS, progress=events.append)
    assert [e["epoch"] for e in events if e["event"] == "select"] == [0, 1]
    assert [s["epoch"] for s in result.selections] == [0, 1]
    base_macs = totals(original, x).macs
    for selection in result.selections:  # every selection is a plan that meets the budget after merging
        assert abs(selection["estimated_cost"] / base_macs - 0.5) < 0.01
    # no coefficient row or column is exactly zero when a selection is made (before training, and after epoch 1 of
    # 2): the proximal step (lr * lam = 1e-6 a step) zeroes none this soon, and the selected groups reach zero only
    # at the last step, so the exact zeros below are the steered decay's, not the lasso's
    assert [s["zero_coefficient_groups"] for s in result.selections] == [0, 0]
    # the selected groups were trained down to exact zeros, so removing them changed nothing
    assert result.prune_merge.max_output_change < 1e-4
    assert result.prune_merge.channels_removed > 0 and result.prune_merge.basis_removed > 0
    achieved = totals(result.model, x).macs / totals(original, x).macs
    assert abs(achieved - 0.5) < 0.01
    assert result.model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_resuming_a_finished_run_gives_the_same_slim_model(tmp_path):
    from prunecli.io.slim import load as load_slim

    x = torch.randn(1, 1, 28, 28)
    config = FinetuneConfig(epochs=2, lr=0.01, batch_size=64, device="cpu", checkpoint=tmp_path / "edp.pt")
    first = edp_prune(load_slim(SAMPLE), x, labelled(128), None, EdpOptions(config), HALF_MACS)
    again = edp_prune(load_slim(SAMPLE), x, labelled(128), None,
                      EdpOptions(FinetuneConfig(**{**vars(config), "resume": True})), HALF_MACS)
    assert again.plan == first.plan and again.selections == first.selections
    assert_close(again.model.state_dict(), first.model.state_dict(), rtol=0, atol=0)


def invoke(*args):
    return CliRunner().invoke(app, list(map(str, args)), catch_exceptions=False)


def test_cli_edp_writes_a_slim_model_that_reloads(tmp_path):
    out = tmp_path / "edp.safetensors"
    run = invoke("prune", SAMPLE, "--method", "edp", "--data", CALIB, "--val-data", CALIB, "--edp-epochs", "1",
                 "--flops-target", "0.6", "--batch-size", "128", "--device", "cpu", "-o", out, "--json")
    assert run.exit_code == 0, run.output
    result = json.loads(run.stdout)
    assert result["method"] == "edp" and result["allocation"] == "global"
    assert abs(result["macs_kept"] - 0.6) < 0.01
    slim = load(out)
    document = json.loads(safe_open(str(out), "pt").metadata()["prunecli"])
    assert document["edp"]["training"]["epochs"] == 1 and document["config"]["recovery"]["edp"]["lam"] == 1e-4
    assert document["edp"]["decomposed"] == {k: v[2] for k, v in document.get("decomposed", {}).items()}
    assert totals(slim, torch.randn(1, 1, 28, 28)).macs == result["after"]["macs"]
    # --val-data was evaluated after the epoch, and the metadata records it for the epoch whose weights were kept
    training = document["edp"]["training"]
    (epoch,) = training["history"]
    assert 0 < epoch["val_top1"] <= 1
    assert (training["best_epoch"], training["best_top1"]) == (1, epoch["val_top1"])


def test_cli_edp_shows_the_validation_top1_of_each_epoch(tmp_path):
    out = tmp_path / "edp.safetensors"
    run = CliRunner().invoke(app, list(map(str, (
        "prune", SAMPLE, "--method", "edp", "--data", CALIB, "--val-data", CALIB, "--edp-epochs", "2",
        "--flops-target", "0.6", "--batch-size", "128", "--device", "cpu", "-o", out))), env={"COLUMNS": "300"})
    assert run.exit_code == 0, run.output
    history = json.loads(safe_open(str(out), "pt").metadata()["prunecli"])["edp"]["training"]["history"]
    first, second = (f"{100 * h['val_top1']:.2f}%" for h in history)
    assert f"validation top-1 by epoch: 1: {first}, 2: {second} · the slim model has epoch 2's weights" in run.stdout


def test_the_prune_report_shows_validation_top1_by_epoch():
    from io import StringIO

    from rich.console import Console

    from prunecli.report.console import render_prune
    from prunecli.results import ModelSummary, PruneResult, Totals

    history = [{"epoch": 1, "val_top1": 0.5465}, {"epoch": 2, "val_top1": 0.6011}]
    totals_ = Totals(100, 1000)
    result = PruneResult(
        ModelSummary("m.safetensors", "sample:resnet20", {}, (1, 28, 28), 100, 1000, "0" * 64), "out.safetensors",
        "edp", "global", {"kind": "macs", "value": 0.5, "absolute": False, "text": "0.5"}, 500.0, totals_,
        Totals(50, 500), 0.5, 0.5, 0.0, [], 1, 1, 1.0, 0,
        training={"history": history, "best_epoch": 2, "best_top1": 0.6011},
    )
    out = StringIO()
    render_prune(result, Console(file=out, width=200))
    assert "validation top-1 by epoch: 1: 54.65%, 2: 60.11% · the slim model has epoch 2's weights" in out.getvalue()
    without = StringIO()  # no --val-data: no line
    render_prune(PruneResult(**{**vars(result), "training": {"history": [{"epoch": 1, "val_top1": None}]}}),
                 Console(file=without, width=200))
    assert "validation" not in without.getvalue()


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--flops-target", "0.5"], 2,
         "--method edp, --recalibrate-bn, --reconstruct, --soft-epochs and --allocation sensitivity need images: "
         "pass --data"),
        (["--ratio", "0.3", "--data", CALIB], 2, "--method edp needs --flops-target or --params-target"),
        (["--flops-target", "0.001", "--data", CALIB], 1, "the budget cannot be reached"),
    ],
)
def test_cli_edp_refusals(tmp_path, args, code, message):
    out = tmp_path / "out.safetensors"
    run = CliRunner().invoke(app, ["prune", str(SAMPLE), "--method", "edp", "--device", "cpu", "-o", str(out),
                                   *map(str, args)])
    assert run.exit_code == code and message in run.stderr.replace("\n", " ")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_edp_refuses_a_model_without_convolutions(tmp_path):
    from safetensors.torch import save_file

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    path = tmp_path / "mlp.safetensors"
    save_file(model.state_dict(), str(path))
    data = tmp_path / "data.safetensors"
    save_file({"images": torch.randn(8, 1, 2, 2), "labels": torch.zeros(8, dtype=torch.long)}, str(data))
    factory = tmp_path / "mlp.py"
    factory.write_text("from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3))\n")
    run = CliRunner().invoke(app, ["prune", str(path), "--arch", f"{factory}:build", "--input-shape", "1x2x2",
                                   "--method", "edp", "--data", str(data), "--flops-target", "0.5", "--device", "cpu"])
    assert run.exit_code == 1 and "has none it can decompose" in run.stderr.replace("\n", " ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.safetensors", "mlp.py", "mlp.safetensors"]


DDP_SCRIPT = """
import os, sys
from pathlib import Path
import torch
from prunecli.cli import app

torch.set_num_threads(1)
out = Path(sys.argv[1])
rank = int(os.environ["RANK"])
torch.manual_seed(100 + rank)  # different RNG states: DDP must keep the ranks in step anyway
import prunecli.methods.edp as edp
original = edp.prune_and_merge

def record(graph, plan, groups, example, threshold):
    result = original(graph, plan, groups, example, threshold)
    torch.save(graph.model.state_dict(), out / f"rank{rank}.pt")
    return result

edp.prune_and_merge = record
app(["prune", sys.argv[2], "--method", "edp", "--data", sys.argv[3], "--edp-epochs", "1", "--flops-target", "0.6",
     "--batch-size", "64", "--device", "cpu", "-q", "-o", str(out / "slim.safetensors")], standalone_mode=False)
"""


@pytest.mark.slow
def test_edp_under_torchrun_keeps_ranks_identical_and_writes_once(tmp_path):
    run, out = M.torchrun(tmp_path, DDP_SCRIPT, SAMPLE, CALIB)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for name, value in ranks[0].items():
        assert_close(ranks[1][name], value, rtol=0, atol=0, msg=name)
    assert sorted(p.name for p in out.iterdir()) == ["rank0.pt", "rank1.pt", "slim.safetensors"]
    slim = load(out / "slim.safetensors")
    assert_close(slim.state_dict(), ranks[0], rtol=0, atol=0)


def test_edp_on_torchvision_mobilenet_v2_is_exact_and_round_trips(tmp_path):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=10).eval()
    original = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    generator = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randn(32, 3, 32, 32, generator=generator), torch.randint(0, 10, (32,), generator=generator), "r")
    result = edp_prune(model, x[:1], data, None, EdpOptions(FinetuneConfig(epochs=1, lr=0.01, batch_size=16, device="cpu")),
                       HALF_MACS)
    # depthwise convs ride along in their expand conv's channel group, and are never decomposed themselves
    assert result.prune_merge.max_output_change < 1e-5 and result.prune_merge.channels_removed > 0
    assert all(block.basis.groups == 1 for block in decomposed_layers(result.model).values())
    assert abs(totals(result.model, x[:1]).macs / totals(original, x[:1]).macs - 0.5) < 0.01
    path = save_slim(result.model, tmp_path / "mnv2.safetensors", arch="torchvision:mobilenet_v2",
                     arch_kwargs={"num_classes": 10}, input_shape=(3, 32, 32))
    with torch.no_grad():
        assert_close(load(path)(x), result.model(x), rtol=0, atol=0)
