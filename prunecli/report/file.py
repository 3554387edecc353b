"""The before/after pruning report ``prune --report`` writes: one set of numbers (``prune_report``) as JSON,
Markdown or a self-contained HTML page, chosen by the file's extension."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from prunecli._version import __version__
from prunecli.errors import ExportError
from prunecli.humanize import human, plural
from prunecli.io.files import atomic_output, check_output_path
from prunecli.report.console import TARGET_HEADER, bar, target_line, target_rows
from prunecli.results import PruneResult

REPORT_SUFFIXES = (".json", ".md", ".html")


def check_report_path(path: Path, *, force: bool, inputs: tuple[Path, ...] = (), outputs: tuple[Path, ...] = ()) -> None:
    """Refuse an unknown extension, a file that exists without ``force``, or a path another output of the run takes.

    Called before any work, so a bad ``--report`` costs nothing.
    """
    path = Path(path)
    if path.suffix.lower() not in REPORT_SUFFIXES:
        raise ExportError(f"--report {path}: unknown extension {path.suffix or '(none)'!r}; use .json, .md or .html")
    if any(path.resolve() == Path(other).resolve() for other in outputs):
        raise ExportError(f"--report {path} is also the model output; choose another file name")
    check_output_path(path, force=force, inputs=inputs)


def _share(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def prune_report(result: PruneResult) -> dict[str, Any]:
    """The report's data: per-layer before/after, totals, requested vs achieved budget, accuracy and speedup if known.

    Every number comes from ``result``; nothing time-dependent but the measured latency, so the same run
    gives the same report.
    """
    before, after = result.before, result.after
    layers = [
        {
            "name": row.name, "kind": row.kind,
            "channels_before": row.out_before, "channels_after": row.out_after,
            "channels_kept": _share(row.out_after, row.out_before),
            "in_channels_before": row.in_before, "in_channels_after": row.in_after,
            "params_before": row.params_before, "params_after": row.params_after,
            "macs_before": row.macs_before, "macs_after": row.macs_after,
            "macs_share_before": _share(row.macs_before, before.macs),
            "macs_share_after": _share(row.macs_after, after.macs),
            "macs_removed": 1 - row.macs_after / row.macs_before if row.macs_before else 0.0,
        }
        for row in result.layers
    ]
    kind = result.budget["kind"]
    measured = result.latency_target or {}
    base, achieved = {"macs": (before.macs, after.macs), "params": (before.params, after.params),
                      "latency": (measured.get("original_ms"), measured.get("slim_ms"))}.get(kind, (0, None))
    report = {
        "prunecli_version": __version__,
        "model": {"source": result.model.source, "arch": result.model.arch, "input_shape": list(result.model.input_shape),
                  "sha256": result.model.sha256},
        "output": result.output,
        "method": result.method, "allocation": result.allocation, "seed": result.seed,
        "budget": {
            "kind": kind, "requested": result.budget["text"], "target": result.target,
            "target_kept": _share(result.target, base), "achieved": achieved,
            "achieved_kept": _share(achieved, base) if achieved is not None else None,
            "deviation_pp": result.deviation_pp,
        },
        "totals": {
            "params": {"before": before.params, "after": after.params, "kept": result.params_kept},
            "macs": {"before": before.macs, "after": after.macs, "kept": result.macs_kept},
            "channels_removed": result.channels_removed, "groups_pruned": result.groups_pruned,
        },
        "layers": layers,
        "notes": list(result.notes),
    }
    if result.accuracy:
        report["accuracy"] = result.accuracy
    if result.latency_target:
        report["latency_target"] = result.latency_target
    if result.latency:
        ratio = result.latency["macs_ratio"]
        report["latency"] = {
            **result.latency,
            "rows": [{**row, "efficiency": row["speedup"] / ratio if ratio else None} for row in result.latency["rows"]],
        }
    return report


def _percent(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def _arrow(before: float, after: float, fmt=human) -> str:
    return fmt(before) if before == after else f"{fmt(before)} → {fmt(after)}"


def _budget_rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(what, requested, achieved) lines shared by the Markdown and HTML pages."""
    b = report["budget"]
    label = {"macs": "MACs kept", "params": "params kept", "latency": "latency kept (measured)",
             "ratio": "channels removed per group"}[b["kind"]]
    if b["kind"] == "ratio":
        return [(label, b["requested"], f"{report['totals']['channels_removed']} channels")]
    if b["kind"] == "latency":
        return [(label, f"{b['requested']} ({_percent(b['target_kept'], 2)}, {b['target']:.3f} ms)",
                 f"{_percent(b['achieved_kept'], 2)} ({b['achieved']:.3f} ms), {b['deviation_pp']:+.2f} pp")]
    return [
        (label, f"{b['requested']} ({_percent(b['target_kept'], 2)}, {human(b['target'])})",
         f"{_percent(b['achieved_kept'], 2)} ({human(b['achieved'])}), {b['deviation_pp']:+.2f} pp"),
    ]


