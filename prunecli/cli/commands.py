"""Typer commands: parse options into a config, call one API function, render the result."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Annotated

import typer

from prunecli._version import __version__
from prunecli.cli.boundary import OneLineUsageErrors, Progress, state
from prunecli.cli.help import Command
from prunecli.cli.options import (
    BUDGET,
    CRITERION,
    DATA,
    KD,
    MODEL,
    OUTPUT,
    RECOVERY,
    Allocation,
    Amp,
    Augment,
    CalibImagesOpt,
    CompareArchOpt,
    DataOpt,
    DType,
    EdpInit,
    EvalLimitOpt,
    Exporter,
    ExportFormat,
    ForceOpt,
    IgnoreOpt,
    Images,
    LatencyBatchOpt,
    LatencyOpt,
    LatencyRuntime,
    Method,
    OldLimitOpt,
    Optimizer,
    PruneMethod,
    Reporting,
    Schedule,
    ScoreTimeoutOpt,
    ThreadsOpt,
    TimeoutOpt,
    ValDataOpt,
    companion_source,
    criterion_options,
    either,
    image_options,
    methods_help,
    model_options,
    reporting_options,
    run_options,
    with_options,
)
from prunecli.config import LATENCY_BATCH, ModelSource, RunOptions
from prunecli.errors import OptionError, SpeedupError

app = typer.Typer(
    cls=OneLineUsageErrors,
    name="prunecli",
    help="Make trained PyTorch CNNs smaller and faster by structured filter pruning.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"prunecli {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors (also after the command).")] = False,
) -> None:
    state["debug"] = debug


@app.command(cls=Command)
@with_options(source=model_options, out=reporting_options)
def analyze(
    source: ModelSource,
    out: Reporting,
    compare: Annotated[Path | None, typer.Option("--compare", help="With --latency: time this original beside the model and show the speedup next to the MACs ratio.", rich_help_panel=MODEL)] = None,
    compare_arch: CompareArchOpt = None,
    ignore: IgnoreOpt = None,
    latency: LatencyOpt = False,
    latency_batch: LatencyBatchOpt = LATENCY_BATCH,
    timeout: TimeoutOpt = 120.0,
) -> None:
    """Layers, parameters, MACs (conv + linear multiply-accumulates, the thop convention the papers use)
    and the prunable channel groups of a model."""
    from prunecli.api import analyze_model
    from prunecli.config import AnalyzeConfig
    from prunecli.report.console import print_json, render, stdout_console

    config = AnalyzeConfig(source, tuple(ignore or ()), timeout, latency, latency_batch,
                           companion_source(compare, compare_arch, source))
    result = analyze_model(config)
    print_json(result) if out.json else render(result, stdout_console(), out.quiet)


@app.command(
    cls=Command,
    short_help="Per-channel importance of every prunable group, with a chosen criterion.",
    help="Per-channel importance of every prunable group, with the chosen criterion. Higher scores are kept; "
    "scores are normalised per layer and combined over coupled layers. Parts marked [INFERRED] are "
    "reconstructed from the paper's abstract (docs/methods.md).\n\n" + methods_help()
)
@with_options(source=model_options, criterion=criterion_options, images=image_options, run=run_options,
              out=reporting_options)
def score(
    source: ModelSource,
    criterion: dict,
    images: Images,
    run: RunOptions,
    out: Reporting,
    preview_flops_target: Annotated[str | None, typer.Option("--preview-flops-target", help="Also show how many channels per group this MACs budget would remove.", rich_help_panel=BUDGET)] = None,
    ignore: IgnoreOpt = None,
    method: Annotated[Method, typer.Option("--method", "-m", help="Importance criterion; see the list above.", rich_help_panel=CRITERION)] = "l1",
    data: DataOpt = None,
    calib_images: CalibImagesOpt = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass while scoring.", min=1, rich_help_panel=DATA)] = 64,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write the per-group scores as JSON (reusable with `prune --scores`).", rich_help_panel=OUTPUT)] = None,
    force: ForceOpt = False,
    timeout: TimeoutOpt = 120.0,
    score_timeout: ScoreTimeoutOpt = None,
) -> None:
    from prunecli.api import score_model
    from prunecli.budget import parse_budget
    from prunecli.config import ScoreConfig, ScoringOptions
    from prunecli.report.console import print_json, render, stdout_console

    config = ScoreConfig(
        source=source, scoring=ScoringOptions(method.value, **criterion),
        data=images.options(data, calib_images, batch_size), run=_timed(run, timeout, score_timeout),
        ignore=tuple(ignore or ()), preview=parse_budget("macs", preview_flops_target) if preview_flops_target else None,
        output=output, force=force,
    )
    with Progress(out.progress, calib_images if data else None) as progress:
        result = score_model(config, progress=progress.stage, batch_progress=progress.images)
    print_json(result) if out.json else render(result, stdout_console(), out.quiet)


def _round_to(text: str) -> int | None:
    """``--round-to auto`` (None: resolved where the runtime is known) or a positive integer."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise OptionError(f"--round-to {text!r} is neither auto nor a whole number of channels, e.g. 8") from None


