"""The library API: one function per command. Each takes a frozen config and returns a result dataclass; each is a
short sequence of the steps in ``prunecli.pipeline``."""

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
    EvaluateConfig,
    ExportJob,
    FinetuneJob,
    PlanOptions,
    PruneConfig,
    ScoreConfig,
)
from prunecli.errors import ArchitectureError, ExportError
from prunecli.graph import ChannelGroup, DependencyGraph
from prunecli.humanize import plural
from prunecli.io.files import check_output_path
from prunecli.io.formats import LoadedModel, checkpoint_format
from prunecli.io.formats import default_output as adapter_output
from prunecli.io.scores import check_scores_output, write_scores
from prunecli.measure import CostModel, LayerCost, costs_and_output, count_params
from prunecli.pipeline.checks import accuracy, check_pruned, layer_changes, speed_check
from prunecli.pipeline.opening import (
    data_for_model,
    fewer_than_asked,
    labelled_images,
    load_images,
    open_model,
    profile,
    shortfall,
    summary,
    with_base_arch,
)
from prunecli.pipeline.pruning import Removal, calibration_images, choose_and_remove, resolve_rounding
from prunecli.pipeline.recovery import check_finetune_recalibration, recalibrate
from prunecli.pipeline.scoring import check_criterion, score
from prunecli.planning import plan_pruning
from prunecli.provenance import finetune_metadata, prune_metadata
from prunecli.results import (
    AnalyzeResult,
    EvaluateResult,
    FinetuneRunResult,
    GroupRow,
    GroupScores,
    LayerRow,
    ModelSummary,
    PruneResult,
    ScoreResult,
    Totals,
)
from prunecli.runtime import main_process
from prunecli.tasks import reassemble
from prunecli.yolo import is_ultralytics

Progress = Callable[[str], None]


def _silent(message: str) -> None:
    """The default progress: say nothing."""


# ----------------------------------------------------------------------------- analyze


def _layer_rows(costs: list[LayerCost], groups: list[ChannelGroup]) -> list[LayerRow]:
    owner: dict[str, ChannelGroup] = {}
    for group in groups:
        for layer in group.layers("out"):
            owner.setdefault(layer, group)
    total = sum(c.macs for c in costs) or 1
    rows = []
    for c in costs:
        group = owner.get(c.name)
        coupled = len({m.layer for m in group.members}) if group else 0
        reason = group.reason if group else "output channels not traced"
        rows.append(LayerRow(c.name, c.kind, c.in_channels, c.out_channels, c.kernel, c.groups, c.params, c.macs,
                             c.macs / total, group.root if group else None, coupled, bool(group and group.prunable),
                             reason))
    return rows


def analyze_model(config: AnalyzeConfig) -> AnalyzeResult:
    """Layers, parameters, MACs and the prunable channel groups of a model."""
    loaded = open_model(config.source)
    original = profile(loaded)
    graph = DependencyGraph(copy.deepcopy(loaded.model), original.example, config.ignore, config.timeout)
    groups = [
        GroupRow(g.root, g.channels, g.blocks, tuple(dict.fromkeys(m.layer for m in g.members)), g.prunable, g.reason)
        for g in graph.groups
    ]
    provenance = {k: v for k, v in (loaded.document or {}).items() if k not in ("modules", "tied")} or None
    latency = _latency(config, loaded) if config.latency else None  # may add a note: timed before the notes are taken
    return AnalyzeResult(summary(loaded, original.totals), _layer_rows(original.costs, graph.groups), groups,
                         sum(g.channels for g in graph.groups if g.prunable), loaded.notes, provenance, latency)


def _latency(config: AnalyzeConfig, loaded: LoadedModel) -> dict[str, Any]:
    """Median latency under PyTorch eager and onnxruntime; with ``compare``, the original beside this model."""
    from prunecli.latency import RUNTIMES, compare_latency, latency

    batches = tuple(dict.fromkeys((1, config.latency_batch)))
    shape = tuple(loaded.input.shape)
    if config.compare is None:
        timings = {runtime: latency(loaded.model, shape, batches, runtime=runtime) for runtime in RUNTIMES}
        return {"input_shape": list(shape), "median_ms": timings}
    original = open_model(with_base_arch(config.compare, loaded))
    if tuple(original.input.shape) != shape:
        raise ArchitectureError(f"--compare model takes {original.input.shape}, this one {shape}; pass --input-shape")
    timed, not_faster = speed_check(compare_latency(original.model, loaded.model, shape, batch_sizes=batches),
                                    "onnxruntime")
    if not_faster:
        loaded.notes.append(not_faster)
    return timed


