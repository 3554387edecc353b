"""A Hugging Face folder: what ``save_pretrained`` writes for a transformers vision model (``config.json``, the
weights in ``model.safetensors`` or ``pytorch_model.bin``, or in shards beside their index, and the image processor's
``preprocessor_config.json``).

Mine: every directory (a folder is a model only as a Hugging Face folder; one without ``config.json`` is refused,
saying what it needs). Read: the class that ``architectures`` in config.json names, from the transformers
package (an image model: its forward takes ``pixel_values``), built from the config with random weights; the
folder's weights loaded strictly (``pytorch_model.bin`` with ``weights_only=True``; every shard its index
names, refused naming the one missing). The input is the config's
``num_channels`` at the size the preprocessor crops (else resizes) to, else the config's ``image_size``; the
normalisation the preprocessor's ``image_mean``/``image_std``. A config whose ``auto_map`` has transformers import
the folder's own code is refused without ``--trust-remote-code`` (the same consent as ``--trust-pickle``).

Written back (``prune``, ``finetune``) as a folder, the default (``resnet-50`` -> ``resnet-50.slim``): config.json and
preprocessor_config.json copied as they are, and ``model.safetensors`` a prunecli slim file whose base architecture
is ``hf:<class>`` with the config as its keyword arguments; or as that slim file alone (``-o x.safetensors``).
Either rebuilds without pickle, with ``prunecli.load`` and every command: the unpruned model from the config, the
pruned widths from the stored shapes. transformers' ``from_pretrained`` cannot read a pruned folder, whose config
still describes the unpruned widths. A model of a folder's own code is written only as a folder: its code files
(``*.py``) copied beside config.json, and the slim file's base architecture ``hf-code:<class>``, which is rebuilt
through the folder's code, so only with ``--trust-remote-code`` (the config's ``auto_map`` asks it anyway).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from prunecli.config import ModelSource
from prunecli.errors import CheckpointError, ExportError
from prunecli.io import hf_arch
from prunecli.io.arch import ArchSpec, InputInfo, build_skeleton
from prunecli.io.files import atomic_folder, check_output_path, check_suffix, sha256_file
from prunecli.io.formats.base import LoadedModel, Probe, input_info, loaded_model
from prunecli.io.formats.slim import SlimOutput, consents
from prunecli.io.readers import read_safetensors, torch_load, unwrap_state_dict
from prunecli.io.slim import SUFFIXES, read_slim_metadata, rebuild

if TYPE_CHECKING:
    from collections.abc import Mapping

CONFIG = "config.json"
PREPROCESSOR = "preprocessor_config.json"
SAFETENSORS = "model.safetensors"
PICKLE = "pytorch_model.bin"
SHARDED = (f"{SAFETENSORS}.index.json", f"{PICKLE}.index.json")  # an index whose weight_map names the shards
COPIED = (CONFIG, PREPROCESSOR)  # written beside the slim model.safetensors, as they are
# suffixes of model files that an output folder's name must not end in: -o x.onnx is a mistake, not a folder
FILE_SUFFIXES = (*SUFFIXES, ".onnx", ".ts", ".ptl", ".bin", ".ckpt", ".json", ".pkl")
TRUST = "--trust-remote-code"


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not readable JSON ({type(exc).__name__}); the {what} is damaged") from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} is not a JSON object; the {what} is damaged")
    return value


def read_config(folder: Path) -> dict[str, Any]:
    """config.json, refused when missing: a folder is read only as a Hugging Face folder."""
    path = folder / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{folder} is a folder without {CONFIG}; give a Hugging Face save_pretrained folder "
                              f"({CONFIG} with {SAFETENSORS}) or the checkpoint file inside it")
    return read_json(path, "Hugging Face config")


def weight_files(folder: Path) -> list[Path]:
    """The file the weights are in, or the shards an index names (each once, by name), each one checked to be there."""
    for name in (SAFETENSORS, PICKLE):
        if (folder / name).is_file():
            return [folder / name]
    index = next((folder / name for name in SHARDED if (folder / name).is_file()), None)
    if index is None:
        raise CheckpointError(f"{folder} has {CONFIG} but no {SAFETENSORS} or {PICKLE} (nor a shard index); give the "
                              "folder save_pretrained wrote")
    weight_map = read_json(index, "shard index").get("weight_map")
    names = sorted(set(weight_map.values()), key=str) if isinstance(weight_map, dict) else []
    if not names or not all(isinstance(n, str) and n and Path(n).name == n for n in names):
        raise CheckpointError(f"{index} has no weight_map of tensor names to shard files in the folder; the index is "
                              "damaged")
    for name in names:
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder}: shard {name}, which {index.name} names, is missing; copy every file "
                                  "save_pretrained wrote")
    return [folder / name for name in names]


def code_files(folder: Path) -> list[Path]:
    """The Python files of a folder's own code (``auto_map`` imports them, and they import each other)."""
    return sorted(p for p in folder.glob("*.py") if p.is_file())


