"""The library API: one function per command. Each takes a frozen config and returns a result dataclass."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunecli import __version__
from prunecli.allocate import GroupLimits, Plan, allocate
from prunecli.config import AnalyzeConfig, ModelSource, PruneConfig
from prunecli.criteria import get_criterion
from prunecli.criteria.base import score_weights
from prunecli.errors import ArchitectureError, BudgetError, PrunecliError
from prunecli.graph import ChannelGroup, DependencyGraph
from prunecli.io.arch import ArchSpec
from prunecli.io.checkpoint import LoadedModel, load_model
from prunecli.io.files import check_output_path
from prunecli.measure import CostModel, LayerCost, Totals, costs_and_output, count_params

Progress = Callable[[str], None]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; an unavailable CUDA device is an error, not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise PrunecliError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PrunecliError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise PrunecliError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise PrunecliError(f"--device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def open_model(source: ModelSource) -> LoadedModel:
    arch = ArchSpec(source.arch, source.arch_kwargs) if source.arch else None
    return load_model(
        source.path,
        arch=arch,
        input_shape=source.input_shape,
        trust_pickle=source.trust_pickle,
        import_paths=source.import_paths,
    )


def example_input(loaded: LoadedModel) -> torch.Tensor:
    """A fixed pseudo-random batch of one, for tracing and costing."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn((1, *loaded.input.shape), generator=generator)


def _profile(loaded: LoadedModel, x: torch.Tensor) -> tuple[list[LayerCost], torch.Tensor]:
    """Run the model once on ``x``: the per-layer costs and the output, or a clear error if it cannot run."""
    try:
        return costs_and_output(loaded.model, x)
    except Exception as exc:
        raise ArchitectureError(
            f"the model does not run on input {tuple(x.shape[1:])} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:150]}); pass the right --input-shape"
        ) from exc


# ----------------------------------------------------------------------------- analyze


@dataclass(frozen=True)
class LayerRow:
    name: str
    kind: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...]
    groups: int
    params: int
    macs: int
    macs_share: float
    group: str | None
    coupled_layers: int
    prunable: bool
    reason: str


@dataclass(frozen=True)
class GroupRow:
    root: str
    channels: int
    blocks: int
    layers: tuple[str, ...]
    prunable: bool
    reason: str


@dataclass(frozen=True)
class ModelSummary:
    source: str
    arch: str | None
    arch_kwargs: dict[str, Any]
    input_shape: tuple[int, ...]
    params: int
    macs: int
    sha256: str


@dataclass(frozen=True)
class AnalyzeResult:
    model: ModelSummary
    layers: list[LayerRow]
    groups: list[GroupRow]
    prunable_channels: int
    notes: list[str] = field(default_factory=list)
    provenance: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _summary(loaded: LoadedModel, total: Totals) -> ModelSummary:
    return ModelSummary(
        str(loaded.source),
        loaded.arch.spec if loaded.arch else None,
        dict(loaded.arch.kwargs) if loaded.arch else {},
        tuple(loaded.input.shape),
        total.params,
        total.macs,
        loaded.sha256,
    )


def _group_of_layer(groups: list[ChannelGroup]) -> dict[str, ChannelGroup]:
    owner: dict[str, ChannelGroup] = {}
    for group in groups:
        for layer in group.layers("out"):
            owner.setdefault(layer, group)
    return owner


def _layer_rows(costs: list[LayerCost], groups: list[ChannelGroup]) -> list[LayerRow]:
    owner = _group_of_layer(groups)
    total = sum(c.macs for c in costs) or 1
    rows = []
    for c in costs:
        group = owner.get(c.name)
        coupled = len({m.layer for m in group.members}) if group else 0
        reason = group.reason if group else "output channels not traced"
        rows.append(
            LayerRow(
                c.name, c.kind, c.in_channels, c.out_channels, c.kernel, c.groups, c.params, c.macs,
                c.macs / total, group.root if group else None, coupled, bool(group and group.prunable), reason,
            )
        )
    return rows


def analyze_model(config: AnalyzeConfig) -> AnalyzeResult:
    """Layers, parameters, MACs and the prunable channel groups of a model."""
    loaded = open_model(config.source)
    x = example_input(loaded)
    costs, _ = _profile(loaded, x)
    graph = DependencyGraph(copy.deepcopy(loaded.model), x, config.ignore, config.timeout)
    groups = [
        GroupRow(g.root, g.channels, g.blocks, tuple(dict.fromkeys(m.layer for m in g.members)), g.prunable, g.reason)
        for g in graph.groups
    ]
    total = Totals(sum(p.numel() for p in loaded.model.parameters()), sum(c.macs for c in costs))
    provenance = {k: v for k, v in (loaded.document or {}).items() if k not in ("modules", "tied")} or None
    return AnalyzeResult(
        _summary(loaded, total),
        _layer_rows(costs, graph.groups),
        groups,
        sum(g.channels for g in graph.groups if g.prunable),
        loaded.notes,
        provenance,
    )


# ----------------------------------------------------------------------------- prune


@dataclass(frozen=True)
class LayerChange:
    name: str
    kind: str
    out_before: int
    out_after: int
    in_before: int
    in_after: int
    macs_before: int
    macs_after: int


@dataclass(frozen=True)
class PruneResult:
    model: ModelSummary
    output: str | None
    method: str
    allocation: str
    budget: dict[str, Any]
    target: float
    before: Totals
    after: Totals
    macs_kept: float
    params_kept: float
    deviation_pp: float  # achieved minus requested share of the budgeted cost, in percentage points
    layers: list[LayerChange]
    groups_pruned: int
    channels_removed: int
    seconds: float
    seed: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_output(source: Path) -> Path:
    """``model.pt`` -> ``model.slim.safetensors`` beside it."""
    return source.with_name(f"{source.name.split('.')[0]}.slim.safetensors")


