"""One rule for option values: a malformed or out-of-range value of any option of any command is a usage error,
exit 2, one line naming the option, and nothing written. Every option of every command is in the table below, or
exempt with the reason; a new option fails the last test until it is placed."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from prunecli.cli import app

SAMPLE = Path(__file__).parents[1] / "sample_models" / "resnet20_fmnist.safetensors"
runner = CliRunner()

# the smallest valid call of each command, which the option under test is added to
BASE = {
    "analyze": [],
    "score": [],
    "prune": ["--flops-target", "0.5"],
    "evaluate": [],
    "finetune": [],
    "export": ["-o", "{tmp}/m.onnx"],
}
# option -> (malformed value, out-of-range value or None where every well-formed value is allowed, options the
# value needs to matter)
VALUES = {
    "--flops-target": ("abc", "1.5", ()),
    "--params-target": ("abc", "0", ()),
    "--ratio": ("abc", "1.2", ()),
    "--latency-target": ("abc", "1.5", ()),
    "--preview-flops-target": ("abc", "100%", ()),
    "--input-shape": ("3x224", "0x28x28", ()),
    "--arch-kwargs": ("{bad", "[1, 2]", ()),
    "--mean": ("a,b", None, ()),
    "--std": ("a,b", None, ()),
    "--batch-size": ("abc", "0", ()),
    "--calib-images": ("abc", "0", ()),
    "--eval-limit": ("abc", "0", ()),
    "--train-limit": ("abc", "0", ()),
    "--val-limit": ("abc", "0", ()),
    "--verify-images": ("abc", "0", ()),
    "--latency-batch": ("abc", "0", ()),
    "--timeout": ("abc", "0", ()),
    "--score-timeout": ("abc", "0", ()),
    "--threads": ("abc", "0", ()),
    "--max-layer-ratio": ("abc", "1.5", ()),
    "--round-to": ("abc", "0", ()),
    "--recalibrate-bn": ("abc", "-1", ()),
    "--recon-ridge": ("abc", "0", ("--reconstruct", "--data", "fashion-mnist")),
    "--recon-rows": ("abc", "0", ()),
    "--soft-epochs": ("abc", "-1", ()),
    "--reselect-every": ("abc", "-1", ()),
    "--edp-epochs": ("abc", "0", ()),
    "--edp-lambda": ("abc", "-1", ()),
    "--edp-threshold": ("abc", "-1", ()),
    "--epochs": ("abc", "0", ()),
    "--steps": ("abc", "0", ()),
    "--weight-decay": ("abc", "-1", ()),
    "--label-smoothing": ("abc", "1.0", ()),
    "--warmup-epochs": ("abc", "-1", ()),
    "--kd-alpha": ("abc", "1.5", ()),
    "--kd-t-max": ("abc", "0.5", ()),
    "--kd-t-min": ("abc", "0", ()),
    "--atol": ("abc", "-1", ()),
    "--opset": ("abc", "0", ()),
    "--icie-lambda": ("abc", None, ()),
    "--seed": ("abc", None, ()),
    "--method": ("fgpm", None, ()),
    "--allocation": ("greedy", None, ()),
    "--group-reduction": ("median", None, ()),
    "--group-scope": ("everyone", None, ()),
    "--dct-band": ("high", None, ()),
    "--icie-capacity": ("volume", None, ()),
    "--edp-init": ("random", None, ()),
    "--latency-runtime": ("tensorrt", None, ("--latency-target", "0.5")),
    "--optimizer": ("adam", None, ()),
    "--augment": ("strong", None, ()),
    "--kd": ("soft", None, ()),
    "--kd-schedule": ("exp", None, ()),
    "--amp": ("maybe", None, ()),
    "--format": ("tflite", None, ()),
    "--exporter": ("onnxscript", None, ()),
    "--dtype": ("int8", None, ()),
}
# where the value can only be wrong at run time (a file or folder that is missing, unreadable, of the wrong kind:
# a runtime error, exit 1) or cannot be wrong
EXEMPT = {
    "--arch": "an architecture spec is resolved when the model is built (exit 1, with did-you-mean)",
    "--compare-arch": "as --arch", "--teacher-arch": "as --arch",
    "--import-path": "a folder", "--compare": "a model file", "--teacher": "a model file", "--scores": "a file",
    "--data": "images: a file, folder or fashion-mnist split", "--val-data": "as --data", "--eval-data": "as --data",
    "--data-root": "a folder", "--output": "a file name", "--report": "a file name", "--checkpoint": "a file name",
    "--device": "resolved against the machine (cuda on a CPU machine is a runtime error)",
    "--ignore": "a glob; one that matches nothing is allowed",
    "--lr": "checked where training runs (prune without --soft-epochs or EDP does not train)",
}


def _options(command: str) -> list:
    """The options of a command that take a value (typer's own click: no flags, hidden old spellings or --help)."""
    params = typer.main.get_command(app).commands[command].params
    return [p for p in params if p.param_type_name == "option" and not p.is_flag and not p.hidden and p.name != "help"]


def _long(option) -> str:
    return max(option.opts, key=len)


CASES = [
    pytest.param(command, _long(option), kind, id=f"{command} {_long(option)} {kind}")
    for command in BASE
    for option in _options(command)
    if _long(option) in VALUES
    for kind in ("malformed", "out of range")
    if kind == "malformed" or VALUES[_long(option)][1] is not None
]


@pytest.mark.parametrize("command, option, kind", CASES)
def test_a_bad_option_value_is_a_usage_error_naming_the_option(tmp_path, command, option, kind):
    malformed, out_of_range, needs = VALUES[option]
    value = malformed if kind == "malformed" else out_of_range
    base = [a.format(tmp=tmp_path) for a in BASE[command]]
    if option in base:  # the base gives the budget: replace its value
        base = base[:base.index(option)] + base[base.index(option) + 2:]
    args = [command, str(SAMPLE), *base, *needs, option, value]
    result = runner.invoke(app, args, env={"COLUMNS": "400"})
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (args, result.output)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    named = option.lstrip("-").replace("preview-", "") if option == "--preview-flops-target" else option
    assert named in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []


def test_every_option_of_every_command_is_checked_or_exempt_with_a_reason():
    unplaced = {f"{command} {_long(option)}" for command in BASE for option in _options(command)
                if _long(option) not in VALUES and _long(option) not in EXEMPT}
    assert unplaced == set()


def test_a_misspelt_choice_suggests_the_nearest_and_leaks_no_validator_text():
    result = runner.invoke(app, ["score", str(SAMPLE), "--method", "fgpm"], env={"COLUMNS": "400"})
    assert result.exit_code == 2
    assert "did you mean 'fpgm'?" in result.stderr and "Value error" not in result.stderr
    assert result.stderr.rstrip().endswith("did you mean 'fpgm'? See 'prunecli score --help'.")
