"""The library API: one function per command. Each takes a frozen config and returns a result dataclass."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from prunecli.config import (
    AnalyzeConfig,
    DataOptions,
    EvaluateConfig,
    ExportJob,
    FinetuneJob,
    ModelSource,
    PruneConfig,
    ScoreConfig,
    ScoringOptions,
)
from prunecli.criteria import get_criterion
from prunecli.criteria.base import Criterion, score_weights, score_with_data
from prunecli.errors import ArchitectureError, BudgetError, DataError, ExportError, PrunecliError, first_line
from prunecli.finetune import messages_to
from prunecli.graph import ChannelGroup, DependencyGraph, failing_module, refuse_unsupported
from prunecli.io.data import DataSpec, ImageSet, iterate_batches, open_images
from prunecli.io.files import check_output_path
from prunecli.io.formats import LoadedModel, checkpoint_format, open_checkpoint
from prunecli.io.scores import check_scores_output, read_scores, write_scores
from prunecli.measure import CostModel, LayerCost, costs_and_output, count_params
from prunecli.outputs import describe_shapes, output_shapes
from prunecli.planning import plan_pruning
from prunecli.provenance import finetune_metadata, prune_metadata
from prunecli.reconstruct import ReconstructReport, reconstruct
from prunecli.results import (
    AnalyzeResult,
    EvaluateResult,
    FinetuneRunResult,
    GroupRow,
    GroupScores,
    LayerChange,
    LayerRow,
    ModelSummary,
    PruneResult,
    ScoreResult,
    Totals,
)
from prunecli.runtime import main_process, time_limit
from prunecli.tasks import end_to_end_outputs, reassemble

Progress = Callable[[str], None]


def open_model(source: ModelSource) -> LoadedModel:
    return open_checkpoint(source)


def example_input(loaded: LoadedModel) -> torch.Tensor:
    """A fixed pseudo-random batch of one, for tracing and costing."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn((1, *loaded.input.shape), generator=generator)


def _profile(loaded: LoadedModel, x: torch.Tensor) -> tuple[list[LayerCost], torch.Tensor]:
    """Run the model once on ``x``: the per-layer costs and the output, or a clear error if it cannot run."""
    refuse_unsupported(loaded.model)
    try:
        return costs_and_output(loaded.model, x)
    except Exception as exc:
        raise ArchitectureError(
            f"the model does not run on input {tuple(x.shape[1:])} "
            f"({type(exc).__name__}: {first_line(exc, 150)}); pass the right --input-shape"
        ) from exc


# ----------------------------------------------------------------------------- analyze


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
        _latency(config, loaded) if config.latency else None,
    )


def _latency(config: AnalyzeConfig, loaded: LoadedModel) -> dict[str, Any]:
    """Median latency under PyTorch eager and onnxruntime; with ``compare``, the original beside this model."""
    from prunecli.latency import RUNTIMES, compare_latency, latency

    batches = (1, config.latency_batch)
    shape = tuple(loaded.input.shape)
    if config.compare is None:
        timings = {runtime: latency(loaded.model, shape, batches, runtime=runtime) for runtime in RUNTIMES}
        return {"input_shape": list(shape), "median_ms": timings}
    original = open_model(_with_base_arch(config.compare, loaded))
    if tuple(original.input.shape) != shape:
        raise ArchitectureError(f"--compare model takes {original.input.shape}, this one {shape}; pass --input-shape")
    return compare_latency(original.model, loaded.model, shape, batch_sizes=batches).to_dict()


# ----------------------------------------------------------------------------- score


def load_images(options: DataOptions, loaded: LoadedModel, limit: int | None, seed: int) -> ImageSet:
    """The images of ``options`` as the model expects them (its input shape and normalisation)."""
    spec = DataSpec(options.source, options.root, tuple(loaded.input.shape), options.mean or loaded.input.mean,
                    options.std or loaded.input.std)
    return open_images(spec, limit=limit, seed=seed)


def _check_scoring(scoring: ScoringOptions) -> Criterion:
    """Build the criterion, failing early when it needs data the user did not give."""
    criterion = get_criterion(scoring.method)(seed=scoring.seed, **scoring.options)
    if criterion.needs_data and scoring.data is None:
        raise DataError(
            f"method {scoring.method} scores feature maps and needs calibration data: pass --data "
            "(an image folder, a tensor file such as sample_models/fmnist_calib.safetensors, or fashion-mnist)"
        )
    return criterion


