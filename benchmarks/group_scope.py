"""Which members of a coupled group the weight criteria should score: ``--group-scope producers`` or ``all``.

For every criterion that takes the option, both scopes, and each MACs target: top-1 of the sample ResNet-20 on
the full Fashion-MNIST test set right after pruning and after BN recalibration (20 batches of 128 training
images), beside Torch-Pruning's own group L1 (``MetaPruner`` + ``MagnitudeImportance(p=1)``) at the same
targets. Prints JSON lines and a markdown table (docs/benchmarks.md, "Group scope of the weight criteria").

    python benchmarks/group_scope.py --targets 0.3,0.5,0.7
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from quality import prune_sample, recalibrate, setup

from prunecli.config import GROUP_SCOPES
from prunecli.criteria import get_criterion, list_criteria
from prunecli.training import evaluate


def main() -> None:
    takes = [m for m in list_criteria() if get_criterion(m).group_members]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="0.3,0.5,0.7", help="MACs to keep")
    parser.add_argument("--methods", default=",".join(takes), help="criteria that take --group-scope ('' for none)")
    parser.add_argument("--no-baseline", action="store_true", help="skip Torch-Pruning's own group L1")
    args = parser.parse_args()
    work, teacher, test, train, x = setup(Path("/tmp/prunecli-group-scope"))
    started, rows = time.time(), []
    runs = [(m, s) for m in args.methods.split(",") if m for s in GROUP_SCOPES]
    runs += [] if args.no_baseline else [("torch-pruning", "")]
    for method, scope in runs:
        for target in (float(t) for t in args.targets.split(",")):
            options = {"group_scope": scope} if scope else {}
            model, kept = prune_sample(method, target, teacher, x, work, **options)
            row = {"method": method, "scope": scope, "target": target, "macs_kept": kept,
                   "pruned": evaluate(model, test).top1}
            recalibrate(model, train)
            row["recalibrated"] = evaluate(model, test).top1
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nunpruned {100 * evaluate(teacher, test).top1:.2f}% top-1; {(time.time() - started) / 60:.0f} min\n")
    targets = list(dict.fromkeys(r["target"] for r in rows))
    print("| method | scope | " + " | ".join(f"{t} pruned | {t} + BN recal" for t in targets) + " |")
    print("|---|---|" + "---|---|" * len(targets))
    for key in dict.fromkeys((r["method"], r["scope"]) for r in rows):
        mine = {r["target"]: r for r in rows if (r["method"], r["scope"]) == key}
        cells = " | ".join(f"{100 * mine[t]['pruned']:.2f} | {100 * mine[t]['recalibrated']:.2f}" for t in targets)
        print(f"| {key[0]} | {key[1] or 'its own group L1'} | {cells} |")


if __name__ == "__main__":
    main()
