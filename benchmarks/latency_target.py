"""Pruning to a measured latency (``prune --latency-target``) against pruning to MACs, at the same measured latency.

Each model is pruned with prunecli's API to each latency target (``--method l1 --allocation efficiency --round-to
8``, onnxruntime on the CPU at each batch, 1 intra-op thread unless ``--threads``), which reports the latency it
measured. The MACs-targeted model it is compared with is found the way a user without ``--latency-target`` would
have to: prune to a MACs fraction (same method, allocation and rounding), measure, and correct the fraction
(``prunecli.latency_model.correct_target``, the same loop) until its latency, timed in the same runs as the
latency-targeted model's, matches it within ``--match``. Both slim models are then timed once more (three times the
runs), their runs alternating with the original's, so the two ratios in a row come from the same load. On the
sample models the accuracy of both is measured on the Fashion-MNIST test set after BN recalibration
(``--recalibrate-bn`` on sample_models/fmnist_calib.safetensors), or with ``--reconstruct`` after reconstruction
on the same images.

Rows are appended to ``--log`` (JSON lines) as they finish and rows already there are skipped, so an interrupted
run continues where it stopped. Run it pinned to one core with a passive OpenMP wait policy to limit noise:

    OMP_WAIT_POLICY=PASSIVE taskset -c 1 python benchmarks/latency_target.py --log /tmp/latency_target.jsonl
    python benchmarks/latency_target.py --log /tmp/latency_target.jsonl --markdown   # the table of the log
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torchvision

import prunecli
from prunecli.api import prune_model
from prunecli.budget import parse_budget
from prunecli.config import (
    AccuracyOptions,
    DataOptions,
    LatencyOptions,
    LatencyTarget,
    ModelSource,
    OutputOptions,
    PlanOptions,
    PruneConfig,
    ReconstructOptions,
    RecoveryOptions,
    RunOptions,
)
from prunecli.errors import BudgetError, PrunecliError, one_line
from prunecli.latency import latency_meter
from prunecli.latency_model import correct_target
from prunecli.samples import SAMPLE_INPUT_SHAPES

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = {"sample:mobilenetv2": ROOT / "sample_models/mobilenetv2_fmnist.safetensors",
           "sample:resnet20": ROOT / "sample_models/resnet20_fmnist.safetensors"}
CALIB = ROOT / "sample_models/fmnist_calib.safetensors"


def _csv(kind):
    return lambda text: [kind(v) for v in text.split(",") if v]


def source(name: str, work: Path, size: int) -> tuple[ModelSource, torch.nn.Module, tuple[int, ...]]:
    """The model file to prune, the original module to time against and its input shape."""
    if name in SAMPLES:
        return ModelSource(SAMPLES[name]), prunecli.load(SAMPLES[name]).eval(), SAMPLE_INPUT_SHAPES[name.split(":")[1]]
    checkpoint = work / f"{name}.pt"
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    if not checkpoint.exists():
        torch.save(model.state_dict(), checkpoint)
    return ModelSource(checkpoint, f"torchvision:{name}", input_shape=(3, size, size)), model, (3, size, size)


def config_for(src: ModelSource, budget, args, output: Path, batch: int, sample: bool, recover: bool) -> PruneConfig:
    """The prune of one side; a sample model gets the calibration images (``--allocation sensitivity`` plans on
    them) and, with ``recover``, its recovery and the test set."""
    data = DataOptions(str(CALIB), batch_size=64) if sample else None
    recovery, evaluate = RecoveryOptions(), None
    if sample and recover:
        evaluate = AccuracyOptions(DataOptions("fashion-mnist:test", batch_size=256), args.eval_limit)
        recovery = RecoveryOptions(reconstruct=ReconstructOptions()) if args.reconstruct else RecoveryOptions(4)
    target = None
    if budget.kind == "latency":
        target = LatencyTarget("onnxruntime", warmup=args.warmup, repeats=args.repeats)
    return PruneConfig(src, budget, data, plan=PlanOptions(args.allocation, round_to=8), recovery=recovery,
                       evaluate=evaluate, latency=LatencyOptions(batch=batch, target=target),
                       output=OutputOptions(output, force=True), run=RunOptions(threads=args.threads))


def run_row(name: str, batch: int, target: float, args, work: Path) -> dict:
    sample = name in SAMPLES
    src, original, shape = source(name, work, args.size)
    started = time.perf_counter()
    lat = prune_model(config_for(src, parse_budget("latency", str(target)), args, work / "lat.safetensors", batch,
                                 sample, True))
    lat_seconds = time.perf_counter() - started
    record = lat.latency_target
    meter = latency_meter(original, shape, "onnxruntime", torch.device("cpu"), batch, args.threads, args.warmup,
                          args.repeats)

    lat_model = prunecli.load(lat.output).eval()
    floor = {"fraction": 0.0}  # the fewest MACs pruning to MACs can reach, once a request went below it

    def prune_to_macs(fraction: float, recover: bool):
        """Prune to the MACs ``fraction``, or to the least pruning to MACs can reach where that is more."""
        def prune_at(value: float):
            return prune_model(config_for(src, parse_budget("macs", f"{value:.6f}"), args, work / "macs.safetensors",
                                          batch, sample, recover))
        try:
            return prune_at(max(fraction, floor["fraction"]))
        except BudgetError as exc:
            if exc.least is None:
                raise
            floor["fraction"] = exc.least / lat.before.macs * (1 + 1e-4)
            return prune_at(floor["fraction"])

    def attempt(fraction: float) -> tuple[float, float]:
        """A MACs-targeted slim model's latency over the latency-targeted one's, both timed in the same runs."""
        result = prune_to_macs(fraction, False)
        _, lat_ms, ms = meter(lat_model, prunecli.load(result.output).eval())
        return result.macs_kept, ms / lat_ms

    # the MACs fraction whose slim model runs as fast as the latency-targeted one
    best, steps = correct_target(1.0, attempt, start=record["measured_ratio"], low=0.02, high=0.98,
                                 tolerance=args.match, iterations=args.iterations)
    fraction = max(steps[best].requested, floor["fraction"])
    macs = prune_to_macs(fraction, sample)
    final = latency_meter(original, shape, "onnxruntime", torch.device("cpu"), batch, args.threads, args.warmup,
                          3 * args.repeats)  # the two slim models side by side, three times the runs
    original_ms, lat_ms, macs_ms = final(lat_model, prunecli.load(macs.output).eval())
    row = {
        "model": name, "batch": batch, "target": target, "input": "x".join(map(str, shape)),
        "allocation": args.allocation, "recovery": recovery(name, args),
        "latency_targeted": {"measured_ratio": record["measured_ratio"], "iterations": len(record["iterations"]),
                             "converged": record["converged"], "macs_kept": lat.macs_kept,
                             "params_kept": lat.params_kept, "seconds": lat_seconds,
                             "table_points": record["cache"]["measured"] + record["cache"]["reused"],
                             "table_measured": record["cache"]["measured"],
                             "top1": lat.accuracy["pruned_top1"] if lat.accuracy else None},
        "macs_targeted": {"macs_target": fraction, "macs_kept": macs.macs_kept, "params_kept": macs.params_kept,
                          "matching_steps": len(steps), "matched_over_latency_targeted": steps[best].measured,
                          "at_floor": fraction == floor["fraction"],
                          "top1": macs.accuracy["pruned_top1"] if macs.accuracy else None},
        "remeasured": {"original_ms": original_ms, "latency_targeted_ratio": lat_ms / original_ms,
                       "macs_targeted_ratio": macs_ms / original_ms},
        "original_top1": lat.accuracy["original_top1"] if lat.accuracy else None,
        "iterations": record["iterations"],
    }
    return row


def row_key(row: dict) -> tuple:
    """What makes a row: model, batch, target, allocation and, on the sample models, the recovery."""
    return row["model"], row["batch"], row["target"], row.get("allocation", "efficiency"), row.get("recovery")


def recovery(name: str, args) -> str | None:
    """How a sample model is repaired before its accuracy is measured (the torchvision models are not evaluated)."""
    if name not in SAMPLES:
        return None
    return "reconstruct" if args.reconstruct else "recalibrate_bn"


def label(row: dict) -> str:
    """The model cell: its name, with the allocation and recovery where they are not the defaults."""
    extra = [f"`--allocation {row['allocation']}`"] if row.get("allocation", "efficiency") != "efficiency" else []
    extra += ["`--reconstruct`"] if row.get("recovery") == "reconstruct" else []
    return ", ".join([row["model"], *extra])


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def markdown(rows: list[dict]) -> str:
    lines = ["| model | input | batch | latency target | measured (slim models) | MACs kept | "
             "MACs-targeted: MACs kept at the same latency (slim models) | re-measured ratio: latency- / MACs-targeted | "
             "top-1: latency- / MACs-targeted (original) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {label(r)} | | {r['batch']} | {r['target']:g} | {r['error']} | | | | |")
            continue
        lat, mac, again = r["latency_targeted"], r["macs_targeted"], r["remeasured"]
        top1 = "-" if lat["top1"] is None else f"{_pct(lat['top1'])} / {_pct(mac['top1'])} ({_pct(r['original_top1'])})"
        lines.append(
            f"| {label(r)} | {r['input']} | {r['batch']} | {r['target']:g} | {lat['measured_ratio']:.3f} "
            f"({lat['iterations']}{'' if lat['converged'] else ', not within 5%'}) | {_pct(lat['macs_kept'])} | "
            f"{_pct(mac['macs_kept'])} ({mac['matching_steps']}{', its floor' if mac.get('at_floor') else ''}) | "
            f"{again['latency_targeted_ratio']:.3f} / {again['macs_targeted_ratio']:.3f} | {top1} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=_csv(str), default=["sample:mobilenetv2", "mobilenet_v2", "efficientnet_b0",
                                                                "resnet50"])
    parser.add_argument("--targets", type=_csv(float), default=[0.5, 0.7], help="latency to keep, e.g. 0.5,0.7")
    parser.add_argument("--batches", type=_csv(int), default=[1, 16])
    parser.add_argument("--size", type=int, default=224, help="input side of the torchvision models")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--allocation", default="efficiency")
    parser.add_argument("--match", type=float, default=0.03, help="how near the MACs-targeted model's latency must come")
    parser.add_argument("--iterations", type=int, default=4, help="MACs-targeted models tried per row at most")
    parser.add_argument("--eval-limit", type=int, default=None, help="sample models: a seeded subset of the test set")
    parser.add_argument("--reconstruct", action="store_true",
                        help="sample models: recover with --reconstruct on the calibration images, not BN recalibration")
    parser.add_argument("--log", type=Path, required=True, help="JSON lines: one finished row each")
    parser.add_argument("--markdown", action="store_true", help="print the table of the rows in --log and stop")
    args = parser.parse_args()
    done = [json.loads(line) for line in args.log.read_text().splitlines() if line] if args.log.exists() else []
    if args.markdown:
        print(markdown(done))
        return
    keys = {row_key(r) for r in done}
    with tempfile.TemporaryDirectory(prefix="prunecli-latency-target-") as folder:
        for batch in args.batches:
            for name in args.models:
                for target in args.targets:
                    if row_key({"model": name, "batch": batch, "target": target, "allocation": args.allocation,
                                "recovery": recovery(name, args)}) in keys:
                        continue
                    try:
                        row = run_row(name, batch, target, args, Path(folder))
                    except PrunecliError as exc:  # e.g. a target the model cannot reach: a row that says so
                        row = {"model": name, "batch": batch, "target": target, "allocation": args.allocation,
                               "recovery": recovery(name, args), "error": one_line(exc)}
                    with args.log.open("a") as log:
                        log.write(json.dumps(row) + "\n")
                    print(markdown([row]).splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
