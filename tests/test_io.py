"""Checkpoint loading in every accepted form, refusal of unsafe or broken files, the slim artifact round
trip, atomic and deterministic writes, and budget parsing."""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
import warnings
from pathlib import Path

import models as M
import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn
from torch.testing import assert_close

import prunecli
from prunecli.api import prune_model
from prunecli.budget import Budget, parse_budget
from prunecli.config import ModelSource, OutputOptions, PruneConfig, RunOptions, ScoringOptions
from prunecli.errors import BudgetError, CheckpointError, ExportError, OptionError
from prunecli.io.arch import ArchSpec
from prunecli.io.files import atomic_output, recording_outputs
from prunecli.io.formats import load_model
from prunecli.io.slim import read_slim_metadata, save_slim
from prunecli.measure import totals
from prunecli.pipeline.removal import ROUNDING_TOLERANCE
from prunecli.samples import resnet20

R20 = ArchSpec("sample:resnet20")
R20_KEYS = 128  # counted in test_resnet20_state_dict_has_128_entries
R20_MACS = 31_021_952  # worked out by hand in test_cli.py (conv + linear at 1x28x28)


# ----------------------------------------------------------------------------- fixtures and helpers


class TinyNet(nn.Module):
    """A user class that lives outside torch.nn/torchvision: pickles of it need --trust-pickle."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


class Payload:
    """Unpickling this runs ``exec``, which writes ``marker``: the attack a weights-only loader must stop."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.fixture
def r20():
    torch.manual_seed(0)
    return M.randomise_norms(resnet20(), seed=1).eval()


@pytest.fixture
def x28():
    return torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(3))


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    assert message.strip() == message and message
    return message


def prune_config(path, output, budget="0.5", method="l1", seed=0, force=False) -> PruneConfig:
    return PruneConfig(ModelSource(path, arch="sample:resnet20"), parse_budget("macs", budget),
                       scoring=ScoringOptions(method), output=OutputOptions(output, force), run=RunOptions(seed=seed))


# ----------------------------------------------------------------------------- state dicts


def test_resnet20_state_dict_has_128_entries(r20):
    # stem conv (1) + 21 BN x 5 (weight, bias, mean, var, count) + 18 block convs + 2 shortcut convs + fc (2)
    assert len(r20.state_dict()) == 1 + 21 * 5 + 18 + 2 + 2 == R20_KEYS


def test_plain_state_dict_pt_with_arch(tmp_path, r20, x28):
    path = tmp_path / "r20.pt"
    torch.save(r20.state_dict(), path)
    loaded = load_model(path, arch=R20)
    assert type(loaded.model).__name__ == "CifarResNet"
    assert loaded.arch == R20
    assert loaded.input.shape == (1, 28, 28)
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.document is None
    assert not loaded.model.training
    assert_close(run(loaded.model, x28), run(r20, x28), rtol=0, atol=0)


