"""Scoring time of each data-driven criterion relative to a plain forward pass over the same images.

torchvision ResNet-50 (random weights) in eval mode on the CPU, calibration images drawn at random;
every criterion runs the one streaming pass of prunecli's scorer. Each criterion's ratio is taken
against a plain forward pass timed just before it, so both saw the same load on a shared machine.
Peak memory is the process's maximum RSS after that criterion's pass (a lower bound after the first,
larger one). With taylor, a last row times a plain PyTorch forward + backward pass (only the batch norms'
parameters requiring gradients, no prunecli code): the floor for any gradient criterion.

    python benchmarks/scoring_speed.py --images 256 --batch-size 32
"""

from __future__ import annotations

import argparse
import copy
import resource
import time

import torch
import torchvision

from prunecli.criteria import get_criterion
from prunecli.criteria.base import gradients_only_for, score_weights, score_with_data
from prunecli.graph import DependencyGraph

DATA_DRIVEN = ("lrmf", "dct", "taylor", "hrank", "chip")


def batches(images: torch.Tensor, labels: torch.Tensor, size: int):
    for start in range(0, len(images), size):
        yield images[start : start + size], labels[start : start + size]


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--methods", default=",".join((*DATA_DRIVEN, "icie")))
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    images = torch.randn(args.images, 3, args.size, args.size)
    labels = torch.randint(0, 1000, (args.images,))
    graph = DependencyGraph(copy.deepcopy(model), images[:1])
    groups = [g for g in graph.groups if g.prunable]

    def forward_seconds() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for x, _ in batches(images, labels, args.batch_size):
                graph.model(x)
        return time.perf_counter() - start

    def forward_backward_seconds() -> float:
        norms = [m for m in graph.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        start = time.perf_counter()
        with gradients_only_for(graph.model, norms):
            for x, y in batches(images, labels, args.batch_size):
                torch.nn.functional.cross_entropy(graph.model(x), y).backward()
        graph.model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    forward_seconds()  # warm-up
    print(f"ResNet-50, {args.images} images {args.size}x{args.size}, batch {args.batch_size}; "
          f"peak RSS after a forward pass {peak_mib():.0f} MiB\n")
    print("| method | forward (s) | seconds | x forward | peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    for name in args.methods.split(","):
        forward = forward_seconds()
        criterion = get_criterion(name)()
        before = peak_mib()
        start = time.perf_counter()
        if criterion.needs_data:
            score_with_data(criterion, graph, groups, batches(images, labels, args.batch_size))
        else:
            score_weights(criterion, graph, groups)
        seconds = time.perf_counter() - start
        print(f"| {name} | {forward:.1f} | {seconds:.1f} | {seconds / forward:.2f} | {max(before, peak_mib()):.0f} |",
              flush=True)
    if "taylor" in args.methods.split(","):
        forward, seconds = forward_seconds(), forward_backward_seconds()
        print(f"| plain forward + backward | {forward:.1f} | {seconds:.1f} | {seconds / forward:.2f} | {peak_mib():.0f} |")


if __name__ == "__main__":
    main()
