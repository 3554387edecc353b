"""Results as people read them: rich tables and lines on the console, ``-q``'s one summary line
(``summary_line``), and the one JSON document of ``--json``."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from prunecli.budget import OPTIONS as BUDGET_OPTIONS
from prunecli.humanize import human, plural
from prunecli.results import AnalyzeResult, EvaluateResult, FinetuneRunResult, PruneResult, ScoreResult

PIPE_WIDTH = 200  # columns of a table printed to a pipe; longer cells fold


def stdout_console() -> Console:
    """The console for tables on stdout: the terminal's width, or, in a pipe, log or CI (no terminal, no
    ``COLUMNS``), wide enough that tables keep their rows on one line instead of wrapping every cell at 80."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return Console()
    return Console(width=PIPE_WIDTH)


def print_json(result: Any) -> None:
    """One JSON document on stdout, nothing else."""
    sys.stdout.write(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    sys.stdout.flush()


def render(result: Any, console: Console, quiet: bool = False) -> None:
    """A command's result as tables and lines; with ``quiet``, only its one-line summary."""
    if quiet:
        console.print(summary_line(result), highlight=False, soft_wrap=True)
        return
    renderers = {AnalyzeResult: render_analyze, ScoreResult: render_score, PruneResult: render_prune,
                 EvaluateResult: render_evaluate, FinetuneRunResult: render_finetune}
    renderers.get(type(result), render_export)(result, console)


def summary_line(result: Any) -> str:
    """What a command did, in one line: what ``-q`` prints."""
    if isinstance(result, AnalyzeResult):
        m = result.model
        return (f"{m.source}: {human(m.params)} params, {human(m.macs)} MACs, {len(result.groups)} channel groups "
                f"({sum(g.prunable for g in result.groups)} prunable)")
    if isinstance(result, ScoreResult):
        return (f"{result.model.source}: {len(result.groups)} groups scored with {result.method}"
                + (f", written to {result.output}" if result.output else ""))
    if isinstance(result, PruneResult):
        return (f"{result.model.source} -> {result.output}: MACs {human(result.before.macs)} -> "
                f"{human(result.after.macs)} ({100 * result.macs_kept:.2f}% kept), params {human(result.before.params)}"
                f" -> {human(result.after.params)} ({100 * result.params_kept:.2f}% kept)")
    if isinstance(result, EvaluateResult):
        return f"{result.model.source}: {_headline(result.metrics)} on {result.data}"
    if isinstance(result, FinetuneRunResult):
        after = f", validation {_headline(result.after)}" if result.after else ""
        trained = f" on {result.data}" if result.data else ""
        return f"{result.model.source} -> {result.output}: fine-tuned{trained}{after}"
    data = result.to_dict()
    check = data.get("verification")
    verified = "" if not check else ", verified" if check["passed"] else ", verification failed"
    return f"wrote {data['output']} ({data['format']}{verified})"


def bar(fraction: float, width: int = 12) -> str:
    """``fraction`` as a bar of text, in the prune table and the Markdown report alike."""
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "█" * filled + "·" * (width - filled)


def render_notes(notes: list[str], console: Console) -> None:
    """One ``note: ...`` line each (not read as markup: a path or a flag may hold brackets)."""
    for note in notes:
        console.print(f"note: {escape(note)}", highlight=False)


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
    render_notes(result.notes, console)
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
                      f"{bar(share)} {100 * share:4.1f}%")
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
        f"method {result.method}, allocation {result.allocation}, budget {BUDGET_OPTIONS[budget['kind']]} "
        f"{budget['text']} → target {human(result.target)}"
        f"{' ms (measured)' if budget['kind'] == 'latency' else ''}; "
        f"achieved {result.deviation_pp:+.2f} pp from target · {plural(result.channels_removed, 'channel')} removed in "
        f"{plural(result.groups_pruned, 'group')} · {result.seconds:.1f} s · seed {result.seed}"
    )
    render_notes(result.notes, console)
    if result.sensitivity:
        render_sensitivity(result.sensitivity, console)
    if result.recalibration:
        r = result.recalibration
        batches = plural(r["batches"], "batch", "batches")
        console.print(f"batch-norm statistics re-estimated on {batches} ({r['images']} images of {r['data']})")
    if result.reconstruction:
        r = result.reconstruction
        console.print(f"reconstructed {r['layers_refit']} of {len(r['layers'])} changed layers on {r['images']} images "
                      f"in {r['seconds']:.1f} s: mean relative output error {r['mean_error_before']:.4f} → "
                      f"{r['mean_error_after']:.4f} (held-out images)")
        for layer, why in r["skipped"].items():
            console.print(f"note: {layer} not reconstructed: {why}")
    if result.training:
        render_validation(result.training, console)
    if result.accuracy and result.accuracy["measured"]:
        a = result.accuracy
        console.print(f"top-1 on {a['data']} ({a['images']} images): {100 * a['original_top1']:.2f}% original → "
                      f"{100 * a['pruned_top1']:.2f}% slim")
    if result.latency_target:
        render_latency_target(result.latency_target, console)
    if result.latency:
        render_latency(result.latency, console)