def compute_scores(
    scoring: ScoringOptions,
    loaded: LoadedModel,
    graph: DependencyGraph,
    say: Progress,
    batch_progress=None,
    timeout: float | None = None,
) -> dict[int, torch.Tensor]:
    """Per-channel scores of every prunable group, on ``scoring.device``, within ``timeout`` seconds if given."""
    with time_limit(timeout, f"scoring channels with {scoring.method}",
                    "raise --score-timeout, or give fewer --calib-images"):
        return _compute_scores(scoring, loaded, graph, say, batch_progress)


def _compute_scores(
    scoring: ScoringOptions, loaded: LoadedModel, graph: DependencyGraph, say: Progress, batch_progress
) -> dict[int, torch.Tensor]:
    criterion = _check_scoring(scoring)
    groups = [g for g in graph.groups if g.prunable]
    if not criterion.needs_data:
        return score_weights(criterion, graph, groups, scoring.group_reduction, scoring.group_scope)
    options = scoring.data
    images = load_images(options, loaded, options.calib_images, scoring.seed)
    if len(images) < options.batch_size and len(images) < options.calib_images:
        raise DataError(
            f"--data {options.source} has {len(images)} images, fewer than one batch of {options.batch_size}; "
            "give more images or a smaller --batch-size"
        )
    if criterion.needs_labels and images.labels is None:
        raise DataError(f"method {scoring.method} needs labelled data; {options.source} has no labels")
    say(f"scoring {len(images)} images with {scoring.method} on {scoring.device}")
    device = torch.device(scoring.device)
    graph.model.to(device)
    try:
        return score_with_data(
            criterion, graph, groups, iterate_batches(images, options.batch_size), scoring.group_reduction, device,
            batch_progress,
        )
    except torch.cuda.OutOfMemoryError as exc:
        raise PrunecliError(
            f"CUDA ran out of memory while scoring; try --batch-size {max(1, options.batch_size // 2)}"
        ) from exc
    finally:
        graph.model.to("cpu")


def score_model(config: ScoreConfig, progress: Progress | None = None, batch_progress=None) -> ScoreResult:
    """Score every prunable channel and (with ``config.output``) write the scores as JSON."""
    started = time.perf_counter()
    say = progress or (lambda message: None)
    torch.manual_seed(config.scoring.seed)
    if config.output is not None:
        check_scores_output(config.output, force=config.force, inputs=(config.source.path,))
    _check_scoring(config.scoring)
    say("loading the model")
    loaded = open_model(config.source)
    x = example_input(loaded)
    costs, _ = _profile(loaded, x)
    say("tracing channel dependencies")
    graph = DependencyGraph(copy.deepcopy(loaded.model), x, config.ignore, config.timeout)
    scores = compute_scores(config.scoring, loaded, graph, say, batch_progress, config.score_timeout)
    preview_removed: dict[int, int] = {}
    preview = None
    if config.preview is not None:
        cost_model = CostModel(loaded.model, costs, graph.groups)
        plan_config = PruneConfig(config.source, config.preview, ignore=config.ignore)
        plan, target = plan_pruning(plan_config, graph, cost_model, scores)
        preview_removed = {g: len(p) for g, p in plan.removed.items()}
        preview = {"budget": config.preview.to_dict(), "target": target, "predicted": plan.cost}
    groups = [
        GroupScores(
            g.root, g.channels, g.blocks, tuple(dict.fromkeys(m.layer for m in g.members)),
            [float(v) for v in scores[g.index]], torch.argsort(scores[g.index], stable=True).tolist(),
            preview_removed.get(g.index, 0) if preview else None,
        )
        for g in graph.groups
        if g.index in scores
    ]
    total = Totals(count_params(loaded.model), sum(c.macs for c in costs))
    result = ScoreResult(
        _summary(loaded, total), config.scoring.method, dict(config.scoring.options),
        config.scoring.data.to_dict() if config.scoring.data else None, config.scoring.group_reduction,
        config.scoring.seed, groups, str(config.output) if config.output else None, preview,
        time.perf_counter() - started, loaded.notes, config.scoring.group_scope,
    )
    if config.output is not None:
        write_scores(result.to_dict(), config.output, force=config.force, inputs=(config.source.path,))
    return result


# ----------------------------------------------------------------------------- prune


