"""Hugging Face folders (prunecli/io/formats/hf.py, prunecli/io/hf_arch.py): tiny transformers ResNet and ConvNeXt
image classifiers built from their configs (random weights, nothing downloaded) and saved with save_pretrained, as
users save them; pruned through the CLI to half their MACs, reloaded by prunecli.load equal to the model pruned in
memory, exported to ONNX; and every bad folder refused in one line with nothing written."""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import models as M
import pytest
import torch
from safetensors.torch import save_file
from torch.testing import assert_close
from typer.testing import CliRunner

import prunecli
from prunecli.cli import app
from prunecli.errors import CheckpointError
from prunecli.io import hf_arch
from prunecli.io.formats import load_model
from prunecli.io.formats.hf import HF_FOLDER, HuggingFaceFolder

transformers = pytest.importorskip("transformers")

runner = CliRunner()
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def one_line_error(result, code: int = 1) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    *_, message = result.stderr.strip().splitlines()
    assert message.startswith("error: "), message
    return message.removeprefix("error: ")


def save_folder(model, folder: Path, processor: bool = True) -> Path:
    """``save_pretrained`` of ``model`` and of the image processor a user would ship beside it."""
    model.save_pretrained(folder)
    if processor:
        transformers.ConvNextImageProcessor(size={"shortest_edge": 64}, image_mean=MEAN,
                                            image_std=STD).save_pretrained(folder)
    return folder


def resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1],
                                       layer_type="bottleneck", num_labels=10)
    return M.randomise_norms(transformers.AutoModelForImageClassification.from_config(config)).eval()


def convnext() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.ConvNextConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 2, 1], num_labels=10,
                                         image_size=64)
    return transformers.AutoModelForImageClassification.from_config(config).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {"resnet": save_folder(resnet(), root / "resnet"),
            "convnext": save_folder(convnext(), root / "convnext", processor=False)}


def logits(model, x):
    with torch.no_grad():
        return model.eval()(x).logits


# ----------------------------------------------------------------------------- reading a folder


def test_a_folder_is_read_with_the_input_its_preprocessor_and_config_describe(folders):
    loaded = load_model(folders["resnet"])
    assert loaded.format == HuggingFaceFolder(own_code=False) and loaded.source == folders["resnet"]
    assert loaded.arch.spec == "hf:ResNetForImageClassification"
    assert loaded.arch.kwargs == json.loads((folders["resnet"] / "config.json").read_text())
    assert (loaded.input.shape, loaded.input.mean, loaded.input.std) == ((3, 64, 64), tuple(MEAN), tuple(STD))
    assert loaded.sha256 == hashlib.sha256((folders["resnet"] / "model.safetensors").read_bytes()).hexdigest()
    x = torch.randn(2, 3, 64, 64)
    assert_close(loaded.model(x), logits(resnet(), x), rtol=0, atol=0)  # prunecli works on the logits
    assert type(loaded.deployed).__name__ == "ResNetForImageClassification"  # and writes the model itself
    convnext_input = load_model(folders["convnext"]).input  # no preprocessor: the config's image_size
    assert (convnext_input.shape, convnext_input.mean) == ((3, 64, 64), None)


