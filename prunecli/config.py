"""Frozen configs for each command, and budget parsing ("0.5", "50%", "2.1G")."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunecli.errors import BudgetError, PrunecliError

# --group-scope: the weight criteria score the producers' filters only, or every member of a coupled group
GROUP_SCOPES = ("producers", "all")
GROUP_SCOPE = "all"


def _check_scope(scope: str) -> None:
    if scope not in GROUP_SCOPES:
        raise PrunecliError(f"--group-scope {scope!r} is not one of {', '.join(GROUP_SCOPES)}")


_SUFFIX = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([%KMGT]?)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    """What to keep: ``kind`` is "flops", "params" or "ratio" (share of each layer's channels removed).

    For flops/params, ``value`` is a fraction of the original to keep when ``absolute`` is false, else
    a count (MACs or parameters). For ratio it is the fraction removed.
    """

    kind: str
    value: float
    absolute: bool = False
    text: str = ""

    def target(self, original: float) -> float:
        """The cost to reach, given the original model's cost."""
        if self.absolute:
            if self.value >= original:
                raise BudgetError(
                    f"--{self.kind}-target {self.text} is not below the model's own {original:.4g}; ask for less"
                )
            return self.value
        return self.value * original if self.kind != "ratio" else (1 - self.value) * original

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_budget(kind: str, text: str) -> Budget:
    """Parse a budget option. Fractions must lie strictly between 0 and 1."""
    option = "--ratio" if kind == "ratio" else f"--{kind}-target"
    match = _NUMBER.match(str(text))
    if not match:
        raise BudgetError(f"{option} {text!r} is not a number; use a fraction (0.5), a percentage (50%) or a count (2.1G)")
    number, suffix = float(match.group(1)), match.group(2).upper()
    if suffix == "%":
        number, suffix = number / 100, ""
    absolute = suffix != "" or number > 1
    if kind == "ratio" and absolute:
        raise BudgetError(f"{option} {text!r} must be a fraction of channels to remove, between 0 and 1 (e.g. 0.3)")
    if absolute and suffix == "" and number < 1000:
        raise BudgetError(
            f"{option} {text!r} is neither a fraction nor a plausible count; use 0.5, 50% or a count such as 2.1G"
        )
    if absolute:
        return Budget(kind, number * _SUFFIX[suffix], True, str(text))
    if not 0 < number < 1:
        raise BudgetError(f"{option} {text!r} must lie strictly between 0 and 1 (or be a count such as 2.1G)")
    return Budget(kind, number, False, str(text))


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from and how to read it."""

    path: Path
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, int, int] | None = None
    trust_pickle: bool = False
    import_paths: tuple[Path, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["path"] = str(self.path)
        data["import_paths"] = [str(p) for p in self.import_paths]
        return data


@dataclass(frozen=True)
class DataOptions:
    """Calibration data for data-driven criteria (``--data`` and friends)."""

    source: str
    root: Path = Path("/usr/share/datasets/fashion-mnist")
    calib_images: int = 256
    batch_size: int = 64
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.calib_images < 1:
            raise BudgetError(f"--calib-images {self.calib_images} must be at least 1")
        if self.batch_size < 1:
            raise BudgetError(f"--batch-size {self.batch_size} must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["root"] = str(self.root)
        return data


@dataclass(frozen=True)
class ScoringOptions:
    """How channels are scored: the criterion, its options and, for data-driven ones, the data."""

    method: str = "l1"
    options: dict[str, Any] = field(default_factory=dict)
    data: DataOptions | None = None
    group_reduction: str = "mean"
    device: str = "cpu"
    seed: int = 0
    group_scope: str = GROUP_SCOPE  # weight criteria: "producers" (their output filters) or "all" group members

    def __post_init__(self):
        _check_scope(self.group_scope)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["data"] = self.data.to_dict() if self.data else None
        return data


@dataclass(frozen=True)
class ScoreConfig:
    source: ModelSource
    scoring: ScoringOptions
    output: Path | None = None
    force: bool = False
    ignore: tuple[str, ...] = ()
    preview: Budget | None = None
    timeout: float | None = 120.0
    score_timeout: float | None = None  # seconds allowed for scoring; None: no limit


@dataclass(frozen=True)
class EvaluateConfig:
    source: ModelSource
    data: DataOptions
    limit: int | None = None  # images to evaluate (a seeded subset); None = all
    device: str = "cpu"
    compare: ModelSource | None = None
    seed: int = 0


@dataclass(frozen=True)
class FinetuneJob:
    """``finetune``: which model, which data, how (a ``prunecli.finetune.FinetuneConfig``) and where to write."""

    source: ModelSource
    train: DataOptions
    training: Any  # prunecli.finetune.FinetuneConfig, kept untyped so this module imports no torch
    val: DataOptions | None = None
    teacher: ModelSource | None = None
    output: Path | None = None
    force: bool = False
    train_limit: int | None = None
    val_limit: int | None = None


@dataclass(frozen=True)
class AnalyzeConfig:
    source: ModelSource
    ignore: tuple[str, ...] = ()
    timeout: float | None = 120.0
    latency: bool = False  # time PyTorch eager and onnxruntime at batch 1 and latency_batch
    latency_batch: int = 16
    compare: ModelSource | None = None  # the original, timed beside this model


@dataclass(frozen=True)
class ExportJob:
    """``export``: which model, the ``prunecli.export.ExportConfig`` and optional real inputs for parity."""

    source: ModelSource
    export: Any  # prunecli.export.ExportConfig
    data: DataOptions | None = None


@dataclass(frozen=True)
class EdpOptions:
    """``prune --method edp``: its training stage and its regulariser (see ``prunecli.edp``)."""

    training: Any  # a prunecli.finetune.FinetuneConfig
    lam: float = 1e-4
    threshold: float = 5e-3
    init: str = "svd"
    val: DataOptions | None = None

    def __post_init__(self):
        if self.lam < 0 or self.threshold < 0:
            raise BudgetError(f"--edp-lambda {self.lam} and --edp-threshold {self.threshold} must not be negative")

    def to_dict(self) -> dict[str, Any]:
        return {"training": self.training.to_dict(), "lam": self.lam, "threshold": self.threshold, "init": self.init,
                "val": self.val.to_dict() if self.val else None}


@dataclass(frozen=True)
class PruneConfig:
    """Everything ``prune`` needs; embedded in the slim artifact as provenance."""

    source: ModelSource
    budget: Budget
    method: str = "l1"
    allocation: str = "uniform"
    max_layer_ratio: float = 0.9
    round_to: int = 1
    ignore: tuple[str, ...] = ()
    group_reduction: str = "mean"
    output: Path | None = None
    force: bool = False
    seed: int = 0
    device: str = "cpu"
    timeout: float | None = 120.0
    score_timeout: float | None = None  # seconds allowed for scoring; None: no limit
    criterion_options: dict[str, Any] = field(default_factory=dict)
    data: DataOptions | None = None
    scores: Path | None = None  # reuse a `prunecli score` file instead of scoring again
    recalibrate_bn: int = 0  # batches of --data to re-estimate BN statistics on after removal
    soft: Any = None  # a prunecli.finetune.FinetuneConfig: train with the channels masked before removing them
    reselect_every: int = 5
    edp: EdpOptions | None = None  # --method edp: decomposition-and-pruning training instead of scoring
    evaluate: DataOptions | None = None  # labelled images to measure top-1 of the original and the slim model on
    eval_limit: int | None = None  # a seeded subset of ``evaluate``
    latency: bool = False  # time the original beside the slim model (PyTorch eager and onnxruntime)
    latency_batch: int = 16
    group_scope: str = GROUP_SCOPE

    @property
    def scoring(self) -> ScoringOptions:
        return ScoringOptions(self.method, self.criterion_options, self.data, self.group_reduction, self.device, self.seed,
                              self.group_scope)

    def __post_init__(self):
        if not 0 < self.max_layer_ratio < 1:
            raise BudgetError(f"--max-layer-ratio {self.max_layer_ratio} must lie strictly between 0 and 1")
        if self.round_to < 1:
            raise BudgetError(f"--round-to {self.round_to} must be a positive integer")
        _check_scope(self.group_scope)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["source"] = self.source.to_dict()
        data["budget"] = self.budget.to_dict()
        data["output"] = str(self.output) if self.output else None
        data["data"] = self.data.to_dict() if self.data else None
        data["evaluate"] = self.evaluate.to_dict() if self.evaluate else None
        data["scores"] = str(self.scores) if self.scores else None
        data["soft"] = self.soft.to_dict() if self.soft is not None else None
        data["edp"] = self.edp.to_dict() if self.edp is not None else None
        return data

    def provenance(self) -> dict[str, Any]:
        """The config as the artifact records it: without ``force``, which decides whether a file may be replaced,
        not what is written, so the same prune gives the same bytes written fresh or over an old file."""
        data = self.to_dict()
        del data["force"]
        return data
