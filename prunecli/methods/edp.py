"""EDP: decomposition-and-pruning training with a Pruning & Merging step.

Ruan, Liu, Yuan, Li, Hu, Li, Maybank, "EDP: An Efficient Decomposition and Pruning Scheme for Convolutional
Neural Network Compression", IEEE TNNLS 32(10):4499-4513, 2021 (doi 10.1109/TNNLS.2020.3018177).

Neither the paper's code nor its full text is public; this follows docs/methods.md section 5, which
reconstructs the method from the abstract and from Hinge (Li et al., CVPR 2020), the closest public method:

* every prunable conv becomes a *compressed-aware block*: a basis conv (same kernel, stride, padding; no bias)
  followed by a 1x1 coefficient conv ``A`` holding the bias, initialised by SVD of the weight (or basis = the
  weight, ``A`` = identity), so the network computes what it did;
* one training stage with a proximal group-lasso step on the rows and columns of every ``A`` after each optimiser
  step (``lambda``, Hinge's ``proximal_operator``);
* Pruning & Merging: zero columns of ``A`` drop basis filters (low rank), zero rows drop output channels with
  their norm and the next layer's inputs (the constant a dropped channel leaves is folded into the consumers'
  bias), and a block whose decomposed form no longer saves MACs is merged back into one conv, exactly.

Our deviations, all [INFERRED] because the paper's schedule is unknown:

* Budget: the paper tunes lambda to reach a compression; we meet ``--flops-target`` directly. Before training
  and after every epoch but the last, the rows and columns of ``A`` are ranked by their norms (normalised to
  mean 1 per group) and the allocator picks, with a cost model that knows which blocks will be merged back,
  the ones whose removal meets the budget. Each picked channel's whole group (coefficient rows or columns, its
  norm parameters and the next layer's input weights) is projected after every step onto a ball whose radius
  falls linearly from its norm at selection to zero at the last step. So the chosen groups end *exactly*
  zero, removing them changes nothing, and the network has trained without them.
* Groups whose producers are not coefficient convs (grouped convs, linear layers) are not pruned: nothing
  regularises them.
* Merging is decided per block with the final widths: merge when ``M'(C k^2 + N') >= N' C k^2``.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from prunecli.allocate import Plan
from prunecli.criteria.base import normalise
from prunecli.errors import ArchitectureError
from prunecli.layers import DecomposedConv, channel_params, decomposed_layers, is_depthwise
from prunecli.planning import Selection
from prunecli.runtime import model_device
from prunecli.training import finetune

if TYPE_CHECKING:
    from prunecli.config import EdpOptions
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
class _Slice:
    """Part of one parameter that belongs to some channels of a group: ``param.index_select(dim, index)``,
    whose entry k moves with group channel ``roots[k]``."""

    param: Tensor
    dim: int
    index: Tensor
    roots: Tensor


def group_slices(graph: DependencyGraph, group: ChannelGroup) -> list[_Slice]:
    """Every parameter slice of a channel group: producers, norms and the next layers' input weights."""
    slices = []
    for member in group.members:
        for param, dim in channel_params(graph.module(member.layer), member.dim):
            index = torch.as_tensor(member.indices, dtype=torch.long, device=param.device)
            slices.append(_Slice(param, dim, index, torch.as_tensor(member.root_indices, dtype=torch.long)))
    return slices


def _channel_norms(slices: Sequence[_Slice], channels: int) -> Tensor:
    """Euclidean norm of each group channel over all its slices (float64, on the CPU)."""
    squares = torch.zeros(channels, dtype=torch.float64)
    for s in slices:
        values = s.param.detach().index_select(s.dim, s.index).double()
        per_entry = values.pow(2).transpose(0, s.dim).reshape(len(s.index), -1).sum(1).cpu()
        squares.index_add_(0, s.roots, per_entry)
    return squares.sqrt()


@torch.no_grad()
def _scale_channels(slices: Sequence[_Slice], factors: Tensor) -> None:
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
    return _channel_norms([s for s in group_slices(graph, group) if id(s.param) in coefficients], group.channels)


