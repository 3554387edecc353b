"""A whole pickled model, ``torch.save(model)``: the architecture is in the pickle, so no ``--arch`` is needed.

Mine when the pickle begins by building an instance of a class (read from its opcodes; nothing is run). Read with
``torch.load(weights_only=True)`` when every class it names comes from torch.nn or torchvision (no code of the
file runs), else only with ``--trust-pickle`` (``--import-path`` where the classes live). The base architecture
is ``--arch``, or the torchvision model the weights match, or none: the pickle itself is what rebuilds it.

Written back the way it came: ``torch.save(pruned_model)`` to a ``.pt``/``.pth``, which ``torch.load`` reads (with
``weights_only=True`` and the model's classes in ``torch.serialization.safe_globals``, or ``weights_only=False``),
and which prunecli reads again without ``--trust-pickle`` when the classes are torch.nn/torchvision ones. The
provenance travels inside the model, as the JSON string attribute ``prunecli_metadata`` (prunecli's readers take
it off the model they return). A ``.safetensors`` output is a slim file, which needs the base architecture: for a
model without one it is refused before any work, naming the ``.pt`` that works.

The pickle is written with a pickler that orders sets (a module's ``_non_persistent_buffers_set``), which Python
otherwise orders by string hash, randomised per process: the same prune writes the same bytes.
"""

from __future__ import annotations

import json
import pickle
import types
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from prunecli._version import __version__
from prunecli.errors import CheckpointError, ExportError
from prunecli.io.arch import ArchSpec, detect_torchvision_arch, torchvision_input_of
from prunecli.io.files import atomic_output, check_suffix, write_through_memory
from prunecli.io.formats.base import (
    CheckpointFormat,
    LoadedModel,
    Probe,
    arch_of,
    input_info,
    json_document,
    loaded_model,
)
from prunecli.io.formats.slim import SLIM
from prunecli.io.formats.state_dict import STATE_DICT
from prunecli.io.readers import SAFE_MODULE_PREFIXES, torch_load, unwrap_state_dict
from prunecli.io.slim import BUILTIN_KINDS

if TYPE_CHECKING:
    from prunecli.config import ModelSource

FORMAT = "prunecli-whole-model"
FORMAT_VERSION = 1
METADATA_ATTRIBUTE = "prunecli_metadata"  # the JSON provenance a whole-model file carries on its root module
TORCH_SUFFIXES = (".pt", ".pth")


class _OrderedSetPickler(pickle._Pickler):  # the Python pickler: the C one pickles sets before any override sees them
    """``pickle``'s pickler with sets and frozensets written in sorted order, so their bytes do not follow the hash
    seed of the process."""

    dispatch: ClassVar[dict[type, Any]] = dict(pickle._Pickler.dispatch)

    def _save_set(self, obj: set | frozenset) -> None:
        self.save_reduce(type(obj), (sorted(obj, key=repr),), obj=obj)

    dispatch[set] = _save_set
    dispatch[frozenset] = _save_set


# what torch.save takes as its pickle_module: it subclasses ``Pickler`` (to store tensors apart)
_DETERMINISTIC_PICKLE = types.SimpleNamespace(Pickler=_OrderedSetPickler, Unpickler=pickle.Unpickler,
                                              __name__="pickle")


def save_pickle(obj: Any, buffer: Any) -> None:
    """``torch.save(obj, buffer)`` with sets written in sorted order: the same object gives the same bytes in any
    process (a model, or a container holding one)."""
    torch.save(obj, buffer, pickle_module=_DETERMINISTIC_PICKLE)


def save_whole_model(model: nn.Module, path: Path, document: dict[str, Any], *, force: bool = False,
                     inputs: tuple[Path, ...] = ()) -> Path:
    """``torch.save(model)`` atomically and byte-reproducibly, with ``document`` as its ``prunecli_metadata``.

    ``model`` is saved as it is (on the CPU: a copy is moved there if it is not); the attribute is set for the save
    and taken off again."""
    if any(t.device.type != "cpu" for t in (*model.parameters(), *model.buffers())):
        import copy

        model = copy.deepcopy(model).cpu()
    text = json.dumps(document, sort_keys=True)
    with atomic_output(path, force=force, inputs=inputs) as tmp:
        model.__dict__[METADATA_ATTRIBUTE] = text
        try:
            write_through_memory(tmp, lambda buffer: save_pickle(model, buffer))
        finally:
            model.__dict__.pop(METADATA_ATTRIBUTE, None)
    return path


def take_document(model: nn.Module, path: Path) -> dict[str, Any] | None:
    """The prunecli document a whole-model file carries, taken off ``model``; None when prunecli did not write it."""
    raw = model.__dict__.pop(METADATA_ATTRIBUTE, None)
    return json_document(raw, path, f"the model's {METADATA_ATTRIBUTE}", FORMAT, FORMAT_VERSION, "whole-model format")