# ----------------------------------------------------------------------------- score


def score_model(config: ScoreConfig, progress: Progress | None = None, batch_progress=None) -> ScoreResult:
    """Score every prunable channel and (with ``config.output``) write the scores as JSON."""
    started, say, run = time.perf_counter(), progress or _silent, config.run
    torch.manual_seed(run.seed)
    if config.output is not None:
        check_scores_output(config.output, force=config.force, inputs=(config.source.path,))
    check_criterion(config.scoring, config.data is not None)
    say("loading the model")
    loaded = open_model(config.source)
    original = profile(loaded)
    images = load_images(config.data, loaded, config.data.calib_images, run.seed) if config.data else None
    notes = fewer_than_asked("--calib-images", config.data.calib_images, "--data", images, "scored") if images else []
    say("tracing channel dependencies")
    graph = DependencyGraph(copy.deepcopy(loaded.model), original.example, config.ignore, run.timeout)
    scores = score(config.scoring, graph, images, config.data, run, say, batch_progress)
    removed, preview = {}, None
    if config.preview is not None:
        plan, target = plan_pruning(config.preview, PlanOptions("uniform", ignore=config.ignore), graph,
                                    CostModel(loaded.model, original.costs, graph.groups), scores)
        removed = {g: len(p) for g, p in plan.removed.items()}
        preview = {"budget": config.preview.to_dict(), "target": target, "predicted": plan.cost}
    groups = [
        GroupScores(g.root, g.channels, g.blocks, tuple(dict.fromkeys(m.layer for m in g.members)),
                    [float(v) for v in scores[g.index]], torch.argsort(scores[g.index], stable=True).tolist(),
                    removed.get(g.index, 0) if preview else None)
        for g in graph.groups if g.index in scores
    ]
    result = ScoreResult(
        summary(loaded, original.totals), config.scoring.method, dict(config.scoring.options),
        config.data.to_dict() if config.data else None, config.scoring.group_reduction, run.seed, groups,
        str(config.output) if config.output else None, preview, time.perf_counter() - started, [*loaded.notes, *notes],
        config.scoring.group_scope,
    )
    if config.output is not None:
        write_scores(result.to_dict(), config.output, force=config.force, inputs=(config.source.path,))
    return result


# ----------------------------------------------------------------------------- prune


def default_output(source: Path) -> Path:
    """The format adapter's choice: ``model.v2.pt`` -> ``model.v2.slim.safetensors`` beside it (a slim input gets
    ``.slim.slim``, never itself); a whole pickled model ``model.pt`` -> ``model.slim.pt``."""
    return adapter_output(source)


def prune_model(config: PruneConfig, progress: Progress | None = None, batch_progress=None,
                step_progress=None) -> PruneResult:
    """Score, allocate, physically remove channels and write the slim artifact (``config.output``, by default
    beside the source). ``step_progress(done, total)`` follows the layers of ``--reconstruct``."""
    started, say = time.perf_counter(), progress or _silent
    torch.manual_seed(config.run.seed)
    config, rounding = resolve_rounding(config)
    output = config.output.path or default_output(config.source.path)
    adapter = checkpoint_format(config.source)
    adapter.check_path(output, force=config.output.force, inputs=(config.source.path,))
    adapter.check_output(output)
    check_criterion(config.scoring, config.data is not None)
    say("loading the model")
    loaded = open_model(config.source)
    loaded.format.check_output(output)  # again, knowing now whether the base architecture is known
    original = profile(loaded)
    calibration = calibration_images(config, loaded)
    notes = fewer_than_asked("--calib-images", config.data.calib_images, "--data", calibration,
                             "calibrated") if calibration is not None else []
    pruned, step = choose_and_remove(config, loaded, original, calibration, say, batch_progress, step_progress)
    if config.recovery.recalibrate_bn:
        step.records["recalibrate_bn"] = recalibrate(pruned, config.recovery.recalibrate_bn, calibration,
                                                     config.data.batch_size, say)
    checked = check_pruned(loaded, original, pruned)
    batch_size = config.evaluate.data.batch_size if config.evaluate else 1
    measured_top1 = accuracy(config.evaluate, loaded, pruned, batch_size, config.run, say)
    if config.evaluate is not None:
        notes += shortfall("--eval-limit", config.evaluate.limit, "--eval-data", measured_top1["data"],
                           measured_top1["images"], "evaluated")
    say(f"writing {output}")
    metadata = prune_metadata(config, loaded, step.method, original.totals, checked.totals, original.output,
                              step.records)
    if main_process():  # under torchrun (soft pruning, EDP) every rank holds the same model; rank 0 writes it
        loaded.format.write(loaded, checked.deployed, output, metadata, force=config.output.force,
                            inputs=(config.source.path,))
    latency, not_faster = _speed(config, loaded, pruned, say)
    return PruneResult(
        model=summary(loaded, original.totals), output=str(output), method=step.method,
        allocation=config.plan.allocation, budget=config.budget.to_dict(), target=step.target,
        before=original.totals, after=checked.totals, macs_kept=checked.totals.macs / original.totals.macs,
        params_kept=checked.totals.params / original.totals.params,
        deviation_pp=_deviation(config, step, original.totals, checked.totals),
        layers=layer_changes(original.costs, checked.costs), groups_pruned=step.groups_pruned,
        channels_removed=step.channels_removed, seconds=time.perf_counter() - started, seed=config.run.seed,
        notes=[note for note in (*loaded.notes, rounding, *step.notes, *notes, not_faster) if note],
        latency=latency, accuracy=measured_top1,
        reconstruction=step.reconstruction, latency_target=step.records.get("latency_target"),
        sensitivity=step.sensitivity, recalibration=step.records.get("recalibrate_bn"),
        training=(step.records.get("edp") or step.records.get("soft_pruning") or {}).get("training"),
    )


