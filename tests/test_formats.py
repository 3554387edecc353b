"""Checkpoint formats as adapters (prunecli/io/formats): which adapter claims which file, and the whole pickled model
(``torch.save(model)``) read and written back as one: pruned through the CLI, reloaded by torch.load and by prunecli
without --trust-pickle, equal to the model pruned in memory, byte-identical when written twice."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import models as M
import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn
from torch.testing import assert_close
from typer.testing import CliRunner

import prunecli
import prunecli.io.formats.whole_model as whole_model_module
from prunecli.cli import app
from prunecli.config import ModelSource
from prunecli.errors import CheckpointError, ExportError, OptionError
from prunecli.io.arch import ArchSpec
from prunecli.io.formats import FORMATS, checkpoint_format, claiming, load_model, open_checkpoint, probe
from prunecli.io.formats.hf import HF_FOLDER
from prunecli.io.formats.slim import SLIM
from prunecli.io.formats.state_dict import STATE_DICT
from prunecli.io.formats.whole_model import METADATA_ATTRIBUTE, WHOLE_MODEL, WholeModelFormat, save_whole_model
from prunecli.io.readers import pickled_class
from prunecli.io.slim import save_slim
from prunecli.layers import DecomposedConv
from prunecli.samples import resnet20

runner = CliRunner()
SAMPLE = Path(__file__).parents[1] / "sample_models"

# nn.Sequential below at 1x28x28 (conv + linear MACs, thop convention):
#   conv1 16*1*9*784 = 112,896; conv2 (stride 2) 32*16*9*196 = 903,168; linear 32*10 = 320.
SEQ_MACS = 1_016_384
# --ratio 0.5 removes half of each group (16 -> 8, 32 -> 16): 8*9*784 + 16*8*9*196 + 16*10
SEQ_MACS_HALF = 56_448 + 225_792 + 160
SEQ_CLASSES = (
    "torch.nn.modules.activation.ReLU", "torch.nn.modules.batchnorm.BatchNorm2d", "torch.nn.modules.container.Sequential",
    "torch.nn.modules.conv.Conv2d", "torch.nn.modules.flatten.Flatten", "torch.nn.modules.linear.Linear",
    "torch.nn.modules.pooling.AdaptiveAvgPool2d",
)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def one_line_error(result, code: int = 1) -> str:
    """The error: stderr's last line, one line; before it only the stages reached, one plain line each (stderr is
    not a terminal here, and these runs are not -q)."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    *progress, message = result.stderr.strip().splitlines()
    assert message.startswith("error: "), message
    assert all(line and not line.startswith("error") and "\x1b" not in line for line in progress), result.stderr
    return message.removeprefix("error: ")


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def sequential() -> nn.Module:
    """A model of torch.nn classes only, with no architecture to name: what ``torch.save(model)`` of a quick
    experiment holds."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )
    return M.randomise_norms(model).eval()


def mobilenet_with_replaced_stem() -> nn.Module:
    """The user case of issue 26: torchvision's MobileNetV2 with a 1-channel first conv and 10 classes."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10)
    model.features[0][0] = nn.Conv2d(1, 32, 3, 2, 1, bias=False)
    return M.randomise_norms(model).eval()


def lightning_checkpoint(state: dict[str, torch.Tensor], prefix: str = "model.") -> dict:
    """What Lightning's Trainer.save_checkpoint writes for a LightningModule holding the network as ``self.model``
    (lightning itself is not needed: these are plain dicts, lists, numbers, strings and tensors)."""
    first = next(iter(state.values()))
    return {
        "epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"{prefix}{k}": v for k, v in state.items()},
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4, "completed": 3}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}": {
            "best_model_score": torch.tensor(0.25), "dirpath": "/runs/ckpts", "best_k_models": {}}},
        "optimizer_states": [{"state": {0: {"momentum_buffer": torch.zeros_like(first)}},
                              "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0]}]}],
        "lr_schedulers": [{"last_epoch": 3, "_step_count": 4}],
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 0.1, "num_classes": 10, "arch": "resnet20"},
    }