def _total_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    t = report["totals"]
    return [(label, human(t[key]["before"]), human(t[key]["after"]), _percent(t[key]["kept"], 2))
            for label, key in (("params", "params"), ("MACs", "macs"))]


def _accuracy_rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    a = report.get("accuracy")
    if not a:
        return []
    if a["measured"]:
        where = f"{a['data']} ({a['images']} images)"
    else:
        where = f"{a['data'] or 'unknown data'} (recorded in the model file)"
    return [(where, _percent(a["original_top1"], 2), _percent(a["pruned_top1"], 2) if a["pruned_top1"] is not None
             else "not measured (pass --eval-data)")]


def _latency_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    lat = report.get("latency")
    if not lat:
        return []
    return [(row["runtime"], str(row["batch"]), f"{row['original_ms']:.2f}", f"{row['slim_ms']:.2f}",
             f"{row['speedup']:.2f}x", f"{lat['macs_ratio']:.2f}x", _percent(row["efficiency"], 0))
            for row in lat["rows"]]


def _layer_cells(layer: dict[str, Any]) -> tuple[str, ...]:
    return (
        layer["name"], layer["kind"], _arrow(layer["channels_before"], layer["channels_after"], str),
        _percent(layer["channels_kept"]), _arrow(layer["params_before"], layer["params_after"]),
        _arrow(layer["macs_before"], layer["macs_after"]),
        f"{_percent(layer['macs_share_before'], 2)} → {_percent(layer['macs_share_after'], 2)}",
    )


_LAYER_HEADER = ("layer", "type", "channels", "kept", "params", "MACs", "share of MACs")
_LATENCY_HEADER = ("runtime", "batch", "original ms", "slim ms", "speedup", "MACs ratio", "speedup / MACs ratio")


def _title(report: dict[str, Any]) -> str:
    return f"prunecli report: {report['model']['source']} → {report['output']}"


def _subtitle(report: dict[str, Any]) -> str:
    m = report["model"]
    return (f"{m['arch'] or 'custom'}, input {'x'.join(map(str, m['input_shape']))} · method {report['method']}, "
            f"allocation {report['allocation']}, seed {report['seed']} · prunecli {report['prunecli_version']}")


def _sections(report: dict[str, Any]) -> list[tuple[str, tuple[str, ...], list[tuple[str, ...]]]]:
    """(heading, header, rows) of the summary tables, in page order; accuracy and latency only when known."""
    sections = [("Budget", ("", "requested", "achieved"), _budget_rows(report)),
                ("Totals", ("", "before", "after", "kept"), _total_rows(report))]
    if report.get("accuracy"):
        sections.append(("Accuracy (top-1)", ("data", "original", "slim"), _accuracy_rows(report)))
    if report.get("latency_target"):
        sections.append(("Latency target", TARGET_HEADER, target_rows(report["latency_target"])))
    if report.get("latency"):
        sections.append(("Latency (median)", _LATENCY_HEADER, _latency_rows(report)))
    return sections


def _channels_line(report: dict[str, Any]) -> str:
    t = report["totals"]
    line = f"{plural(t['channels_removed'], 'channel')} removed in {plural(t['groups_pruned'], 'channel group')}."
    return f"{line} Latency target: {target_line(report['latency_target'])}." if report.get("latency_target") else line


