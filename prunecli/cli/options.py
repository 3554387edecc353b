"""One vocabulary of options for every command: the same concept has the same flag, help and panel everywhere.

Options that travel together (the model and how to read it, the criterion's options, how images are found and
normalised, how a command runs and reports) are declared once as a block, a function whose parameters are the
options and whose result is the config part they make; :func:`with_options` gives a command the blocks it needs.
The choices of every closed set come from the library's own tuples and registries. Spellings a release used before
the vocabulary settled stay accepted as hidden aliases (:func:`either`); docs/architecture.md lists them.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from prunecli.cli.boundary import run, state
from prunecli.config import (
    ALLOCATIONS,
    AMP_MODES,
    AUGMENTS,
    EDP_INITS,
    FASHION_MNIST_ROOT,
    GROUP_SCOPE,
    GROUP_SCOPES,
    KD_MODES,
    KD_SCHEDULES,
    LATENCY_BATCH,
    LATENCY_RUNTIMES,
    OPTIMIZERS,
    REDUCTIONS,
    DataOptions,
    ModelSource,
    RunOptions,
)
from prunecli.criteria import get_criterion, list_criteria
from prunecli.criteria.dct import BANDS
from prunecli.criteria.icie import CAPACITIES
from prunecli.errors import OptionError
from prunecli.export.config import DTYPES, EXPORTERS, FORMATS
from prunecli.pipeline.scoring import TRAINED_METHOD

# help panels, in the order a reader needs them
PANELS = MODEL, BUDGET, CRITERION, DATA, RECOVERY, OUTPUT, RUN = (
    "Model", "Budget", "Criterion", "Data", "Recovery", "Output", "Run")


def choices(name: str, values: Iterable[str]) -> type[Enum]:
    """The Typer choice type of a closed set the library defines (its tuple or registry is the one source)."""
    return Enum(name, {value: value for value in values}, type=str)


Method = choices("Method", list_criteria())
PruneMethod = choices("PruneMethod", [*list_criteria(), TRAINED_METHOD])  # prune also trains with EDP
Allocation = choices("Allocation", ALLOCATIONS)
LatencyRuntime = choices("LatencyRuntime", LATENCY_RUNTIMES)
Reduction = choices("Reduction", REDUCTIONS)
GroupScope = choices("GroupScope", GROUP_SCOPES)
DctBand = choices("DctBand", BANDS)
IcieCapacity = choices("IcieCapacity", CAPACITIES)
EdpInit = choices("EdpInit", EDP_INITS)
Optimizer = choices("Optimizer", OPTIMIZERS)
Augment = choices("Augment", AUGMENTS)
KD = choices("KD", KD_MODES)
Schedule = choices("Schedule", KD_SCHEDULES)
Amp = choices("Amp", AMP_MODES)
ExportFormat = choices("ExportFormat", FORMATS)
Exporter = choices("Exporter", EXPORTERS)
DType = choices("DType", DTYPES)


def methods_help() -> str:
    """The criteria table for `score --help`, straight from the registry."""
    lines = []
    for name in list_criteria():
        criterion = get_criterion(name)
        needs = " \\[needs --data]" if criterion.needs_data else ""  # escaped: rich would read [needs ...] as markup
        needs += " (takes --group-scope)" if criterion.group_members else ""
        lines.append(f"[bold]{name}[/]: {criterion.summary}{needs} — {criterion.paper}")
    return "\n\n".join(lines)


# ----------------------------------------------------------------------------- options used alone

CompareArchOpt = Annotated[str | None, typer.Option("--compare-arch", help="--arch of the --compare model when it is a plain state dict (default: the model's base architecture).", rich_help_panel=MODEL)]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds allowed for tracing the model's dependencies.", min=1, rich_help_panel=RUN)]
ScoreTimeoutOpt = Annotated[float | None, typer.Option("--score-timeout", help="Seconds allowed for each pass over the calibration images (scoring, sensitivity, reconstruction); default: no limit.", min=1, rich_help_panel=RUN)]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="Intra-op threads of every timing (--latency, --latency-target); default: onnxruntime the CPU count, torch its own setting.", min=1, rich_help_panel=RUN)]
IgnoreOpt = Annotated[list[str] | None, typer.Option("--ignore", help="Glob of layer names whose output channels stay (repeatable). The layers that feed the model output are always kept.", rich_help_panel=BUDGET)]
DataOpt = Annotated[str | None, typer.Option("--data", help="Calibration images for data-driven methods: an image folder, a tensor file (.safetensors/.pt/.npz with 'images' [N,C,H,W] and optional 'labels'), or fashion-mnist[:train|test].", rich_help_panel=DATA)]
CalibImagesOpt = Annotated[int, typer.Option("--calib-images", help="Calibration images (a seeded random subset of --data): scored with, measured on, recalibrated and reconstructed on.", min=1, rich_help_panel=DATA)]
ValDataOpt = Annotated[str | None, typer.Option("--val-data", help="Labelled images validated on after every training epoch (same forms as --data).", rich_help_panel=DATA)]
EvalLimitOpt = Annotated[int | None, typer.Option("--eval-limit", help="Evaluate on a seeded random subset of N images (default: all).", min=1, rich_help_panel=DATA)]
OldLimitOpt = Annotated[int | None, typer.Option("--limit", hidden=True, min=1)]  # before --eval-limit / --train-limit
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.", rich_help_panel=OUTPUT)]
LatencyOpt = Annotated[bool, typer.Option("--latency", help="Time the model (median, PyTorch eager and onnxruntime, at batch 1 and --latency-batch); with an original beside it, the speedup next to the MACs ratio.", rich_help_panel=OUTPUT)]
LatencyBatchOpt = Annotated[int, typer.Option("--latency-batch", help=f"The batch latency is measured at, besides batch 1: --latency times both, --latency-target is measured at it (default {LATENCY_BATCH}).", min=1, rich_help_panel=BUDGET)]


# ----------------------------------------------------------------------------- blocks of options


def model_options(
    model: Annotated[Path, typer.Argument(help="Model file: prunecli .safetensors, a state dict (.safetensors/.pt/.pth, a Lightning .ckpt), a pickled model, or a Hugging Face folder (config.json + weights; pip install prunecli\\[hf]).", show_default=False)],
    arch: Annotated[str | None, typer.Option("--arch", help="Base architecture: torchvision:resnet50, timm:resnet50 (pip install prunecli\\[timm]), sample:resnet20, pkg.module:factory or file.py:factory. Detected for torchvision weights, timm weights where unambiguous, and slim files.", rich_help_panel=MODEL)] = None,
    arch_kwargs: Annotated[str | None, typer.Option("--arch-kwargs", help='JSON keyword arguments for the factory, e.g. \'{"num_classes": 10}\' (also used for a companion model given with its own --*-arch).', rich_help_panel=MODEL)] = None,
    input_shape: Annotated[str | None, typer.Option("--input-shape", help="Input CxHxW, e.g. 3x224x224 (CxTxHxW for video; default: by architecture, or stored in slim files).", rich_help_panel=MODEL)] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", "--trust-remote-code", help="Run code the model names: full pickles of your own classes, a Hugging Face folder's own code (auto_map). Either runs code from the file: only for files you trust.", rich_help_panel=MODEL)] = False,
    import_path: Annotated[list[Path] | None, typer.Option("--import-path", help="Folder added to sys.path so your classes and pkg.module:factory architectures resolve (repeatable).", rich_help_panel=MODEL)] = None,
) -> ModelSource:
    """The model argument and how to read it."""
    from prunecli.io.arch import parse_arch_kwargs, parse_input_shape

    return ModelSource(path=model, arch=arch, arch_kwargs=parse_arch_kwargs(arch_kwargs),
                       input_shape=parse_input_shape(input_shape) if input_shape else None, trust_pickle=trust_pickle,
                       import_paths=tuple(import_path or ()))


def companion_source(path: Path | None, arch: str | None, source: ModelSource) -> ModelSource | None:
    """A second model (``--compare``, ``--teacher``), read like the first: the same input shape, trust and import
    paths, and ``--arch-kwargs`` with its own ``--*-arch`` (without one it takes the first model's base
    architecture and keyword arguments)."""
    if path is None:
        return None
    return ModelSource(path, arch, dict(source.arch_kwargs) if arch else {}, source.input_shape, source.trust_pickle,
                       source.import_paths)


@dataclass(frozen=True)
class Images:
    """Where images are found and how they are normalised; :meth:`options` makes the ``DataOptions`` of one data
    option (``--data``, ``--val-data``, ``--eval-data``)."""

    root: Path
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    def options(self, source: str | None, images: int = 1, batch_size: int = 64) -> DataOptions | None:
        return None if source is None else DataOptions(source, self.root, images, batch_size, self.mean, self.std)

    def labelled(self, source: str | None, batch_size: int) -> DataOptions:
        """``evaluate``'s and ``finetune``'s ``--data``: the images given, or none, for the library to decide by the
        model's input (:meth:`DataOptions.for_model`: Fashion-MNIST only for a 1x28x28 model)."""
        return DataOptions(source, self.root, 1, batch_size, self.mean, self.std)


