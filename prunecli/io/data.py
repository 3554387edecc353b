"""Fashion-MNIST loading for calibration and training of the sample models.

The data is read straight from the IDX files that Debian's ``dataset-fashion-mnist`` package installs, so
no download, torchvision dataset class or PIL round trip is needed.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from prunecli.config import FASHION_MNIST_ROOT
from prunecli.errors import DataError

# Per-channel statistics of the 60k training images scaled to [0, 1] (measured, rounded to 4 decimals).
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
# IDX type code -> element dtype; multi-byte types are big-endian on disk.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: Path) -> Tensor:
    """Parse an IDX file (optionally gzip-compressed) into a tensor of its native dtype and shape.

    The header is checked against the payload size so a truncated download fails here with a clear
    message instead of as a reshape error deep inside training.

    Args:
        path: IDX file; a ``.gz`` suffix selects gzip decompression.

    Returns:
        Tensor with the dims recorded in the header, in native byte order.

    Raises:
        DataError: The file is missing, unreadable, not IDX, or its size does not match its header.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path} not found: install the Debian package dataset-fashion-mnist, "
            "or pass --data-root pointing to a directory with the Fashion-MNIST IDX files"
        )
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {path} ({exc}); re-install or re-download the file") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number); check the path or re-download it")
    dtype = _IDX_DTYPES.get(raw[2])
    ndim = raw[3]
    if dtype is None:
        raise DataError(f"{path} has unknown IDX type code 0x{raw[2]:02x}; the file is corrupt or not IDX")
    header_len = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header_len:
        raise DataError(f"{path} has a truncated IDX header; re-download the file")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header_len != expected:
        raise DataError(
            f"{path} holds {len(raw) - header_len} data bytes but its header {dims} needs {expected}; "
            "the file is truncated or corrupt, re-download it"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(dims)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def load_fashion_mnist(split: str = "train", root: Path = FASHION_MNIST_ROOT) -> tuple[Tensor, Tensor]:
    """Load one Fashion-MNIST split as raw pixels, leaving normalisation and augmentation to the caller.

    Args:
        split: ``"train"`` (60k images) or ``"test"`` (10k images).
        root: Directory holding the ``*-idx?-ubyte.gz`` files.

    Returns:
        ``(images, labels)``: uint8 ``[N, 1, 28, 28]`` and int64 ``[N]``.

    Raises:
        DataError: Unknown split, missing or corrupt files, or images and labels that do not match.
    """
    if split not in _SPLIT_PREFIX:
        raise DataError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    root = Path(root)
    prefix = _SPLIT_PREFIX[split]
    images = read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
    if images.dtype != torch.uint8 or images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
        raise DataError(
            f"{root}: {split} images have shape {tuple(images.shape)} and dtype {images.dtype}, "
            "expected uint8 [N, 28, 28]; check --data-root"
        )
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{root}: {split} has {images.shape[0]} images but labels of shape {tuple(labels.shape)}; "
            "the files come from different releases, re-install them"
        )
    return images.unsqueeze(1), labels.long()


def normalize(
    images_uint8: Tensor,
    mean: tuple[float, ...] = FASHION_MNIST_MEAN,
    std: tuple[float, ...] = FASHION_MNIST_STD,
) -> Tensor:
    """Scale uint8 pixels to [0, 1] and standardise each channel, matching what the models were trained on.

    Args:
        images_uint8: ``[N, C, H, W]`` uint8 images.
        mean: Per-channel mean in [0, 1] units.
        std: Per-channel standard deviation in [0, 1] units.

    Returns:
        float32 tensor of the same shape.

    Raises:
        DataError: The images are not 4-D or their channel count differs from ``mean``/``std``.
    """
    if images_uint8.dim() != 4 or images_uint8.shape[1] != len(mean) or len(mean) != len(std):
        raise DataError(
            f"cannot normalise images of shape {tuple(images_uint8.shape)} with {len(mean)} means and "
            f"{len(std)} stds; expected [N, C, H, W] with one mean and std per channel"
        )
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images_uint8.to(torch.float32) / 255.0 - m) / s


# ----------------------------------------------------------------------------- calibration / training data

