"""Models that are not plain classifiers: dict outputs, detectors (pruned on their feature path, checked end to
end), video, every torchvision name, and the refusals."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import models as M
import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn
from torch.testing import assert_close
from typer.testing import CliRunner

import prunecli
from prunecli.api import prune_model
from prunecli.budget import parse_budget
from prunecli.cli import app
from prunecli.config import ModelSource, OutputOptions, PruneConfig
from prunecli.errors import ArchitectureError, OptionError
from prunecli.export import ExportConfig, export_model
from prunecli.graph import DependencyGraph
from prunecli.graph.tracing import SHUFFLE
from prunecli.io.arch import ArchSpec, build_model, default_input, detect_torchvision_arch, parse_input_shape
from prunecli.measure import costs_and_output, totals
from prunecli.outputs import describe_shapes, output_shapes, output_tensors
from prunecli.tasks import FeaturePath, end_to_end_outputs, prunable_part, reassemble

TESTS = Path(__file__).resolve().parent


def save_state(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def prune_saved(tmp_path, model, arch, shape, budget):
    """Save ``model``'s weights, prune them with ``arch`` (None: recognised) to ``budget``: (result, slim path)."""
    source = save_state(model, tmp_path / "source.safetensors")
    output = tmp_path / "slim.safetensors"
    config = PruneConfig(ModelSource(source, arch=arch, input_shape=shape, import_paths=(TESTS,)), budget,
                         output=OutputOptions(output))
    return prune_model(config), output


# ----------------------------------------------------------------------------- output structures


def test_output_tensors_walk_nested_structures_in_order():
    a, b, c = torch.zeros(1, 2), torch.ones(3), torch.full((2, 2), 2.0)
    assert [t.shape for t in output_tensors({"x": a, "y": (b, [c])})] == [(1, 2), (3,), (2, 2)]
    assert output_shapes((a, {"k": b})) == ((1, 2), (3,))
    assert describe_shapes(((1, 10),)) == "1x10"
    assert describe_shapes(((1, 21, 8, 8), (1, 21, 8, 8))) == "[1x21x8x8, 1x21x8x8]"
    with pytest.raises(ArchitectureError, match="returns a str"):
        output_tensors({"x": "text"})


def test_a_dict_output_model_prunes_keeps_every_feature_width_and_reloads(tmp_path, saved_models):
    model = M.randomise_norms(M.FeatureTaps()).eval()
    result, output = prune_saved(tmp_path, model, "models:FeatureTaps", (3, 16, 16), parse_budget("ratio", "0.5"))
    (pruned,) = saved_models
    assert (pruned.stem.out_channels, pruned.deep.out_channels) == (4, 8)  # the internal groups lose half
    assert (pruned.mid.out_channels, pruned.lateral.out_channels, pruned.extra.out_channels) == (12, 10, 6)
    assert result.groups_pruned == 2
    reloaded = prunecli.load(output, trust_code=True, import_paths=(TESTS,))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert_close(reloaded(x), pruned(x))  # every tensor of the dict, by key
        assert output_shapes(pruned(x)) == output_shapes(model(x))


class TupleTaps(M.FeatureTaps):
    """The same features as a tuple, with the first again inside a list: (c2, [p3, extra(p3)])."""

    def forward(self, x):
        features = list(super().forward(x).values())
        return features[0], features[1:]


def test_a_tuple_output_model_keeps_its_output_widths_and_dead_channels_prune_exactly():
    from test_zero_invariance import quarter_plan

    model = M.randomise_norms(TupleTaps()).eval()
    x = torch.randn(2, 3, 16, 16)
    graph = DependencyGraph(copy.deepcopy(model), x)
    assert {g.root: g.prunable for g in graph.groups} == {"stem": True, "mid": False, "deep": True, "lateral": False,
                                                            "extra": False}
    dead = M.kill_and_prune(model, graph, quarter_plan(graph))
    with torch.no_grad():
        assert_close(graph.model(x), dead(x))  # a tuple holding a tensor and a list
        assert output_shapes(graph.model(x)) == ((2, 12, 16, 16), (2, 10, 8, 8), (2, 6, 4, 4))


