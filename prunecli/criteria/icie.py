"""ICIE: filter pruning based on information capacity and information independence.

Tang, Ye, Shi, Hu, Peng, You, "Filter Pruning Based on Information Capacity and Independence", IEEE
TNNLS 36(5):8401-8413, 2025, doi 10.1109/TNNLS.2024.3415068; arXiv 2303.03645. docs/methods.md section 3.

Confirmed (abstracts only, no code published): two per-filter metrics, an entropy-based information
capacity computed from the filter itself (the paper's "feature-guided approximation" makes it
data-free) and an inter-filter independence, fused with a balancing parameter; the lowest fused scores
are pruned. ``--group-scope`` does not apply: both metrics are defined on a layer's filters (their weight
entropy, their correlation with the other filters) and are min-max fused per layer.

[INFERRED] (every formula below, docs/methods.md 3(c)):
    IC_i = entropy (bits) of filter i's weights quantised into Q bins with edges shared by the layer,
        over [min W, max W];
    II_i = 1 - mean over j != i of |Pearson correlation(w_i, w_j)|;
    S_i = minmax(IC)_i + lambda * minmax(II)_i, min-max normalised per layer; higher = kept.

Edge case [INFERRED]: the Pearson correlation of a constant filter (zero variance, e.g. an all-zero,
already pruned filter) is undefined. The formula would give it II = 1, the most independent filter of
the layer; prunecli gives it II = 0 instead (it carries no information of its own), and counts its
correlation with the others as 0. A zero filter then has the lowest IC (entropy 0) and the lowest II.

[INFERRED] capacity ``icie_capacity="feature"`` (docs/methods.md 3(c)), the quantity the weight entropy
approximates: IC_i = mean over the calibration images of the entropy of channel i's post-ReLU map (the
channels as the next layer receives them), each map quantised into Q bins with edges shared by the
layer over its activation range. A streaming pass cannot know that range before it has seen every
batch, so the scorer makes two passes: the first measures each layer's min and max over all the
calibration images, the second histograms every map on those edges (the result does not depend on the
batch size or order). II stays the weight term; the fusion minmax(IC) + lambda * minmax(II) is then
taken per channel group, after the group's layers have been combined (``criteria.base``), since the
feature hook and the filters sit on different layers.

Options:
    icie_lambda: the balancing parameter lambda (default 1.0; the paper's value is unknown).
    icie_bins: the number of quantisation bins Q (default 256).
    icie_capacity: "weight" (default, data-free) or "feature" (needs calibration data).
"""

from __future__ import annotations

import torch
from torch import Tensor

from prunecli.criteria import register_criterion
from prunecli.criteria.base import Criterion, score_weights
from prunecli.criteria.dctbasis import as_maps
from prunecli.errors import PrunecliError
from prunecli.graph import ChannelGroup, DependencyGraph

EPS = 1e-12
CAPACITIES = ("weight", "feature")


def _minmax(values: Tensor) -> Tensor:
    return (values - values.min()) / (values.max() - values.min() + EPS)


def _entropy(flat: Tensor, lo: Tensor, hi: Tensor, bins: int) -> Tensor:
    """[rows, m] -> [rows]: entropy in bits of each row's values over ``bins`` equal bins on [lo, hi]."""
    index = ((flat - lo) / (hi - lo + EPS) * bins).long().clamp_(0, bins - 1)
    counts = torch.zeros(flat.shape[0], bins, dtype=flat.dtype, device=flat.device)
    p = counts.scatter_add_(1, index, torch.ones_like(flat)) / flat.shape[1]
    return -(p * torch.log2(p.clamp_min(EPS))).sum(1)


def information_capacity(weight: Tensor, bins: int = 256) -> Tensor:
    """[n, ...] -> [n]: entropy in bits of each filter's weights over ``bins`` layer-wide equal bins."""
    flat = weight.flatten(1).double()
    return _entropy(flat, flat.min(), flat.max(), bins)


