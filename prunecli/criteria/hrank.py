"""HRank: filter pruning by the rank of feature maps.

Lin, Ji, Wang, Zhang, Zhang, Tian, Shao, "HRank: Filter Pruning using High-Rank Feature Map", CVPR 2020
(code: lmbxmu/HRank, ``rank_generation.py::get_feature_hook``). docs/methods.md section 6.

[CODE]-confirmed: the hook sits on the channels as the next layer receives them (after BN, ReLU and the
residual add); the score of a channel is the matrix rank of its H x W map, averaged over the calibration
images, computed in float32 with the default SVD tolerance (as ``torch.matrix_rank`` did); the highest
ranks are kept.

Departures: one shared calibration pass instead of re-drawn batches per layer; channels of a residual
group are scored together instead of independently per block; Linear outputs count as 1x1 maps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prunecli.criteria import register_criterion
from prunecli.criteria.base import Criterion
from prunecli.criteria.dctbasis import as_maps, sum_over_images


def rank_statistic(features: Tensor, budget: int = 1 << 24) -> Tensor:
    """[B, n, H, W] -> [n]: each channel's map rank, summed over the images."""
    maps = as_maps(features).float()
    per_image = maps[0].numel()  # the budget bounds the batched SVD's workspace
    return sum_over_images(lambda chunk: torch.linalg.matrix_rank(chunk).double().sum(0), maps, per_image, budget)


@register_criterion
class HRank(Criterion):
    name = "hrank"
    paper = "Lin et al., HRank: Filter Pruning using High-Rank Feature Map, CVPR 2020"
    summary = "average matrix rank of the channel's activation maps"
    needs_data = True
    hook = "activation"

    def feature_statistic(self, features: Tensor) -> Tensor:
        return rank_statistic(features)
