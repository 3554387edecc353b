"""Typer commands: parse options into a config, call one API function, render the result."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from typer.core import TyperGroup

from prunecli import __version__
from prunecli.errors import PrunecliError
from prunecli.io.files import recording_outputs


class _OneLineUsageErrors(TyperGroup):
    """Usage errors (exit 2) as one line ``error: ...``, like every other error, instead of Typer's boxed panel."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.TyperException as exc:  # click's UsageError and its kin, re-raised outside standalone mode
            if type(exc).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
                context = getattr(exc, "ctx", None)
                hint = f"; see '{context.command_path} --help'" if context is not None else ""
                _say_error(exc.format_message().rstrip(".") + hint)
            sys.exit(exc.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineUsageErrors,
    name="prunecli",
    help="Make trained PyTorch CNNs smaller and faster by structured filter pruning.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()
_state = {"debug": False}


def _methods() -> list[str]:
    from prunecli.criteria import list_criteria

    return list_criteria()


Method = Enum("Method", {name: name for name in _methods()}, type=str)
# prune also takes EDP, a training-time method (prunecli/edp.py) rather than a scoring criterion
PruneMethod = Enum("PruneMethod", {**{name: name for name in _methods()}, "edp": "edp"}, type=str)


def _methods_help() -> str:
    """The criteria table for `score --help`, straight from the registry."""
    from prunecli.criteria import get_criterion

    lines = []
    for name in _methods():
        criterion = get_criterion(name)
        needs = " [needs --data]" if criterion.needs_data else ""
        needs += " (takes --group-scope)" if criterion.group_members else ""
        lines.append(f"[bold]{name}[/]: {criterion.summary}{needs} — {criterion.paper}")
    return "\n\n".join(lines)


class Allocation(str, Enum):
    uniform = "uniform"
    global_ = "global"
    dispersion = "dispersion"


class Reduction(str, Enum):
    mean = "mean"
    max = "max"
    sum = "sum"


class GroupScope(str, Enum):
    producers = "producers"
    all = "all"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"prunecli {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    _state["debug"] = debug


def _say_error(message: str) -> None:
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _fail(message: str, code: int = 1) -> None:
    _say_error(message)
    raise typer.Exit(code)


class _Terminated(BaseException):
    """SIGTERM as an exception, so that cleanups (atomic_output's temp file) run as they do for Ctrl-C."""


def _raise_terminated(signum, frame):
    raise _Terminated


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _stopped(how: str, written: list[Path]) -> str:
    """What a signal left: nothing, or complete outputs (one may land between the rename and the return)."""
    if not written:
        return f"{how}; no output was written"
    return f"{how} after writing {' and '.join(map(str, written))} completely"


def _run(call):
    """Domain errors become one line and exit 1; Ctrl-C exits 130 and SIGTERM 143; anything else is an internal
    error."""
    with _sigterm_raises(), recording_outputs() as written:
        if _state["debug"]:
            return call()
        try:
            return call()
        except PrunecliError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            _fail(_stopped("interrupted", written), 130)
        except _Terminated:
            _fail(_stopped("terminated", written), 143)
        except MemoryError:
            _fail("out of memory; try a smaller --input-shape or batch size")
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else ""
            _fail(f"internal error ({type(exc).__name__}: {first[:200]}); rerun with --debug and report it")


ModelArg = Annotated[Path, typer.Argument(help="Model file: prunecli .safetensors, a state dict (.safetensors/.pt/.pth) or a pickled model.", show_default=False)]
ArchOpt = Annotated[str | None, typer.Option("--arch", help="Base architecture: torchvision:resnet50, sample:resnet20, pkg.module:factory or file.py:factory. Detected for torchvision weights and slim files.")]
ArchKwargsOpt = Annotated[str | None, typer.Option("--arch-kwargs", help='JSON keyword arguments for the factory, e.g. \'{"num_classes": 10}\'.')]
InputShapeOpt = Annotated[str | None, typer.Option("--input-shape", help="Input CxHxW, e.g. 3x224x224 (default: by architecture, or stored in slim files).")]
TrustPickleOpt = Annotated[bool, typer.Option("--trust-pickle", help="Allow full pickles that name your own classes. Unpickling runs code from the file: only for files you trust.")]
ImportPathOpt = Annotated[list[Path] | None, typer.Option("--import-path", help="Folder added to sys.path so your classes resolve (repeatable).")]
IgnoreOpt = Annotated[list[str] | None, typer.Option("--ignore", help="Glob of layer names whose output channels stay (repeatable). The layers that feed the model output are always kept.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout and nothing else.")]
QuietOpt = Annotated[bool, typer.Option("-q", "--quiet", help="No progress output.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds allowed for tracing the model's dependencies.", min=1)]
ScoreTimeoutOpt = Annotated[float | None, typer.Option("--score-timeout", help="Seconds allowed for scoring (the pass over --data for data-driven methods); default: no limit.", min=1)]
DataOpt = Annotated[str | None, typer.Option("--data", help="Calibration images for data-driven methods: an image folder, a tensor file (.safetensors/.pt/.npz with 'images' [N,C,H,W] and optional 'labels'), or fashion-mnist[:train|test].")]
DataRootOpt = Annotated[Path, typer.Option("--data-root", help="Folder of the Fashion-MNIST IDX files.")]
CalibImagesOpt = Annotated[int, typer.Option("--calib-images", help="Calibration images to use (a seeded random subset).", min=1)]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Images per forward pass while scoring.", min=1)]
MeanOpt = Annotated[str | None, typer.Option("--mean", help="Per-channel mean for image folders, e.g. 0.485,0.456,0.406 (default: the model's).")]
StdOpt = Annotated[str | None, typer.Option("--std", help="Per-channel std for image folders, e.g. 0.229,0.224,0.225.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N (scoring runs there).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed: random criterion, calibration subset.")]
ReductionOpt = Annotated[Reduction, typer.Option("--group-reduction", help="How the layers of a coupled group combine their (per-layer normalised) scores.")]
GroupScopeOpt = Annotated[GroupScope, typer.Option("--group-scope", help="Weight criteria marked (takes --group-scope) in `score --help`: [bold]producers[/] scores the output filters of the layers that make a group's channels; [bold]all[/] scores every member of the coupled group as Torch-Pruning's group importance does: those filters, the norms' |gamma| and every consumer's input slice, each normalised, then --group-reduction. Other criteria ignore it.")]
DctBandOpt = Annotated[str, typer.Option("--dct-band", help="dct: 'full' spectrum energy (the authors' code) or 'low' frequency block [INFERRED].")]
IcieLambdaOpt = Annotated[float, typer.Option("--icie-lambda", help="icie: weight of information independence against capacity [INFERRED].")]
IcieCapacityOpt = Annotated[str, typer.Option("--icie-capacity", help="icie: information capacity from the filters' 'weight' entropy (data-free) or the 'feature' entropy of the activation maps (needs --data) [INFERRED].")]


def _floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise PrunecliError(f"{option} {text!r} must be comma-separated numbers, e.g. 0.485,0.456,0.406") from None


def _scoring(method, data, data_root, calib_images, batch_size, mean, std, group_reduction, device, seed, dct_band, icie_lambda,
             icie_capacity, group_scope):
    from prunecli.api import resolve_device
    from prunecli.config import DataOptions, ScoringOptions

    data_options = None
    if data is not None:
        data_options = DataOptions(data, data_root, calib_images, batch_size, _floats(mean, "--mean"), _floats(std, "--std"))
    return ScoringOptions(
        method=method,
        options={"dct_band": dct_band, "icie_lambda": icie_lambda, "icie_capacity": icie_capacity},
        data=data_options,
        group_reduction=group_reduction.value,
        device=str(resolve_device(device)),
        seed=seed,
        group_scope=group_scope.value,
    )


def _source(model, arch, arch_kwargs, input_shape, trust_pickle, import_path):
    from prunecli.config import ModelSource
    from prunecli.io.arch import parse_arch_kwargs, parse_input_shape

    return ModelSource(
        path=model,
        arch=arch,
        arch_kwargs=parse_arch_kwargs(arch_kwargs),
        input_shape=parse_input_shape(input_shape) if input_shape else None,
        trust_pickle=trust_pickle,
        import_paths=tuple(import_path or ()),
    )


class _Progress:
    """Stage messages and a bar over calibration images, on stderr; silent with -q or --json."""

    def __init__(self, enabled: bool, images: int | None = None):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeRemainingColumn

        self.enabled = enabled and err.is_terminal  # no progress noise in pipes, logs and CI
        self._bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeRemainingColumn(), console=err, transient=True, disable=not self.enabled)
        self._stage = self._bar.add_task("starting", total=images)

    def __enter__(self):
        self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self._bar.__exit__(*exc)

    def stage(self, message: str) -> None:
        self._bar.update(self._stage, description=message)

    def images(self, count: int) -> None:
        self._bar.advance(self._stage, count)