def feature_capacity(features: Tensor, value_range: tuple[Tensor, Tensor], bins: int = 256) -> Tensor:
    """[B, n, ...] -> [n]: entropy in bits of each channel's map over ``bins`` equal bins on the layer's
    ``value_range``, summed over the images."""
    maps = as_maps(features).flatten(2)  # [B, n, HW]
    lo, hi = (v.double() for v in value_range)
    return _entropy(maps.flatten(0, 1).double(), lo, hi, bins).view(maps.shape[:2]).sum(0)


def information_independence(weight: Tensor) -> Tensor:
    """[n, ...] -> [n]: one minus the mean absolute Pearson correlation with the layer's other filters."""
    flat = weight.flatten(1).double()
    n = flat.shape[0]
    centred = flat - flat.mean(1, keepdim=True)
    spread = centred.norm(dim=1)
    constant = spread <= 1e-9 * flat.norm(dim=1)  # zero variance: correlation undefined
    unit = centred / spread.clamp_min(EPS)[:, None]
    unit[constant] = 0
    corr = (unit @ unit.T).abs()
    corr.fill_diagonal_(0)
    independence = 1 - corr.sum(1) / max(n - 1, 1)
    independence[constant] = 0
    return independence


def icie_scores(weight: Tensor, bins: int = 256, lam: float = 1.0) -> Tensor:
    """[n, ...] -> [n]: minmax(IC) + lam * minmax(II); the lowest are pruned."""
    return _minmax(information_capacity(weight, bins)) + lam * _minmax(information_independence(weight))


class _Independence(Criterion):
    """ICIE's weight term alone, for the feature-capacity mode."""

    name = "icie-independence"

    def weight_scores(self, weight: Tensor) -> Tensor:
        return information_independence(weight)


@register_criterion
class ICIE(Criterion):
    name = "icie"
    paper = "Tang et al., Filter Pruning Based on Information Capacity and Independence, IEEE TNNLS 2025"
    summary = (
        "[INFERRED] weight entropy + lambda * (1 - mean |correlation| with the other filters); "
        "--icie-capacity feature: entropy of the activation maps instead [INFERRED, needs --data]"
    )

    def __init__(self, seed: int = 0, **options):
        super().__init__(seed, **options)
        self.capacity = str(self.options.get("icie_capacity", "weight"))
        if self.capacity not in CAPACITIES:
            raise PrunecliError(f"icie_capacity must be one of {', '.join(CAPACITIES)}, got {self.capacity!r}")
        if self.capacity == "feature":
            self.needs_data = self.needs_range = True
            self.hook = "activation"
        lam, bins = self.options.get("icie_lambda", 1.0), self.options.get("icie_bins", 256)
        try:
            self.lam = float(lam)
        except (TypeError, ValueError):
            self.lam = float("nan")
        if not self.lam >= 0:
            raise PrunecliError(f"icie_lambda must be a number >= 0, got {lam!r}")
        try:
            self.bins = int(bins)
        except (TypeError, ValueError):
            self.bins = 0
        if self.bins < 2 or str(self.bins) != str(bins).strip():
            raise PrunecliError(f"icie_bins must be a whole number >= 2, got {bins!r}")

    def weight_scores(self, weight: Tensor) -> Tensor:
        return icie_scores(weight, self.bins, self.lam)

    def feature_statistic(self, features: Tensor, value_range: tuple[Tensor, Tensor] | None = None) -> Tensor:
        return feature_capacity(features, value_range, self.bins)

    def finish(
        self, scores: dict[int, Tensor], graph: DependencyGraph, groups: list[ChannelGroup], reduction: str
    ) -> dict[int, Tensor]:
        """Fuse the groups' feature capacities with their filters' independence."""
        independence = score_weights(_Independence(), graph, groups, reduction)
        return {
            index: _minmax(capacity) + self.lam * (_minmax(independence[index]) if index in independence else 0)
            for index, capacity in scores.items()
        }