def _timed(run: RunOptions, timeout: float, score_timeout: float | None, threads: int | None = None) -> RunOptions:
    return RunOptions(run.seed, run.device, timeout, score_timeout, threads)


@app.command(cls=Command)
@with_options(source=model_options, criterion=criterion_options, images=image_options, run=run_options,
              out=reporting_options)
def prune(
    source: ModelSource,
    criterion: dict,
    images: Images,
    run: RunOptions,
    out: Reporting,
    flops_target: Annotated[str | None, typer.Option("--flops-target", help="MACs to keep (multiply-accumulates, which the papers call FLOPs): a fraction (0.5), a percentage (50%) or a count (2.1G).", rich_help_panel=BUDGET)] = None,
    params_target: Annotated[str | None, typer.Option("--params-target", help="Parameters to keep: a fraction, a percentage or a count (11M).", rich_help_panel=BUDGET)] = None,
    ratio: Annotated[str | None, typer.Option("--ratio", help="Share of each prunable group's channels to remove, e.g. 0.3.", rich_help_panel=BUDGET)] = None,
    latency_target: Annotated[str | None, typer.Option("--latency-target", help="Measured latency to reach: a fraction of the original's (0.5, 50%) or milliseconds (12ms), at --latency-batch under --latency-runtime. Every layer is timed alone on a grid of its channel counts (cached in $PRUNECLI_CACHE/latency, default ~/.cache/prunecli/latency), the allocator plans on the latency that table predicts, then the slim model is measured and the request corrected until it is within 5% (at most 5 slim models).", rich_help_panel=BUDGET)] = None,
    latency_runtime: Annotated[LatencyRuntime | None, typer.Option("--latency-runtime", help="--latency-target: measure under onnxruntime (CPU, the default) or torch (eager, on --device).", rich_help_panel=BUDGET)] = None,
    latency_batch: LatencyBatchOpt = LATENCY_BATCH,
    allocation: Annotated[Allocation | None, typer.Option("--allocation", help="uniform: the same ratio in every group; global: one threshold on normalised scores across groups; efficiency: one threshold on each channel's score per unit of budgeted cost (MACs, params, milliseconds) its group's removal saves, so removal goes where it buys the most for the least score; dispersion: SFP's kernel dispersion sets each group's ratio; sensitivity: each group is narrowed alone at a few widths on the --data images and the budget goes where it moves the output least per unit of cost (no labels). Default: uniform, global for edp (ranks and widths per layer).", rich_help_panel=BUDGET)] = None,
    max_layer_ratio: Annotated[float, typer.Option("--max-layer-ratio", help="Most of one group's channels that may go (at least one always stays).", rich_help_panel=BUDGET)] = 0.9,
    round_to: Annotated[str, typer.Option("--round-to", help="Keep channel counts at multiples of N. auto (the default): the channel block of the runtime the model will run on (onnxruntime on this CPU: 16 with AVX-512, 8 with AVX2; 8 for a latency target under torch on CUDA), groups narrower than four blocks also up to half a block in steps of a quarter of their width; 1 keeps any count.", rich_help_panel=BUDGET)] = "auto",
    ignore: IgnoreOpt = None,
    method: Annotated[PruneMethod | None, typer.Option("--method", "-m", help="Importance criterion (default l1); see `prunecli score --help`. [bold]edp[/]: EDP (Ruan et al., TNNLS 2021) decomposes every conv into basis + 1x1 coefficients, trains --edp-epochs on --data with a group-sparse regulariser steered to the budget, then prunes zero rows/columns and merges blocks back where decomposing does not pay [INFERRED: no code or full text is public].", rich_help_panel=CRITERION)] = None,
    scores: Annotated[Path | None, typer.Option("--scores", help="Reuse scores written by `prunecli score -o` for this model instead of scoring again.", rich_help_panel=CRITERION)] = None,
    edp_epochs: Annotated[int, typer.Option("--edp-epochs", help="EDP: epochs of decomposed training on --data.", min=1, rich_help_panel=CRITERION)] = 3,
    edp_lambda: Annotated[float, typer.Option("--edp-lambda", help="EDP: group-lasso strength on the rows and columns of every coefficient matrix (proximal step).", min=0, rich_help_panel=CRITERION)] = 1e-4,
    edp_threshold: Annotated[float, typer.Option("--edp-threshold", help="EDP: Pruning & Merging also drops coefficient rows/columns with a norm below this.", min=0, rich_help_panel=CRITERION)] = 5e-3,
    edp_init: Annotated[EdpInit, typer.Option("--edp-init", help="EDP: initialise each block by SVD of the conv weight, or as the weight and an identity.", rich_help_panel=CRITERION)] = "svd",
    data: Annotated[str | None, typer.Option("--data", help="Images to score with (data-driven methods), to measure sensitivity, re-estimate batch-norm statistics and reconstruct on (--calib-images of them), and to train on (soft pruning, EDP): an image folder, a tensor file (.safetensors/.pt/.npz with 'images' [N,C,H,W] and optional 'labels'), or fashion-mnist[:train|test].", rich_help_panel=DATA)] = None,
    calib_images: CalibImagesOpt = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass over the calibration images, and per training step of soft pruning and EDP.", min=1, rich_help_panel=DATA)] = 64,
    val_data: ValDataOpt = None,
    eval_data: Annotated[str | None, typer.Option("--eval-data", help="Labelled images to measure the top-1 of the original and the slim model on (shown and put in --report), e.g. fashion-mnist:test.", rich_help_panel=DATA)] = None,
    eval_limit: EvalLimitOpt = None,
    recalibrate_bn: Annotated[int, typer.Option("--recalibrate-bn", help="After removal, re-estimate batch-norm statistics on N batches of the calibration images (cheap accuracy recovery; N x --batch-size must not exceed --calib-images).", min=0, rich_help_panel=RECOVERY)] = 0,
    reconstruct: Annotated[bool, typer.Option("--reconstruct", help="After removal, refit every conv/linear that lost channels by ridge least squares so its output on the pruned network's input matches the original's, on --calib-images unlabelled images of --data (He et al. 2017 / ThiNet; no training). Pairs with --method recon.", rich_help_panel=RECOVERY)] = False,
    recon_ridge: Annotated[float, typer.Option("--recon-ridge", help="--reconstruct: ridge weight relative to the mean diagonal of each layer's Gram matrix (shrinks towards the pruned weights).", min=0, rich_help_panel=RECOVERY)] = 1e-3,
    recon_rows: Annotated[int, typer.Option("--recon-rows", help="--reconstruct: patch rows sampled per input dimension of a layer (caps the cost of high-resolution layers).", min=1, rich_help_panel=RECOVERY)] = 64,
    soft_epochs: Annotated[int, typer.Option("--soft-epochs", help="Soft pruning (LRMF/FPGM): train N epochs on --data with the selected channels held at zero, then remove them.", min=0, rich_help_panel=RECOVERY)] = 0,
    reselect_every: Annotated[int, typer.Option("--reselect-every", help="Soft pruning: re-score and re-select channels every K epochs (0: never).", min=0, rich_help_panel=RECOVERY)] = 5,
    lr: Annotated[float, typer.Option("--lr", help="Soft pruning and EDP: peak learning rate (SGD, Nesterov, cosine).", rich_help_panel=RECOVERY)] = 0.01,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Output file (.safetensors, or .pt with a .json sidecar); a whole pickled model (torch.save(model)) or an Ultralytics checkpoint is written back as one, to a .pt. Default <input>.slim.safetensors (<input>.slim.pt for a whole pickled model) beside the input.", rich_help_panel=OUTPUT)] = None,
    force: ForceOpt = False,
    report: Annotated[Path | None, typer.Option("--report", help="Also write the before/after report: .json, .md or a self-contained .html page (by the extension).", rich_help_panel=OUTPUT)] = None,
    latency: Annotated[bool, typer.Option("--latency", help="Time the original beside the slim model (median, PyTorch eager and onnxruntime, batch 1 and --latency-batch) and show the speedup next to the MACs ratio; a slim model that is not faster under onnxruntime (or the --latency-target's runtime) gets a warning note and \"faster\": false in --json.", rich_help_panel=OUTPUT)] = False,
    check_speedup: Annotated[bool, typer.Option("--check-speedup", help="With --latency: exit 1 when the slim model (still written) is not faster than the original where it runs, for CI pipelines.", rich_help_panel=OUTPUT)] = False,
    threads: ThreadsOpt = None,
    timeout: TimeoutOpt = 120.0,
    score_timeout: ScoreTimeoutOpt = None,
) -> None:
    """Physically remove channels to reach a MACs, parameter, latency or ratio budget, and write a slim model."""
    from prunecli.api import default_output, prune_model
    from prunecli.budget import parse_budget
    from prunecli.config import (
        AccuracyOptions,
        EdpOptions,
        FinetuneConfig,
        LatencyOptions,
        LatencyTarget,
        OutputOptions,
        PlanOptions,
        PruneConfig,
        ReconstructOptions,
        RecoveryOptions,
        ScoringOptions,
        SoftOptions,
    )
    from prunecli.report.console import print_json, render, stdout_console
    from prunecli.report.file import check_report_path, write_report

    budgets = [(k, v) for k, v in (("macs", flops_target), ("params", params_target), ("latency", latency_target),
                                   ("ratio", ratio)) if v is not None]
    if len(budgets) != 1:
        raise OptionError("give exactly one budget: --flops-target, --params-target, --latency-target or --ratio")
    if latency_runtime is not None and latency_target is None:
        raise OptionError("--latency-runtime says how --latency-target is measured; give --latency-target too")
    if report is not None:
        check_report_path(report, force=force, inputs=(source.path,), outputs=(output or default_output(source.path),))
    chosen = method.value if method is not None else ("" if scores else "l1")

    def training(epochs: int) -> FinetuneConfig:
        return FinetuneConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=run.seed, device=run.device)

    edp = None
    if chosen == "edp":
        edp = EdpOptions(training(edp_epochs), edp_lambda, edp_threshold, edp_init.value, images.options(val_data))
    config = PruneConfig(
        source=source,
        budget=parse_budget(*budgets[0]),
        data=images.options(data, calib_images, batch_size),
        scoring=ScoringOptions(chosen, **criterion, scores=scores),
        plan=PlanOptions(allocation.value if allocation else None, max_layer_ratio, _round_to(round_to), tuple(ignore or ())),
        recovery=RecoveryOptions(recalibrate_bn, ReconstructOptions(recon_ridge, recon_rows, seed=run.seed)
                                 if reconstruct else None,
                                 SoftOptions(training(soft_epochs), reselect_every) if soft_epochs else None, edp),
        evaluate=AccuracyOptions(images.options(eval_data), eval_limit) if eval_data else None,
        latency=LatencyOptions(latency, latency_batch, LatencyTarget((latency_runtime or LatencyRuntime.onnxruntime).value)
                               if latency_target is not None else None, check_speedup),
        output=OutputOptions(output, force),
        run=_timed(run, timeout, score_timeout, threads),
    )
    with Progress(out.progress, calib_images if data else None) as progress:
        result = prune_model(config, progress=progress.stage, batch_progress=progress.images,
                             step_progress=progress.steps)
    if report is not None:
        write_report(result, report, force=force, inputs=(source.path,))
    print_json(result) if out.json else render(result, stdout_console(), out.quiet)
    if check_speedup and not result.latency["faster"]:
        raise SpeedupError(f"--check-speedup: {result.output} is written but not faster than the original under "
                           f"{result.latency['checked_runtime']}")


