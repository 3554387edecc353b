"""The command line through Typer's CliRunner: help, version, analyze and prune output, exit codes, and
one-line errors that leave no file behind."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
import torchvision
import typer
from typer.testing import CliRunner

import prunecli
from prunecli.cli import app
from prunecli.config import FASHION_MNIST_ROOT
from prunecli.io.slim import load
from prunecli.measure import totals
from prunecli.pipeline.removal import ROUNDING_TOLERANCE
from prunecli.samples import resnet20

# Hand-computed for sample:resnet20 at 1x28x28 (conv + linear MACs, thop convention):
#   stem 16*1*9*784 = 112,896; layer1 6 x 16*16*9*784 = 10,838,016;
#   layer2 32*16*9*196 + 5 x 32*32*9*196 + shortcut 32*16*196 = 903,168 + 9,031,680 + 100,352;
#   layer3 64*32*9*49 + 5 x 64*64*9*49 + shortcut 64*32*49 = 903,168 + 9,031,680 + 100,352; fc 64*10 = 640.
R20_MACS = 31_021_952
# conv weights 144 + 13,824 + 4,608 + 46,080 + 512 + 18,432 + 184,320 + 2,048; BN 2 x (16*7 + 32*7 + 64*7); fc 650
R20_PARAMS = 272_186
R20_LAYERS = 22  # 19 convs + 2 shortcut convs + fc
# channel groups: stage residuals (16, 32, 64), the nine block-internal convs (3 x 16, 3 x 32, 3 x 64), and fc,
# which only feeds the output
R20_GROUPS, R20_PRUNABLE_GROUPS, R20_PRUNABLE_CHANNELS = 13, 12, 16 + 32 + 64 + 3 * (16 + 32 + 64)

runner = CliRunner()


class Payload:
    """Unpickling this runs ``exec``, which would write ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def invoke(*args: str, columns: int | None = None):
    """Run the app; rich renders at 80 columns unless ``columns`` widens it (tables and help fold otherwise)."""
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": str(columns)} if columns else None)


