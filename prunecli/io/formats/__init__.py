"""Checkpoint formats as adapters: the one place that knows how a user's model file is read and written back.

``FORMATS`` is asked in order; the first adapter that claims a file (by its content) reads it and writes the
pruned model back in a form the user's own tools load. The pipeline asks the adapter and never special-cases a
format. Trust is decided by the readers: code runs only with ``--trust-pickle`` or an ``--arch`` naming it; the
allowlisted ``weights_only`` path (torch.nn and torchvision classes) needs neither.

Adapters today, in the order they are asked:

- ``hugging face folder``: a directory ``save_pretrained`` wrote (config.json + weights), written back as a folder
  whose model.safetensors is a slim file of the ``hf:`` class, or as that slim file;
- ``slim``: prunecli's slim safetensors, or a ``.pt``/``.pth`` state dict with its ``.json`` sidecar;
- ``Ultralytics checkpoint``: the dict Ultralytics' trainer and ``YOLO.save`` write (``--trust-pickle``), written
  back as one (``prunecli.io.formats.ultralytics``);
- ``whole model``: ``torch.save(model)``, written back as a whole-model ``.pt``;
- ``state dict``: plain weights with ``--arch`` or a recognised torchvision/timm model, written back as a slim file.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from prunecli.config import ModelSource
from prunecli.errors import CheckpointError
from prunecli.io.arch import ArchSpec
from prunecli.io.formats.base import CheckpointFormat, LoadedModel, Probe, probe
from prunecli.io.formats.hf import HF_FOLDER
from prunecli.io.formats.slim import SLIM
from prunecli.io.formats.state_dict import STATE_DICT
from prunecli.io.formats.ultralytics import ULTRALYTICS
from prunecli.io.formats.whole_model import WHOLE_MODEL

__all__ = [
    "FORMATS",
    "CheckpointFormat",
    "LoadedModel",
    "checkpoint_format",
    "claiming",
    "default_output",
    "load",
    "load_model",
    "open_checkpoint",
    "probe",
]

FORMATS: tuple[CheckpointFormat, ...] = (HF_FOLDER, SLIM, ULTRALYTICS, WHOLE_MODEL, STATE_DICT)


def claiming(found: Probe) -> CheckpointFormat:
    """The first adapter of :data:`FORMATS` that claims the probed file; CheckpointError, saying why, if none does."""
    for adapter in FORMATS:
        if adapter.claims(found):
            return adapter
    raise CheckpointError(
        f"{found.path} is neither safetensors nor a torch.save file; give a .safetensors, .pt or .pth checkpoint"
    )


def checkpoint_format(source: ModelSource) -> CheckpointFormat:
    """The adapter of ``source``'s file, before reading it (cheap: a header, a sidecar, the first pickle opcodes),
    for choosing and checking the output before any work."""
    found = probe(source.path)
    return claiming(found).bind(found, source)


def open_checkpoint(source: ModelSource) -> LoadedModel:
    """Read ``source`` with the adapter that claims its file; ``LoadedModel.format`` writes the result back."""
    found = probe(source.path)
    return claiming(found).read(found, source)


def load_model(
    path: str | Path,
    *,
    arch: ArchSpec | None = None,
    input_shape: tuple[int, ...] | None = None,
    trust_pickle: bool = False,
    import_paths: tuple[Path, ...] = (),
) -> LoadedModel:
    """:func:`open_checkpoint` with keyword arguments, for library callers that hold an ``ArchSpec``."""
    return open_checkpoint(ModelSource(Path(path), arch.spec if arch else None, dict(arch.kwargs) if arch else {},
                                       input_shape, trust_pickle, tuple(import_paths)))


def default_output(source_path: Path, tag: str = "slim") -> Path:
    """Where ``prune`` writes by default: the adapter's choice; a slim ``.safetensors`` name when the file cannot
    be read (reading it then says why)."""
    try:
        return checkpoint_format(ModelSource(Path(source_path))).default_output(Path(source_path), tag)
    except CheckpointError:
        return SLIM.default_output(Path(source_path), tag)


def load(path: str | Path, trust_code: bool = False, import_paths: tuple[Path, ...] = ()) -> nn.Module:
    """Load a model prunecli wrote as a ready ``nn.Module`` in eval mode: a slim ``.safetensors``, a ``.pt``/``.pth``
    state dict with its ``.json`` sidecar, a Hugging Face folder (the transformers model; all three rebuilt without
    pickle), or a whole-model ``.pt`` (read with ``weights_only=True`` when its classes are torch.nn/torchvision
    ones). Unreadable files raise CheckpointError.

    Args:
        trust_code: build an architecture other than torchvision's, timm's, transformers' and the samples, unpickle
            a whole model of other classes, or run a Hugging Face folder's own code; each runs code the file names.
        import_paths: folders where that code's modules are found.
    """
    from prunecli.io.slim import load as load_slim

    path = Path(path)
    found = probe(path)
    adapter = next((a for a in FORMATS if a.claims(found)), None)
    if adapter is None:
        return load_slim(path, trust_code, tuple(import_paths))  # refuses it, saying what it reads
    return adapter.module(found, trust_code, tuple(import_paths))
