"""L1-norm filter pruning.

Li, Kadav, Durdanovic, Samet, Graf, "Pruning Filters for Efficient ConvNets" (PFEC), ICLR 2017.
Score: the sum of absolute kernel weights of each filter. The paper sets per-layer ratios by a
sensitivity analysis; prunecli takes the ratios from ``--allocation`` instead. With ``--group-scope all`` the
same sum is taken of every member of a coupled group (the norms' |gamma| and the consumers' input slices too,
each normalised), Torch-Pruning's group L1; the paper scores the producing filters only.
"""

from torch import Tensor

from prunecli.criteria import register_criterion
from prunecli.criteria.base import Criterion


@register_criterion
class L1Norm(Criterion):
    name = "l1"
    paper = "Li et al., Pruning Filters for Efficient ConvNets, ICLR 2017"
    summary = "sum of absolute filter weights (PFEC)"
    group_members = frozenset({"norm", "in"})

    def weight_scores(self, weight: Tensor) -> Tensor:
        return weight.flatten(1).abs().sum(1)