def files_in(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def r20_weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("r20") / "r20.pt"
    torch.save(resnet20().state_dict(), path)
    return path


@pytest.fixture
def r20(tmp_path, r20_weights):
    """A private copy, so default outputs land in this test's folder."""
    return shutil.copy(r20_weights, tmp_path / "r20.pt") and tmp_path / "r20.pt"


@pytest.fixture(scope="module")
def r18_weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("r18") / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def assert_one_line_error(result, code: int = 1) -> str:
    """The error is stderr's last line, one line; before it stand only the stage messages progress writes as plain
    lines where stderr is not a terminal (as here, without -q)."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    *progress, message = result.stderr.strip().splitlines()
    assert message.startswith("error: "), message
    assert all(line and not line.startswith("error") and "\x1b" not in line for line in progress), result.stderr
    return message


# ----------------------------------------------------------------------------- help and version


def _command_names() -> list[str]:
    return sorted(typer.main.get_command(app).commands)


def test_commands_include_analyze_and_prune():
    assert {"analyze", "prune"} <= set(_command_names())


@pytest.mark.parametrize("command", [[], *([name] for name in _command_names())])
def test_help_exits_zero(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage: prunecli" in result.stdout
    assert "Traceback" not in result.output


def _help_rows(text: str) -> dict[str, str]:
    """Each option's row of a --help page: its long name and the first word after its names (the value it takes,
    or for a flag the first word of its help)."""
    rows = {}
    for line in text.splitlines():
        words = line.strip("│ ").removeprefix("* ").split()
        if words and words[0].startswith("--"):
            rest = [w for w in words[1:] if not (w.startswith("-") and (len(w) == 2 or w.startswith("--no-")))]
            rows[words[0]] = rest[0]
    return rows


@pytest.mark.parametrize("command", [[], *([name] for name in _command_names())])
def test_help_shows_flags_without_a_value_and_values_by_a_word(command):
    """Typer's own rendering showed `--version <bool>`, `--ignore <list[str]>`, `<int range> [x>=1]` and
    `prune [OPTIONS] {model}`: flags looked as if they took values."""
    text = invoke(*command, "--help", columns=300).stdout
    for typer_word in ("<bool>", "list[", "{model}", "<int", "<float", "<str>", "range", "[x"):
        assert typer_word not in text, typer_word
    rows = _help_rows(text)
    assert rows["--help"] == "Show"  # a flag: its help follows its name at once
    if command:
        assert f"Usage: prunecli {command[0]} [OPTIONS] MODEL" in text
        assert "--json" in text and rows["--json"] == "Print"
        if "--calib-images" in rows:
            assert rows["--calib-images"] == "N>=1"
        if "--ignore" in rows:
            assert rows["--ignore"] == "GLOB"
        if "--import-path" in rows:
            assert rows["--import-path"] == "DIR"
    else:
        assert rows["--version"] == "Print"


def test_help_names_the_values_of_every_kind_of_option():
    text = invoke("prune", "--help", columns=300).stdout
    rows = _help_rows(text)
    assert {k: rows[k] for k in ("--ignore", "--import-path", "--calib-images", "--recalibrate-bn", "--seed",
                                 "--max-layer-ratio", "--edp-lambda", "--flops-target", "--data", "--timeout",
                                 "--reconstruct", "--allocation")} == {
        "--ignore": "GLOB", "--import-path": "DIR", "--calib-images": "N>=1", "--recalibrate-bn": "N>=0",
        "--seed": "N", "--max-layer-ratio": "X", "--edp-lambda": "X>=0", "--flops-target": "BUDGET", "--data": "DATA",
        "--timeout": "SECONDS>=1", "--reconstruct": "After",
        "--allocation": "<uniform|global|efficiency|dispersion|sensitivity>"}


def test_help_names_the_model_argument_in_errors_too():
    message = assert_one_line_error(invoke("prune", "--ratio", "0.5"), 2)
    assert message == "error: Missing argument 'MODEL'; see 'prunecli prune --help'"


def test_prune_help_lists_every_registered_method_and_edp():
    from prunecli.criteria import list_criteria

    result = invoke("prune", "--help", columns=300)
    assert result.exit_code == 0
    assert "<" + "|".join([*list_criteria(), "edp"]) + ">" in result.stdout


def test_score_help_shows_the_icie_capacity_option_as_inferred():
    result = invoke("score", "--help", columns=300)
    assert result.exit_code == 0
    text = " ".join(result.stdout.replace("│", " ").split())
    assert ("--icie-capacity <weight|feature> icie: information capacity from the filters' 'weight' entropy (data-free) "
            "or the 'feature' entropy of the activation maps (needs --data) [INFERRED]. [default: weight]") in text
    assert "--icie-capacity feature: entropy of the activation maps instead [INFERRED, needs --data]" in text


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout == f"prunecli {prunecli.__version__}\n"


def test_no_arguments_shows_help():
    result = invoke(columns=200)
    assert result.exit_code == 2  # nothing to do is a usage error (click's no_args_is_help), as the README says
    assert result.stderr == ""
    text = " ".join(result.stdout.replace("│", " ").split())
    assert text.startswith("Usage: prunecli [OPTIONS] COMMAND [ARGS]...")
    first_words = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("│ ") and line[2] != " "]
    commands = [word for word in first_words if not word.startswith("-")]  # the Commands panel, options left out
    assert commands == ["analyze", "score", "prune", "evaluate", "finetune", "export"]


# ----------------------------------------------------------------------------- analyze


def test_analyze_text(r20):
    result = invoke("analyze", r20, "--arch", "sample:resnet20", columns=250)
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "total: 272.19K params, 31.02M MACs" in text
    assert f"{R20_GROUPS} channel groups, {R20_PRUNABLE_GROUPS} prunable, {R20_PRUNABLE_CHANNELS} prunable channels" in text
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in result.stdout.splitlines() if line.startswith("│")]
    rows = {row[0]: row[1:] for row in cells}
    assert len(rows) == R20_LAYERS
    # layer: type, in, out, kernel, params, MACs, % MACs, group, coupled layers, prunable
    assert rows["layer3.1.conv2"] == ["Conv2d", "64", "64", "3x3", "36.86K", "1.81M", "5.8", "layer3.0.shortcut.0", "11",
                                      "yes"]
    assert rows["layer2.0.shortcut.0"] == ["Conv2d", "16", "32", "1x1", "512", "100.35K", "0.3", "layer2.0.shortcut.0",
                                           "12", "yes"]
    assert rows["fc"] == ["Linear", "64", "10", "-", "650", "640", "0.0", "fc", "1", "no (feeds the model output)"]


def test_analyze_json(r20):
    result = invoke("analyze", r20, "--arch", "sample:resnet20", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # stdout holds one JSON document and nothing else
    model = resnet20()
    measured = totals(model, torch.zeros(1, 1, 28, 28))
    assert data["model"]["macs"] == measured.macs == R20_MACS
    assert data["model"]["params"] == measured.params == R20_PARAMS
    assert data["model"]["input_shape"] == [1, 28, 28]
    assert data["model"]["arch"] == "sample:resnet20"
    assert len(data["layers"]) == R20_LAYERS
    assert sum(row["macs"] for row in data["layers"]) == R20_MACS
    assert data["layers"][0] | {"macs_share": None} == {
        "name": "conv1", "kind": "Conv2d", "in_channels": 1, "out_channels": 16, "kernel": [3, 3], "groups": 1,
        "params": 144, "macs": 112_896, "macs_share": None, "group": "conv1", "coupled_layers": 13,
        "prunable": True, "reason": "",
    }
    assert len(data["groups"]) == R20_GROUPS
    assert sum(g["prunable"] for g in data["groups"]) == R20_PRUNABLE_GROUPS
    assert data["prunable_channels"] == R20_PRUNABLE_CHANNELS
    fc = next(g for g in data["groups"] if g["root"] == "fc")
    assert (fc["channels"], fc["prunable"], fc["reason"]) == (10, False, "feeds the model output")


def test_analyze_torchvision_weights_are_recognised(r18_weights):
    result = invoke("analyze", r18_weights, "--input-shape", "3x64x64", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"]["arch"] == "torchvision:resnet18"
    assert data["model"]["input_shape"] == [3, 64, 64]
    assert data["model"]["params"] == 11_689_512
    assert data["model"]["macs"] == totals(torchvision.models.resnet18(), torch.zeros(1, 3, 64, 64)).macs
    assert len(data["layers"]) == 21  # 17 convs + 3 downsample convs + fc
    assert "recognised the weights as torchvision:resnet18" in data["notes"]


# ----------------------------------------------------------------------------- prune


def test_prune_json(tmp_path, r20):
    output = tmp_path / "slim.safetensors"
    result = invoke("prune", r20, "--arch", "sample:resnet20", "--flops-target", "0.5", "-o", output, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert abs(data["macs_kept"] - 0.5) <= ROUNDING_TOLERANCE * 0.5  # the runtime's grid is coarse for ResNet-20
    assert data["before"] == {"params": R20_PARAMS, "macs": R20_MACS}
    assert data["after"]["macs"] == pytest.approx(R20_MACS * data["macs_kept"], rel=1e-12)
    assert data["method"] == "l1" and data["budget"]["kind"] == "macs" and data["budget"]["value"] == 0.5
    assert data["output"] == str(output)
    assert data["channels_removed"] > 0
    model = prunecli.load(output)
    measured = totals(model, torch.zeros(1, 1, 28, 28))
    assert (measured.macs, measured.params) == (data["after"]["macs"], data["after"]["params"])
    assert files_in(tmp_path) == ["r20.pt", "slim.safetensors"]


def test_quiet_prints_only_the_final_summary_line(tmp_path, r20):
    output = tmp_path / "slim.safetensors"
    result = invoke("prune", r20, "--arch", "sample:resnet20", "--ratio", "0.25", "--round-to", "1", "-o", output, "-q")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\n") == 1 and result.stderr == ""
    assert result.stdout.startswith(f"{r20} -> {output}: MACs 31.02M -> ") and "% kept), params 272.19K -> " in result.stdout
    analyzed = invoke("analyze", output, "-q")
    assert analyzed.stdout == f"{output}: 153.55K params, 17.47M MACs, 13 channel groups (12 prunable)\n"


CALIB = Path(__file__).parents[1] / "sample_models" / "fmnist_calib.safetensors"


def test_progress_in_a_pipe_is_one_plain_line_per_stage_and_silent_with_quiet_or_json(tmp_path, r20):
    """stderr is not a terminal here (as in `prune ... 2>log` or CI): no bar, no ANSI, each stage once, in order."""
    args = ("prune", r20, "--arch", "sample:resnet20", "--ratio", "0.25", "--data", CALIB, "--calib-images", "64",
            "--recalibrate-bn", "1", "--device", "cpu")
    result = invoke(*args, "-o", tmp_path / "a.safetensors")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        "loading the model", "tracing channel dependencies", "scoring channels with l1", "allocating the budget",
        "removing channels", "re-estimating batch-norm statistics on 1 batch of 64 images",
        f"writing {tmp_path / 'a.safetensors'}"]
    for quiet in ("-q", "--json"):
        silent = invoke(*args, quiet, "-o", tmp_path / f"b{quiet}.safetensors")
        assert silent.exit_code == 0, silent.output
        assert silent.stderr == ""


def test_prune_text_then_analyze_the_slim_file(tmp_path, r20):
    output = tmp_path / "slim.safetensors"
    result = invoke("prune", r20, "--arch", "sample:resnet20", "--ratio", "0.25", "--round-to", "1", "-o", output)
    assert result.exit_code == 0, result.output
    assert "summary" in result.stdout and "method l1" in " ".join(result.stdout.split())
    again = invoke("analyze", output, "--json")
    assert again.exit_code == 0, again.output
    data = json.loads(again.stdout)
    assert data["model"]["arch"] == "sample:resnet20"
    assert data["model"]["input_shape"] == [1, 28, 28]
    assert data["provenance"]["method"] == "l1"
    assert data["provenance"]["achieved"]["macs"] == data["model"]["macs"] < R20_MACS
    # every prunable group lost a quarter of its channels, rounded to the nearest count
    widths = {row["name"]: row["out_channels"] for row in data["layers"]}
    assert widths["layer1.0.conv1"] == 12 and widths["layer2.0.conv1"] == 24 and widths["layer3.0.conv1"] == 48


def test_prune_torchvision_resnet18(tmp_path, r18_weights):
    output = tmp_path / "r18.slim.safetensors"
    args = ("--arch", "torchvision:resnet18", "--input-shape", "3x64x64", "--flops-target", "50%", "-o", output, "--json")
    result = invoke("prune", r18_weights, *args)  # detection is covered by the analyze test
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"]["arch"] == "torchvision:resnet18"
    assert abs(data["macs_kept"] - 0.5) <= 0.005
    model = prunecli.load(output)
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 1000)
    assert totals(model, torch.zeros(1, 3, 64, 64)).macs == data["after"]["macs"]


def test_default_output_and_refusal_to_clobber(tmp_path, r20):
    args = ("prune", r20, "--arch", "sample:resnet20", "--flops-target", "0.5", "--json")
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    expected = tmp_path / "r20.slim.safetensors"
    assert json.loads(first.stdout)["output"] == str(expected)
    assert files_in(tmp_path) == ["r20.pt", "r20.slim.safetensors"]
    original = expected.read_bytes()

    second = invoke(*args)
    message = assert_one_line_error(second)
    assert "--force" in message and "already exists" in message
    assert expected.read_bytes() == original
    assert files_in(tmp_path) == ["r20.pt", "r20.slim.safetensors"]

    third = invoke(*args, "--force")
    assert third.exit_code == 0, third.output
    forced = expected.read_bytes()
    fourth = invoke(*args, "--force")
    assert fourth.exit_code == 0, fourth.output
    assert expected.read_bytes() == forced  # same command, same input: byte-identical
    assert files_in(tmp_path) == ["r20.pt", "r20.slim.safetensors"]


def test_default_output_keeps_dotted_stems(tmp_path, r20):
    dotted = tmp_path / "r20.v2.pt"
    r20.rename(dotted)
    result = invoke("prune", dotted, "--arch", "sample:resnet20", "--flops-target", "0.5", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["output"] == str(tmp_path / "r20.v2.slim.safetensors")


def test_default_output_of_a_slim_input_is_a_new_file(tmp_path, r20):
    first = invoke("prune", r20, "--arch", "sample:resnet20", "--ratio", "0.2", "-q")
    assert first.exit_code == 0, first.output
    slim = tmp_path / "r20.slim.safetensors"
    before = slim.read_bytes()
    second = invoke("prune", slim, "--ratio", "0.2", "--json")
    assert second.exit_code == 0, second.output
    twice = tmp_path / "r20.slim.slim.safetensors"
    assert json.loads(second.stdout)["output"] == str(twice)
    assert files_in(tmp_path) == ["r20.pt", "r20.slim.safetensors", "r20.slim.slim.safetensors"]
    assert slim.read_bytes() == before  # the input is left as it was
    once, again = load(slim), load(twice)
    x = torch.zeros(1, 1, 28, 28)
    assert totals(again, x).macs < totals(once, x).macs  # the new file is the input pruned once more


# ----------------------------------------------------------------------------- bad inputs


def _random_bytes(n: int = 4096) -> bytes:
    return bytes(torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(7), dtype=torch.uint8).tolist())


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _mkdir(path):
    path.mkdir()
    return path


BAD = {
    # name: (setup(tmp_path, r20) -> model path, extra args, words in the message)
    "missing file": (lambda d, m: d / "nope.pt", ("--arch", "sample:resnet20"), "no such file"),
    "directory": (lambda d, m: _mkdir(d / "weights"), ("--arch", "sample:resnet20"), "folder without config.json"),
    "empty file": (lambda d, m: _write(d / "e.pt", b""), ("--arch", "sample:resnet20"), "empty"),
    "random bytes": (
        lambda d, m: _write(d / "r.pt", b"\x01" + _random_bytes()),
        ("--arch", "sample:resnet20"),
        "neither safetensors nor a torch.save file",
    ),
    "random bytes after a zip signature": (
        lambda d, m: _write(d / "r.pt", b"PK\x03\x04" + _random_bytes()),
        ("--arch", "sample:resnet20"),
        "truncated or damaged",
    ),
    "weights not matching --arch": (lambda d, m: m, ("--arch", "torchvision:resnet18"), "42 missing"),
    "unknown torchvision arch": (lambda d, m: m, ("--arch", "torchvision:resnet19"), "did you mean resnet18"),
    "unknown sample arch": (lambda d, m: m, ("--arch", "sample:resnet21"), "unknown sample architecture"),
    "malformed arch": (lambda d, m: m, ("--arch", "resnet20"), "is not of the form"),
    "bad arch kwargs": (lambda d, m: m, ("--arch", "sample:resnet20", "--arch-kwargs", "{oops"), "not valid JSON"),
    "wrong arch kwargs": (
        lambda d, m: m, ("--arch", "sample:resnet20", "--arch-kwargs", '{"width": 2}'), "check --arch-kwargs"
    ),
    "bad input shape": (lambda d, m: m, ("--arch", "sample:resnet20", "--input-shape", "28x28"), "CxHxW"),
    "input shape the model cannot run": (
        lambda d, m: m, ("--arch", "sample:resnet20", "--input-shape", "3x28x28"), "--input-shape"
    ),
}


MALFORMED_OPTIONS = {"bad arch kwargs", "bad input shape"}  # usage errors (exit 2); the rest are the file's (exit 1)


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("command", ["analyze", "prune"])
def test_bad_model_inputs(tmp_path, r20, command, case):
    setup, extra, words = BAD[case]
    path = setup(tmp_path, r20)
    before = files_in(tmp_path)
    budget = ("--flops-target", "0.5") if command == "prune" else ()
    result = invoke(command, path, *extra, *budget)
    message = assert_one_line_error(result, 2 if case in MALFORMED_OPTIONS else 1)
    assert words in message
    assert files_in(tmp_path) == before


BAD_PRUNE = {
    # name: (args after the model, exit code: 2 for a malformed or out-of-range value or a clash of options, 1 for
    # what only the model decides, words in the message)
    "flops target 0": (("--flops-target", "0"), 2, "strictly between 0 and 1"),
    "flops target 1": (("--flops-target", "1"), 2, "strictly between 0 and 1"),
    "ratio 1.5": (("--ratio", "1.5"), 2, "between 0 and 1"),
    "flops target 1.5 (no fraction, no count)": (("--flops-target", "1.5"), 2, "neither a fraction nor a plausible count"),
    "flops target abc": (("--flops-target", "abc"), 2, "not a number"),
    "params target -0.2": (("--params-target", "-0.2"), 2, "not a number"),
    "budget above the model's MACs": (("--flops-target", "100G"), 1, "not below the model's own"),
    "params above the model's": (("--params-target", "2M"), 1, "not below the model's own"),
    "unreachable budget": (
        ("--flops-target", "0.2", "--max-layer-ratio", "0.1"), 1, "cannot be reached"
    ),
    "max layer ratio 1": (("--flops-target", "0.5", "--max-layer-ratio", "1"), 2, "--max-layer-ratio"),
    "everything ignored": (("--flops-target", "0.5", "--ignore", "*"), 1, "no prunable channel group"),
    "cuda that is not there": (("--flops-target", "0.5", "--device", "cuda:7"), 1, "--device"),
    "unknown device": (("--flops-target", "0.5", "--device", "tpu"), 2, "--device"),
    "latency target 0": (("--latency-target", "0"), 2, "strictly between 0 and 1"),
    "latency target 1.5": (("--latency-target", "1.5"), 2, "strictly between 0 and 1"),
    "latency target abc": (("--latency-target", "abc"), 2, "is not a latency"),
    "latency target -3ms": (("--latency-target", "-3ms"), 2, "is not a latency"),
    "latency target 0ms": (("--latency-target", "0ms"), 2, "positive number of milliseconds"),
    "latency target with soft pruning": (("--latency-target", "0.5", "--soft-epochs", "1", "--data", "fashion-mnist"), 2,
                                         "does not combine with"),
}


@pytest.mark.parametrize("case", list(BAD_PRUNE))
def test_bad_prune_options(tmp_path, r20, case):
    args, code, words = BAD_PRUNE[case]
    result = invoke("prune", r20, "--arch", "sample:resnet20", *args)
    message = assert_one_line_error(result, code)
    assert words in message
    assert files_in(tmp_path) == ["r20.pt"]


@pytest.mark.parametrize(
    "args",
    [
        ("--flops-target", "0.5", "--method", "nonsense"),
        (),
        ("--flops-target", "0.5", "--ratio", "0.3"),
        ("--flops-target", "0.5", "--params-target", "0.5", "--ratio", "0.3"),
        ("--flops-target", "0.5", "--allocation", "greedy"),
        ("--flops-target", "0.5", "--round-to", "0"),
        ("--flops-target", "0.5", "--timeout", "0"),
        ("--flops-target",),
        ("--flops-target", "0.5", "--no-such-option"),
        ("--flops-target", "0.5", "--latency-target", "0.5"),
        ("--flops-target", "0.5", "--latency-runtime", "torch"),
        ("--latency-target", "0.5", "--latency-runtime", "tensorrt"),
        ("--latency-target", "0.5", "--latency-batch", "0"),
        ("--latency-target", "0.5", "--threads", "0"),
    ],
    ids=["unknown method", "no budget", "two budgets", "three budgets", "unknown allocation", "round-to 0",
         "timeout 0", "budget without value", "unknown option", "latency and flops targets",
         "latency runtime without a latency target", "unknown latency runtime", "latency batch 0", "threads 0"],
)
def test_usage_errors_exit_2(tmp_path, r20, args):
    result = invoke("prune", r20, "--arch", "sample:resnet20", *args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert files_in(tmp_path) == ["r20.pt"]


def test_output_in_a_missing_directory(tmp_path, r20):
    output = tmp_path / "missing" / "out.safetensors"
    result = invoke("prune", r20, "--arch", "sample:resnet20", "--flops-target", "0.5", "-o", output)
    message = assert_one_line_error(result)
    assert "does not exist" in message and str(tmp_path / "missing") in message
    assert files_in(tmp_path) == ["r20.pt"]


def test_output_is_a_directory(tmp_path, r20):
    (tmp_path / "out").mkdir()
    result = invoke("prune", r20, "--arch", "sample:resnet20", "--flops-target", "0.5", "-o", tmp_path / "out")
    assert "is a directory" in assert_one_line_error(result)
    assert files_in(tmp_path) == ["out", "r20.pt"]
    assert files_in(tmp_path / "out") == []


@pytest.mark.parametrize("force", [False, True])
def test_output_equal_to_input(tmp_path, r20, force):
    original = r20.read_bytes()
    args = ("prune", r20, "--arch", "sample:resnet20", "--flops-target", "0.5", "-o", r20)
    result = invoke(*args, *(["--force"] if force else []))
    assert "is the input file" in assert_one_line_error(result)
    assert r20.read_bytes() == original
    assert files_in(tmp_path) == ["r20.pt"]


def test_pickle_payload_through_the_cli_never_runs(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    torch.save(Payload(marker), path)
    for command in (("analyze", path), ("prune", path, "--ratio", "0.3")):
        result = invoke(*command)
        assert "--trust-pickle" in assert_one_line_error(result)
        assert not marker.exists()
    assert files_in(tmp_path) == ["evil.pt"]


def test_debug_shows_the_traceback(tmp_path):
    result = invoke("--debug", "analyze", tmp_path / "nope.pt")
    assert result.exit_code == 1
    assert result.exception is not None and type(result.exception).__name__ == "CheckpointError"


def test_prune_writes_no_blank_line_to_a_non_terminal_stderr(tmp_path):
    result = invoke("prune", tmp_path / "nope.pt", "--ratio", "0.3")
    assert result.exit_code == 1
    assert result.stderr == f"error: {tmp_path / 'nope.pt'}: no such file; check the path\n"
    scored = invoke("score", tmp_path / "nope.pt")  # it fails after its first stage: that line, then the error
    assert scored.stderr == f"loading the model\nerror: {tmp_path / 'nope.pt'}: no such file; check the path\n"


# ----------------------------------------------------------------------------- --report

# sample:resnet20 at --ratio 0.25: every group keeps 12 of 16, 24 of 32, 48 of 64 channels, so
# layer1.0.conv1 is 12x12x3x3 = 1,296 weights applied at 28x28 (1,016,064 MACs, was 1,806,336),
# layer3.0.conv1 48x24x3x3 = 10,368 at 7x7 (508,032 MACs), fc 10x48 + 10 = 490 params (480 MACs).
R20_QUARTER = {
    "layer1.0.conv1": (16, 12, 16, 12, 2_304, 1_296, 1_806_336, 1_016_064),
    "layer3.0.conv1": (64, 48, 32, 24, 18_432, 10_368, 903_168, 508_032),
    "fc": (10, 10, 64, 48, 650, 490, 640, 480),
}


def _prune_with_report(folder, model, report, *extra):
    return invoke("prune", model, "--arch", "sample:resnet20", "--ratio", "0.25", "--round-to", "1",
                  "-o", folder / "slim.safetensors", "--report", report, *extra)


def test_json_report_has_the_numbers_of_the_prune_result(tmp_path, r20):
    result = _prune_with_report(tmp_path, r20, tmp_path / "report.json", "--json")
    assert result.exit_code == 0, result.output
    pruned, report = json.loads(result.stdout), json.loads((tmp_path / "report.json").read_text())
    layers = {row["name"]: row for row in report["layers"]}
    assert [row["name"] for row in report["layers"]] == [row["name"] for row in pruned["layers"]]
    assert len(layers) == R20_LAYERS
    for name, expected in R20_QUARTER.items():
        row = layers[name]
        assert (row["channels_before"], row["channels_after"], row["in_channels_before"], row["in_channels_after"],
                row["params_before"], row["params_after"], row["macs_before"], row["macs_after"]) == expected
    assert layers["layer1.0.conv1"]["channels_kept"] == 0.75
    assert layers["layer1.0.conv1"]["macs_removed"] == pytest.approx(1 - 1_016_064 / 1_806_336)
    assert layers["layer1.0.conv1"]["macs_share_before"] == pytest.approx(1_806_336 / R20_MACS)
    assert layers["layer1.0.conv1"]["macs_share_after"] == pytest.approx(1_016_064 / pruned["after"]["macs"])
    assert report["totals"] == {
        "params": {"before": R20_PARAMS, "after": pruned["after"]["params"], "kept": pruned["params_kept"]},
        "macs": {"before": R20_MACS, "after": pruned["after"]["macs"], "kept": pruned["macs_kept"]},
        "channels_removed": pruned["channels_removed"], "groups_pruned": pruned["groups_pruned"],
    }
    assert pruned["channels_removed"] == R20_PRUNABLE_CHANNELS // 4
    assert sum(row["macs_after"] for row in report["layers"]) == pruned["after"]["macs"]
    assert report["budget"]["kind"] == "ratio" and report["budget"]["requested"] == "0.25"
    assert report["method"] == "l1" and report["output"] == str(tmp_path / "slim.safetensors")
    assert "accuracy" not in report and "latency" not in report  # unknown for random weights, not measured
    assert files_in(tmp_path) == ["r20.pt", "report.json", "slim.safetensors"]


def test_markdown_report_has_a_row_per_layer(tmp_path, r20):
    result = _prune_with_report(tmp_path, r20, tmp_path / "report.md", "-q")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "report.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| layer") or line.startswith("| fc ")]
    assert len(rows) == R20_LAYERS
    assert ("| layer1.0.conv1 | Conv2d | 16 → 12 | 75.0% | 2.30K → 1.30K | 1.81M → 1.02M | 5.82% → "
            in text)
    assert "| `█████·······` 43.8% |" in next(r for r in rows if r.startswith("| layer1.0.conv1 "))
    assert "| params | 272.19K |" in text and "| MACs | 31.02M |" in text
    assert "| channels removed per group | 0.25 | 112 channels |" in text


class _Page(HTMLParser):
    """The parts of the HTML report the tests look at: bars, table cells, the title, anything external."""

    def __init__(self):
        super().__init__()
        self.bars, self.cells, self.title, self.external, self._open = [], [], "", [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "svg" and attrs.get("class") == "bar":
            self.bars.append(attrs["aria-label"])
        if tag in ("script", "link", "img", "iframe") or any(k in attrs for k in ("src", "href")):
            self.external.append(tag)
        self._open = tag

    def handle_endtag(self, tag):
        self._open = None

    def handle_data(self, data):
        if self._open == "td":
            self.cells.append(data)
        elif self._open == "title" and not self.title:
            self.title = data


def test_html_report_is_self_contained_with_a_bar_per_layer(tmp_path, r20_weights):
    folder = tmp_path / 'odd <name> & "quotes"'
    folder.mkdir()
    model = shutil.copy(r20_weights, folder / "r20.pt")
    result = _prune_with_report(folder, model, folder / "report.html", "-q")
    assert result.exit_code == 0, result.output
    text = (folder / "report.html").read_text()
    page = _Page()
    page.feed(text)
    page.close()
    assert len(page.bars) == R20_LAYERS
    assert page.bars[1] == "layer1.0.conv1: 43.8% of MACs removed"
    assert page.external == []
    assert page.title == f"prunecli report: {model} → {folder / 'slim.safetensors'}"
    assert "<name>" not in text and "&lt;name&gt; &amp; &quot;quotes&quot;" in text
    assert page.cells[page.cells.index("params"):][:2] == ["params", "272.19K"]
    assert page.cells[page.cells.index("MACs"):][:2] == ["MACs", "31.02M"]


@pytest.mark.parametrize("name", ["report.pdf", "report", "slim.safetensors"])
def test_report_with_an_unknown_extension_fails_before_any_work(tmp_path, r20, name):
    result = _prune_with_report(tmp_path, r20, tmp_path / name)
    assert "use .json, .md or .html" in assert_one_line_error(result)
    assert files_in(tmp_path) == ["r20.pt"]


def test_report_is_not_clobbered_without_force(tmp_path, r20):
    (tmp_path / "report.md").write_text("mine\n")
    result = _prune_with_report(tmp_path, r20, tmp_path / "report.md")
    assert "--force" in assert_one_line_error(result)
    assert (tmp_path / "report.md").read_text() == "mine\n"
    assert files_in(tmp_path) == ["r20.pt", "report.md"]
    forced = _prune_with_report(tmp_path, r20, tmp_path / "report.md", "--force", "-q")
    assert forced.exit_code == 0, forced.output
    assert (tmp_path / "report.md").read_text().startswith("# prunecli report: ")


def test_report_may_not_be_the_model_output(tmp_path, r20):
    result = invoke("prune", r20, "--arch", "sample:resnet20", "--ratio", "0.25", "-o", tmp_path / "x.json",
                    "--report", tmp_path / "x.json")
    assert "also the model output" in assert_one_line_error(result)
    assert files_in(tmp_path) == ["r20.pt"]


SAMPLE = Path(__file__).parents[1] / "sample_models"


def test_report_shows_the_recorded_accuracy_of_the_source(tmp_path):
    result = invoke("prune", SAMPLE / "resnet20_fmnist.safetensors", "--ratio", "0.25", "-o", tmp_path / "slim.safetensors",
                    "--report", tmp_path / "report.md", "-q")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "report.md").read_text()
    assert "| fashion-mnist (recorded in the model file) | 92.96% | not measured (pass --eval-data) |" in text
    assert "## Latency" not in text


def test_report_with_measured_accuracy_and_latency(tmp_path):
    result = invoke("prune", SAMPLE / "resnet20_fmnist.safetensors", "--ratio", "0.25", "-o", tmp_path / "slim.safetensors",
                    "--eval-data", SAMPLE / "fmnist_calib.safetensors", "--eval-limit", "64", "--latency",
                    "--latency-batch", "4", "--report", tmp_path / "report.json", "--json")
    assert result.exit_code == 0, result.output
    pruned, report = json.loads(result.stdout), json.loads((tmp_path / "report.json").read_text())
    accuracy = report["accuracy"]
    assert accuracy == pruned["accuracy"]
    assert accuracy["measured"] and accuracy["images"] == 64
    assert 0.8 <= accuracy["original_top1"] <= 1 and 0 <= accuracy["pruned_top1"] <= 1
    latency = report["latency"]
    assert latency["macs_ratio"] == pytest.approx(pruned["before"]["macs"] / pruned["after"]["macs"])
    assert [(row["runtime"], row["batch"]) for row in latency["rows"]] == [
        ("torch", 1), ("torch", 4), ("onnxruntime", 1), ("onnxruntime", 4)]
    for row, measured in zip(latency["rows"], pruned["latency"]["rows"], strict=True):
        assert row["speedup"] == measured["speedup"] == pytest.approx(row["original_ms"] / row["slim_ms"])
        assert row["efficiency"] == pytest.approx(row["speedup"] / latency["macs_ratio"])


# ----------------------------------------------------------------------------- resource guards


def test_tracing_and_scoring_stop_at_their_time_limits_and_name_the_stage():
    from prunecli.api import score_model
    from prunecli.config import DataOptions, ModelSource, RunOptions, ScoreConfig, ScoringOptions
    from prunecli.errors import ArchitectureError
    from prunecli.graph import DependencyGraph

    with pytest.raises(ArchitectureError, match=r"^tracing the model's channel dependencies took longer than 0\.001 s; "
                                                r"raise --timeout"):
        DependencyGraph(torchvision.models.resnet18(weights=None), torch.randn(1, 3, 64, 64), timeout=0.001)
    data = DataOptions(str(SAMPLE / "fmnist_calib.safetensors"), calib_images=512, batch_size=64)
    config = ScoreConfig(ModelSource(SAMPLE / "resnet20_fmnist.safetensors"), ScoringOptions("hrank"), data,
                         RunOptions(score_timeout=0.05))
    with pytest.raises(ArchitectureError, match=r"^scoring channels with hrank took longer than 0\.05 s; "
                                                r"raise --score-timeout, or give fewer --calib-images$"):
        score_model(config)


def test_finetune_augment_option_reaches_the_training_loop(tmp_path):
    def finetune(augment: str):
        out = tmp_path / f"{augment}.safetensors"
        result = invoke("finetune", SAMPLE / "resnet20_fmnist.safetensors", "--data", SAMPLE / "fmnist_calib.safetensors",
                        "--limit", "16", "--batch-size", "8", "--steps", "2", "--device", "cpu", "--augment", augment,
                        "--json", "-o", out)
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["training"]["config"]["augment"] == augment
        return load(out).conv1.weight

    assert not torch.equal(finetune("none"), finetune("auto"))  # same seed: only the augmentation differs
    result = invoke("finetune", SAMPLE / "resnet20_fmnist.safetensors", "--augment", "mixup", "-o", tmp_path / "x.pt")
    assert result.exit_code == 2 and "--augment" in result.output and not (tmp_path / "x.pt").exists()


def test_finetune_writes_the_input_when_no_epoch_improves_on_it(tmp_path):
    """Issue 28: validation images labelled with the model's own predictions (top-1 100% before training), so
    no trained epoch can beat the input: the written model is the input's weights, and the output says so."""
    from safetensors.torch import load_file, save_file

    model = SAMPLE / "resnet20_fmnist.safetensors"
    images = load_file(str(SAMPLE / "fmnist_calib.safetensors"))["images"][:16]
    with torch.no_grad():
        predicted = load(model).eval()(images.float() / (255.0 if images.dtype == torch.uint8 else 1.0)).argmax(1)
    save_file({"images": images, "labels": predicted}, str(tmp_path / "own.safetensors"))
    args = ("finetune", model, "--data", SAMPLE / "fmnist_calib.safetensors", "--limit", "16", "--batch-size", "8",
            "--steps", "2", "--lr", "0.5", "--device", "cpu", "--val-data", tmp_path / "own.safetensors")
    result = invoke(*args, "-o", tmp_path / "text.safetensors", columns=200)
    assert result.exit_code == 0, result.output
    assert "100.00% before → 100.00% after (best epoch 0)" in result.output
    assert "kept the input's weights: no epoch improved on its validation top-1 of 100.00%" in result.output
    written, original = load(tmp_path / "text.safetensors").state_dict(), load(model).state_dict()
    for name, value in original.items():
        torch.testing.assert_close(written[name], value, rtol=0, atol=0, msg=name)
    result = invoke(*args, "--json", "-o", tmp_path / "json.safetensors")
    training = json.loads(result.output)["training"]
    assert training["kept_input"] is True and training["best_epoch"] == 0 and training["best_top1"] == 1.0


