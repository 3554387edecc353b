"""Measured speedup of models pruned with prunecli's default options, next to the MACs ratio that promised it.

Each model is pruned with prunecli's API and nothing but the MACs target (``prune --flops-target T``: l1,
uniform allocation, ``--round-to auto``), then the original and the slim model are timed side by side
(``prunecli.latency.compare_latency``: the original's and the slim model's runs alternating, each measurement at
least ``latency.MODEL_SECONDS`` long, median of ``--repeats``) under each setting: onnxruntime's CPU provider
with one intra-op thread and with all of them, and torch eager. "efficiency" is the measured speedup divided by
the MACs ratio: 100% means the runtime turned every removed MAC into time. torchvision models have random
weights (latency does not depend on their values); the sample models are the bundled trained ones.

    python benchmarks/speedup.py                                   # the whole grid (about 15 min on 2 cores)
    python benchmarks/speedup.py --models resnet50 --targets 0.5 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import tempfile
import time
from pathlib import Path

import torch
import torchvision

import prunecli
from prunecli.api import prune_model
from prunecli.budget import parse_budget
from prunecli.config import ModelSource, OutputOptions, PruneConfig
from prunecli.latency import compare_latency

ROOT = Path(__file__).resolve().parents[1]
IMAGENET = (3, 224, 224)
SAMPLES = {"sample-resnet20": "resnet20_fmnist.safetensors", "sample-mobilenetv2": "mobilenetv2_fmnist.safetensors"}
DEPTHWISE = {"mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny", "sample-mobilenetv2"}
SETTINGS = (("onnxruntime", 1), ("onnxruntime", None), ("torch", None))  # (runtime, threads): None = all
WIDTH_MULTIPLIED = ("mobilenet_v2", "mobilenet_v3_large", "regnet_y_800mf")


def _csv(kind):
    return lambda text: [kind(v) for v in text.split(",") if v]


def source(name: str, work: Path) -> tuple[ModelSource, torch.nn.Module]:
    """The checkpoint a user would hold for ``name`` and the original model to time against."""
    if name in SAMPLES:
        path = ROOT / "sample_models" / SAMPLES[name]
        return ModelSource(path), prunecli.load(path)
    checkpoint = work / f"{name}.pt"
    torch.manual_seed(0)
    original = getattr(torchvision.models, name)(weights=None)
    torch.save(original.state_dict(), checkpoint)
    return ModelSource(checkpoint, f"torchvision:{name}", input_shape=IMAGENET), original


def width_multiplied(name: str, target: float) -> tuple[torch.nn.Module, float]:
    """The network's own narrower variant keeping about ``target`` of its MACs (torchvision's ``width_mult``,
    channels in multiples of 16 like ``--round-to auto`` here; for RegNet every stage's width scaled in whole groups,
    16 channels wide as in the original), and the multiplier: what the architecture's authors would
    deploy, so its speedup is the ceiling to hold a pruned model of the same MACs against."""
    from prunecli.measure import layer_costs

    def build(width: float) -> torch.nn.Module:
        if name == "mobilenet_v2":
            return torchvision.models.MobileNetV2(width_mult=width, round_nearest=16)
        if name == "regnet_y_800mf":  # every stage width scaled, in whole 16-wide groups; depths kept
            regnet = torchvision.models.regnet
            full = regnet.BlockParams.from_init_params(depth=14, w_0=56, w_a=38.84, w_m=2.4, group_width=16,
                                                       se_ratio=0.25)
            widths = [16 * max(1, round(w * width / 16)) for w in full.widths]
            return torchvision.models.RegNet(regnet.BlockParams(full.depths, widths, full.group_widths,
                                                                full.bottleneck_multipliers, full.strides, 0.25))
        setting, last = torchvision.models.mobilenetv3._mobilenet_v3_conf(name, width_mult=width)
        return torchvision.models.MobileNetV3(setting, last)

    def macs(model: torch.nn.Module) -> int:
        return sum(c.macs for c in layer_costs(model.eval(), torch.zeros(1, *IMAGENET)))

    full, low, high = macs(build(1.0)), 0.05, 1.0
    for _ in range(12):
        middle = (low + high) / 2
        low, high = (middle, high) if macs(build(middle)) < target * full else (low, middle)
    torch.manual_seed(0)
    return build(high), high


def time_pair(original, slim, input_shape, args, row: dict) -> list[dict]:
    """``row`` once per timing setting and batch, with the measured speedup of ``slim`` beside ``original``."""
    rows = []
    for runtime, threads in SETTINGS:
        timing = compare_latency(original.eval(), slim.eval(), input_shape, batch_sizes=args.batches,
                                 warmup=args.warmup, repeats=args.repeats, runtimes=(runtime,), threads=threads)
        rows += [{**row, "macs_kept": 1 / timing.macs_ratio, "runtime": runtime, "threads": threads or "all",
                  "batch": r.batch, "original_ms": r.original_ms, "slim_ms": r.slim_ms, "speedup": r.speedup,
                  "macs_ratio": timing.macs_ratio, "efficiency": r.speedup / timing.macs_ratio} for r in timing.rows]
    return rows


def measure(name: str, target: float, args: argparse.Namespace, work: Path) -> list[dict]:
    """Prune ``name`` to ``target`` of its MACs with the defaults and time it beside the original; for a
    width-multiplied family, its own narrower variant of the same MACs too."""
    model_source, original = source(name, work)
    config = PruneConfig(model_source, parse_budget("macs", str(target)),
                         output=OutputOptions(work / f"{name}-{target}.safetensors", force=True))
    started = time.perf_counter()
    pruned = prune_model(config)
    prune_seconds = time.perf_counter() - started
    multiple = next((int(m) for note in reversed(pruned.notes)
                     for m in re.findall(r"multiples of (\d+)", note)[-1:]), 1)
    rows = time_pair(original, prunecli.load(pruned.output), pruned.model.input_shape, args,
                     {"model": name, "target": target, "round_to": multiple, "prune_seconds": prune_seconds})
    if name in WIDTH_MULTIPLIED and args.references:
        narrow, width = width_multiplied(name, target)
        rows += time_pair(original, narrow, IMAGENET, args,
                          {"model": f"{name} width {width:.3f}", "target": target, "round_to": 16})
    return rows


def column(r: dict) -> str:
    runtime = "ort" if r["runtime"] == "onnxruntime" else "torch"
    threads = "all" if r["threads"] == "all" else f"{r['threads']}t"
    return f"{runtime} {threads} b{r['batch']}"


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    """One line per model and target; each timing column is speedup / MACs ratio (the speedup in brackets)."""
    columns = list(dict.fromkeys(column(r) for r in rows))
    cells: dict[tuple, dict] = {}
    for r in rows:
        cells.setdefault((r["model"], r["target"]), {})[column(r)] = r
    lines = [
        f"`python benchmarks/speedup.py {args.command_line}` (onnxruntime {args.ort_version}, torch "
        f"{torch.__version__}, {args.machine}). Each cell: speedup divided by the MACs ratio (the speedup itself in "
        f"brackets); \"all\" threads is {os.cpu_count()} here.",
        "",
        "| model | target | MACs kept | channel multiple | " + " | ".join(columns) + " |",
        "|---|---|---|---|" + "---|" * len(columns),
    ]
    for (model, target), by_column in cells.items():
        first = next(iter(by_column.values()))
        lines.append(f"| {model} | {target:g} | {100 * first['macs_kept']:.1f}% | {first['round_to']} | " + " | ".join(
            f"{100 * by_column[c]['efficiency']:.0f}% ({by_column[c]['speedup']:.2f}x)" if c in by_column else ""
            for c in columns) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=_csv(str), default=["resnet50", "mobilenet_v2", "mobilenet_v3_large",
                                                             "efficientnet_b0", "convnext_tiny", "regnet_y_800mf",
                                                             *SAMPLES])
    parser.add_argument("--targets", type=_csv(float), default=[0.3, 0.5, 0.7], help="MACs to keep, e.g. 0.3,0.5")
    parser.add_argument("--batches", type=_csv(int), default=[1, 16])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-references", dest="references", action="store_false",
                        help="skip timing MobileNets' own narrower variants (torchvision's width_mult)")
    parser.add_argument("--output", type=Path, default=None, help="also write the rows as JSON lines here")
    args = parser.parse_args()
    import onnxruntime

    args.command_line = " ".join(f"--{k} {','.join(map(str, v))}" for k, v in
                                 (("models", args.models), ("targets", args.targets), ("batches", args.batches)))
    args.ort_version = onnxruntime.__version__
    args.machine = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    rows = []
    with tempfile.TemporaryDirectory(prefix="prunecli-speedup-") as folder:
        for name in args.models:
            for target in args.targets:
                measured = measure(name, target, args, Path(folder))
                for r in measured:
                    print(json.dumps(r, default=str), flush=True)
                    if args.output:
                        with args.output.open("a") as handle:
                            handle.write(json.dumps(r, default=str) + "\n")
                rows += measured
    print(markdown(rows, args))


if __name__ == "__main__":
    main()
