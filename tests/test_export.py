"""Export: ONNX (both exporters, fallback, dynamic batch, metadata, parity with onnxruntime), safetensors
re-writes in fp16/bf16, TorchScript, the failure paths that must leave no file behind, and latency."""

from __future__ import annotations

import ast
import copy
import json
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from safetensors import safe_open
from torch import nn
from torch.testing import assert_close
from typer.testing import CliRunner

import prunecli
import prunecli.export.onnx as onnx_module
import prunecli.latency as latency_module
from prunecli.api import prune_model
from prunecli.budget import parse_budget
from prunecli.cli import app
from prunecli.config import ModelSource, OutputOptions, PruneConfig
from prunecli.errors import DataError, ExportError, OptionError
from prunecli.export import ExportConfig, export_model
from prunecli.export.verify import cast_tolerance
from prunecli.io.files import sha256_file
from prunecli.io.slim import read_slim_metadata
from prunecli.latency import compare_latency, latency
from prunecli.samples import resnet20

R20_SHAPE = (1, 28, 28)
SAMPLE = Path(__file__).resolve().parents[1] / "sample_models" / "resnet20_fmnist.safetensors"
TV_SHAPE = (3, 64, 64)


# ----------------------------------------------------------------------------- models and helpers


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    ).eval()


class Drifting(nn.Module):
    """Adds a Python-side call counter to its output: a trace bakes in one value, so every export drifts
    from eager by at least 1e-3, ten times the default --atol."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(x.flatten(1)) + self.calls * 1e-3


def calibrate_norms(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    """Give BN layers the running statistics of random inputs, so eval outputs are O(1), not vanishing."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn((8, *shape), generator=generator))
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.1
    return model.eval()


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def ort_run(path, x: torch.Tensor):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def props(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message.strip() == message and message
    return message


def prune(tmp_path, model: nn.Module, arch: str, shape: tuple[int, ...], arch_kwargs=None):
    """Prune to 50% MACs through the API; return the slim file, the reloaded model and its document."""
    source = tmp_path / "weights.pt"
    torch.save(model.state_dict(), source)
    output = tmp_path / "model.slim.safetensors"
    prune_model(
        PruneConfig(
            ModelSource(source, arch=arch, arch_kwargs=arch_kwargs or {}, input_shape=shape),
            parse_budget("macs", "0.5"),
            output=OutputOptions(output),
        )
    )
    return output, prunecli.load(output), read_slim_metadata(output)


@pytest.fixture(scope="module")
def r20_slim(tmp_path_factory):
    """resnet20 pruned to 50% MACs by l1: (slim file, slim model, document, source sha256)."""
    tmp_path = tmp_path_factory.mktemp("r20")
    torch.manual_seed(0)
    model = calibrate_norms(resnet20(), R20_SHAPE)
    path, slim, document = prune(tmp_path, model, "sample:resnet20", R20_SHAPE)
    return path, slim, document, sha256_file(tmp_path / "weights.pt")


@pytest.fixture(scope="module")
def r20_onnx(r20_slim, tmp_path_factory):
    """The pruned resnet20 exported once as a batch-dynamic ONNX (auto exporter)."""
    _, slim, document, _ = r20_slim
    output = tmp_path_factory.mktemp("onnx") / "r20.onnx"
    result = export_model(
        slim, input_shape=R20_SHAPE, document=document, config=ExportConfig("onnx", output, dynamic_batch=True)
    )
    return result, output


# ----------------------------------------------------------------------------- ONNX


def test_onnx_dynamic_batch_parity_and_result(r20_slim, r20_onnx):
    _, slim, _, _ = r20_slim
    result, output = r20_onnx
    assert (result.format, result.exporter, result.fallback_reason, result.opset) == ("onnx", "legacy", None, 20)
    assert result.dynamic_batch and result.file_size == output.stat().st_size > 0
    assert (result.input_names, result.output_names) == (("input",), ("logits",))
    verification = result.verification
    assert verification.passed and verification.atol == 1e-4 and verification.real is None
    assert verification.random.batches == (1, 3)
    assert 0 <= verification.random.max_abs < 1e-4
    # the batch axis is symbolic in the file, and onnxruntime really runs batch 1 and 3
    model = onnx.load(str(output))
    assert [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim] == ["batch", "", "", ""]
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [0, 1, 28, 28]
    assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    for batch in (1, 3):
        x = torch.randn(batch, *R20_SHAPE)
        got = ort_run(output, x)
        assert got.shape == (batch, 10)
        assert_close(got, run(slim, x), rtol=0, atol=1e-4)


def test_onnx_metadata_props_carry_the_provenance(r20_slim, r20_onnx):
    _, _, document, source_sha = r20_slim
    meta = props(r20_onnx[1])
    assert meta["prunecli.method"] == "l1"
    assert meta["prunecli.arch"] == "sample:resnet20"
    assert meta["prunecli.allocation"] == "uniform"
    assert meta["prunecli.format_version"] == "1"
    assert meta["prunecli.version"] == meta["prunecli.pruned_with"] == prunecli.__version__
    assert meta["prunecli.exporter"] == "legacy" and meta["prunecli.input_shape"] == "1x28x28"
    assert meta["prunecli.source_sha256"] == source_sha == document["source_sha256"]
    assert int(meta["prunecli.achieved_macs"]) == document["achieved"]["macs"]
    assert int(meta["prunecli.achieved_params"]) == document["achieved"]["params"]
    assert int(meta["prunecli.original_macs"]) == document["original"]["macs"] == 31_021_952
    assert 0.45 < document["achieved"]["macs"] / document["original"]["macs"] < 0.52
    budget = json.loads(meta["prunecli.budget"])
    assert (budget["kind"], budget["value"], budget["absolute"]) == ("macs", 0.5, False)


def test_onnx_static_batch_of_a_plain_model_is_reproducible(tmp_path):
    model = resnet20().eval()
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    x = torch.randn(5, *R20_SHAPE)
    result = export_model(
        model, input_shape=R20_SHAPE, document=None, config=ExportConfig("onnx", first, opset=17), real_inputs=x
    )
    export_model(model, input_shape=R20_SHAPE, document=None, config=ExportConfig("onnx", second, opset=17))
    assert first.read_bytes() == second.read_bytes()  # same command, same bytes
    assert result.opset == 17 and [o.version for o in onnx.load(str(first)).opset_import if o.domain == ""] == [17]
    assert result.verification.random.batches == (1, 1)
    assert result.verification.real.batches == (1, 1, 1, 1, 1)  # a fixed batch of 1: real images one by one
    assert result.verification.real.max_abs < 1e-4
    shape = onnx.load(str(first)).graph.input[0].type.tensor_type.shape
    assert [d.dim_value for d in shape.dim] == [1, 1, 28, 28]
    # a plain model has no pruning provenance: only what the export itself knows
    assert props(first) == {
        "prunecli.exporter": "legacy",
        "prunecli.input_shape": "1x28x28",
        "prunecli.version": prunecli.__version__,
    }
    assert_close(ort_run(first, x[:1]), run(model, x[:1]), rtol=0, atol=1e-4)
    with pytest.raises(ExportError) as exc:  # a static model cannot be timed at another batch
        latency(first, R20_SHAPE, batch_sizes=(2,), warmup=0, repeats=1, runtime="onnxruntime")
    assert "fixed batch of 1" in one_line(exc) and "--dynamic-batch" in str(exc.value)


def test_auto_falls_back_to_dynamo_with_the_reason(tmp_path, monkeypatch):
    real_exporter = onnx_module._run_exporter

    def legacy_breaks(name, *args):
        if name == "legacy":
            raise RuntimeError("Unsupported: ONNX export of operator foo\nsecond line")
        return real_exporter(name, *args)

    monkeypatch.setattr(onnx_module, "_run_exporter", legacy_breaks)
    output = tmp_path / "tiny.onnx"
    model = tiny()
    result = export_model(
        model, input_shape=(1, 12, 12), document=None, config=ExportConfig("onnx", output, dynamic_batch=True)
    )
    assert result.exporter == "dynamo" and result.opset == 20
    assert result.fallback_reason == (
        "the legacy exporter failed (RuntimeError: Unsupported: ONNX export of operator foo); fell back to dynamo"
    )
    assert result.verification.random.batches == (1, 3) and result.verification.random.max_abs < 1e-5
    assert props(output)["prunecli.exporter"] == "dynamo"
    dims = onnx.load(str(output)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].HasField("dim_param") and [d.dim_value for d in dims[1:]] == [1, 12, 12]
    for batch in (1, 3):
        x = torch.randn(batch, 1, 12, 12)
        assert_close(ort_run(output, x), run(model, x), rtol=0, atol=1e-5)
    # the explicit exporter does not fall back: a clear error and no file
    other = tmp_path / "legacy.onnx"
    with pytest.raises(ExportError) as exc:
        export_model(model, input_shape=(1, 12, 12), document=None, config=ExportConfig("onnx", other, exporter="legacy"))
    assert one_line(exc) == (
        "ONNX export failed: the legacy exporter failed (RuntimeError: Unsupported: ONNX export of operator foo); "
        "try --exporter dynamo"
    )
    assert not other.exists()


def test_auto_picks_dynamo_for_an_opset_above_legacy(tmp_path):
    result = export_model(
        tiny(), input_shape=(1, 12, 12), document=None, config=ExportConfig("onnx", tmp_path / "t.onnx", opset=21)
    )
    assert (result.exporter, result.opset) == ("dynamo", 21)
    assert result.fallback_reason == "opset 21 is above the legacy exporter's 20; used dynamo"


@pytest.mark.parametrize(
    ("exporter", "opset", "words"),
    [
        ("auto", 5, "--opset 5 is not supported by torch 2.14.1"),
        ("auto", 5, "choose an opset from 7 to 23 (legacy 7-20, dynamo 18-23)"),
        ("legacy", 21, "not supported by the legacy exporter of torch 2.14.1"),
        ("legacy", 21, "(opsets 7-20); use --exporter dynamo"),
        ("dynamo", 17, "(opsets 18-23); use --exporter legacy"),
        ("dynamo", 30, "(opsets 18-23)"),
    ],
)
def test_unsupported_opset_is_a_clear_error_and_no_file(tmp_path, exporter, opset, words):
    output = tmp_path / "m.onnx"
    config = ExportConfig("onnx", output, opset=opset, exporter=exporter)
    with pytest.raises(ExportError) as exc:
        export_model(tiny(), input_shape=(1, 12, 12), document=None, config=config)
    assert words in one_line(exc)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("fmt", "name"), [("onnx", "m.onnx"), ("torchscript", "m.pt")])
