"""The sample detector (a YOLOv8n trained on Fashion-MNIST items, ``sample_models/fmnist_detection.py``) pruned to
a few MACs targets through the CLI: mAP50-95 and mAP50 from Ultralytics' validator on the generated val split
after BN recalibration, after ``--reconstruct`` (with the same recalibration) and after ``--epochs`` of
``prunecli finetune`` from the reconstructed model; beside each, the MACs kept and the onnxruntime latency ratio of
the traced path (``prunecli analyze --latency --compare``). The calibration images are the generated training
images, unlabelled. Writes one JSON line per row and a markdown table.

    python benchmarks/yolo_fmnist.py --model sample_models/yolov8n_fmnist_det.pt --targets 0.7,0.5 --epochs 3
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # a shared machine: sleep at OpenMP barriers
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
os.environ.setdefault("YOLO_VERBOSE", "false")

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path

from typer.testing import CliRunner

from prunecli.cli import app

ROOT = Path(__file__).resolve().parents[1]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "sample_models" / "yolov8n_fmnist_det.pt")
    parser.add_argument("--targets", default="0.7,0.5")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train", type=int, default=2000, help="generated training images (fine-tuning, calibration)")
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--calib-images", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("yolo_fmnist.jsonl"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="yolo-fmnist-") as folder:
        folder = Path(folder)
        data = generator().make_dataset(folder / "set", args.train, args.val)
        images = folder / "set" / "images" / "train"
        rows = [{"variant": "unpruned", "target": 1.0, "macs_kept": 1.0, **evaluate(args.model, data)}]
        for target in (float(t) for t in args.targets.split(",")):
            calib = ("--data", images, "--calib-images", args.calib_images, "--batch-size", 32, "--recalibrate-bn", 8)
            for variant, extra in (("recalibrated", ()), ("reconstructed", ("--reconstruct",))):
                out = folder / f"{variant}-{target}.pt"
                started = time.perf_counter()
                pruned = cli("prune", args.model, "--trust-pickle", "--flops-target", target, *calib, *extra, "-o", out)
                latency = cli("analyze", out, "--trust-pickle", "--latency", "--compare", args.model)["latency"]
                rows.append({"variant": variant, "target": target, "macs_kept": pruned["macs_kept"],
                             "seconds": time.perf_counter() - started, "latency": latency, **evaluate(out, data)})
            tuned = folder / f"finetuned-{target}.pt"
            cli("finetune", folder / f"reconstructed-{target}.pt", "--trust-pickle", "--data", data, "--epochs",
                args.epochs, "--batch-size", 16, "-o", tuned)
            rows.append({"variant": f"reconstructed + {args.epochs} epochs", "target": target,
                         "macs_kept": rows[-1]["macs_kept"], **evaluate(tuned, data)})
    with open(args.out, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    print("| MACs target | variant | MACs kept | mAP50-95 | mAP50 | onnxruntime speedup |")
    print("|---:|---|---:|---:|---:|---:|")
    for row in rows:
        speed = next((r["speedup"] for r in (row.get("latency") or {}).get("rows", [])
                      if r["runtime"] == "onnxruntime" and r["batch"] == 1), None)
        print(f"| {row['target']:.1f} | {row['variant']} | {100 * row['macs_kept']:.2f}% | {100 * row['mAP50-95']:.2f} "
              f"| {100 * row['mAP50']:.2f} | {f'{speed:.2f}x' if speed else '-'} |")


if __name__ == "__main__":
    main()
