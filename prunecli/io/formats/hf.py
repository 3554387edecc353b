"""A Hugging Face folder: what ``save_pretrained`` writes for a transformers vision model (``config.json``, the
weights in ``model.safetensors`` or ``pytorch_model.bin``, and the image processor's ``preprocessor_config.json``).

Mine: every directory (a folder is a model only as a Hugging Face folder; one without ``config.json`` is refused,
saying what it needs). Read: the class that ``architectures`` in config.json names, from the transformers
package (an image model: its forward takes ``pixel_values``), built from the config with random weights; the
folder's weights loaded strictly (``pytorch_model.bin`` with ``weights_only=True``). The input is the config's
``num_channels`` at the size the preprocessor crops (else resizes) to, else the config's ``image_size``; the
normalisation the preprocessor's ``image_mean``/``image_std``. A config whose ``auto_map`` has transformers import
the folder's own code is refused without ``--trust-remote-code`` (the same consent as ``--trust-pickle``).

Written back (``prune``, ``finetune``) as a folder, the default (``resnet-50`` -> ``resnet-50.slim``): config.json and
preprocessor_config.json copied as they are, and ``model.safetensors`` a prunecli slim file whose base architecture
is ``hf:<class>`` with the config as its keyword arguments; or as that slim file alone (``-o x.safetensors``).
Either rebuilds without pickle, with ``prunecli.load`` and every command: the unpruned model from the config, the
pruned widths from the stored shapes. transformers' ``from_pretrained`` cannot read a pruned folder, whose config
still describes the unpruned widths. A model of a folder's own code is not written (it has no ``hf:`` class).
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
from prunecli.io.arch import ArchSpec, InputInfo
from prunecli.io.files import atomic_folder, check_output_path, check_suffix
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
SHARDED = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
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


def weights_file(folder: Path) -> Path:
    for name in (SAFETENSORS, PICKLE):
        if (folder / name).is_file():
            return folder / name
    if any((folder / name).is_file() for name in SHARDED):
        raise CheckpointError(f"{folder} holds its weights in shards, which prunecli does not read yet; save it again "
                              "as one file (save_pretrained(..., max_shard_size='100GB'))")
    raise CheckpointError(f"{folder} has {CONFIG} but no {SAFETENSORS} or {PICKLE}; give the folder "
                          "save_pretrained wrote")


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
    arch: ArchSpec | None  # None: the folder's own code, which no hf: spec builds
    config: dict[str, Any]
    weights: Path
    document: dict[str, Any] | None
    notes: list[str]


def read_folder(folder: Path, source: ModelSource) -> FolderModel:
    config = read_config(folder)
    check_trust(config, folder, source.trust_pickle)
    name = class_name(config, folder)
    weights = weights_file(folder)
    notes: list[str] = []
    if weights.name == SAFETENSORS:
        state = read_safetensors(weights)  # its header, size and offsets checked first
        document = read_slim_metadata(weights)
    else:
        state, document = unwrap_state_dict(torch_load(weights, source.trust_pickle, source.import_paths), notes), None
    if document is not None:  # a folder prunecli wrote: the pruned widths rebuilt from the stored shapes
        arch = ArchSpec.from_dict(document["arch"])
        model = rebuild(document, state, consents(document, None, source.trust_pickle), str(weights),
                        source.import_paths)
        return FolderModel(model, arch, config, weights, document, notes)
    if hf_arch.remote_classes(config):
        cls, hf_config = hf_arch.remote_class(folder, config, name)
        notes.append(f"ran the folder's own code for {name} ({TRUST})")
        arch = None
    else:
        cls = hf_arch.model_class(name)
        hf_config, arch = hf_arch.config_of(cls, config), ArchSpec(f"{hf_arch.KIND}:{name}", config)
    model = hf_arch.pretrained(cls, hf_config, state, str(weights))
    return FolderModel(model, arch, config, weights, None, notes)


def made_by_prunecli(folder: Path) -> bool:
    """A folder this adapter wrote (which ``--force`` may replace): only the files it writes, a slim model inside."""
    try:
        names = {p.name for p in folder.iterdir()}
        return SAFETENSORS in names and names <= {SAFETENSORS, *COPIED} and \
            read_slim_metadata(folder / SAFETENSORS) is not None
    except (OSError, CheckpointError):
        return False


def is_folder_output(output: Path) -> bool:
    return output.suffix.lower() not in FILE_SUFFIXES


@dataclass(frozen=True)
class HuggingFaceFolder(SlimOutput):
    """``own_code``: the folder's model is of its own code (``auto_map``), which no slim file can name."""

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
        kind = "safetensors" if found.weights.name == SAFETENSORS else "zip"
        adapter = HuggingFaceFolder(found.arch is None)
        loaded = loaded_model(found.model, found.arch, info, Probe(found.weights, kind), adapter, found.document,
                              found.notes)
        return dataclasses.replace(loaded, source=probe.path)

    def module(self, probe: Probe, trust_code: bool, import_paths: tuple[Path, ...]) -> nn.Module:
        return read_folder(probe.path, ModelSource(probe.path, trust_pickle=trust_code,
                                                   import_paths=import_paths)).model.eval()

    def default_output(self, source_path: Path, tag: str = "slim") -> Path:
        """``resnet-50`` -> ``resnet-50.slim``: a folder beside the source folder."""
        return source_path.with_name(f"{source_path.name}.{tag}")

    def check_output(self, output: Path) -> None:
        if self.own_code:
            raise ExportError("a model of the folder's own code (auto_map) cannot be written as a pruned model yet; "
                              "analyze, score, evaluate and export (ONNX, TorchScript) read it")
        if not is_folder_output(output):
            check_suffix(output, SUFFIXES, "a slim model", " or give a folder name, for a Hugging Face folder")

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
        return output


HF_FOLDER = HuggingFaceFolder()

