"""A plain state dict: a ``.safetensors`` file without prunecli metadata, or a torch.save file holding a dict of
tensors (also inside ``{"state_dict": ...}``, ``{"model": ...}``, EMA copies; ``module.``/``_orig_mod.`` prefixes
stripped; a Lightning ``.ckpt``, whose LightningModule attribute prefix such as ``model.`` is stripped and named in
a note).

Mine when the file is safetensors without a prunecli document, or a torch.save file whose pickle does not begin
by building an object (a whole model is :mod:`prunecli.io.formats.whole_model`'s) and has no slim sidecar. Read
into the architecture ``--arch`` names, or the one torchvision or timm model the weights match, strictly (every
missing, unexpected or mis-shaped key named). Written back as a slim file of that architecture.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from prunecli.errors import CheckpointError
from prunecli.io.arch import ArchSpec, build_model, detect_timm_arch, detect_torchvision_arch, parameters_left_to_load
from prunecli.io.formats.base import LoadedModel, Probe, arch_of, input_info, loaded_model
from prunecli.io.formats.slim import SlimOutput
from prunecli.io.readers import read_safetensors, torch_load, unwrap_state_dict
from prunecli.io.slim import load_strict, read_sidecar, read_slim_metadata

if TYPE_CHECKING:
    from pathlib import Path

    from prunecli.config import ModelSource


def model_from_state(
    state: dict[str, torch.Tensor], arch: ArchSpec | None, import_paths: tuple[Path, ...], notes: list[str]
) -> tuple[nn.Module, ArchSpec]:
    """``arch`` (else the one torchvision or timm model ``state`` matches) with ``state`` loaded strictly."""
    if arch is None:
        arch = detect_torchvision_arch(state) or detect_timm_arch(state)
        if arch is None:
            raise CheckpointError(
                "the file holds only weights and they match no single torchvision or timm model (some share their "
                "weights, e.g. the two fasterrcnn_mobilenet_v3_large FPNs); "
                "pass --arch (e.g. torchvision:resnet50, timm:NAME, sample:resnet20, mypkg.models:factory)"
            )
        notes.append(f"recognised the weights as {arch.spec} {dict(arch.kwargs) or ''}".strip())
    with parameters_left_to_load():
        model = build_model(arch, import_paths)
    load_strict(model, state)
    return model, arch


class StateDictFormat(SlimOutput):
    name = "state dict"

    def claims(self, probe: Probe) -> bool:
        if probe.kind == "safetensors":
            return read_slim_metadata(probe.path) is None
        return probe.kind in ("zip", "pickle") and probe.pickled_class is None and read_sidecar(probe.path) is None

    def read(self, probe: Probe, source: ModelSource) -> LoadedModel:
        notes: list[str] = []  # what unwrapping a container did (a Lightning checkpoint's prefix)
        if probe.kind == "safetensors":
            state = read_safetensors(probe.path)
        else:
            state = unwrap_state_dict(torch_load(probe.path, source.trust_pickle, source.import_paths), notes)
        return self.from_state(state, probe, source, notes)

    def from_state(self, state: dict[str, torch.Tensor], probe: Probe, source: ModelSource,
                   notes: list[str] | None = None) -> LoadedModel:
        """The model of a state dict already read (also a trusted pickle that held no model of its own)."""
        notes = list(notes or [])
        model, arch = model_from_state(state, arch_of(source), source.import_paths, notes)
        return loaded_model(model, arch, input_info(None, arch, source.input_shape), probe, self, notes=notes)


STATE_DICT = StateDictFormat()
