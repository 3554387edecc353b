"""Frozen configs for each command, and budget parsing ("0.5", "50%", "2.1G").

Every config round-trips through ``to_dict`` / ``from_dict`` (plain JSON values), as the artifacts embed them.
Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunecli.errors import BudgetError, PrunecliError

# --group-scope: the weight criteria score the producers' filters only, or every member of a coupled group
GROUP_SCOPES = ("producers", "all")
GROUP_SCOPE = "all"
LEGACY_GROUP_SCOPE = "producers"  # what a config recorded before the option existed was scored with


def _check_scope(scope: str) -> None:
    if scope not in GROUP_SCOPES:
        raise PrunecliError(f"--group-scope {scope!r} is not one of {', '.join(GROUP_SCOPES)}")


OPTIMIZERS = ("sgd", "adamw")
KD_MODES = ("none", "fixed", "variable")
KD_SCHEDULES = ("cosine", "linear", "step", "constant")
AUGMENTS = ("auto", "none")
AMP_MODES = ("auto", "on", "off")
_SUFFIX = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([%KMGT]?)\s*$", re.IGNORECASE)
_MILLISECONDS = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|%)?\s*$", re.IGNORECASE)
LATENCY_RUNTIMES = ("onnxruntime", "torch")


@dataclass(frozen=True)
class Budget:
    """What to keep: ``kind`` is "flops", "params", "latency" or "ratio" (share of each layer's channels removed).

    For flops/params/latency, ``value`` is a fraction of the original to keep when ``absolute`` is false, else
    a count (MACs or parameters) or milliseconds (the measured latency). For ratio it is the fraction removed.
    """

    kind: str
    value: float
    absolute: bool = False
    text: str = ""

    def target(self, original: float) -> float:
        """The cost to reach, given the original model's cost."""
        if self.absolute:
            if self.value >= original:
                unit = " ms" if self.kind == "latency" else ""
                raise BudgetError(
                    f"--{self.kind}-target {self.text} is not below the model's own {original:.4g}{unit}; ask for less"
                )
            return self.value
        return self.value * original if self.kind != "ratio" else (1 - self.value) * original

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Budget:
        return cls(str(data["kind"]), float(data["value"]), bool(data.get("absolute", False)), str(data.get("text", "")))


def _plain(value: Any) -> Any:
    """A config field as a JSON value: paths as strings, tuples as lists, nested configs as their dicts."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _fields_dict(config: Any) -> dict[str, Any]:
    return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def _optional(convert, value):
    return convert(value) if value is not None else None


def _tuple(value) -> tuple | None:
    return tuple(value) if value is not None else None


def parse_budget(kind: str, text: str) -> Budget:
    """Parse a budget option. Fractions must lie strictly between 0 and 1."""
    option = "--ratio" if kind == "ratio" else f"--{kind}-target"
    if kind == "latency":
        return _parse_latency(option, str(text))
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


def _parse_latency(option: str, text: str) -> Budget:
    """A fraction of the original's measured latency (0.5, 50%) or milliseconds (12ms)."""
    match = _MILLISECONDS.match(text)
    usage = "use a fraction of the original's measured latency (0.5), a percentage (50%) or milliseconds (12ms)"
    if not match:
        raise BudgetError(f"{option} {text!r} is not a latency; {usage}")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    if unit == "ms":
        if not number > 0:
            raise BudgetError(f"{option} {text!r} must be a positive number of milliseconds")
        return Budget("latency", number, True, text)
    fraction = number / 100 if unit == "%" else number
    if not 0 < fraction < 1:
        raise BudgetError(f"{option} {text!r} must lie strictly between 0 and 1 of the original; {usage}")
    return Budget("latency", fraction, False, text)


@dataclass(frozen=True)
class LatencyTarget:
    """How ``--latency-target`` measures: the runtime and its settings, the table grid and the correction loop.

    Attributes:
        runtime: "onnxruntime" (CPU) or "torch" (eager, on the prune ``device``).
        batch: the batch size the latency is measured at.
        tolerance: the measured latency may miss the target by this share of the target.
        iterations: whole slim models measured at most while correcting the target.
        grid: channel counts timed per layer dimension for the per-layer table (more where ``--round-to``
            leaves fewer choices).
        warmup, repeats: untimed and timed runs of every measurement (medians).
    """

    runtime: str = "onnxruntime"
    batch: int = 1
    tolerance: float = 0.05
    iterations: int = 5
    grid: int = 5
    warmup: int = 3
    repeats: int = 10

    def __post_init__(self):
        checks = [
            (self.runtime not in LATENCY_RUNTIMES,
             f"--latency-runtime {self.runtime!r}: choose {' or '.join(LATENCY_RUNTIMES)}"),
            (self.batch < 1, f"--latency-batch {self.batch} must be at least 1"),
            (not 0 < self.tolerance < 1, f"the latency tolerance {self.tolerance} must lie strictly between 0 and 1"),
            (self.iterations < 1 or self.grid < 2 or self.warmup < 0 or self.repeats < 1,
             "latency targets need iterations >= 1, grid >= 2, warmup >= 0 and repeats >= 1"),
        ]
        for failed, message in checks:
            if failed:
                raise BudgetError(message)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyTarget:
        return cls(**data)


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from and how to read it."""

    path: Path
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None
    trust_pickle: bool = False
    import_paths: tuple[Path, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["path"] = str(self.path)
        data["import_paths"] = [str(p) for p in self.import_paths]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSource:
        return cls(Path(data["path"]), data.get("arch"), dict(data.get("arch_kwargs") or {}),
                   _tuple(data.get("input_shape")), bool(data.get("trust_pickle", False)),
                   tuple(Path(p) for p in data.get("import_paths") or ()))


@dataclass(frozen=True)
class DataOptions:
    """Images for a command (``--data`` and friends): where they are, how many, in which batches, normalised how."""

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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataOptions:
        return cls(str(data["source"]), Path(data["root"]), int(data["calib_images"]), int(data["batch_size"]),
                   _tuple(data.get("mean")), _tuple(data.get("std")))


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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScoringOptions:
        return cls(data["method"], dict(data.get("options") or {}), _optional(DataOptions.from_dict, data.get("data")),
                   data.get("group_reduction", "mean"), data.get("device", "cpu"), int(data.get("seed", 0)),
                   data.get("group_scope", LEGACY_GROUP_SCOPE))


@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune; embedded in the slim artifact's metadata (see :meth:`FinetuneResult.record`).

    Attributes:
        epochs: passes over the training data (ignored when ``steps`` is given).
        steps: total optimizer steps instead of ``epochs``; the last epoch is cut short.
        lr: peak learning rate, reached after the warm-up and then decayed to 0 by a cosine.
        optimizer: ``sgd`` (Nesterov momentum) or ``adamw``.
        weight_decay: applied to weights with more than one dimension, not to biases and norm parameters.
        label_smoothing: for the cross-entropy term (also inside the distillation loss).
        warmup_epochs: linear warm-up length in epochs; fractions allowed.
        batch_size: the global batch; under DDP each of the N processes takes ``batch_size / N`` images.
        eval_batch_size: validation batch (default: ``batch_size``).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; under torchrun CUDA runs use ``cuda:LOCAL_RANK``.
        amp: ``auto`` (mixed precision on CUDA only: bfloat16 where supported, else float16 with a scaler),
            ``on`` or ``off``.
        augment: ``auto`` (random crop after replicate padding plus horizontal flip; padding 2 for 1-channel
            images such as Fashion-MNIST, 1/8 of the side otherwise) or ``none``.
        kd: ``none``, ``fixed`` (temperature ``kd_t_max`` throughout) or ``variable`` (SFP's schedule from
            ``kd_t_max`` at the first step to ``kd_t_min`` at the last, evaluated per step at
            ``step / (total_steps - 1)`` rather than per epoch); needs a teacher.
        kd_alpha: weight of the distillation term; ``1 - kd_alpha`` weighs the cross-entropy.
        kd_schedule: shape of the variable temperature: ``cosine``, ``linear``, ``step`` or ``constant``.
        recalibrate_bn: before training, re-estimate BatchNorm statistics on this many training batches.
        checkpoint: file for the per-epoch resume state (an internal ``torch.save`` file).
        resume: continue the run saved in ``checkpoint``.
        force: overwrite an existing ``checkpoint`` when not resuming.
    """

    epochs: int = 10
    steps: int | None = None
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    warmup_epochs: float = 0.0
    batch_size: int = 128
    eval_batch_size: int | None = None
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    augment: str = "auto"
    kd: str = "none"
    kd_alpha: float = 0.7
    kd_t_max: float = 4.0
    kd_t_min: float = 1.0
    kd_schedule: str = "cosine"
    recalibrate_bn: int = 0
    checkpoint: Path | None = None
    resume: bool = False
    force: bool = False

    def __post_init__(self):
        checks = [
            (self.steps is None and self.epochs < 1, f"--epochs {self.epochs} must be at least 1"),
            (self.steps is not None and self.steps < 1, f"--steps {self.steps} must be at least 1"),
            (not self.lr > 0, f"--lr {self.lr} must be positive"),
            (self.optimizer not in OPTIMIZERS, f"--optimizer {self.optimizer!r}: choose {' or '.join(OPTIMIZERS)}"),
            (not 0 <= self.momentum < 1, f"--momentum {self.momentum} must lie in [0, 1)"),
            (self.weight_decay < 0, f"--weight-decay {self.weight_decay} must not be negative"),
            (not 0 <= self.label_smoothing < 1, f"--label-smoothing {self.label_smoothing} must lie in [0, 1)"),
            (self.warmup_epochs < 0, f"--warmup-epochs {self.warmup_epochs} must not be negative"),
            (self.batch_size < 1, f"--batch-size {self.batch_size} must be at least 1"),
            (self.eval_batch_size is not None and self.eval_batch_size < 1,
             f"--eval-batch-size {self.eval_batch_size} must be at least 1"),
            (self.amp not in AMP_MODES, f"--amp {self.amp!r}: choose {', '.join(AMP_MODES)}"),
            (self.augment not in AUGMENTS, f"--augment {self.augment!r}: choose {' or '.join(AUGMENTS)}"),
            (self.kd not in KD_MODES, f"--kd {self.kd!r}: choose {', '.join(KD_MODES)}"),
            (not 0 <= self.kd_alpha <= 1, f"--kd-alpha {self.kd_alpha} must lie in [0, 1]"),
            (not self.kd_t_min > 0, f"--kd-t-min {self.kd_t_min} must be positive"),
            (self.kd_t_max < self.kd_t_min, f"--kd-t-max {self.kd_t_max} must not be below --kd-t-min {self.kd_t_min}"),
            (self.kd_schedule not in KD_SCHEDULES, f"--kd-schedule {self.kd_schedule!r}: choose {', '.join(KD_SCHEDULES)}"),
            (self.recalibrate_bn < 0, f"--recalibrate-bn {self.recalibrate_bn} must not be negative"),
            (self.resume and self.checkpoint is None, "--resume needs the --checkpoint file of the run to continue"),
        ]
        for failed, message in checks:
            if failed:
                raise PrunecliError(message)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["checkpoint"] = str(self.checkpoint) if self.checkpoint is not None else None
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FinetuneConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if values.get("checkpoint") is not None:
            values["checkpoint"] = Path(values["checkpoint"])
        return cls(**values)


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

    def to_dict(self) -> dict[str, Any]:
        return _fields_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScoreConfig:
        return cls(ModelSource.from_dict(data["source"]), ScoringOptions.from_dict(data["scoring"]),
                   _optional(Path, data.get("output")), bool(data.get("force", False)), tuple(data.get("ignore") or ()),
                   _optional(Budget.from_dict, data.get("preview")), data.get("timeout", 120.0), data.get("score_timeout"))


@dataclass(frozen=True)
class EvaluateConfig:
    source: ModelSource
    data: DataOptions
    limit: int | None = None  # images to evaluate (a seeded subset); None = all
    device: str = "cpu"
    compare: ModelSource | None = None
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return _fields_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluateConfig:
        return cls(ModelSource.from_dict(data["source"]), DataOptions.from_dict(data["data"]), data.get("limit"),
                   data.get("device", "cpu"), _optional(ModelSource.from_dict, data.get("compare")),
                   int(data.get("seed", 0)))


@dataclass(frozen=True)
class FinetuneJob:
    """``finetune``: which model, which data, how (a :class:`FinetuneConfig`) and where to write."""

    source: ModelSource
    train: DataOptions
    training: FinetuneConfig
    val: DataOptions | None = None
    teacher: ModelSource | None = None
    output: Path | None = None
    force: bool = False
    train_limit: int | None = None
    val_limit: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return _fields_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FinetuneJob:
        return cls(ModelSource.from_dict(data["source"]), DataOptions.from_dict(data["train"]),
                   FinetuneConfig.from_dict(data["training"]), _optional(DataOptions.from_dict, data.get("val")),
                   _optional(ModelSource.from_dict, data.get("teacher")), _optional(Path, data.get("output")),
                   bool(data.get("force", False)), data.get("train_limit"), data.get("val_limit"))


@dataclass(frozen=True)
class AnalyzeConfig:
    source: ModelSource
    ignore: tuple[str, ...] = ()
    timeout: float | None = 120.0
    latency: bool = False  # time PyTorch eager and onnxruntime at batch 1 and latency_batch
    latency_batch: int = 16
    compare: ModelSource | None = None  # the original, timed beside this model

    def to_dict(self) -> dict[str, Any]:
        return _fields_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AnalyzeConfig:
        return cls(ModelSource.from_dict(data["source"]), tuple(data.get("ignore") or ()), data.get("timeout", 120.0),
                   bool(data.get("latency", False)), int(data.get("latency_batch", 16)),
                   _optional(ModelSource.from_dict, data.get("compare")))


@dataclass(frozen=True)
class ExportJob:
    """``export``: which model, the ``prunecli.export.ExportConfig`` and optional real inputs for parity."""

    source: ModelSource
    export: Any  # prunecli.export.ExportConfig (it checks output suffixes with prunecli.io, a layer up)
    data: DataOptions | None = None

    def to_dict(self) -> dict[str, Any]:
        return _fields_dict(self)


@dataclass(frozen=True)
class EdpOptions:
    """``prune --method edp``: its training stage and its regulariser (see ``prunecli.methods.edp``)."""

    training: FinetuneConfig
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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EdpOptions:
        return cls(FinetuneConfig.from_dict(data["training"]), float(data["lam"]), float(data["threshold"]),
                   data.get("init", "svd"), _optional(DataOptions.from_dict, data.get("val")))


@dataclass(frozen=True)
class ReconstructOptions:
    """How layers are refit.

    Attributes:
        ridge: the ridge weight, relative to the mean diagonal of the layer's Gram matrix.
        rows_per_input: patch rows sampled per input dimension of a layer (positions are drawn at random per
            batch); caps the Gram cost of early, high-resolution layers. Layers with fewer positions use all.
        holdout_every: every k-th image is held out to check each fit (0: no check).
        seed: draws the sampled positions.
    """

    ridge: float = 1e-3
    rows_per_input: int = 64
    holdout_every: int = 8
    seed: int = 0

    def __post_init__(self):
        if not self.ridge > 0:
            raise BudgetError(f"--recon-ridge {self.ridge} must be positive")
        if self.rows_per_input < 1:
            raise BudgetError(f"--recon-rows {self.rows_per_input} must be at least 1")
        if self.holdout_every < 0 or self.holdout_every == 1:
            raise BudgetError(f"the hold-out share 1/{self.holdout_every} must be 0 (none) or at least 2")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReconstructOptions:
        return cls(**data)


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
    reconstruct: ReconstructOptions | None = None  # refit the changed layers on --calib-images of --data after removal
    soft: FinetuneConfig | None = None  # train with the channels masked before removing them
    reselect_every: int = 5
    edp: EdpOptions | None = None  # --method edp: decomposition-and-pruning training instead of scoring
    evaluate: DataOptions | None = None  # labelled images to measure top-1 of the original and the slim model on
    eval_limit: int | None = None  # a seeded subset of ``evaluate``
    latency: bool = False  # time the original beside the slim model (PyTorch eager and onnxruntime)
    latency_batch: int = 16
    group_scope: str = GROUP_SCOPE
    latency_target: LatencyTarget | None = None  # how a "latency" budget is measured
    threads: int | None = None  # intra-op threads of every timing (None: onnxruntime the CPU count, torch its own)

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
        if (self.budget.kind == "latency") != (self.latency_target is not None):
            raise BudgetError("a latency budget and its measurement settings (latency_target) go together")
        if self.threads is not None and self.threads < 1:
            raise BudgetError(f"--threads {self.threads} must be at least 1")

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
        data["reconstruct"] = self.reconstruct.to_dict() if self.reconstruct is not None else None
        data["latency_target"] = self.latency_target.to_dict() if self.latency_target is not None else None
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PruneConfig:
        """The config of ``to_dict`` or of an artifact's provenance (which leaves out ``force``)."""
        nested = {
            "source": ModelSource.from_dict, "budget": Budget.from_dict, "output": Path, "scores": Path,
            "data": DataOptions.from_dict, "evaluate": DataOptions.from_dict, "soft": FinetuneConfig.from_dict,
            "edp": EdpOptions.from_dict, "reconstruct": ReconstructOptions.from_dict, "ignore": tuple,
            "latency_target": LatencyTarget.from_dict,
            "criterion_options": dict,
        }
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: (_optional(nested[k], v) if k in nested else v) for k, v in data.items() if k in known}
        return cls(**{"group_scope": LEGACY_GROUP_SCOPE, **values})

    def provenance(self) -> dict[str, Any]:
        """The config as the artifact records it: without ``force``, which decides whether a file may be replaced,
        not what is written, so the same prune gives the same bytes written fresh or over an old file."""
        data = self.to_dict()
        del data["force"]
        return data