def _deviation(config: PruneConfig, step: Removal, before: Totals, after: Totals) -> float:
    """Achieved minus requested share of the budgeted cost, in percentage points."""
    latency = step.records.get("latency")
    kind = config.budget.kind
    achieved = {"macs": after.macs, "params": after.params, "latency": latency and latency["slim_ms"]}.get(kind)
    base = {"macs": before.macs, "params": before.params, "latency": latency and latency["original_ms"]}.get(kind)
    return 100 * (achieved - step.target) / base if achieved is not None else 0.0


def _speed(config: PruneConfig, loaded: LoadedModel, pruned: torch.nn.Module,
           say: Progress) -> tuple[dict[str, Any] | None, str | None]:
    """``--latency``: the original timed beside the slim model, and a note where it is not faster where it runs."""
    if not config.latency.compare:
        return None, None
    from prunecli.latency import compare_latency

    say("timing the original and the slim model")
    batches = tuple(dict.fromkeys((1, config.latency.batch)))
    comparison = compare_latency(loaded.model, pruned, tuple(loaded.input.shape), threads=config.run.threads,
                                 batch_sizes=batches)
    return speed_check(comparison, config.latency.runtime)


# ----------------------------------------------------------------------------- export


def export_artifact(job: ExportJob) -> Any:
    """Export a model to ONNX (verified against onnxruntime), safetensors or TorchScript."""
    from prunecli.export import export_model

    loaded = open_model(job.source)
    profile(loaded)
    real = load_images(job.data, loaded, job.data.calib_images, 0) if job.data is not None else None
    # a slim safetensors copy holds the whole model; a traced graph holds what takes an image batch
    whole = job.export.format == "safetensors"
    result = export_model(loaded.deployed if whole else loaded.model, input_shape=tuple(loaded.input.shape),
                          document=loaded.document, config=job.export, real_inputs=real.images if real else None,
                          arch=loaded.arch,
                          inputs=(job.source.path,), import_paths=job.source.import_paths)
    if real is not None and job.export.verify:
        result.notes.extend(fewer_than_asked("--verify-images", job.data.calib_images, "--data", real, "verified"))
    if getattr(loaded.model, "export_note", None) and not whole:
        result.notes.append(loaded.model.export_note)
    return result


# ----------------------------------------------------------------------------- evaluate


def evaluate_model(config: EvaluateConfig) -> EvaluateResult:
    """Top-1/top-5 accuracy, loss and throughput on labelled data; with ``compare``, the original beside it.

    Without a data source, a model that takes 1x28x28 images is evaluated on Fashion-MNIST's test split and the
    result says so; any other model is refused (:meth:`DataOptions.for_model`)."""
    from prunecli.training import evaluate

    loaded = open_model(config.source)
    if is_ultralytics(loaded.deployed):  # mAP from Ultralytics' validator on the dataset yaml
        from prunecli.pipeline.yolo import evaluate_yolo

        return evaluate_yolo(config, loaded)
    chosen = data_for_model(config.data, loaded, "test", "evaluated")
    notes = list(chosen.notes)

    def run(loaded: LoadedModel) -> tuple[ModelSummary, dict[str, Any], str]:
        measured = profile(loaded)
        images = labelled_images(chosen.options, loaded, config.limit, config.seed, "evaluation")
        notes.extend(note for note in fewer_than_asked("--eval-limit", config.limit, "--data", images, "evaluated")
                     if note not in notes)
        metrics = evaluate(loaded.model, images, chosen.options.batch_size, config.device).to_dict()
        return summary(loaded, measured.totals), metrics, images.description

    model, metrics, description = run(loaded)
    compare = None
    if config.compare is not None:
        other, other_metrics, _ = run(open_model(with_base_arch(config.compare, loaded)))
        compare = {"model": dataclasses.asdict(other), "metrics": other_metrics,
                   "macs_ratio": other.macs / model.macs if model.macs else None}
    return EvaluateResult(model, description, metrics, compare, notes)


