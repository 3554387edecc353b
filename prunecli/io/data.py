"""Fashion-MNIST loading for calibration and training of the sample models.

The data is read straight from the IDX files that Debian's ``dataset-fashion-mnist`` package installs, so
no download, torchvision dataset class or PIL round trip is needed.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from prunecli.errors import DataError

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
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
