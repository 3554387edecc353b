"""Train a bundled sample model (ResNet-20 or MobileNetV2) on Fashion-MNIST, deterministically on the CPU.

Writes two files into ``--out-dir``:

* ``<arch>_fmnist.safetensors``: the trained model as a prunecli slim artifact (``sample:<arch>``), e.g.
  ``resnet20_fmnist.safetensors`` for the default ``--arch resnet20``.
* ``fmnist_calib.safetensors``: 512 normalised, class-balanced training images for calibration, shared by
  all sample models. An existing file is kept (it depends only on the seed); ``--force-calib`` rewrites it.

The same seed, thread count and torch version give bit-identical weights, and ``--checkpoint`` lets a killed
run resume where it stopped without changing the result. ``--package-only`` redoes just the writes from
saved weights, e.g. when training finished before ``prunecli.io.slim`` was available.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

# Sleeping instead of spinning at OpenMP barriers changes no numerics but keeps a busy machine from
# stalling every op (measured 13 s vs 1.5 s per step with 2 threads under a load of 6 on 2 cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from prunecli.io.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist, normalize
from prunecli.io.files import atomic_output
from prunecli.samples import SAMPLE_ARCHITECTURES, SAMPLE_INPUT_SHAPES

CALIB_FILE = "fmnist_calib.safetensors"
# Sample architectures this script trains, with their default epoch counts (the ones the shipped files used).
DEFAULT_EPOCHS = {
    "resnet20": 6,  # ~150 s per epoch on 2 idle CPU cores: ~15 min in all
    "mobilenetv2": 8,  # ~230-450 s per epoch on 1 CPU core, depending on the load
}
BATCH_SIZE = 128
EVAL_BATCH_SIZE = 512
BASE_LR = 0.1
WARMUP_STEPS = 200  # linear warmup keeps the first large-lr steps from blowing up the fresh BN statistics
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
LABEL_SMOOTHING = 0.05
CROP_PADDING = 2
CALIB_SIZE = 512
# Two threads on an idle 2-core machine; on a busy one a single thread avoids OpenMP barrier stalls.
NUM_THREADS = int(os.environ.get("PRUNECLI_TRAIN_THREADS", "2"))


def model_file(arch: str) -> str:
    """Name of the slim artifact trained for ``arch``, e.g. ``resnet20_fmnist.safetensors``."""
    return f"{arch}_fmnist.safetensors"


def final_weights(arch: str) -> Path:
    """Final weights as a plain state dict, kept outside the repository for --package-only."""
    return Path(f"/tmp/{arch}_fmnist_final.pt")


def augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """Random-crop (zero padding) and horizontally flip a uint8 batch with one gather, seeded by ``generator``.

    Working on the whole batch with tensor indexing keeps augmentation negligible next to the model's
    forward/backward, and padding the raw pixels with 0 matches Fashion-MNIST's black background.
    """
    n, _, h, w = images.shape
    padded = F.pad(images, (CROP_PADDING,) * 4)
    dy = torch.randint(0, 2 * CROP_PADDING + 1, (n, 1), generator=generator)
    dx = torch.randint(0, 2 * CROP_PADDING + 1, (n, 1), generator=generator)
    flip = torch.rand(n, 1, generator=generator) < 0.5
    rows = dy + torch.arange(h)
    cols = dx + torch.where(flip, torch.arange(w - 1, -1, -1), torch.arange(w))
    batch = torch.arange(n)[:, None, None, None]
    channels = torch.arange(images.shape[1])[None, :, None, None]
    return padded[batch, channels, rows[:, None, :, None], cols[:, None, None, :]]


def learning_rate(step: int, total_steps: int) -> float:
    """Linear warmup to BASE_LR, then cosine decay to zero at the last step."""
    if step < WARMUP_STEPS:
        return BASE_LR * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, total_steps - WARMUP_STEPS)
    return 0.5 * BASE_LR * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of ``model`` on normalised ``images``, in eval mode (running BN statistics)."""
    model.eval()
    correct = 0
    for start in range(0, len(images), EVAL_BATCH_SIZE):
        batch = images[start : start + EVAL_BATCH_SIZE].contiguous(memory_format=torch.channels_last)
        correct += (model(batch).argmax(1) == labels[start : start + EVAL_BATCH_SIZE]).sum().item()
    return correct / len(images)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` atomically, so a run killed mid-save still resumes from the previous epoch."""
    with atomic_output(path, force=True) as tmp:
        torch.save(state, tmp)


def write_calibration(out_dir: Path, seed: int, force: bool = False) -> Path | None:
    """Save a seeded, class-balanced subset of CALIB_SIZE normalised training images with their labels.

    Pruning criteria that need data (activations, gradients, BN recalibration) read this file, so it is
    normalised exactly like the training inputs and balanced so no class dominates the statistics. The
    subset does not depend on the model, so an existing file is kept unless ``force``; returns ``None`` then.
    """
    path = out_dir / CALIB_FILE
    if path.exists() and not force:
        return None
    images, labels = load_fashion_mnist("train")
    num_classes = int(labels.max()) + 1
    generator = torch.Generator().manual_seed(seed)
    picks = []
    for cls in range(num_classes):
        members = (labels == cls).nonzero().squeeze(1)
        count = CALIB_SIZE // num_classes + (cls < CALIB_SIZE % num_classes)
        picks.append(members[torch.randperm(len(members), generator=generator)[:count]])
    index = torch.cat(picks)
    index = index[torch.randperm(len(index), generator=generator)]
    tensors = {
        "images": normalize(images[index], FASHION_MNIST_MEAN, FASHION_MNIST_STD).contiguous(),
        "labels": labels[index].contiguous(),
    }
    metadata = {
        "dataset": "fashion-mnist:train",
        "mean": json.dumps(list(FASHION_MNIST_MEAN)),
        "std": json.dumps(list(FASHION_MNIST_STD)),
        "seed": str(seed),
    }
    with atomic_output(path, force=True) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def write_model(model: nn.Module, arch: str, out_dir: Path, accuracy: float, epochs: int, seed: int) -> Path:
    """Save ``model`` as a slim artifact whose metadata records how it was trained and how to feed it."""
    from prunecli.io.slim import save_slim

    path = out_dir / model_file(arch)
    metadata = {
        "dataset": "fashion-mnist",
        "test_accuracy": f"{accuracy:.4f}",
        "mean": list(FASHION_MNIST_MEAN),
        "std": list(FASHION_MNIST_STD),
        "num_classes": 10,
        "epochs": epochs,
        "seed": seed,
    }
    save_slim(
        model.to(memory_format=torch.contiguous_format),
        path,
        arch=f"sample:{arch}",
        arch_kwargs={},
        input_shape=SAMPLE_INPUT_SHAPES[arch],
        metadata=metadata,
        force=True,
    )
    return path


def test_set() -> tuple[Tensor, Tensor]:
    """The 10k test images, normalised once up front since evaluation does not augment them."""
    images, labels = load_fashion_mnist("test")
    return normalize(images, FASHION_MNIST_MEAN, FASHION_MNIST_STD), labels


def package(
    arch: str, state_dict_path: Path, out_dir: Path, accuracy: float | None, epochs: int, seed: int, force_calib: bool
) -> list[Path]:
    """Write the output files from saved weights (a plain state dict or a training checkpoint).

    Args:
        arch: Sample architecture the weights belong to.
        state_dict_path: ``torch.save`` file of ``model.state_dict()``, or a ``--checkpoint`` file.
        out_dir: Directory that receives the model and calibration files.
        accuracy: Measured test accuracy to record; ``None`` re-measures it on the test set.
        epochs: Epoch count to record when the file itself does not say.
        seed: Training seed, also used to pick the calibration subset.
        force_calib: Rewrite the calibration file even if it exists.

    Returns:
        The files written: the model, then the calibration file unless it was kept.
    """
    state = torch.load(state_dict_path, map_location="cpu", weights_only=True)
    if "model" in state:  # a training checkpoint
        if state.get("arch", arch) != arch:
            raise SystemExit(f"{state_dict_path} holds {state['arch']} weights; pass --arch {state['arch']}")
        epochs = state["epoch"]
        state = state["model"]
    model = SAMPLE_ARCHITECTURES[arch]()
    model.load_state_dict(state)
    if accuracy is None:
        accuracy = evaluate(model, *test_set())
    calib = write_calibration(out_dir, seed, force_calib)
    return [write_model(model, arch, out_dir, accuracy, epochs, seed)] + ([calib] if calib else [])


def train(args: argparse.Namespace) -> None:
    """Train from scratch (or resume ``--checkpoint``), evaluate each epoch, then write the output files."""
    torch.manual_seed(args.seed)
    model = SAMPLE_ARCHITECTURES[args.arch]().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=BASE_LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)
    generator = torch.Generator().manual_seed(args.seed)
    train_images, train_labels = load_fashion_mnist("train")
    if args.subset:
        train_images, train_labels = train_images[: args.subset], train_labels[: args.subset]
    test_images, test_labels = test_set()
    steps_per_epoch = math.ceil(len(train_images) / BATCH_SIZE)
    total_steps = steps_per_epoch * args.epochs

    start_epoch, elapsed = 0, 0.0
    if args.checkpoint and args.checkpoint.exists():
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        arch = state.get("arch", "resnet20")  # checkpoints from before --arch are ResNet-20's
        if (arch, state["epochs"], state["seed"], state["subset"]) != (args.arch, args.epochs, args.seed, args.subset):
            raise SystemExit(
                f"{args.checkpoint} is from a run with arch={arch} epochs={state['epochs']} seed={state['seed']} "
                f"subset={state['subset']}; pass the same options or delete it to start over"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        start_epoch, elapsed = state["epoch"], state["elapsed"]
        print(f"resumed from {args.checkpoint} after epoch {start_epoch}", flush=True)

    print(
        f"training {args.arch} on {len(train_images)} images: {args.epochs} epochs x {steps_per_epoch} steps, "
        f"seed {args.seed}, {torch.get_num_threads()} threads",
        flush=True,
    )
    for epoch in range(start_epoch, args.epochs):
        tic = time.perf_counter()
        model.train()
        order = torch.randperm(len(train_images), generator=generator)
        loss_sum, seen = 0.0, 0
        for i in range(steps_per_epoch):
            index = order[i * BATCH_SIZE : (i + 1) * BATCH_SIZE]
            batch = augment(train_images[index], generator)
            inputs = normalize(batch, FASHION_MNIST_MEAN, FASHION_MNIST_STD).contiguous(memory_format=torch.channels_last)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(epoch * steps_per_epoch + i, total_steps)
            loss = F.cross_entropy(model(inputs), train_labels[index], label_smoothing=LABEL_SMOOTHING)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(index)
            seen += len(index)
        train_seconds = time.perf_counter() - tic
        accuracy = evaluate(model, test_images, test_labels)
        seconds = time.perf_counter() - tic
        elapsed += seconds
        print(
            f"epoch {epoch + 1}/{args.epochs}  loss {loss_sum / seen:.4f}  test_acc {accuracy:.4f}  "
            f"{seconds:.1f}s (train {train_seconds:.1f}s, eval {seconds - train_seconds:.1f}s)",
            flush=True,
        )
        if args.checkpoint:
            save_checkpoint(
                args.checkpoint,
                {
                    "arch": args.arch,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "generator": generator.get_state(),
                    "epoch": epoch + 1,
                    "elapsed": elapsed,
                    "epochs": args.epochs,
                    "seed": args.seed,
                    "subset": args.subset,
                },
            )

    accuracy = evaluate(model, test_images, test_labels)
    print(f"final test accuracy {accuracy:.4f}, training time {elapsed:.1f}s ({elapsed / 60:.1f} min)", flush=True)
    model = model.to(memory_format=torch.contiguous_format)
    save_checkpoint(final_weights(args.arch), model.state_dict())
    calib = write_calibration(args.out_dir, args.seed, args.force_calib)
    print(f"wrote {calib}" if calib else f"kept {args.out_dir / CALIB_FILE}", flush=True)
    try:
        path = write_model(model, args.arch, args.out_dir, accuracy, args.epochs, args.seed)
        print(f"wrote {path}", flush=True)
    except ImportError as exc:
        print(
            f"could not write {model_file(args.arch)} ({exc}); once prunecli.io.slim provides save_slim, run:\n"
            f"  python {Path(__file__).name} --arch {args.arch} --package-only --checkpoint {final_weights(args.arch)} "
            f"--accuracy {accuracy:.4f} --epochs {args.epochs} --seed {args.seed} --out-dir {args.out_dir}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(DEFAULT_EPOCHS), default="resnet20", help="sample architecture")
    parser.add_argument("--epochs", type=int, help="default: 6 for resnet20, 8 for mobilenetv2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument(
        "--checkpoint", type=Path, help="training: save/resume state here each epoch; --package-only: weights"
    )
    parser.add_argument("--package-only", action="store_true", help="only write the output files")
    parser.add_argument("--force-calib", action="store_true", help=f"rewrite {CALIB_FILE} even if it exists")
    parser.add_argument("--accuracy", type=float, help="--package-only: test accuracy to record (default: measure)")
    parser.add_argument("--subset", type=int, default=0, help="train on the first N images only (smoke tests)")
    args = parser.parse_args()
    if args.epochs is None:
        args.epochs = DEFAULT_EPOCHS[args.arch]

    torch.set_num_threads(NUM_THREADS)
    torch.use_deterministic_algorithms(True)
    if args.package_only:
        if args.checkpoint is None:
            parser.error("--package-only needs --checkpoint PATH")
        for path in package(
            args.arch, args.checkpoint, args.out_dir, args.accuracy, args.epochs, args.seed, args.force_calib
        ):
            print(f"wrote {path}")
    else:
        train(args)


if __name__ == "__main__":
    main()
