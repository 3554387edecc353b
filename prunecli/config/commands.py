"""The config of each command; ``prune``'s nested by stage, each stage taking only its own part."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunecli.budget import Budget
from prunecli.config.common import (
    ALLOCATIONS,
    LATENCY_BATCH,
    LEGACY_GROUP_SCOPE,
    DataOptions,
    JsonConfig,
    LatencyTarget,
    ModelSource,
    OutputOptions,
    RunOptions,
    ScoringOptions,
    check,
    choose,
    fields_dict,
    from_plain,
)
from prunecli.config.training import EdpOptions, FinetuneConfig, SoftOptions


@dataclass(frozen=True)
class ScoreConfig(JsonConfig):
    """``score``: which model, how to score it, on which images, and where to write the scores."""

    source: ModelSource
    scoring: ScoringOptions = field(default_factory=ScoringOptions)
    data: DataOptions | None = None
    run: RunOptions = field(default_factory=RunOptions)
    ignore: tuple[str, ...] = ()
    preview: Budget | None = None  # also plan this MACs budget and show what it would remove
    output: Path | None = None
    force: bool = False



@dataclass(frozen=True)
class EvaluateConfig(JsonConfig):
    """``evaluate``: which model, on which labelled images (none given: Fashion-MNIST's test split, for a model
    that takes its 1x28x28 images only; see :meth:`DataOptions.for_model`), how many, where, beside which."""

    source: ModelSource
    data: DataOptions = field(default_factory=DataOptions)
    limit: int | None = None  # images to evaluate (a seeded subset); None = all
    device: str = "cpu"
    compare: ModelSource | None = None
    seed: int = 0

    def __post_init__(self):
        check([(self.limit is not None and self.limit < 1, f"--eval-limit {self.limit} must be at least 1")])



@dataclass(frozen=True)
class FinetuneJob(JsonConfig):
    """``finetune``: which model, which data, how (a :class:`FinetuneConfig`) and where to write. ``train`` without
    a source is Fashion-MNIST's training split, for a model that takes its 1x28x28 images only
    (:meth:`DataOptions.for_model`)."""

    source: ModelSource
    train: DataOptions
    training: FinetuneConfig
    val: DataOptions | None = None
    teacher: ModelSource | None = None
    output: Path | None = None
    force: bool = False
    train_limit: int | None = None
    val_limit: int | None = None

    def __post_init__(self):
        check([(limit is not None and limit < 1, f"{option} {limit} must be at least 1")
                for option, limit in (("--train-limit", self.train_limit), ("--val-limit", self.val_limit))])



@dataclass(frozen=True)
class AnalyzeConfig(JsonConfig):
    source: ModelSource
    ignore: tuple[str, ...] = ()
    timeout: float | None = 120.0
    latency: bool = False  # time PyTorch eager and onnxruntime at batch 1 and latency_batch
    latency_batch: int = LATENCY_BATCH
    compare: ModelSource | None = None  # the original, timed beside this model

    def __post_init__(self):
        check([(self.latency_batch < 1, f"--latency-batch {self.latency_batch} must be at least 1"),
                (self.compare is not None and not self.latency,
                 "--compare needs --latency (it times the original beside this model)")])



@dataclass(frozen=True)
class ExportJob:
    """``export``: which model, the ``prunecli.export.ExportConfig`` and optional real inputs for parity."""

    source: ModelSource
    export: Any  # prunecli.export.ExportConfig (it checks output suffixes with prunecli.io, a layer up)
    data: DataOptions | None = None

    def to_dict(self) -> dict[str, Any]:
        return fields_dict(self)


@dataclass(frozen=True)
class ReconstructOptions(JsonConfig):
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
        check([
            (not self.ridge > 0, f"--recon-ridge {self.ridge} must be positive"),
            (self.rows_per_input < 1, f"--recon-rows {self.rows_per_input} must be at least 1"),
            (self.holdout_every < 0 or self.holdout_every == 1,
             f"the hold-out share 1/{self.holdout_every} must be 0 (none) or at least 2"),
        ])



@dataclass(frozen=True)
class PlanOptions(JsonConfig):
    """How the budget is spent over the channel groups.

    Attributes:
        allocation: one of :data:`ALLOCATIONS`; None takes the method's own (uniform; global for EDP, which
            ranks and sizes every layer).
        max_layer_ratio: most of one group's channels that may go (at least one always stays).
        round_to: channel counts kept at multiples of this; None ("auto"): the channel block of the runtime the
            model will run on (``prune`` resolves it, see :func:`prunecli.runtime.channel_block`).
        ignore: globs of layer names whose output channels stay.
        narrow_groups: with ``round_to`` from "auto", a group narrower than four blocks may also keep up to half a
            block in multiples of the largest power of two up to a quarter of its width (a 16-channel group keeps 16,
            8 or 4), so the narrow early layers of small models are not left unprunable; not 12: a conv with fewer
            input channels than the block runs on another onnxruntime kernel, 12 channels slower than 16.
    """

    allocation: str | None = None
    max_layer_ratio: float = 0.9
    round_to: int | None = None
    ignore: tuple[str, ...] = ()
    narrow_groups: bool = False

    def channel_grid(self, channels: int) -> tuple[int, int]:
        """The channel multiple a group of ``channels`` keeps (1 while ``round_to`` is unresolved), and the finer one
        its counts up to half of that multiple may take (0: none)."""
        multiple = self.round_to or 1
        if self.narrow_groups and channels < 4 * multiple:
            return multiple, 1 << max(0, (channels // 4).bit_length() - 1)
        return multiple, 0

    def __post_init__(self):
        check([
            (self.allocation is not None and self.allocation not in ALLOCATIONS,
             choose("--allocation", self.allocation, ALLOCATIONS)),
            (not 0 < self.max_layer_ratio < 1,
             f"--max-layer-ratio {self.max_layer_ratio} must lie strictly between 0 and 1"),
            (self.round_to is not None and self.round_to < 1, f"--round-to {self.round_to} must be a positive integer"),
        ])



@dataclass(frozen=True)
class RecoveryOptions(JsonConfig):
    """What runs around the removal to keep accuracy: BN recalibration, reconstruction, soft pruning, EDP."""

    recalibrate_bn: int = 0  # batches of the calibration images to re-estimate BN statistics on after removal
    reconstruct: ReconstructOptions | None = None  # refit the changed layers on the calibration images
    soft: SoftOptions | None = None  # train with the channels masked before removing them
    edp: EdpOptions | None = None  # --method edp: decomposition-and-pruning training instead of scoring

    def __post_init__(self):
        check([(self.recalibrate_bn < 0, f"--recalibrate-bn {self.recalibrate_bn} must not be negative")])

    @property
    def trains(self) -> bool:
        """Soft pruning and EDP train while they prune, so nothing measured on the model before applies."""
        return self.soft is not None or self.edp is not None



@dataclass(frozen=True)
class AccuracyOptions(JsonConfig):
    """``prune --eval-data``: labelled images to measure the top-1 of the original and the slim model on."""

    data: DataOptions
    limit: int | None = None  # a seeded subset

    def __post_init__(self):
        check([(self.limit is not None and self.limit < 1, f"--eval-limit {self.limit} must be at least 1")])



@dataclass(frozen=True)
class LatencyOptions(JsonConfig):
    """Measured latency: ``--latency`` times the original beside the slim model; ``target`` says how a latency
    budget is measured. Both run at batch 1 and at ``batch``. ``check_speedup``: a slim model that is not faster
    than the original under :attr:`runtime` fails the command (for CI)."""

    compare: bool = False
    batch: int = LATENCY_BATCH
    target: LatencyTarget | None = None
    check_speedup: bool = False

    def __post_init__(self):
        check([(self.batch < 1, f"--latency-batch {self.batch} must be at least 1"),
               (self.check_speedup and not self.compare, "--check-speedup times the slim model: give --latency too")])

    @property
    def runtime(self) -> str:
        """The runtime the model is deployed to: the latency target's, else onnxruntime (what --round-to auto
        rounds for and the speed check judges)."""
        return self.target.runtime if self.target is not None else "onnxruntime"



@dataclass(frozen=True)
class PruneConfig(JsonConfig):
    """Everything ``prune`` needs, one part per stage; embedded in the slim artifact as provenance.

    ``data`` are the images of ``--data``: the calibration images (scoring, sensitivity, BN recalibration,
    reconstruction; loaded once) and the training images of soft pruning and EDP.
    """

    source: ModelSource
    budget: Budget
    data: DataOptions | None = None
    scoring: ScoringOptions = field(default_factory=ScoringOptions)
    plan: PlanOptions = field(default_factory=PlanOptions)
    recovery: RecoveryOptions = field(default_factory=RecoveryOptions)
    evaluate: AccuracyOptions | None = None
    latency: LatencyOptions = field(default_factory=LatencyOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    run: RunOptions = field(default_factory=RunOptions)

    def __post_init__(self):
        method, recovery = self.scoring.method, self.recovery
        if self.plan.allocation is None:  # the method's own default, decided here for the CLI and the library alike
            object.__setattr__(self, "plan", dataclasses.replace(self.plan, allocation=_default_allocation(method)))
        needs_data = recovery.recalibrate_bn or recovery.reconstruct or recovery.trains
        check([
            ((self.budget.kind == "latency") != (self.latency.target is not None),
             "a latency budget and its measurement settings (latency.target) go together"),
            ((method == "edp") != (recovery.edp is not None), "--method edp and its options (recovery.edp) go together"),
            (method == "edp" and self.budget.kind not in ("macs", "params"),
             "--method edp needs --flops-target or --params-target (a channel --ratio or a latency has no meaning "
             "once layers are decomposed)"),
            (recovery.reconstruct is not None and method == "edp",
             "--reconstruct does not apply to --method edp, which trains its own weights; drop one"),
            (self.latency.target is not None and recovery.trains,
             "--latency-target plans on scores; it does not combine with --method edp or --soft-epochs"),
            (self.plan.allocation == "sensitivity" and recovery.trains,
             "--allocation sensitivity measures the model once before pruning; it does not combine with --method edp "
             "or --soft-epochs, which train while they prune"),
            ((needs_data or self.plan.allocation == "sensitivity") and self.data is None,
             "--method edp, --recalibrate-bn, --reconstruct, --soft-epochs and --allocation sensitivity need images: "
             "pass --data (e.g. fashion-mnist:train or an image folder; --reconstruct and sensitivity need no labels)"),
        ])

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PruneConfig:
        """The config of ``to_dict``, of an artifact's provenance, or of the flat provenance prunecli 0.1 wrote."""
        return from_plain(cls, _nested(data) if "method" in data else data)

    def provenance(self) -> dict[str, Any]:
        """The config as the artifact records it. ``force`` is not part of it: it decides whether a file may be
        replaced, not what is written, so the same prune gives the same bytes written fresh or over an old file."""
        data = self.to_dict()
        del data["output"]["force"]
        return data