def test_a_conv_followed_by_an_inplace_relu_is_traced():
    """An in-place activation rewrites the conv output's autograd history; traced in place, the convs vanished."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(inplace=True), nn.Conv2d(8, 4, 3), nn.ReLU(inplace=True))
    graph = DependencyGraph(model, torch.randn(1, 3, 8, 8))
    assert {g.root: (g.channels, g.prunable) for g in graph.groups} == {"0": (8, True), "2": (4, False)}
    assert model[1].inplace and model[3].inplace  # as they were


# ----------------------------------------------------------------------------- detectors


@pytest.fixture(scope="module")
def detector():
    return M.randomise_norms(M.tiny_detector(), seed=2).eval()


def test_a_detector_is_traced_on_its_feature_path(detector):
    part = prunable_part(detector)
    assert isinstance(part, FeaturePath) and part.backbone is detector.backbone
    assert prunable_part(M.FeatureTaps()).__class__ is M.FeatureTaps
    graph = DependencyGraph(copy.deepcopy(part), torch.randn(1, 3, 64, 64))
    reasons = {g.root: g.reason for g in graph.groups}
    # the FPN's outputs (read by the RPN and RoI heads) stay; the body and the FPN's top-down sum are internal
    assert reasons["backbone.fpn.layer_blocks.0.0"] == reasons["backbone.fpn.layer_blocks.1.0"] == "feeds the model output"
    prunable = {g.root for g in graph.groups if g.prunable}
    assert {"backbone.body.layer1.0", "backbone.body.layer2.0", "backbone.body.layer2.3"} <= prunable
    assert any(root.startswith("backbone.fpn.inner_blocks") for root in prunable)


def test_profiling_a_feature_path_leaves_the_detector_in_eval_mode(detector):
    """The feature path is in the detector's mode: a pass that restores the mode it found (the cost count) does not
    put the backbone into training mode, where later passes would move its batch-norm statistics."""
    part = prunable_part(detector)
    assert not part.training
    costs_and_output(part, torch.randn(1, 3, 64, 64))
    assert not any(m.training for m in detector.backbone.modules())


def test_reassemble_puts_the_pruned_feature_path_into_a_copy_of_the_detector(detector):
    part = copy.deepcopy(prunable_part(detector))
    whole = reassemble(detector, part)
    assert whole is not detector and whole.backbone is part.backbone
    assert whole.rpn is not detector.rpn and detector.backbone is not part.backbone
    plain = M.FeatureTaps()
    assert reassemble(plain, plain) is plain


def test_dead_channels_of_a_detector_prune_away_without_changing_its_detections(detector):
    """The strongest check end to end: kill a quarter of every prunable group of the feature path, remove exactly
    those channels, and the whole detector (RPN, RoI heads, NMS) must find the same boxes."""
    from test_zero_invariance import quarter_plan

    part = prunable_part(detector)
    graph = DependencyGraph(copy.deepcopy(part), torch.randn(1, 3, 64, 64))
    plan = quarter_plan(graph)
    dead_part = M.kill_and_prune(part, graph, plan)
    dead = reassemble(detector, dead_part)
    pruned = reassemble(detector, graph.model)
    assert pruned.backbone.body.layer1[0].out_channels == 6
    want, got = end_to_end_outputs(dead, (3, 64, 64)), end_to_end_outputs(pruned, (3, 64, 64))
    assert len(want) == 6 and want[0].shape == (20, 4)  # boxes, labels, scores of two images (score cut-off 0)
    assert detector.roi_heads.score_thresh == 0.05  # restored
    assert_close(got, want, rtol=1e-4, atol=1e-4)


def without_rounding(notes: list[str]) -> list[str]:
    """The notes but --round-to auto's, which names this machine's channel block."""
    return [note for note in notes if not note.startswith(("channel counts kept at multiples", "multiples of "))]


def test_prune_writes_the_whole_detector_and_it_reloads_to_the_same_detections(tmp_path, saved_models, detector):
    result, output = prune_saved(tmp_path, detector, "models:tiny_detector", (3, 64, 64), parse_budget("macs", "0.6"))
    assert without_rounding(result.notes) == ["a detector: its feature path (backbone with FPN or SSD extras) is "
                                              "traced, pruned and counted; the heads keep the widths they read"]
    (written,) = saved_models
    x = torch.randn(1, 3, 64, 64)
    assert result.after == totals(FeaturePath(written), x)  # MACs of the feature path, the part that is pruned
    assert 0.5 < result.macs_kept <= 0.6  # a uniform share of groups of 8-16 channels, rounded down to the budget
    assert type(written).__name__ == "FasterRCNN"
    assert written.backbone.fpn.layer_blocks[0][0].out_channels == 8  # the heads' input width
    assert written.roi_heads.box_predictor.cls_score.out_features == 3  # the classes stay
    assert written.backbone.body.layer2[3].out_channels < 16
    reloaded = prunecli.load(output, trust_code=True, import_paths=(TESTS,))
    assert type(reloaded).__name__ == "FasterRCNN"
    assert_close(end_to_end_outputs(reloaded, (3, 64, 64)), end_to_end_outputs(written, (3, 64, 64)))
    with torch.no_grad():
        assert_close(reloaded.backbone(x), written.backbone(x))


# ----------------------------------------------------------------------------- torchvision: every task


def test_every_torchvision_name_resolves_with_no_weights():
    model = build_model(ArchSpec("torchvision:lraspp_mobilenet_v3_large"))
    assert type(model).__name__ == "LRASPP"
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert output_shapes(out) == ((1, 21, 64, 64),)
    with pytest.raises(ArchitectureError, match=r"unknown torchvision model 'lraspp_mobilenet'; did you mean "
                                                r"lraspp_mobilenet_v3_large, .*\? torchvision .* has 121"):
        build_model(ArchSpec("torchvision:lraspp_mobilenet"))


@pytest.mark.parametrize(("name", "shape", "mean"), [
    ("resnet18", (3, 224, 224), (0.485, 0.456, 0.406)),
    ("fcn_resnet50", (3, 520, 520), (0.485, 0.456, 0.406)),
    ("ssdlite320_mobilenet_v3_large", (3, 320, 320), (0.5, 0.5, 0.5)),
    ("fasterrcnn_resnet50_fpn", (3, 800, 800), (0.485, 0.456, 0.406)),
    ("r3d_18", (3, 16, 112, 112), (0.43216, 0.394666, 0.37645)),
])
def test_default_inputs_follow_each_task(name, shape, mean):
    info = default_input(ArchSpec(f"torchvision:{name}"))
    assert info.shape == shape and info.mean == pytest.approx(mean)


def test_video_shapes_parse_and_bad_ones_say_both_forms():
    assert parse_input_shape("3x16x112x112") == (3, 16, 112, 112)
    with pytest.raises(OptionError, match=r"not CxHxW \(or CxDxHxW for volumes and video\)"):
        parse_input_shape("3x1x2x3x4")


def test_a_bare_segmentation_state_dict_is_recognised():
    model = torchvision.models.get_model("lraspp_mobilenet_v3_large", weights=None, weights_backbone=None)
    assert detect_torchvision_arch(model.state_dict()) == ArchSpec("torchvision:lraspp_mobilenet_v3_large", {})


def test_a_video_model_prunes_to_budget(tmp_path, saved_models):
    model = M.randomise_norms(torchvision.models.video.r3d_18(weights=None), seed=3).eval()
    result, output = prune_saved(tmp_path, model, None, (3, 4, 32, 32), parse_budget("macs", "0.5"))
    assert abs(result.macs_kept - 0.5) <= 0.005
    assert without_rounding(result.notes) == ["recognised the weights as torchvision:r3d_18"]
    (pruned,) = saved_models
    reloaded = prunecli.load(output)
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        assert_close(reloaded(x), pruned(x))
        assert reloaded(x).shape == (1, 400)


def test_optical_flow_is_refused_in_one_line(tmp_path):
    model = torchvision.models.get_model("raft_small", weights=None)
    source = save_state(model, tmp_path / "raft.safetensors")
    result = CliRunner().invoke(app, ["analyze", str(source), "--arch", "torchvision:raft_small",
                                      "--input-shape", "3x64x64"])
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0
    assert "RAFT cannot be pruned: an optical-flow model takes two images" in result.output


def test_shufflenet_prunes_inside_its_branches_and_keeps_the_shuffled_channels():
    model = torchvision.models.shufflenet_v2_x0_5(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    state = torch.random.get_rng_state()
    graph = DependencyGraph(copy.deepcopy(model), x)
    assert torch.equal(torch.random.get_rng_state(), state)  # the tracing-only stand-ins draw no random numbers
    owner = {layer: g for g in graph.groups for layer in g.layers("out")}
    inside = owner["stage2.1.branch2.0"]  # 1x1 -> depthwise 3x3 -> 1x1 within one branch
    assert inside.prunable and inside.channels == 24
    assert set(inside.layers("out")) == {"stage2.1.branch2.0", "stage2.1.branch2.1", "stage2.1.branch2.3",
                                         "stage2.1.branch2.4"}
    assert owner["stage2.0.branch2.5"].reason == SHUFFLE  # block outputs are interleaved by the shuffle
    assert owner["conv5.0"].prunable
    assert sum(g.prunable for g in graph.groups) == 18  # 16 branches, conv1, conv5
    assert not any(hasattr(m, "shuffle_stand_in") for m in graph.model.modules())
    with torch.no_grad():
        assert_close(graph.model(torch.ones(1, 3, 64, 64)), model(torch.ones(1, 3, 64, 64)))


# ----------------------------------------------------------------------------- export


def test_onnx_of_a_dict_output_model_names_every_output_and_matches_onnxruntime(tmp_path):
    import onnxruntime as ort

    model = M.randomise_norms(M.FeatureTaps()).eval()
    output = tmp_path / "taps.onnx"
    result = export_model(model, input_shape=(3, 16, 16), document=None,
                          config=ExportConfig("onnx", output, dynamic_batch=True))
    assert result.output_names == ("output_0", "output_1", "output_2")
    assert result.verification.passed and result.verification.random.batches == (1, 3)
    x = torch.randn(3, 3, 16, 16)
    got = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})
    with torch.no_grad():
        want = output_tensors(model(x))
    assert_close([torch.from_numpy(g) for g in got], want, rtol=1e-5, atol=1e-5)


def test_a_pruned_detector_exports_its_feature_path_to_onnx_and_itself_to_safetensors(tmp_path, detector):
    source = save_state(detector, tmp_path / "det.safetensors")
    slim = tmp_path / "det.slim.safetensors"
    common = ["--arch", "models:tiny_detector", "--import-path", str(TESTS), "--input-shape", "3x64x64"]
    runner = CliRunner()
    done = runner.invoke(app, ["prune", str(source), *common, "--ratio", "0.3", "-o", str(slim)])
    assert done.exit_code == 0, done.output
    onnx_file = tmp_path / "det.onnx"
    done = runner.invoke(app, ["export", str(slim), *common[:4], "--format", "onnx", "-o", str(onnx_file), "--json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.output)
    assert report["output_names"] == ["output_0", "output_1", "pool"]
    assert any("exports its feature path" in note for note in report["notes"])
    copy_file = tmp_path / "det.copy.safetensors"
    done = runner.invoke(app, ["export", str(slim), *common[:4], "--format", "safetensors", "-o", str(copy_file)])
    assert done.exit_code == 0, done.output
    whole = prunecli.load(copy_file, trust_code=True, import_paths=(TESTS,))
    assert type(whole).__name__ == "FasterRCNN"
