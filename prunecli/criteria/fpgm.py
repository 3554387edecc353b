"""FPGM: filter pruning via the geometric median.

He, Liu, Wang, Hu, Yang, "Filter Pruning via Geometric Median for Deep Convolutional Neural Networks
Acceleration", CVPR 2019 (code: he-y/filter-pruning-geometric-median, ``get_filter_similar``).
Score: the summed Euclidean distance of a filter to every other filter of its layer. Filters close to
the geometric median (small sums) are replaceable by the others and go first. Departure: the authors
prune softly every epoch; prunecli scores once (soft pruning comes with ``finetune``). With ``--group-scope all``
the consumers' input slices of a channel are scored the same way (the summed distance to the other channels'
slices), as Torch-Pruning's ``FPGMImportance`` does, but not the norms' scales: a distance between two scalars
says nothing about a channel being replaceable.
"""

import torch
from torch import Tensor

from prunecli.criteria import register_criterion
from prunecli.criteria.base import Criterion


@register_criterion
class GeometricMedian(Criterion):
    name = "fpgm"
    paper = "He et al., Filter Pruning via Geometric Median, CVPR 2019"
    summary = "summed distance to the other filters of the layer (near the geometric median = redundant)"
    group_members = frozenset({"in"})

    def weight_scores(self, weight: Tensor) -> Tensor:
        flat = weight.flatten(1).double()
        return torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist").sum(1)