def _default_allocation(method: str) -> str:
    return "global" if method == "edp" else "uniform"


def _nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The flat provenance of prunecli 0.1 (one field per option) as the nested config."""
    soft = flat.get("soft")
    latency_target = dict(flat["latency_target"]) if flat.get("latency_target") else None
    batch = latency_target.pop("batch", 1) if latency_target else flat.get("latency_batch", LATENCY_BATCH)
    return {
        "source": flat["source"], "budget": flat["budget"], "data": flat.get("data"),
        "output": {"path": flat.get("output"), "force": flat.get("force", False)},
        "scoring": {"method": flat["method"], "options": flat.get("criterion_options") or {},
                    "group_reduction": flat.get("group_reduction", "mean"),
                    "group_scope": flat.get("group_scope", LEGACY_GROUP_SCOPE), "scores": flat.get("scores")},
        "plan": {k: flat[k] for k in ("allocation", "max_layer_ratio", "round_to", "ignore") if k in flat},
        "recovery": {"recalibrate_bn": flat.get("recalibrate_bn", 0), "reconstruct": flat.get("reconstruct"),
                     "edp": flat.get("edp"),
                     "soft": {"training": soft, "reselect_every": flat.get("reselect_every", 5)} if soft else None},
        "evaluate": {"data": flat["evaluate"], "limit": flat.get("eval_limit")} if flat.get("evaluate") else None,
        "latency": {"compare": flat.get("latency", False), "batch": batch, "target": latency_target},
        "run": {k: flat[k] for k in ("seed", "device", "timeout", "score_timeout", "threads") if k in flat},
    }