def default_output(source: Path) -> Path:
    """The format adapter's choice: ``model.v2.pt`` -> ``model.v2.slim.safetensors`` beside it (a slim input gets
    ``.slim.slim``, never itself); a whole pickled model ``model.pt`` -> ``model.slim.pt``."""
    from prunecli.io.formats import default_output as adapter_output

    return adapter_output(source)


def prune_model(
    config: PruneConfig, progress: Progress | None = None, batch_progress=None, step_progress=None
) -> PruneResult:
    """Score, allocate, physically remove channels and (when ``config.output``) write the slim artifact.

    ``step_progress(done, total)`` follows the layers of ``--reconstruct``."""
    started = time.perf_counter()
    say = progress or (lambda message: None)
    torch.manual_seed(config.seed)
    output = config.output or default_output(config.source.path)
    check_output_path(output, force=config.force, inputs=(config.source.path,))
    checkpoint_format(config.source).check_output(output)
    if config.scores is None and config.method != "edp":
        _check_scoring(config.scoring)
    if config.reconstruct is not None:
        if config.method == "edp":
            raise PrunecliError("--reconstruct does not apply to --method edp, which trains its own weights; drop one")
        _require_data(config)
    if config.latency_target is not None and (config.method == "edp" or config.soft is not None):
        raise PrunecliError("--latency-target plans on scores; it does not combine with --method edp or --soft-epochs")
    if config.allocation == "sensitivity":
        if config.method == "edp" or config.soft is not None:
            raise PrunecliError("--allocation sensitivity measures the model once before pruning; it does not combine "
                                "with --method edp or --soft-epochs, which train while they prune")
        _require_data(config)
    say("loading the model")
    loaded = open_model(config.source)
    loaded.format.check_output(output)  # again, knowing now whether the base architecture is known
    x = example_input(loaded)
    costs, reference = _profile(loaded, x)
    before = Totals(count_params(loaded.model), sum(c.macs for c in costs))
    method = config.method
    reconstruction = latency_record = sensitivity = None
    if config.method == "edp":
        pruned, target, removed, groups_pruned, training_record = _edp(config, loaded, x, say)
    else:
        say("tracing channel dependencies")
        graph = DependencyGraph(copy.deepcopy(loaded.model), x, config.ignore, config.timeout)
        cost_model = CostModel(loaded.model, costs, graph.groups)
        if config.scores is not None:
            scores, method = read_scores(config.scores, loaded.sha256, graph.groups, config.method)
        elif config.soft is not None:
            scores = {}  # soft pruning scores (and re-scores) while it trains
        else:
            say(f"scoring channels with {config.method}")
            scores = compute_scores(config.scoring, loaded, graph, say, batch_progress, config.score_timeout)
        sensitivity = _sensitivity(config, loaded, graph, scores, say, step_progress)
        if config.soft is not None:
            graph, plan, target, training_record = _soft_prune(config, loaded, x, say, batch_progress)
        elif config.latency_target is not None:
            plan, target, latency_record = _latency_plan(config, loaded, x, graph, cost_model, scores, sensitivity, say)
            training_record = None
        else:
            say("allocating the budget")
            plan, target = plan_pruning(config, graph, cost_model, scores, sensitivity=sensitivity)
            training_record = None
        say("removing channels")
        kept = graph.kept_outputs(plan.removed)
        unpruned = loaded.model if config.soft is None else copy.deepcopy(graph.model)  # the weights before removal
        graph.prune(plan.removed)
        if config.soft is None:
            graph, plan, target, kept = _hold_until_it_runs(config, loaded, x, costs, scores, sensitivity, graph, plan,
                                                            target, kept, say)
        pruned = graph.model.eval()
        removed, groups_pruned = sum(len(v) for v in plan.removed.values()), len(plan.removed)
        if config.reconstruct is not None:
            reconstruction = _reconstruct(config, loaded, unpruned, graph, kept, say, step_progress)
    if config.recalibrate_bn:
        from prunecli.finetune import recalibrate_bn

        say(f"re-estimating batch-norm statistics on {config.recalibrate_bn} batches")
        images = load_images(_require_data(config), loaded, config.recalibrate_bn * config.data.batch_size, config.seed)
        recalibrate_bn(pruned, iterate_batches(images, config.data.batch_size), config.recalibrate_bn)
    try:
        pruned_costs, out = costs_and_output(pruned, x)
    except Exception as exc:
        raise ArchitectureError(
            f"the pruned model no longer runs ({type(exc).__name__}: {first_line(exc, 150)}); this architecture "
            "keeps channel counts outside its layers; --ignore the affected layers or prune another model"
        ) from exc
    if output_shapes(out) != output_shapes(reference):
        raise ArchitectureError(f"pruning changed the output shape {describe_shapes(output_shapes(reference))} -> "
                                f"{describe_shapes(output_shapes(out))}")
    deployed = reassemble(loaded.deployed, pruned)
    _check_end_to_end(loaded, deployed)
    after = Totals(count_params(pruned), sum(c.macs for c in pruned_costs))
    measured = (latency_record["slim_ms"], latency_record["original_ms"]) if latency_record else (None, None)
    achieved = {"flops": after.macs, "params": after.params, "latency": measured[0]}.get(config.budget.kind)
    base_cost = {"flops": before.macs, "params": before.params, "latency": measured[1]}.get(config.budget.kind)
    deviation = 100 * (achieved - target) / base_cost if achieved is not None else 0.0
    result_layers = _layer_changes(costs, pruned_costs)
    notes = list(loaded.notes)
    accuracy = _prune_accuracy(config, loaded, pruned, say)
    say(f"writing {output}")
    metadata = prune_metadata(config, loaded, method, before, after, reference, training_record)
    if reconstruction is not None:
        metadata["reconstruct"] = {"data": config.data.source, **reconstruction.summary()}
    if latency_record is not None:
        metadata["latency"] = {k: latency_record[k] for k in ("runtime", "device", "batch", "threads", "target_ms",
                                                             "original_ms", "slim_ms")}
    if main_process():  # under torchrun (soft pruning, EDP) every rank holds the same model; rank 0 writes it
        loaded.format.write(loaded, deployed, output, metadata, force=config.force, inputs=(config.source.path,))
    latency = None
    if config.latency:
        from prunecli.latency import compare_latency

        say("timing the original and the slim model")
        latency = compare_latency(loaded.model, pruned, tuple(loaded.input.shape), threads=config.threads,
                                  batch_sizes=tuple(dict.fromkeys((1, config.latency_batch)))).to_dict()
    return PruneResult(
        _summary(loaded, before),
        str(output),
        method,
        config.allocation,
        config.budget.to_dict(),
        target,
        before,
        after,
        after.macs / before.macs,
        after.params / before.params,
        deviation,
        result_layers,
        groups_pruned,
        removed,
        time.perf_counter() - started,
        config.seed,
        notes,
        latency,
        accuracy,
        reconstruction.to_dict() if reconstruction is not None else None,
        latency_record,
        _sensitivity_record(graph, sensitivity, plan) if sensitivity is not None else None,
    )