def test_parity_failure_writes_nothing_and_keeps_the_old_file(tmp_path, fmt, name):
    output = tmp_path / name
    output.write_bytes(b"previous artifact")
    config = ExportConfig(fmt, output, force=True)
    with pytest.raises(ExportError) as exc:
        export_model(Drifting().eval(), input_shape=(1, 2, 2), document=None, config=config)
    message = one_line(exc)
    assert "differs from the PyTorch model by max abs 0.00" in message
    assert "above --atol 0.0001; nothing was written" in message
    assert output.read_bytes() == b"previous artifact"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temp file left behind
    # with verification off the same model exports (the user asked for no check)
    unchecked = ExportConfig(fmt, output, force=True, verify=False)
    result = export_model(Drifting().eval(), input_shape=(1, 2, 2), document=None, config=unchecked)
    assert result.verification is None and output.read_bytes() != b"previous artifact"


def test_a_nan_output_fails_verification(tmp_path, monkeypatch):
    def nan_runner(session):
        return lambda x: [torch.full((len(x), 3), float("nan"))]

    monkeypatch.setattr(onnx_module, "_ort_runner", nan_runner)
    output = tmp_path / "m.onnx"
    with pytest.raises(ExportError) as exc:
        export_model(tiny(), input_shape=(1, 12, 12), document=None, config=ExportConfig("onnx", output))
    assert "by max abs nan (relative nan) on random inputs, above --atol 0.0001" in one_line(exc)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"format": "tflite", "output": "m.tflite"}, "unknown --format 'tflite'; choose one of onnx, safetensors, torch"),
        ({"format": "onnx", "output": "m.pt"}, "output m.pt does not end in .onnx as --format onnx needs; rename it"),
        ({"format": "torchscript", "output": "m.onnx"}, "does not end in .pt or .ts as --format torchscript needs"),
        ({"format": "safetensors", "output": "m.onnx"}, "does not end in .safetensors"),
        ({"format": "onnx", "output": "m.onnx", "exporter": "tvm"}, "unknown --exporter 'tvm'; choose one of auto, dyn"),
        ({"format": "onnx", "output": "m.onnx", "dtype": "fp16"}, "--dtype fp16 applies to --format safetensors only"),
        ({"format": "safetensors", "output": "m.safetensors", "dtype": "int8"}, "unknown --dtype 'int8'"),
        ({"format": "torchscript", "output": "m.ts", "opset": 17}, "--opset and --exporter apply to --format onnx only"),
        ({"format": "safetensors", "output": "m.safetensors", "dynamic_batch": True}, "safetensors has no batch axis"),
        ({"format": "onnx", "output": "m.onnx", "opset": 0}, "--opset 0 must be a positive integer"),
        ({"format": "onnx", "output": "m.onnx", "atol": -1.0}, "--atol -1.0 must be zero or positive"),
    ],
)
def test_bad_configs_are_refused(kwargs, words):
    with pytest.raises(OptionError) as exc:  # usage errors: exit 2
        ExportConfig(**kwargs)
    assert words in one_line(exc)


