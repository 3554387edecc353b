"""Read a model from a slim file, a state dict (+ architecture) or, only when trusted, a full pickle.

Loading is lenient about containers ({"state_dict"}, {"model"}, EMA copies, ``module.`` prefixes) and
strict about weights: every missing, unexpected or mis-shaped key is named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunecli.errors import CheckpointError
from prunecli.io.arch import ArchSpec, InputInfo, build_model, default_input, detect_timm_arch, detect_torchvision_arch
from prunecli.io.files import sha256_file
from prunecli.io.readers import check_file, read_safetensors, sniff, torch_load, unwrap_state_dict
from prunecli.io.slim import load_strict, read_sidecar, read_slim_metadata, rebuild
from prunecli.tasks import prunable_part


@dataclass
class LoadedModel:
    """A model ready to prune, with what we know of where it came from."""

    model: nn.Module  # what prunecli traces, scores and prunes: the whole model, or a detector's feature path
    arch: ArchSpec | None
    input: InputInfo
    source: Path
    sha256: str
    document: dict[str, Any] | None = None  # the slim metadata when the source is a slim file
    notes: list[str] = field(default_factory=list)
    whole: nn.Module | None = None  # the model as deployed, when ``model`` is only part of it

    @property
    def deployed(self) -> nn.Module:
        return self.model if self.whole is None else self.whole


def _model_from_state(
    state: dict[str, torch.Tensor], arch: ArchSpec | None, import_paths: tuple[Path, ...], notes: list[str]
) -> tuple[nn.Module, ArchSpec]:
    if arch is None:
        arch = detect_torchvision_arch(state) or detect_timm_arch(state)
        if arch is None:
            raise CheckpointError(
                "the file holds only weights and they match no single torchvision or timm model (some share their "
                "weights, e.g. the two fasterrcnn_mobilenet_v3_large FPNs); "
                "pass --arch (e.g. torchvision:resnet50, timm:NAME, sample:resnet20, mypkg.models:factory)"
            )
        notes.append(f"recognised the weights as {arch.spec} {dict(arch.kwargs) or ''}".strip())
    model = build_model(arch, import_paths)
    load_strict(model, state)
    return model, arch


def _consents(document: dict[str, Any], arch: ArchSpec | None, trust_pickle: bool) -> bool:
    """The user vouched for the code a slim file's architecture spec runs: --trust-pickle, or --arch naming it."""
    named = (document.get("arch") or {}).get("spec") if isinstance(document.get("arch"), dict) else None
    return trust_pickle or (arch is not None and arch.spec == named)


def load_model(
    path: str | Path,
    *,
    arch: ArchSpec | None = None,
    input_shape: tuple[int, ...] | None = None,
    trust_pickle: bool = False,
    import_paths: tuple[Path, ...] = (),
) -> LoadedModel:
    """Load any supported model file; see the module docstring for the accepted forms."""
    path = Path(path)
    check_file(path)
    notes: list[str] = []
    document = None
    kind = sniff(path)
    if kind == "safetensors":
        state = read_safetensors(path)
        document = read_slim_metadata(path)
        if document is not None:
            model = rebuild(document, state, _consents(document, arch, trust_pickle), str(path), import_paths)
            arch = ArchSpec.from_dict(document["arch"])
        else:
            model, arch = _model_from_state(state, arch, import_paths, notes)
    elif kind in ("zip", "pickle"):
        import sys

        sys.path[:0] = [str(p) for p in import_paths]
        try:
            obj = torch_load(path, trust_pickle)
        finally:
            del sys.path[: len(import_paths)]
        sidecar = read_sidecar(path)
        if sidecar is not None and not isinstance(obj, nn.Module):
            document = sidecar
            consent = _consents(document, arch, trust_pickle)
            model = rebuild(document, unwrap_state_dict(obj), consent, str(path), import_paths)
            arch = ArchSpec.from_dict(document["arch"])
        elif isinstance(obj, nn.Module):
            model = obj.eval()
            if arch is None and type(model).__module__.startswith("torchvision.models"):
                arch = detect_torchvision_arch(model.state_dict())
            if arch is not None:
                notes.append(f"full pickled model; its architecture is {arch.spec}")
        else:
            model, arch = _model_from_state(unwrap_state_dict(obj), arch, import_paths, notes)
    else:
        raise CheckpointError(
            f"{path} is neither safetensors nor a torch.save file; give a .safetensors, .pt or .pth checkpoint"
        )
    info = _input_info(document, arch, input_shape)
    model = model.eval()
    part = prunable_part(model)
    if part is not model:
        notes.append("a detector: its feature path (backbone with FPN or SSD extras) is traced, pruned and counted; "
                     "the heads keep the widths they read")
    return LoadedModel(part, arch, info, path, sha256_file(path), document, notes, None if part is model else model)


def _input_info(
    document: dict[str, Any] | None, arch: ArchSpec | None, input_shape: tuple[int, ...] | None
) -> InputInfo:
    known = default_input(arch) if arch is not None else None
    if document is not None:
        mean, std = document.get("mean"), document.get("std")
        known = InputInfo(
            tuple(document["input_shape"]),
            tuple(mean) if mean else known.mean if known else None,
            tuple(std) if std else known.std if known else None,
        )
    if input_shape is not None:
        return InputInfo(input_shape, known.mean if known else None, known.std if known else None)
    if known is None:
        raise CheckpointError("the input shape of this model is unknown; pass --input-shape CxHxW, e.g. 3x224x224")
    return known
