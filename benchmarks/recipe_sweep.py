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
import copy
import json
import time
from pathlib import Path

import torch
from quality import RECIPE, SAMPLE, images, torch_pruning_baseline

from prunecli.api import prune_model
from prunecli.config import ModelSource, PruneConfig, parse_budget
from prunecli.finetune import FinetuneConfig, evaluate, finetune, recalibrate_bn
from prunecli.io.data import ImageSet, iterate_batches
from prunecli.io.slim import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="fpgm", help="a weight criterion (no calibration data needed) or torch-pruning")
    parser.add_argument("--target", type=float, default=0.5, help="MACs to keep")
    parser.add_argument("--images", type=int, default=60000, help="training images in the epoch")
    parser.add_argument("--recipes", type=json.loads, default=[{}], help="JSON list of FinetuneConfig overrides")
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher = load(SAMPLE)
    test, train = images("test"), images("train", seed=1)
    if args.method == "torch-pruning":
        model, _ = torch_pruning_baseline(teacher, args.target, test.images[:1])
    else:
        output = Path("/tmp/prunecli-quality") / f"sweep-{args.method}-{args.target}.safetensors"
        output.parent.mkdir(exist_ok=True)
        prune_model(PruneConfig(ModelSource(SAMPLE), parse_budget("flops", str(args.target)), method=args.method,
                                output=output, force=True))
        model = load(output)
    recalibrate_bn(model, iterate_batches(train, 128), 20)
    subset = ImageSet(train.images[: args.images], train.labels[: args.images], train.description)
    for overrides in args.recipes:
        started = time.time()
        config = FinetuneConfig(**{**RECIPE, "kd": "variable", **overrides})
        tuned = finetune(copy.deepcopy(model), subset, None, config, teacher=teacher).model
        print(json.dumps({**overrides, "top1": evaluate(tuned, test).top1, "seconds": round(time.time() - started)}),
              flush=True)


if __name__ == "__main__":
    main()
