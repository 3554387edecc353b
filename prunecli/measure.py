"""Parameters and MACs, per layer and in total, and the analytic cost model the allocator bisects on.

MACs follow the thop convention the papers report: multiply-accumulates of convolution and linear
layers (``out * in/groups * prod(kernel)`` per output position), nothing for norms and activations.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from prunecli.graph import ChannelGroup
from prunecli.layers import CONV_LINEAR
from prunecli.results import Totals


@dataclass(frozen=True)
class LayerCost:
    """One conv/linear layer as traced: its shape and how often its kernel is applied."""

    name: str
    kind: str  # module class name
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...]
    groups: int
    positions: int  # output positions per channel for one input (H*W for convs, tokens for linears)
    params: int
    macs: int

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels


def _layer_cost(name: str, module: nn.Module, output: torch.Tensor) -> LayerCost:
    if isinstance(module, nn.Linear):
        positions = output.numel() // (output.shape[0] * module.out_features)
        kernel, groups, cin, cout = (), 1, module.in_features, module.out_features
    else:
        positions = math.prod(output.shape[2:])
        kernel, groups, cin, cout = tuple(module.kernel_size), module.groups, module.in_channels, module.out_channels
    params = sum(p.numel() for p in module.parameters(recurse=False))
    macs = cout * (cin // groups) * math.prod(kernel) * positions
    return LayerCost(name, type(module).__name__, cin, cout, kernel, groups, positions, params, macs)


def layer_costs(model: nn.Module, example_input: torch.Tensor) -> list[LayerCost]:
    """Cost every conv/linear layer that runs on a single example."""
    return costs_and_output(model, example_input)[0]


@torch.no_grad()
def costs_and_output(model: nn.Module, example_input: torch.Tensor) -> tuple[list[LayerCost], torch.Tensor]:
    """One forward pass of a single example: the cost of every conv/linear layer that ran, and the output."""
    records: dict[str, LayerCost] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, CONV_LINEAR):

            def hook(mod, inputs, output, name=name):
                cost = _layer_cost(name, mod, output[:1])
                previous = records.get(name)  # a layer used twice costs twice
                records[name] = cost if previous is None else _add_calls(previous, cost)

            handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        output = model(example_input[:1])
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return list(records.values()), output


def _add_calls(first: LayerCost, again: LayerCost) -> LayerCost:
    return LayerCost(
        first.name, first.kind, first.in_channels, first.out_channels, first.kernel, first.groups,
        first.positions + again.positions, first.params, first.macs + again.macs,
    )


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def totals(model: nn.Module, example_input: torch.Tensor) -> Totals:
    return Totals(count_params(model), sum(c.macs for c in layer_costs(model, example_input)))


class CostModel:
    """MACs and parameters as a function of how many channels each group keeps.

    Every layer dimension is affine in the groups' kept counts (``dim = base - sum_g m_g * removed_g``),
    so the cost of any plan is a few vector operations: bisection never runs the model. A layer that holds
    only some of a group's channels (one branch of a concatenation merged with another) loses a share that
    depends on which channels go: :meth:`removing_in_order` adds those exact losses for a known order.
    """

    def __init__(self, model: nn.Module, costs: list[LayerCost], groups: list[ChannelGroup]):
        self.groups = groups
        index = {c.name: i for i, c in enumerate(costs)}
        self.costs = costs
        n_layers, n_groups = len(costs), len(groups)
        self._out_loss = np.zeros((n_layers, n_groups))
        self._in_loss = np.zeros((n_layers, n_groups))
        other_loss: dict[str, np.ndarray] = {}
        modules = dict(model.named_modules())
        # (dimension kind, row, group, {layer channel: the group position it goes with}) of every layer in a group
        self._coverage: list[tuple[str, int, int, dict[int, int]]] = []
        for g, group in enumerate(groups):
            for (layer, dim), channels in _layer_channels(group).items():
                share = len(channels) / group.channels
                if layer in index:
                    target = self._out_loss if dim == "out" else self._in_loss
                    target[index[layer], g] = share
                    self._coverage.append((dim, index[layer], g, channels))
                elif dim == "out" and _channels_of(modules[layer]) > 1:  # not one weight shared by all (PReLU's)
                    other_loss.setdefault(layer, np.zeros(n_groups))[g] = share
                    self._coverage.append(("other", list(other_loss).index(layer), g, channels))
        self._exact: list[tuple[str, int, int, np.ndarray]] = []  # see removing_in_order
        self._out0 = np.array([c.out_channels for c in costs], dtype=float)
        self._in0 = np.array([c.in_channels for c in costs], dtype=float)
        # grouped convs that lose whole conv groups keep their width per group, as depthwise ones do
        self.whole_group_convs = {g.grouped_conv for g in groups if g.grouped_conv}
        groups_follow = np.array([c.depthwise or c.name in self.whole_group_convs for c in costs])
        per_group_in = np.array([c.in_channels // c.groups for c in costs], dtype=float)
        kernel = np.array([math.prod(c.kernel) for c in costs], dtype=float)
        positions = np.array([c.positions for c in costs], dtype=float)
        groups_arr = np.array([c.groups for c in costs], dtype=float)
        bias = np.array([c.params - c.out_channels * (c.in_channels // c.groups) * math.prod(c.kernel) for c in costs])
        # in/groups is fixed for depthwise convs and whole-group removal (in, out and groups shrink together); else
        # groups is fixed
        self._in_scale = np.where(groups_follow, 0.0, 1.0 / groups_arr)
        self._in_fixed = np.where(groups_follow, per_group_in, 0.0)
        self._kernel_positions = kernel * positions
        self._kernel = kernel
        self._bias_per_out = np.where(self._out0 > 0, bias / self._out0, 0.0)
        # parameters of other channel-sized layers (norms, PReLU, ...) scale with their channel count
        self._other_params = np.array(
            [sum(p.numel() for p in modules[name].parameters(recurse=False)) for name in other_loss], dtype=float
        )
        self._other_channels = np.array([_channels_of(modules[name]) for name in other_loss], dtype=float)
        self._other_loss = np.array(list(other_loss.values())).reshape(len(other_loss), n_groups)
        full = np.array([g.channels for g in groups], dtype=float)
        self._full = full
        self._costed_params = float(sum(c.params for c in costs)) + float(self._other_params.sum())
        self.base_params = count_params(model)
        self.base_macs = sum(c.macs for c in costs)
        base = self.evaluate(full)
        self._params_offset = self.base_params - base[1]

    def removing_in_order(self, orders: Mapping[int, Sequence[int]]) -> CostModel:
        """This cost model, exact for plans that remove the first ``r`` positions of ``orders[group index]``
        when a group loses ``r`` channels (as the allocator's plans do, lowest scores first)."""
        exact = copy.copy(self)
        exact._exact = []
        for kind, row, g, channels in self._coverage:
            order = orders.get(self.groups[g].index)
            if order is None:
                continue
            rank = {position: i for i, position in enumerate(order)}
            goes_at = np.sort([rank[position] for position in channels.values()])
            removed = np.arange(self.groups[g].channels + 1)
            # channels gone after r removals, less the proportional share the affine model already counts
            correction = np.searchsorted(goes_at, removed) - len(channels) / self.groups[g].channels * removed
            if np.abs(correction).max() > 1e-9:
                exact._exact.append((kind, row, g, correction))
        return exact

    def _losses(self, keep: np.ndarray) -> dict[str, np.ndarray]:
        """Channels lost by every conv/linear output and input, and by every other channel-sized layer."""
        removed = self._full - keep
        losses = {"out": self._out_loss @ removed, "in": self._in_loss @ removed, "other": self._other_loss @ removed}
        for kind, row, g, correction in self._exact:
            losses[kind][row] += correction[round(removed[g])]
        return losses

    def dims(self, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        losses = self._losses(keep)
        return self._out0 - losses["out"], self._in0 - losses["in"]

    def evaluate(self, keep: np.ndarray) -> tuple[float, float]:
        """(MACs, params) of the model when group g keeps ``keep[g]`` channels."""
        losses = self._losses(keep)
        out, cin = self._out0 - losses["out"], self._in0 - losses["in"]
        in_per_group = cin * self._in_scale + self._in_fixed
        macs = float((out * in_per_group * self._kernel_positions).sum())
        params = float((out * in_per_group * self._kernel + out * self._bias_per_out).sum())
        if len(self._other_params):
            channels = np.maximum(self._other_channels, 1.0)
            params += float((self._other_params * (1 - losses["other"] / channels)).sum())
        return macs, params + getattr(self, "_params_offset", 0.0)


def _layer_channels(group: ChannelGroup) -> dict[tuple[str, str], dict[int, int]]:
    """Per (layer, "out"/"in") in the group: each of its channels that goes, with the group position it goes with."""
    found: dict[tuple[str, str], dict[int, int]] = {}
    for member in group.members:
        channels = found.setdefault((member.layer, member.dim), {})
        for channel, position in zip(member.indices, member.root_indices, strict=True):
            channels.setdefault(channel, position)
    return found


def _channels_of(module: nn.Module) -> int:
    for attr in ("num_features", "num_channels", "num_parameters"):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    shape = getattr(module, "normalized_shape", None)
    if shape:
        return int(shape[-1])
    weight = getattr(module, "weight", None)
    return int(weight.shape[0]) if weight is not None else 1
