"""One vocabulary of options for every command: the same concept has the same flag, help and panel everywhere.

Spellings a release used before the vocabulary settled stay accepted as hidden aliases (:func:`either`), so that
scripts keep working; ``--help`` shows only the current names. docs/architecture.md lists them.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from prunecli.errors import PrunecliError

# help panels, in the order a reader needs them
MODEL, BUDGET, CRITERION, DATA, RECOVERY, OUTPUT, RUN = "Model", "Budget", "Criterion", "Data", "Recovery", "Output", "Run"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _methods() -> list[str]:
    from prunecli.criteria import list_criteria

    return list_criteria()


Method = Enum("Method", {name: name for name in _methods()}, type=str)
# prune also takes EDP, a training-time method (prunecli/methods/edp.py) rather than a scoring criterion
PruneMethod = Enum("PruneMethod", {**{name: name for name in _methods()}, "edp": "edp"}, type=str)


def methods_help() -> str:
    """The criteria table for `score --help`, straight from the registry."""
    from prunecli.criteria import get_criterion

    lines = []
    for name in _methods():
        criterion = get_criterion(name)
        needs = " \\[needs --data]" if criterion.needs_data else ""  # escaped: rich would read [needs ...] as markup
        needs += " (takes --group-scope)" if criterion.group_members else ""
        lines.append(f"[bold]{name}[/]: {criterion.summary}{needs} — {criterion.paper}")
    return "\n\n".join(lines)


class Allocation(str, Enum):
    uniform = "uniform"
    global_ = "global"
    efficiency = "efficiency"
    dispersion = "dispersion"
    sensitivity = "sensitivity"


class LatencyRuntime(str, Enum):
    onnxruntime = "onnxruntime"
    torch = "torch"


class Reduction(str, Enum):
    mean = "mean"
    max = "max"
    sum = "sum"


class GroupScope(str, Enum):
    producers = "producers"
    all = "all"


class DctBand(str, Enum):
    full = "full"
    low = "low"


class IcieCapacity(str, Enum):
    weight = "weight"
    feature = "feature"


class EdpInit(str, Enum):
    svd = "svd"
    identity = "identity"


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


class Amp(str, Enum):
    auto = "auto"
    on = "on"
    off = "off"


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


# ----------------------------------------------------------------------------- Model

ModelArg = Annotated[Path, typer.Argument(help="Model file: prunecli .safetensors, a state dict (.safetensors/.pt/.pth) or a pickled model.", show_default=False)]
ArchOpt = Annotated[str | None, typer.Option("--arch", help="Base architecture: torchvision:resnet50, timm:resnet50 (pip install prunecli[timm]), sample:resnet20, pkg.module:factory or file.py:factory. Detected for torchvision weights, timm weights where unambiguous, and slim files.", rich_help_panel=MODEL)]
ArchKwargsOpt = Annotated[str | None, typer.Option("--arch-kwargs", help='JSON keyword arguments for the factory, e.g. \'{"num_classes": 10}\' (also used for a companion model given with its own --*-arch).', rich_help_panel=MODEL)]
InputShapeOpt = Annotated[str | None, typer.Option("--input-shape", help="Input CxHxW, e.g. 3x224x224 (default: by architecture, or stored in slim files).", rich_help_panel=MODEL)]
TrustPickleOpt = Annotated[bool, typer.Option("--trust-pickle", help="Allow full pickles that name your own classes. Unpickling runs code from the file: only for files you trust.", rich_help_panel=MODEL)]
ImportPathOpt = Annotated[list[Path] | None, typer.Option("--import-path", help="Folder added to sys.path so your classes and pkg.module:factory architectures resolve (repeatable).", rich_help_panel=MODEL)]
CompareArchOpt = Annotated[str | None, typer.Option("--compare-arch", help="--arch of the --compare model when it is a plain state dict (default: the model's base architecture).", rich_help_panel=MODEL)]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N: where scoring, training and evaluation run.", rich_help_panel=RUN)]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed: random criterion, image subsets, training.", rich_help_panel=RUN)]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds allowed for tracing the model's dependencies.", min=1, rich_help_panel=RUN)]
ScoreTimeoutOpt = Annotated[float | None, typer.Option("--score-timeout", help="Seconds allowed for scoring (the pass over --data for data-driven methods); default: no limit.", min=1, rich_help_panel=RUN)]

# ----------------------------------------------------------------------------- Budget

IgnoreOpt = Annotated[list[str] | None, typer.Option("--ignore", help="Glob of layer names whose output channels stay (repeatable). The layers that feed the model output are always kept.", rich_help_panel=BUDGET)]

# ----------------------------------------------------------------------------- Criterion

ReductionOpt = Annotated[Reduction, typer.Option("--group-reduction", help="How the layers of a coupled group combine their (per-layer normalised) scores.", rich_help_panel=CRITERION)]
GroupScopeOpt = Annotated[GroupScope, typer.Option("--group-scope", help="Weight criteria marked (takes --group-scope) in `score --help`: [bold]producers[/] scores the output filters of the layers that make a group's channels; [bold]all[/] scores every member of the coupled group as Torch-Pruning's group importance does: those filters, the norms' |gamma| and every consumer's input slice, each normalised, then --group-reduction. Other criteria ignore it.", rich_help_panel=CRITERION)]
DctBandOpt = Annotated[DctBand, typer.Option("--dct-band", help="dct: 'full' spectrum energy (the authors' code) or 'low' frequency block [INFERRED].", rich_help_panel=CRITERION)]
IcieLambdaOpt = Annotated[float, typer.Option("--icie-lambda", help="icie: weight of information independence against capacity [INFERRED].", rich_help_panel=CRITERION)]
IcieCapacityOpt = Annotated[IcieCapacity, typer.Option("--icie-capacity", help="icie: information capacity from the filters' 'weight' entropy (data-free) or the 'feature' entropy of the activation maps (needs --data) [INFERRED].", rich_help_panel=CRITERION)]

# ----------------------------------------------------------------------------- Data

DataOpt = Annotated[str | None, typer.Option("--data", help="Calibration images for data-driven methods: an image folder, a tensor file (.safetensors/.pt/.npz with 'images' [N,C,H,W] and optional 'labels'), or fashion-mnist[:train|test].", rich_help_panel=DATA)]
DataRootOpt = Annotated[Path, typer.Option("--data-root", help="Folder of the Fashion-MNIST IDX files.", rich_help_panel=DATA)]
CalibImagesOpt = Annotated[int, typer.Option("--calib-images", help="Calibration images to score with (a seeded random subset of --data).", min=1, rich_help_panel=DATA)]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Images per forward (and backward) pass: scoring, training, evaluation.", min=1, rich_help_panel=DATA)]
MeanOpt = Annotated[str | None, typer.Option("--mean", help="Per-channel mean for image folders, e.g. 0.485,0.456,0.406 (default: the model's).", rich_help_panel=DATA)]
StdOpt = Annotated[str | None, typer.Option("--std", help="Per-channel std for image folders, e.g. 0.229,0.224,0.225.", rich_help_panel=DATA)]
ValDataOpt = Annotated[str | None, typer.Option("--val-data", help="Labelled images validated on after every training epoch (same forms as --data).", rich_help_panel=DATA)]
EvalLimitOpt = Annotated[int | None, typer.Option("--eval-limit", help="Evaluate on a seeded random subset of N images (default: all).", min=1, rich_help_panel=DATA)]
OldLimitOpt = Annotated[int | None, typer.Option("--limit", hidden=True, min=1)]  # before --eval-limit / --train-limit

# ----------------------------------------------------------------------------- Output

OutputOpt = Annotated[Path | None, typer.Option("-o", "--output", help="Output file.", rich_help_panel=OUTPUT)]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.", rich_help_panel=OUTPUT)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout and nothing else.", rich_help_panel=OUTPUT)]
QuietOpt = Annotated[bool, typer.Option("-q", "--quiet", help="No progress output.", rich_help_panel=OUTPUT)]
LatencyOpt = Annotated[bool, typer.Option("--latency", help="Time the model (median, PyTorch eager and onnxruntime, batch 1 and --latency-batch); with an original beside it, the speedup next to the MACs ratio.", rich_help_panel=OUTPUT)]
LatencyBatchOpt = Annotated[int, typer.Option("--latency-batch", help="The larger batch for --latency.", min=2, rich_help_panel=OUTPUT)]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="Intra-op threads of every timing (--latency, --latency-target); default: onnxruntime the CPU count, torch its own setting.", min=1, rich_help_panel=RUN)]


def either(new: object, old: object, new_flag: str, old_flag: str) -> object:
    """The value of an option given under its name or under a hidden old spelling, not both."""
    if old is None:
        return new
    if new is not None and new != old:
        raise PrunecliError(f"{old_flag} is the old name of {new_flag}; give only {new_flag}")
    return old


def floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise PrunecliError(f"{option} {text!r} must be comma-separated numbers, e.g. 0.485,0.456,0.406") from None


def model_source(model, arch, arch_kwargs, input_shape, trust_pickle, import_path):
    """``ModelSource`` of the model argument and the Model options."""
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


def companion_source(path: Path | None, arch: str | None, source):
    """A second model (``--compare``, ``--teacher``), read like the first: the same input shape, trust and import
    paths, and ``--arch-kwargs`` with its own ``--*-arch`` (without one it takes the first model's base
    architecture and keyword arguments)."""
    from prunecli.config import ModelSource

    if path is None:
        return None
    return ModelSource(path, arch, dict(source.arch_kwargs) if arch else {}, source.input_shape, source.trust_pickle,
                       source.import_paths)


def data_options(source: str | None, data_root: Path, images: int, batch_size: int, mean: str | None, std: str | None):
    """``DataOptions`` of one data option (``--data``, ``--val-data``, ...) and the shared Data options."""
    from prunecli.config import DataOptions

    if source is None:
        return None
    return DataOptions(source, data_root, images, batch_size, floats(mean, "--mean"), floats(std, "--std"))


def scoring_options(method, data, data_root, calib_images, batch_size, mean, std, group_reduction, device, seed, dct_band,
                    icie_lambda, icie_capacity, group_scope):
    """``ScoringOptions`` of the Criterion and Data options."""
    from prunecli.config import ScoringOptions
    from prunecli.runtime import resolve_device

    return ScoringOptions(
        method=method,
        options={"dct_band": dct_band.value, "icie_lambda": icie_lambda, "icie_capacity": icie_capacity.value},
        data=data_options(data, data_root, calib_images, batch_size, mean, std),
        group_reduction=group_reduction.value,
        device=str(resolve_device(device)),
        seed=seed,
        group_scope=group_scope.value,
    )
