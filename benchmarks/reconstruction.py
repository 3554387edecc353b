"""Accuracy without training: every criterion pruned, + BN recalibration, + reconstruction, + both, on the sample models.

For each model, criterion and MACs target: top-1 on the full Fashion-MNIST test set right after pruning, after
batch-norm recalibration, after ``--reconstruct`` and after reconstruction followed by recalibration. The same 1024
unlabelled training images (a seeded subset) serve data-driven scoring, reconstruction and recalibration (8 batches
of 128). Beside them: Torch-Pruning alone (MetaPruner + group L1 magnitude, uniform ratio bisected to the target) and
Torch-Pruning's own plan followed by our reconstruction. A method may name an allocation (default uniform):
``l1@sensitivity`` plans on each group's damage measured on the same calibration images (``prunecli.sensitivity``).
Writes one JSON line per row and a markdown table.

    python benchmarks/reconstruction.py --models resnet20,mobilenetv2 --targets 0.3,0.5,0.7
    python benchmarks/reconstruction.py --models mobilenetv2 --methods l1,l1@sensitivity,recon,recon@sensitivity
"""

from __future__ import annotations

import os

# Sleeping instead of spinning at OpenMP barriers keeps a shared machine from stalling every op (sample_models/train.py)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from prunecli.budget import parse_budget
from prunecli.config import GROUP_SCOPE, DataOptions, ModelSource, PlanOptions, ReconstructOptions
from prunecli.criteria import list_criteria
from prunecli.criteria.base import score_weights, score_with_data
from prunecli.graph import DependencyGraph
from prunecli.io.data import ImageSet, iterate_batches, load_fashion_mnist, normalize
from prunecli.measure import CostModel, costs_and_output, totals
from prunecli.pipeline.opening import example_input, load_images, open_model
from prunecli.planning import group_limits, plan_pruning
from prunecli.reconstruct import reconstruct
from prunecli.sensitivity import group_sensitivity
from prunecli.training import evaluate, recalibrate_bn

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"resnet20": "resnet20_fmnist.safetensors", "mobilenetv2": "mobilenetv2_fmnist.safetensors"}
CALIBRATION = DataOptions("fashion-mnist:train", calib_images=1024, batch_size=128)
VARIANTS = ("pruned", "recalibrated", "reconstructed", "reconstructed_recalibrated")


def test_images() -> ImageSet:
    raw, labels = load_fashion_mnist("test")
    return ImageSet(normalize(raw), labels, "fashion-mnist:test")


def method_scores(method: str, graph: DependencyGraph, calibration: ImageSet) -> dict[int, torch.Tensor]:
    """``method`` is a criterion name, ``name:producers`` for a weight criterion scored on the producers alone."""
    from prunecli.criteria import get_criterion

    name, _, scope = method.partition(":")
    criterion = get_criterion(name)(seed=0)
    groups = [g for g in graph.groups if g.prunable]
    if not criterion.needs_data:
        return score_weights(criterion, graph, groups, scope=scope or GROUP_SCOPE)
    return score_with_data(criterion, graph, groups, iterate_batches(calibration, CALIBRATION.batch_size))


def torch_pruning_plan(model: torch.nn.Module, graph: DependencyGraph, target: float, x: torch.Tensor):
    """Torch-Pruning's MetaPruner + MagnitudeImportance(p=1) with its ratio bisected to ``target``: the pruned model
    and its plan in our groups' positions (from its pruning history), so our reconstruction can follow it."""
    import torch_pruning as tp

    base = totals(model, x).macs
    classifier = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    low, high, best = 0.0, 0.95, None
    for _ in range(12):
        ratio = (low + high) / 2
        candidate = copy.deepcopy(model)
        pruner = tp.pruner.MetaPruner(candidate, x, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=ratio, ignored_layers=[candidate.get_submodule(classifier)])
        pruner.step()
        kept = totals(candidate, x).macs / base
        if best is None or abs(kept - target) < abs(best[1] - target):
            best = (candidate, kept, pruner.pruning_history())
        low, high = (ratio, high) if kept > target else (low, ratio)
    candidate, _, history = best
    plan = {}
    for root, is_out, positions in history:
        if not is_out:
            continue
        group = next(g for g in graph.groups if any(m.layer == root and m.dim == "out" for m in g.members))
        member = next(m for m in group.members if m.layer == root and m.dim == "out")
        by_index = dict(zip(member.indices, member.root_indices, strict=True))
        plan[group.index] = sorted(by_index[int(p)] for p in positions)
    return candidate, plan