class _RandomProjection(nn.Module):
    """A layer whose non-persistent buffer comes from torch.nn.init: no checkpoint holds it."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.register_buffer("projection", nn.init.orthogonal_(torch.empty(3, 3)), persistent=False)


def test_parameters_left_to_load_skips_only_parameters_and_restores_torch_init():
    from prunecli.io.arch import parameters_left_to_load

    original = nn.init.kaiming_uniform_
    with parameters_left_to_load():
        assert nn.init.kaiming_uniform_ is not original
        weight = nn.Parameter(torch.full((3, 4), 7.0))
        assert nn.init.kaiming_uniform_(weight) is weight
        assert torch.equal(weight, torch.full((3, 4), 7.0))  # a parameter is left as it was
        layer = _RandomProjection()
    assert nn.init.kaiming_uniform_ is original
    # a buffer the checkpoint does not hold is initialised as usual: orthogonal rows
    assert_close(layer.projection @ layer.projection.T, torch.eye(3), atol=1e-5, rtol=0)


def test_state_dict_load_gives_every_parameter_the_file_value(tmp_path, r20):
    path = tmp_path / "r20.pt"
    torch.save(r20.state_dict(), path)
    loaded = load_model(path, arch=R20)
    for name, value in r20.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name


def _prefixed(state, prefix):
    return {prefix + k: v for k, v in state.items()}


WRAPPERS = {
    "state_dict": lambda s: {"state_dict": s, "epoch": 7, "optimizer": {"lr": 0.1}},
    "model": lambda s: {"model": s},
    "model_state_dict": lambda s: {"model_state_dict": s, "best_acc": 0.9},
    "ema": lambda s: {"ema": s, "epoch": 3},
    "module.": lambda s: {"state_dict": _prefixed(s, "module.")},
    "_orig_mod.": lambda s: {"model": _prefixed(s, "_orig_mod.")},
    "module._orig_mod.": lambda s: _prefixed(s, "module._orig_mod."),
    "_orig_mod.module.": lambda s: {"state_dict": _prefixed(s, "_orig_mod.module.")},
    "nested state_dict/model": lambda s: {"state_dict": {"model": _prefixed(s, "module.")}},
}


@pytest.mark.parametrize("form", list(WRAPPERS))
def test_wrapped_and_prefixed_state_dicts(tmp_path, r20, x28, form):
    path = tmp_path / "ckpt.pth"
    torch.save(WRAPPERS[form](r20.state_dict()), path)
    loaded = load_model(path, arch=R20)
    state = loaded.model.state_dict()
    assert len(state) == R20_KEYS
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state)
    assert_close(run(loaded.model, x28), run(r20, x28), rtol=0, atol=0)


def test_safetensors_state_dict(tmp_path, r20, x28):
    path = tmp_path / "r20.safetensors"
    save_file({k: v.contiguous() for k, v in r20.state_dict().items()}, str(path))
    loaded = load_model(path, arch=R20)
    assert loaded.document is None
    assert loaded.input.shape == (1, 28, 28)
    assert_close(run(loaded.model, x28), run(r20, x28), rtol=0, atol=0)


def test_wrapper_without_tensors_is_refused(tmp_path):
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(CheckpointError) as exc:
        load_model(path, arch=R20)
    assert "no tensors" in one_line(exc)


def test_strict_load_names_missing_unexpected_and_mismatched_keys(tmp_path, r20):
    state = dict(r20.state_dict())
    del state["fc.weight"]
    state["extra.weight"] = torch.zeros(3)
    state["fc.bias"] = torch.zeros(11)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as exc:
        load_model(path, arch=R20)
    message = one_line(exc)
    assert "1 missing: fc.weight" in message
    assert "1 unexpected: extra.weight" in message
    assert "1 shape mismatch: fc.bias (11,) vs (10,)" in message
    assert "--arch" in message


def test_strict_load_lists_six_keys_then_counts_the_rest(tmp_path, r20):
    path = tmp_path / "r20.pt"
    torch.save(r20.state_dict(), path)
    with pytest.raises(CheckpointError) as exc:
        load_model(path, arch=ArchSpec("torchvision:resnet18"))
    message = one_line(exc)
    # resnet18 has 122 entries, resnet20 128; 42 resnet18 keys are absent from resnet20 and 48 are extra
    assert "42 missing:" in message and "(+36 more)" in message
    assert "48 unexpected:" in message and "(+42 more)" in message
    assert "conv1.weight (16, 1, 3, 3) vs (64, 3, 7, 7)" in message


# ----------------------------------------------------------------------------- torchvision detection


def test_autodetect_resnet18_state_dict(tmp_path):
    model = torchvision.models.resnet18().eval()
    path = tmp_path / "weights.pth"
    torch.save(model.state_dict(), path)
    loaded = load_model(path)
    assert loaded.arch == ArchSpec("torchvision:resnet18", {})
    assert loaded.input.shape == (3, 224, 224)
    assert loaded.input.mean == (0.485, 0.456, 0.406)
    assert any("torchvision:resnet18" in note for note in loaded.notes)
    x = torch.randn(1, 3, 64, 64)
    assert_close(run(loaded.model, x), run(model, x), rtol=0, atol=0)


def test_autodetect_mobilenet_v2_with_ten_classes(tmp_path):
    model = M.randomise_norms(torchvision.models.mobilenet_v2(num_classes=10), seed=1).eval()
    path = tmp_path / "mbv2.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = load_model(path, input_shape=(3, 64, 64))
    assert loaded.arch == ArchSpec("torchvision:mobilenet_v2", {"num_classes": 10})
    assert loaded.input.shape == (3, 64, 64)
    x = torch.randn(2, 3, 64, 64)
    out = run(loaded.model, x)
    assert out.shape == (2, 10)
    assert_close(out, run(model, x), rtol=0, atol=0)


def test_weights_of_no_torchvision_model_need_arch(tmp_path, r20):
    path = tmp_path / "r20.pt"
    torch.save(r20.state_dict(), path)
    with pytest.raises(CheckpointError) as exc:
        load_model(path)
    assert "--arch" in one_line(exc)


# ----------------------------------------------------------------------------- pickles


def test_full_torchvision_model_loads_through_the_weights_only_allowlist(tmp_path):
    model = M.randomise_norms(torchvision.models.resnet18(), seed=1).eval()
    path = tmp_path / "full.pt"
    torch.save(model, path)
    loaded = load_model(path, arch=ArchSpec("torchvision:resnet18"), input_shape=(3, 64, 64))  # detection: above
    assert type(loaded.model) is torchvision.models.ResNet
    assert loaded.arch == ArchSpec("torchvision:resnet18", {})
    assert loaded.notes == ["full pickled model; its architecture is torchvision:resnet18"]
    x = torch.randn(1, 3, 64, 64)
    assert_close(run(loaded.model, x), run(model, x), rtol=0, atol=0)


def test_custom_class_pickle_needs_trust_pickle(tmp_path):
    model = TinyNet().eval()
    path = tmp_path / "tiny.pt"
    torch.save(model, path)
    with pytest.raises(CheckpointError) as exc:
        load_model(path, input_shape=(3, 8, 8))
    message = one_line(exc)
    assert "--trust-pickle" in message
    assert "TinyNet" in message  # names the class that is outside the allowlist

    loaded = load_model(path, input_shape=(3, 8, 8), trust_pickle=True)
    assert type(loaded.model).__name__ == "TinyNet"
    assert loaded.arch is None
    x = torch.randn(2, 3, 8, 8)
    assert_close(run(loaded.model, x), run(model, x), rtol=0, atol=0)


def _write_payload(path, marker, form):
    payload = Payload(marker)
    if form == "zip":
        torch.save(payload, path)
    elif form == "inside a state dict":
        torch.save({"state_dict": resnet20().state_dict(), "extra": payload}, path)
    elif form == "legacy torch.save":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    elif form == "plain pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))


def test_payload_is_live(tmp_path):
    """Control: the payload really writes its marker when unpickled without a safe loader."""
    marker = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("form", ["zip", "inside a state dict", "legacy torch.save", "plain pickle"])
def test_reduce_payload_is_refused_and_never_runs(tmp_path, form):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    _write_payload(path, marker, form)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError) as exc:
            load_model(path, arch=R20)
    assert "--trust-pickle" in one_line(exc)
    assert not marker.exists()


def test_torchscript_archive_is_a_clear_error(tmp_path):
    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(TinyNet().eval()).save(str(path))
    with pytest.raises(CheckpointError) as exc:
        load_model(path, arch=R20)
    message = one_line(exc)
    assert "TorchScript" in message and "--arch" in message


# ----------------------------------------------------------------------------- broken files


def _broken(tmp_path, kind, r20):
    if kind == "missing":
        return tmp_path / "nope.pt", "no such file"
    if kind == "directory":
        (tmp_path / "ckpt").mkdir()
        return tmp_path / "ckpt", "is a folder without config.json"
    if kind == "empty":
        (tmp_path / "empty.pt").write_bytes(b"")
        return tmp_path / "empty.pt", "empty (0 bytes)"
    random_bytes = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    random_bytes = bytes(random_bytes.tolist())
    if kind == "random bytes":
        (tmp_path / "rand.pt").write_bytes(b"\x13" + random_bytes)
        return tmp_path / "rand.pt", "neither safetensors nor a torch.save file"
    if kind == "random bytes after a pickle opcode":
        (tmp_path / "rand.pt").write_bytes(b"\x80" + random_bytes)
        return tmp_path / "rand.pt", "damaged"
    if kind == "random bytes after a zip signature":
        (tmp_path / "rand.pt").write_bytes(b"PK\x03\x04" + random_bytes)
        return tmp_path / "rand.pt", "truncated or damaged"
    if kind == "truncated .pt":
        torch.save(r20.state_dict(), tmp_path / "full.pt")
        data = (tmp_path / "full.pt").read_bytes()
        (tmp_path / "half.pt").write_bytes(data[: len(data) // 2])
        return tmp_path / "half.pt", "truncated or damaged"
    state = {k: v.contiguous() for k, v in r20.state_dict().items()}
    save_file(state, str(tmp_path / "full.safetensors"))
    data = (tmp_path / "full.safetensors").read_bytes()
    if kind == "truncated safetensors":
        (tmp_path / "half.safetensors").write_bytes(data[: len(data) // 2])
        return tmp_path / "half.safetensors", "truncated"
    if kind == "header longer than the file":
        (tmp_path / "long.safetensors").write_bytes(struct.pack("<Q", len(data)) + data[8:])
        return tmp_path / "long.safetensors", f"header length {len(data)} exceeds the file"
    if kind == "header of 1e9 bytes":
        (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 10**9) + b'{"a": 1}')
        return tmp_path / "huge.safetensors", "header length 1000000000 exceeds the file"
    if kind == "header not JSON":
        header = b"{not json"
        (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
        return tmp_path / "bad.safetensors", "not valid JSON"
    raise AssertionError(kind)


BROKEN = [
    "missing",
    "directory",
    "empty",
    "random bytes",
    "random bytes after a pickle opcode",
    "random bytes after a zip signature",
    "truncated .pt",
    "truncated safetensors",
    "header longer than the file",
    "header of 1e9 bytes",
    "header not JSON",
]


@pytest.mark.parametrize("kind", BROKEN)
def test_broken_files_give_one_line_checkpoint_errors(tmp_path, r20, kind):
    path, expected = _broken(tmp_path, kind, r20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError) as exc:
            load_model(path, arch=R20)
    message = one_line(exc)
    assert expected in message
    assert path.name in message
    assert len(message) < 400


# ----------------------------------------------------------------------------- slim artifact


@pytest.fixture
def r20_file(tmp_path, r20):
    path = tmp_path / "r20.pt"
    torch.save(r20.state_dict(), path)
    return path


def _width(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    return module.out_channels, module.in_channels


def test_slim_round_trip(tmp_path, r20_file, x28, saved_models):
    output = tmp_path / "r20.slim.safetensors"
    result = prune_model(prune_config(r20_file, output))
    assert result.output == str(output)
    assert abs(result.macs_kept - 0.5) <= ROUNDING_TOLERANCE * 0.5  # the runtime's grid is coarse for ResNet-20
    assert result.before.macs == R20_MACS

    (pruned,) = saved_models
    first, second = prunecli.load(output), prunecli.load(output)
    assert type(first).__name__ == "CifarResNet" and not first.training

    # the rebuilt model is the in-memory pruned model: same tensors, same outputs
    expected_state = pruned.state_dict()
    assert list(first.state_dict()) == list(expected_state)
    for key, tensor in first.state_dict().items():
        assert_close(tensor, expected_state[key], rtol=0, atol=0, msg=key)
    out = run(first, x28)
    assert out.shape == (2, 10)
    assert_close(out, run(pruned, x28), rtol=0, atol=0)
    assert_close(run(second, x28), out, rtol=0, atol=0)

    # every layer has the widths the result reports, and channels really went
    modules = dict(first.named_modules())
    assert len(result.layers) == 22  # 19 convs + 2 shortcut convs + fc
    for change in result.layers:
        assert _width(modules[change.name]) == (change.out_after, change.in_after), change.name
    assert sum(c.out_after for c in result.layers) < sum(c.out_before for c in result.layers)
    assert modules["conv1"].in_channels == 1 and modules["fc"].out_features == 10
    assert totals(first, x28[:1]) == result.after

    document = read_slim_metadata(output)
    assert document["arch"] == {"spec": "sample:resnet20", "kwargs": {}}
    assert document["input_shape"] == [1, 28, 28]
    assert document["method"] == "l1"
    assert document["achieved"] == {"macs": result.after.macs, "params": result.after.params}
    assert document["original"] == {"macs": R20_MACS, "params": 272_186}
    assert document["source_sha256"] == hashlib.sha256(r20_file.read_bytes()).hexdigest()

    # the slim file is itself an input prunecli reads
    again = load_model(output)
    assert again.arch == ArchSpec("sample:resnet20", {})
    assert again.input.shape == (1, 28, 28)
    assert_close(run(again.model, x28), out, rtol=0, atol=0)


def test_slim_of_an_unpruned_model_stores_no_module_changes(tmp_path, r20, x28):
    path = save_slim(r20, tmp_path / "same.safetensors", arch="sample:resnet20", input_shape=(1, 28, 28))
    assert read_slim_metadata(path)["modules"] == {}
    assert_close(run(prunecli.load(path), x28), run(r20, x28), rtol=0, atol=0)


def test_load_refuses_a_plain_safetensors_file(tmp_path, r20):
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in r20.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError) as exc:
        prunecli.load(path)
    assert "not a prunecli slim model" in one_line(exc)


def test_save_slim_refuses_to_clobber_without_force(tmp_path, r20, x28):
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(ExportError) as exc:
        save_slim(r20, path, arch="sample:resnet20", input_shape=(1, 28, 28))
    assert "--force" in one_line(exc)
    assert path.read_bytes() == b"precious"
    save_slim(r20, path, arch="sample:resnet20", input_shape=(1, 28, 28), force=True)
    assert_close(run(prunecli.load(path), x28), run(r20, x28), rtol=0, atol=0)


def test_save_slim_refuses_to_overwrite_its_input(tmp_path, r20):
    path = tmp_path / "in.safetensors"
    path.write_bytes(b"input")
    with pytest.raises(ExportError) as exc:
        save_slim(r20, path, arch="sample:resnet20", input_shape=(1, 28, 28), force=True, inputs=(path,))
    assert "is the input file" in one_line(exc)
    assert path.read_bytes() == b"input"


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "out.safetensors"
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_output(path, force=False) as tmp:
        assert tmp.parent == tmp_path and tmp != path
        tmp.write_bytes(b"half of a file")
        raise RuntimeError("disk on fire")
    assert sorted(os.listdir(tmp_path)) == []


def test_atomic_output_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), atomic_output(path, force=True) as tmp:
        tmp.write_bytes(b"new but incomplete")
        raise KeyboardInterrupt
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]
    assert path.read_bytes() == b"old"


def test_recording_outputs_lists_the_files_put_in_place(tmp_path):
    with recording_outputs() as written:
        with atomic_output(tmp_path / "a.json", force=False) as tmp:
            tmp.write_text("{}")
        with pytest.raises(KeyboardInterrupt), atomic_output(tmp_path / "b.json", force=False):
            raise KeyboardInterrupt
    with atomic_output(tmp_path / "c.json", force=False) as tmp:
        tmp.write_text("{}")
    assert written == [tmp_path / "a.json"]
    assert sorted(os.listdir(tmp_path)) == ["a.json", "c.json"]


def test_atomic_output_replaces_on_success(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with atomic_output(path, force=True) as tmp:
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]


def test_save_slim_failure_inside_the_writer_leaves_no_file(tmp_path, r20, monkeypatch):
    real_write_bytes = Path.write_bytes

    def failing_write(self, data):
        real_write_bytes(self, b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", failing_write)
    with pytest.raises(ExportError) as exc:
        save_slim(r20, tmp_path / "out.safetensors", arch="sample:resnet20", input_shape=(1, 28, 28))
    assert "No space left on device" in one_line(exc)
    assert sorted(os.listdir(tmp_path)) == []


def test_same_prune_twice_gives_byte_identical_files(tmp_path, r20_file):
    output = tmp_path / "r20.slim.safetensors"
    prune_model(prune_config(r20_file, output, force=True))
    first = output.read_bytes()
    prune_model(prune_config(r20_file, output, force=True))
    assert output.read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r20.pt", "r20.slim.safetensors"]


def test_random_method_is_reproducible_with_its_seed(tmp_path, r20_file):
    output = tmp_path / "rand.safetensors"
    prune_model(prune_config(r20_file, output, method="random", seed=4, force=True))
    first = output.read_bytes()
    prune_model(prune_config(r20_file, output, method="random", seed=4, force=True))
    assert output.read_bytes() == first


# ----------------------------------------------------------------------------- budgets


@pytest.mark.parametrize(
    ("kind", "text", "expected"),
    [
        ("macs", "0.5", Budget("macs", 0.5, False, "0.5")),
        ("macs", "50%", Budget("macs", 0.5, False, "50%")),
        ("macs", "12.5%", Budget("macs", 0.125, False, "12.5%")),
        ("macs", "2.1G", Budget("macs", 2.1e9, True, "2.1G")),
        ("macs", "2.1g", Budget("macs", 2.1e9, True, "2.1g")),
        ("macs", "300M", Budget("macs", 3e8, True, "300M")),
        ("macs", "1.5e9", Budget("macs", 1.5e9, True, "1.5e9")),
        ("params", "11M", Budget("params", 11e6, True, "11M")),
        ("params", "250K", Budget("params", 2.5e5, True, "250K")),
        ("params", "0.25", Budget("params", 0.25, False, "0.25")),
        ("ratio", "0.3", Budget("ratio", 0.3, False, "0.3")),
        ("ratio", "30%", Budget("ratio", 0.3, False, "30%")),
    ],
)
def test_parse_budget(kind, text, expected):
    budget = parse_budget(kind, text)
    assert budget.kind == expected.kind and budget.absolute == expected.absolute and budget.text == expected.text
    assert budget.value == pytest.approx(expected.value, rel=1e-12)


@pytest.mark.parametrize(
    ("kind", "text", "words"),
    [
        ("macs", "0", "strictly between 0 and 1"),
        ("macs", "1", "strictly between 0 and 1"),
        ("macs", "100%", "strictly between 0 and 1"),
        ("macs", "0%", "strictly between 0 and 1"),
        ("ratio", "1.5", "between 0 and 1"),
        ("ratio", "1", "strictly between 0 and 1"),
        ("ratio", "2M", "between 0 and 1"),
        ("macs", "abc", "not a number"),
        ("macs", "-0.2", "not a number"),
        ("params", "", "not a number"),
        ("macs", "1.2.3", "not a number"),
        ("macs", "5X", "not a number"),
    ],
)
def test_parse_budget_errors(kind, text, words):
    with pytest.raises(OptionError) as exc:  # a usage error: exit 2
        parse_budget(kind, text)
    message = one_line(exc)
    assert words in message
    assert {"macs": "--flops-target", "params": "--params-target", "ratio": "--ratio"}[kind] in message


def test_budget_targets():
    assert parse_budget("macs", "0.5").target(1000.0) == 500.0
    assert parse_budget("params", "25%").target(400.0) == 100.0
    assert parse_budget("ratio", "0.3").target(100.0) == pytest.approx(70.0)
    assert parse_budget("macs", "300M").target(1e9) == 3e8
    with pytest.raises(BudgetError) as exc:
        parse_budget("macs", "2.1G").target(1.8e9)
    assert "--flops-target 2.1G is not below the model's own 1.80G" in one_line(exc)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("missing", "no such file"),
        ("directory", "is a folder without config.json"),
        ("empty", "empty (0 bytes)"),
        ("truncated safetensors", "truncated"),
        ("header longer than the file", "exceeds the file"),
        ("random bytes", "not a prunecli slim model"),
    ],
)
def test_load_gives_checkpoint_errors_for_broken_files(tmp_path, r20, kind, expected):
    path, _ = _broken(tmp_path, kind, r20)
    with pytest.raises(CheckpointError) as exc:
        prunecli.load(path)
    assert expected in one_line(exc)


def test_load_refuses_a_plain_state_dict(tmp_path, r20):
    path = tmp_path / "r20.pt"
    torch.save(r20.state_dict(), path)
    with pytest.raises(CheckpointError) as exc:
        prunecli.load(path)
    assert "not a prunecli slim model" in one_line(exc)


def test_slim_pt_with_json_sidecar_round_trip(tmp_path, r20_file, x28, saved_models):
    output = tmp_path / "r20.slim.pt"
    result = prune_model(prune_config(r20_file, output))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r20.pt", "r20.slim.pt", "r20.slim.pt.json"]
    (pruned,) = saved_models
    reference = run(pruned, x28)
    assert_close(run(prunecli.load(output), x28), reference, rtol=0, atol=0)
    again = load_model(output)
    assert again.arch == R20 and again.document["achieved"]["macs"] == result.after.macs
    assert_close(run(again.model, x28), reference, rtol=0, atol=0)
    # the state dict itself is a plain weights-only file
    state = torch.load(output, weights_only=True)
    assert set(state) == set(pruned.state_dict())


def test_safetensors_whose_header_length_starts_with_0x80_is_not_taken_for_a_pickle(tmp_path, r20, x28):
    """The header length is little-endian: a 0x..80-byte header makes the file start with the pickle opcode."""
    plain = tmp_path / "plain.safetensors"
    state = {k: v.contiguous() for k, v in r20.state_dict().items()}
    for pad in range(0, 512, 8):  # safetensors pads the header to a multiple of 8
        save_file(state, str(plain), metadata={"pad": "x" * pad})
        if plain.read_bytes()[0] == 0x80:
            break
    assert plain.read_bytes()[0] == 0x80
    assert_close(run(load_model(plain, arch=R20).model, x28), run(r20, x28), rtol=0, atol=0)

    slim = tmp_path / "slim.safetensors"
    for pad in range(0, 512, 8):
        save_slim(r20, slim, arch="sample:resnet20", input_shape=(1, 28, 28), metadata={"pad": "x" * pad}, force=True)
        if slim.read_bytes()[0] == 0x80:
            break
    assert slim.read_bytes()[0] == 0x80
    assert_close(run(prunecli.load(slim), x28), run(r20, x28), rtol=0, atol=0)
    assert_close(run(load_model(slim).model, x28), run(r20, x28), rtol=0, atol=0)


@pytest.mark.parametrize("form", ["safetensors", "plain dict .pt"])
def test_state_dict_without_version_metadata_loads_into_mnasnet(tmp_path, form):
    """MNASNet reads its state-dict version from ``_metadata``, which safetensors and plain dicts do not carry."""
    model = M.randomise_norms(torchvision.models.mnasnet0_5(num_classes=10), seed=1).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / ("m.safetensors" if form == "safetensors" else "m.pt")
    if form == "safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)  # a plain dict: no _metadata attribute
    loaded = load_model(path, arch=ArchSpec("torchvision:mnasnet0_5", {"num_classes": 10}), input_shape=(3, 64, 64))
    x = torch.randn(2, 3, 64, 64)
    assert_close(run(loaded.model, x), run(model, x), rtol=0, atol=0)


def test_a_tensor_file_of_volumes_reads_as_5d_images_and_6d_is_refused(tmp_path):
    """3-D models (MONAI, torchvision's video) take [N, C, D, H, W]; their data comes as such a tensor file."""
    from prunecli.errors import DataError
    from prunecli.io.data import DataSpec, open_images

    volumes = torch.randn(6, 1, 4, 8, 8)
    save_file({"images": volumes, "labels": torch.arange(6) % 2}, str(tmp_path / "volumes.safetensors"))
    data = open_images(DataSpec(str(tmp_path / "volumes.safetensors"), input_shape=(1, 4, 8, 8)), limit=4)
    assert data.images.shape == (4, 1, 4, 8, 8) and data.labels.shape == (4,)
    assert all(any(torch.equal(image, v) for v in volumes) for image in data.images)
    save_file({"images": torch.randn(2, 1, 2, 4, 8, 8)}, str(tmp_path / "six.safetensors"))
    with pytest.raises(DataError, match=r"'images' must be a 4-D tensor \[N, C, H, W\] or a 5-D one"):
        open_images(DataSpec(str(tmp_path / "six.safetensors")))
