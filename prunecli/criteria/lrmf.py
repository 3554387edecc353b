"""LRMF: Learned Representation Median in the Frequency domain.

Zhang, Xie, Li, Lei, Du, "Filter Pruning via Learned Representation Median in the Frequency Domain",
IEEE Transactions on Cybernetics 53(5):3165-3175, 2023 (code: zhangxin-xd/LRMF, ``pruning_cifar10.py``,
``Mask.get_filter_similar``). docs/methods.md section 1.

[CODE]-confirmed: the hook sits on the raw conv output (before BN); each image's maps go through the
orthonormal 2-D DCT-II and only the low-frequency top-left ceil(W/4) block is kept; per image, the
Euclidean ``cdist`` between the channels' flattened blocks is summed over the other channels; the sums
are added over the images. Channels with the *smallest* sums lie at the layer's representation median,
are replaceable by the others, and are pruned, so the sum itself is the score (higher = kept).

[INFERRED]: for non-square maps the block is ceil(H/4) x ceil(W/4) (the code uses the width for both
axes on square CIFAR maps); Linear or Conv1d outputs are treated as 1x1 / Lx1 maps.

Departures: the authors average over calibration *batches* and re-draw images per layer; prunecli makes
one shared pass and averages over images (same ranking within a layer, seed recorded). The authors
prune softly, re-scoring every few epochs during training; prunecli scores once and removes channels
(soft pruning comes with ``finetune``). Distances are computed in float32 by the matmul form and
summed per image in float32, then over images in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prunecli.criteria import register_criterion
from prunecli.criteria.base import Criterion
from prunecli.criteria.dctbasis import as_maps, batch_chunk, dct2, low_block


def lrmf_statistic(features: Tensor, budget: int = 1 << 22) -> Tensor:
    """[B, n, H, W] conv outputs -> [n]: sum over images of each channel's summed DCT-domain distance."""
    maps = as_maps(features)
    a_h, a_w = low_block(*maps.shape[-2:])
    z = dct2(maps.float(), a_h, a_w).flatten(2)  # [B, n, a_h * a_w]
    batch, n = z.shape[:2]
    total = torch.zeros(n, dtype=torch.float64, device=z.device)
    # Tiles of [images, rows, n] distances within ``budget`` elements: bounded memory, and the default (16 MB)
    # stays in the CPU's cache between the distance, square root and sum passes (measured faster than whole
    # batches on ResNet-50's 1024- and 2048-channel layers).
    rows = min(n, max(1, budget // n))
    step = batch_chunk(rows * n, budget)
    for start in range(0, batch, step):
        part = z[start : start + step]
        for row in range(0, n, rows):
            # The Gram-matrix (matmul) form in float32 is 2-4x faster than the direct one, and summing each row
            # in float32 before widening avoids a float64 copy of the distances (half the time); both relative
            # errors (~1e-7) are far below the gaps between channels' summed distances.
            block = torch.cdist(part[:, row : row + rows], part, compute_mode="use_mm_for_euclid_dist")
            total[row : row + rows] += block.sum(2).double().sum(0)
    return total


@register_criterion
class LRMF(Criterion):
    name = "lrmf"
    paper = "Zhang et al., Filter Pruning via Learned Representation Median in the Frequency Domain, IEEE TCYB 2023"
    summary = "summed distance between channels' low-frequency DCT blocks of conv outputs (near the median = redundant)"
    needs_data = True
    hook = "output"

    def feature_statistic(self, features: Tensor) -> Tensor:
        return lrmf_statistic(features)