def safe_load(path: Path) -> nn.Module:
    """What a user does: ``torch.load(weights_only=True)`` with the file's classes allowed, all from torch.nn and
    torchvision."""
    names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    assert all(n.startswith(("torch.nn.", "torchvision.")) for n in names), names
    classes = [getattr(importlib.import_module(n.rpartition(".")[0]), n.rpartition(".")[2]) for n in names]
    with torch.serialization.safe_globals(classes):
        return torch.load(path, weights_only=True)


@pytest.fixture
def written(monkeypatch):
    """The in-memory models the whole-model adapter saves, in order."""
    models = []
    original = whole_model_module.save_whole_model

    def spy(model, path, document, **kwargs):
        models.append(model)
        return original(model, path, document, **kwargs)

    monkeypatch.setattr(whole_model_module, "save_whole_model", spy)
    return models


@pytest.fixture
def seq_file(tmp_path) -> Path:
    path = tmp_path / "seq.pt"
    torch.save(sequential(), path)
    return path


# ----------------------------------------------------------------------------- which adapter claims which file


def _files(folder: Path) -> dict[str, tuple[Path, str | None]]:
    """name -> (path, the adapter that must claim it; None: no adapter)."""
    r20 = resnet20().eval()
    state = r20.state_dict()
    made = {}

    def put(name, owner, write):
        path = folder / name
        write(path)
        made[name] = (path, owner)

    put("slim.safetensors", "slim",
        lambda p: save_slim(r20, p, arch="sample:resnet20", input_shape=(1, 28, 28)))
    put("slim.pt", "slim", lambda p: save_slim(r20, p, arch="sample:resnet20", input_shape=(1, 28, 28)))
    put("plain.safetensors", "state dict", lambda p: save_file({k: v.contiguous() for k, v in state.items()}, str(p)))
    put("plain.pt", "state dict", lambda p: torch.save(state, p))
    put("container.pth", "state dict", lambda p: torch.save({"state_dict": state, "epoch": 3}, p))
    put("legacy_state.pt", "state dict", lambda p: torch.save(state, p, _use_new_zipfile_serialization=False))
    put("whole_torchvision.pt", "whole model", lambda p: torch.save(torchvision.models.resnet18(), p))
    put("whole_sequential.pt", "whole model", lambda p: torch.save(sequential(), p))
    put("whole_user_class.pt", "whole model", lambda p: torch.save(r20, p))  # prunecli.samples: outside the allowlist
    put("whole_legacy.pt", "whole model", lambda p: torch.save(sequential(), p, _use_new_zipfile_serialization=False))
    put("whole_protocol4.pt", "whole model", lambda p: torch.save(sequential(), p, pickle_protocol=4))
    put("noise.safetensors", None, lambda p: p.write_bytes(b"\x01" + bytes(range(256)) * 8))
    put("lightning.ckpt", "state dict", lambda p: torch.save(lightning_checkpoint(state), p))
    put("hf_folder", "hugging face folder", lambda p: p.mkdir())
    # a whole model beside a stale slim sidecar is the whole model's
    put("whole_with_sidecar.pt", "whole model", lambda p: (torch.save(sequential(), p),
                                                          (folder / f"{p.name}.json").write_bytes(
                                                              (folder / "slim.pt.json").read_bytes())))
    return made


def test_each_adapter_claims_its_own_files_and_refuses_the_others(tmp_path):
    for name, (path, owner) in _files(tmp_path).items():
        found = probe(path)
        claimed = [adapter.name for adapter in FORMATS if adapter.claims(found)]
        assert claimed == ([owner] if owner else []), name
    assert [a.name for a in FORMATS] == ["hugging face folder", "slim", "Ultralytics checkpoint", "whole model",
                                         "state dict"]


def test_a_pickle_is_told_apart_by_its_first_opcodes_without_running_it(tmp_path):
    files = _files(tmp_path)
    assert pickled_class(files["whole_torchvision.pt"][0]) == "torchvision.models.resnet.ResNet"
    assert pickled_class(files["whole_user_class.pt"][0]) == "prunecli.samples.CifarResNet"
    for name in ("whole_sequential.pt", "whole_legacy.pt", "whole_protocol4.pt"):
        assert pickled_class(files[name][0]) == "torch.nn.modules.container.Sequential", name
    for name in ("plain.pt", "container.pth", "legacy_state.pt", "slim.pt", "noise.safetensors"):
        assert pickled_class(files[name][0]) is None, name


