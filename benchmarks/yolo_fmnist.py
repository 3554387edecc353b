"""The sample detector (a YOLOv8n trained on Fashion-MNIST items, ``sample_models/fmnist_detection.py``) pruned to
a few MACs targets through the CLI: mAP50-95 and mAP50 from Ultralytics' validator on the generated val split
after BN recalibration, after ``--reconstruct`` (with the same recalibration) and after ``--epochs`` of
``prunecli finetune`` from the reconstructed model (alone, and distilling from the unpruned model with
``--teacher``); beside each, the MACs kept and the onnxruntime latency ratio of the traced path (``prunecli analyze
--latency --compare``; ``--no-latency`` skips it). The calibration images are the generated training images,
unlabelled.

For comparison, Torch-Pruning's YOLOv8 recipe (its examples/yolov8/yolov8_pruning.py) on the same model at the MACs
prunecli reached: C2f's chunked ``cv1`` split into two convs, ``GroupMagnitudeImportance`` (L2), a ``MetaPruner``
with the Detect head ignored and one uniform ratio, bisected until prunecli's own MACs count matches; its mAP
straight after pruning, after the same BN recalibration, and after the same ``prunecli finetune`` epochs. Writes
one JSON line per row and a markdown table.

    python benchmarks/yolo_fmnist.py --model sample_models/yolov8n_fmnist_det.pt --targets 0.7,0.5 --epochs 3
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # a shared machine: sleep at OpenMP barriers
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
os.environ.setdefault("YOLO_VERBOSE", "false")

import argparse
import copy
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn
from typer.testing import CliRunner
from ultralytics.nn.modules import C2f

from prunecli.cli import app
from prunecli.config import DataOptions, ModelSource
from prunecli.measure import costs_and_output
from prunecli.pipeline.opening import load_images, open_model
from prunecli.pipeline.recovery import recalibrate
from prunecli.yolo import YoloPath

ROOT = Path(__file__).resolve().parents[1]
CALIB_BATCH, CALIB_BATCHES = 32, 8  # the prunecli rows' --batch-size and --recalibrate-bn


def generator():
    spec = importlib.util.spec_from_file_location("fmnist_detection", ROOT / "sample_models" / "fmnist_detection.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli(*args) -> dict:
    result = CliRunner().invoke(app, [str(a) for a in args] + ["--json"])
    if result.exit_code:
        raise RuntimeError(f"prunecli {' '.join(map(str, args))}: {result.output}")
    return json.loads(result.stdout)


def evaluate(model: Path, data: Path) -> dict:
    return cli("evaluate", model, "--trust-pickle", "--data", data, "--batch-size", "32")["metrics"]


def finetuned(model: Path, data: Path, epochs: int, out: Path, *options) -> Path:
    """``prunecli finetune`` as every fine-tuned row runs it (batch 16, the defaults otherwise)."""
    cli("finetune", model, "--trust-pickle", "--data", data, "--epochs", epochs, "--batch-size", 16, "-o", out, *options)
    return out


class SplitC2f(nn.Module):
    """A C2f whose ``cv1`` is two convs, one per half of its output, instead of one conv whose output is chunked
    (Torch-Pruning's C2f_v2): its dependency graph cannot prune through ``chunk``, and two convs prune freely."""

    def __init__(self, block: C2f):
        super().__init__()
        half = block.c
        self.cv0, self.cv1 = rows_of(block.cv1, slice(0, half)), rows_of(block.cv1, slice(half, 2 * half))
        self.cv2, self.m = block.cv2, block.m
        self.f, self.i, self.type, self.np = block.f, block.i, block.type, block.np  # Ultralytics' routing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv0(x), self.cv1(x)]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


def rows_of(conv: nn.Module, rows: slice) -> nn.Module:
    """An Ultralytics ``Conv`` (conv, BN, activation) computing only the output channels ``rows`` of ``conv``."""
    part = copy.deepcopy(conv)
    part.conv.weight = nn.Parameter(conv.conv.weight[rows].clone())
    part.conv.out_channels = part.bn.num_features = rows.stop - rows.start
    for name in ("weight", "bias"):
        setattr(part.bn, name, nn.Parameter(getattr(conv.bn, name)[rows].clone()))
    part.bn.running_mean, part.bn.running_var = conv.bn.running_mean[rows].clone(), conv.bn.running_var[rows].clone()
    return part


def macs(model: nn.Module, example: torch.Tensor) -> int:
    """prunecli's count (conv and linear layers up to the head's raw outputs), whatever pruned the model."""
    with torch.no_grad():
        return sum(cost.macs for cost in costs_and_output(YoloPath(model), example)[0])


def torch_pruning_recipe(model: nn.Module, example: torch.Tensor, macs_kept: float, steps: int = 14) -> nn.Module:
    """Torch-Pruning's YOLOv8 recipe (one shot, where its example alternates 16 steps with fine-tuning) at the
    ``macs_kept`` fraction of ``model``'s MACs: its uniform ratio bisected until prunecli's count matches."""
    split = copy.deepcopy(model).float().eval()
    for index, layer in enumerate(split.model):
        if isinstance(layer, C2f):
            split.model[index] = SplitC2f(layer)
    with torch.no_grad():
        torch.testing.assert_close(YoloPath(split)(example), YoloPath(model.float().eval())(example))
    for param in split.parameters():
        param.requires_grad_(True)  # Torch-Pruning traces the autograd graph
    full = macs(split, example)

    def pruned(ratio: float) -> nn.Module:
        candidate = copy.deepcopy(split)
        tp.pruner.MetaPruner(candidate, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                             pruning_ratio=ratio, ignored_layers=[candidate.model[-1]]).step()
        return candidate

    low, high, best = 0.0, 0.95, (float("inf"), split)
    for _ in range(steps):
        ratio = (low + high) / 2
        candidate = pruned(ratio)
        kept = macs(candidate, example) / full
        best = min(best, (abs(kept - macs_kept), candidate), key=lambda pair: pair[0])
        low, high = (ratio, high) if kept > macs_kept else (low, ratio)
    return best[1]


def torch_pruning_rows(args, target: float, macs_kept: float, images: Path, data: Path, folder: Path) -> list[dict]:
    """Torch-Pruning's recipe at ``macs_kept``: straight after pruning, after prunecli's BN recalibration on the same
    calibration images, and after the same fine-tuning as prunecli's rows."""
    loaded = open_model(ModelSource(args.model, trust_pickle=True))
    example = torch.zeros(1, *loaded.input.shape)
    model = torch_pruning_recipe(loaded.deployed, example, macs_kept)
    kept = macs(model, example) / macs(loaded.deployed, example)
    raw = folder / f"torch-pruning-{target}.pt"
    loaded.format.write(loaded, model, raw, {"recipe": "torch-pruning"}, force=True, inputs=(args.model,))
    tuned_from = folder / f"torch-pruning-recalibrated-{target}.pt"
    again = open_model(ModelSource(raw, trust_pickle=True))
    calibration = load_images(DataOptions(str(images), calib_images=args.calib_images, batch_size=CALIB_BATCH), again,
                              args.calib_images, seed=0)
    recalibrate(again.model, CALIB_BATCHES, calibration, CALIB_BATCH, say=lambda _: None)
    again.format.write(again, again.deployed, tuned_from, {"recipe": "torch-pruning"}, force=True, inputs=(raw,))
    tuned = finetuned(tuned_from, data, args.epochs, folder / f"torch-pruning-finetuned-{target}.pt")
    rows = (("Torch-Pruning recipe", raw), ("Torch-Pruning recipe, recalibrated", tuned_from),
            (f"Torch-Pruning recipe, recalibrated + {args.epochs} epochs", tuned))
    return [{"variant": variant, "target": target, "macs_kept": kept, **evaluate(path, data)} for variant, path in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "sample_models" / "yolov8n_fmnist_det.pt")
    parser.add_argument("--targets", default="0.7,0.5")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train", type=int, default=2000, help="generated training images (fine-tuning, calibration)")
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--calib-images", type=int, default=256)
    parser.add_argument("--no-latency", action="store_true", help="skip the onnxruntime timing (a loaded machine)")
    parser.add_argument("--out", type=Path, default=Path("yolo_fmnist.jsonl"))
    args = parser.parse_args()
    rows = []

    def add(*new: dict) -> None:  # each row written as it comes: a long run's partial results survive
        rows.extend(new)
        with open(args.out, "a") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in new)

    args.out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="yolo-fmnist-") as folder:
        folder = Path(folder)
        data = generator().make_dataset(folder / "set", args.train, args.val)
        images = folder / "set" / "images" / "train"
        add({"variant": "unpruned", "target": 1.0, "macs_kept": 1.0, **evaluate(args.model, data)})
        for target in (float(t) for t in args.targets.split(",")):
            calib = ("--data", images, "--calib-images", args.calib_images, "--batch-size", CALIB_BATCH,
                     "--recalibrate-bn", CALIB_BATCHES)
            for variant, extra in (("recalibrated", ()), ("reconstructed", ("--reconstruct",))):
                out = folder / f"{variant}-{target}.pt"
                started = time.perf_counter()
                pruned = cli("prune", args.model, "--trust-pickle", "--flops-target", target, *calib, *extra, "-o", out)
                seconds = time.perf_counter() - started
                latency = None if args.no_latency else cli("analyze", out, "--trust-pickle", "--latency", "--compare",
                                                           args.model)["latency"]
                add({"variant": variant, "target": target, "macs_kept": pruned["macs_kept"], "seconds": seconds,
                     "latency": latency, **evaluate(out, data)})
                if variant == "recalibrated":
                    add(*torch_pruning_rows(args, target, pruned["macs_kept"], images, data, folder))
            reconstructed, kept = folder / f"reconstructed-{target}.pt", rows[-1]["macs_kept"]
            for variant, options in (("", ()), (", distilled from the unpruned", ("--teacher", args.model))):
                tuned = finetuned(reconstructed, data, args.epochs, folder / f"finetuned{len(options)}-{target}.pt",
                                  *options)
                add({"variant": f"reconstructed + {args.epochs} epochs{variant}", "target": target, "macs_kept": kept,
                     **evaluate(tuned, data)})
    print("| MACs target | variant | MACs kept | mAP50-95 | mAP50 | onnxruntime speedup |")
    print("|---:|---|---:|---:|---:|---:|")
    for row in rows:
        speed = next((r["speedup"] for r in (row.get("latency") or {}).get("rows", [])
                      if r["runtime"] == "onnxruntime" and r["batch"] == 1), None)
        print(f"| {row['target']:.1f} | {row['variant']} | {100 * row['macs_kept']:.2f}% | {100 * row['mAP50-95']:.2f} "
              f"| {100 * row['mAP50']:.2f} | {f'{speed:.2f}x' if speed else '-'} |")


if __name__ == "__main__":
    main()