def _cost_function(budget_kind: str, cost_model: CostModel, groups: list[ChannelGroup]):
    order = [g.index for g in groups]

    def vector(keep: Mapping[int, int]) -> np.ndarray:
        return np.array([keep[i] for i in order], dtype=float)

    if budget_kind == "flops":
        return lambda keep: cost_model.evaluate(vector(keep))[0]
    if budget_kind == "params":
        return lambda keep: cost_model.evaluate(vector(keep))[1]
    return lambda keep: float(sum(keep[g.index] for g in groups if g.prunable))


def plan_pruning(
    config: PruneConfig, graph: DependencyGraph, cost_model: CostModel, scores: Mapping[int, torch.Tensor]
) -> tuple[Plan, float]:
    """Turn scores and the budget into a plan; returns it with the absolute target."""
    limits = {
        g.index: GroupLimits(g.channels, g.blocks, g.prunable, config.max_layer_ratio, config.round_to)
        for g in graph.groups
    }
    cost = _cost_function(config.budget.kind, cost_model, graph.groups)
    original = cost({g.index: g.channels for g in graph.groups})
    target = config.budget.target(original)
    if not any(g.prunable for g in graph.groups):
        raise BudgetError("the model has no prunable channel group; check --ignore (see `prunecli analyze`)")
    plan = allocate(scores, limits, cost, target, config.allocation)
    return plan, target


def prune_model(config: PruneConfig, progress: Progress | None = None) -> PruneResult:
    """Score, allocate, physically remove channels and (when ``config.output``) write the slim artifact."""
    from prunecli.io.slim import save_slim

    started = time.perf_counter()
    say = progress or (lambda message: None)
    torch.manual_seed(config.seed)
    output = config.output or default_output(config.source.path)
    check_output_path(output, force=config.force, inputs=(config.source.path,))
    criterion = get_criterion(config.method)(seed=config.seed)
    if criterion.needs_data:
        raise PrunecliError(f"method {config.method} needs calibration data (--data), which this command does not take yet")
    say("loading the model")
    loaded = open_model(config.source)
    if loaded.arch is None:
        raise ArchitectureError(
            "the slim file must name the base architecture to be rebuilt; pass --arch for this pickled model"
        )
    x = example_input(loaded)
    costs, reference = _profile(loaded, x)
    say("tracing channel dependencies")
    graph = DependencyGraph(copy.deepcopy(loaded.model), x, config.ignore, config.timeout)
    cost_model = CostModel(loaded.model, costs, graph.groups)
    before = Totals(cost_model.base_params, cost_model.base_macs)
    say(f"scoring channels with {config.method}")
    scores = score_weights(criterion, graph, [g for g in graph.groups if g.prunable], config.group_reduction)
    say("allocating the budget")
    plan, target = plan_pruning(config, graph, cost_model, scores)
    say("removing channels")
    graph.prune(plan.removed)
    pruned = graph.model.eval()
    pruned_costs, out = costs_and_output(pruned, x)
    if out.shape != reference.shape:
        raise ArchitectureError(f"pruning changed the output shape {tuple(reference.shape)} -> {tuple(out.shape)}")
    after = Totals(count_params(pruned), sum(c.macs for c in pruned_costs))
    achieved = {"flops": after.macs, "params": after.params}.get(config.budget.kind)
    base_cost = {"flops": before.macs, "params": before.params}.get(config.budget.kind)
    deviation = 100 * (achieved - target) / base_cost if achieved is not None else 0.0
    removed = sum(len(v) for v in plan.removed.values())
    result_layers = _layer_changes(costs, pruned_costs)
    notes = list(loaded.notes)
    say(f"writing {output}")
    metadata = {
        "method": config.method,
        "allocation": config.allocation,
        "budget": config.budget.to_dict(),
        "config": config.to_dict(),
        "achieved": {"macs": after.macs, "params": after.params},
        "original": {"macs": before.macs, "params": before.params},
        "source_sha256": loaded.sha256,
        "seed": config.seed,
        "prunecli_version": __version__,
        "mean": list(loaded.input.mean) if loaded.input.mean else None,
        "std": list(loaded.input.std) if loaded.input.std else None,
        "num_classes": int(reference.shape[-1]) if reference.dim() == 2 else None,
    }
    if loaded.document:
        metadata["parent"] = {k: loaded.document.get(k) for k in ("method", "budget", "source_sha256", "achieved")}
        for key in ("dataset", "test_accuracy"):
            if key in loaded.document:
                metadata[f"parent_{key}"] = loaded.document[key]
    save_slim(
        pruned,
        output,
        arch=loaded.arch,
        input_shape=loaded.input.shape,
        metadata=metadata,
        force=config.force,
        inputs=(config.source.path,),
    )
    return PruneResult(
        _summary(loaded, before),
        str(output),
        config.method,
        config.allocation,
        config.budget.to_dict(),
        target,
        before,
        after,
        after.macs / before.macs,
        after.params / before.params,
        deviation,
        result_layers,
        len(plan.removed),
        removed,
        time.perf_counter() - started,
        config.seed,
        notes,
    )


def _layer_changes(before: list[LayerCost], after: list[LayerCost]) -> list[LayerChange]:
    pruned = {c.name: c for c in after}
    return [
        LayerChange(
            c.name, c.kind, c.out_channels, pruned[c.name].out_channels, c.in_channels, pruned[c.name].in_channels,
            c.macs, pruned[c.name].macs,
        )
        for c in before
        if c.name in pruned
    ]