@pytest.mark.slow
def test_time_limits_hold_a_hundred_times_under_a_cpu_burning_thread():
    """The alarm can fire inside library code that catches ``Exception``; the limit must hold all the same."""
    import threading

    stop = threading.Event()

    def burn():
        while not stop.is_set():
            sum(i * i for i in range(10_000))

    burner = threading.Thread(target=burn, daemon=True)
    burner.start()
    try:
        for _ in range(100):
            test_tracing_and_scoring_stop_at_their_time_limits_and_name_the_stage()
    finally:
        stop.set()
        burner.join()


USER_MODULE = '''
from torch import nn


def net(num_classes=10):
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
    )
'''


def test_import_path_finds_the_architecture_of_a_slim_custom_model_on_every_command(tmp_path):
    import sys

    from safetensors.torch import save_file

    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "prunecli_user_net.py").write_text(USER_MODULE)
    sys.path.insert(0, str(folder))
    try:
        import prunecli_user_net
    finally:
        sys.path.remove(str(folder))
    del sys.modules["prunecli_user_net"]
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in prunecli_user_net.net().state_dict().items()}, str(base))
    calib = SAMPLE / "fmnist_calib.safetensors"
    model = ["--arch", "prunecli_user_net:net", "--import-path", folder]
    slim = tmp_path / "slim.safetensors"
    commands = {
        "prune a state dict": ["prune", base, *model, "--input-shape", "1x28x28", "--ratio", "0.5", "-o", slim],
        "analyze": ["analyze", slim, *model],
        "score": ["score", slim, *model],
        "prune": ["prune", slim, *model, "--ratio", "0.3", "-o", tmp_path / "again.safetensors"],
        "evaluate": ["evaluate", slim, *model, "--data", calib, "--limit", "16"],
        "finetune": ["finetune", slim, *model, "--data", calib, "--limit", "16", "--batch-size", "8", "--steps", "1",
                     "--device", "cpu", "-o", tmp_path / "ft.safetensors"],
        "export onnx": ["export", slim, *model, "-o", tmp_path / "slim.onnx"],
        "export safetensors": ["export", slim, *model, "--format", "safetensors", "-o", tmp_path / "copy.safetensors"],
        "export torchscript": ["export", slim, *model, "--format", "torchscript", "-o", tmp_path / "slim.pt"],
    }
    for what, args in commands.items():
        sys.modules.pop("prunecli_user_net", None)  # each command must find the module through --import-path
        result = invoke(*args, "-q") if args[0] in ("prune", "finetune") else invoke(*args)
        assert result.exit_code == 0, f"{what}: {result.output}"
    assert "prunecli_user_net" not in "".join(sys.path)
    sys.modules.pop("prunecli_user_net", None)
    assert load(slim, trust_code=True, import_paths=(folder,))(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


def test_old_option_spellings_still_work_hidden_and_clash_with_the_new_ones(tmp_path):
    r20 = SAMPLE / "resnet20_fmnist.safetensors"
    calib = SAMPLE / "fmnist_calib.safetensors"
    new = invoke("evaluate", r20, "--data", calib, "--eval-limit", "8", "--device", "cpu", "--json")
    old = invoke("evaluate", r20, "--data", calib, "--limit", "8", "--device", "cpu", "--json")
    assert new.exit_code == old.exit_code == 0, new.output + old.output
    assert json.loads(new.output)["metrics"]["images"] == json.loads(old.output)["metrics"]["images"] == 8
    clash = invoke("evaluate", r20, "--data", calib, "--eval-limit", "8", "--limit", "9")
    assert clash.exit_code == 2 and "--limit is the old name of --eval-limit" in clash.output
    exported = invoke("export", r20, "--data", calib, "--calib-images", "4", "-o", tmp_path / "m.onnx", "--json")
    assert exported.exit_code == 0, exported.output
    for command, old_flag in (("evaluate", "--limit"), ("finetune", "--limit"), ("export", "--calib-images")):
        assert old_flag not in invoke(command, "--help", columns=300).stdout


def test_closed_sets_are_choices_and_every_command_groups_its_options_in_panels():
    result = invoke("finetune", SAMPLE / "resnet20_fmnist.safetensors", "--amp", "maybe")
    assert result.exit_code == 2 and "--amp" in result.output
    result = invoke("score", SAMPLE / "resnet20_fmnist.safetensors", "--dct-band", "mid")
    assert result.exit_code == 2 and "--dct-band" in result.output
    panels = {}
    for command in ("analyze", "score", "prune", "evaluate", "finetune", "export"):
        text = invoke(command, "--help", columns=300).stdout
        panels[command] = [line.split("─ ")[1].split(" ─")[0] for line in text.splitlines() if line.startswith("╭─ ")]
        assert "-q, --quiet" in " ".join(text.replace("│", " ").split()) or "--quiet -q" in " ".join(text.split())
    assert panels["prune"] == ["Arguments", "Options", "Model", "Budget", "Criterion", "Data", "Recovery", "Output", "Run"]
    assert all(p[:3] == ["Arguments", "Options", "Model"] for p in panels.values())


def test_tables_in_a_pipe_keep_their_rows_on_one_line():
    result = runner.invoke(app, ["analyze", str(SAMPLE / "resnet20_fmnist.safetensors")], env={"COLUMNS": ""})
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if "layer1.0.conv1" in line)
    assert "Conv2d" in row and "3x3" in row and "yes" in row  # the whole row on one line, not folded at 80 columns
    assert max(len(line) for line in result.stdout.splitlines()) > 80