def test_a_reduce_payload_is_no_whole_model_and_never_runs(tmp_path):
    marker = tmp_path / "MARKER"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('pwned')",))

    path = tmp_path / "evil.pt"
    torch.save(Payload(), path)
    assert pickled_class(path) is None
    assert claiming(probe(path)) is STATE_DICT  # whose reader refuses it
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        open_checkpoint(ModelSource(path, "sample:resnet20"))
    assert not marker.exists()


def test_no_adapter_claims_noise_and_a_folder_without_config_json_is_refused(tmp_path):
    noise = tmp_path / "noise.pt"
    noise.write_bytes(b"\x01" * 64)
    with pytest.raises(CheckpointError, match=r"neither safetensors nor a torch.save file; give a \.safetensors"):
        claiming(probe(noise))
    assert claiming(probe(tmp_path)) is HF_FOLDER  # a folder is a model only as a Hugging Face folder
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(ModelSource(tmp_path))
    assert str(exc.value) == (f"{tmp_path} is a folder without config.json; give a Hugging Face save_pretrained "
                              "folder (config.json with model.safetensors) or the checkpoint file inside it")


def test_loaded_model_names_the_adapter_that_read_it(tmp_path):
    files = _files(tmp_path)
    expected = {"slim.safetensors": SLIM, "slim.pt": SLIM, "plain.pt": STATE_DICT, "plain.safetensors": STATE_DICT}
    for name, adapter in expected.items():
        loaded = load_model(files[name][0], arch=ArchSpec("sample:resnet20"))
        assert loaded.format is adapter, name
        assert loaded.arch == ArchSpec("sample:resnet20", {})
    loaded = load_model(files["whole_sequential.pt"][0], input_shape=(1, 28, 28))
    assert loaded.format == WholeModelFormat(arch_known=False) and loaded.arch is None
    assert loaded.document is None and loaded.notes == []


# ----------------------------------------------------------------------------- outputs each adapter writes


def test_default_outputs_and_refused_suffixes_name_an_output_that_works(tmp_path, seq_file):
    plain = tmp_path / "r20.v2.pt"
    torch.save(resnet20().state_dict(), plain)
    assert checkpoint_format(ModelSource(plain)).default_output(plain) == tmp_path / "r20.v2.slim.safetensors"
    assert checkpoint_format(ModelSource(seq_file)).default_output(seq_file) == tmp_path / "seq.slim.pt"
    assert checkpoint_format(ModelSource(seq_file)).default_output(seq_file, "ft") == tmp_path / "seq.ft.pt"
    with pytest.raises(OptionError) as exc:  # a usage error: exit 2
        STATE_DICT.check_output(tmp_path / "x.onnx")
    assert str(exc.value) == (f"output {tmp_path / 'x.onnx'} does not end in .safetensors or .pt or .pth as a slim "
                              "model needs; rename it (e.g. x.safetensors)")
    archless = checkpoint_format(ModelSource(seq_file))
    assert archless == WholeModelFormat(arch_known=False)
    for fine in ("x.pt", "x.pth"):
        archless.check_output(tmp_path / fine)
    with pytest.raises(ExportError) as exc:
        archless.check_output(tmp_path / "x.safetensors")
    assert str(exc.value) == (f"a whole pickled model without a named architecture is written as a whole-model .pt; "
                              f"use -o {tmp_path / 'x.pt'} (or --arch, if one builds it, for a slim x.safetensors)")
    with pytest.raises(OptionError, match=r"does not end in .pt or .pth or .safetensors as a whole pickled model"):
        archless.check_output(tmp_path / "x.onnx")
    # --arch names one, and a torchvision class may match a builder once read: .safetensors is not refused early
    checkpoint_format(ModelSource(seq_file, "mypkg:net")).check_output(tmp_path / "x.safetensors")
    torchvision_file = tmp_path / "tv.pt"
    torch.save(torchvision.models.resnet18(), torchvision_file)
    assert checkpoint_format(ModelSource(torchvision_file)) == WholeModelFormat(arch_known=None)
    WholeModelFormat(arch_known=None).check_output(tmp_path / "x.safetensors")


# ----------------------------------------------------------------------------- the whole pickled model end to end