def edp_scores(
    graph: DependencyGraph, groups: Sequence[ChannelGroup], blocks: Mapping[str, DecomposedConv]
) -> dict[int, Tensor]:
    """Scores for the allocator: coefficient norms scaled to mean 1 per group (higher = keep)."""
    return {g.index: normalise(coefficient_norms(graph, g, blocks)) for g in groups}


# ----------------------------------------------------------------------------- training


@torch.no_grad()
def proximal_group_lasso(blocks: Mapping[str, DecomposedConv], step: float) -> None:
    """Hinge's proximal operator on every row and column of every ``A``: ``a <- a max(0, 1 - step / ||a||)``."""
    if step <= 0:
        return
    for block in blocks.values():
        a = block.coeff.weight[:, :, 0, 0]
        a.mul_((1 - step / a.norm(dim=1, keepdim=True).clamp_min(1e-30)).clamp_min(0))
        a.mul_((1 - step / a.norm(dim=0, keepdim=True).clamp_min(1e-30)).clamp_min(0))


def zero_coefficient_groups(blocks: Mapping[str, DecomposedConv]) -> int:
    """How many rows and columns of all coefficient matrices are exactly zero (the sparsity reached so far)."""
    count = 0
    for block in blocks.values():
        a = block.coeff.weight.detach()[:, :, 0, 0]
        count += int((a.norm(dim=1) == 0).sum()) + int((a.norm(dim=0) == 0).sum())
    return count


class EdpTraining:
    """The training side of EDP, as a hook of the fine-tuning loop (``prunecli.training.TrainingHook``).

    ``select`` returns the plan that meets the budget from the current coefficient norms. A selected channel
    keeps its radius (its group norm when first selected) and the step it was selected at, so re-selecting it
    continues its decay; a channel no longer selected is released and regrows from where it is.
    """

    keeps_best = False  # only the last step has the selected groups exactly at zero

    def __init__(self, graph: DependencyGraph, select: Callable[[], tuple[Plan, float]], lam: float):
        self.graph, self.select, self.lam = graph, select, lam
        self.blocks = decomposed_layers(graph.model)
        self.by_index = {g.index: g for g in graph.groups}
        self.plan: Plan | None = None
        self.target = math.nan
        self.radius: dict[int, dict[int, tuple[float, int]]] = {}  # group -> channel -> (radius, step selected)
        self.selections: list[dict[str, Any]] = []
        self.step = 0
        self._slices: dict[int, list[_Slice]] = {}

    def refresh(self) -> None:
        self.blocks = decomposed_layers(self.graph.model)
        self._slices = {g: group_slices(self.graph, self.by_index[g]) for g in self.radius}

    def _choose(self, epoch: int) -> dict[str, Any]:
        plan, self.target = self.select()
        self._slices = {g: group_slices(self.graph, self.by_index[g]) for g in plan.removed}
        radius = {}
        for g, positions in plan.removed.items():
            norms, current = _channel_norms(self._slices[g], self.by_index[g].channels), self.radius.get(g, {})
            radius[g] = {p: current.get(p, (float(norms[p]), self.step)) for p in positions}
        self.plan, self.radius = plan, radius
        entry = {"epoch": epoch, "removed": sum(len(v) for v in plan.removed.values()),
                 "zero_coefficient_groups": zero_coefficient_groups(self.blocks), "estimated_cost": plan.cost}
        self.selections.append(entry)
        return {"event": "select", **entry}

    def begin(self) -> dict[str, Any]:
        return self._choose(0)

    def after_backward(self) -> None:
        pass

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int, lr: float) -> None:
        self.step = step
        proximal_group_lasso(self.blocks, lr * self.lam)
        for g, chosen in self.radius.items():
            group = self.by_index[g]
            factors = torch.ones(group.channels, dtype=torch.float64)
            norms = _channel_norms(self._slices[g], group.channels)
            for p, (start, since) in chosen.items():
                left = max(0.0, (total_steps - step) / max(1, total_steps - since))
                factors[p] = min(1.0, start * left / float(norms[p])) if norms[p] > 0 else 0.0
            _scale_channels(self._slices[g], factors)

    def end_epoch(self, epochs_done: int, epochs: int) -> dict[str, Any] | None:
        return self._choose(epochs_done) if epochs_done < epochs else None

    def state(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict(), "target": float(self.target), "step": self.step,
                "radius": [[g, p, r, s] for g, chosen in self.radius.items() for p, (r, s) in chosen.items()],
                "selections": [dict(s) for s in self.selections]}

    def load(self, state: Mapping[str, Any], history: bool = True) -> None:
        self.plan, self.target, self.step = Plan.from_dict(state["plan"]), float(state["target"]), int(state["step"])
        self.radius = {}
        for g, p, r, s in state["radius"]:
            self.radius.setdefault(int(g), {})[int(p)] = (float(r), int(s))
        if history:
            self.selections = [dict(s) for s in state["selections"]]
        self.refresh()


