"""The sample architectures (prunecli/samples.py) and the shipped MobileNetV2: its size, that every depthwise
group is prunable, that the trained file loads with the accuracy it records, and that it prunes to a budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import prunecli
from prunecli.api import prune_model
from prunecli.budget import parse_budget
from prunecli.config import ModelSource, OutputOptions, PruneConfig
from prunecli.graph import DependencyGraph
from prunecli.io.slim import read_slim_metadata
from prunecli.measure import Totals, totals
from prunecli.samples import SAMPLE_ARCHITECTURES, SAMPLE_INPUT_SHAPES, InvertedResidual, mobilenetv2

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
MOBILENETV2 = SAMPLES / "mobilenetv2_fmnist.safetensors"
CALIB = SAMPLES / "fmnist_calib.safetensors"
MNV2_PARAMS, MNV2_MACS = 222_890, 17_900_992
MNV2_ACCURACY = "0.9356"  # the test accuracy sample_models/README.md reports

pytestmark = pytest.mark.usefixtures("one_thread")


def test_mobilenetv2_shape_and_cost():
    model = mobilenetv2()
    assert SAMPLE_ARCHITECTURES["mobilenetv2"] is mobilenetv2 and SAMPLE_INPUT_SHAPES["mobilenetv2"] == (1, 28, 28)
    assert totals(model, torch.zeros(1, 1, 28, 28)) == Totals(MNV2_PARAMS, MNV2_MACS)
    blocks = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    # 16 | 24 24 | 32 32 | 64 64 | 96: a residual add wherever the stride is 1 and the width stays
    assert [b.use_residual for b in blocks] == [True, False, True, False, True, False, True, False]
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert [m.groups for m in depthwise] == [16, 96, 144, 144, 192, 192, 384, 384]
    assert [m.stride for m in depthwise].count((2, 2)) == 2  # 28 -> 14 -> 7
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_every_depthwise_group_is_prunable():
    model = mobilenetv2().eval()
    graph = DependencyGraph(model, torch.zeros(1, 1, 28, 28))
    depthwise = {name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    holding = {name: g for g in graph.groups for name in g.layers("out") if name in depthwise}
    assert holding.keys() == depthwise
    assert all(g.prunable for g in holding.values())
    assert [g.root for g in graph.groups if not g.prunable] == ["classifier"]  # only the 10 logits stay


def test_shipped_mobilenetv2_loads_with_its_recorded_accuracy():
    model = prunecli.load(MOBILENETV2)
    assert isinstance(model, nn.Module) and type(model).__name__ == "MobileNetV2" and not model.training
    document = read_slim_metadata(MOBILENETV2)
    assert document["arch"]["spec"] == "sample:mobilenetv2" and document["input_shape"] == [1, 28, 28]
    assert document["dataset"] == "fashion-mnist" and document["test_accuracy"] == MNV2_ACCURACY
    assert totals(model, torch.zeros(1, 1, 28, 28)) == Totals(MNV2_PARAMS, MNV2_MACS)
    calib = load_file(CALIB)  # training images, already normalised: the trained weights, not a random init
    with torch.no_grad():
        top1 = (model(calib["images"][:256]).argmax(1) == calib["labels"][:256]).float().mean().item()
    assert top1 >= 0.9


def test_shipped_mobilenetv2_prunes_to_half_the_macs(tmp_path):
    output = tmp_path / "slim.safetensors"
    config = PruneConfig(ModelSource(MOBILENETV2), parse_budget("macs", "0.5"), output=OutputOptions(output))
    result = prune_model(config)
    assert result.before.macs == MNV2_MACS
    assert abs(result.macs_kept - 0.5) <= 0.005 and result.after.macs == pytest.approx(MNV2_MACS / 2, rel=0.01)
    assert result.groups_pruned == 11  # all but the classifier's and two residual streams, 16 and 32 wide, rounded up
    slim = prunecli.load(output)
    assert totals(slim, torch.zeros(1, 1, 28, 28)) == result.after
    depthwise = [m for m in slim.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert [m.out_channels for m in depthwise if m.groups == m.in_channels == m.out_channels] == [16, 64, 80, 80, 112,
                                                                                                  112, 240, 224]
    assert slim(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("method", ["hrank", "chip"])
def test_activation_criteria_score_a_layer_that_consumes_one_group_and_produces_another(method):
    """features.9.0 reads features.8's group at its input and is the fallback producer of its own group (read at its
    output, since the pool and flatten lead to a Linear): the two must get separate hooks."""
    from prunecli.criteria import get_criterion
    from prunecli.criteria.base import score_with_data

    model = mobilenetv2().eval()
    graph = DependencyGraph(model, torch.randn(1, 1, 28, 28))
    groups = [g for g in graph.groups if g.prunable]
    scores = score_with_data(get_criterion(method)(), graph, groups, [(torch.randn(4, 1, 28, 28), None)])
    by_root = {g.root: scores[g.index] for g in groups}
    assert by_root["features.9.0"].shape == (384,) and by_root["features.8.conv.2.0"].shape == (96,)
    assert len(scores) == len(groups)