def _check_end_to_end(loaded: LoadedModel, deployed: torch.nn.Module) -> None:
    """A pruned detector must still detect: its whole eval-mode forward (resize, heads, box decoding, NMS) runs."""
    try:
        end_to_end_outputs(deployed, tuple(loaded.input.shape))
    except Exception as exc:
        raise ArchitectureError(
            f"the pruned detector no longer runs end to end ({type(exc).__name__}: {first_line(exc, 150)}); "
            "--ignore the layers whose widths its heads read"
        ) from exc


def _latency_plan(config: PruneConfig, loaded: LoadedModel, x: torch.Tensor, graph: DependencyGraph,
                  cost_model: CostModel, scores: dict[int, torch.Tensor], sensitivity, say: Progress):
    """``--latency-target``: time every layer alone on a grid of its channel counts (a cached table), plan on the
    latency it predicts, then measure the slim model and correct the requested latency until the measurement
    is within the tolerance. Returns the plan closest to the target, the target in ms and the record."""
    from prunecli.latency import latency_meter, layer_timer, timing_key
    from prunecli.latency_model import (
        LatencyModel,
        cache_dir,
        cached_timings,
        correct_target,
        grid_keeps,
        layer_tables,
        timed,
        trace_specs,
    )
    from prunecli.planning import group_limits

    options = config.latency_target
    device = torch.device(config.device) if options.runtime == "torch" else torch.device("cpu")
    key = timing_key(options.runtime, device, options.batch, config.threads)
    keeps = grid_keeps(group_limits(config, graph), graph.groups, options.grid)
    tables = layer_tables(trace_specs(loaded.model, x), cost_model, keeps)
    specs = [p for t in tables for p in t.points()]
    timer = layer_timer(options.runtime, device, options.batch, config.threads, options.warmup, options.repeats)
    done = iter(range(1, len(specs) + 1))

    def measure_layer(spec):
        say(f"latency table ({options.runtime}, batch {options.batch}): timing layer shape {next(done)}")
        return timer(spec)

    cached = cached_timings(cache_dir(), key, specs, measure_layer)
    tables = timed(tables, cached.ms)
    shape = tuple(loaded.input.shape)
    meter = latency_meter(loaded.model, shape, options.runtime, device, options.batch, config.threads, options.warmup,
                          options.repeats)
    say(f"timing the original ({options.runtime}, batch {options.batch})")
    (original_ms,) = meter()
    model = LatencyModel(tables, cost_model.costs, original_ms)
    target_ms = config.budget.target(original_ms)
    floor = model.predict(*cost_model.dims(keeps[-1]))
    tried: dict[tuple, dict] = {}  # the same plan twice is measured once
    order: list[dict] = []  # the step of every attempt

    def attempt(requested: float) -> tuple[float, float]:
        plan, _ = plan_pruning(config, graph, cost_model, scores, latency=model, target=requested,
                               sensitivity=sensitivity)
        kept = tuple(sorted(plan.keep.items()))
        if kept not in tried:
            slim = DependencyGraph(copy.deepcopy(loaded.model), x, config.ignore, config.timeout)
            slim.prune(plan.removed)
            say(f"timing a slim model planned at {requested:.3g} ms (predicted {plan.cost:.3g} ms)")
            now, ms = meter(slim.model)
            measured = ms if config.budget.absolute else ms / now * original_ms  # drift: the ratio counts
            macs = sum(c.macs for c in costs_and_output(slim.model, x)[0])
            tried[kept] = {"plan": plan, "measured": measured, "macs": macs}
        order.append(tried[kept])
        return plan.cost, tried[kept]["measured"]

    low = floor + 0.01 * (original_ms - floor)
    best, steps = correct_target(target_ms, attempt, target_ms, low, original_ms, options.tolerance,
                                 options.iterations)
    slim_ms = steps[best].measured
    if slim_ms > target_ms * (1 + options.tolerance) and min(s.requested for s in steps) <= low * (1 + 1e-9):
        raise BudgetError(
            f"--latency-target {config.budget.text} cannot be reached: pruning as far as allowed measures "
            f"{slim_ms:.3g} ms (target {target_ms:.3g} ms of {original_ms:.3g} ms); raise --max-layer-ratio, "
            "remove --ignore patterns or ask for less"
        )
    record = {
        "runtime": options.runtime, "runtime_version": key.version, "device": key.device, "batch": options.batch,
        "threads": key.threads, "target": config.budget.text, "target_ms": target_ms, "original_ms": original_ms,
        "slim_ms": slim_ms, "target_ratio": target_ms / original_ms, "measured_ratio": slim_ms / original_ms,
        "tolerance": options.tolerance, "converged": abs(slim_ms / target_ms - 1) <= options.tolerance,
        "chosen": best, "floor_ms": floor,
        "iterations": [{"requested_ms": s.requested, "predicted_ms": s.predicted, "measured_ms": s.measured,
                        "measured_ratio": s.measured / original_ms, "macs": o["macs"]}
                       for s, o in zip(steps, order, strict=True)],
        "table": {**model.to_dict(), "grid": options.grid}, "cache": cached.to_dict(),
    }
    return order[best]["plan"], target_ms, record