# ----------------------------------------------------------------------------- Pruning & Merging


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


def check_decomposable(names: Sequence[str]) -> None:
    if not names:
        raise ArchitectureError("--method edp decomposes 2-d convolutions, and this model has none it can decompose "
                                "(grouped and depthwise convs, and --ignore'd ones, are left alone)")


# ----------------------------------------------------------------------------- the whole method


@dataclass(frozen=True)
class EdpResult:
    """The slim model (decomposed blocks that pay off, merged convs elsewhere), the plan that met the budget,
    the absolute target, the selections made while training, the training record and what PM did."""

    model: nn.Module
    plan: Plan
    target: float
    selections: list[dict[str, Any]]
    training: Any  # prunecli.training.FinetuneResult
    prune_merge: PruneMergeRecord

    def record(self) -> dict[str, Any]:
        """What the slim file's metadata records. EDP keeps the last epoch's weights (only its last step has the
        selected groups at exactly zero), so ``best_epoch`` is the last and ``best_top1`` that epoch's validation
        top-1 (the fine-tuning loop, which keeps no best epoch here, leaves it None)."""
        training = self.training.record()
        if training["best_top1"] is None:
            kept = [h["val_top1"] for h in training["history"] if h["epoch"] == training["best_epoch"]]
            training["best_top1"] = kept[0] if kept else None
        return {"selections": self.selections, "training": training, **self.prune_merge.to_dict()}


def edp_prune(
    model: nn.Module,
    example_input: Tensor,
    train,
    val,
    edp: EdpOptions,
    selection: Selection,
    *,
    progress=None,
) -> EdpResult:
    """Decompose, train with the group-sparse regulariser towards ``selection.budget``, then Pruning & Merging.

    Args:
        model: changed in place (decomposed, trained, pruned); pass a copy to keep the original.
        example_input: a batch the model accepts, to trace its channel groups.
        train, val: labelled ``ImageSet``s; ``val`` (optional) is evaluated after every epoch.
        edp: the training stage (epochs, lr, batch size, device, seed, DDP as ``finetune``), the group-lasso
            strength ``lam`` on every row and column of the coefficient matrices, the ``threshold`` below which
            Pruning & Merging also drops rows and columns, and the ``init`` (``svd`` or ``identity``) of the blocks.
        selection: the budget (MACs or params), allocation, limits and ``ignore``; EDP scores its own way.
    """
    names = decomposable(model, selection.plan.ignore)
    check_decomposable(names)
    decompose(model, names, edp.init)
    graph, cost_model = selection.trace(model, example_input)
    blocks = decomposed_layers(model)
    after_merging = MergeAwareCost(cost_model, list(blocks))
    groups = eligible_groups(graph, blocks)

    def select() -> tuple[Plan, float]:
        return selection.plan_on(graph, cost_model, edp_scores(graph, groups, decomposed_layers(model)),
                                 after_merging.evaluate)

    hook = EdpTraining(graph, select, edp.lam)
    trained = finetune(model, train, val, edp.training, progress=progress, hook=hook)
    sample = (val if val is not None else train).images[:64].to(model_device(model))
    record = prune_and_merge(graph, hook.plan, groups, sample, edp.threshold)
    return EdpResult(graph.model.eval(), hook.plan, hook.target, hook.selections, trained, record)