TENSOR_SUFFIXES = (".safetensors", ".pt", ".pth", ".npz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class DataSpec:
    """Where images come from (``--data``) and how to turn them into model inputs."""

    source: str
    root: Path = FASHION_MNIST_ROOT
    input_shape: tuple[int, int, int] | None = None  # what the model expects, (C, H, W)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "root": str(self.root), "mean": self.mean, "std": self.std}


@dataclass(frozen=True)
class ImageSet:
    """Images as float tensors ready for the model, with labels when the source has them."""

    images: Tensor
    labels: Tensor | None
    description: str

    def __len__(self) -> int:
        return len(self.images)


def open_images(spec: DataSpec, limit: int | None = None, seed: int = 0) -> ImageSet:
    """Load ``limit`` images (a seeded random subset when the source has more) and check their shape."""
    kind, _, split = spec.source.partition(":")
    if kind == "fashion-mnist":
        images, labels = load_fashion_mnist(split or "train", spec.root)
        chosen = _subset(len(images), limit, seed)
        images = normalize(images[chosen], spec.mean or FASHION_MNIST_MEAN, spec.std or FASHION_MNIST_STD)
        data = ImageSet(images, labels[chosen], f"fashion-mnist:{split or 'train'}")
    else:
        path = Path(spec.source)
        if not path.exists():
            raise DataError(
                f"--data {spec.source}: no such file or directory; give an image folder, a tensor file or fashion-mnist"
            )
        data = _read_folder(path, spec, limit, seed) if path.is_dir() else _read_tensor_file(path, limit, seed)
    if len(data) == 0:
        raise DataError(f"--data {spec.source} holds no images")
    if not torch.isfinite(data.images).all():
        raise DataError(f"--data {spec.source} contains NaN or infinite pixel values")
    if spec.input_shape is not None and tuple(data.images.shape[1:]) != tuple(spec.input_shape):
        raise DataError(
            f"--data {spec.source} gives images of shape {'x'.join(map(str, data.images.shape[1:]))} but the model takes "
            f"{'x'.join(map(str, spec.input_shape))}; use data of the model's shape (or --input-shape for image folders)"
        )
    return data


def _subset(total: int, limit: int | None, seed: int) -> Tensor:
    if limit is None or limit >= total:
        return torch.arange(total)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=generator)[:limit].sort().values


def _read_tensor_file(path: Path, limit: int | None, seed: int) -> ImageSet:
    """A .safetensors/.pt/.npz file holding ``images`` [N, C, H, W] (or [N, C, D, H, W]: volumes, video clips) and
    optionally ``labels`` [N]."""
    if path.suffix not in TENSOR_SUFFIXES:
        raise DataError(
            f"--data {path}: unknown file type; give {', '.join(TENSOR_SUFFIXES)}, an image folder or fashion-mnist"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            content = load_file(str(path))
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                content = {k: torch.from_numpy(archive[k]) for k in archive.files}
        else:
            content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(f"--data {path} is unreadable ({type(exc).__name__}: {str(exc)[:120]})") from exc
    if not isinstance(content, dict) or "images" not in content:
        raise DataError(f"--data {path} must hold a tensor named 'images' [N, C, H, W] or [N, C, D, H, W] "
                        "(and optionally 'labels')")
    images, labels = content["images"], content.get("labels")
    if not isinstance(images, Tensor) or images.dim() not in (4, 5):
        raise DataError(f"--data {path}: 'images' must be a 4-D tensor [N, C, H, W] or a 5-D one [N, C, D, H, W]")
    if labels is not None and (labels.dim() != 1 or len(labels) != len(images)):
        raise DataError(f"--data {path}: 'labels' must be 1-D with one label per image")
    chosen = _subset(len(images), limit, seed)
    images = images[chosen].float() / (255.0 if images.dtype == torch.uint8 else 1.0)
    return ImageSet(images, labels[chosen].long() if labels is not None else None, str(path))


def _read_folder(path: Path, spec: DataSpec, limit: int | None, seed: int) -> ImageSet:
    """An ImageFolder layout (one sub-folder per class) or a flat folder of images, resized to the input."""
    from PIL import Image, UnidentifiedImageError

    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if classes:
        files = [
            (f, i)
            for i, c in enumerate(classes)
            for f in sorted((path / c).rglob("*"))
            if f.suffix.lower() in IMAGE_SUFFIXES
        ]
    else:
        files = [(f, -1) for f in sorted(path.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"--data {path}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    if spec.input_shape is None:
        raise DataError(f"--data {path}: the input shape is unknown; pass --input-shape CxHxW")
    channels, height, width = spec.input_shape
    files = [files[i] for i in _subset(len(files), limit, seed).tolist()]
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise DataError(f"image folders feed 1- or 3-channel models; this model takes {channels} channels")
    images = []
    for file, _ in files:
        try:
            with Image.open(file) as image:
                image = image.convert(mode)
                scale = max(height / image.height, width / image.width)  # resize the short side, centre crop
                size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
                image = image.resize(size, Image.BILINEAR)
                left, top = (image.width - width) // 2, (image.height - height) // 2
                image = image.crop((left, top, left + width, top + height))
                array = np.asarray(image, dtype=np.uint8).reshape(height, width, channels)
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"--data {file} is not a readable image ({exc})") from exc
        images.append(torch.from_numpy(array.copy()).permute(2, 0, 1))
    batch = torch.stack(images)
    mean = spec.mean or (0.5,) * channels
    std = spec.std or (0.5,) * channels
    labels = torch.tensor([label for _, label in files]) if classes else None
    return ImageSet(normalize(batch, mean, std), labels, str(path))


def iterate_batches(
    data: ImageSet, batch_size: int, *, shuffle: bool = False, seed: int = 0
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Batches of (images, labels or None); the last partial batch is kept."""
    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size} must be at least 1")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=generator) if shuffle else torch.arange(len(data))
    for start in range(0, len(data), batch_size):
        index = order[start : start + batch_size]
        yield data.images[index], (data.labels[index] if data.labels is not None else None)