MAX_HOLDS = 8  # module types whose channels may be held before a model that still fails is refused


def _hold_until_it_runs(config: PruneConfig, loaded: LoadedModel, x: torch.Tensor, costs: list[LayerCost],
                        scores: dict[int, torch.Tensor], sensitivity, graph: DependencyGraph, plan, target: float,
                        kept: dict[str, list[int]], say: Progress):
    """When the pruned model no longer runs, a module's forward reads a width its layers do not hold (timm's
    attention keeps ``head_dim``): hold the channels of every module of that type, plan again and remove again
    from a fresh copy, until the model runs. Models that run at once pay nothing."""
    held: list[type] = []
    while (failure := failing_module(graph.model, x)) is not None:
        module, exc = failure
        if module is graph.model or type(module) in held or len(held) == MAX_HOLDS:
            break  # nothing narrower to hold; the output check below refuses the model
        held.append(type(module))
        say(f"the pruned model fails in its {type(module).__name__} layers; keeping their channels and planning again")
        graph = DependencyGraph(copy.deepcopy(loaded.model), x, config.ignore, config.timeout)
        graph.hold(held, f"a {'/'.join(t.__name__ for t in held)} layer's forward reads this width from elsewhere "
                         f"({type(exc).__name__}: {first_line(exc, 80)})")
        plan, target = plan_pruning(config, graph, CostModel(loaded.model, costs, graph.groups), scores,
                                    sensitivity=sensitivity)
        kept = graph.kept_outputs(plan.removed)
        graph.prune(plan.removed)
    return graph, plan, target, kept