# ----------------------------------------------------------------------------- finetune


def default_finetune_output(source: Path) -> Path:
    """``model.slim.safetensors`` -> ``model.slim.ft.safetensors`` beside it (a whole pickled model: ``.ft.pt``)."""
    return adapter_output(source, "ft")


def _check_finetune_outputs(job: FinetuneJob, output: Path) -> None:
    """The output and the resume state (written every epoch, before the output and beside it) need files of their
    own, and neither may replace a file the run reads."""
    adapter = checkpoint_format(job.source)
    adapter.check_output(output)
    if not main_process():
        return
    sources = [job.source.path, job.train.source, job.teacher.path if job.teacher else None,
               job.val.source if job.val else None]
    inputs = tuple(Path(s) for s in sources if s is not None)
    adapter.check_path(output, force=job.force, inputs=inputs)
    checkpoint = job.training.checkpoint
    if checkpoint is None:
        return
    if Path(checkpoint).resolve() == output.resolve():
        raise ExportError(f"--checkpoint {checkpoint} is also the output file; give the resume state a path of its own")
    check_output_path(Path(checkpoint), force=True, inputs=inputs, option="--checkpoint")


def finetune_model(job: FinetuneJob, progress: Progress | None = None) -> FinetuneRunResult:
    """Fine-tune (optionally distilling from a teacher) and write the best model as a slim artifact."""
    from prunecli.report.events import messages_to
    from prunecli.training import evaluate, finetune

    say = progress or _silent
    output = job.output or default_finetune_output(job.source.path)
    _check_finetune_outputs(job, output)
    loaded = open_model(job.source)
    loaded.format.check_output(output)  # again, knowing now whether the base architecture is known
    if is_ultralytics(loaded.deployed):  # Ultralytics' own trainer, at the pruned widths
        from prunecli.pipeline.yolo import finetune_yolo

        return finetune_yolo(job, loaded, output, say)
    chosen = data_for_model(job.train, loaded, "train", "trained")
    job = dataclasses.replace(job, train=chosen.options)  # the metadata records the data actually trained on
    x = profile(loaded).example
    teacher = open_model(with_base_arch(job.teacher, loaded)) if job.teacher is not None else None
    train = labelled_images(job.train, loaded, job.train_limit, job.training.seed, "fine-tuning")
    val = load_images(job.val, loaded, job.val_limit, job.training.seed) if job.val else None
    check_finetune_recalibration(job.training, train)
    notes = [*chosen.notes, *fewer_than_asked("--train-limit", job.train_limit, "--data", train, "trained"),
             *(fewer_than_asked("--val-limit", job.val_limit, "--val-data", val, "validated") if val else [])]
    eval_batch = job.training.eval_batch_size or job.training.batch_size
    baseline = evaluate(loaded.model, val, eval_batch) if val else None  # epoch 0: the input, kept unless beaten
    before = baseline.to_dict() if baseline else None
    length = plural(job.training.steps, "step") if job.training.steps else plural(job.training.epochs, "epoch")
    say(f"fine-tuning on {len(train)} images for {length}")
    result = finetune(loaded.model, train, val, job.training, teacher=teacher.model if teacher else None,
                      progress=messages_to(say), baseline=baseline)
    model = result.model.eval().cpu()
    after = evaluate(model, val, eval_batch).to_dict() if val else None
    costs, _ = costs_and_output(model, x)
    total = Totals(count_params(model), sum(c.macs for c in costs))
    if main_process():
        document = finetune_metadata(job, loaded, result.record(), teacher.sha256 if teacher else None, after)
        deployed = reassemble(loaded.deployed, model)  # a transformers model, not the view of its logits trained
        loaded.format.write(loaded, deployed, output, document, force=job.force, inputs=(job.source.path,))
    return FinetuneRunResult(summary(loaded, total), str(output) if main_process() else None, result.to_dict(),
                             before, after, train.description, len(train), val.description if val else None, notes)