def test_group_scope_reaches_the_scores_and_the_artifact(tmp_path, r20):
    from prunecli.io.slim import read_slim_metadata

    got = {}
    for scope in ("producers", "all"):
        result = invoke("score", r20, "--arch", "sample:resnet20", "--group-scope", scope, "--json")
        assert result.exit_code == 0, result.output
        got[scope] = json.loads(result.stdout)
        assert got[scope]["group_scope"] == scope
    # the consumers' input slices and the norms' scales change the scores of every group but fc (not prunable)
    for a, b in zip(got["producers"]["groups"], got["all"]["groups"], strict=True):
        assert a["root"] == b["root"] and a["scores"] != b["scores"]
    output = tmp_path / "slim.safetensors"
    result = invoke("prune", r20, "--arch", "sample:resnet20", "--flops-target", "0.5", "--group-scope", "all",
                    "-o", output, "--json")
    assert result.exit_code == 0, result.output
    assert read_slim_metadata(output)["config"]["scoring"]["group_scope"] == "all"
    assert "(takes --group-scope)" in invoke("score", "--help", columns=300).stdout


# ----------------------------------------------------------------------------- which data, and how much of it

DEFAULT_NOTE = "no --data given: {done} on fashion-mnist:{split}, the default for a model that takes 1x28x28 images; " \
               "give --data to choose"


