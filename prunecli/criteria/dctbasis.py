"""Orthonormal DCT-II by matrix products, and the feature-map shape the data criteria share.

Torch has no DCT op, so the 2-D transform of a map ``X`` (H x W) is ``D_H X D_W^T`` with the orthonormal
DCT-II matrix ``D[k, x] = sqrt(2/n) cos(pi (2x + 1) k / (2n))``, row 0 = ``sqrt(1/n)`` (docs/methods.md section 0).
This is the transform ``scipy.fft.dctn(norm="ortho")``, ``cv2.dct`` and ``torch_dct.dct_2d(norm="ortho")``
compute. A low-frequency a x b block needs only the first a rows of ``D_H`` and b rows of ``D_W``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import torch
from torch import Tensor


@lru_cache(maxsize=128)
def _basis(n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    k = torch.arange(n, dtype=torch.float64)[:, None]
    x = torch.arange(n, dtype=torch.float64)[None, :]
    basis = torch.cos(math.pi * (2 * x + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    basis[0] = math.sqrt(1.0 / n)
    return basis.to(device=device, dtype=dtype)


def dct_basis(n: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The n x n orthonormal DCT-II matrix (rows = frequencies), built in float64 and cached.

    The result is shared between callers through the cache: never modify it in place.
    """
    if n < 1:
        raise ValueError(f"DCT size must be positive, got {n}")
    return _basis(int(n), torch.device(device if device is not None else "cpu"), dtype)


def dct2(x: Tensor, a_h: int | None = None, a_w: int | None = None) -> Tensor:
    """(..., H, W) -> (..., a_h, a_w): the top-left block of the orthonormal 2-D DCT-II (all of it by default)."""
    height, width = x.shape[-2:]
    d_h = dct_basis(height, x.device, x.dtype)[: a_h or height]
    d_w = dct_basis(width, x.device, x.dtype)[: a_w or width]
    return d_h @ x @ d_w.T


def low_block(height: int, width: int) -> tuple[int, int]:
    """The LRMF low-frequency block size: ceil(H/4) x ceil(W/4)."""
    return math.ceil(height / 4), math.ceil(width / 4)


def as_maps(features: Tensor) -> Tensor:
    """View any [B, n, ...] features as [B, n, H, W] maps.

    Linear outputs [B, n] become 1x1 maps, Conv1d outputs [B, n, L] become L x 1 maps, and Conv3d outputs
    [B, n, D, H, W] stack their depth slices vertically, (D*H) x W.
    """
    if features.dim() < 2:
        raise ValueError(f"feature maps need a batch and a channel dimension, got shape {tuple(features.shape)}")
    if features.dim() == 2:
        return features[:, :, None, None]
    if features.dim() == 3:
        return features[..., None]
    if features.dim() == 4:
        return features
    return features.flatten(2, -2)


def batch_chunk(per_image: int, budget: int = 1 << 24) -> int:
    """How many images to process at once so that ``per_image`` elements each stay within ``budget``."""
    return max(1, budget // max(per_image, 1))


def sum_over_images(statistic: Callable[[Tensor], Tensor], maps: Tensor, per_image: int, budget: int = 1 << 24) -> Tensor:
    """``statistic`` of each chunk of images, summed: chunks of at most ``budget`` elements at ``per_image`` each.

    On the CPU the chunks run on ``torch.get_num_threads()`` Python threads with one torch thread each (torch
    releases the GIL inside its ops). The batched eigen/QR/SVD decompositions of CHIP and HRank are the reason:
    torch's own threaded LAPACK path for batches of small matrices was 20-40x slower than one thread on the
    2-core benchmark machine (eigh of 8 float64 512 x 512 Gram matrices: 19-24 s vs 0.5 s), and one thread
    alone leaves the other cores idle.
    """
    workers = torch.get_num_threads() if maps.device.type == "cpu" else 1
    step = min(batch_chunk(per_image, budget // workers), -(-len(maps) // workers))
    chunks = maps.split(step)
    if workers == 1 or len(chunks) == 1:
        return sum(statistic(chunk) for chunk in chunks)

    def one_thread(chunk: Tensor) -> Tensor:
        torch.set_num_threads(1)  # the setting is per thread under OpenMP
        return statistic(chunk)

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            return sum(pool.map(one_thread, chunks))
    finally:
        torch.set_num_threads(workers)
