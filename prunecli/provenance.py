"""What an artifact records about how it was made: the metadata ``prune`` and ``finetune`` write into slim files."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from prunecli._version import __version__
from prunecli.io.slim import STRUCTURAL_KEYS

if TYPE_CHECKING:
    from prunecli.config import FinetuneJob, PruneConfig
    from prunecli.io.formats import LoadedModel
    from prunecli.results import Totals


def prune_metadata(
    config: PruneConfig,
    loaded: LoadedModel,
    method: str,
    before: Totals,
    after: Totals,
    reference: torch.Tensor,
    records: Mapping[str, Any],
) -> dict[str, Any]:
    """The provenance of a slim model: method, budget, config, costs before and after, the source and its parent.

    Args:
        method: the method that chose the channels (a ``--scores`` file's, when one was given).
        reference: the original model's output on the example input (its width is the number of classes).
        records: what each recovery step that ran did (``soft_pruning``, ``edp``, ``recalibrate_bn``,
            ``reconstruct``, ``latency``), under its name.
    """
    metadata = {
        "method": method,
        "allocation": config.plan.allocation,
        "budget": config.budget.to_dict(),
        "config": config.provenance(),
        "achieved": {"macs": after.macs, "params": after.params},
        "original": {"macs": before.macs, "params": before.params},
        "source_sha256": loaded.sha256,
        "seed": config.run.seed,
        "prunecli_version": __version__,
        "mean": list(loaded.input.mean) if loaded.input.mean else None,
        "std": list(loaded.input.std) if loaded.input.std else None,
        "num_classes": int(reference.shape[-1]) if isinstance(reference, torch.Tensor) and reference.dim() == 2 else None,
        **{name: record for name, record in records.items() if record is not None},
    }
    if loaded.document:
        metadata["parent"] = {k: loaded.document.get(k) for k in ("method", "budget", "source_sha256", "achieved")}
        for key in ("dataset", "test_accuracy"):
            if key in loaded.document:
                metadata[f"parent_{key}"] = loaded.document[key]
    return metadata


def finetune_metadata(
    job: FinetuneJob, loaded: LoadedModel, record: dict[str, Any], teacher_sha256: str | None,
    after: dict[str, Any] | None,
) -> dict[str, Any]:
    """The source's provenance (without the structural keys ``save_slim`` writes anew) plus this run in its
    ``finetune_history``; ``after`` (validation metrics after training) becomes the recorded test accuracy."""
    document = {k: v for k, v in (loaded.document or {}).items() if k not in STRUCTURAL_KEYS}
    history = list(document.get("finetune_history", []))
    history.append({**record, "train_data": job.train.to_dict(),
                    "val_data": job.val.to_dict() if job.val else None,
                    "teacher_sha256": teacher_sha256,
                    "val_top1": after["top1"] if after else None})
    document.update({"finetune_history": history, "source_sha256": loaded.sha256, "prunecli_version": __version__})
    if after:
        document["test_accuracy"] = f"{after['top1']:.4f}"
        document["test_data"] = job.val.source
    return document
