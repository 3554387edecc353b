"""Taylor: first-order Taylor importance on the batch-norm gates.

Molchanov, Mallya, Tyree, Frosio, Kautz, "Importance Estimation for Neural Network Pruning", CVPR 2019.
docs/methods.md section 6 ([PAPER], from memory; no code read).

Score of channel i: ``(gamma_i dL/dgamma_i + beta_i dL/dbeta_i)^2``, the squared first-order estimate of
the loss change when the channel's BN gate is removed, computed per mini-batch (cross-entropy, mean over
the batch) and accumulated over the calibration batches; the highest are kept.

Departures: the paper ranks globally and removes a few neurons every few mini-batches while fine-tuning;
prunecli scores once, in eval mode (BN uses its running statistics), and takes the ranking scheme from
``--allocation`` (``global`` for the paper's). Channels whose norm layer has no affine parameters score 0,
and groups without a batch-norm get no score (they keep all channels).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from prunecli.criteria import register_criterion
from prunecli.criteria.base import Criterion


def _gate_term(param: Tensor | None, indices: Tensor) -> Tensor | None:
    if param is None or param.grad is None:
        return None
    return (param.detach() * param.grad.detach()).index_select(0, indices.to(param.device)).double()


def taylor_gate_scores(module: nn.Module, indices: Tensor) -> Tensor:
    """[len(indices)]: (gamma * dL/dgamma + beta * dL/dbeta)^2 from the gradients of the last backward."""
    terms = [t for t in (_gate_term(module.weight, indices), _gate_term(module.bias, indices)) if t is not None]
    if not terms:
        return torch.zeros(len(indices), dtype=torch.float64, device=indices.device)
    return sum(terms).pow(2)


@register_criterion
class Taylor(Criterion):
    name = "taylor"
    paper = "Molchanov et al., Importance Estimation for Neural Network Pruning, CVPR 2019"
    summary = "first-order Taylor estimate on BN gates: (gamma*dL/dgamma + beta*dL/dbeta)^2 (needs labels)"
    needs_data = True
    needs_labels = True
    scored_types = (nn.modules.batchnorm._BatchNorm,)

    def gradient_statistic(self, module: nn.Module, indices: Tensor) -> Tensor:
        return taylor_gate_scores(module, indices)
