"""L1-norm filter pruning.

Li, Kadav, Durdanovic, Samet, Graf, "Pruning Filters for Efficient ConvNets" (PFEC), ICLR 2017.
Score: the sum of absolute kernel weights of each filter. The paper sets per-layer ratios by a
sensitivity analysis; prunecli takes the ratios from ``--allocation`` instead.
"""

from torch import Tensor

from prunecli.criteria import register_criterion
from prunecli.criteria.base import Criterion


@register_criterion
class L1Norm(Criterion):
    name = "l1"
    paper = "Li et al., Pruning Filters for Efficient ConvNets, ICLR 2017"
    summary = "sum of absolute filter weights (PFEC)"

    def weight_scores(self, weight: Tensor) -> Tensor:
        return weight.flatten(1).abs().sum(1)