@app.command()
def analyze(
    model: ModelArg,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    input_shape: InputShapeOpt = None,
    trust_pickle: TrustPickleOpt = False,
    import_path: ImportPathOpt = None,
    ignore: IgnoreOpt = None,
    latency: Annotated[bool, typer.Option("--latency", help="Measure median latency (PyTorch eager and onnxruntime, batch 1 and --latency-batch).")] = False,
    latency_batch: Annotated[int, typer.Option("--latency-batch", help="The larger batch for --latency.", min=2)] = 16,
    compare: Annotated[Path | None, typer.Option("--compare", help="With --latency: time this original beside the model and show the speedup next to the MACs ratio.")] = None,
    compare_arch: Annotated[str | None, typer.Option("--compare-arch", help="--arch of the --compare model when it is a plain state dict (default: the model's base architecture).")] = None,
    timeout: TimeoutOpt = 120.0,
    as_json: JsonOpt = False,
) -> None:
    """Layers, parameters, MACs (conv + linear multiply-accumulates, the thop convention the papers use)
    and the prunable channel groups of a model."""

    def call():
        from prunecli.api import analyze_model
        from prunecli.config import AnalyzeConfig, ModelSource
        from prunecli.report import print_json, render_analyze

        if compare is not None and not latency:
            raise PrunecliError("--compare needs --latency (it times the original beside this model)")
        source = _source(model, arch, arch_kwargs, input_shape, trust_pickle, import_path)
        other = ModelSource(compare, compare_arch, {}, source.input_shape, trust_pickle, source.import_paths) if compare else None
        config = AnalyzeConfig(source, tuple(ignore or ()), timeout, latency, latency_batch, other)
        result = analyze_model(config)
        print_json(result) if as_json else render_analyze(result, out)

    _run(call)


