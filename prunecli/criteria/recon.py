"""Reconstruction-aware selection: remove the channels whose loss a least-squares refit can best make good.

He, Zhang, Sun, "Channel Pruning for Accelerating Very Deep Neural Networks", ICCV 2017, select channels by the
reconstruction error of the next layer's output and refit that layer by least squares; Luo, Wu, Lin, ThiNet, ICCV
2017, do the same greedily. We score in closed form, the structured Optimal Brain Surgeon way (Hassibi and Stork,
NeurIPS 1993): for every consumer conv/linear of a channel group, the rise in squared output error when the
channel's input columns go and the rest are refit optimally is ``tr(W_S [(G^-1)_SS]^-1 W_S^T)``, G the Gram matrix
of the consumer's input patches on the calibration images (one pass, no labels) and W its weights.

It is the selection ``prune --reconstruct`` is built for: the score is exactly the error that reconstruction cannot
recover for that channel alone. Departures: each channel is scored on its own (one-shot, not greedy: channels
removed together interact through G, which a greedy update would follow at the cost of one solve per removal);
consumers that are not Conv2d or Linear give no score, and a group with none keeps all its channels; the consumers
of a group are combined by ``--group-reduction`` after per-layer normalisation like every other criterion.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from prunecli.criteria import register_criterion
from prunecli.criteria.base import Criterion, scatter
from prunecli.graph import ChannelGroup, DependencyGraph
from prunecli.reconstruct.least_squares import REFIT_TYPES, LayerView, input_grams, removal_errors

RIDGE = 1e-3  # as --reconstruct's default: the scores describe the fit it will make


@register_criterion
class Reconstruction(Criterion):
    name = "recon"
    paper = "He et al., Channel Pruning for Accelerating Very Deep Neural Networks, ICCV 2017 (OBS-style closed form)"
    summary = "output error that refitting the consumers cannot recover without the channel (use with --reconstruct)"
    needs_data = True
    own_pass = True

    def pass_scores(
        self, graph: DependencyGraph, groups: Sequence[ChannelGroup], batches: Sequence[Tensor], device, progress
    ) -> dict[int, list[Tensor]]:
        """Per group, one [channels] score per consumer conv/linear, from one pass of Gram statistics."""
        consumers = [
            (group, member) for group in groups for member in group.members
            if member.dim == "in" and isinstance(graph.module(member.layer), REFIT_TYPES)
        ]
        layers = list(dict.fromkeys(member.layer for _, member in consumers))
        grams = input_grams(graph.model, layers, batches, seed=self.seed, device=device, progress=progress)
        per_group: dict[int, list[Tensor]] = {}
        for group, member in consumers:
            roots = sorted(set(member.root_indices))
            columns_of = {root: [] for root in roots}
            for index, root in zip(member.indices, member.root_indices, strict=True):
                columns_of[root].append(index)
            view = LayerView(graph.module(member.layer))
            errors = removal_errors(view, grams[member.layer], [columns_of[r] for r in roots], RIDGE)
            per_group.setdefault(group.index, []).append(scatter(roots, errors, group.channels))
        return per_group