def _prune_accuracy(config: PruneConfig, loaded: LoadedModel, pruned: torch.nn.Module, say: Progress):
    """Top-1 of the original and the slim model on ``config.evaluate``; else the source's recorded test accuracy."""
    if config.evaluate is None:
        document = loaded.document or {}
        if document.get("test_accuracy") is None:
            return None
        return {"data": document.get("test_data") or document.get("dataset"), "images": None, "measured": False,
                "original_top1": float(document["test_accuracy"]), "pruned_top1": None}
    from prunecli.finetune import evaluate

    images = load_images(config.evaluate, loaded, config.eval_limit, config.seed)
    say(f"evaluating the original and the slim model on {len(images)} images")
    batch, device = config.evaluate.batch_size, config.device
    return {"data": images.description, "images": len(images), "measured": True,
            "original_top1": evaluate(loaded.model, images, batch, device).top1,
            "pruned_top1": evaluate(pruned, images, batch, device).top1}


def _sensitivity(config: PruneConfig, loaded: LoadedModel, graph: DependencyGraph, scores: dict[int, torch.Tensor],
                 say: Progress, step_progress):
    """``--allocation sensitivity``: each group's damage to the output at a few widths, on the calibration images."""
    if config.allocation != "sensitivity":
        return None
    from prunecli.planning import group_limits
    from prunecli.sensitivity import group_sensitivity

    options = config.data
    images = load_images(options, loaded, options.calib_images, config.seed)
    say(f"measuring each group's sensitivity on {len(images)} images on {config.device}")
    with time_limit(config.score_timeout, "measuring group sensitivity",
                    "raise --score-timeout, or give fewer --calib-images"):
        return group_sensitivity(graph, scores, group_limits(config, graph), images.images.split(options.batch_size),
                                 torch.device(config.device), progress=step_progress)


def _sensitivity_record(graph: DependencyGraph, sensitivity, plan) -> dict[str, dict]:
    """Per group (by its root layer): the widths measured, the relative output error at each, the width kept and the
    error there (interpolated between the measured widths, as the allocation does)."""
    from prunecli.sensitivity import damage_at

    record = {}
    for g in graph.groups:
        if g.index in sensitivity:
            widths, damage = sensitivity[g.index]
            kept = int(plan.keep.get(g.index, g.channels))
            record[g.root] = {"channels": g.channels, "widths": [int(k) for k in widths],
                              "damage": [float(d) for d in damage], "kept": kept,
                              "damage_kept": damage_at(sensitivity[g.index], kept)}
    return record


def _require_data(config: PruneConfig) -> DataOptions:
    if config.data is None:
        raise DataError(
            "--method edp, --recalibrate-bn, --reconstruct, --soft-epochs and --allocation sensitivity need images: "
            "pass --data (e.g. fashion-mnist:train or an image folder; --reconstruct and sensitivity need no labels)"
        )
    return config.data


def _reconstruct(config: PruneConfig, loaded: LoadedModel, unpruned: torch.nn.Module, graph: DependencyGraph,
                 kept: dict[str, list[int]], say: Progress, step_progress) -> ReconstructReport:
    """Refit the changed layers of ``graph.model`` so they reproduce ``unpruned`` on the calibration images."""
    options = config.data
    images = load_images(options, loaded, options.calib_images, config.seed)
    say(f"reconstructing the pruned layers on {len(images)} images on {config.device}")

    def tell(layer: str, done: int, total: int) -> None:
        say(f"reconstructing {layer}")
        if step_progress is not None:
            step_progress(done, total)

    with time_limit(config.score_timeout, "reconstructing the pruned layers",
                    "raise --score-timeout, or give fewer --calib-images"):
        try:
            return reconstruct(unpruned, graph.model, kept, images.images.split(options.batch_size),
                               config.reconstruct, graph.sole_norm_consumer, torch.device(config.device), tell)
        except torch.cuda.OutOfMemoryError as exc:
            raise PrunecliError(
                f"CUDA ran out of memory while reconstructing {len(images)} images at once; give fewer --calib-images"
            ) from exc
        finally:
            unpruned.to("cpu")
            graph.model.to("cpu")