@pytest.mark.parametrize("command, split", [("evaluate", "test"), ("finetune", "train")])
def test_no_hidden_default_data_for_a_model_that_does_not_take_fashion_mnist_images(tmp_path, r18_weights, command,
                                                                                      split):
    """Issue 28 item 3: an ImageNet-shaped model used to end in `cannot normalise images of shape (10000, 1, 28, 28)
    with 3 means and 3 stds`; now it is asked for --data, a usage error, before any image is read."""
    result = invoke(command, r18_weights, "-o", tmp_path / "ft.safetensors") if command == "finetune" else \
        invoke(command, r18_weights)
    message = assert_one_line_error(result, 2)
    assert message == (
        "error: give --data (labelled images: an image folder with one sub-folder per class, or a tensor file with "
        f"'images' and 'labels'): this model takes 3x224x224 images, and only models that take 1x28x28 images "
        f"default to fashion-mnist:{split}")
    assert files_in(tmp_path) == []


def test_the_library_refuses_a_missing_data_source_by_the_same_rule(r18_weights):
    from prunecli.api import evaluate_model
    from prunecli.config import DataOptions, EvaluateConfig, ModelSource
    from prunecli.errors import OptionError

    with pytest.raises(OptionError, match=r"^give --data .* this model takes 3x224x224 images"):
        evaluate_model(EvaluateConfig(ModelSource(r18_weights)))
    assert DataOptions().for_model((1, 28, 28), "test").source == "fashion-mnist:test"
    assert DataOptions("imgs").for_model((3, 224, 224), "test").source == "imgs"  # given: kept, whatever the model


