"""Which one-epoch fine-tuning recipe recovers most: the sweep behind ``RECIPE`` in quality.py.

Prunes the sample ResNet-20 once (one criterion, one MACs target), recalibrates its batch norms as
quality.py does, then fine-tunes a copy with variable-temperature KD for one epoch per recipe (quality.py's
``RECIPE`` with the given overrides) and prints the top-1 on the 10k test set, one JSON line per recipe.

    python benchmarks/recipe_sweep.py --method fpgm --images 60000 \
        --recipes '[{"batch_size": 128, "augment": "auto"}, {}, {"lr": 0.02}]'
    python benchmarks/recipe_sweep.py --method torch-pruning --recipes '[{"seed": 1}, {"seed": 2}]'
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from quality import SAMPLE, images, prune_sample, recalibrate, recover

from prunecli.io.slim import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="fpgm", help="a criterion, or torch-pruning")
    parser.add_argument("--target", type=float, default=0.5, help="MACs to keep")
    parser.add_argument("--images", type=int, default=60000, help="training images in the epoch")
    parser.add_argument("--recipes", type=json.loads, default=[{}], help="JSON list of FinetuneConfig overrides")
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher = load(SAMPLE)
    test, train = images("test"), images("train", seed=1)
    work = Path("/tmp/prunecli-quality")
    work.mkdir(exist_ok=True)
    model, _ = prune_sample(args.method, args.target, teacher, test.images[:1], work)
    recalibrate(model, train)
    for overrides in args.recipes:
        started = time.time()
        top1 = recover(model, train, test, teacher, args.images, kd=True, **overrides)
        print(json.dumps({**overrides, "top1": top1, "seconds": round(time.time() - started)}), flush=True)


if __name__ == "__main__":
    main()
