"""EDP's decomposed model: which convs become blocks, the cost after Pruning & Merging, and the parameters of a
channel group (its slices, their norms, the groups EDP can empty and their scores)."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from prunecli.criteria.base import normalise
from prunecli.errors import ArchitectureError
from prunecli.layers import DecomposedConv, channel_params, decomposed_layers, is_depthwise

if TYPE_CHECKING:
    from prunecli.graph import ChannelGroup, DependencyGraph
    from prunecli.measure import CostModel


def decomposable(model: nn.Module, ignore: Sequence[str] = ()) -> list[str]:
    """Names of the convs EDP decomposes: ungrouped 2-d convs not matched by an ``--ignore`` pattern."""
    return [
        name for name, m in model.named_modules()
        if type(m) is nn.Conv2d and m.groups == 1 and not any(fnmatch.fnmatchcase(name, p) for p in ignore)
    ]


def decompose(model: nn.Module, names: Sequence[str], init: str = "svd") -> None:
    """Replace each named conv by its :class:`DecomposedConv`, in place."""
    for name in names:
        model.set_submodule(name, DecomposedConv.of(model.get_submodule(name), init))


def merge_unprofitable(model: nn.Module) -> list[str]:
    """Merge back, in place, every block whose decomposed form does not save MACs; returns their names."""
    merged = [name for name, block in decomposed_layers(model).items() if not block.saves_macs()]
    for name in merged:
        model.set_submodule(name, model.get_submodule(name).merged())
    return merged


def check_decomposable(names: Sequence[str]) -> None:
    """Refuse, before any training, a model in which EDP finds nothing to decompose."""
    if not names:
        raise ArchitectureError("--method edp decomposes 2-d convolutions, and this model has none it can decompose "
                                "(grouped and depthwise convs, and --ignore'd ones, are left alone)")


# ----------------------------------------------------------------------------- budget


class MergeAwareCost:
    """MACs and params of the decomposed model *after* Pruning & Merging, as a function of the kept counts.

    The cost model of the decomposed model counts basis + coefficient conv; a block that will be merged
    back costs ``N' C' k^2`` instead, so each block's excess over its merged form is subtracted.
    """

    def __init__(self, cost_model: CostModel, blocks: Sequence[str]):
        index = {c.name: i for i, c in enumerate(cost_model.costs)}
        self.cost_model = cost_model
        self._basis = np.array([index[f"{b}.basis"] for b in blocks], dtype=int)
        self._coeff = np.array([index[f"{b}.coeff"] for b in blocks], dtype=int)
        self._kernel = np.array([math.prod(cost_model.costs[i].kernel) for i in self._basis], dtype=float)
        self._positions = np.array([cost_model.costs[i].positions for i in self._basis], dtype=float)

    def evaluate(self, keep: np.ndarray) -> tuple[float, float]:
        macs, params = self.cost_model.evaluate(keep)
        out, cin = self.cost_model.dims(keep)
        rank, inputs, outputs = out[self._basis], cin[self._basis], out[self._coeff]
        excess = np.maximum(0.0, rank * (inputs * self._kernel + outputs) - outputs * inputs * self._kernel)
        return macs - float((excess * self._positions).sum()), params - float(excess.sum())


# ----------------------------------------------------------------------------- groups of parameters


@dataclass(frozen=True)
class GroupSlice:
    """Part of one parameter that belongs to some channels of a group: ``param.index_select(dim, index)``,
    whose entry k moves with group channel ``roots[k]``."""

    param: Tensor
    dim: int
    index: Tensor
    roots: Tensor


def group_slices(graph: DependencyGraph, group: ChannelGroup) -> list[GroupSlice]:
    """Every parameter slice of a channel group: producers, norms and the next layers' input weights."""
    slices = []
    for member in group.members:
        for param, dim in channel_params(graph.module(member.layer), member.dim):
            index = torch.as_tensor(member.indices, dtype=torch.long, device=param.device)
            slices.append(GroupSlice(param, dim, index, torch.as_tensor(member.root_indices, dtype=torch.long)))
    return slices


def channel_norms(slices: Sequence[GroupSlice], channels: int) -> Tensor:
    """Euclidean norm of each group channel over all its slices (float64, on the CPU)."""
    squares = torch.zeros(channels, dtype=torch.float64)
    for s in slices:
        values = s.param.detach().index_select(s.dim, s.index).double()
        per_entry = values.pow(2).transpose(0, s.dim).reshape(len(s.index), -1).sum(1).cpu()
        squares.index_add_(0, s.roots, per_entry)
    return squares.sqrt()


@torch.no_grad()
def scale_channels(slices: Sequence[GroupSlice], factors: Tensor) -> None:
    """Multiply each group channel's slices by ``factors[channel]``."""
    for s in slices:
        shape = [1] * s.param.dim()
        shape[s.dim] = len(s.index)
        scale = factors[s.roots].to(s.param.device, s.param.dtype).reshape(shape)
        s.param.index_copy_(s.dim, s.index, s.param.index_select(s.dim, s.index) * scale)


def eligible_groups(graph: DependencyGraph, blocks: Mapping[str, DecomposedConv]) -> list[ChannelGroup]:
    """Groups EDP regularises: every conv/linear producer is a block's basis or coefficient conv (or a
    depthwise conv riding along), so zeroing the coefficients really empties the channel."""
    parts = {f"{b}.{part}" for b in blocks for part in ("basis", "coeff")}
    chosen = []
    for group in graph.groups:
        producers = [
            m.layer for m in group.members
            if m.dim == "out" and isinstance(graph.module(m.layer), nn.modules.conv._ConvNd | nn.Linear)
        ]
        if group.prunable and any(p in parts for p in producers) and all(
            p in parts or is_depthwise(graph.module(p)) for p in producers
        ):
            chosen.append(group)
    return chosen


def coefficient_norms(graph: DependencyGraph, group: ChannelGroup, blocks: Mapping[str, DecomposedConv]) -> Tensor:
    """Per group channel, the norm of its coefficients: rows of ``A`` for an output-channel group, columns for
    a rank group (basis filters)."""
    coefficients = {id(block.coeff.weight) for block in blocks.values()}
    return channel_norms([s for s in group_slices(graph, group) if id(s.param) in coefficients], group.channels)


def edp_scores(
    graph: DependencyGraph, groups: Sequence[ChannelGroup], blocks: Mapping[str, DecomposedConv]
) -> dict[int, Tensor]:
    """Scores for the allocator: coefficient norms scaled to mean 1 per group (higher = keep)."""
    return {g.index: normalise(coefficient_norms(graph, g, blocks)) for g in groups}
