"""Numbers and words a person reads: counts in the 2.1G/310.2K style the budget options accept (one formatter,
``prunecli.humanize.human``, for the report and the messages), plurals, usage errors that read as sentences, a
latency-cache path that stays whole at 80 columns, and ``--help`` text that keeps its square brackets."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from prunecli.budget import parse_budget
from prunecli.cli import app
from prunecli.humanize import human, plural
from prunecli.report import console, file

SAMPLE = Path(__file__).resolve().parents[1] / "sample_models" / "resnet20_fmnist.safetensors"
COMMANDS = ("analyze", "score", "prune", "evaluate", "finetune", "export")


def invoke(*args, columns: int = 300):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": str(columns)})


@pytest.mark.parametrize(
    ("number", "text"),
    [(31_021_056, "31.02M"), (310_200, "310.20K"), (2.1e9, "2.10G"), (3.5e12, "3.50T"), (7, "7"), (0.5, "0.50"),
     (999, "999"), (1000, "1.00K"), (-1500, "-1.50K")],
)
def test_human_writes_counts_with_the_suffixes_budgets_accept(number, text):
    assert human(number) == text
    if number >= 1000:  # what a message quotes, pasted back into --params-target, is that count to 2 decimals
        assert parse_budget("params", text).value == pytest.approx(number, rel=5e-3)


def test_the_report_formats_counts_with_the_same_function():
    assert console.human is human and file.human is human


def test_plural_counts_one_and_many():
    assert [plural(n, "thread") for n in (0, 1, 2)] == ["0 threads", "1 thread", "2 threads"]
    assert plural(1, "slim model") == "1 slim model" and plural(5, "slim model") == "5 slim models"
    assert plural(3, "entry", "entries") == "3 entries"


def test_an_unreachable_budget_quotes_counts_as_budgets_are_written(tmp_path):
    run = invoke("prune", SAMPLE, "--params-target", "100K", "--max-layer-ratio", "0.1", "--round-to", "1",
                 "-o", tmp_path / "x.safetensors")
    assert run.exit_code == 1
    assert run.stderr.endswith(  # after the stages reached, one plain line each (stderr is not a terminal here)
        "\nallocating the budget\n"
        "error: the budget cannot be reached: pruning as far as allowed still leaves 224.70K (target 100.00K); "
        "raise --max-layer-ratio, remove --ignore patterns or ask for less\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_budget_above_the_model_quotes_its_own_count_as_budgets_are_written(tmp_path):
    run = invoke("prune", SAMPLE, "--params-target", "300K", "-o", tmp_path / "x.safetensors")
    assert run.exit_code in (1, 2)
    assert "error: --params-target 300K is not below the model's own 272.19K; ask for less" in run.stderr


def test_a_misspelt_command_gets_one_sentence_per_thought():
    run = invoke("prun", SAMPLE)
    assert run.exit_code == 2
    assert run.stderr == "error: No such command 'prun'. Did you mean 'prune'? See 'prunecli --help'.\n"


def test_an_unknown_option_still_points_at_the_help_after_a_semicolon():
    run = invoke("prune", SAMPLE, "--bogus")
    assert run.exit_code == 2
    assert run.stderr == "error: No such option: --bogus; see 'prunecli prune --help'\n"


def _latency_record(threads: int, iterations: int, path: str) -> dict:
    step = {"requested_ms": 0.5, "predicted_ms": 0.5, "measured_ms": 0.51, "measured_ratio": 0.51, "macs": 15e6}
    return {
        "runtime": "onnxruntime", "batch": 1, "threads": threads, "original_ms": 1.0, "slim_ms": 0.51,
        "measured_ratio": 0.51, "target_ratio": 0.5, "tolerance": 0.05, "converged": True, "chosen": 0, "retimed": 1,
        "iterations": [step] * iterations, "table": {"layers": 1, "points": 5},
        "cache": {"measured": 3, "reused": 4, "path": path},
    }


def test_latency_target_words_and_a_cache_path_that_stays_whole_at_80_columns():
    path = "/home/someone/.cache/prunecli/latency/onnxruntime-1.20.1-cpu-batch1-threads1-a-rather-long-name.json"
    out = io.StringIO()
    console.render_latency_target(_latency_record(1, 1, path), Console(file=out, width=80))
    text = out.getvalue()
    assert "latency target (onnxruntime, batch 1, 1 thread)" in text
    assert ("after 1 slim model (* the one kept, each timed again beside the original) · table of 1 layer at 5 channel "
            "counts" in " ".join(text.split()))
    assert path in text.splitlines()[-1]  # on one line, as it can be copied
    many = io.StringIO()
    console.render_latency_target(_latency_record(4, 3, path), Console(file=many, width=200))
    assert "batch 1, 4 threads)" in many.getvalue() and "after 3 slim models" in many.getvalue()


def test_latency_target_rows_say_what_each_slim_model_was_planned_on():
    record = _latency_record(1, 1, "/tmp/cache.json")
    record["iterations"].append({"corrected_on": "MACs", "requested_macs": 8.35e6, "predicted_macs": 8.34e6,
                                 "measured_ms": 0.49, "measured_ratio": 0.49, "macs": 8.34e6})
    assert console.target_rows(record) == [("1 *", "0.500 ms", "0.500 ms", "0.510", "0.510", "15.00M"),
                                           ("2", "8.35M MACs", "8.34M MACs", "0.490", "0.490", "8.34M")]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_keeps_the_timm_extra_in_square_brackets(command):
    run = invoke(command, "--help")
    assert run.exit_code == 0
    text = " ".join(run.stdout.replace("│", " ").split())
    assert "timm:resnet50 (pip install prunecli[timm])" in text