def test_a_folder_reads_as_from_pretrained_reads_it_with_its_renamed_keys(tmp_path):
    """transformers 5 saves a ViT's attention under its older checkpoint names (attention.attention.query) and
    renames them on loading (attention.q_proj): prunecli loads the weights as from_pretrained does."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=64, num_labels=3)
    folder = tmp_path / "vit"
    transformers.AutoModelForImageClassification.from_config(config).save_pretrained(folder)
    loaded = load_model(folder)
    assert loaded.input.shape == (3, 32, 32)
    x = torch.randn(2, 3, 32, 32)
    expected = logits(transformers.AutoModelForImageClassification.from_pretrained(folder), x)
    assert_close(loaded.model(x), expected, rtol=0, atol=0)


def test_the_input_size_is_the_preprocessors_crop_then_its_resize_then_the_configs_image_size():
    config = {"num_channels": 1, "image_size": 32}
    assert hf_arch.input_shape(config) == (1, 32, 32)
    assert hf_arch.input_shape(config, {"size": {"height": 40, "width": 48}}) == (1, 40, 48)
    assert hf_arch.input_shape(config, {"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224},
                                        "do_center_crop": True}) == (1, 224, 224)
    assert hf_arch.input_shape({}, {"size": 96}) == (3, 96, 96)
    assert hf_arch.input_shape({}) is None
    assert hf_arch.normalisation({"image_mean": 0.5, "image_std": 0.5}, 3) == ((0.5,) * 3, (0.5,) * 3)
    assert hf_arch.normalisation({"image_mean": MEAN, "image_std": STD, "do_normalize": False}, 3) is None


def test_pytorch_model_bin_is_read_with_weights_only(tmp_path, folders):
    folder = tmp_path / "bin"
    resnet().save_pretrained(folder, safe_serialization=False) if _saves_bin() else _as_bin(folders["resnet"], folder)
    assert files_in(folder) == ["config.json", "pytorch_model.bin"]
    x = torch.randn(1, 3, 64, 64)
    assert_close(load_model(folder, input_shape=(3, 64, 64)).model(x), logits(resnet(), x), rtol=0, atol=0)


def _saves_bin() -> bool:
    return int(transformers.__version__.split(".")[0]) < 5  # transformers 5 writes safetensors only


def _as_bin(source: Path, folder: Path) -> None:
    from safetensors.torch import load_file

    folder.mkdir()
    (folder / "config.json").write_bytes((source / "config.json").read_bytes())
    torch.save(load_file(str(source / "model.safetensors")), folder / "pytorch_model.bin")


# ----------------------------------------------------------------------------- pruning, reloading, exporting


def test_a_resnet_folder_prunes_to_half_its_macs_into_a_folder_that_reloads_exactly(tmp_path, folders, saved_models):
    output = tmp_path / "resnet-pruned"
    args = ("prune", folders["resnet"], "--flops-target", "0.5", "-o", output, "--json")
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert abs(report["deviation_pp"]) < 0.5 and abs(report["macs_kept"] - 0.5) < 0.005
    assert report["model"]["arch"] == "hf:ResNetForImageClassification"
    assert report["model"]["input_shape"] == [3, 64, 64]
    assert files_in(output) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    for name in ("config.json", "preprocessor_config.json"):  # the folder's own files, as they were
        assert (output / name).read_bytes() == (folders["resnet"] / name).read_bytes()

    (pruned,) = saved_models
    assert type(pruned).__name__ == "ResNetForImageClassification"
    reloaded = prunecli.load(output)  # no trust: hf: names a transformers class, built from the recorded config
    assert type(reloaded) is type(pruned)
    x = torch.randn(3, 3, 64, 64)
    assert logits(reloaded, x).shape == (3, 10)
    assert_close(logits(reloaded, x), logits(pruned, x), rtol=0, atol=0)
    loaded = load_model(output)  # the pruned folder as every command reads it
    assert (loaded.input.shape, loaded.input.mean) == ((3, 64, 64), tuple(MEAN))
    assert loaded.document["achieved"]["macs"] == report["after"]["macs"]

    first = (output / "model.safetensors").read_bytes()
    assert "already exists; pass --force" in one_line_error(invoke(*args))
    again = invoke(*args, "--force")  # replaces the folder it wrote, with the same bytes
    assert again.exit_code == 0, again.output
    assert (output / "model.safetensors").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resnet-pruned"]  # no temporary folder left

    onnx = tmp_path / "resnet.onnx"
    exported = invoke("export", output, "-o", onnx, "--json")
    assert exported.exit_code == 0, exported.output
    verification = json.loads(exported.stdout)["verification"]
    assert verification["passed"] and verification["random"]["max_abs"] < 1e-4


def test_a_convnext_folder_prunes_to_half_its_macs_into_a_slim_file(tmp_path, folders, saved_models):
    output = tmp_path / "convnext.safetensors"
    result = invoke("prune", folders["convnext"], "--flops-target", "0.5", "-o", output, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert abs(report["deviation_pp"]) < 0.5 and abs(report["macs_kept"] - 0.5) < 0.005
    assert files_in(tmp_path) == ["convnext.safetensors"]
    reloaded = prunecli.load(output)
    assert type(reloaded).__name__ == "ConvNextForImageClassification"
    x = torch.randn(2, 3, 64, 64)
    assert_close(logits(reloaded, x), logits(saved_models[0], x), rtol=0, atol=0)
    exported = invoke("export", output, "-o", tmp_path / "convnext.onnx", "--json")
    assert exported.exit_code == 0, exported.output
    assert json.loads(exported.stdout)["verification"]["passed"]


def test_every_command_reads_a_folder(tmp_path, folders):
    generator = torch.Generator().manual_seed(0)
    data = tmp_path / "images.safetensors"
    save_file({"images": torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8, generator=generator),
               "labels": torch.randint(0, 10, (16,), generator=generator)}, str(data))
    source = folders["resnet"]
    analyzed = invoke("analyze", source, "--json")
    assert analyzed.exit_code == 0, analyzed.output
    assert json.loads(analyzed.stdout)["model"]["input_shape"] == [3, 64, 64]
    scored = invoke("score", source, "-o", tmp_path / "scores.json", "-q")
    assert scored.exit_code == 0, scored.output
    evaluated = invoke("evaluate", source, "--data", data, "--device", "cpu", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["metrics"]["images"] == 16
    output = tmp_path / "tuned"
    tuned = invoke("finetune", source, "--data", data, "--steps", "1", "--batch-size", "8", "--device", "cpu",
                   "-o", output, "-q")
    assert tuned.exit_code == 0, tuned.output
    assert files_in(output) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert type(prunecli.load(output)).__name__ == "ResNetForImageClassification"
    exported = invoke("export", source, "--format", "torchscript", "-o", tmp_path / "resnet.pt", "-q")
    assert exported.exit_code == 0, exported.output


# ----------------------------------------------------------------------------- bad folders


CUSTOM_CONFIG = '''
from transformers import PretrainedConfig


class TinyConfig(PretrainedConfig):
    model_type = "tiny-prunecli"

    def __init__(self, width=8, num_labels=4, **kwargs):
        super().__init__(num_labels=num_labels, **kwargs)
        self.width = width
'''

CUSTOM_MODEL = '''
import pathlib

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutputWithNoAttention

from .configuration_tiny import TinyConfig

pathlib.Path({marker!r}).write_text("ran")  # importing this module runs the folder's code


class TinyForImageClassification(PreTrainedModel):
    config_class = TinyConfig

    def __init__(self, config):
        super().__init__(config)
        self.conv = nn.Conv2d(3, config.width, 3, padding=1)
        self.bn = nn.BatchNorm2d(config.width)
        self.fc = nn.Linear(config.width, config.num_labels)
        self.post_init()

    def forward(self, pixel_values, labels=None):
        x = torch.relu(self.bn(self.conv(pixel_values))).mean((2, 3))
        return ImageClassifierOutputWithNoAttention(logits=self.fc(x))
'''


def custom_code_folder(folder: Path, marker: Path) -> Path:
    """A folder whose config asks transformers to import its own code (auto_map): the model and its config."""
    folder.mkdir()
    (folder / "configuration_tiny.py").write_text(textwrap.dedent(CUSTOM_CONFIG))
    (folder / "modeling_tiny.py").write_text(textwrap.dedent(CUSTOM_MODEL.format(marker=str(marker))))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["TinyForImageClassification"], "model_type": "tiny-prunecli", "width": 8, "num_labels": 4,
        "image_size": 16, "auto_map": {"AutoConfig": "configuration_tiny.TinyConfig",
                                       "AutoModelForImageClassification": "modeling_tiny.TinyForImageClassification"}}))
    torch.manual_seed(0)
    state = {"conv.weight": torch.randn(8, 3, 3, 3), "conv.bias": torch.randn(8), "bn.weight": torch.rand(8) + 0.5,
             "bn.bias": torch.randn(8), "bn.running_mean": torch.randn(8), "bn.running_var": torch.rand(8) + 0.5,
             "bn.num_batches_tracked": torch.tensor(0), "fc.weight": torch.randn(4, 8), "fc.bias": torch.randn(4)}
    save_file(state, str(folder / "model.safetensors"))
    return folder


def _without_config(root: Path, folders) -> Path:
    folder = root / "weights-only"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((folders["resnet"] / "model.safetensors").read_bytes())
    return folder


def _truncated(root: Path, folders) -> Path:
    folder = root / "truncated"
    folder.mkdir()
    (folder / "config.json").write_bytes((folders["resnet"] / "config.json").read_bytes())
    data = (folders["resnet"] / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    return folder


def _missing_weight(root: Path, folders) -> Path:
    from safetensors.torch import load_file

    folder = root / "missing-weight"
    folder.mkdir()
    (folder / "config.json").write_bytes((folders["resnet"] / "config.json").read_bytes())
    state = load_file(str(folders["resnet"] / "model.safetensors"))
    del state["classifier.1.bias"]
    save_file(state, str(folder / "model.safetensors"))
    return folder


def _text_model(root: Path, folders) -> Path:
    folder = root / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    save_file({"x": torch.zeros(1)}, str(folder / "model.safetensors"))
    return folder


def _unknown_class(root: Path, folders) -> Path:
    folder = root / "unknown"
    folder.mkdir()
    config = json.loads((folders["resnet"] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["ResNetForTeaMaking"]}))
    (folder / "model.safetensors").write_bytes((folders["resnet"] / "model.safetensors").read_bytes())
    return folder


BAD_FOLDERS = {
    "custom code without the trust flag": (
        lambda root, folders: custom_code_folder(root / "custom", root / "MARKER"),
        "custom/config.json asks to run the folder's own code (auto_map: configuration_tiny.TinyConfig, "
        "modeling_tiny.TinyForImageClassification); pass --trust-remote-code only if you trust its source"),
    "no config.json": (_without_config, "weights-only is a folder without config.json; give a Hugging Face "
                                        "save_pretrained folder (config.json with model.safetensors) or the checkpoint "
                                        "file inside it"),
    "truncated model.safetensors": (_truncated, "truncated/model.safetensors: tensor"),
    "a weight missing": (_missing_weight, "missing-weight/model.safetensors: the weights do not match "
                                          "ResNetForImageClassification as config.json describes it: 1 missing: "
                                          "classifier.1.bias"),
    "a text model": (_text_model, "BertForMaskedLM is not an image model (its forward takes input_ids, not "
                                  "pixel_values); prunecli prunes vision models such as ResNetForImageClassification"),
    "an unknown class": (_unknown_class, f"transformers {transformers.__version__} has no model class "
                                         "'ResNetForTeaMaking'; check the architectures in config.json, or upgrade "
                                         "transformers"),
}


@pytest.mark.parametrize("bad", sorted(BAD_FOLDERS))
@pytest.mark.parametrize("command", ["prune", "analyze"])
def test_a_bad_folder_is_refused_in_one_line_and_nothing_is_written(tmp_path, folders, bad, command):
    make, expected = BAD_FOLDERS[bad]
    folder = make(tmp_path, folders)
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    args = ("prune", folder, "--flops-target", "0.5") if command == "prune" else ("analyze", folder)
    message = one_line_error(invoke(*args))
    assert expected in message, message
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before
    assert not (tmp_path / "MARKER").exists()  # the folder's code never ran


def test_a_folders_own_code_is_pruned_only_with_the_trust_flag_into_a_folder_that_keeps_its_code(tmp_path,
                                                                                                  saved_models):
    folder = custom_code_folder(tmp_path / "custom", tmp_path / "MARKER")
    analyzed = invoke("analyze", folder, "--trust-remote-code", "--json")
    assert analyzed.exit_code == 0, analyzed.output
    report = json.loads(analyzed.stdout)
    assert report["model"]["input_shape"] == [3, 16, 16]
    assert report["model"]["arch"] == "hf-code:TinyForImageClassification"
    assert report["notes"] == ["ran the folder's own code for TinyForImageClassification (--trust-remote-code)"]
    assert (tmp_path / "MARKER").exists()
    (tmp_path / "MARKER").unlink()

    refused = invoke("prune", folder, "--trust-remote-code", "--ratio", "0.5", "-o", tmp_path / "tiny.safetensors")
    assert one_line_error(refused).startswith(f"output {tmp_path / 'tiny.safetensors'} is a file, and a model of the "
                                              "folder's own code (auto_map) is rebuilt only through that code")
    assert not (tmp_path / "MARKER").exists()  # refused before reading
    output = tmp_path / "tiny-pruned"
    pruned = invoke("prune", folder, "--trust-remote-code", "--ratio", "0.5", "-o", output, "-q")
    assert pruned.exit_code == 0, pruned.output
    assert files_in(output) == ["config.json", "configuration_tiny.py", "model.safetensors", "modeling_tiny.py"]
    for name in ("config.json", "configuration_tiny.py", "modeling_tiny.py"):
        assert (output / name).read_bytes() == (folder / name).read_bytes()
    (tmp_path / "MARKER").unlink(missing_ok=True)  # this process imported the folder's code: prune may not again

    with pytest.raises(CheckpointError, match="asks to run the folder's own code"):
        prunecli.load(output)
    assert "pass --trust-remote-code" in one_line_error(invoke("analyze", output))
    assert not (tmp_path / "MARKER").exists()  # neither ran the copied code
    reloaded = prunecli.load(output, trust_code=True)
    assert (tmp_path / "MARKER").exists()  # the code copied beside the pruned model built it
    assert (reloaded.conv.out_channels, reloaded.bn.num_features, reloaded.fc.in_features) == (4, 4, 4)
    x = torch.randn(2, 3, 16, 16)
    assert_close(logits(reloaded, x), logits(saved_models[0], x), rtol=0, atol=0)
    exported = invoke("export", output, "--trust-remote-code", "-o", tmp_path / "tiny.onnx", "--json")
    assert exported.exit_code == 0, exported.output
    assert json.loads(exported.stdout)["verification"]["passed"]


# ----------------------------------------------------------------------------- sharded weights


def sharded_folder(folder: Path, pickled: bool = False) -> Path:
    """The ResNet saved in shards of at most 20KB, as save_pretrained(max_shard_size=...) writes them; ``pickled``:
    as pytorch_model-0000N-of-0000M.bin beside pytorch_model.bin.index.json, as older transformers wrote them."""
    from safetensors.torch import load_file

    resnet().save_pretrained(folder, max_shard_size="20KB")
    if pickled:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        for name in set(index["weight_map"].values()):
            torch.save(load_file(str(folder / name)), folder / name.replace("model", "pytorch_model").replace(
                ".safetensors", ".bin"))
            (folder / name).unlink()
        index["weight_map"] = {k: v.replace("model", "pytorch_model").replace(".safetensors", ".bin")
                               for k, v in index["weight_map"].items()}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
        (folder / "model.safetensors.index.json").unlink()
    return folder


@pytest.mark.parametrize("pickled", [False, True], ids=["safetensors", "bin"])
def test_sharded_weights_are_read_from_every_shard_the_index_names(tmp_path, pickled):
    folder = sharded_folder(tmp_path / "resnet", pickled)
    suffix = ".bin" if pickled else ".safetensors"
    shards = sorted(p for p in folder.iterdir() if p.suffix == suffix)
    assert len(shards) == 4 and shards[0].name == f"{'pytorch_model' if pickled else 'model'}-00001-of-00004{suffix}"
    loaded = load_model(folder, input_shape=(3, 64, 64))
    x = torch.randn(2, 3, 64, 64)
    assert_close(loaded.model(x), logits(resnet(), x), rtol=0, atol=0)
    assert loaded.sha256 == hashlib.sha256(b"".join(p.read_bytes() for p in shards)).hexdigest()


def test_a_missing_shard_is_named_in_one_line_and_nothing_is_written(tmp_path):
    folder = sharded_folder(tmp_path / "resnet")
    (folder / "model-00003-of-00004.safetensors").unlink()
    before = files_in(folder)
    message = one_line_error(invoke("prune", folder, "--flops-target", "0.5", "--input-shape", "3x64x64"))
    assert message == (f"{folder}: shard model-00003-of-00004.safetensors, which model.safetensors.index.json names, "
                       "is missing; copy every file save_pretrained wrote")
    assert files_in(tmp_path) == ["resnet"] and files_in(folder) == before


def test_an_output_folder_is_replaced_only_when_prunecli_wrote_it(tmp_path, folders):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    result = invoke("prune", folders["resnet"], "--ratio", "0.5", "-o", mine, "--force")
    assert one_line_error(result) == (f"output {mine} is a folder prunecli did not write; --force replaces only "
                                      "those, choose another -o path")
    assert files_in(mine) == ["notes.txt"]
    result = invoke("prune", folders["resnet"], "--ratio", "0.5", "-o", tmp_path / "x.onnx")
    assert "does not end in .safetensors or .pt or .pth as a slim model needs" in one_line_error(result, 2)
    assert files_in(tmp_path) == ["mine"]
    assert HF_FOLDER.default_output(folders["resnet"]) == folders["resnet"].with_name("resnet.slim")