def render_validation(training: dict[str, Any], console: Console) -> None:
    """EDP's and soft pruning's ``--val-data``: top-1 after each epoch and the epoch whose weights were kept."""
    scores = [(h["epoch"], h["val_top1"]) for h in training.get("history", []) if h.get("val_top1") is not None]
    if not scores:
        return
    kept = training.get("best_epoch")
    line = "validation top-1 by epoch: " + ", ".join(f"{epoch}: {100 * top1:.2f}%" for epoch, top1 in scores)
    console.print(line + (f" · the slim model has epoch {kept}'s weights" if kept is not None else ""))


def render_sensitivity(groups: dict[str, dict], console: Console, shown: int = 3) -> None:
    """One line: the groups whose cut, measured alone, moves the output most (candidates for ``--ignore``).
    Their damages are not added up: groups narrowed together do not add (a deep cut can move it more or less)."""
    worst = sorted(groups.items(), key=lambda item: -item[1]["damage_kept"])[:shown]
    console.print("sensitivity: the cuts that move the output most, each measured alone (relative squared error): "
                  + ", ".join(f"{root} {g['kept']}/{g['channels']} ({g['damage_kept']:.4f})" for root, g in worst))


def render_latency_target(record: dict[str, Any], console: Console) -> None:
    """``--latency-target``: every slim model measured while correcting the request, then the outcome."""
    table = Table(title=f"latency target ({record['runtime']}, batch {record['batch']}, "
                        f"{plural(record['threads'], 'thread')})", title_justify="left")
    for column in TARGET_HEADER:
        table.add_column(column, justify="right")
    for row in target_rows(record):
        table.add_row(*row)
    console.print(table)
    console.print(target_line(record), soft_wrap=True)  # the cache path stays whole, to be copied at any width


