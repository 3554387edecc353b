"""The removal stage of ``prune``: the calibration images loaded once, then EDP, soft pruning, or scores, a plan
(to a budget or a measured latency) and its removal; then reconstruction of the changed layers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from prunecli.config import PruneConfig
from prunecli.graph import DependencyGraph
from prunecli.io.data import ImageSet
from prunecli.io.formats import LoadedModel
from prunecli.pipeline.opening import Profile, labelled_images, load_images
from prunecli.pipeline.recovery import check_recalibration, edp_step, reconstruct_layers, soft_prune_step
from prunecli.pipeline.removal import (
    ROUNDING_TOLERANCE,
    Planner,
    Removed,
    measure_sensitivity,
    plan_rounded,
    remove,
    remove_until_it_runs,
    sensitivity_record,
)
from prunecli.pipeline.scoring import TRAINED_METHOD, prune_scores
from prunecli.planning import Selection
from prunecli.runtime import channel_block

Say = Callable[[str], None]


@dataclass
class Removal:
    """What the removal did, for the result and the provenance."""

    method: str
    target: float
    channels_removed: int
    groups_pruned: int
    records: dict[str, Any]  # each recovery step's record, under the name the provenance gives it
    reconstruction: dict[str, Any] | None = None
    sensitivity: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def resolve_rounding(config: PruneConfig) -> tuple[PruneConfig, str | None]:
    """``--round-to auto``: the channel multiple of the runtime the model will run on (onnxruntime on this CPU, or
    torch on CUDA for a latency target measured there), narrow groups also under half of it at a quarter of their
    width; with the note that says so. A given ``--round-to N`` stays as it is."""
    if config.plan.round_to is not None:
        return config, None
    block, why = channel_block(config.run.device, config.latency.runtime)
    plan = dataclasses.replace(config.plan, round_to=block, narrow_groups=True)
    note = (f"channel counts kept at multiples of {block}: {why} (--round-to auto; --round-to N overrides); groups "
            f"narrower than {4 * block} channels may also keep up to {block // 2} in multiples of a quarter of their width")
    return dataclasses.replace(config, plan=plan), note


def calibration_images(config: PruneConfig, loaded: LoadedModel) -> ImageSet | None:
    """The calibration images, loaded once for every step that reads them (scoring, sensitivity, BN
    recalibration, reconstruction); None without ``--data`` or for EDP, which reads only training images."""
    if config.data is None or config.recovery.edp is not None:
        return None
    images = load_images(config.data, loaded, config.data.calib_images, config.run.seed)
    if config.recovery.recalibrate_bn:
        check_recalibration(config.recovery.recalibrate_bn, images, config.data.batch_size)
    return images


def selection(config: PruneConfig, calibration: ImageSet | None) -> Selection:
    batch_size = config.data.batch_size if config.data else 64
    return Selection(config.budget, config.plan, config.scoring, calibration, batch_size, config.run.seed,
                     config.run.timeout)


def choose_and_remove(config: PruneConfig, loaded: LoadedModel, original: Profile, calibration, say: Say, batch_progress,
           step_progress) -> tuple[nn.Module, Removal]:
    """Choose and remove the channels (EDP, soft pruning, a latency target or a plan), then reconstruct."""
    if config.recovery.edp is not None:
        train = labelled_images(config.data, loaded, None, config.run.seed, "EDP's training")
        val = config.recovery.edp.val
        val = load_images(val, loaded, None, config.run.seed) if val is not None else None
        edp = edp_step(config.recovery.edp, selection(config, calibration), loaded, original.example, train, val, say)
        return edp.model, Removal(TRAINED_METHOD, edp.target, edp.channels_removed, edp.groups_pruned, {"edp": edp.record})
    run, batch_size = config.run, config.data.batch_size if config.data else 1
    records: dict[str, Any] = {}
    notes: list[str] = []
    if config.recovery.soft is not None:
        train = load_images(config.data, loaded, None, run.seed)
        soft = soft_prune_step(config.recovery.soft, selection(config, calibration), loaded, original.example, train,
                               say)
        removed, unpruned, method, records["soft_pruning"] = soft.removed, soft.unpruned, config.scoring.method, soft.record
        sensitivity = None
    else:
        say("tracing channel dependencies")
        planner = Planner(loaded.model, original.example, original.costs, config.budget, config.plan, run.timeout, {})
        graph = planner.trace()
        planner.scores, method = prune_scores(config.scoring, loaded.sha256, graph, calibration, config.data, run, say,
                                              batch_progress)
        if config.plan.allocation == "sensitivity":
            planner.sensitivity = measure_sensitivity(config.plan, graph, planner.scores, calibration, batch_size, run,
                                                      say, step_progress)
        removed = plan_and_remove(config, planner, graph, tuple(loaded.input.shape), records, notes, say)
        unpruned, sensitivity = loaded.model, planner.sensitivity
    step = Removal(method, removed.target, sum(len(v) for v in removed.plan.removed.values()), len(removed.plan.removed),
                 records, sensitivity=sensitivity_record(removed.graph, sensitivity, removed.plan) if sensitivity else None,
                 notes=notes)
    if config.recovery.reconstruct is not None:
        report = reconstruct_layers(config.recovery.reconstruct, unpruned, removed, calibration, batch_size, run, say,
                                    step_progress)
        step.reconstruction = report.to_dict()
        records["reconstruct"] = {"data": config.data.source, **report.summary()}
    return removed.graph.model.eval(), step


def plan_and_remove(config: PruneConfig, planner: Planner, graph: DependencyGraph, input_shape: tuple[int, ...],
                    records: dict[str, Any], notes: list[str], say: Say) -> Removed:
    """Plan the budget (measuring latency for a latency target), remove, and hold what breaks the forward."""
    if config.latency.target is not None:
        from prunecli.pipeline.latency_target import latency_plan

        planned = latency_plan(planner, graph, input_shape, config.latency, config.run, say)
        plan, target = planned.plan, planned.target_ms
        records["latency_target"] = planned.record
        records["latency"] = {k: planned.record[k] for k in ("runtime", "device", "batch", "threads", "target_ms",
                                                             "original_ms", "slim_ms")}
    else:
        say("allocating the budget")
        plan, target, coarser = plan_rounded(planner, graph)
        if coarser:
            records["rounding"] = {"round_to": planner.options.round_to, "instead_of": coarser}
            notes.append(f"multiples of {coarser} channels could not meet the budget within {ROUNDING_TOLERANCE:.0%}: "
                         f"rounded to multiples of {planner.options.round_to} instead")
    say("removing channels")
    return remove_until_it_runs(planner, remove(graph, plan, target), say)