def test_mobilenet_with_a_replaced_stem_prunes_to_half_its_macs_and_loads_as_it_came(tmp_path, written, one_thread):
    """Issue 26's case: every class is torch/torchvision but no torchvision builder makes these weights."""
    source, output = tmp_path / "m.pt", tmp_path / "slim.pt"
    original = mobilenet_with_replaced_stem()
    torch.save(original, source)

    result = invoke("prune", source, "--flops-target", "0.5", "-o", output, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    # torchvision's 300,774,272 less two of the stem's three input channels (2 * 32*9*112*112 = 7,225,344) and
    # 990 of the 1000 classes (990 * 1280 = 1,267,200)
    assert report["before"]["macs"] == 292_281_728
    assert abs(report["macs_kept"] - 0.5) < 0.005 and abs(report["deviation_pp"]) < 0.5
    assert report["after"]["macs"] == round(report["macs_kept"] * report["before"]["macs"])
    assert report["model"]["arch"] is None and report["model"]["input_shape"] == [1, 224, 224]
    assert report["notes"][1].startswith("channel counts kept at multiples of")  # --round-to auto says what it did
    assert report["notes"][:1] == ["input 1x224x224 assumed: the size MobileNetV2's torchvision family takes, with "
                                   "the channels its first conv reads; pass --input-shape to change it"]
    assert files_in(tmp_path) == ["m.pt", "slim.pt"]  # a whole-model file, no sidecar

    (pruned,) = written
    x = torch.randn(2, 1, 224, 224)
    expected = run(pruned, x)
    by_torch = safe_load(output)
    assert type(by_torch) is torchvision.models.MobileNetV2
    assert by_torch.features[0][0].in_channels == 1 and by_torch.classifier[1].out_features == 10
    assert_close(run(by_torch, x), expected, rtol=0, atol=0)
    assert_close(run(torch.load(output, weights_only=False), x), expected, rtol=0, atol=0)
    document = json.loads(getattr(by_torch, METADATA_ATTRIBUTE))
    assert document["format"] == "prunecli-whole-model" and document["input_shape"] == [1, 224, 224]
    assert document["achieved"]["macs"] == report["after"]["macs"]
    assert document["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()

    reloaded = prunecli.load(output)  # no trust_code: the allowlisted weights_only path
    assert not hasattr(reloaded, METADATA_ATTRIBUTE)  # the reader takes the provenance off the model
    assert_close(run(reloaded, x), expected, rtol=0, atol=0)
    loaded = load_model(output)  # no --input-shape: the document records it
    assert loaded.input.shape == (1, 224, 224) and loaded.notes == [] and loaded.arch is None
    assert loaded.document["method"] == "l1" and loaded.document["budget"]["value"] == 0.5


def test_a_whole_pickle_of_torch_nn_classes_prunes_by_default_to_a_slim_pt_byte_identically(tmp_path, seq_file,
                                                                                             written):
    args = ("prune", seq_file, "--input-shape", "1x28x28", "--ratio", "0.5", "--json")
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)
    output = tmp_path / "seq.slim.pt"
    assert report["output"] == str(output)
    assert (report["before"]["macs"], report["after"]["macs"]) == (SEQ_MACS, SEQ_MACS_HALF)
    assert files_in(tmp_path) == ["seq.pt", "seq.slim.pt"]
    again = invoke(*args)
    assert "already exists; pass --force to overwrite it" in one_line_error(again)
    original = output.read_bytes()
    forced = invoke(*args, "--force")
    assert forced.exit_code == 0, forced.output
    assert output.read_bytes() == original  # the same prune twice: the same bytes

    x = torch.randn(3, 1, 28, 28)
    assert_close(run(prunecli.load(output), x), run(written[0], x), rtol=0, atol=0)
    assert_close(run(safe_load(output), x), run(written[0], x), rtol=0, atol=0)
    assert sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(output))) == sorted(SEQ_CLASSES)

    analyzed = invoke("analyze", output, "--json")  # no --input-shape, no --trust-pickle
    assert analyzed.exit_code == 0, analyzed.output
    shown = json.loads(analyzed.stdout)
    assert shown["model"]["macs"] == SEQ_MACS_HALF and shown["model"]["input_shape"] == [1, 28, 28]
    assert shown["provenance"]["format"] == "prunecli-whole-model"
    assert shown["provenance"]["original"]["macs"] == SEQ_MACS
    assert shown["provenance"]["budget"]["kind"] == "ratio"

    twice = invoke("prune", output, "--ratio", "0.5", "--json")  # a whole-model file prunes again, parent recorded
    assert twice.exit_code == 0, twice.output
    document = load_model(tmp_path / "seq.slim.slim.pt").document
    assert document["parent"]["source_sha256"] == hashlib.sha256(seq_file.read_bytes()).hexdigest()
    assert document["original"]["macs"] == SEQ_MACS_HALF


