"""L2-norm filter pruning: the Euclidean norm of each filter, the variant of PFEC used by Soft Filter
Pruning (He et al., IJCAI 2018) and FPGM's norm baseline. With ``--group-scope all`` every member of a coupled
group is scored by the same norm (the norms' |gamma|, the consumers' input slices), each normalised."""

from torch import Tensor

from prunecli.criteria import register_criterion
from prunecli.criteria.base import Criterion


@register_criterion
class L2Norm(Criterion):
    name = "l2"
    paper = "He et al., Soft Filter Pruning for Accelerating Deep CNNs, IJCAI 2018 (norm criterion)"
    summary = "Euclidean norm of each filter"
    group_members = frozenset({"norm", "in"})

    def weight_scores(self, weight: Tensor) -> Tensor:
        return weight.flatten(1).norm(dim=1)