def target_rows(record: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per slim model ``--latency-target`` measured (``TARGET_HEADER``'s columns), on the console and in
    the report file."""
    return [(f"{i + 1}{' *' if i == record['chosen'] else ''}", *_planned(s), f"{s['measured_ms']:.3f}",
             f"{s['measured_ratio']:.3f}", human(s["macs"]))
            for i, s in enumerate(record["iterations"])]


def _planned(step: dict[str, Any]) -> tuple[str, str]:
    """What a slim model was planned at and its plan's predicted cost: ms on the latency table, else MACs."""
    if "requested_macs" in step:
        return f"{human(step['requested_macs'])} MACs", f"{human(step['predicted_macs'])} MACs"
    return f"{step['requested_ms']:.3f} ms", f"{step['predicted_ms']:.3f} ms"


def target_line(record: dict[str, Any]) -> str:
    """The latency target's outcome in one sentence, on the console and in the report file."""
    t, c = record["table"], record["cache"]
    outcome = "within" if record["converged"] else "NOT within"
    return (f"measured {record['original_ms']:.3f} ms → {record['slim_ms']:.3f} ms ({record['measured_ratio']:.3f} of the "
            f"original; target {record['target_ratio']:.3f}, {outcome} {100 * record['tolerance']:.0f}%) after "
            f"{plural(len(record['iterations']), 'slim model')} (* the one kept, each timed again beside the original) · "
            f"table of {plural(t['layers'], 'layer')} "
            f"at {t['points']} channel counts: {c['measured']} timed now, {c['reused']} from the cache {c['path']}")


TARGET_HEADER = ("slim model", "planned at", "predicted", "measured ms", "of original", "MACs")


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
    render_notes(result.notes, console)


def _metrics_row(label: str, summary: dict[str, Any] | Any, metrics: dict[str, Any]) -> list[str]:
    macs = summary["macs"] if isinstance(summary, dict) else summary.macs
    params = summary["params"] if isinstance(summary, dict) else summary.params
    return [label, f"{100 * metrics['top1']:.2f}", f"{100 * metrics['top5']:.2f}", f"{metrics['loss']:.4f}",
            f"{metrics['images_per_second']:.0f}", human(macs), human(params)]


def render_ultralytics_evaluate(result: EvaluateResult, console: Console) -> None:
    """Ultralytics' validator ran: its metrics, with the original beside them under ``--compare``."""
    table = Table(title=f"validation on {result.data}", title_justify="left")
    rows = [(result.model.source, result.model, result.metrics)]
    if result.compare:
        rows.append((result.compare["model"]["source"], result.compare["model"], result.compare["metrics"]))
    names = list(result.metrics)
    for column in ("model", *names, "MACs", "params"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for label, model, metrics in rows:
        macs, params = (model["macs"], model["params"]) if isinstance(model, dict) else (model.macs, model.params)
        table.add_row(label, *(f"{100 * metrics[n]:.2f}%" if n in metrics else "-" for n in names), human(macs),
                      human(params))
    console.print(table)
    render_notes(result.notes, console)


def render_evaluate(result: EvaluateResult, console: Console) -> None:
    if "top1" not in result.metrics:
        render_ultralytics_evaluate(result, console)
        return
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
    render_notes(result.notes, console)


def _headline(metrics: Mapping[str, Any]) -> str:
    """The first metric of a validation: top-1, or an Ultralytics detector's mAP50-95."""
    key = next((k for k in ("top1", "mAP50-95") if k in metrics), None)
    return f"{'top-1' if key == 'top1' else key} {100 * metrics[key]:.2f}%" if key else "-"


def render_ultralytics_finetune(result: FinetuneRunResult, console: Console) -> None:
    """Ultralytics' trainer ran: its validation metrics before and after, side by side."""
    table = Table(title=f"fine-tuning {result.model.source}", title_justify="left")
    for column in ("metric", "before", "after"):
        table.add_column(column, justify="right")
    before = result.before or {}
    for name, value in (result.after or {}).items():
        table.add_row(name, f"{100 * before[name]:.2f}%" if name in before else "-", f"{100 * value:.2f}%")
    console.print(table)
    console.print(f"trained with Ultralytics' {result.training.get('task')} trainer for "
                  f"{plural(result.training['arguments']['epochs'], 'epoch')} on {escape(result.data or '')}",
                  highlight=False)
    render_notes(result.notes, console)
    if result.output:
        console.print(f"written to {result.output}")


def render_finetune(result: FinetuneRunResult, console: Console) -> None:
    if result.training.get("trainer") == "ultralytics":
        render_ultralytics_finetune(result, console)
        return
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
    if result.data:
        validated = f"; validated on {escape(result.val_data)}" if result.val_data else ""
        console.print(f"trained on {escape(result.data)} ({plural(result.images or 0, 'image')}){validated}",
                      highlight=False)
    render_notes(result.notes, console)
    if result.before and result.after:
        console.print(f"validation top-1: {100 * result.before['top1']:.2f}% before → {100 * result.after['top1']:.2f}% "
                      f"after (best epoch {result.training.get('best_epoch')})")
    if result.training.get("kept_input"):
        console.print(f"kept the input's weights: no epoch improved on its validation top-1 of "
                      f"{100 * result.training['best_top1']:.2f}%")
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
        verdict = "[green]ok[/]" if check["passed"] else "[red]failed[/]"
        for kind in ("random", "real"):
            parity = check.get(kind)
            if parity:
                console.print(f"verify ({check['runtime']}, {kind} inputs): max abs {parity['max_abs']:.3g}, "
                              f"max rel {parity['max_rel']:.3g} (atol {check['atol']:g}) {verdict}")
        if check.get("cast"):
            console.print(_cast_line(check, "random and real" if check.get("real") else "random") + f" {verdict}")
    for note in data.get("notes") or []:
        console.print(f"note: {note}")


def _cast_line(check: dict[str, Any], inputs: str) -> str:
    """What the fp16/bf16 cast costs against the fp32 model, beside the tolerance it is held to."""
    parity, dtype, tolerance = check["cast"], check.get("cast_dtype") or "the dtype", check.get("cast_tolerance")
    bound = f"tolerance max rel {tolerance:.3g} for {dtype}" if tolerance is not None else "no tolerance recorded"
    return (f"verify ({dtype} cast against fp32, {inputs} inputs): max abs {parity['max_abs']:.3g}, "
            f"max rel {parity['max_rel']:.3g} ({bound})")