def test_safetensors_output_of_an_archless_whole_pickle_is_refused_before_any_work(tmp_path, seq_file, monkeypatch):
    def no_tracing(*args, **kwargs):
        raise AssertionError("traced before the output was refused")

    monkeypatch.setattr("prunecli.api.DependencyGraph", no_tracing)
    result = invoke("prune", seq_file, "--input-shape", "1x28x28", "--ratio", "0.5", "-o", tmp_path / "x.safetensors")
    assert one_line_error(result) == (
        f"a whole pickled model without a named architecture is written as a whole-model .pt; use -o "
        f"{tmp_path / 'x.pt'} (or --arch, if one builds it, for a slim x.safetensors)"
    )
    stem = tmp_path / "m.pt"  # a torchvision class: refused once reading it shows no builder matches, still untraced
    torch.save(mobilenet_with_replaced_stem(), stem)
    result = invoke("prune", stem, "--flops-target", "0.5", "-o", tmp_path / "m.safetensors")
    assert "written as a whole-model .pt; use -o" in one_line_error(result)
    assert files_in(tmp_path) == ["m.pt", "seq.pt"]


def test_a_recognised_torchvision_pickle_may_still_be_written_as_a_slim_safetensors(tmp_path):
    source = tmp_path / "r18.pt"
    original = M.randomise_norms(torchvision.models.resnet18(num_classes=10)).eval()
    torch.save(original, source)
    output = tmp_path / "r18.safetensors"
    result = invoke("prune", source, "--input-shape", "3x32x32", "--ratio", "0.5", "-o", output, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"]["arch"] == "torchvision:resnet18"
    reloaded = prunecli.load(output)  # rebuilt from torchvision:resnet18 and the stored shapes: no pickle
    assert type(reloaded) is torchvision.models.ResNet and reloaded.fc.out_features == 10
    assert files_in(tmp_path) == ["r18.pt", "r18.safetensors"]


USER_NET = """
import torch
from torch import nn


class UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))
"""


def test_a_pickle_of_a_user_class_needs_trust_pickle_and_prunes_with_it(tmp_path, written):
    code = tmp_path / "code"
    code.mkdir()
    (code / "prunecli_formats_net.py").write_text(textwrap.dedent(USER_NET))
    sys.path.insert(0, str(code))
    try:
        net = importlib.import_module("prunecli_formats_net").UserNet().eval()
        source = tmp_path / "user.pt"
        torch.save(net, source)
    finally:
        sys.path.remove(str(code))
        del sys.modules["prunecli_formats_net"]
    output = tmp_path / "user.slim.pt"
    args = ("prune", source, "--input-shape", "3x16x16", "--ratio", "0.5")

    refused = invoke(*args)
    message = one_line_error(refused)
    assert "prunecli_formats_net.UserNet" in message and "could run code" in message and "--trust-pickle" in message
    assert files_in(tmp_path) == ["code", "user.pt"]

    trusted = invoke(*args, "--trust-pickle", "--import-path", code, "--json")
    assert trusted.exit_code == 0, trusted.output
    assert json.loads(trusted.stdout)["output"] == str(output)
    assert files_in(tmp_path) == ["code", "user.pt", "user.slim.pt"]
    sys.modules.pop("prunecli_formats_net", None)
    with pytest.raises(CheckpointError, match="--trust-pickle"):  # the output loads as the input did: trusted only
        prunecli.load(output)
    reloaded = prunecli.load(output, trust_code=True, import_paths=(code,))
    sys.modules.pop("prunecli_formats_net", None)
    assert type(reloaded).__name__ == "UserNet" and reloaded.conv.out_channels == 8
    x = torch.randn(2, 3, 16, 16)
    assert_close(run(reloaded, x), run(written[0], x), rtol=0, atol=0)


def test_export_safetensors_of_an_archless_whole_pickle_names_onnx_and_torchscript(tmp_path, seq_file):
    result = invoke("export", seq_file, "--input-shape", "1x28x28", "--format", "safetensors",
                    "-o", tmp_path / "seq.safetensors")
    assert one_line_error(result) == (
        "--format safetensors needs the base architecture, which this model does not name (a whole pickled model); "
        "export it with --format onnx or --format torchscript, or give the --arch that builds it"
    )
    assert files_in(tmp_path) == ["seq.pt"]


def test_finetune_writes_a_whole_pickle_back_as_one(tmp_path, seq_file):
    pruned = invoke("prune", seq_file, "--input-shape", "1x28x28", "--ratio", "0.5", "-q")
    assert pruned.exit_code == 0, pruned.output
    tuned = invoke("finetune", tmp_path / "seq.slim.pt", "--data", SAMPLE / "fmnist_calib.safetensors",
                   "--train-limit", "16", "--batch-size", "8", "--steps", "1", "--device", "cpu", "-q")
    assert tuned.exit_code == 0, tuned.output
    output = tmp_path / "seq.slim.ft.pt"
    assert files_in(tmp_path) == ["seq.pt", "seq.slim.ft.pt", "seq.slim.pt"]
    model = safe_load(output)
    assert [m.out_channels for m in model if isinstance(m, nn.Conv2d)] == [8, 16]
    document = json.loads(getattr(model, METADATA_ATTRIBUTE))
    assert len(document["finetune_history"]) == 1 and document["method"] == "l1"
    assert document["source_sha256"] == hashlib.sha256((tmp_path / "seq.slim.pt").read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- the writer and reader alone


def test_a_whole_model_file_is_the_same_bytes_whatever_the_hash_seed(tmp_path):
    """A module's non-persistent buffers are a set of names, which pickle writes in hash order (randomised per
    process): the whole-model writer sorts them."""
    script = textwrap.dedent("""
        import hashlib, io, sys
        from pathlib import Path
        import torch
        from prunecli.io.formats.whole_model import save_whole_model
        model = torch.nn.BatchNorm2d(4)
        for name in "abcdefgh":
            model.register_buffer(name, torch.zeros(1), persistent=False)
        out = Path(sys.argv[1])
        save_whole_model(model, out, {"k": 1})
        plain = io.BytesIO()
        torch.save(model, plain)
        print(hashlib.sha256(out.read_bytes()).hexdigest(), hashlib.sha256(plain.getvalue()).hexdigest())
    """)
    digests = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(Path(__file__).parents[1])}
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path / f"bn{seed}.pt")], env=env,
                              capture_output=True, text=True, timeout=120, check=True)
        digests.append(done.stdout.split())
    assert len({ours for ours, _ in digests}) == 1
    assert len({plain for _, plain in digests}) > 1  # control: plain torch.save follows the hash seed


