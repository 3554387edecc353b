"""Accuracy of the sample ResNet-20 (Fashion-MNIST) pruned with each criterion, before and after recovery.

For every criterion and MACs target: top-1 on the full 10k test set right after pruning, after batch-norm
recalibration (20 batches of 128 training images), and after one fine-tuning epoch without and with
SFP's variable-temperature distillation from the unpruned model. In the same run, the baseline a user
would otherwise pick: Torch-Pruning's own MetaPruner with magnitude (L1) importance, its uniform ratio
bisected to the same MACs. EDP, which trains while it prunes, gets the same total training as the others'
fine-tuning: one epoch over the same images is its whole training (at the fine-tuning target only), so its
"pruned" column is the accuracy after that epoch. Writes a markdown table and an accuracy-vs-MACs-removed plot.

    python benchmarks/quality.py --targets 0.3,0.5,0.7 --finetune-target 0.5 --finetune-images 60000
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from prunecli.api import prune_model
from prunecli.budget import parse_budget
from prunecli.config import (
    DataOptions,
    EdpOptions,
    FinetuneConfig,
    ModelSource,
    OutputOptions,
    PlanOptions,
    PruneConfig,
    ScoringOptions,
)
from prunecli.criteria import get_criterion, list_criteria
from prunecli.io.data import ImageSet, iterate_batches, load_fashion_mnist, normalize
from prunecli.io.slim import load
from prunecli.measure import totals
from prunecli.methods.edp import edp_prune
from prunecli.planning import Selection
from prunecli.training import evaluate, finetune, recalibrate_bn

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_models" / "resnet20_fmnist.safetensors"
CALIB = ROOT / "sample_models" / "fmnist_calib.safetensors"


def images(split: str, limit: int | None = None, seed: int = 0) -> ImageSet:
    raw, labels = load_fashion_mnist(split)
    index = torch.randperm(len(raw), generator=torch.Generator().manual_seed(seed))[:limit] if limit else slice(None)
    return ImageSet(normalize(raw[index]), labels[index], f"fashion-mnist:{split}")


# One epoch from a trained model: no augmentation and batch 64 (twice the steps of 128) recovered most in a sweep of
# eight recipes on fpgm at 0.5 (docs/quality.md); every method and the baseline get the same recipe.
RECIPE = {"epochs": 1, "lr": 0.01, "batch_size": 64, "augment": "none", "warmup_epochs": 0.1, "seed": 0, "device": "cpu"}


def setup(work: Path):
    """Seeded run: the work folder (created), the unpruned sample, the test and training sets, an example input."""
    torch.manual_seed(0)
    work.mkdir(exist_ok=True)
    test = images("test")
    return work, load(SAMPLE), test, images("train", seed=1), test.images[:1]


def first(train: ImageSet, count: int) -> ImageSet:
    return ImageSet(train.images[:count], train.labels[:count], train.description)


def recover(model, train: ImageSet, test: ImageSet, teacher, epoch_images: int, kd: bool, **overrides) -> float:
    """Top-1 after one fine-tuning epoch of a copy of ``model`` with ``RECIPE`` (and ``overrides``)."""
    config = FinetuneConfig(**{**RECIPE, "kd": "variable" if kd else "none", **overrides})
    tuned = finetune(copy.deepcopy(model), first(train, epoch_images), None, config, teacher=teacher if kd else None).model
    return evaluate(tuned, test).top1


def recalibrate(model, train: ImageSet) -> None:
    recalibrate_bn(model, iterate_batches(train, 128), 20)


def prune_sample(method: str, target: float, teacher, x: torch.Tensor, work: Path, **options):
    """The sample pruned by a criterion or by the Torch-Pruning baseline: (model, MACs kept).

    ``options`` are further ``ScoringOptions`` fields (``group_scope="all"``, ...).
    """
    if method == "torch-pruning":
        return torch_pruning_baseline(teacher, target, x)
    needs_data = get_criterion(method).needs_data
    tag = "".join(f"-{v}" for v in options.values())
    config = PruneConfig(ModelSource(SAMPLE), parse_budget("macs", str(target)),
                         data=DataOptions(str(CALIB), calib_images=512, batch_size=128) if needs_data else None,
                         scoring=ScoringOptions(method, **options),
                         output=OutputOptions(work / f"{method}{tag}-{target}.safetensors", force=True))
    kept = prune_model(config).macs_kept
    return load(config.output.path), kept


def torch_pruning_baseline(reference, target: float, x: torch.Tensor):
    """Torch-Pruning alone: MetaPruner + MagnitudeImportance(p=1), uniform ratio bisected to the MACs target."""
    import torch_pruning as tp

    base = totals(reference, x).macs
    low, high, best = 0.0, 0.95, None
    for _ in range(12):
        ratio = (low + high) / 2
        model = copy.deepcopy(reference)
        pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=ratio, ignored_layers=[model.fc])
        pruner.step()
        kept = totals(model, x).macs / base
        if best is None or abs(kept - target) < abs(best[1] - target):
            best = (model, kept)
        low, high = (ratio, high) if kept > target else (low, ratio)
    return best


def edp(reference, train: ImageSet, epoch_images: int, target: float, x: torch.Tensor):
    """EDP with the same total training as the others' one fine-tuning epoch: one epoch over the same images."""
    config = FinetuneConfig(**RECIPE)
    selection = Selection(parse_budget("macs", str(target)), PlanOptions("global"), ScoringOptions("edp"))
    result = edp_prune(copy.deepcopy(reference), x, first(train, epoch_images), None, EdpOptions(config), selection)
    return result.model, totals(result.model, x).macs / totals(reference, x).macs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="0.3,0.5,0.7", help="MACs to keep")
    parser.add_argument("--finetune-target", type=float, default=0.5)
    parser.add_argument("--finetune-images", type=int, default=60000, help="images in the one fine-tuning epoch")
    parser.add_argument("--methods", default=",".join([*list_criteria(), "edp"]))
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--previous", type=Path, help="log of an earlier run: its rows are reused, their methods skipped")
    args = parser.parse_args()
    work, teacher, test, train, x = setup(Path("/tmp/prunecli-quality"))
    baseline = evaluate(teacher, test).top1
    rows, started = [], time.time()
    if args.previous:
        rows = [json.loads(line) for line in args.previous.read_text().splitlines() if line.startswith("{")]
    targets = [float(t) for t in args.targets.split(",")]
    for method in [*args.methods.split(","), "torch-pruning"]:
        for target in targets:
            if any(r["method"] == method and r["target"] == target for r in rows):
                continue
            row = {"method": method, "target": target}
            if method == "edp":
                if target != args.finetune_target:
                    continue
                model, row["macs_kept"] = edp(teacher, train, args.finetune_images, target, x)
            else:
                model, row["macs_kept"] = prune_sample(method, target, teacher, x, work)
            row["pruned"] = evaluate(model, test).top1
            recalibrate(model, train)
            row["recalibrated"] = evaluate(model, test).top1
            if target == args.finetune_target and method != "edp":  # EDP's one epoch is its training
                row["finetuned"] = recover(model, train, test, teacher, args.finetune_images, kd=False)
                row["finetuned_kd"] = recover(model, train, test, teacher, args.finetune_images, kd=True)
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_report(rows, baseline, targets, args, time.time() - started)


