"""Ultralytics YOLO checkpoints (issue 27): read with --trust-pickle (the EMA preferred, fp16 pruned in fp32), pruned
on backbone, neck and the head's inner layers with every head output at its width, written back as an Ultralytics
checkpoint that ``YOLO()`` loads, predicts with and exports, and fine-tuned by Ultralytics' own trainer at the pruned
widths, distilling from a frozen teacher when given one. Skipped without ultralytics (``pip install 'prunecli[yolo]'``).

The models are built from Ultralytics' yaml files (nothing is downloaded) and run at 64-128 pixels."""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from pathlib import Path

# before ultralytics is imported: no network, no installs, no settings file in the user's home, no log lines
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
os.environ.setdefault("YOLO_VERBOSE", "false")
os.environ.setdefault("YOLO_CONFIG_DIR", str(Path(tempfile.gettempdir()) / "prunecli-tests-ultralytics"))

import models as M
import numpy as np
import pytest
import torch
from torch.testing import assert_close
from typer.testing import CliRunner

from prunecli.cli import app
from prunecli.config import FinetuneConfig, ModelSource
from prunecli.errors import CheckpointError, OptionError
from prunecli.graph import DependencyGraph
from prunecli.io.formats import claiming, open_checkpoint, probe
from prunecli.io.formats.ultralytics import ULTRALYTICS, task_model
from prunecli.io.formats.whole_model import WHOLE_MODEL
from prunecli.outputs import output_shapes, output_tensors
from prunecli.tasks import reassemble
from prunecli.yolo import YoloPath

ultralytics = pytest.importorskip("ultralytics")
YOLO = ultralytics.YOLO

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, code: int = 1) -> str:
    """The error: the last line of stderr, one line, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: "), message
    return message.removeprefix("error: ")


class Zoo(dict):
    """Ultralytics models by name, each built from its yaml and saved as ``YOLO(yaml).save()`` writes it (fp16,
    ``ema`` None, no ``train_args``) the first time a test asks for it."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = folder

    def __missing__(self, name: str) -> Path:
        path = self[name] = self.folder / f"{name}.pt"
        YOLO(f"{name}.yaml").save(path)
        return path


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("yolo"))


def trained_checkpoint(zoo, tmp_path, **changes) -> Path:
    """yolov8n as Ultralytics' trainer leaves a checkpoint mid-run: ``model`` None, the EMA in fp16, the optimizer,
    its epoch and ``train_args``; ``changes`` replace entries."""
    model = torch.load(zoo["yolov8n"], weights_only=False)["model"]
    checkpoint = {"epoch": 3, "best_fitness": 0.5, "model": None, "ema": M.randomise_norms(model.float()).half(),
                  "updates": 12, "optimizer": {"state": {}, "param_groups": []}, "scaler": {}, "modelopt": None,
                  "train_args": {"imgsz": 96, "data": "coco8.yaml"}, "date": "2026-01-01T00:00:00",
                  "version": ultralytics.__version__, **changes}
    path = tmp_path / "trained.pt"
    torch.save(checkpoint, path)
    return path


def source(path: Path, **kwargs) -> ModelSource:
    return ModelSource(path, trust_pickle=True, **kwargs)


def test_an_ultralytics_checkpoint_is_claimed_from_its_opcodes_and_a_pickled_model_is_a_whole_model(zoo, tmp_path):
    found = probe(zoo["yolov8n"])
    assert task_model(found) == "DetectionModel"
    assert claiming(found) is ULTRALYTICS
    assert not WHOLE_MODEL.claims(found)
    assert task_model(probe(zoo["yolo11n-seg"])) == "SegmentationModel"
    bare = tmp_path / "bare.pt"  # torch.save(model) of the DetectionModel itself: the whole-model adapter's
    torch.save(torch.load(zoo["yolov8n"], weights_only=False)["model"], bare)
    assert claiming(probe(bare)) is WHOLE_MODEL


def test_without_trust_pickle_it_is_refused_in_one_line_naming_the_flag_and_nothing_is_written(zoo, tmp_path):
    out = tmp_path / "slim.pt"
    message = one_line_error(invoke("prune", zoo["yolov8n"], "--flops-target", "0.5", "-o", out))
    assert "Ultralytics checkpoint" in message and "--trust-pickle" in message
    assert not out.exists()
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        open_checkpoint(ModelSource(zoo["yolov8n"]))


