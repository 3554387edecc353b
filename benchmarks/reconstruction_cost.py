"""The cost of ``prune --reconstruct``: its time as a ratio to one forward pass over the same calibration images, and
its peak memory, on torchvision ResNet-50 at 224x224 (random init, BN statistics randomised, random images: the
cost does not depend on the values).

    python benchmarks/reconstruction_cost.py --images 256 --batch-size 32 --target 0.5
"""

from __future__ import annotations

import argparse
import copy
import json
import threading
import time
from pathlib import Path

import torch
import torchvision

from prunecli.budget import parse_budget
from prunecli.config import PlanOptions
from prunecli.criteria import get_criterion
from prunecli.criteria.base import score_weights
from prunecli.graph import DependencyGraph
from prunecli.measure import CostModel, costs_and_output
from prunecli.planning import plan_pruning
from prunecli.reconstruct import reconstruct


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


class PeakMemory:
    """Samples the resident set every 20 ms while the block runs: the peak above the level at entry."""

    def __enter__(self):
        self.start = self.peak = resident_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, resident_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())

    @property
    def added(self) -> int:
        return self.peak - self.start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            torch.nn.init.uniform_(module.weight, 0.2, 1.0)
    x = torch.randn(1, 3, 224, 224)
    costs, _ = costs_and_output(model, x)
    graph = DependencyGraph(copy.deepcopy(model), x)
    scores = score_weights(get_criterion("l1")(), graph, [g for g in graph.groups if g.prunable])
    plan, _ = plan_pruning(parse_budget("macs", str(args.target)), PlanOptions("uniform"), graph,
                           CostModel(model, costs, graph.groups), scores)
    kept = graph.kept_outputs(plan.removed)
    graph.prune(plan.removed)
    pruned = graph.model.eval()
    images = torch.randn(args.images, 3, 224, 224).split(args.batch_size)
    rows = {}
    with torch.no_grad():
        model(images[0])  # warm-up
        with PeakMemory() as memory:
            started = time.perf_counter()
            for batch in images:
                model(batch)
            rows["forward_s"] = time.perf_counter() - started
        rows["forward_peak_added_gib"] = memory.added / 2**30
    with PeakMemory() as memory:
        report = reconstruct(model, pruned, kept, images, bias_sink=graph.sole_norm_consumer)
    rows["reconstruct_s"] = report.seconds
    rows["reconstruct_peak_added_gib"] = memory.added / 2**30
    with torch.no_grad():
        started = time.perf_counter()
        for batch in images:
            model(batch)
        rows["forward_again_s"] = time.perf_counter() - started
    forward = (rows["forward_s"] + rows["forward_again_s"]) / 2
    rows.update(images=args.images, batch_size=args.batch_size, target=args.target, threads=torch.get_num_threads(),
                layers=len(report.layers), layers_refit=sum(f.refit for f in report.layers),
                ratio_to_forward=report.seconds / forward)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reconstruction_cost.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
