"""CHIP: channel independence.

Sui, Yin, Xie, Phan, Zonouz, Yuan, "CHIP: CHannel Independence-based Pruning for Compact Neural
Networks", NeurIPS 2021 (code: Eclipsess/CHIP_NeurIPS2021, ``calculate_ci.py``). METHODS.md section 6.

[CODE]-confirmed: the hook sits on the channels as the next layer receives them (after BN, ReLU and the
residual add); per image, the layer's maps form ``F`` (n x HW) and channel i scores
``CI_i = ||F||_* - ||F with row i zeroed||_*`` (nuclear norms); the scores are averaged over the images;
the highest are kept.

Computation (exact, METHODS.md "fast exact form"): a nuclear norm is the sum of the square roots of
the eigenvalues of a Gram matrix. When HW <= n, ``F^T F - f_i f_i^T`` (HW x HW) is the Gram matrix of
F without row i; otherwise ``F F^T`` (n x n) with row and column i zeroed is. All in float64, batched
over (image, channel) pairs in memory-bounded chunks, instead of the code's n SVDs of n x HW per image.

Departures: the code rounds the maps to 4 decimals first; prunecli does not. One shared calibration
pass instead of re-drawn batches per layer; channels of a residual group are scored together.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prunecli.criteria import register_criterion
from prunecli.criteria.base import Criterion
from prunecli.criteria.dctbasis import as_maps


def _nuclear(gram: Tensor) -> Tensor:
    """[..., m, m] Gram matrices -> [...] nuclear norms of the matrices they come from."""
    return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().sum(-1)


def channel_independence(features: Tensor, budget: int = 1 << 24) -> Tensor:
    """[B, n, H, W] -> [n]: CI of each channel, summed over the images."""
    f = as_maps(features).flatten(2).double()  # [B, n, HW]
    batch, n, hw = f.shape
    by_columns = hw <= n  # the smaller Gram matrix: F^T F (hw x hw) or F F^T (n x n)
    gram = f.transpose(1, 2) @ f if by_columns else f @ f.transpose(1, 2)  # [B, m, m]
    m = gram.shape[-1]
    full = _nuclear(gram)  # [B]
    total = torch.zeros(n, dtype=torch.float64, device=f.device)
    step = max(1, budget // (m * m))
    pairs = torch.arange(batch * n, device=f.device)
    for start in range(0, batch * n, step):
        pair = pairs[start : start + step]
        image, channel = pair // n, pair % n
        reduced = gram[image]  # advanced indexing: a copy, [k, m, m]
        if by_columns:
            row = f[image, channel]  # [k, hw]
            reduced -= row[:, :, None] * row[:, None, :]
        else:
            k = torch.arange(len(pair), device=f.device)
            reduced[k, channel, :] = 0
            reduced[k, :, channel] = 0
        total.index_add_(0, channel, full[image] - _nuclear(reduced))
    return total


@register_criterion
class CHIP(Criterion):
    name = "chip"
    paper = "Sui et al., CHIP: CHannel Independence-based Pruning for Compact Neural Networks, NeurIPS 2021"
    summary = "channel independence: drop in the nuclear norm of the layer's activations without the channel"
    needs_data = True
    hook = "activation"

    def feature_statistic(self, features: Tensor) -> Tensor:
        return channel_independence(features)