@pytest.mark.skipif(not FASHION_MNIST_ROOT.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_evaluate_without_data_says_it_used_the_fashion_mnist_test_split():
    args = ("evaluate", SAMPLE / "resnet20_fmnist.safetensors", "--eval-limit", "64", "--device", "cpu")
    data = json.loads(invoke(*args, "--json").stdout)
    assert data["data"] == "fashion-mnist:test" and data["metrics"]["images"] == 64
    assert data["notes"] == [DEFAULT_NOTE.format(done="evaluated", split="test")]
    text = invoke(*args, columns=300).stdout
    assert "evaluation on fashion-mnist:test (64 images)" in text
    assert f"note: {DEFAULT_NOTE.format(done='evaluated', split='test')}" in text


@pytest.mark.skipif(not FASHION_MNIST_ROOT.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_finetune_without_data_says_it_trained_on_the_fashion_mnist_training_split(tmp_path):
    args = ("finetune", SAMPLE / "resnet20_fmnist.safetensors", "--train-limit", "16", "--batch-size", "8", "--steps",
            "1", "--device", "cpu")
    data = json.loads(invoke(*args, "--json", "-o", tmp_path / "a.safetensors").stdout)
    assert (data["data"], data["images"], data["val_data"]) == ("fashion-mnist:train", 16, None)
    assert data["notes"] == [DEFAULT_NOTE.format(done="trained", split="train")]
    text = invoke(*args, "-o", tmp_path / "b.safetensors", columns=300).stdout
    assert "trained on fashion-mnist:train (16 images)" in text
    quiet = invoke(*args, "-q", "-o", tmp_path / "c.safetensors").stdout
    assert quiet == f"{SAMPLE / 'resnet20_fmnist.safetensors'} -> {tmp_path / 'c.safetensors'}: fine-tuned on " \
                    "fashion-mnist:train\n"


@pytest.fixture(scope="module")
def few_images(tmp_path_factory) -> Path:
    """48 labelled images of the sample calibration file: little to load, score, train and verify on."""
    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("few") / "few.safetensors"
    save_file({k: v[:48].contiguous() for k, v in load_file(str(CALIB)).items()}, str(path))
    return path


def _held(option: str, asked: int, data_option: str, data: Path, done: str) -> str:
    return f"{option} {asked}: {data_option} {data} holds 48 images; {done} on all 48"


def test_asking_for_more_calibration_or_evaluation_images_than_the_data_holds_is_said(tmp_path, r20, few_images):
    """Issue 28 item 5: `--calib-images 1024` on a 300-image folder ran on 300 without a word."""
    args = ("prune", r20, "--arch", "sample:resnet20", "--ratio", "0.25", "--data", few_images, "--batch-size", "16",
            "--device", "cpu", "--round-to", "1")  # no rounding note beside the shortfalls
    result = invoke(*args, "--calib-images", "1024", "--eval-data", few_images, "--eval-limit", "600", "--json",
                    "-o", tmp_path / "a.safetensors")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["notes"] == [_held("--calib-images", 1024, "--data", few_images, "calibrated"),
                             _held("--eval-limit", 600, "--eval-data", few_images, "evaluated")]
    assert data["accuracy"]["images"] == 48
    text = invoke(*args, "--calib-images", "1024", "-o", tmp_path / "b.safetensors", columns=300).stdout
    assert f"note: {_held('--calib-images', 1024, '--data', few_images, 'calibrated')}" in text
    exact = invoke(*args, "--calib-images", "48", "--json", "-o", tmp_path / "c.safetensors")
    assert json.loads(exact.stdout)["notes"] == []  # all it asked for: nothing to say
    scored = invoke("score", r20, "--arch", "sample:resnet20", "--data", few_images, "--calib-images", "1024",
                    columns=300)
    assert scored.exit_code == 0, scored.output
    assert f"note: {_held('--calib-images', 1024, '--data', few_images, 'scored')}" in scored.stdout


def test_asking_to_evaluate_train_or_verify_on_more_images_than_the_data_holds_is_said(tmp_path, r20, few_images):
    evaluated = invoke("evaluate", r20, "--arch", "sample:resnet20", "--data", few_images, "--eval-limit", "1000",
                       "--device", "cpu", "--json")
    assert json.loads(evaluated.stdout)["notes"] == [_held("--eval-limit", 1000, "--data", few_images, "evaluated")]
    tuned = invoke("finetune", SAMPLE / "resnet20_fmnist.safetensors", "--data", few_images, "--train-limit", "1000",
                   "--val-data", few_images, "--val-limit", "600", "--batch-size", "16", "--steps", "1",
                   "--device", "cpu", "--json", "-o", tmp_path / "ft.safetensors")
    assert tuned.exit_code == 0, tuned.output
    assert json.loads(tuned.stdout)["notes"] == [_held("--train-limit", 1000, "--data", few_images, "trained"),
                                                 _held("--val-limit", 600, "--val-data", few_images, "validated")]
    exported = invoke("export", SAMPLE / "resnet20_fmnist.safetensors", "--data", few_images, "--verify-images", "100",
                      "-f", "safetensors", "-o", tmp_path / "m.safetensors", "--json")
    assert exported.exit_code == 0, exported.output
    assert json.loads(exported.stdout)["notes"] == [_held("--verify-images", 100, "--data", few_images, "verified")]


def test_finetune_refuses_more_recalibration_batches_than_the_training_images_hold(tmp_path):
    """As prune does: --recalibrate-bn N is a number of batches the statistics are estimated on, and fewer would
    be another estimate than the one asked for."""
    result = invoke("finetune", SAMPLE / "resnet20_fmnist.safetensors", "--data", CALIB, "--recalibrate-bn", "20",
                    "--train-limit", "100", "--batch-size", "16", "--device", "cpu", "-o", tmp_path / "ft.safetensors")
    assert assert_one_line_error(result, 2) == (
        f"error: --recalibrate-bn 20 asks for 20 batches of 16 images, but the training images ({CALIB}) are 100 "
        "(7 batches); give --recalibrate-bn 7")
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("command", ["score", "prune"])
def test_fewer_images_than_one_batch_are_refused_by_score_and_prune_alike(tmp_path, r20, few_images, command):
    budget = ("--flops-target", "0.5", "-o", tmp_path / "slim.safetensors") if command == "prune" else ()
    result = invoke(command, r20, "--arch", "sample:resnet20", "--method", "hrank", "--data", few_images,
                    "--batch-size", "64", *budget)
    message = assert_one_line_error(result)
    assert message == (f"error: --data {few_images} has 48 images, fewer than one batch of 64; give more images or "
                       "a smaller --batch-size")
    assert files_in(tmp_path) == ["r20.pt"]