@app.command(
    short_help="Per-channel importance of every prunable group, with a chosen criterion.",
    help="Per-channel importance of every prunable group, with the chosen criterion. Higher scores are kept; "
    "scores are normalised per layer and combined over coupled layers. Parts marked [INFERRED] are "
    "reconstructed from the paper's abstract (see METHODS.md).\n\n" + _methods_help()
)
def score(
    model: ModelArg,
    method: Annotated[Method, typer.Option("--method", "-m", help="Importance criterion; see the table below.")] = "l1",
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write the per-group scores as JSON (reusable with `prune --scores`).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")] = False,
    preview_flops_target: Annotated[str | None, typer.Option("--preview-flops-target", help="Also show how many channels per group this MACs budget would remove.")] = None,
    data: DataOpt = None,
    data_root: DataRootOpt = Path("/usr/share/datasets/fashion-mnist"),
    calib_images: CalibImagesOpt = 256,
    batch_size: BatchSizeOpt = 64,
    mean: MeanOpt = None,
    std: StdOpt = None,
    group_reduction: ReductionOpt = Reduction.mean,
    group_scope: GroupScopeOpt = GroupScope.all,
    dct_band: DctBandOpt = "full",
    icie_lambda: IcieLambdaOpt = 1.0,
    icie_capacity: IcieCapacityOpt = "weight",
    ignore: IgnoreOpt = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    input_shape: InputShapeOpt = None,
    trust_pickle: TrustPickleOpt = False,
    import_path: ImportPathOpt = None,
    timeout: TimeoutOpt = 120.0,
    score_timeout: ScoreTimeoutOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    def call():
        from prunecli.api import score_model
        from prunecli.config import ScoreConfig, parse_budget
        from prunecli.report import print_json, render_score

        scoring = _scoring(method.value, data, data_root, calib_images, batch_size, mean, std, group_reduction, device,
                           seed, dct_band, icie_lambda, icie_capacity, group_scope)
        config = ScoreConfig(
            source=_source(model, arch, arch_kwargs, input_shape, trust_pickle, import_path),
            scoring=scoring,
            output=output,
            force=force,
            ignore=tuple(ignore or ()),
            preview=parse_budget("flops", preview_flops_target) if preview_flops_target else None,
            timeout=timeout,
            score_timeout=score_timeout,
        )
        with _Progress(not (quiet or as_json), calib_images if data else None) as progress:
            result = score_model(config, progress=progress.stage, batch_progress=progress.images)
        print_json(result) if as_json else render_score(result, out)

    _run(call)


class EdpInit(str, Enum):
    svd = "svd"
    identity = "identity"


@app.command()
def prune(
    model: ModelArg,
    method: Annotated[PruneMethod | None, typer.Option("--method", "-m", help="Importance criterion (default l1); see `prunecli score --help`. [bold]edp[/]: EDP (Ruan et al., TNNLS 2021) decomposes every conv into basis + 1x1 coefficients, trains --edp-epochs on --data with a group-sparse regulariser steered to the budget, then prunes zero rows/columns and merges blocks back where decomposing does not pay [INFERRED: no code or full text is public].")] = None,
    flops_target: Annotated[str | None, typer.Option("--flops-target", help="MACs to keep: a fraction (0.5), a percentage (50%) or a count (2.1G).")] = None,
    params_target: Annotated[str | None, typer.Option("--params-target", help="Parameters to keep: a fraction, a percentage or a count (11M).")] = None,
    ratio: Annotated[str | None, typer.Option("--ratio", help="Share of each prunable group's channels to remove, e.g. 0.3.")] = None,
    allocation: Annotated[Allocation | None, typer.Option("--allocation", help="uniform: the same ratio in every group; global: one threshold on normalised scores across groups; dispersion: SFP's kernel dispersion sets each group's ratio. Default: uniform, global for edp (ranks and widths per layer).")] = None,
    max_layer_ratio: Annotated[float, typer.Option("--max-layer-ratio", help="Most of one group's channels that may go (at least one always stays).")] = 0.9,
    round_to: Annotated[int, typer.Option("--round-to", help="Keep channel counts at multiples of N (hardware-friendly).", min=1)] = 1,
    ignore: IgnoreOpt = None,
    scores: Annotated[Path | None, typer.Option("--scores", help="Reuse scores written by `prunecli score -o` for this model instead of scoring again.")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Output file (.safetensors, or .pt with a .json sidecar); default <input>.slim.safetensors beside the input.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")] = False,
    data: DataOpt = None,
    data_root: DataRootOpt = Path("/usr/share/datasets/fashion-mnist"),
    calib_images: CalibImagesOpt = 256,
    batch_size: BatchSizeOpt = 64,
    mean: MeanOpt = None,
    std: StdOpt = None,
    group_reduction: ReductionOpt = Reduction.mean,
    group_scope: GroupScopeOpt = GroupScope.all,
    dct_band: DctBandOpt = "full",
    icie_lambda: IcieLambdaOpt = 1.0,
    icie_capacity: IcieCapacityOpt = "weight",
    recalibrate_bn: Annotated[int, typer.Option("--recalibrate-bn", help="After removal, re-estimate batch-norm statistics on N batches of --data (cheap accuracy recovery).", min=0)] = 0,
    soft_epochs: Annotated[int, typer.Option("--soft-epochs", help="Soft pruning (LRMF/FPGM): train N epochs on --data with the selected channels held at zero, then remove them.", min=0)] = 0,
    reselect_every: Annotated[int, typer.Option("--reselect-every", help="Soft pruning: re-score and re-select channels every K epochs (0: never).", min=0)] = 5,
    lr: Annotated[float, typer.Option("--lr", help="Soft pruning and EDP: peak learning rate (SGD, Nesterov, cosine).")] = 0.01,
    edp_epochs: Annotated[int, typer.Option("--edp-epochs", help="EDP: epochs of decomposed training on --data.", min=1)] = 3,
    edp_lambda: Annotated[float, typer.Option("--edp-lambda", help="EDP: group-lasso strength on the rows and columns of every coefficient matrix (proximal step).", min=0)] = 1e-4,
    edp_threshold: Annotated[float, typer.Option("--edp-threshold", help="EDP: Pruning & Merging also drops coefficient rows/columns with a norm below this.", min=0)] = 5e-3,
    edp_init: Annotated[EdpInit, typer.Option("--edp-init", help="EDP: initialise each block by SVD of the conv weight, or as the weight and an identity.")] = "svd",
    val_data: Annotated[str | None, typer.Option("--val-data", help="EDP: labelled images to validate on after every epoch (same forms as --data).")] = None,
    eval_data: Annotated[str | None, typer.Option("--eval-data", help="Labelled images to measure the top-1 of the original and the slim model on (shown and put in --report), e.g. fashion-mnist:test.")] = None,
    eval_limit: Annotated[int | None, typer.Option("--eval-limit", help="Evaluate on a seeded random subset of N images of --eval-data.", min=1)] = None,
    latency: Annotated[bool, typer.Option("--latency", help="Time the original beside the slim model (median, PyTorch eager and onnxruntime, batch 1 and --latency-batch) and show the speedup next to the MACs ratio.")] = False,
    latency_batch: Annotated[int, typer.Option("--latency-batch", help="The larger batch for --latency.", min=2)] = 16,
    report: Annotated[Path | None, typer.Option("--report", help="Also write the before/after report: .json, .md or a self-contained .html page (by the extension).")] = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    input_shape: InputShapeOpt = None,
    trust_pickle: TrustPickleOpt = False,
    import_path: ImportPathOpt = None,
    timeout: TimeoutOpt = 120.0,
    score_timeout: ScoreTimeoutOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Physically remove channels to reach a MACs, parameter or ratio budget, and write a slim model."""
    budgets = [(k, v) for k, v in (("flops", flops_target), ("params", params_target), ("ratio", ratio)) if v is not None]
    if len(budgets) != 1:
        _fail("give exactly one budget: --flops-target, --params-target or --ratio", 2)

    def call():
        from prunecli.api import default_output, prune_model
        from prunecli.config import DataOptions, PruneConfig, parse_budget
        from prunecli.report import check_report_path, print_json, render_prune, write_report

        if report is not None:
            check_report_path(report, force=force, inputs=(model,), outputs=(output or default_output(model),))
        chosen = method.value if method is not None else ("" if scores else "l1")
        scoring = _scoring(chosen or "l1", data, data_root, calib_images, batch_size, mean, std, group_reduction, device,
                           seed, dct_band, icie_lambda, icie_capacity, group_scope)
        from prunecli.finetune import FinetuneConfig

        soft = None
        if soft_epochs:
            soft = FinetuneConfig(epochs=soft_epochs, lr=lr, batch_size=batch_size, seed=seed, device=scoring.device)

        def labelled(source: str | None) -> DataOptions | None:
            return DataOptions(source, data_root, 1, batch_size, _floats(mean, "--mean"), _floats(std, "--std")) if source else None

        edp = None
        if chosen == "edp":
            from prunecli.config import EdpOptions

            training = FinetuneConfig(epochs=edp_epochs, lr=lr, batch_size=batch_size, seed=seed, device=scoring.device)
            edp = EdpOptions(training, edp_lambda, edp_threshold, edp_init.value, labelled(val_data))
        config = PruneConfig(
            source=_source(model, arch, arch_kwargs, input_shape, trust_pickle, import_path),
            budget=parse_budget(*budgets[0]),
            method=chosen,
            allocation=allocation.value if allocation is not None else ("global" if chosen == "edp" else "uniform"),
            max_layer_ratio=max_layer_ratio,
            round_to=round_to,
            ignore=tuple(ignore or ()),
            group_reduction=scoring.group_reduction,
            group_scope=scoring.group_scope,
            output=output,
            force=force,
            seed=seed,
            device=scoring.device,
            timeout=timeout,
            score_timeout=score_timeout,
            criterion_options=scoring.options,
            data=scoring.data,
            scores=scores,
            recalibrate_bn=recalibrate_bn,
            soft=soft,
            reselect_every=reselect_every,
            edp=edp,
            evaluate=labelled(eval_data),
            eval_limit=eval_limit,
            latency=latency,
            latency_batch=latency_batch,
        )
        with _Progress(not (quiet or as_json), calib_images if data else None) as progress:
            result = prune_model(config, progress=progress.stage, batch_progress=progress.images)
        if report is not None:
            write_report(result, report, force=force, inputs=(model,))
        print_json(result) if as_json else render_prune(result, out)

    _run(call)


class Optimizer(str, Enum):
    sgd = "sgd"
    adamw = "adamw"


class Augment(str, Enum):
    auto = "auto"
    none = "none"


class KD(str, Enum):
    none = "none"
    fixed = "fixed"
    variable = "variable"


class Schedule(str, Enum):
    cosine = "cosine"
    linear = "linear"
    step = "step"
    constant = "constant"


@app.command()
def evaluate(
    model: ModelArg,
    data: Annotated[str, typer.Option("--data", help="Labelled images: fashion-mnist[:train|test], an image folder (one sub-folder per class) or a tensor file with 'images' and 'labels'.")] = "fashion-mnist:test",
    compare: Annotated[Path | None, typer.Option("--compare", help="Evaluate this original model too and show both side by side.")] = None,
    compare_arch: Annotated[str | None, typer.Option("--compare-arch", help="--arch of the --compare model when it is a plain state dict (default: the model's base architecture).")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Evaluate a seeded random subset of N images (default: all).", min=1)] = None,
    data_root: DataRootOpt = Path("/usr/share/datasets/fashion-mnist"),
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.", min=1)] = 256,
    mean: MeanOpt = None,
    std: StdOpt = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    input_shape: InputShapeOpt = None,
    trust_pickle: TrustPickleOpt = False,
    import_path: ImportPathOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Top-1/top-5 accuracy, loss and images/s on labelled data; with --compare, the original beside it."""

    def call():
        from prunecli.api import evaluate_model, resolve_device
        from prunecli.config import DataOptions, EvaluateConfig, ModelSource
        from prunecli.report import print_json, render_evaluate

        source = _source(model, arch, arch_kwargs, input_shape, trust_pickle, import_path)
        other = None
        if compare is not None:
            other = ModelSource(compare, compare_arch, source.arch_kwargs if compare_arch else {}, source.input_shape,
                                trust_pickle, source.import_paths)
        options = DataOptions(data, data_root, 1, batch_size, _floats(mean, "--mean"), _floats(std, "--std"))
        config = EvaluateConfig(source, options, limit, str(resolve_device(device)), other, seed)
        result = evaluate_model(config)
        print_json(result) if as_json else render_evaluate(result, out)

    _run(call)


@app.command()
def finetune(
    model: ModelArg,
    data: Annotated[str, typer.Option("--data", help="Labelled training images: fashion-mnist[:train], an image folder or a tensor file.")] = "fashion-mnist:train",
    val_data: Annotated[str | None, typer.Option("--val-data", help="Labelled validation images, evaluated each epoch; the best epoch is kept.")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Output .safetensors (default <input>.ft.safetensors beside the input).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output (and checkpoint) file.")] = False,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the training data.", min=1)] = 1,
    steps: Annotated[int | None, typer.Option("--steps", help="Total optimizer steps instead of --epochs.", min=1)] = None,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (after warm-up, then cosine decay).")] = 0.01,
    optimizer: Annotated[Optimizer, typer.Option("--optimizer", help="sgd (Nesterov momentum) or adamw.")] = Optimizer.sgd,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="On weights, not on biases and norms.")] = 5e-4,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", help="Cross-entropy label smoothing.")] = 0.0,
    warmup_epochs: Annotated[float, typer.Option("--warmup-epochs", help="Linear warm-up length in epochs (fractions allowed).")] = 0.0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Global batch size (split across processes under torchrun).", min=1)] = 128,
    augment: Annotated[Augment, typer.Option("--augment", help="auto: random crop + horizontal flip; none: the images as they are (recovered more in a single epoch, docs/quality.md).")] = Augment.auto,
    teacher: Annotated[Path | None, typer.Option("--teacher", help="Distil from this model (usually the unpruned original).")] = None,
    teacher_arch: Annotated[str | None, typer.Option("--teacher-arch", help="--arch of the teacher when it is a plain state dict (default: the model's base architecture).")] = None,
    kd: Annotated[KD | None, typer.Option("--kd", help="Distillation: fixed temperature or SFP's variable schedule (default variable with --teacher).")] = None,
    kd_alpha: Annotated[float, typer.Option("--kd-alpha", help="Weight of the distillation term.")] = 0.7,
    kd_t_max: Annotated[float, typer.Option("--kd-t-max", help="Temperature at the start (the fixed temperature with --kd fixed).")] = 4.0,
    kd_t_min: Annotated[float, typer.Option("--kd-t-min", help="Temperature at the end (variable).")] = 1.0,
    kd_schedule: Annotated[Schedule, typer.Option("--kd-schedule", help="Shape of the variable temperature.")] = Schedule.cosine,
    recalibrate_bn: Annotated[int, typer.Option("--recalibrate-bn", help="Re-estimate batch-norm statistics on N batches before training.", min=0)] = 0,
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="Save the resume state here every epoch.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run saved in --checkpoint.")] = False,
    amp: Annotated[str, typer.Option("--amp", help="Mixed precision: auto (CUDA only), on or off.")] = "auto",
    limit: Annotated[int | None, typer.Option("--limit", help="Train on a seeded subset of N images.", min=1)] = None,
    val_limit: Annotated[int | None, typer.Option("--val-limit", help="Validate on a seeded subset of N images.", min=1)] = None,
    data_root: DataRootOpt = Path("/usr/share/datasets/fashion-mnist"),
    mean: MeanOpt = None,
    std: StdOpt = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    input_shape: InputShapeOpt = None,
    trust_pickle: TrustPickleOpt = False,
    import_path: ImportPathOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Recover accuracy after pruning: train (optionally distilling from the original), keep the best epoch,
    write a slim model whose metadata records the run. Runs under torchrun with DDP."""

    def call():
        from prunecli.api import finetune_model
        from prunecli.config import DataOptions, FinetuneJob, ModelSource
        from prunecli.finetune import FinetuneConfig
        from prunecli.report import print_json, render_finetune

        source = _source(model, arch, arch_kwargs, input_shape, trust_pickle, import_path)
        mean_values, std_values = _floats(mean, "--mean"), _floats(std, "--std")
        training = FinetuneConfig(
            epochs=epochs, steps=steps, lr=lr, optimizer=optimizer.value, weight_decay=weight_decay,
            label_smoothing=label_smoothing, warmup_epochs=warmup_epochs, batch_size=batch_size, seed=seed,
            device=device, amp=amp, augment=augment.value, kd=(kd.value if kd else ("variable" if teacher else "none")), kd_alpha=kd_alpha,
            kd_t_max=kd_t_max, kd_t_min=kd_t_min, kd_schedule=kd_schedule.value, recalibrate_bn=recalibrate_bn,
            checkpoint=checkpoint, resume=resume, force=force,
        )
        job = FinetuneJob(
            source=source,
            train=DataOptions(data, data_root, 1, batch_size, mean_values, std_values),
            training=training,
            val=DataOptions(val_data, data_root, 1, batch_size, mean_values, std_values) if val_data else None,
            teacher=ModelSource(teacher, teacher_arch, {}, source.input_shape, trust_pickle, source.import_paths) if teacher else None,
            output=output,
            force=force,
            train_limit=limit,
            val_limit=val_limit,
        )
        with _Progress(not (quiet or as_json)) as progress:
            result = finetune_model(job, progress=progress.stage)
        print_json(result) if as_json else render_finetune(result, out)

    _run(call)


class ExportFormat(str, Enum):
    onnx = "onnx"
    safetensors = "safetensors"
    torchscript = "torchscript"


class Exporter(str, Enum):
    auto = "auto"
    legacy = "legacy"
    dynamo = "dynamo"


class DType(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


@app.command()
def export(
    model: ModelArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output file: .onnx, .safetensors, or .pt/.ts for TorchScript.")],
    format: Annotated[ExportFormat, typer.Option("--format", "-f", help="onnx (checked, verified against onnxruntime), safetensors (slim re-write) or torchscript.")] = ExportFormat.onnx,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Compare the exported model's outputs with PyTorch's on random (and --data) inputs; fail above --atol.")] = True,
    atol: Annotated[float, typer.Option("--atol", help="Largest absolute output difference --verify accepts.")] = 1e-4,
    opset: Annotated[int | None, typer.Option("--opset", help="ONNX opset (legacy exporter 7-20, dynamo 18-23).")] = None,
    exporter: Annotated[Exporter, typer.Option("--exporter", help="ONNX exporter: legacy (TorchScript-based, fast), dynamo, or auto (legacy, falling back to dynamo with the reason reported).")] = Exporter.auto,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch", help="Make the batch dimension dynamic.")] = False,
    dtype: Annotated[DType, typer.Option("--dtype", help="safetensors: store weights as fp32, fp16 or bf16.")] = DType.fp32,
    data: DataOpt = None,
    data_root: DataRootOpt = Path("/usr/share/datasets/fashion-mnist"),
    calib_images: Annotated[int, typer.Option("--calib-images", help="Real images to verify with (from --data).", min=1)] = 32,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")] = False,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    input_shape: InputShapeOpt = None,
    trust_pickle: TrustPickleOpt = False,
    import_path: ImportPathOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a deployable file: ONNX verified against onnxruntime, a slim safetensors copy, or TorchScript."""

    def call():
        from prunecli.api import export_artifact
        from prunecli.config import DataOptions, ExportJob
        from prunecli.export import ExportConfig
        from prunecli.report import print_json, render_export

        config = ExportConfig(format=format.value, output=output, opset=opset, dynamic_batch=dynamic_batch,
                              exporter=exporter.value, verify=verify, atol=atol, dtype=dtype.value, force=force)
        job = ExportJob(
            _source(model, arch, arch_kwargs, input_shape, trust_pickle, import_path),
            config,
            DataOptions(data, data_root, calib_images, calib_images) if data else None,
        )
        result = export_artifact(job)
        print_json(result) if as_json else render_export(result, out)

    _run(call)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
