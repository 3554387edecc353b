"""Checks of a pruned model before it is written: it runs, its outputs keep their shapes, a detector still
detects; and what it costs and scores next to the original."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from prunecli.config import AccuracyOptions, RunOptions
from prunecli.errors import ArchitectureError, first_line
from prunecli.io.formats import LoadedModel
from prunecli.measure import LayerCost, costs_and_output, count_params
from prunecli.outputs import describe_shapes, output_shapes
from prunecli.pipeline.opening import Profile, labelled_images
from prunecli.results import LatencyComparison, LayerChange, Totals
from prunecli.tasks import end_to_end_outputs, reassemble

Say = Callable[[str], None]


@dataclass(frozen=True)
class Checked:
    """A pruned model that runs: its per-layer costs, totals, and the whole model to deploy (a detector's heads
    put back around its pruned feature path)."""

    costs: list[LayerCost]
    totals: Totals
    deployed: nn.Module


def check_pruned(loaded: LoadedModel, original: Profile, pruned: nn.Module) -> Checked:
    """The pruned model must run on the example input, give outputs of the original's shapes, and (a detector)
    run end to end."""
    try:
        costs, out = costs_and_output(pruned, original.example)
    except Exception as exc:
        raise ArchitectureError(
            f"the pruned model no longer runs ({type(exc).__name__}: {first_line(exc, 150)}); this architecture "
            "keeps channel counts outside its layers; --ignore the affected layers or prune another model"
        ) from exc
    if output_shapes(out) != output_shapes(original.output):
        raise ArchitectureError(f"pruning changed the output shape {describe_shapes(output_shapes(original.output))} "
                                f"-> {describe_shapes(output_shapes(out))}")
    deployed = reassemble(loaded.deployed, pruned)
    try:
        end_to_end_outputs(deployed, tuple(loaded.input.shape))
    except Exception as exc:
        raise ArchitectureError(
            f"the pruned detector no longer runs end to end ({type(exc).__name__}: {first_line(exc, 150)}); "
            "--ignore the layers whose widths its heads read"
        ) from exc
    return Checked(costs, Totals(count_params(pruned), sum(c.macs for c in costs)), deployed)


def accuracy(options: AccuracyOptions | None, loaded: LoadedModel, pruned: nn.Module, batch_size: int, run: RunOptions,
             say: Say) -> dict[str, Any] | None:
    """Top-1 of the original and the slim model on ``options``' images; else the source's recorded test accuracy."""
    if options is None:
        document = loaded.document or {}
        if document.get("test_accuracy") is None:
            return None
        return {"data": document.get("test_data") or document.get("dataset"), "images": None, "measured": False,
                "original_top1": float(document["test_accuracy"]), "pruned_top1": None}
    from prunecli.training import evaluate

    images = labelled_images(options.data, loaded, options.limit, run.seed, "measuring top-1")
    say(f"evaluating the original and the slim model on {len(images)} images")
    return {"data": images.description, "images": len(images), "measured": True,
            "original_top1": evaluate(loaded.model, images, batch_size, run.device).top1,
            "pruned_top1": evaluate(pruned, images, batch_size, run.device).top1}


def speed_check(comparison: LatencyComparison, runtime: str) -> tuple[dict[str, Any], str | None]:
    """The timing of the original beside the slim model with its verdict under ``runtime`` (where the model is
    deployed): ``faster`` is false when any batch timed there is not faster, and the note says so."""
    slower = [row for row in comparison.rows if row.runtime == runtime and row.speedup <= 1.0]
    timed = {**comparison.to_dict(), "checked_runtime": runtime, "faster": not slower}
    if not slower:
        return timed, None
    speeds = ", ".join(f"batch {row.batch}: {row.speedup:.2f}x" for row in slower)
    return timed, (f"the slim model is not faster than the original under {runtime} ({speeds}; the MACs promised "
                   f"{comparison.macs_ratio:.2f}x): check --round-to, or prune for a --latency-target")


def layer_changes(before: list[LayerCost], after: list[LayerCost]) -> list[LayerChange]:
    """Before/after rows per original layer; a conv EDP kept decomposed is its basis and coefficient pair."""
    pruned = {c.name: c for c in after}
    rows = []
    for c in before:
        if c.name in pruned:
            now = pruned[c.name]
            rows.append(LayerChange(c.name, c.kind, c.out_channels, now.out_channels, c.in_channels, now.in_channels,
                                    c.macs, now.macs, c.params, now.params))
        elif f"{c.name}.basis" in pruned:
            basis, coeff = pruned[f"{c.name}.basis"], pruned[f"{c.name}.coeff"]
            rows.append(LayerChange(c.name, f"{c.kind} as rank {basis.out_channels}", c.out_channels, coeff.out_channels,
                                    c.in_channels, basis.in_channels, c.macs, basis.macs + coeff.macs, c.params,
                                    basis.params + coeff.params))
    return rows
