"""Frozen configs for each command, nested by stage: each stage of ``prune`` takes only its own part.

Every config round-trips through ``to_dict`` / ``from_dict`` (plain JSON values), as the artifacts embed them, and
checks its own values on construction (an :class:`~prunecli.errors.OptionError`, a usage error, names the option).
The closed sets of choices live here (and in the criteria registry); the CLI's choices are made from them.
Nothing here imports torch.
"""

from prunecli.config.commands import (
    AccuracyOptions,
    AnalyzeConfig,
    EvaluateConfig,
    ExportJob,
    FinetuneJob,
    LatencyOptions,
    PlanOptions,
    PruneConfig,
    ReconstructOptions,
    RecoveryOptions,
    ScoreConfig,
)
from prunecli.config.common import (
    ALLOCATIONS,
    AMP_MODES,
    AUGMENTS,
    EDP_INITS,
    FASHION_MNIST_ROOT,
    FASHION_MNIST_SHAPE,
    GROUP_SCOPE,
    GROUP_SCOPES,
    KD_MODES,
    KD_SCHEDULES,
    LATENCY_BATCH,
    LATENCY_RUNTIMES,
    LEGACY_GROUP_SCOPE,
    OPTIMIZERS,
    REDUCTIONS,
    DataOptions,
    LatencyTarget,
    ModelSource,
    OutputOptions,
    RunOptions,
    ScoringOptions,
)
from prunecli.config.training import EdpOptions, FinetuneConfig, SoftOptions

__all__ = [
    "ALLOCATIONS", "AMP_MODES", "AUGMENTS", "EDP_INITS", "FASHION_MNIST_ROOT", "FASHION_MNIST_SHAPE", "GROUP_SCOPE",
    "GROUP_SCOPES", "KD_MODES", "KD_SCHEDULES", "LATENCY_BATCH", "LATENCY_RUNTIMES", "LEGACY_GROUP_SCOPE", "OPTIMIZERS",
    "REDUCTIONS",
    "AccuracyOptions", "AnalyzeConfig", "DataOptions", "EdpOptions", "EvaluateConfig", "ExportJob", "FinetuneConfig",
    "FinetuneJob", "LatencyOptions", "LatencyTarget", "ModelSource", "OutputOptions", "PlanOptions", "PruneConfig",
    "ReconstructOptions", "RecoveryOptions", "RunOptions", "ScoreConfig", "ScoringOptions", "SoftOptions",
]
