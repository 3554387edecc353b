"""prunecli's own slim format: a ``.safetensors`` file whose metadata holds the prunecli document, or a ``.pt``/
``.pth`` state dict with that document in a ``<file>.json`` sidecar (the engine is :mod:`prunecli.io.slim`).

Mine when the safetensors metadata or the sidecar is a prunecli slim document. Read by rebuilding the base
architecture the document names from the recorded shapes (no pickle; a spec other than torchvision, timm or the
samples runs code and needs the user's consent). Written back as a slim file, which needs the base architecture.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from prunecli.errors import ExportError
from prunecli.io.arch import ArchSpec
from prunecli.io.files import check_suffix
from prunecli.io.formats.base import CheckpointFormat, LoadedModel, Probe, arch_of, input_info, loaded_model
from prunecli.io.readers import read_safetensors, torch_load, unwrap_state_dict
from prunecli.io.slim import SUFFIXES, read_sidecar, read_slim_metadata, rebuild

if TYPE_CHECKING:
    from prunecli.config import ModelSource


class SlimOutput(CheckpointFormat):
    """Writes a slim file: the formats whose pruned models are rebuilt from a named base architecture."""

    suffixes: ClassVar[tuple[str, ...]] = SUFFIXES

    def default_output(self, source_path: Path, tag: str = "slim") -> Path:
        """``model.v2.pt`` -> ``model.v2.slim.safetensors`` (a slim input gets ``.slim.slim``, never itself)."""
        return source_path.with_name(f"{source_path.stem}.{tag}.safetensors")

    def check_output(self, output: Path) -> None:
        check_suffix(output, SUFFIXES, "a slim model")

    def write(
        self, loaded: LoadedModel, model: nn.Module, output: Path, metadata: dict[str, Any], *, force: bool,
        inputs: tuple[Path, ...],
    ) -> Path:
        from prunecli.io import slim as engine  # looked up at call time, so tests can watch what is saved

        if loaded.arch is None:
            raise ExportError(f"output {output} is a slim model, which is rebuilt from its base architecture, and this "
                              "model names none; pass --arch")
        return engine.save_slim(model, output, arch=loaded.arch, input_shape=tuple(loaded.input.shape),
                                metadata=metadata, base=self.skeleton(loaded), force=force, inputs=inputs)

    def skeleton(self, loaded: LoadedModel) -> nn.Module | None:
        """The unpruned base the pruned model is described against, when its spec alone cannot build it (a folder's
        own code, found through the folder); None: the writer builds it from the spec."""
        return None


def consents(document: dict[str, Any], arch: ArchSpec | None, trust_pickle: bool) -> bool:
    """The user vouched for the code a slim file's architecture spec runs: --trust-pickle, or --arch naming it."""
    named = (document.get("arch") or {}).get("spec") if isinstance(document.get("arch"), dict) else None
    return trust_pickle or (arch is not None and arch.spec == named)


class SlimFormat(SlimOutput):
    name = "slim"

    def claims(self, probe: Probe) -> bool:
        if probe.kind == "safetensors":
            return read_slim_metadata(probe.path) is not None
        # a whole pickled model beside a stale sidecar is the whole model's (as before adapters)
        return probe.kind in ("zip", "pickle") and probe.pickled_class is None and read_sidecar(probe.path) is not None

    def read(self, probe: Probe, source: ModelSource) -> LoadedModel:
        arch = arch_of(source)
        if probe.kind == "safetensors":
            state = read_safetensors(probe.path)
            document = read_slim_metadata(probe.path)
        else:
            state = unwrap_state_dict(torch_load(probe.path, source.trust_pickle, source.import_paths))
            document = read_sidecar(probe.path)
        model = rebuild(document, state, consents(document, arch, source.trust_pickle), str(probe.path),
                        source.import_paths)
        arch = ArchSpec.from_dict(document["arch"])
        return loaded_model(model, arch, input_info(document, arch, source.input_shape), probe, self, document)


SLIM = SlimFormat()
