"""Is ``prune --latency-target`` stable run to run? The CLI as a user types it (default options: onnxruntime on the
CPU, batch 1, every thread, ``--round-to auto``), run ``--runs`` times per target on a torchvision model with random
weights, in fresh processes sharing one latency-table cache (the first run times the table). Each run's line: the
ratio of the kept model's second timing to the original's, whether that is within 5% of the target, the MACs kept,
each slim model's first and second timing as a share of the original's (* the one kept) and the wall time. Run it
on a busy machine too: that is what it is for.

    python benchmarks/latency_stability.py --model mobilenet_v2 --targets 0.6,0.7 --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2", help="a torchvision classification model")
    parser.add_argument("--targets", default="0.6,0.7", help="latency targets, comma-separated")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--extra", default="", help="more prune options, as one string")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / f"{args.model}.pt"
        torch.save(getattr(torchvision.models, args.model)(weights=None).state_dict(), checkpoint)
        env = {"PRUNECLI_CACHE": str(Path(tmp) / "cache")}
        print("| target | run | measured (second timing) | within 5% | MACs kept | slim models: first / second timing | "
              "wall s |")
        print("|---|---|---|---|---|---|---|")
        for target in args.targets.split(","):
            for run in range(1, args.runs + 1):
                command = [sys.executable, "-m", "prunecli", "prune", str(checkpoint), "--latency-target", target,
                           "-o", str(Path(tmp) / "slim.safetensors"), "--force", "--json", *args.extra.split()]
                start = time.perf_counter()
                done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env})
                wall = time.perf_counter() - start
                if done.returncode:
                    print(f"| {target} | {run} | {done.stderr.strip().splitlines()[-1]} | | | | {wall:.0f} |", flush=True)
                    continue
                out = json.loads(done.stdout)
                record = out["latency_target"]
                kept = out["after"]["macs"] / out["before"]["macs"]
                timings = ", ".join(f"{s['measured_ratio']:.2f}/{s['again_ms'] / record['original_ms']:.2f}"
                                    + ("*" if i == record["chosen"] else "") for i, s in enumerate(record["iterations"]))
                print(f"| {target} | {run} | {record['measured_ratio']:.3f} | {'yes' if record['converged'] else 'no'} | "
                      f"{100 * kept:.1f}% | {timings} | {wall:.0f} |", flush=True)


if __name__ == "__main__":
    main()