def _soft_prune(config: PruneConfig, loaded: LoadedModel, x: torch.Tensor, say: Progress, batch_progress):
    """LRMF/FPGM-style soft pruning: train with the selected channels held at zero, re-selecting as it goes."""
    from prunecli.methods.soft import soft_prune

    train = load_images(_require_data(config), loaded, None, config.seed)
    say(f"soft pruning: {config.soft.epochs} epochs on {len(train)} images, re-selecting every {config.reselect_every}")
    model = copy.deepcopy(loaded.model)
    result = soft_prune(model, x, train, None, config.soft, config, reselect_every=config.reselect_every,
                        progress=messages_to(say))
    record = {"selections": len(result.selections), "reselect_every": config.reselect_every,
              "training": result.finetune.record()}
    return result.graph, result.plan, result.target, record


def _edp(config: PruneConfig, loaded: LoadedModel, x: torch.Tensor, say: Progress):
    """EDP: decompose, train towards the budget, Pruning & Merging (see ``prunecli.methods.edp``)."""
    from prunecli.methods.edp import edp_prune

    if config.edp is None:
        raise PrunecliError("--method edp trains the model: give --data and the EDP options (see prunecli prune --help)")
    train = load_images(_require_data(config), loaded, None, config.seed)
    val = load_images(config.edp.val, loaded, None, config.seed) if config.edp.val is not None else None
    say(f"EDP: decomposing the convolutions, then {config.edp.training.epochs} epochs on {len(train)} images")
    result = edp_prune(copy.deepcopy(loaded.model), x, train, val, config.edp.training, config, lam=config.edp.lam,
                       threshold=config.edp.threshold, init=config.edp.init, progress=messages_to(say))
    record = result.record()
    channels = record["channels_removed"] + record["basis_filters_removed"]
    return result.model, result.target, channels, len(result.prune_merge.removed), record


# ----------------------------------------------------------------------------- export


def export_artifact(job: ExportJob) -> Any:
    """Export a model to ONNX (verified against onnxruntime), safetensors or TorchScript."""
    from prunecli.export import export_model

    loaded = open_model(job.source)
    _profile(loaded, example_input(loaded))
    real = load_images(job.data, loaded, job.data.calib_images, 0).images if job.data is not None else None
    # a slim safetensors copy holds the whole model; a traced graph holds what takes an image batch
    whole = job.export.format == "safetensors"
    result = export_model(loaded.deployed if whole else loaded.model, input_shape=tuple(loaded.input.shape),
                          document=loaded.document, config=job.export, real_inputs=real, arch=loaded.arch,
                          inputs=(job.source.path,), import_paths=job.source.import_paths)
    if loaded.whole is not None and not whole:
        result.notes.append("a detector exports its feature path (backbone with FPN or SSD extras, one output per "
                            "feature map); its heads, box decoding and NMS are not in the file")
    return result


# ----------------------------------------------------------------------------- evaluate


def _with_base_arch(source: ModelSource, reference: LoadedModel) -> ModelSource:
    """A companion model (teacher, original) given as a bare state dict is read with the reference's base arch."""
    if source.arch is not None or reference.arch is None:
        return source
    return dataclasses.replace(source, arch=reference.arch.spec, arch_kwargs=dict(reference.arch.kwargs))


def evaluate_model(config: EvaluateConfig) -> EvaluateResult:
    """Top-1/top-5 accuracy, loss and throughput on labelled data; with ``compare``, the original beside it."""
    from prunecli.finetune import evaluate

    def run(source: ModelSource) -> tuple[ModelSummary, dict[str, Any], str, LoadedModel]:
        loaded = open_model(source)
        costs, _ = _profile(loaded, example_input(loaded))
        images = load_images(config.data, loaded, config.limit, config.seed)
        if images.labels is None:
            raise DataError(f"--data {config.data.source} has no labels; evaluation needs labelled images")
        metrics = evaluate(loaded.model, images, config.data.batch_size, config.device).to_dict()
        total = Totals(count_params(loaded.model), sum(c.macs for c in costs))
        return _summary(loaded, total), metrics, images.description, loaded

    summary, metrics, description, loaded = run(config.source)
    compare = None
    if config.compare is not None:
        other, other_metrics, _, _ = run(_with_base_arch(config.compare, loaded))
        compare = {"model": dataclasses.asdict(other), "metrics": other_metrics,
                   "macs_ratio": other.macs / summary.macs if summary.macs else None}
    return EvaluateResult(summary, description, metrics, compare)