@app.command(cls=Command)
@with_options(source=model_options, images=image_options, run=run_options, out=reporting_options)
def evaluate(
    source: ModelSource,
    images: Images,
    run: RunOptions,
    out: Reporting,
    compare: Annotated[Path | None, typer.Option("--compare", help="Evaluate this original model too and show both side by side.", rich_help_panel=MODEL)] = None,
    compare_arch: CompareArchOpt = None,
    data: Annotated[str | None, typer.Option("--data", help="Labelled images: fashion-mnist[:train|test], an image folder (one sub-folder per class) or a tensor file with 'images' and 'labels'. Needed unless the model takes 1x28x28 images (the sample models), which default to fashion-mnist:test.", rich_help_panel=DATA)] = None,
    eval_limit: EvalLimitOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass while evaluating.", min=1, rich_help_panel=DATA)] = 256,
    limit: OldLimitOpt = None,
) -> None:
    """Top-1/top-5 accuracy, loss and images/s on labelled data; with --compare, the original beside it."""
    from prunecli.api import evaluate_model
    from prunecli.config import EvaluateConfig
    from prunecli.report.console import print_json, render, stdout_console

    config = EvaluateConfig(source, images.labelled(data, batch_size),
                            either(eval_limit, limit, "--eval-limit", "--limit"), run.device,
                            companion_source(compare, compare_arch, source), run.seed)
    result = evaluate_model(config)
    print_json(result) if out.json else render(result, stdout_console(), out.quiet)