def read_whole_model(path: Path, trust_pickle: bool, import_paths: tuple[Path, ...] = ()) -> tuple[Any, dict | None]:
    """What the pickle holds (a model, with its prunecli document taken off; or, trusted, any other object)."""
    obj = torch_load(path, trust_pickle, import_paths)
    return obj, take_document(obj, path) if isinstance(obj, nn.Module) else None


def _documented_arch(document: dict[str, Any] | None, source: ModelSource) -> ArchSpec | None:
    """The base architecture a whole-model file records, where taking it is safe: a torchvision, timm or sample
    spec, or one the user vouched for (it would be built for a companion model given as bare weights)."""
    if not document or not isinstance(document.get("arch"), dict):
        return None
    arch = ArchSpec.from_dict(document["arch"])
    if arch.spec.partition(":")[0] in BUILTIN_KINDS or source.trust_pickle or source.arch == arch.spec:
        return arch
    return None


@dataclass(frozen=True)
class WholeModelFormat(CheckpointFormat):
    """``arch_known``: whether the base architecture is known (True: named or recognised), cannot be (False), or
    may be once the file is read (None: a torchvision class whose weights may match one of its builders)."""

    arch_known: bool | None = None
    name = "whole model"

    def claims(self, probe: Probe) -> bool:
        qualified = probe.pickled_class
        if qualified is None:
            return False
        if qualified.startswith(SAFE_MODULE_PREFIXES):  # importing these runs no code of the file's choosing
            import importlib

            module_name, _, attr = qualified.rpartition(".")
            try:
                cls = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError):
                return False
            return isinstance(cls, type) and issubclass(cls, nn.Module)
        return True  # a class of the user's: a model, most likely; reading it needs --trust-pickle

    def bind(self, probe: Probe, source: ModelSource) -> WholeModelFormat:
        if source.arch:
            return WholeModelFormat(True)
        return WholeModelFormat(None if (probe.pickled_class or "").startswith("torchvision.models.") else False)

    def read(self, probe: Probe, source: ModelSource) -> LoadedModel:
        obj, document = read_whole_model(probe.path, source.trust_pickle, source.import_paths)
        if not isinstance(obj, nn.Module):  # a trusted pickle of some other object: look for weights inside
            notes: list[str] = []
            return STATE_DICT.from_state(unwrap_state_dict(obj, notes), probe, source, notes)
        model = obj.eval()
        arch = arch_of(source) or _documented_arch(document, source)
        if arch is None and document is None and type(model).__module__.startswith("torchvision.models."):
            arch = detect_torchvision_arch(model.state_dict(), type(model))
        notes = []
        guess = None
        if arch is not None:
            notes.append(f"full pickled model; its architecture is {arch.spec}")
        elif not (document and document.get("input_shape")) and source.input_shape is None:
            guess = torchvision_input_of(model)
            if guess is not None:
                notes.append(f"input {'x'.join(map(str, guess.shape))} assumed: the size {type(model).__name__}'s "
                             "torchvision family takes, with the channels its first conv reads; pass --input-shape "
                             "to change it")
        info = input_info(document, arch, source.input_shape, guess)
        return loaded_model(model, arch, info, probe, WholeModelFormat(arch is not None), document, notes)

    def module(self, probe: Probe, trust_code: bool, import_paths: tuple[Path, ...]) -> nn.Module:
        obj, _ = read_whole_model(probe.path, trust_code, import_paths)
        if not isinstance(obj, nn.Module):
            raise CheckpointError(f"{probe.path} holds a {type(obj).__name__}, not a model")
        return obj.eval()

    def default_output(self, source_path: Path, tag: str = "slim") -> Path:
        """``model.pt`` -> ``model.slim.pt``: a whole pickled model is written back as one."""
        return source_path.with_name(f"{source_path.stem}.{tag}.pt")

    def check_output(self, output: Path) -> None:
        if output.suffix.lower() == ".safetensors":
            if self.arch_known is False:
                raise ExportError(
                    f"a whole pickled model without a named architecture is written as a whole-model .pt; use -o "
                    f"{output.with_suffix('.pt')} (or --arch, if one builds it, for a slim {output.name})"
                )
            return
        check_suffix(output, (*TORCH_SUFFIXES, ".safetensors"), "a whole pickled model")

    def write(
        self, loaded: LoadedModel, model: nn.Module, output: Path, metadata: dict[str, Any], *, force: bool,
        inputs: tuple[Path, ...],
    ) -> Path:
        if output.suffix.lower() == ".safetensors":
            self.check_output(output)
            return SLIM.write(loaded, model, output, metadata, force=force, inputs=inputs)
        document = {
            **metadata,
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "prunecli_version": __version__,
            "input_shape": list(loaded.input.shape),
            **({"arch": loaded.arch.to_dict()} if loaded.arch is not None else {}),
        }
        return save_whole_model(model, output, document, force=force, inputs=inputs)


WHOLE_MODEL = WholeModelFormat()
