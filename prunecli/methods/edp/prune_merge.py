"""EDP's Pruning & Merging on the trained decomposed model: remove the channels and basis filters whose
coefficients are zero (folding the constant a dead channel leaves into the next layers' bias), then merge back the
blocks that no longer save MACs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from prunecli.allocate import Plan
from prunecli.layers import decomposed_layers, is_depthwise
from prunecli.methods.edp.blocks import coefficient_norms, merge_unprofitable

if TYPE_CHECKING:
    from prunecli.graph import ChannelGroup, DependencyGraph


@dataclass
class PruneMergeRecord:
    removed: dict[int, tuple[int, ...]]
    channels_removed: int
    basis_removed: int
    zero_rows_folded: int
    max_output_change: float  # largest change of the model's output on the example batch (0 when exact)
    merged: list[str] = field(default_factory=list)
    decomposed: dict[str, int] = field(default_factory=dict)  # kept blocks and their ranks

    def to_dict(self) -> dict[str, Any]:
        return {"channels_removed": self.channels_removed, "basis_filters_removed": self.basis_removed,
                "zero_rows_folded": self.zero_rows_folded, "max_output_change": self.max_output_change,
                "merged": self.merged, "decomposed": self.decomposed}


@torch.no_grad()
def _consumer_inputs(model: nn.Module, layers: Sequence[str], example: Tensor) -> dict[str, Tensor]:
    """The input each named layer receives on ``example``."""
    seen: dict[str, Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, args[0]))
        for name in layers
    ]
    try:
        _outputs(model, example)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@torch.no_grad()
def _fold_constant_channels(
    graph: DependencyGraph, group: ChannelGroup, positions: Sequence[int], example: Tensor
) -> list[int]:
    """Fold the constant each dead channel leaves into its consumers' bias; returns the channels that could be
    folded exactly (a channel that is not constant, or whose consumer has no bias, must stay)."""
    consumers = [
        m for m in group.members
        if m.dim == "in" and isinstance(graph.module(m.layer), nn.Conv2d | nn.Linear)
        and not is_depthwise(graph.module(m.layer))
    ]
    inputs = _consumer_inputs(graph.model, [m.layer for m in consumers], example)
    foldable = []
    for p in positions:
        plan = []
        for member in consumers:
            module = graph.module(member.layer)
            index = [i for i, r in zip(member.indices, member.root_indices, strict=True) if r == p]
            values = inputs[member.layer][:, index].double()
            constant = values.flatten(2).mean(2) if values.dim() > 2 else values
            if (values.amax() - values.amin()) > 1e-6 * (1 + values.abs().amax()) or (
                constant.abs().amax() > 0 and module.bias is None
            ):
                break
            plan.append((module, index, float(constant.flatten()[0])))
        else:
            for module, index, value in plan:
                if value:
                    module.bias += (module.weight[:, index].double().flatten(1).sum(1) * value).to(module.bias.dtype)
            foldable.append(p)
    return foldable


def prune_and_merge(
    graph: DependencyGraph, plan: Plan, groups: Sequence[ChannelGroup], example: Tensor, threshold: float
) -> PruneMergeRecord:
    """EDP's Pruning & Merging on the trained decomposed model ``graph.model``, in place.

    Removes the planned channels (exactly zero after training), every basis filter whose coefficient column
    has norm below ``threshold`` and every output channel whose coefficient row does, when the constant it
    leaves can be folded into the next layers' bias; then merges back the blocks that no longer save MACs.
    """
    blocks = decomposed_layers(graph.model)
    basis = {f"{b}.basis" for b in blocks}
    reference = _outputs(graph.model, example)
    removed = {g: set(v) for g, v in plan.removed.items()}
    folded = 0
    for group in groups:
        norms = coefficient_norms(graph, group, blocks)
        planned = removed.get(group.index, set())
        small = [p for p in range(group.channels) if norms[p] < threshold and p not in planned]
        small = small[: max(0, group.channels - len(planned) - 1)]  # never empty a group
        if not small or group.blocks > 1:  # grouped layers lose whole blocks only, as the plan does
            continue
        if not any(m.layer in basis and m.dim == "out" for m in group.members):
            small = _fold_constant_channels(graph, group, small, example)
            folded += len(small)
        removed.setdefault(group.index, set()).update(small)
    final = {g: tuple(sorted(v)) for g, v in removed.items() if v}
    graph.prune(final)
    by_index = {g.index: g for g in graph.groups}
    rank_groups = {g for g in final if any(m.layer in basis for m in by_index[g].members if m.dim == "out")}
    basis_removed = sum(len(final[g]) for g in rank_groups)
    merged = merge_unprofitable(graph.model)
    decomposed = {name: block.rank for name, block in decomposed_layers(graph.model).items()}
    channels = sum(len(v) for v in final.values())
    change = float((_outputs(graph.model, example) - reference).abs().max())
    return PruneMergeRecord(final, channels - basis_removed, basis_removed, folded, change, merged, decomposed)


@torch.no_grad()
def _outputs(model: nn.Module, example: Tensor) -> Tensor:
    was_training = model.training
    model.eval()
    out = model(example).double()
    model.train(was_training)
    return out