def test_a_truncated_checkpoint_is_refused_in_one_line_and_nothing_is_written(zoo, tmp_path):
    cut = tmp_path / "cut.pt"
    data = zoo["yolov8n"].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    out = tmp_path / "slim.pt"
    message = one_line_error(invoke("prune", cut, "--trust-pickle", "--flops-target", "0.5", "-o", out))
    assert "truncated" in message
    assert not out.exists()


def test_the_ema_in_fp32_and_the_training_image_size_are_read(zoo, tmp_path):
    raw = torch.load(zoo["yolov8n"], weights_only=False)["model"]  # under "model": weights other than the EMA's
    path = trained_checkpoint(zoo, tmp_path, model=raw)
    ema = torch.load(path, weights_only=False)["ema"]
    loaded = open_checkpoint(source(path))
    assert loaded.input.shape == (3, 96, 96) and loaded.input.mean == (0.0,) * 3 and loaded.input.std == (1.0,) * 3
    assert {p.dtype for p in loaded.deployed.parameters()} == {torch.float32}
    assert_close(loaded.deployed.state_dict(),
                 {k: v.float() if v.is_floating_point() else v for k, v in ema.state_dict().items()})
    assert not torch.equal(ema.model[0].bn.weight, raw.model[0].bn.weight)
    assert isinstance(loaded.model, YoloPath) and loaded.model.model is loaded.deployed.model
    assert open_checkpoint(source(zoo["yolov8n"])).input.shape == (3, 640, 640)  # the model's own args: 640
    assert open_checkpoint(source(path, input_shape=(3, 128, 160))).input.shape == (3, 128, 160)


def test_an_input_size_off_the_stride_is_a_usage_error_naming_one_that_fits(zoo):
    with pytest.raises(OptionError, match=r"multiples of its stride 32, e\.g\. 3x96x96"):
        open_checkpoint(source(zoo["yolov8n"], input_shape=(3, 100, 100)))


@pytest.fixture(scope="module")
def pruned_yolov8n(zoo, tmp_path_factory):
    """`prunecli prune yolov8n.pt --trust-pickle --flops-target 0.5 --input-shape 3x128x128 -o slim.pt --json`."""
    out = tmp_path_factory.mktemp("pruned") / "yolov8n-slim.pt"
    result = invoke("prune", zoo["yolov8n"], "--trust-pickle", "--flops-target", "0.5", "--input-shape", "3x128x128",
                    "-o", out, "--json")
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


@pytest.mark.parametrize("name", ["yolov8n", "yolo11n", "yolo11n-seg"])
def test_prune_to_half_the_macs_keeps_every_output_and_yolo_loads_predicts_and_exports(zoo, tmp_path, name,
                                                                                     pruned_yolov8n):
    if name == "yolov8n":
        out, report = pruned_yolov8n
    else:
        out = tmp_path / f"{name}-slim.pt"
        result = invoke("prune", zoo[name], "--trust-pickle", "--flops-target", "0.5", "--input-shape", "3x128x128",
                        "-o", out, "--json")
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
    assert abs(report["macs_kept"] - 0.5) <= 0.005 and abs(report["deviation_pp"]) <= 0.5
    checkpoint = torch.load(out, weights_only=False)
    assert checkpoint["ema"] is None and {p.dtype for p in checkpoint["model"].parameters()} == {torch.float16}
    assert json.loads(checkpoint["prunecli"])["input_shape"] == [3, 128, 128]
    original, slim = YOLO(zoo[name]), YOLO(out)
    image = (np.random.default_rng(0).random((128, 128, 3)) * 255).astype(np.uint8)
    assert len(slim.predict(image, imgsz=128, conf=0.0, verbose=False)) == 1
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():  # the decoded outputs (boxes and classes; masks' prototypes), not the feature maps
        assert output_shapes(slim.model.eval()(x)[0]) == output_shapes(original.model.float().eval()(x)[0])
    onnx = Path(slim.export(format="onnx", imgsz=128, verbose=False))
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx))
    outputs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert_close([torch.from_numpy(o) for o in outputs], output_tensors(slim.model.float().eval()(x))[:len(outputs)],
                     atol=1e-3, rtol=1e-3)


