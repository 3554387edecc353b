"""CHIP: channel independence.

Sui, Yin, Xie, Phan, Zonouz, Yuan, "CHIP: CHannel Independence-based Pruning for Compact Neural
Networks", NeurIPS 2021 (code: Eclipsess/CHIP_NeurIPS2021, ``calculate_ci.py``). docs/methods.md section 6.

[CODE]-confirmed: the hook sits on the channels as the next layer receives them (after BN, ReLU and the
residual add); per image, the layer's maps form ``A`` (n x HW) and channel i scores
``CI_i = ||A||_* - ||A with row i zeroed||_*`` (nuclear norms); the scores are averaged over the images;
the highest are kept.

Computation (exact, from one eigendecomposition per image instead of the code's n SVDs). With the Gram
matrix ``G = A A^T`` and ``sqrt(x) = (2/pi) int_0^inf x / (x + u^2) du``, ``||A||_* = tr sqrt(G)``; zeroing
row i of A zeroes row and column i of G, and the block-inverse (Schur complement) formula turns the
difference of the two traces into::

    CI_i = (2/pi) int_0^inf T2_i(u) / T1_i(u) du,   T1_i = [(G + u^2)^-1]_ii = sum_j U_ij^2 / (l_j + u^2),
                                                   T2_i = [G (G + u^2)^-2]_ii = sum_j l_j U_ij^2 / (l_j + u^2)^2

with ``G = U diag(l) U^T``: every channel's CI from the same U and l, as two matrix products with the
weights of the quadrature nodes. The integrand lies in [0, 1] and, as a function of ``log u``, is analytic
in a strip of half-width pi/2 (its poles sit at ``u^2 = -l_j`` and at the reduced eigenvalues), so the
trapezoidal rule in ``log u`` converges like ``exp(-pi^2 / h)``: step 0.3 gives ~5e-15.
Nodes span 1e-9 to 1e4 times the largest singular value; both tails, geometric there, are summed in
closed form. When HW < n, G has rank <= HW: the HW x HW problem ``A^T A = V diag(l) V^T`` gives
``U = A V diag(l)^-1/2`` for the nonzero l (a thin QR of A, the former route, cost twice as much), and the
part of row i outside U's span adds ``(1 - ||U_i||^2) / u^2`` to T1. Cost per image O(n m^2 + m^3 + n m nodes),
m = min(n, HW), instead of O(n m^3) for n reduced eigenproblems. The result agrees with explicit SVD nuclear
norms to ~1e-12 relative. Eigenvalues of G below its rounding level count as zero, so exactly rank-deficient
maps are exact too; a singular value below ~1e-7 of the largest is not resolved by G (any Gram form shares
this: G squares them), an error below the float32 resolution of the activations.

Departures: the code rounds the maps to 4 decimals first; prunecli does not. One shared calibration
pass instead of re-drawn batches per layer; channels of a residual group are scored together.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from prunecli.criteria import register_criterion
from prunecli.criteria.base import Criterion
from prunecli.criteria.dctbasis import as_maps, sum_over_images

NODE_STEP = 0.3
NODE_RANGE = (1e-9, 1e4)  # quadrature nodes relative to the image's largest singular value


def _eigen_rows(maps: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """[B, n, HW] float64 -> eigenvalues [B, m] of A A^T relative to the largest (those below its rounding level
    set to 0), squared eigenvector rows [B, n, m], for HW < n the squared norm of each row's part outside the
    eigenvectors of the nonzero eigenvalues [B, n] (else None), and the largest eigenvalue [B, 1]."""
    n, hw = maps.shape[-2:]
    small = maps.transpose(1, 2) if hw < n else maps
    eigenvalues, vectors = torch.linalg.eigh(small @ small.transpose(1, 2))
    top = eigenvalues[:, -1:].clamp_min(0)
    # Eigenvalues below the rounding level of the Gram matrix are zero singular values (rank-deficient maps, e.g.
    # a pixel where every channel is off after the ReLU); their square roots would add ~sqrt(eps) * the largest each.
    nonzero = eigenvalues > eigenvalues.shape[-1] * torch.finfo(maps.dtype).eps * top
    top[top == 0] = 1  # an all-zero image: every CI is 0 whatever the scale
    scaled = torch.where(nonzero, eigenvalues / top, 0)  # in [0, 1]; the integral scales with sqrt(top)
    if hw >= n:
        return scaled, vectors.square(), None, top
    # A^T A = V diag(l) V^T gives A A^T's eigenvectors as U = A V diag(l)^-1/2 for the nonzero l.
    rows = (maps @ vectors).square() / torch.where(nonzero, eigenvalues, torch.inf)[:, None, :]
    return scaled, rows, (1 - rows.sum(2)).clamp_min(0), top


def _independence(maps: Tensor) -> Tensor:
    """[B, n, HW] float64 -> [B, n]: CI of each channel in each image (module docstring)."""
    scaled, rows, outside, top = _eigen_rows(maps)
    log_u = torch.arange(
        math.log(NODE_RANGE[0]), math.log(NODE_RANGE[1]) + NODE_STEP / 2, NODE_STEP, dtype=maps.dtype, device=maps.device
    )
    u2 = torch.exp(2 * log_u)
    inverse = 1 / (scaled[:, :, None] + u2)  # [B, m, nodes]
    t1 = rows @ inverse
    t2 = rows @ (scaled[:, :, None] * inverse.square())
    if outside is not None:
        t1 += outside[:, :, None] / u2
    integrand = t2 / t1 * log_u.exp()  # du = u d(log u)
    tails = (integrand[..., 0] + integrand[..., -1]) / math.expm1(NODE_STEP)
    return (2 / math.pi) * NODE_STEP * (integrand.sum(2) + tails) * top.sqrt()


def channel_independence(features: Tensor, budget: int = 1 << 24) -> Tensor:
    """[B, n, H, W] -> [n]: CI of each channel, summed over the images."""
    maps = as_maps(features).flatten(2)  # [B, n, HW]
    _, n, hw = maps.shape
    m = min(n, hw)
    nodes = round(math.log(NODE_RANGE[1] / NODE_RANGE[0]) / NODE_STEP) + 1
    per_image = n * hw + 3 * n * m + 2 * m * nodes + 3 * n * nodes  # float64 working set
    return sum_over_images(lambda chunk: _independence(chunk.double()).sum(0), maps, per_image, budget)


@register_criterion
class CHIP(Criterion):
    name = "chip"
    paper = "Sui et al., CHIP: CHannel Independence-based Pruning for Compact Neural Networks, NeurIPS 2021"
    summary = "channel independence: drop in the nuclear norm of the layer's activations without the channel"
    needs_data = True
    hook = "activation"

    def feature_statistic(self, features: Tensor) -> Tensor:
        return channel_independence(features)