def class_name(config: Mapping[str, Any], folder: Path) -> str:
    """The model class the config names (``architectures``, one of them)."""
    names = config.get("architectures")
    if not (isinstance(names, list) and len(names) == 1 and isinstance(names[0], str)):
        raise CheckpointError(f"{folder}/{CONFIG} names no single model class in 'architectures' ({names!r}); "
                              "save the model with save_pretrained, which records it")
    return names[0]


def check_trust(config: Mapping[str, Any], folder: Path, trusted: bool) -> None:
    classes = hf_arch.remote_classes(config)
    if classes and not trusted:
        raise CheckpointError(f"{folder}/{CONFIG} asks to run the folder's own code (auto_map: {', '.join(classes)[:160]}); "
                              f"pass {TRUST} only if you trust its source")


def folder_input(folder: Path, config: Mapping[str, Any]) -> InputInfo | None:
    """The input the config and the preprocessor describe: (C, H, W) and the preprocessor's normalisation."""
    preprocessor = read_json(folder / PREPROCESSOR, "image processor config") if (folder / PREPROCESSOR).is_file() else None
    shape = hf_arch.input_shape(config, preprocessor)
    if shape is None:
        return None
    mean_std = hf_arch.normalisation(preprocessor, shape[0])
    return InputInfo(shape, *(mean_std or (None, None)))


@dataclass
class FolderModel:
    """What a folder holds, read: the transformers model, its base architecture, and the slim document of a folder
    prunecli wrote (None for one save_pretrained wrote)."""

    model: nn.Module
    arch: ArchSpec  # hf:CLASS, or hf-code:CLASS for the folder's own code
    config: dict[str, Any]
    weights: list[Path]  # one file, or the shards
    document: dict[str, Any] | None
    notes: list[str]


def read_weights(files: list[Path], source: ModelSource, notes: list[str]) -> dict[str, Any]:
    """The tensors of every file, merged; safetensors with their header checked first, .bin with weights_only."""
    state: dict[str, Any] = {}
    for path in files:
        if path.suffix == ".safetensors":
            state.update(read_safetensors(path))
        else:
            state.update(unwrap_state_dict(torch_load(path, source.trust_pickle, source.import_paths), notes))
    return state


def read_folder(folder: Path, source: ModelSource) -> FolderModel:
    config = read_config(folder)
    check_trust(config, folder, source.trust_pickle)
    name = class_name(config, folder)
    weights = weight_files(folder)
    notes: list[str] = []
    state = read_weights(weights, source, notes)
    document = read_slim_metadata(weights[0]) if weights[0].name == SAFETENSORS else None
    if document is not None:  # a folder prunecli wrote: the pruned widths rebuilt from the stored shapes
        arch = ArchSpec.from_dict(document["arch"])
        model = rebuild(document, state, consents(document, None, source.trust_pickle), str(weights[0]),
                        (folder, *source.import_paths))  # the folder: where hf-code finds its class
        return FolderModel(model, arch, config, weights, document, notes)
    if hf_arch.remote_classes(config):
        cls, hf_config = hf_arch.remote_class(folder, config, name)
        notes.append(f"ran the folder's own code for {name} ({TRUST})")
        arch = ArchSpec(f"{hf_arch.CODE_KIND}:{name}", config)
    else:
        cls = hf_arch.model_class(name)
        hf_config, arch = hf_arch.config_of(cls, config), ArchSpec(f"{hf_arch.KIND}:{name}", config)
    model = hf_arch.pretrained(cls, hf_config, state, str(weights[0] if len(weights) == 1 else folder))
    return FolderModel(model, arch, config, weights, None, notes)