def test_the_writer_leaves_the_model_as_it_was_and_refuses_to_clobber(tmp_path):
    model = sequential()
    path = save_whole_model(model, tmp_path / "m.pt", {"note": "x"})
    assert not hasattr(model, METADATA_ATTRIBUTE)
    with pytest.raises(ExportError, match="already exists; pass --force"):
        save_whole_model(model, path, {"note": "y"})
    assert json.loads(getattr(safe_load(path), METADATA_ATTRIBUTE)) == {"note": "x"}
    assert files_in(tmp_path) == ["m.pt"]


def test_a_damaged_or_newer_whole_model_document_is_refused(tmp_path):
    for text, words in (("not json", "is not a prunecli document; the file is damaged"),
                        (json.dumps({"format": "prunecli-whole-model", "format_version": 99}),
                         "whole-model format v99 is not readable by prunecli")):
        model = sequential()
        model.prunecli_metadata = text
        path = tmp_path / "m.pt"
        torch.save(model, path)
        with pytest.raises(CheckpointError, match=words):
            load_model(path, input_shape=(1, 28, 28))


def test_an_edp_block_is_allowlisted_for_the_weights_only_reader(tmp_path):
    conv = nn.Conv2d(3, 8, 3)
    model = nn.Sequential(DecomposedConv(conv, 3, 8, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    path = tmp_path / "edp.pt"
    torch.save(model, path)
    loaded = load_model(path, input_shape=(3, 12, 12))  # no trust_pickle
    x = torch.randn(2, 3, 12, 12)
    assert_close(run(loaded.model, x), run(model, x), rtol=0, atol=0)


def test_a_trusted_pickle_of_another_object_falls_back_to_the_weights_inside(tmp_path):
    state = resnet20().state_dict()
    path = tmp_path / "holder.pt"
    torch.save(StateHolder(model=state, epoch=3), path)
    assert pickled_class(path) == f"{__name__}.StateHolder"
    assert claiming(probe(path)) is WHOLE_MODEL  # an object of a class of its own: a model, most likely
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        load_model(path, arch=ArchSpec("sample:resnet20"))
    loaded = load_model(path, arch=ArchSpec("sample:resnet20"), trust_pickle=True)
    assert loaded.format is STATE_DICT  # what it held was weights, written back as a slim file
    assert_close(loaded.model.state_dict()["fc.weight"], state["fc.weight"], rtol=0, atol=0)


class StateHolder(dict):
    """A checkpoint container of a class of its own (pickled as an object, not as a dict)."""


# ----------------------------------------------------------------------------- Lightning checkpoints


def test_a_lightning_checkpoint_is_unwrapped_and_the_prefix_it_stripped_is_named(tmp_path):
    r20 = M.randomise_norms(resnet20()).eval()
    source = tmp_path / "last.ckpt"
    torch.save(lightning_checkpoint(r20.state_dict()), source)
    loaded = load_model(source, arch=ArchSpec("sample:resnet20"))  # weights_only: no lightning, no trust needed
    assert loaded.format is STATE_DICT
    assert loaded.notes == ["a Lightning checkpoint (epoch 3, step 120): stripped the prefix 'model.' (the "
                            f"LightningModule's 'model' attribute) from its {len(r20.state_dict())} weights"]
    x = torch.randn(2, 1, 28, 28)
    assert_close(run(loaded.model, x), run(r20, x), rtol=0, atol=0)

    result = invoke("prune", source, "--arch", "sample:resnet20", "--ratio", "0.5", "--json")
    assert result.exit_code == 0, result.output
    assert loaded.notes[0] in json.loads(result.stdout)["notes"]
    assert files_in(tmp_path) == ["last.ckpt", "last.slim.safetensors"]


def test_a_lightning_prefix_is_stripped_with_the_compile_prefix_under_it_and_the_network_recognised(tmp_path):
    state = torchvision.models.resnet18(num_classes=10).state_dict()
    source = tmp_path / "epoch=3-step=120.ckpt"
    torch.save(lightning_checkpoint(state, prefix="net._orig_mod."), source)
    loaded = load_model(source)  # no --arch: torchvision's resnet18, once the prefixes are off
    assert loaded.arch == ArchSpec("torchvision:resnet18", {"num_classes": 10})
    assert loaded.notes[0].startswith("a Lightning checkpoint (epoch 3, step 120): stripped the prefix 'net.' ")


def test_a_lightning_module_that_is_the_network_keeps_its_keys(tmp_path):
    """No single attribute holds the weights: the LightningModule defines the layers itself, as --arch must."""
    state = resnet20().state_dict()
    source = tmp_path / "last.ckpt"
    torch.save(lightning_checkpoint(state, prefix=""), source)
    loaded = load_model(source, arch=ArchSpec("sample:resnet20"))
    assert loaded.notes[0].startswith("a Lightning checkpoint (epoch 3, step 120): its state_dict read as the "
                                      "LightningModule holds it (attributes bn1, conv1, fc, layer1")


def test_a_lightning_checkpoint_with_a_class_of_its_own_inside_needs_trust(tmp_path):
    checkpoint = lightning_checkpoint(resnet20().state_dict())
    checkpoint["hyper_parameters"] = StateHolder(lr=0.1)  # an object outside the weights_only allowlist
    source = tmp_path / "last.ckpt"
    torch.save(checkpoint, source)
    with pytest.raises(CheckpointError, match=r"names classes outside torch.nn/torchvision \(test_formats.StateHolder\)"):
        load_model(source, arch=ArchSpec("sample:resnet20"))
    loaded = load_model(source, arch=ArchSpec("sample:resnet20"), trust_pickle=True)
    assert loaded.notes[0].startswith("a Lightning checkpoint (epoch 3, step 120): stripped the prefix 'model.'")
