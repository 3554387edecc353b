"""What every checkpoint format adapter answers, and what the adapters share.

An adapter answers three questions about one format: is this file mine (``claims``, by content: a safetensors
header, the first opcodes of a pickle, a sidecar, never the suffix alone), how do I read it into a model
(``read``, recording in :class:`LoadedModel` what it takes to rebuild it), and how do I write a pruned model back
so the user's own tools load it (``default_output``, ``check_output``, ``write``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from prunecli.errors import CheckpointError
from prunecli.io.arch import ArchSpec, InputInfo, default_input
from prunecli.io.files import check_output_path, sha256_file
from prunecli.io.readers import check_file, pickled_class, sniff
from prunecli.io.slim import checked_document
from prunecli.tasks import prunable_part

if TYPE_CHECKING:
    from prunecli.config import ModelSource


@dataclass
class Probe:
    """A model path as first seen: its kind and what can be learnt from it without reading its tensors."""

    path: Path
    kind: str  # "safetensors", "zip" (torch.save), "pickle" (legacy torch.save), "unknown" or "directory"

    @cached_property
    def pickled_class(self) -> str | None:
        """The class of the object a torch.save file holds when it is an instance (a whole pickled model)."""
        return pickled_class(self.path) if self.kind in ("zip", "pickle") else None


def probe(path: Path) -> Probe:
    """Look at ``path`` (refusing a missing or empty file, with what to do about it)."""
    path = Path(path)
    if path.is_dir():
        return Probe(path, "directory")  # a Hugging Face folder is a model too, once an adapter claims it
    check_file(path)
    return Probe(path, sniff(path))


@dataclass
class LoadedModel:
    """A model ready to prune, with what we know of where it came from and the adapter that read it."""

    model: nn.Module  # what prunecli traces, scores and prunes: the whole model, or a detector's feature path
    arch: ArchSpec | None  # the base architecture, when one is named or recognised (None: a whole pickle only)
    input: InputInfo
    source: Path
    sha256: str
    document: dict[str, Any] | None = None  # the prunecli metadata when the source is a file prunecli wrote
    notes: list[str] = field(default_factory=list)
    whole: nn.Module | None = None  # the model as deployed, when ``model`` is only part of it
    format: CheckpointFormat = field(kw_only=True)  # the adapter that read the file, and writes the result back

    @property
    def deployed(self) -> nn.Module:
        return self.model if self.whole is None else self.whole


class CheckpointFormat:
    """One checkpoint format. Instances are immutable; ``bind`` and ``read`` may return a copy that knows more about
    one file (whether its base architecture is known, say), which ``check_output`` and ``write`` then use."""

    name: ClassVar[str] = ""

    def claims(self, probe: Probe) -> bool:
        """Whether ``probe`` is a file of this format, judged by its content."""
        raise NotImplementedError

    def bind(self, probe: Probe, source: ModelSource) -> CheckpointFormat:
        """This adapter for ``source`` before it is read: what the output checks can know without reading it."""
        return self

    def read(self, probe: Probe, source: ModelSource) -> LoadedModel:
        """The model in the file, ready to prune; ``LoadedModel.format`` is the adapter that writes it back."""
        raise NotImplementedError

    def module(self, probe: Probe, trust_code: bool, import_paths: tuple[Path, ...]) -> nn.Module:
        """The file as a ready ``nn.Module`` for ``prunecli.load``: only what prunecli writes is taken."""
        from prunecli.io.slim import load  # refuses what is not a slim file, saying why

        return load(probe.path, trust_code, import_paths)

    def default_output(self, source_path: Path, tag: str = "slim") -> Path:
        """Where a pruned (``tag`` "slim") or fine-tuned ("ft") model goes by default: beside the source."""
        raise NotImplementedError

    def check_output(self, output: Path) -> None:
        """Refuse, in one line naming an output that works, an output this format cannot write; before any work."""
        raise NotImplementedError

    def check_path(self, output: Path, *, force: bool, inputs: tuple[Path, ...]) -> None:
        """Refuse an output that exists (without ``force``), is an input, or lies in a missing folder; before any
        work. A file, unless the format writes folders."""
        check_output_path(output, force=force, inputs=inputs)

    def write(
        self, loaded: LoadedModel, model: nn.Module, output: Path, metadata: dict[str, Any], *, force: bool,
        inputs: tuple[Path, ...],
    ) -> Path:
        """Write ``model`` (the pruned model as deployed) atomically, with ``metadata`` (the provenance) inside, in
        the form the source's own tools load; the same model and metadata give the same bytes.

        Args:
            loaded: the source as read (its architecture, input and document).
            inputs: files the output must not overwrite.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{self.name} checkpoint format>"


def arch_of(source: ModelSource) -> ArchSpec | None:
    """The architecture the user named with ``--arch``, if any."""
    return ArchSpec(source.arch, dict(source.arch_kwargs)) if source.arch else None


def input_info(
    document: dict[str, Any] | None,
    arch: ArchSpec | None,
    input_shape: tuple[int, ...] | None,
    fallback: InputInfo | None = None,
) -> InputInfo:
    """The input of a model: ``--input-shape``, else the one a prunecli document records, else the architecture's
    default, else ``fallback`` (a guess from the model itself); the normalisation from the same sources."""
    known = default_input(arch) if arch is not None else None
    if document is not None and document.get("input_shape"):
        mean, std = document.get("mean"), document.get("std")
        known = InputInfo(
            tuple(document["input_shape"]),
            tuple(mean) if mean else known.mean if known else None,
            tuple(std) if std else known.std if known else None,
        )
    known = known or fallback
    if input_shape is not None:
        return InputInfo(input_shape, known.mean if known else None, known.std if known else None)
    if known is None:
        raise CheckpointError("the input shape of this model is unknown; pass --input-shape CxHxW, e.g. 3x224x224")
    return known


def loaded_model(
    model: nn.Module,
    arch: ArchSpec | None,
    info: InputInfo,
    probe: Probe,
    adapter: CheckpointFormat,
    document: dict[str, Any] | None = None,
    notes: list[str] | None = None,
) -> LoadedModel:
    """The :class:`LoadedModel` of a model just read: in eval mode, with the part to prune (a detector's feature
    path, a transformers model's logits) and its note."""
    model = model.eval()
    part = prunable_part(model)
    notes = [*(notes or []), *([part.note] if getattr(part, "note", None) else [])]
    return LoadedModel(part, arch, info, probe.path, sha256_file(probe.path), document, notes,
                       None if part is model else model, format=adapter)


def json_document(raw: Any, path: Path, where: str, expected: str, readable: int, kind: str) -> dict[str, Any] | None:
    """The prunecli document a pickled file carries as a JSON string (``where`` in the file: an attribute, a key);
    None when there is none (prunecli did not write the file).

    Args:
        expected: the document's ``format``; ``readable``: the newest ``format_version`` this prunecli reads;
            ``kind``: the format's name in the message asking to upgrade.
    """
    if raw is None:
        return None
    try:
        document = json.loads(raw) if isinstance(raw, str) else None
    except json.JSONDecodeError:
        document = None
    return checked_document(document, path, expected, readable, kind, f"{where} is not a prunecli document")