def variants(loaded, graph: DependencyGraph, plan, calibration: ImageSet, test: ImageSet) -> dict:
    """Top-1 of the four variants of one plan, and the reconstruction's time."""
    kept = graph.kept_outputs(plan)
    graph.prune(plan)
    pruned = graph.model.eval()
    row = {"pruned": evaluate(pruned, test).top1}
    recalibrated = copy.deepcopy(pruned)
    recalibrate_bn(recalibrated, iterate_batches(calibration, 128), 8)
    row["recalibrated"] = evaluate(recalibrated, test).top1
    started = time.perf_counter()
    report = reconstruct(loaded.model, pruned, kept, calibration.images.split(CALIBRATION.batch_size),
                         ReconstructOptions(), graph.sole_norm_consumer)
    row["reconstruct_seconds"] = time.perf_counter() - started
    row["layers_refit"] = sum(f.refit for f in report.layers)
    row["reconstructed"] = evaluate(pruned, test).top1
    recalibrate_bn(pruned, iterate_batches(calibration, 128), 8)
    row["reconstructed_recalibrated"] = evaluate(pruned, test).top1
    return row


def run(model_name: str, methods: list[str], targets: list[float], log: Path, done: list[dict]) -> list[dict]:
    """The rows of one model; rows already in ``done`` (an earlier run's log) are kept, not measured again."""
    source = ModelSource(ROOT / "sample_models" / MODELS[model_name])
    loaded = open_model(source)
    x = example_input(loaded)
    costs, _ = costs_and_output(loaded.model, x)
    calibration = load_images(CALIBRATION, loaded, CALIBRATION.calib_images, 0)
    test = test_images()
    unpruned = evaluate(loaded.model, test).top1
    rows = [{"model": model_name, "method": "unpruned", "target": 1.0, **dict.fromkeys(VARIANTS, unpruned)}]
    for method in methods:
        scores = curves = None
        criterion, _, allocation = method.partition("@")
        for target in targets:
            previous = [r for r in done if (r["model"], r["method"], r["target"]) == (model_name, method, target)]
            if previous:
                rows.append(previous[-1])
                continue
            graph = DependencyGraph(copy.deepcopy(loaded.model), x)
            if method == "torch-pruning":
                alone, plan = torch_pruning_plan(loaded.model, graph, target, x)
                baseline = {"tp_pruned": evaluate(alone, test).top1}
                recalibrate_bn(alone, iterate_batches(calibration, 128), 8)
                baseline["tp_recalibrated"] = evaluate(alone, test).top1
            else:
                scores = scores if scores is not None else method_scores(criterion, graph, calibration)
                options = PlanOptions(allocation or "uniform")
                if allocation == "sensitivity" and curves is None:
                    curves = group_sensitivity(graph, scores, group_limits(options, graph),
                                               calibration.images.split(CALIBRATION.batch_size), torch.device("cpu"))
                plan, _ = plan_pruning(parse_budget("macs", str(target)), options, graph,
                                       CostModel(loaded.model, costs, graph.groups), scores, sensitivity=curves)
                plan, baseline = plan.removed, {}
            row = {"model": model_name, "method": method, "target": target,
                   **variants(loaded, graph, plan, calibration, test), **baseline,
                   "macs_kept": totals(graph.model, x).macs / totals(loaded.model, x).macs}
            rows.append(row)
            with log.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict], targets: list[float]) -> str:
    head = "| model | method | " + " | ".join(f"{t:g}: pruned / +BN / +recon / +recon+BN" for t in targets) + " |"
    lines = [head, "|---|---|" + "---|" * len(targets)]
    for key in dict.fromkeys((r["model"], r["method"]) for r in rows):
        cells = []
        for target in targets:
            row = next((r for r in rows if (r["model"], r["method"]) == key and r["target"] == target), None)
            if row is None:
                row = next((r for r in rows if (r["model"], r["method"]) == key and r["method"] == "unpruned"), None)
            cells.append(" / ".join(f"{100 * row[v]:.2f}" for v in VARIANTS) if row else "")
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    for row in rows:
        if row["method"] == "torch-pruning":
            lines.append(f"\nTorch-Pruning alone, {row['model']} at {row['target']:g}: {100 * row['tp_pruned']:.2f} pruned, "
                         f"{100 * row['tp_recalibrated']:.2f} + BN recalibration (the torch-pruning row above is its plan "
                         "through our pipeline: same channels, then our BN recalibration / reconstruction)")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20")
    parser.add_argument("--targets", default="0.3,0.5,0.7", help="MACs to keep")
    parser.add_argument("--methods", default=",".join([*list_criteria(), *(f"{m}:producers" for m in ("l1", "l2", "fpgm")),
                                                        "torch-pruning"]),
                        help="criteria (name:producers scores a weight criterion on the producers alone; name@allocation "
                             "plans with that allocation) and torch-pruning")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    args = parser.parse_args()
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "reconstruction.jsonl"
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    targets = [float(t) for t in args.targets.split(",")]
    rows = []
    for model_name in args.models.split(","):
        rows += run(model_name, args.methods.split(","), targets, log, done)
    (args.out / "reconstruction.md").write_text(table(rows, targets))
    print(table(rows, targets))


if __name__ == "__main__":
    main()