def test_the_head_outputs_dfl_and_strides_are_untouched_and_the_file_is_the_same_bytes_twice(zoo, pruned_yolov8n):
    out, _ = pruned_yolov8n
    before = torch.load(zoo["yolov8n"], weights_only=False)["model"]
    after = torch.load(out, weights_only=False)["model"]
    head_before, head_after = before.model[-1], after.model[-1]
    assert_close(head_after.dfl.conv.weight, head_before.dfl.conv.weight)
    assert_close(after.stride, before.stride) and (head_after.nc, head_after.reg_max) == (80, 16)
    for level in range(3):
        assert head_after.cv2[level][2].out_channels == 64 and head_after.cv3[level][2].out_channels == 80
    assert after.model[0].conv.out_channels < before.model[0].conv.out_channels  # the backbone did prune
    first = out.read_bytes()
    result = invoke("prune", zoo["yolov8n"], "--trust-pickle", "--flops-target", "0.5", "--input-shape", "3x128x128",
                    "-o", out, "-q", "--force")
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == first


def test_prunecli_export_writes_the_raw_outputs_and_says_where_decoding_is(pruned_yolov8n, tmp_path):
    out, _ = pruned_yolov8n
    result = invoke("export", out, "--trust-pickle", "-o", tmp_path / "raw.onnx", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["verification"]["passed"]
    assert any("raw outputs" in note and "YOLO(MODEL).export" in note for note in report["notes"])


def test_a_trainer_checkpoint_is_written_back_as_ultralytics_finalises_one(zoo, tmp_path):
    path = trained_checkpoint(zoo, tmp_path)
    out = tmp_path / "slim.pt"
    result = invoke("prune", path, "--trust-pickle", "--flops-target", "0.6", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    written = torch.load(out, weights_only=False)
    assert written["model"] is not None and written["ema"] is None
    assert {p.dtype for p in written["model"].parameters()} == {torch.float16}
    assert [written[k] for k in ("optimizer", "best_fitness", "updates", "scaler", "epoch")] == [None] * 4 + [-1]
    assert [written[k] for k in ("train_args", "date", "version")] == [
        {"imgsz": 96, "data": "coco8.yaml"}, "2026-01-01T00:00:00", ultralytics.__version__]
    assert YOLO(out).predict(np.zeros((96, 96, 3), np.uint8), imgsz=96, verbose=False)


def test_only_pt_outputs_are_written_naming_one_that_works(zoo, tmp_path):
    message = one_line_error(invoke("prune", zoo["yolov8n"], "--trust-pickle", "--flops-target", "0.5", "-o",
                                    tmp_path / "slim.safetensors"), code=2)
    assert "slim.pt" in message
    assert ULTRALYTICS.default_output(Path("runs/yolov8n.pt")) == Path("runs/yolov8n.slim.pt")


SLOW = pytest.mark.slow

# (groups, prunable groups) of the traced path. C2f's chunk(2) and C3k2's pass their parts to the readers each part
# was traced into, so cv1's output prunes in two blocks (49 groups and 39 prunable on YOLOv8n before, 72 and 57 on
# YOLO11n-seg); C2PSA's split((c, c)) gives its widths as constants, and its cv1 stays.
GROUPS = {"yolov8n": (53, 51), "yolo11n-seg": (74, 68)}


@pytest.mark.parametrize("name", ["yolov8n", "yolo11n-seg", *(pytest.param(n, marks=SLOW) for n in (
    "yolo26n", "yolov8n-pose", "yolo11n-obb", "yolo11n-cls"))])
def test_zero_filters_pruned_leave_every_output_of_the_whole_model_unchanged(zoo, name):
    """A quarter of every prunable group killed (filters, BN gamma, beta, mean), then removed: the head's raw
    outputs and the model's own decoded outputs are the same, in float64."""
    model = M.randomise_norms(torch.load(zoo[name], weights_only=False)["model"].double()).eval()
    size = 64
    x = torch.rand(1, 3, size, size, dtype=torch.float64)
    path = YoloPath(model)
    graph = DependencyGraph(copy.deepcopy(path), x)
    plan = {}
    for group in graph.groups:
        per_block = group.channels // group.blocks
        if group.prunable and per_block > 1:
            plan[group.index] = M.spread_positions(group.channels, group.blocks, max(1, per_block // 4) * group.blocks,
                                                   seed=group.index)
    assert (len(graph.groups), len(plan)) == GROUPS[name] if name in GROUPS else len(plan) >= 10
    dead_path = M.kill_and_prune(path, graph, plan)
    dead = reassemble(model, dead_path)
    pruned = reassemble(model, graph.model)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        alive, killed, removed = path(x), dead_path(x), graph.model(x)
        assert not all(torch.allclose(a, k) for a, k in zip(alive, killed, strict=True))
        assert_close(removed, killed)
        # the decoded outputs (the feature maps that come with them have the pruned widths)
        assert_close(output_tensors(pruned(x)[0]), output_tensors(dead(x)[0]))


def test_yolo26_head_layers_only_training_runs_are_pruned_alike_so_the_model_still_trains(zoo, tmp_path):
    """YOLO26's prototype module reads a neck output in a semantic branch only training runs: traced too, the neck's
    channels go from it as well, and a training forward of the pruned model runs."""
    out = tmp_path / "slim.pt"
    result = invoke("prune", zoo["yolo26n-seg"], "--trust-pickle", "--flops-target", "0.5", "--input-shape", "3x64x64",
                    "-o", out, "-q")
    assert result.exit_code == 0, result.output
    model = torch.load(out, weights_only=False)["model"].float().train()
    semantic = model.model[-1].proto.semseg[0].conv
    assert semantic.in_channels < torch.load(zoo["yolo26n-seg"], weights_only=False)["model"].model[-1].proto.semseg[
        0].conv.in_channels
    predictions = model(torch.rand(2, 3, 64, 64))
    assert isinstance(predictions, dict) and "one2many" in predictions


def write_dataset(root: Path, classes: int = 80, images: int = 6, size: int = 64) -> Path:
    """A tiny detection set in Ultralytics' layout: coloured boxes on grey, YOLO labels, train and val splits."""
    import cv2

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(images):
            image, lines = np.full((size, size, 3), 114, np.uint8), []
            for _ in range(2):
                w, h = rng.integers(12, 30, 2)
                x, y = rng.integers(0, size - w), rng.integers(0, size - h)
                label = int(rng.integers(0, 2))
                image[y:y + h, x:x + w] = (255, 0, 0) if label else (0, 0, 255)
                lines.append(f"{label} {(x + w / 2) / size:.4f} {(y + h / 2) / size:.4f} {w / size:.4f} {h / size:.4f}")
            cv2.imwrite(str(root / "images" / split / f"{i}.png"), image)
            (root / "labels" / split / f"{i}.txt").write_text("\n".join(lines))
    names = ", ".join(f"c{i}" for i in range(classes))
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames: [{names}]\n")
    return root / "data.yaml"


def test_finetune_trains_the_pruned_model_at_its_widths_with_ultralytics_trainer(zoo, tmp_path):
    slim = tmp_path / "slim.pt"
    assert invoke("prune", zoo["yolov8n"], "--trust-pickle", "--flops-target", "0.5", "--input-shape", "3x64x64",
                  "-o", slim, "-q").exit_code == 0
    data = write_dataset(tmp_path / "data")
    out = tmp_path / "slim-ft.pt"
    result = invoke("finetune", slim, "--trust-pickle", "--data", data, "--epochs", "1", "--batch-size", "4",
                    "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["training"]["trainer"] == "ultralytics" and "mAP50-95" in report["after"]
    pruned = torch.load(slim, weights_only=False)["model"].state_dict()
    tuned = torch.load(out, weights_only=False)
    assert {k: v.shape for k, v in tuned["model"].state_dict().items()} == {k: v.shape for k, v in pruned.items()}
    assert any(not torch.equal(tuned["model"].state_dict()[k], v) for k, v in pruned.items() if k.endswith("weight"))
    assert {p.dtype for p in tuned["model"].parameters()} == {torch.float16}
    assert json.loads(tuned["prunecli"])["finetune_history"][-1]["trainer"] == "ultralytics"
    assert YOLO(out).predict(np.zeros((64, 64, 3), np.uint8), imgsz=64, verbose=False)


def test_finetune_refuses_a_missing_yaml_and_other_classes_in_one_line_writing_nothing(zoo, tmp_path):
    out = tmp_path / "ft.pt"
    message = one_line_error(invoke("finetune", zoo["yolov8n"], "--trust-pickle", "--data", tmp_path / "none.yaml",
                                    "-o", out))
    assert "none.yaml" in message and "no such file" in message
    data = write_dataset(tmp_path / "two", classes=2, images=2)
    message = one_line_error(invoke("finetune", zoo["yolov8n"], "--trust-pickle", "--data", data, "--input-shape",
                                    "3x64x64", "--batch-size", "2", "-o", out))
    assert "2 classes" in message and "80" in message
    message = one_line_error(invoke("finetune", zoo["yolov8n"], "--trust-pickle", "--data", data, "--steps", "3",
                                    "-o", out), code=2)
    assert "--steps" in message
    assert not out.exists()


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    """The dataset yaml of a tiny detection set (80 class names, as the models' heads have)."""
    return write_dataset(tmp_path_factory.mktemp("data") / "set")


def test_bn_recalibration_and_reconstruction_run_on_an_unlabelled_image_folder(zoo, tiny_set, tmp_path):
    out = tmp_path / "slim.pt"
    result = invoke("prune", zoo["yolov8n"], "--trust-pickle", "--flops-target", "0.5", "--input-shape", "3x64x64",
                    "--data", tiny_set.parent / "images" / "train", "--calib-images", "6", "--batch-size", "3",
                    "--recalibrate-bn", "2", "--reconstruct", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert abs(report["macs_kept"] - 0.5) <= 0.005
    assert report["recalibration"] == {"batches": 2, "images": 6, "data": str(tiny_set.parent / "images" / "train")}
    reconstruction = report["reconstruction"]
    assert reconstruction["layers_refit"] > 0 and reconstruction["mean_error_after"] < reconstruction["mean_error_before"]
    assert YOLO(out).predict(np.zeros((64, 64, 3), np.uint8), imgsz=64, verbose=False)


@pytest.mark.slow
def test_sensitivity_allocation_runs_on_an_unlabelled_image_folder(zoo, tiny_set, tmp_path):
    out = tmp_path / "slim.pt"
    result = invoke("prune", zoo["yolov8n"], "--trust-pickle", "--flops-target", "0.5", "--input-shape", "3x64x64",
                    "--data", tiny_set.parent / "images" / "train", "--calib-images", "6", "--batch-size", "6",
                    "--allocation", "sensitivity", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["allocation"] == "sensitivity" and abs(report["macs_kept"] - 0.5) <= 0.005
    assert YOLO(out).predict(np.zeros((64, 64, 3), np.uint8), imgsz=64, verbose=False)


def test_evaluate_reports_map_from_ultralytics_validator_beside_the_original(zoo, tiny_set, tmp_path):
    slim = tmp_path / "slim.pt"
    assert invoke("prune", zoo["yolov8n"], "--trust-pickle", "--flops-target", "0.5", "--input-shape", "3x64x64",
                  "-o", slim, "-q").exit_code == 0
    result = invoke("evaluate", slim, "--trust-pickle", "--data", tiny_set, "--compare", zoo["yolov8n"],
                    "--batch-size", "6", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    for metrics in (report["metrics"], report["compare"]["metrics"]):
        assert {"mAP50-95", "mAP50", "precision", "recall"} <= set(metrics)
        assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert report["compare"]["macs_ratio"] == pytest.approx(2.0, rel=0.01)  # both costed at the slim model's 64x64
    assert "(val split, 64 pixels)" in report["data"]
    message = one_line_error(invoke("evaluate", slim, "--trust-pickle", "--data", tmp_path / "none.yaml"))
    assert "none.yaml" in message
    assert "--eval-limit" in one_line_error(invoke("evaluate", slim, "--trust-pickle", "--data", tiny_set,
                                                   "--eval-limit", "3"), code=2)


# ----------------------------------------------------------------------------- the sample detector (issue 27 item 5)

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
SAMPLE_DETECTOR = SAMPLES / "yolov8n_fmnist_det.pt"


@pytest.fixture(scope="module")
def fmnist_detection():
    """``sample_models/fmnist_detection.py`` (no package: loaded by path); skipped without Fashion-MNIST."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fmnist_detection", SAMPLES / "fmnist_detection.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not (module.FASHION_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST (Debian's dataset-fashion-mnist) is not installed")
    return module


def test_the_detection_set_generator_writes_the_same_labelled_set_for_a_seed(fmnist_detection, tmp_path):
    first = fmnist_detection.make_dataset(tmp_path / "a", train=4, val=2, size=160)
    second = fmnist_detection.make_dataset(tmp_path / "b", train=4, val=2, size=160)
    files = sorted(p.relative_to(first.parent) for p in first.parent.rglob("*") if p.is_file() and p.name != "data.yaml")
    assert len(files) == 12
    assert all((first.parent / f).read_bytes() == (second.parent / f).read_bytes() for f in files)
    lines = [line.split() for f in files if f.suffix == ".txt" for line in (first.parent / f).read_text().splitlines()]
    assert lines and all(0 <= int(c) <= 9 and all(0 < float(v) <= 1 for v in box) for c, *box in lines)
    assert "9: ankle-boot" in first.read_text()


@pytest.fixture(scope="module")
def sample_set(fmnist_detection, tmp_path_factory) -> Path:
    return fmnist_detection.make_dataset(tmp_path_factory.mktemp("fmnist-det"), train=64, val=48)


def test_the_sample_detector_detects_fashion_mnist_items(sample_set):
    result = invoke("evaluate", SAMPLE_DETECTOR, "--trust-pickle", "--data", sample_set, "--batch-size", "16", "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)["metrics"]
    assert metrics["mAP50"] > 0.5 and metrics["mAP50-95"] > 0.4


@pytest.mark.slow
def test_the_sample_detector_pruned_to_70_percent_and_recalibrated_still_detects(sample_set, tmp_path):
    out = tmp_path / "slim.pt"
    result = invoke("prune", SAMPLE_DETECTOR, "--trust-pickle", "--flops-target", "0.7", "--data",
                    sample_set.parent / "images" / "train", "--calib-images", "64", "--batch-size", "16",
                    "--recalibrate-bn", "4", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    result = invoke("evaluate", out, "--trust-pickle", "--data", sample_set, "--batch-size", "16", "--json")
    assert json.loads(result.stdout)["metrics"]["mAP50"] > 0.2


# ----------------------------------------------------------------------------- distillation inside Ultralytics' trainer

def test_head_distillation_is_the_binary_kl_of_classes_and_the_kl_of_box_bins_by_hand():
    """One anchor, one class, reg_max 2, T = 2. The teacher's class logit 2 ln 3 is 0.75 at T (the student's 0 is
    0.5), its top class probability 0.9 weighs the boxes (the divisor is at least 1); each side's bins
    (2 ln 3, 0) are (0.75, 0.25) at T against the student's uniform bins."""
    from prunecli.training.yolo import head_distillation

    z = 2 * math.log(3)
    teacher = {"scores": torch.tensor([[[z]]]), "boxes": torch.tensor([[z, 0.0] * 4]).reshape(1, 8, 1)}
    student = {"scores": torch.zeros(1, 1, 1), "boxes": torch.zeros(1, 8, 1)}
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    classes, boxes = head_distillation(student, teacher, 2.0)
    assert classes.item() == pytest.approx(4 * kl, rel=1e-5)
    assert boxes.item() == pytest.approx(4 * 0.9 * 4 * kl, rel=1e-5)
    assert [t.item() for t in head_distillation(teacher, teacher, 2.0)] == pytest.approx([0.0, 0.0], abs=1e-6)


class FixedHead(torch.nn.Module):
    """A teacher that predicts ``preds`` whatever the images, in eval mode's (decoded, raw) form."""

    def __init__(self, preds):
        super().__init__()
        self.preds = preds
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, images):
        return torch.zeros(0), self.preds


def test_the_kd_term_enters_ultralytics_loss_weighed_by_alpha_with_its_gains_and_temperature_schedule():
    from types import SimpleNamespace

    from prunecli.training.yolo import Distillation, DistillingLoss, head_distillation

    generator = torch.Generator().manual_seed(0)
    student, teacher = ({"scores": torch.randn(2, 3, 5, generator=generator),
                         "boxes": torch.randn(2, 16, 5, generator=generator)} for _ in range(2))
    own = torch.tensor([1.0, 2.0, 3.0])
    config = FinetuneConfig(kd="variable", kd_alpha=0.25, kd_t_max=4.0, kd_t_min=1.0, kd_schedule="cosine")
    distilling = DistillingLoss(lambda preds, batch: (own * 2, {"box_loss": own[0]}),
                                Distillation(FixedHead(teacher), config), 3, SimpleNamespace(cls=0.5, dfl=1.5))
    batch = {"img": torch.zeros(2, 3, 8, 8)}
    for t in (4.0, 2.5, 1.0):  # the cosine from T_max at the first of 3 batches to T_min at the last
        classes, boxes = head_distillation(student, teacher, t)
        kd = 0.5 * classes + 1.5 * boxes
        total, items = distilling(student, batch)
        assert_close(total, torch.cat([0.75 * own * 2, (0.25 * kd * 2).reshape(1)]))
        assert items["kd_loss"].item() == pytest.approx(kd.item()) and kd.item() > 0
        assert items["box_loss"] == 1.0


@pytest.mark.slow
def test_finetune_distils_from_a_frozen_teacher_at_the_pruned_widths(zoo, tiny_set, tmp_path):
    from prunecli.training.yolo import Distillation, train

    slim = tmp_path / "slim.pt"
    assert invoke("prune", zoo["yolov8n"], "--trust-pickle", "--flops-target", "0.5", "--input-shape", "3x64x64",
                  "-o", slim, "-q").exit_code == 0
    teacher = torch.load(zoo["yolov8n"], weights_only=False)["model"].float()
    before = copy.deepcopy(teacher.state_dict())
    config = FinetuneConfig(kd="fixed", kd_alpha=0.5, kd_t_max=2.0, kd_t_min=2.0)
    run = train(slim, "detect", tiny_set, {"epochs": 2, "batch": 3, "imgsz": 64, "device": "cpu", "seed": 0},
                tmp_path / "run", Distillation(teacher, config))
    results = (tmp_path / "run" / "train" / "results.csv").read_text().splitlines()
    header, *epochs = [line.split(",") for line in results]
    assert all(float(row[header.index("train/kd_loss")]) > 0 for row in epochs) and len(epochs) == 2
    assert_close(teacher.state_dict(), before)
    assert not any(p.requires_grad for p in teacher.parameters())
    pruned = torch.load(slim, weights_only=False)["model"].state_dict()
    tuned = torch.load(run.best, weights_only=False)["model"].state_dict()
    assert {k: v.shape for k, v in tuned.items()} == {k: v.shape for k, v in pruned.items()}


def test_a_teacher_with_another_head_or_class_count_is_refused_in_one_line_writing_nothing(zoo, tiny_set, tmp_path):
    from ultralytics.nn.tasks import DetectionModel

    two = tmp_path / "two-classes.pt"
    torch.save({"model": DetectionModel("yolov8n.yaml", nc=2, verbose=False).half(), "ema": None}, two)
    out = tmp_path / "ft.pt"
    common = ("finetune", zoo["yolov8n"], "--trust-pickle", "--data", tiny_set, "--input-shape", "3x64x64", "-o", out)
    message = one_line_error(invoke(*common, "--teacher", two), code=2)
    assert message.startswith(f"--teacher {two} has a Detect head with 2 classes") and "80 classes" in message
    message = one_line_error(invoke(*common, "--teacher", zoo["yolo11n-seg"]), code=2)
    assert "a Segment head" in message and "a Detect head" in message
    assert "--kd is none" in one_line_error(invoke(*common, "--teacher", zoo["yolov8n"], "--kd", "none"))
    assert not out.exists()
