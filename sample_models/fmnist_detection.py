"""A small object-detection set made from Fashion-MNIST, in Ultralytics' layout, and a YOLOv8n trained on it.

Each image is a ``--size`` square dark canvas holding 1 to 4 Fashion-MNIST items, each
scaled 1.5x to 4x (42 to 112 pixels at 320) and pasted where it overlaps no earlier item by more than a tenth of
either box; its label is the item's class and the tight box around its visible pixels, in YOLO's normalised
``class cx cy w h``. Training images come from Fashion-MNIST's train split, validation images from its test split.
The same seed writes the same files::

    python sample_models/fmnist_detection.py data DIR --train 2000 --val 200     # DIR/data.yaml and the images
    python sample_models/fmnist_detection.py train DIR/data.yaml --epochs 5 -o yolov8n_fmnist_det.pt

``make_dataset`` is what tests and benchmarks import (by path: ``sample_models`` is no package). Training needs
ultralytics (``pip install 'prunecli[yolo]'``) and runs on the CPU unless ``--device`` says otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _items(split: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    from prunecli.io.data import load_fashion_mnist

    images, labels = load_fashion_mnist(split, root)
    return images.squeeze(1).numpy(), labels.numpy()


def _overlaps(box: tuple[int, int, int, int], placed: list[tuple[int, int, int, int]]) -> bool:
    x0, y0, x1, y1 = box
    for a0, b0, a1, b1 in placed:
        inter = max(0, min(x1, a1) - max(x0, a0)) * max(0, min(y1, b1) - max(y0, b0))
        if inter > 0.1 * min((x1 - x0) * (y1 - y0), (a1 - a0) * (b1 - b0)):
            return True
    return False


def _canvas(rng: np.random.Generator, items: np.ndarray, labels: np.ndarray, size: int) -> tuple[np.ndarray, list[str]]:
    canvas = np.full((size, size), 20.0)
    placed, lines = [], []
    for _ in range(int(rng.integers(1, 5))):
        index = int(rng.integers(len(items)))
        side = round(28 * rng.uniform(1.5, 4.0) * size / 320)
        item = np.asarray(Image.fromarray(items[index]).resize((side, side), Image.BILINEAR), dtype=np.float64)
        for _ in range(20):  # a free spot, or the item is left out
            x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
            rows, cols = np.nonzero(item > 24)
            if not len(rows):
                break
            box = (x + cols.min(), y + rows.min(), x + cols.max() + 1, y + rows.max() + 1)
            if not _overlaps(box, placed):
                canvas[y:y + side, x:x + side] = np.maximum(canvas[y:y + side, x:x + side], item)
                placed.append(box)
                x0, y0, x1, y1 = box
                lines.append(f"{labels[index]} {(x0 + x1) / 2 / size:.6f} {(y0 + y1) / 2 / size:.6f} "
                             f"{(x1 - x0) / size:.6f} {(y1 - y0) / size:.6f}")
                break
    gray = canvas.round().astype(np.uint8)
    return np.stack([gray] * 3, axis=-1), lines


def make_dataset(root: Path, train: int = 2000, val: int = 200, size: int = 320, seed: int = 0,
                 fashion_mnist: Path = FASHION_MNIST) -> Path:
    """Write the detection set under ``root`` (``images/{train,val}``, ``labels/{train,val}``) and its
    ``data.yaml``; return the yaml's path."""
    root = Path(root).resolve()
    for split, count, source in (("train", train, "train"), ("val", val, "test")):
        items, labels = _items(source, fashion_mnist)
        rng = np.random.default_rng([seed, count, 0 if split == "train" else 1])
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, lines = _canvas(rng, items, labels, size)
            Image.fromarray(image).save(root / "images" / split / f"{i:05d}.png")
            (root / "labels" / split / f"{i:05d}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    names = "\n".join(f"  {i}: {name}" for i, name in enumerate(CLASSES))
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    return root / "data.yaml"


def train_detector(data: Path, output: Path, epochs: int, imgsz: int, batch: int, device: str, seed: int) -> None:
    """Train YOLOv8n from its yaml (10 classes) with Ultralytics' trainer and copy its best.pt to ``output``."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    from ultralytics import YOLO

    with tempfile.TemporaryDirectory(prefix="fmnist-det-") as runs:
        model = YOLO("yolov8n.yaml")
        model.train(data=str(data), epochs=epochs, imgsz=imgsz, batch=batch, device=device, seed=seed,
                    project=runs, name="train", exist_ok=True, plots=False, workers=0)
        shutil.copyfile(model.trainer.best, output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="write the detection set")
    data.add_argument("root", type=Path)
    data.add_argument("--train", type=int, default=2000)
    data.add_argument("--val", type=int, default=200)
    data.add_argument("--size", type=int, default=320)
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--fashion-mnist", type=Path, default=FASHION_MNIST)
    train = commands.add_parser("train", help="train YOLOv8n on a written set")
    train.add_argument("data", type=Path)
    train.add_argument("-o", "--output", type=Path, default=Path("yolov8n_fmnist_det.pt"))
    train.add_argument("--epochs", type=int, default=5)
    train.add_argument("--imgsz", type=int, default=320)
    train.add_argument("--batch", type=int, default=16)
    train.add_argument("--device", default="cpu")
    train.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.command == "data":
        print(make_dataset(args.root, args.train, args.val, args.size, args.seed, args.fashion_mnist))
    else:
        train_detector(args.data, args.output, args.epochs, args.imgsz, args.batch, args.device, args.seed)


if __name__ == "__main__":
    main()