def image_options(
    data_root: Annotated[Path, typer.Option("--data-root", help="Folder of the Fashion-MNIST IDX files.", rich_help_panel=DATA)] = FASHION_MNIST_ROOT,
    mean: Annotated[str | None, typer.Option("--mean", help="Per-channel mean for image folders, e.g. 0.485,0.456,0.406 (default: the model's).", rich_help_panel=DATA)] = None,
    std: Annotated[str | None, typer.Option("--std", help="Per-channel std for image folders, e.g. 0.229,0.224,0.225.", rich_help_panel=DATA)] = None,
) -> Images:
    """How every data option of a command finds and normalises its images."""
    return Images(data_root, floats(mean, "--mean"), floats(std, "--std"))


def criterion_options(
    group_reduction: Annotated[Reduction, typer.Option("--group-reduction", help="How the layers of a coupled group combine their (per-layer normalised) scores.", rich_help_panel=CRITERION)] = "mean",
    group_scope: Annotated[GroupScope, typer.Option("--group-scope", help="Weight criteria marked (takes --group-scope) in `score --help`: [bold]producers[/] scores the output filters of the layers that make a group's channels; [bold]all[/] scores every member of the coupled group as Torch-Pruning's group importance does: those filters, the norms' |gamma| and every consumer's input slice, each normalised, then --group-reduction. Other criteria ignore it.", rich_help_panel=CRITERION)] = GROUP_SCOPE,
    dct_band: Annotated[DctBand, typer.Option("--dct-band", help="dct: 'full' spectrum energy (the authors' code) or 'low' frequency block [INFERRED].", rich_help_panel=CRITERION)] = "full",
    icie_lambda: Annotated[float, typer.Option("--icie-lambda", help="icie: weight of information independence against capacity [INFERRED].", rich_help_panel=CRITERION)] = 1.0,
    icie_capacity: Annotated[IcieCapacity, typer.Option("--icie-capacity", help="icie: information capacity from the filters' 'weight' entropy (data-free) or the 'feature' entropy of the activation maps (needs --data) [INFERRED].", rich_help_panel=CRITERION)] = "weight",
) -> dict:
    """The ``ScoringOptions`` fields the criterion's options give (the method is each command's own)."""
    return {"options": {"dct_band": _value(dct_band), "icie_lambda": icie_lambda, "icie_capacity": _value(icie_capacity)},
            "group_reduction": _value(group_reduction), "group_scope": _value(group_scope)}


