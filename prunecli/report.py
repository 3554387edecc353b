"""The only module that renders: rich tables for people, one JSON document for pipelines."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from prunecli.api import AnalyzeResult, EvaluateResult, FinetuneRunResult, PruneResult, ScoreResult


def human(number: float, digits: int = 2) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(number) >= scale:
            return f"{number / scale:.{digits}f}{unit}"
    return f"{number:.0f}" if float(number).is_integer() else f"{number:.{digits}f}"


def print_json(result: Any) -> None:
    """One JSON document on stdout, nothing else."""
    sys.stdout.write(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    sys.stdout.flush()


def _bar(fraction: float, width: int = 12) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "█" * filled + "·" * (width - filled)


def render_analyze(result: AnalyzeResult, console: Console) -> None:
    m = result.model
    title = f"{m.source}  ({m.arch or 'custom'} · input {'x'.join(map(str, m.input_shape))})"
    table = Table(title=title, title_justify="left")
    for column, justify in (
        ("layer", "left"), ("type", "left"), ("in", "right"), ("out", "right"), ("kernel", "right"),
        ("params", "right"), ("MACs", "right"), ("% MACs", "right"), ("group", "left"), ("coupled", "right"),
        ("prunable", "left"),
    ):
        table.add_column(column, justify=justify, overflow="fold")
    for row in result.layers:
        kernel = "x".join(map(str, row.kernel)) or "-"
        if row.groups > 1:
            kernel += f" g{row.groups}"
        status = "[green]yes[/]" if row.prunable else f"[yellow]no[/] ({row.reason})"
        table.add_row(
            row.name, row.kind, str(row.in_channels), str(row.out_channels), kernel, human(row.params),
            human(row.macs), f"{100 * row.macs_share:.1f}", row.group or "-", str(row.coupled_layers or "-"), status,
        )
    console.print(table)
    prunable = sum(g.prunable for g in result.groups)
    console.print(
        f"[bold]total[/]: {human(m.params)} params, {human(m.macs)} MACs (conv + linear, thop convention) · "
        f"{len(result.groups)} channel groups, {prunable} prunable, {result.prunable_channels} prunable channels"
    )
    for note in result.notes:
        console.print(f"note: {note}")
    if result.latency:
        render_latency(result.latency, console)
    if result.provenance:
        p = result.provenance
        if p.get("method"):
            achieved, original = p.get("achieved", {}), p.get("original", {})
            console.print(
                f"pruned by prunecli {p.get('prunecli_version')} with {p['method']} ({p.get('allocation')}), "
                f"from {human(original.get('macs', 0))} to {human(achieved.get('macs', 0))} MACs, seed {p.get('seed')}"
            )


def render_prune(result: PruneResult, console: Console) -> None:
    table = Table(title=f"{result.model.source} → {result.output}", title_justify="left")
    for column, justify in (
        ("layer", "left"), ("type", "left"), ("out", "right"), ("in", "right"), ("MACs", "right"),
        ("removed", "left"),
    ):
        table.add_column(column, justify=justify, overflow="fold")
    for row in result.layers:
        share = 1 - row.macs_after / row.macs_before if row.macs_before else 0.0
        out = f"{row.out_before}→{row.out_after}" if row.out_after != row.out_before else str(row.out_before)
        cin = f"{row.in_before}→{row.in_after}" if row.in_after != row.in_before else str(row.in_before)
        table.add_row(row.name, row.kind, out, cin, f"{human(row.macs_before)}→{human(row.macs_after)}",
                      f"{_bar(share)} {100 * share:4.1f}%")
    console.print(table)
    summary = Table(show_header=True, title="summary", title_justify="left")
    for column in ("", "before", "after", "kept", "removed"):
        summary.add_column(column, justify="right")
    for label, before, after, kept in (
        ("MACs", result.before.macs, result.after.macs, result.macs_kept),
        ("params", result.before.params, result.after.params, result.params_kept),
    ):
        summary.add_row(label, human(before), human(after), f"{100 * kept:.2f}%", f"{100 * (1 - kept):.2f}%")
    console.print(summary)
    budget = result.budget
    console.print(
        f"method {result.method}, allocation {result.allocation}, budget --{budget['kind']}"
        f"{'-target' if budget['kind'] != 'ratio' else ''} {budget['text']} → target {human(result.target)}; "
        f"achieved {result.deviation_pp:+.2f} pp from target · {result.channels_removed} channels removed in "
        f"{result.groups_pruned} groups · {result.seconds:.1f} s · seed {result.seed}"
    )
    for note in result.notes:
        console.print(f"note: {note}")


_SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], bins: int = 12) -> str:
    """A histogram of ``values`` as one line of block characters."""
    if not values:
        return ""
    low, high = min(values), max(values)
    if high <= low:
        return _SPARKS[-1] + " " * (bins - 1)
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int((v - low) / (high - low) * bins))] += 1
    top = max(counts)
    return "".join(_SPARKS[round(c / top * (len(_SPARKS) - 1))] if c else " " for c in counts)


def render_score(result: ScoreResult, console: Console) -> None:
    table = Table(title=f"{result.model.source} · {result.method} scores", title_justify="left")
    columns = ["group (root layer)", "channels", "min", "median", "max", "histogram"]
    if result.preview:
        columns.append("would remove")
    for column in columns:
        table.add_column(column, justify="left" if column in ("group (root layer)", "histogram") else "right")
    for group in result.groups:
        ordered = sorted(group.scores)
        row = [group.root, str(group.channels), f"{ordered[0]:.3g}", f"{ordered[len(ordered) // 2]:.3g}",
               f"{ordered[-1]:.3g}", sparkline(group.scores)]
        if result.preview:
            row.append(str(group.preview_removed))
        table.add_row(*row)
    console.print(table)
    console.print(
        f"{len(result.groups)} groups scored with {result.method} (scores normalised per layer, "
        f"{result.group_reduction} over coupled layers) in {result.seconds:.1f} s"
        + (f"; written to {result.output}" if result.output else "")
    )
    if result.preview:
        preview = result.preview
        console.print(f"preview: --flops-target {preview['budget']['text']} → {human(preview['predicted'])} MACs")


def _metrics_row(label: str, summary: dict[str, Any] | Any, metrics: dict[str, Any]) -> list[str]:
    macs = summary["macs"] if isinstance(summary, dict) else summary.macs
    params = summary["params"] if isinstance(summary, dict) else summary.params
    return [label, f"{100 * metrics['top1']:.2f}", f"{100 * metrics['top5']:.2f}", f"{metrics['loss']:.4f}",
            f"{metrics['images_per_second']:.0f}", human(macs), human(params)]


def render_evaluate(result: EvaluateResult, console: Console) -> None:
    table = Table(title=f"evaluation on {result.data} ({result.metrics['images']} images)", title_justify="left")
    for column in ("model", "top-1 %", "top-5 %", "loss", "images/s", "MACs", "params"):
        table.add_column(column, justify="left" if column == "model" else "right")
    table.add_row(*_metrics_row(result.model.source, result.model, result.metrics))
    if result.compare:
        table.add_row(*_metrics_row(result.compare["model"]["source"], result.compare["model"], result.compare["metrics"]))
    console.print(table)
    if result.compare:
        delta = 100 * (result.metrics["top1"] - result.compare["metrics"]["top1"])
        speed = result.metrics["images_per_second"] / max(result.compare["metrics"]["images_per_second"], 1e-9)
        console.print(f"top-1 {delta:+.2f} points · MACs ratio original/this {result.compare['macs_ratio']:.2f}x · "
                      f"measured throughput ratio {speed:.2f}x")


def render_finetune(result: FinetuneRunResult, console: Console) -> None:
    table = Table(title=f"fine-tuning {result.model.source}", title_justify="left")
    for column in ("epoch", "train loss", "train top-1 %", "val top-1 %", "lr", "T", "images/s"):
        table.add_column(column, justify="right")
    for record in result.training.get("history", []):
        val = record.get("val_top1")
        table.add_row(str(record["epoch"]), f"{record['train_loss']:.4f}", f"{100 * record['train_top1']:.2f}",
                      f"{100 * val:.2f}" if val is not None else "-", f"{record['lr']:.4g}",
                      f"{record['temperature']:.2f}" if record.get("temperature") else "-",
                      f"{record['images_per_second']:.0f}")
    console.print(table)
    if result.before and result.after:
        console.print(f"validation top-1: {100 * result.before['top1']:.2f}% before → {100 * result.after['top1']:.2f}% "
                      f"after (best epoch {result.training.get('best_epoch')})")
    if result.output:
        console.print(f"written to {result.output}")


def render_latency(latency: dict[str, Any], console: Console) -> None:
    """Median latency per runtime and batch; with an original, the speedup beside the MACs ratio."""
    if "rows" in latency:
        table = Table(title="latency (median ms)", title_justify="left")
        for column in ("runtime", "batch", "original", "this model", "speedup", "MACs ratio"):
            table.add_column(column, justify="right")
        for row in latency["rows"]:
            table.add_row(row["runtime"], str(row["batch"]), f"{row['original_ms']:.2f}", f"{row['slim_ms']:.2f}",
                          f"{row['speedup']:.2f}x", f"{latency['macs_ratio']:.2f}x")
    else:
        table = Table(title="latency (median ms)", title_justify="left")
        for column in ("runtime", "batch", "ms"):
            table.add_column(column, justify="right")
        for runtime, timings in latency["median_ms"].items():
            for batch, ms in timings.items():
                table.add_row(runtime, str(batch), f"{ms:.2f}")
    console.print(table)


def render_export(result: Any, console: Console) -> None:
    data = result.to_dict()
    line = f"wrote {data['output']} ({human(data['file_size'])}B, {data['format']} via {data['exporter']}"
    if data.get("opset"):
        line += f", opset {data['opset']}"
    console.print(line + (", dynamic batch" if data.get("dynamic_batch") else "") + f") in {data['seconds']:.1f} s")
    if data.get("fallback_reason"):
        console.print(f"note: {data['fallback_reason']}")
    check = data.get("verification")
    if check:
        for kind in ("random", "real", "cast"):
            parity = check.get(kind)
            if parity:
                console.print(f"verify ({check['runtime']}, {kind} inputs): max abs {parity['max_abs']:.3g}, "
                              f"max rel {parity['max_rel']:.3g} (atol {check['atol']:g}) "
                              + ("[green]ok[/]" if check["passed"] else "[red]failed[/]"))
    for note in data.get("notes") or []:
        console.print(f"note: {note}")
