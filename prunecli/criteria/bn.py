"""BN-scale (Network Slimming) criterion.

Liu, Li, Shen, Huang, Yan, Zhang, "Learning Efficient Convolutional Networks through Network
Slimming", ICCV 2017. Score: |gamma| of the batch-norm layer on each channel. The paper trains with an
L1 penalty on gamma first and thresholds globally; prunecli scores the trained model as it is (use
``--allocation global`` for the paper's global threshold). Channel groups with no norm layer get no
score and keep all their channels. ``--group-scope`` does not apply: the norms' scales are the whole criterion,
and adding the filters' norms to them would make it group L1.
"""

from torch import Tensor, nn

from prunecli.criteria import register_criterion
from prunecli.criteria.base import Criterion


@register_criterion
class BatchNormScale(Criterion):
    name = "bn"
    paper = "Liu et al., Learning Efficient Convolutional Networks through Network Slimming, ICCV 2017"
    summary = "|gamma| of the channel's batch-norm (Network Slimming)"
    scored_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)

    def weight_scores(self, weight: Tensor) -> Tensor:
        return weight.abs().flatten()