def run_options(
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N: where scoring, training and evaluation run.", rich_help_panel=RUN)] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Random seed: random criterion, image subsets, training.", rich_help_panel=RUN)] = 0,
) -> RunOptions:
    """The device (resolved: ``auto`` is CUDA when there is one) and seed; commands add their time limits."""
    from prunecli.runtime import resolve_device

    return RunOptions(seed=seed, device=str(resolve_device(device)))


@dataclass(frozen=True)
class Reporting:
    """How a command reports: one JSON document, or only errors and the final summary, or everything."""

    json: bool
    quiet: bool

    @property
    def progress(self) -> bool:
        return not (self.json or self.quiet)


def reporting_options(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout and nothing else.", rich_help_panel=OUTPUT)] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Only errors and the final summary line.", rich_help_panel=OUTPUT)] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.", rich_help_panel=RUN)] = False,
) -> Reporting:
    state["debug"] = state["debug"] or debug
    return Reporting(as_json, quiet)


def with_options(**blocks: Callable) -> Callable:
    """Give a command the options of each block and pass it what the block builds, under the block's name.

    The command runs inside :func:`~prunecli.cli.boundary.run`, blocks included, so a malformed value a block
    rejects is a one-line usage error like any other."""

    def decorate(command: Callable) -> Callable:
        params, names = [], {}
        for name, builder in (*blocks.items(), (None, command)):
            hints = typing.get_type_hints(builder, include_extras=True)
            own = [p for p in inspect.signature(builder).parameters.values() if p.name not in blocks]
            params += [p.replace(annotation=hints[p.name], kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
            if name is not None:
                names[name] = (builder, [p.name for p in own])

        @functools.wraps(command)
        def wrapper(**options):
            def call():
                built = {name: builder(**{n: options.pop(n) for n in own}) for name, (builder, own) in names.items()}
                return command(**options, **built)

            return run(call)

        params.sort(key=_panel_rank)  # --help shows the panels in the order a reader needs them
        wrapper.__signature__ = inspect.Signature(params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate


def _panel_rank(param: inspect.Parameter) -> int:
    """Where a parameter's help panel comes: arguments and unpanelled options first, then :data:`PANELS`."""
    panels = [getattr(info, "rich_help_panel", None) for info in typing.get_args(param.annotation)[1:]]
    return next((PANELS.index(panel) + 1 for panel in panels if panel in PANELS), 0)


def _value(choice: Enum | str) -> str:
    return choice.value if isinstance(choice, Enum) else choice


def either(new: object, old: object, new_flag: str, old_flag: str) -> object:
    """The value of an option given under its name or under a hidden old spelling, not both."""
    if old is None:
        return new
    if new is not None and new != old:
        raise OptionError(f"{old_flag} is the old name of {new_flag}; give only {new_flag}")
    return old


def floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise OptionError(f"{option} {text!r} must be comma-separated numbers, e.g. 0.485,0.456,0.406") from None
