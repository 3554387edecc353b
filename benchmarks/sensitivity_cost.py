"""The cost of ``prune --allocation sensitivity``: the time of measuring every prunable group's damage, replaying
the unchanged layers before each group's readers (the default) and rerunning the whole model for every narrowed
width (each twice, alternated; the mean), as ratios to one forward pass over the same calibration images, and their
peak memory; torchvision models, random init and random images (the cost does not depend on the values).

    python benchmarks/sensitivity_cost.py --models mobilenet_v2,resnet50 --size 128 --images 32 --batch-size 32
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from reconstruction_cost import PeakMemory

from prunecli.allocate import GroupLimits
from prunecli.criteria import get_criterion
from prunecli.criteria.base import score_weights
from prunecli.graph import DependencyGraph
from prunecli.sensitivity import group_sensitivity


def timed(run) -> tuple[float, object]:
    started = time.perf_counter()
    result = run()
    return time.perf_counter() - started, result


def measure(name: str, size: int, images: int, batch_size: int) -> dict:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    graph = DependencyGraph(copy.deepcopy(model), torch.randn(1, 3, size, size))
    scores = score_weights(get_criterion("l1")(), graph, [g for g in graph.groups if g.prunable])
    limits = {g.index: GroupLimits(g.channels, g.blocks, g.prunable, 0.9, 1, g.parts) for g in graph.groups}
    batches = torch.randn(images, 3, size, size).split(batch_size)
    row = {"model": name, "size": size, "images": images, "batch_size": batch_size, "threads": torch.get_num_threads()}
    with torch.no_grad():
        model(batches[0])  # warm-up
        with PeakMemory() as memory:
            row["forward_s"] = statistics.median(timed(lambda: [model(b) for b in batches])[0] for _ in range(5))
        row["forward_peak_added_gib"] = memory.added / 2**30
    curves, seconds = {}, {"replay": [], "rerun": []}
    for mode in ("replay", "rerun") * 2:  # alternated: the first call of a process runs slower
        with PeakMemory() as memory:
            spent, curves[mode] = timed(lambda mode=mode: group_sensitivity(
                graph, scores, limits, batches, torch.device("cpu"), replay=mode == "replay"))
        seconds[mode].append(spent)
        row[f"{mode}_peak_added_gib"] = memory.added / 2**30
    for mode, runs in seconds.items():
        row[f"{mode}_s"] = runs
        row[f"{mode}_to_forward"] = statistics.mean(runs) / row["forward_s"]
    assert all(np.array_equal(curves["rerun"][g][1], curves["replay"][g][1]) for g in curves["rerun"])
    row.update(groups=len(curves["replay"]), widths=sum(len(w) - 1 for w, _ in curves["replay"].values()),
               speedup=statistics.mean(seconds["rerun"]) / statistics.mean(seconds["replay"]))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenet_v2,resnet50")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args()
    rows = [measure(name, args.size, args.images, args.batch_size) for name in args.models.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sensitivity_cost.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