@app.command(cls=Command)
@with_options(source=model_options, images=image_options, run=run_options, out=reporting_options)
def finetune(
    source: ModelSource,
    images: Images,
    run: RunOptions,
    out: Reporting,
    teacher: Annotated[Path | None, typer.Option("--teacher", help="Distil from this model (usually the unpruned original).", rich_help_panel=MODEL)] = None,
    teacher_arch: Annotated[str | None, typer.Option("--teacher-arch", help="--arch of the teacher when it is a plain state dict (default: the model's base architecture).", rich_help_panel=MODEL)] = None,
    data: Annotated[str | None, typer.Option("--data", help="Labelled training images: fashion-mnist[:train], an image folder or a tensor file; for an Ultralytics model its dataset yaml (docs/yolo.md). Needed unless the model takes 1x28x28 images (the sample models), which default to fashion-mnist:train.", rich_help_panel=DATA)] = None,
    train_limit: Annotated[int | None, typer.Option("--train-limit", help="Train on a seeded subset of N images of --data.", min=1, rich_help_panel=DATA)] = None,
    val_data: Annotated[str | None, typer.Option("--val-data", help="Labelled validation images, evaluated each epoch; the best epoch is kept.", rich_help_panel=DATA)] = None,
    val_limit: Annotated[int | None, typer.Option("--val-limit", help="Validate on a seeded subset of N images of --val-data.", min=1, rich_help_panel=DATA)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Global batch size of a training step, and of validation (split across processes under torchrun).", min=1, rich_help_panel=DATA)] = 128,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the training data.", min=1, rich_help_panel=RECOVERY)] = 1,
    steps: Annotated[int | None, typer.Option("--steps", help="Total optimizer steps instead of --epochs.", min=1, rich_help_panel=RECOVERY)] = None,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (after warm-up, then cosine decay).", rich_help_panel=RECOVERY)] = 0.01,
    optimizer: Annotated[Optimizer, typer.Option("--optimizer", help="sgd (Nesterov momentum) or adamw.", rich_help_panel=RECOVERY)] = "sgd",
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="On weights, not on biases and norms.", rich_help_panel=RECOVERY)] = 5e-4,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", help="Cross-entropy label smoothing.", rich_help_panel=RECOVERY)] = 0.0,
    warmup_epochs: Annotated[float, typer.Option("--warmup-epochs", help="Linear warm-up length in epochs (fractions allowed).", rich_help_panel=RECOVERY)] = 0.0,
    augment: Annotated[Augment, typer.Option("--augment", help="auto: random crop + horizontal flip; none: the images as they are (recovered more in a single epoch, docs/quality.md).", rich_help_panel=RECOVERY)] = "auto",
    kd: Annotated[KD | None, typer.Option("--kd", help="Distillation: fixed temperature or SFP's variable schedule (default variable with --teacher).", rich_help_panel=RECOVERY)] = None,
    kd_alpha: Annotated[float, typer.Option("--kd-alpha", help="Weight of the distillation term.", rich_help_panel=RECOVERY)] = 0.7,
    kd_t_max: Annotated[float, typer.Option("--kd-t-max", help="Temperature at the start (the fixed temperature with --kd fixed).", rich_help_panel=RECOVERY)] = 4.0,
    kd_t_min: Annotated[float, typer.Option("--kd-t-min", help="Temperature at the end (variable).", rich_help_panel=RECOVERY)] = 1.0,
    kd_schedule: Annotated[Schedule, typer.Option("--kd-schedule", help="Shape of the variable temperature.", rich_help_panel=RECOVERY)] = "cosine",
    recalibrate_bn: Annotated[int, typer.Option("--recalibrate-bn", help="Re-estimate batch-norm statistics on N batches before training.", min=0, rich_help_panel=RECOVERY)] = 0,
    amp: Annotated[Amp, typer.Option("--amp", help="Mixed precision: auto (CUDA only), on or off.", rich_help_panel=RECOVERY)] = "auto",
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="Save the resume state here every epoch.", rich_help_panel=RECOVERY)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run saved in --checkpoint.", rich_help_panel=RECOVERY)] = False,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Output .safetensors (a whole pickled model or an Ultralytics checkpoint: .pt); default <input>.ft.safetensors (<input>.ft.pt) beside the input.", rich_help_panel=OUTPUT)] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output (and checkpoint) file.", rich_help_panel=OUTPUT)] = False,
    limit: OldLimitOpt = None,
) -> None:
    """Recover accuracy after pruning: train (optionally distilling from the original), keep the best epoch,
    write a slim model whose metadata records the run. Runs under torchrun with DDP."""
    from prunecli.api import finetune_model
    from prunecli.config import FinetuneConfig, FinetuneJob
    from prunecli.report.console import print_json, render, stdout_console

    training = FinetuneConfig(
        epochs=epochs, steps=steps, lr=lr, optimizer=optimizer.value, weight_decay=weight_decay,
        label_smoothing=label_smoothing, warmup_epochs=warmup_epochs, batch_size=batch_size, seed=run.seed,
        device=run.device, amp=amp.value, augment=augment.value,
        kd=(kd.value if kd else ("variable" if teacher else "none")), kd_alpha=kd_alpha, kd_t_max=kd_t_max,
        kd_t_min=kd_t_min, kd_schedule=kd_schedule.value, recalibrate_bn=recalibrate_bn, checkpoint=checkpoint,
        resume=resume, force=force,
    )
    job = FinetuneJob(
        source=source, train=images.labelled(data, batch_size), training=training,
        val=images.options(val_data, 1, batch_size), teacher=companion_source(teacher, teacher_arch, source),
        output=output, force=force, train_limit=either(train_limit, limit, "--train-limit", "--limit"),
        val_limit=val_limit,
    )
    with Progress(out.progress) as progress:
        result = finetune_model(job, progress=progress.stage)
    print_json(result) if out.json else render(result, stdout_console(), out.quiet)


