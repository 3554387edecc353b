"""Random scores: the sanity baseline every pruning paper should beat. Reproducible with ``--seed``; ignores
``--group-scope`` (no weight is read)."""

import torch
from torch import Tensor

from prunecli.criteria import register_criterion
from prunecli.criteria.base import Criterion


@register_criterion
class RandomScores(Criterion):
    name = "random"
    paper = "baseline (uniformly random channel ranking)"
    summary = "uniformly random scores, seeded by --seed"

    def __init__(self, seed: int = 0, **options):
        super().__init__(seed, **options)
        self.generator = torch.Generator().manual_seed(seed)

    def weight_scores(self, weight: Tensor) -> Tensor:
        return torch.rand(weight.shape[0], generator=self.generator, dtype=torch.float64)
