"""Whole-process time and peak memory of `prunecli prune` against a plain Torch-Pruning one-shot script.

Both prune torchvision ResNet-50 (random weights) on the CPU; runs alternate, one of each per pair, so a drift in the
machine's speed hits both sides of a pair alike; the figure reported is the median of the pairs' ratios.

    python benchmarks/prune_speed.py --pairs 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TORCH_PRUNING_SCRIPT = """
import sys, torch, torchvision, torch_pruning as tp
model = torchvision.models.resnet50(weights=None)
model.load_state_dict(torch.load(sys.argv[1], weights_only=True))
model.eval()
example = torch.randn(1, 3, 224, 224)
pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                              pruning_ratio=0.3, ignored_layers=[model.fc])
pruner.step()
macs, params = tp.utils.count_ops_and_params(model, example)
torch.save(model.state_dict(), sys.argv[2])
print(macs, params)
"""


def timed(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one child process."""
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{command[:4]} failed")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args()
    import torch
    import torchvision

    work = Path(tempfile.mkdtemp(prefix="prunecli-bench-"))
    checkpoint = work / "resnet50.pt"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), checkpoint)
    prunecli = [sys.executable, "-m", "prunecli", "prune", str(checkpoint), "--arch", "torchvision:resnet50",
                "--method", "l1", "--flops-target", "0.5", "-o", str(work / "slim.safetensors"), "--force", "-q",
                "--device", "cpu"]
    plain = [sys.executable, "-c", TORCH_PRUNING_SCRIPT, str(checkpoint), str(work / "tp.pt")]
    ours, theirs, peaks = [], [], []
    for _ in range(args.pairs):
        seconds, rss = timed(prunecli)
        ours.append(seconds)
        peaks.append(rss)
        theirs.append(timed(plain)[0])
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    print("| pair | prunecli prune (s) | Torch-Pruning script (s) | ratio |")
    print("|---|---|---|---|")
    for i, (a, b, r) in enumerate(zip(ours, theirs, ratios, strict=True), 1):
        print(f"| {i} | {a:.2f} | {b:.2f} | {r:.3f} |")
    print(f"\nmedian of the pairs' ratios prunecli / Torch-Pruning: {statistics.median(ratios):.3f} (target <= 1.0); "
          f"prunecli peak RSS: {max(peaks):.0f} MiB (target < 2048)")


if __name__ == "__main__":
    main()
