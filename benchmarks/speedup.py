"""Measured onnxruntime speedup of pruned torchvision models next to the MACs ratio that promised it.

Each model (random weights: latency does not depend on their values) is pruned with prunecli's API to
each MACs target with ``--method l1 --round-to 8`` and the chosen allocation, then the original and the
slim model are exported to ONNX (in memory, dynamic batch) and timed with onnxruntime on the CPU
(``prunecli.latency.compare_latency``: median over ``--repeats`` runs after ``--warmup`` untimed ones, the
original's and the slim model's runs alternating, so load on the machine hits both alike). "efficiency" is the
measured speedup divided by the MACs ratio: 100% means the runtime turned every removed MAC into time.

    python benchmarks/speedup.py                                   # everything (long on a small CPU)
    python benchmarks/speedup.py --models resnet50 --targets 0.5 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import torchvision

import prunecli
from prunecli.api import prune_model
from prunecli.budget import parse_budget
from prunecli.config import ModelSource, OutputOptions, PlanOptions, PruneConfig
from prunecli.latency import compare_latency

ROOT = Path(__file__).resolve().parents[1]
INPUT_SHAPE = (3, 224, 224)


def _csv(kind):
    return lambda text: [kind(v) for v in text.split(",") if v]


def measure(name: str, target: float, args: argparse.Namespace, work: Path) -> list[dict]:
    """Prune torchvision ``name`` to ``target`` of its MACs and time it beside the original: one row per batch."""
    checkpoint = work / f"{name}.pt"
    if not checkpoint.exists():
        torch.manual_seed(0)
        torch.save(getattr(torchvision.models, name)(weights=None).state_dict(), checkpoint)
    config = PruneConfig(ModelSource(checkpoint, f"torchvision:{name}", input_shape=INPUT_SHAPE),
                         parse_budget("macs", str(target)), plan=PlanOptions(args.allocation, round_to=8),
                         output=OutputOptions(work / f"{name}-{target}.safetensors", force=True))
    started = time.perf_counter()
    pruned = prune_model(config)
    prune_seconds = time.perf_counter() - started
    original = getattr(torchvision.models, name)(weights=None)
    original.load_state_dict(torch.load(checkpoint, weights_only=True))
    timing = compare_latency(original.eval(), prunecli.load(pruned.output), INPUT_SHAPE, batch_sizes=args.batches,
                             warmup=args.warmup, repeats=args.repeats, runtimes=("onnxruntime",), threads=args.threads)
    return [
        {"model": name, "target": target, "macs_kept": pruned.macs_kept, "original_macs": timing.original_macs,
         "slim_macs": timing.slim_macs, "macs_ratio": timing.macs_ratio, "batch": row.batch,
         "original_ms": row.original_ms, "slim_ms": row.slim_ms, "speedup": row.speedup,
         "efficiency": row.speedup / timing.macs_ratio, "prune_seconds": prune_seconds}
        for row in timing.rows
    ]


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "# Measured speedup vs MACs ratio (onnxruntime, CPU)",
        "",
        f"`python benchmarks/speedup.py {args.command_line}` — torchvision models with random weights at "
        f"{'x'.join(map(str, INPUT_SHAPE))}, pruned with `--method l1 --allocation {args.allocation} --round-to 8`, "
        f"onnxruntime {args.ort_version} CPUExecutionProvider with {args.threads} intra-op thread(s), median of "
        f"{args.repeats} runs after {args.warmup} warm-up runs, original and slim runs alternating "
        f"({args.machine}).",
        "",
        "| model | MACs target | MACs kept | batch | original ms | slim ms | speedup | MACs ratio | speedup / MACs ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join([*lines, *map(table_row, rows)]) + "\n"


def table_row(r: dict) -> str:
    return (f"| {r['model']} | {r['target']:g} | {100 * r['macs_kept']:.1f}% | {r['batch']} | {r['original_ms']:.1f} | "
            f"{r['slim_ms']:.1f} | {r['speedup']:.2f}x | {r['macs_ratio']:.2f}x | {100 * r['efficiency']:.0f}% |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=_csv(str), default=["resnet50", "mobilenet_v2", "vgg16_bn"])
    parser.add_argument("--targets", type=_csv(float), default=[0.3, 0.5, 0.7], help="MACs to keep, e.g. 0.3,0.5")
    parser.add_argument("--batches", type=_csv(int), default=[1, 16])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--allocation", choices=["uniform", "global"], default="uniform")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "docs", help="where speedup.md and speedup.json go")
    args = parser.parse_args()
    import onnxruntime

    args.command_line = " ".join(
        f"--{k} {','.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in (("models", args.models), ("targets", args.targets), ("batches", args.batches),
                     ("repeats", args.repeats), ("warmup", args.warmup), ("threads", args.threads),
                     ("allocation", args.allocation))
    )
    args.ort_version = onnxruntime.__version__
    args.machine = f"{platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="prunecli-speedup-") as folder:
        for name in args.models:
            for target in args.targets:
                measured = measure(name, target, args, Path(folder))
                print(*map(table_row, measured), sep="\n", flush=True)
                rows += measured
    (args.output_dir / "speedup.json").write_text(json.dumps({"settings": {k: v for k, v in vars(args).items()
                                                                           if k != "output_dir"}, "rows": rows},
                                                             indent=2, default=str) + "\n")
    (args.output_dir / "speedup.md").write_text(markdown(rows, args))
    print(markdown(rows, args))


if __name__ == "__main__":
    main()