def test_config_round_trips_through_a_dict(tmp_path):
    config = ExportConfig("onnx", tmp_path / "m.onnx", opset=18, dynamic_batch=True, exporter="dynamo", atol=1e-3)
    data = config.to_dict()
    assert data["output"] == str(tmp_path / "m.onnx") and data["input_names"] == ["input"]
    assert json.loads(json.dumps(data)) == data
    assert ExportConfig.from_dict(data) == config


def test_existing_output_and_bad_real_data_are_refused_before_any_work(tmp_path):
    output = tmp_path / "m.onnx"
    output.write_bytes(b"keep me")
    with pytest.raises(ExportError) as exc:
        export_model(tiny(), input_shape=(1, 12, 12), document=None, config=ExportConfig("onnx", output))
    assert f"output {output} already exists; pass --force" in one_line(exc)
    assert output.read_bytes() == b"keep me"
    with pytest.raises(DataError) as exc:
        export_model(
            tiny(), input_shape=(1, 12, 12), document=None, config=ExportConfig("onnx", tmp_path / "n.onnx"),
            real_inputs=torch.randn(4, 3, 12, 12),
        )
    assert "shape (4, 3, 12, 12) but the model takes N x 1x12x12" in one_line(exc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@pytest.mark.parametrize(
    "name", ["resnet18", "mobilenet_v2", pytest.param("efficientnet_b0", marks=pytest.mark.slow)]  # b0: ~35 s loaded
)
def test_pruned_torchvision_models_match_onnxruntime(tmp_path, name):
    torch.manual_seed(0)
    model = calibrate_norms(getattr(torchvision.models, name)(num_classes=10), TV_SHAPE)
    _, slim, document = prune(tmp_path, model, f"torchvision:{name}", TV_SHAPE, {"num_classes": 10})
    assert 0.4 < document["achieved"]["macs"] / document["original"]["macs"] < 0.52
    output = tmp_path / f"{name}.onnx"
    x = torch.randn(3, *TV_SHAPE)
    reference = run(slim, x)
    assert reference.abs().max() > 0.05  # calibrated norms: the parity check is not vacuous
    result = export_model(
        slim, input_shape=TV_SHAPE, document=document, config=ExportConfig("onnx", output, dynamic_batch=True),
        real_inputs=x,
    )
    assert result.verification.passed and result.verification.random.max_abs < 1e-4
    assert result.verification.real.batches == (3,)
    assert_close(ort_run(output, x), reference, rtol=0, atol=1e-4)
    assert props(output)["prunecli.arch"] == f"torchvision:{name}"


# ----------------------------------------------------------------------------- safetensors and TorchScript


@pytest.mark.parametrize(("dtype", "torch_dtype", "atol"), [("fp16", torch.float16, 5e-3), ("bf16", torch.bfloat16, 5e-2)])
def test_safetensors_rewrite_in_half_precision(tmp_path, r20_slim, dtype, torch_dtype, atol):
    slim_path, slim, document, _ = r20_slim
    output = tmp_path / f"r20.{dtype}.safetensors"
    result = export_model(
        slim, input_shape=R20_SHAPE, document=document, config=ExportConfig("safetensors", output, dtype=dtype)
    )
    stored = read_slim_metadata(output)
    assert stored["dtype"] == dtype
    assert (stored["method"], stored["source_sha256"], stored["achieved"]) == (
        "l1", document["source_sha256"], document["achieved"],
    )
    assert stored["modules"] == document["modules"] and stored["arch"] == document["arch"]
    with safe_open(str(output), framework="pt") as handle:
        assert handle.get_tensor("conv1.weight").dtype == torch_dtype
        assert handle.get_tensor("bn1.num_batches_tracked").dtype == torch.int64
    assert 0.45 < result.file_size / slim_path.stat().st_size < 0.55  # half the bytes per weight
    # the file reproduces the cast weights exactly; the cast itself costs a little against fp32, within its tolerance
    check = result.verification
    assert check.random.max_abs == 0.0 and check.cast.max_abs > 0
    assert check.cast.max_abs < atol
    assert (check.cast_dtype, check.cast_tolerance) == (dtype, 8 * torch.finfo(torch_dtype).eps)
    assert check.cast.max_rel <= check.cast_tolerance
    reloaded = prunecli.load(output)
    x = torch.randn(3, *R20_SHAPE)
    assert_close(run(reloaded, x), run(slim, x), rtol=0, atol=atol)


def test_cast_tolerance_is_eight_machine_epsilons():
    assert cast_tolerance(torch.float16) == 8 * 2**-10 == 0.0078125
    assert cast_tolerance(torch.bfloat16) == 8 * 2**-7 == 0.0625


@pytest.mark.parametrize(
    ("scale", "words"),
    [
        (1e-6, "above the 0.00781 (8 x fp16 eps) a fp16 cast may; nothing was written (try --dtype bf16"),  # underflow
        (1e6, "moves the outputs by max abs nan"),  # weights beyond fp16's 65504
    ],
)
def test_a_half_precision_cast_above_its_tolerance_fails_and_writes_nothing(tmp_path, r20_slim, scale, words):
    _, slim, document, _ = r20_slim
    model = copy.deepcopy(slim)
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        classifier.weight *= scale
        classifier.bias *= scale
    output = tmp_path / "r20.fp16.safetensors"
    with pytest.raises(ExportError) as exc:
        export_model(model, input_shape=R20_SHAPE, document=document,
                     config=ExportConfig("safetensors", output, dtype="fp16"))
    message = one_line(exc)
    assert message.startswith("the cast to fp16 moves the outputs by max abs ") and words in message
    assert list(tmp_path.iterdir()) == []
    # the same model in bf16 (fp32's range) is within bf16's tolerance
    bf16 = export_model(model, input_shape=R20_SHAPE, document=document,
                        config=ExportConfig("safetensors", tmp_path / "r20.bf16.safetensors", dtype="bf16"))
    assert bf16.verification.cast.max_rel <= 0.0625


def test_cli_export_shows_the_cast_tolerance(tmp_path):
    output = tmp_path / "r20.fp16.safetensors"
    run = CliRunner().invoke(app, ["export", str(SAMPLE), "--format", "safetensors", "--dtype", "fp16", "-o",
                                   str(output)], env={"COLUMNS": "200"})
    assert run.exit_code == 0, run.output
    cast = [line for line in run.stdout.splitlines() if line.startswith("verify (fp16 cast")]
    assert len(cast) == 1 and cast[0].startswith("verify (fp16 cast against fp32, random inputs): max abs 0.00")
    assert cast[0].endswith("(tolerance max rel 0.00781 for fp16) ok")


def test_safetensors_needs_an_architecture(tmp_path):
    with pytest.raises(ExportError) as exc:
        config = ExportConfig("safetensors", tmp_path / "m.safetensors")
        export_model(tiny(), input_shape=(1, 12, 12), document=None, config=config)
    assert "needs the base architecture" in one_line(exc)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_round_trip(tmp_path, r20_slim):
    _, slim, document, _ = r20_slim
    output = tmp_path / "r20.ts"
    result = export_model(
        slim, input_shape=R20_SHAPE, document=document, config=ExportConfig("torchscript", output, dynamic_batch=True)
    )
    assert (result.exporter, result.opset) == ("torch.jit.trace", None)
    assert result.verification.random.batches == (1, 3) and result.verification.random.max_abs < 1e-5
    loaded = torch.jit.load(str(output))
    x = torch.randn(3, *R20_SHAPE)
    assert_close(run(loaded, x), run(slim, x), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- latency


class FakeClock:
    """perf_counter whose consecutive start/stop pairs measure the given durations (in seconds)."""

    def __init__(self, durations):
        self.ticks = [t for i, d in enumerate(durations) for t in (float(i), float(i) + d)]

    def __call__(self):
        return self.ticks.pop(0)


def test_latency_is_the_median_after_warmup(monkeypatch):
    model = tiny()
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    monkeypatch.setattr(latency_module, "_clock", FakeClock([0.005, 0.001, 0.003, 0.002, 0.004, 0.010]))
    result = latency(model, (1, 12, 12), batch_sizes=(1, 2), warmup=2, repeats=3, seconds=0)
    assert result == pytest.approx({1: 3.0, 2: 4.0})
    assert calls == [1] * 5 + [2] * 5  # 2 warm-up + 3 timed runs per batch size
    assert model.training is False


def test_latency_on_onnxruntime(tmp_path, r20_onnx):
    timed = latency(r20_onnx[1], R20_SHAPE, batch_sizes=(1, 4), warmup=1, repeats=2, runtime="onnxruntime", threads=1)
    assert set(timed) == {1, 4} and all(ms > 0 for ms in timed.values())
    in_memory = latency(tiny(), (1, 12, 12), batch_sizes=(2,), warmup=0, repeats=1, runtime="onnxruntime")
    assert set(in_memory) == {2} and in_memory[2] > 0
    with pytest.raises(ExportError) as exc:
        latency(r20_onnx[1], R20_SHAPE, runtime="torch")
    assert "runtime 'torch' times an nn.Module" in one_line(exc)
    with pytest.raises(ExportError):
        latency(tiny(), (1, 12, 12), runtime="tensorrt")


def test_compare_latency_puts_the_speedup_beside_the_macs_ratio(r20_slim, monkeypatch):
    _, slim, document, _ = r20_slim
    original = resnet20().eval()
    monkeypatch.setattr(latency_module, "_clock", FakeClock([0.004, 0.002]))
    comparison = compare_latency(original, slim, R20_SHAPE, batch_sizes=(1,), warmup=0, repeats=1, runtimes=("torch",),
                                 seconds=0)
    assert len(comparison.rows) == 1
    row = comparison.rows[0]
    assert (row.runtime, row.batch) == ("torch", 1)
    assert row.original_ms == pytest.approx(4.0) and row.slim_ms == pytest.approx(2.0) and row.speedup == pytest.approx(2.0)
    assert comparison.original_macs == document["original"]["macs"] == 31_021_952
    assert comparison.slim_macs == document["achieved"]["macs"]
    assert comparison.macs_ratio == pytest.approx(document["original"]["macs"] / document["achieved"]["macs"])
    assert 1.9 < comparison.macs_ratio < 2.2
    assert comparison.to_dict()["rows"][0]["speedup"] == pytest.approx(2.0)


def test_onnx_is_imported_lazily():
    files = [*Path(onnx_module.__file__).parent.glob("*.py"), Path(latency_module.__file__)]
    assert len(files) >= 6
    for path in files:
        tree = ast.parse(path.read_text())
        top_level = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
        top_level |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
        assert "torch" in top_level and not top_level & {"onnx", "onnxruntime", "onnxscript"}, path


def test_compare_latency_alternates_the_two_models(monkeypatch):
    original, slim, calls = tiny(), tiny(), []
    original.register_forward_hook(lambda module, args, out: calls.append("original"))
    slim.register_forward_hook(lambda module, args, out: calls.append("slim"))
    monkeypatch.setattr(latency_module, "_clock", FakeClock([0.006, 0.002, 0.004, 0.003, 0.008, 0.001]))
    comparison = compare_latency(original, slim, (1, 12, 12), batch_sizes=(2,), warmup=1, repeats=3, runtimes=("torch",),
                                 seconds=0)
    # one costing pass each (the MACs ratio), one warm-up each, then three rounds of one run each
    assert calls == ["original", "slim"] * 5
    row = comparison.rows[0]
    assert (row.original_ms, row.slim_ms) == pytest.approx((6.0, 2.0))  # medians of 6, 4, 8 and 2, 3, 1
