"""The results of the library verbs: frozen dataclasses that ``to_dict`` into the ``--json`` documents.

Only ``prunecli.report`` renders them; nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Totals:
    """A model's parameter count and MACs (conv + linear multiply-accumulates, the thop convention)."""

    params: int
    macs: int


@dataclass(frozen=True)
class LayerRow:
    name: str
    kind: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...]
    groups: int
    params: int
    macs: int
    macs_share: float
    group: str | None
    coupled_layers: int
    prunable: bool
    reason: str


@dataclass(frozen=True)
class GroupRow:
    root: str
    channels: int
    blocks: int
    layers: tuple[str, ...]
    prunable: bool
    reason: str


@dataclass(frozen=True)
class ModelSummary:
    source: str
    arch: str | None
    arch_kwargs: dict[str, Any]
    input_shape: tuple[int, ...]
    params: int
    macs: int
    sha256: str


@dataclass(frozen=True)
class AnalyzeResult:
    model: ModelSummary
    layers: list[LayerRow]
    groups: list[GroupRow]
    prunable_channels: int
    notes: list[str] = field(default_factory=list)
    provenance: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class GroupScores:
    root: str
    channels: int
    blocks: int
    layers: tuple[str, ...]
    scores: list[float]
    ranking: list[int]  # channel positions, first to prune first
    preview_removed: int | None = None


@dataclass(frozen=True)
class ScoreResult:
    model: ModelSummary
    method: str
    options: dict[str, Any]
    data: dict[str, Any] | None
    group_reduction: str
    seed: int
    groups: list[GroupScores]
    output: str | None
    preview: dict[str, Any] | None
    seconds: float
    notes: list[str] = field(default_factory=list)
    group_scope: str = "all"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LayerChange:
    name: str
    kind: str
    out_before: int
    out_after: int
    in_before: int
    in_after: int
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int


@dataclass(frozen=True)
class PruneResult:
    model: ModelSummary
    output: str | None
    method: str
    allocation: str
    budget: dict[str, Any]
    target: float
    before: Totals
    after: Totals
    macs_kept: float
    params_kept: float
    deviation_pp: float  # achieved minus requested share of the budgeted cost, in percentage points
    layers: list[LayerChange]
    groups_pruned: int
    channels_removed: int
    seconds: float
    seed: int
    notes: list[str] = field(default_factory=list)
    latency: dict[str, Any] | None = None  # a LatencyComparison of the original and the slim model (``--latency``)
    accuracy: dict[str, Any] | None = None  # top-1 on --eval-data, else the test accuracy the source file records
    reconstruction: dict[str, Any] | None = None  # a ReconstructReport (``--reconstruct``)
    latency_target: dict[str, Any] | None = None  # ``--latency-target``: measured before/after, iterations, table
    sensitivity: dict[str, Any] | None = None  # ``--allocation sensitivity``: per group, widths, damage at each, kept
    recalibration: dict[str, Any] | None = None  # ``--recalibrate-bn``: batches and images the statistics came from
    training: dict[str, Any] | None = None  # EDP or soft pruning: the training record (history, val top-1, best epoch)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class EvaluateResult:
    model: ModelSummary
    data: str  # the images evaluated on: the --data given, or the default a 1x28x28 model gets (see notes)
    metrics: dict[str, Any]
    compare: dict[str, Any] | None = None  # {"model": summary, "metrics": {...}, "speedup_macs": ...}
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FinetuneRunResult:
    model: ModelSummary
    output: str | None
    training: dict[str, Any]
    before: dict[str, Any] | None  # validation metrics before training
    after: dict[str, Any] | None
    data: str | None = None  # the images trained on: the --data given, or the default a 1x28x28 model gets
    images: int | None = None  # how many of them (--train-limit's subset, or all)
    val_data: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Parity:
    """Largest differences between an artifact's outputs and the reference model's, over all runs.

    ``max_rel`` is ``max_abs`` divided by the largest reference magnitude (element-wise relative errors
    explode near zero and say little about logits).
    """

    max_abs: float
    max_rel: float
    batches: tuple[int, ...]  # the batch size of each compared run

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Verification:
    """How the written artifact compares with the PyTorch model (``passed``: every max_abs <= atol).

    ``cast`` (safetensors fp16/bf16 only) is what the cast to ``cast_dtype`` costs against the fp32 model, on
    the random (and real) inputs; its ``max_rel`` must stay within ``cast_tolerance`` (a share of the largest
    fp32 output, ``prunecli.export.verify.cast_tolerance`` says why), as the reloaded file must stay within
    ``atol`` of the cast model.
    """

    runtime: str
    atol: float
    random: Parity
    real: Parity | None
    passed: bool
    cast: Parity | None = None
    cast_dtype: str | None = None
    cast_tolerance: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ExportResult:
    format: str
    output: str
    exporter: str  # "legacy"/"dynamo" (onnx), "torch.jit.trace", "safetensors"
    fallback_reason: str | None  # why ``auto`` did not use its first choice, one line
    opset: int | None
    dynamic_batch: bool
    dtype: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    verification: Verification | None
    file_size: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LatencyRow:
    runtime: str
    batch: int
    original_ms: float
    slim_ms: float
    speedup: float  # original_ms / slim_ms


@dataclass(frozen=True)
class LatencyComparison:
    """Measured speedups of the slim model beside the MACs ratio that promised them."""

    input_shape: tuple[int, ...]
    rows: list[LatencyRow]
    original_macs: int
    slim_macs: int
    macs_ratio: float  # original_macs / slim_macs: the speedup the MACs alone predict
    warmup: int
    repeats: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