def made_by_prunecli(folder: Path) -> bool:
    """A folder this adapter wrote (which ``--force`` may replace): only the files it writes (a folder's code among
    them), a slim model inside."""
    try:
        names = {p.name for p in folder.iterdir()}
        return SAFETENSORS in names and all(n in {SAFETENSORS, *COPIED} or n.endswith(".py") for n in names) and \
            read_slim_metadata(folder / SAFETENSORS) is not None
    except (OSError, CheckpointError):
        return False


def is_folder_output(output: Path) -> bool:
    return output.suffix.lower() not in FILE_SUFFIXES


@dataclass(frozen=True)
class HuggingFaceFolder(SlimOutput):
    """``own_code``: the folder's model is of its own code (``auto_map``): written only as a folder, the code beside."""

    own_code: bool = False
    name = "hugging face folder"

    def claims(self, probe: Probe) -> bool:
        return probe.kind == "directory"

    def bind(self, probe: Probe, source: ModelSource) -> HuggingFaceFolder:
        try:
            config = read_config(probe.path)
        except CheckpointError:
            return self  # reading it says why
        check_trust(config, probe.path, source.trust_pickle)  # before any work, as reading would
        return HuggingFaceFolder(bool(hf_arch.remote_classes(config)))

    def read(self, probe: Probe, source: ModelSource) -> LoadedModel:
        found = read_folder(probe.path, source)
        fallback = None if found.document else folder_input(probe.path, found.config)
        info = input_info(found.document, None, source.input_shape, fallback)
        kind = "safetensors" if found.weights[0].suffix == ".safetensors" else "zip"
        adapter = HuggingFaceFolder(found.arch.spec.startswith(f"{hf_arch.CODE_KIND}:"))
        loaded = loaded_model(found.model, found.arch, info, Probe(found.weights[0], kind), adapter, found.document,
                              found.notes)
        digest = sha256_file(*found.weights) if len(found.weights) > 1 else loaded.sha256
        return dataclasses.replace(loaded, source=probe.path, sha256=digest)

    def module(self, probe: Probe, trust_code: bool, import_paths: tuple[Path, ...]) -> nn.Module:
        return read_folder(probe.path, ModelSource(probe.path, trust_pickle=trust_code,
                                                   import_paths=import_paths)).model.eval()

    def default_output(self, source_path: Path, tag: str = "slim") -> Path:
        """``resnet-50`` -> ``resnet-50.slim``: a folder beside the source folder."""
        return source_path.with_name(f"{source_path.name}.{tag}")

    def check_output(self, output: Path) -> None:
        if self.own_code and not is_folder_output(output):
            raise ExportError(f"output {output} is a file, and a model of the folder's own code (auto_map) is rebuilt "
                              "only through that code: give -o a folder name, which gets the code beside the model")
        if not is_folder_output(output):
            check_suffix(output, SUFFIXES, "a slim model", " or give a folder name, for a Hugging Face folder")

    def skeleton(self, loaded: LoadedModel) -> nn.Module | None:
        """The folder's own class is found through the folder (``hf-code``), which the spec alone does not name."""
        return build_skeleton(loaded.arch, (loaded.source,)) if self.own_code else None

    def check_path(self, output: Path, *, force: bool, inputs: tuple[Path, ...]) -> None:
        if is_folder_output(output):
            check_output_path(output, force=force, inputs=inputs, folder_made_by=made_by_prunecli)
        else:
            super().check_path(output, force=force, inputs=inputs)

    def write(
        self, loaded: LoadedModel, model: nn.Module, output: Path, metadata: dict[str, Any], *, force: bool,
        inputs: tuple[Path, ...],
    ) -> Path:
        self.check_output(output)
        if not is_folder_output(output):
            return super().write(loaded, model, output, metadata, force=force, inputs=inputs)
        with atomic_folder(output, force=force, made_by=made_by_prunecli, inputs=inputs) as tmp:
            super().write(loaded, model, tmp / SAFETENSORS, metadata, force=True, inputs=())
            for name in COPIED:
                if (loaded.source / name).is_file():
                    shutil.copyfile(loaded.source / name, tmp / name)
            for path in code_files(loaded.source) if self.own_code else ():
                shutil.copyfile(path, tmp / path.name)
        return output


HF_FOLDER = HuggingFaceFolder()