def write_report(rows, baseline: float, targets, args, seconds: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps({"baseline": baseline, "rows": rows}, indent=1) + "\n")
    lines = [f"Unpruned sample ResNet-20: {100 * baseline:.2f}% top-1 on the 10k Fashion-MNIST test set. "
             f"Fine-tuning: one epoch over {args.finetune_images} training images at MACs target {args.finetune_target} "
             f"(SGD, lr 0.01, cosine, batch 64, no augmentation; KD = variable temperature 4 -> 1, alpha 0.7). "
             f"Run time {seconds / 60:.0f} min. `edp` trains while it prunes: one epoch over the same images with the same "
             "recipe is its whole training (no KD), so its \"pruned\" column is the accuracy after that epoch, and in the "
             "plot its one point sits far above the others, which are not trained yet.", "",
             "| method | MACs kept (target) | pruned | + BN recal | + 1 epoch FT | + 1 epoch FT with KD |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ft = f"{100 * r['finetuned']:.2f}" if "finetuned" in r else ""
        kd = f"{100 * r['finetuned_kd']:.2f}" if "finetuned_kd" in r else ""
        lines.append(f"| {r['method']} | {r['macs_kept']:.3f} ({r['target']}) | {100 * r['pruned']:.2f} | "
                     f"{100 * r['recalibrated']:.2f} | {ft} | {kd} |")
    (args.out / "quality.md").write_text("\n".join(lines) + "\n")
    figure, axis = plt.subplots(figsize=(8, 5))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colours = plt.get_cmap("tab20").colors  # one colour per method: tab10 repeats after ten
    for i, method in enumerate(methods):
        mine = [r for r in rows if r["method"] == method]
        axis.plot([100 * (1 - r["macs_kept"]) for r in mine], [100 * r["recalibrated"] for r in mine],
                  marker="osD^v<>"[i % 7], color=colours[i % len(colours)], label=method,
                  linestyle="--" if method == "torch-pruning" else "-")
    axis.axhline(100 * baseline, color="black", linewidth=0.8, label="unpruned")
    axis.set_xlabel("MACs removed (%)")
    axis.set_ylabel("top-1 after BN recalibration (%)")
    axis.set_title("Sample ResNet-20 on Fashion-MNIST")
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(args.out / "quality.png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
