"""Faster where it runs, by default: --round-to auto rounds channel counts to the runtime's channel block, and a
slim model that is not faster than the original where it runs is flagged (--check-speedup fails the run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from prunecli import runtime
from prunecli.api import prune_model
from prunecli.budget import parse_budget
from prunecli.cli import app
from prunecli.config import ModelSource, OutputOptions, PlanOptions, PruneConfig
from prunecli.pipeline.checks import speed_check
from prunecli.results import LatencyComparison, LatencyRow

SAMPLE = Path(__file__).parents[1] / "sample_models" / "mobilenetv2_fmnist.safetensors"
runner = CliRunner()


@pytest.mark.parametrize("flags, device, runtime_name, block", [
    ({"avx512f", "avx2", "avx"}, "cpu", "onnxruntime", 16),
    ({"avx2", "avx", "fma"}, "cpu", "onnxruntime", 8),
    ({"sse4_2"}, "cpu", "onnxruntime", 4),
    (set(), "cpu", "torch", 4),
])
def test_the_channel_block_is_the_cpu_simd_width_in_floats(monkeypatch, flags, device, runtime_name, block):
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: flags)
    got, why = runtime.channel_block(device, runtime_name)
    assert got == block and f"blocks of {block} channels" in why


@pytest.mark.parametrize("channels, narrow_step", [(3, 1), (8, 2), (16, 4), (24, 4), (32, 8), (63, 8), (64, 0),
                                                   (96, 0), (320, 0)])
def test_auto_lets_narrow_groups_go_under_one_block_by_a_quarter_of_their_width(channels, narrow_step):
    assert PlanOptions(round_to=16, narrow_groups=True).channel_grid(channels) == (16, narrow_step)
    assert PlanOptions(round_to=16).channel_grid(channels) == (16, 0)  # a given --round-to holds for every group
    assert PlanOptions().channel_grid(channels) == (1, 0)  # unresolved: no rounding


def test_prune_rounds_to_the_runtime_block_by_default_and_records_it(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"avx512f"})
    output = tmp_path / "slim.safetensors"
    result = prune_model(PruneConfig(ModelSource(SAMPLE), parse_budget("macs", "0.5"), output=OutputOptions(output)))
    assert any(note.startswith("channel counts kept at multiples of 16: onnxruntime's CPU convolutions work in "
                               "blocks of 16 channels") for note in result.notes)
    with safe_open(str(output), "pt") as handle:
        plan = json.loads(handle.metadata()["prunecli"])["config"]["plan"]
    assert (plan["round_to"], plan["narrow_groups"]) == (16, True)
    rounded = PlanOptions(round_to=16, narrow_groups=True)
    for layer in result.layers:
        if layer.out_after != layer.out_before:  # a multiple of the block, or up to half a block on a narrow grid
            _, narrow_step = rounded.channel_grid(layer.out_before)
            assert layer.out_after % 16 == 0 or (layer.out_after <= 8 and layer.out_after % narrow_step == 0), layer
    assert abs(result.macs_kept - 0.5) < 0.005


def _comparison(*speedups: float) -> LatencyComparison:
    rows = [LatencyRow(runtime, batch, 2.0, 2.0 / s, s) for (runtime, batch), s in
            zip([("torch", 1), ("onnxruntime", 1), ("onnxruntime", 16)], speedups, strict=True)]
    return LatencyComparison((1, 28, 28), rows, 100, 50, 2.0, 1, 3)


def test_a_slim_model_slower_where_it_runs_is_flagged_with_the_numbers():
    timed, note = speed_check(_comparison(0.5, 1.4, 1.6), "onnxruntime")
    assert timed["faster"] is True and timed["checked_runtime"] == "onnxruntime" and note is None
    timed, note = speed_check(_comparison(1.5, 0.66, 1.2), "onnxruntime")
    assert timed["faster"] is False
    assert note == ("the slim model is not faster than the original under onnxruntime (batch 1: 0.66x; the MACs "
                    "promised 2.00x): check --round-to, or prune for a --latency-target")


@pytest.mark.parametrize("speedup, code", [(0.8, 1), (1.3, 0)])
def test_check_speedup_fails_the_run_only_when_the_slim_model_is_not_faster(tmp_path, monkeypatch, speedup, code):
    import prunecli.latency

    monkeypatch.setattr(prunecli.latency, "compare_latency", lambda *a, **k: _comparison(1.0, speedup, speedup))
    output = tmp_path / "slim.safetensors"
    result = runner.invoke(app, ["prune", str(SAMPLE), "--flops-target", "0.5", "--latency", "--check-speedup",
                                 "-o", str(output), "--json"])
    assert result.exit_code == code, result.output
    assert json.loads(result.stdout)["latency"]["faster"] is (code == 0)
    assert output.exists()  # the slim model is written either way; the exit code is the verdict
    if code:
        assert result.stderr.strip() == (f"error: --check-speedup: {output} is written but not faster than the "
                                          "original under onnxruntime")


def test_check_speedup_needs_the_timing():
    result = runner.invoke(app, ["prune", str(SAMPLE), "--flops-target", "0.5", "--check-speedup"])
    assert result.exit_code == 2 and "--check-speedup times the slim model: give --latency too" in result.stderr