# ----------------------------------------------------------------------------- finetune


def default_finetune_output(source: Path) -> Path:
    """``model.slim.safetensors`` -> ``model.slim.ft.safetensors`` beside it (a whole pickled model: ``.ft.pt``)."""
    from prunecli.io.formats import default_output as adapter_output

    return adapter_output(source, "ft")


def _finetune_inputs(job: FinetuneJob) -> tuple[Path, ...]:
    """The files a fine-tuning run reads, which nothing it writes may replace."""
    sources = [job.source.path, job.train.source, job.teacher.path if job.teacher else None,
               job.val.source if job.val else None]
    return tuple(Path(s) for s in sources if s is not None)


def _check_checkpoint_path(checkpoint: Path | None, output: Path, inputs: tuple[Path, ...]) -> None:
    """The resume state needs a file of its own: it is written every epoch, before the output and beside it."""
    if checkpoint is None:
        return
    if Path(checkpoint).resolve() == output.resolve():
        raise ExportError(f"--checkpoint {checkpoint} is also the output file; give the resume state a path of its own")
    check_output_path(Path(checkpoint), force=True, inputs=inputs, option="--checkpoint")


def finetune_model(job: FinetuneJob, progress: Progress | None = None) -> FinetuneRunResult:
    """Fine-tune (optionally distilling from a teacher) and write the best model as a slim artifact."""
    from prunecli.finetune import evaluate, finetune

    say = progress or (lambda message: None)
    output = job.output or default_finetune_output(job.source.path)
    if main_process():
        inputs = _finetune_inputs(job)
        check_output_path(output, force=job.force, inputs=inputs)
        _check_checkpoint_path(job.training.checkpoint, output, inputs)
    checkpoint_format(job.source).check_output(output)
    loaded = open_model(job.source)
    loaded.format.check_output(output)  # again, knowing now whether the base architecture is known
    x = example_input(loaded)
    _profile(loaded, x)
    teacher = open_model(_with_base_arch(job.teacher, loaded)) if job.teacher is not None else None
    train = load_images(job.train, loaded, job.train_limit, job.training.seed)
    if train.labels is None:
        raise DataError(f"--data {job.train.source} has no labels; fine-tuning needs labelled images")
    val = load_images(job.val, loaded, job.val_limit, job.training.seed) if job.val else None
    before = evaluate(loaded.model, val, job.training.eval_batch_size or job.training.batch_size).to_dict() if val else None
    say(f"fine-tuning on {len(train)} images for {job.training.steps or job.training.epochs} "
        f"{'steps' if job.training.steps else 'epochs'}")
    result = finetune(loaded.model, train, val, job.training, teacher=teacher.model if teacher else None,
                      progress=messages_to(say))
    model = result.model.eval().cpu()
    after = evaluate(model, val, job.training.eval_batch_size or job.training.batch_size).to_dict() if val else None
    costs, _ = costs_and_output(model, x)
    total = Totals(count_params(model), sum(c.macs for c in costs))
    if main_process():
        document = finetune_metadata(job, loaded, result.record(), teacher.sha256 if teacher else None, after)
        loaded.format.write(loaded, model, output, document, force=job.force, inputs=(job.source.path,))
    return FinetuneRunResult(_summary(loaded, total), str(output) if main_process() else None, result.to_dict(),
                             before, after)


def _layer_changes(before: list[LayerCost], after: list[LayerCost]) -> list[LayerChange]:
    """Before/after rows per original layer; a conv EDP kept decomposed is its basis and coefficient pair."""
    pruned = {c.name: c for c in after}
    rows = []
    for c in before:
        if c.name in pruned:
            now = pruned[c.name]
            rows.append(LayerChange(c.name, c.kind, c.out_channels, now.out_channels, c.in_channels, now.in_channels,
                                    c.macs, now.macs, c.params, now.params))
        elif f"{c.name}.basis" in pruned:
            basis, coeff = pruned[f"{c.name}.basis"], pruned[f"{c.name}.coeff"]
            rows.append(LayerChange(c.name, f"{c.kind} as rank {basis.out_channels}", c.out_channels, coeff.out_channels,
                                    c.in_channels, basis.in_channels, c.macs, basis.macs + coeff.macs, c.params,
                                    basis.params + coeff.params))
    return rows