@app.command(cls=Command)
@with_options(source=model_options, images=image_options, out=reporting_options)
def export(
    source: ModelSource,
    images: Images,
    out: Reporting,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output file: .onnx, .safetensors, or .pt/.ts for TorchScript.", rich_help_panel=OUTPUT)],
    data: Annotated[str | None, typer.Option("--data", help="Real images to verify with besides the random ones (same forms as for score).", rich_help_panel=DATA)] = None,
    verify_images: Annotated[int | None, typer.Option("--verify-images", help="Real images of --data to verify with (default 32).", min=1, rich_help_panel=DATA)] = None,
    format: Annotated[ExportFormat | None, typer.Option("--format", "-f", help="onnx (checked, verified against onnxruntime), safetensors (slim re-write) or torchscript; default: the one the output's extension names.", rich_help_panel=OUTPUT)] = None,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Compare the exported model's outputs with PyTorch's on random (and --data) inputs; fail above --atol.", rich_help_panel=OUTPUT)] = True,
    atol: Annotated[float, typer.Option("--atol", help="Largest absolute output difference --verify accepts.", rich_help_panel=OUTPUT)] = 1e-4,
    opset: Annotated[int | None, typer.Option("--opset", help="ONNX opset (legacy exporter 7-20, dynamo 18-23).", rich_help_panel=OUTPUT)] = None,
    exporter: Annotated[Exporter, typer.Option("--exporter", help="ONNX exporter: legacy (TorchScript-based, fast), dynamo, or auto (legacy, falling back to dynamo with the reason reported).", rich_help_panel=OUTPUT)] = "auto",
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch", help="Make the batch dimension dynamic.", rich_help_panel=OUTPUT)] = False,
    dtype: Annotated[DType, typer.Option("--dtype", help="safetensors: store weights as fp32, fp16 or bf16.", rich_help_panel=OUTPUT)] = "fp32",
    force: ForceOpt = False,
    calib_images: Annotated[int | None, typer.Option("--calib-images", hidden=True, min=1)] = None,  # before --verify-images
) -> None:
    """Write a deployable file: ONNX verified against onnxruntime, a slim safetensors copy, or TorchScript."""
    from prunecli.api import export_artifact
    from prunecli.config import ExportJob
    from prunecli.export import ExportConfig
    from prunecli.report.console import print_json, render, stdout_console

    config = ExportConfig(format=format.value if format else None, output=output, opset=opset, dynamic_batch=dynamic_batch,
                          exporter=exporter.value, verify=verify, atol=atol, dtype=dtype.value, force=force)
    count = either(verify_images, calib_images, "--verify-images", "--calib-images") or 32
    result = export_artifact(ExportJob(source, config, images.options(data, count, count)))
    print_json(result) if out.json else render(result, stdout_console(), out.quiet)


def main() -> None:
    try:
        app()
    finally:
        # The interpreter's teardown collects every object torch and torchvision made at import (330k): 0.4-0.9 s
        # spent after the command is done. Frozen objects are skipped; the output is written and closed by now.
        gc.freeze()