def _md_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(r) for r in rows), ""]


def report_markdown(report: dict[str, Any]) -> str:
    """The report as GitHub-flavoured Markdown, with a text bar per layer."""
    lines = [f"# {_title(report)}", "", _subtitle(report), "", _channels_line(report), ""]
    for heading, header, rows in _sections(report):
        lines += [f"## {heading}", "", *_md_table(header, rows)]
    rows = [(*_layer_cells(layer), f"`{bar(layer['macs_removed'])}` {_percent(layer['macs_removed'])}")
            for layer in report["layers"]]
    lines += ["## Layers", "", *_md_table((*_LAYER_HEADER, "MACs removed"), rows)]
    lines += [f"note: {note}" for note in report["notes"]]
    return "\n".join(lines).rstrip("\n") + "\n"


_BAR_WIDTH = 160
_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { padding: 0.2em 0.6em; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
td.name { font-family: ui-monospace, monospace; }
svg.bar rect.kept { fill: #4c9f70; } svg.bar rect.removed { fill: #d9534f; }
.sub { color: #666; }
"""


def _html_table(header: tuple[str, ...], rows: list[tuple[str, ...]], raw_last: bool = False) -> str:
    """A table of escaped cells; with ``raw_last`` the last cell of each row is markup built here (the bar)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = [html.escape(str(c)) for c in (row[:-1] if raw_last else row)] + ([row[-1]] if raw_last else [])
        first, *rest = cells
        body.append(f'<tr><td class="name">{first}</td>' + "".join(f"<td>{c}</td>" for c in rest) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(body) + "\n</tbody></table>"


def _svg_bar(name: str, removed: float) -> str:
    """The layer's MACs as a bar: the removed part red, the kept part green."""
    cut = round(max(0.0, min(1.0, removed)) * _BAR_WIDTH, 1)
    label = html.escape(f"{name}: {100 * removed:.1f}% of MACs removed")
    return (f'<svg class="bar" width="{_BAR_WIDTH}" height="12" role="img" aria-label="{label}"><title>{label}</title>'
            f'<rect class="removed" width="{cut}" height="12"/>'
            f'<rect class="kept" x="{cut}" width="{round(_BAR_WIDTH - cut, 1)}" height="12"/></svg> {100 * removed:.1f}%')


def report_html(report: dict[str, Any]) -> str:
    """The report as one self-contained HTML page: inline CSS and an inline SVG bar per layer, no scripts."""
    title = html.escape(_title(report))
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{title}</title>",
        f"<style>{_STYLE}</style></head><body>", f"<h1>{title}</h1>", f'<p class="sub">{html.escape(_subtitle(report))}</p>',
        f"<p>{html.escape(_channels_line(report))}</p>",
    ]
    for heading, header, rows in _sections(report):
        parts += [f"<h2>{html.escape(heading)}</h2>", _html_table(header, rows)]
    rows = [(*_layer_cells(layer), _svg_bar(layer["name"], layer["macs_removed"])) for layer in report["layers"]]
    parts += ["<h2>Layers</h2>", _html_table((*_LAYER_HEADER, "MACs removed"), rows, raw_last=True)]
    parts += [f'<p class="sub">note: {html.escape(note)}</p>' for note in report["notes"]]
    return "\n".join([*parts, "</body></html>"]) + "\n"


def write_report(result: PruneResult, path: Path, *, force: bool = False, inputs: tuple[Path, ...] = ()) -> None:
    """Write the report of ``result`` atomically, as JSON, Markdown or HTML by the extension of ``path``."""
    path = Path(path)
    check_report_path(path, force=force, inputs=inputs)
    report = prune_report(result)
    text = {
        ".json": lambda: json.dumps(report, indent=2) + "\n",
        ".md": lambda: report_markdown(report),
        ".html": lambda: report_html(report),
    }[path.suffix.lower()]()
    with atomic_output(path, force=force, inputs=inputs) as tmp:
        tmp.write_text(text, encoding="utf-8")
