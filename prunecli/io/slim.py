"""The slim artifact: safetensors weights plus the JSON needed to rebuild the pruned architecture.

Everything prunecli knows about a model travels in one ``prunecli`` metadata entry (one key, so the
file bytes are deterministic: safetensors does not order several metadata keys stably). Rebuilding
needs no pickle: the base architecture is built from its spec, every module attribute that pruning
changed (channel counts, groups, feature sizes, ...) is set from the stored diff, every tensor is
resized to its stored shape, and the weights load with ``strict=True``.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunecli._version import __version__
from prunecli.errors import CheckpointError, first_line
from prunecli.io.arch import ArchSpec, build_model, build_skeleton
from prunecli.io.files import atomic_output, write_through_memory
from prunecli.io.readers import check_file, read_safetensors, safetensors_header, sniff, torch_load, unwrap_state_dict
from prunecli.layers import DecomposedConv, decomposed_layers

FORMAT = "prunecli-slim"
FORMAT_VERSION = 1
METADATA_KEY = "prunecli"
TORCH_SUFFIXES = (".pt", ".pth")
SUFFIXES = (".safetensors", *TORCH_SUFFIXES)  # what save_slim writes
_PLAIN = (bool, int, float, str, type(None))
# the keys save_slim writes from the model itself; a copy of a document's provenance leaves them out
STRUCTURAL_KEYS = ("format", "format_version", "prunecli_version", "arch", "input_shape", "modules", "decomposed", "tied")


def _plain_value(value: Any) -> Any:
    """JSON form of a module attribute, or ``...`` when it is not a plain value we can restore."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, tuple | list | torch.Size) and all(isinstance(v, _PLAIN) for v in value):
        return list(value)
    return ...


def attribute_changes(base: nn.Module, pruned: nn.Module) -> dict[str, dict[str, Any]]:
    """Plain attributes (``in_channels``, ``groups``, ``normalized_shape``, ...) that differ from the base.

    EDP's decomposed convs are described by :func:`decomposed_shapes` instead."""
    base_modules = dict(base.named_modules())
    decomposed = tuple(decomposed_shapes(pruned))
    changes: dict[str, dict[str, Any]] = {}
    for name, module in pruned.named_modules():
        if decomposed and any(name == d or name.startswith(f"{d}.") for d in decomposed):
            continue
        reference = base_modules.get(name)
        if reference is None:
            raise CheckpointError(f"module {name!r} is not in the base architecture; cannot describe the slim model")
        for attr, value in vars(module).items():
            if attr.startswith("_"):
                continue
            plain = _plain_value(value)
            if plain is not ... and plain != _plain_value(vars(reference).get(attr, ...)):
                changes.setdefault(name, {})[attr] = plain
    return changes


def decomposed_shapes(model: nn.Module) -> dict[str, list[int]]:
    """``[in_channels, out_channels, rank]`` of each conv EDP kept as a basis + coefficient pair."""
    return {
        name: [block.basis.in_channels, block.coeff.out_channels, block.rank]
        for name, block in decomposed_layers(model).items()
    }


def _tied_aliases(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Map each later name of a shared tensor to the first name, so the tensor is stored once."""
    first: dict[tuple[int, int, tuple[int, ...]], str] = {}
    aliases = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def describe(
    model: nn.Module,
    spec: ArchSpec,
    input_shape: tuple[int, ...],
    metadata: Mapping[str, Any] | None = None,
    base: nn.Module | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The prunecli document of a model and the tensors to store (each shared tensor once)."""
    base = base if base is not None else build_skeleton(spec)
    aliases = _tied_aliases(model.state_dict())
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "prunecli_version": __version__,
        "arch": spec.to_dict(),
        "input_shape": list(input_shape),
        "modules": attribute_changes(base, model),
        **({"decomposed": shapes} if (shapes := decomposed_shapes(model)) else {}),
        "tied": aliases,
        **dict(metadata or {}),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in aliases}
    return document, tensors


def save_slim(
    model: nn.Module,
    path: str | Path,
    *,
    arch: str | ArchSpec,
    input_shape: tuple[int, ...],
    arch_kwargs: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    base: nn.Module | None = None,
    force: bool = False,
    inputs: tuple[Path, ...] = (),
) -> Path:
    """Write ``model`` self-describing and atomically: ``.safetensors``, or for ``.pt``/``.pth`` a plain
    state dict with the same document in a ``<file>.json`` sidecar.

    Args:
        arch: the spec of the unpruned base architecture (``ArchSpec`` or a spec string).
        arch_kwargs: factory kwargs when ``arch`` is a string.
        metadata: extra JSON-serialisable provenance (method, budget, achieved MACs, dataset, ...).
        base: a freshly built base model, when the caller has one (saves building it again).
        inputs: source files the output must not overwrite.
    """
    spec = arch if isinstance(arch, ArchSpec) else ArchSpec(arch, dict(arch_kwargs or {}))
    document, tensors = describe(model, spec, input_shape, metadata, base)
    text = json.dumps(document, sort_keys=True)
    path = Path(path)
    if path.suffix.lower() in TORCH_SUFFIXES:
        sidecar = sidecar_path(path)
        with atomic_output(path, force=force, inputs=inputs) as tmp, atomic_output(sidecar, force=force) as tmp_json:
            write_through_memory(tmp, lambda buffer: torch.save(tensors, buffer))
            tmp_json.write_text(text + "\n")
        return path
    from safetensors.torch import save

    with atomic_output(path, force=force, inputs=inputs) as tmp:
        tmp.write_bytes(save(tensors, metadata={METADATA_KEY: text}))  # a full disk is an OSError, unlike save_file's
    return path


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def read_sidecar(path: Path) -> dict[str, Any] | None:
    """The document beside a ``.pt`` state dict written by prunecli, if there is one."""
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return None
    try:
        document = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{sidecar} is not valid JSON; delete it or restore it") from exc
    return _checked(document, sidecar)


def read_slim_metadata(path: str | Path) -> dict[str, Any] | None:
    """The prunecli document of a safetensors file, or None for a plain safetensors file (read from the validated
    header alone, so a format adapter can ask whether a file is slim without reading its tensors)."""
    metadata = safetensors_header(Path(path)).get("__metadata__")
    raw = metadata.get(METADATA_KEY) if isinstance(metadata, dict) else None
    if raw is None:
        return None
    try:
        document = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: the prunecli metadata is not valid JSON; the file is damaged") from exc
    return _checked(document, path)


def _checked(document: Any, path: str | Path) -> dict[str, Any]:
    return checked_document(document, path, FORMAT, FORMAT_VERSION, f"slim format {FORMAT}",
                            "the metadata is not a prunecli slim document")


def checked_document(document: Any, path: str | Path, expected: str, readable: int, kind: str,
                     not_ours: str) -> dict[str, Any]:
    """``document`` if it is a prunecli document of format ``expected`` that this prunecli reads (``format_version``
    at most ``readable``); else the one-line error: ``not_ours`` (what was found instead), or asking to upgrade
    for a newer ``kind``."""
    if not isinstance(document, dict) or document.get("format") != expected:
        raise CheckpointError(f"{path}: {not_ours}; the file is damaged")
    version = document.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{path}: the prunecli metadata has no integer format_version; the file is damaged")
    if version > readable:
        raise CheckpointError(f"{path}: {kind} v{version} is not readable by prunecli {__version__}; upgrade prunecli")
    return document


BUILTIN_KINDS = ("torchvision", "timm", "sample", "hf")  # hf: a class of the transformers package itself


def trusted_arch(document: Mapping[str, Any], trust_code: bool, source: str = "the file") -> ArchSpec:
    """The base architecture a file names. Only torchvision, timm (a registered name, built without weights),
    transformers (a class of the package, built from its config) and sample specs are taken from a file on its
    word: any other spec imports and calls code the file chose, so it needs the user's consent."""
    try:
        arch = ArchSpec.from_dict(document["arch"])
    except (KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{source}: the prunecli metadata names no base architecture; the file is damaged") from exc
    if arch.spec.partition(":")[0] not in BUILTIN_KINDS and not trust_code:
        raise CheckpointError(
            f"{source} asks to build its architecture with {arch.spec!r}, which runs code; pass --arch {arch.spec} "
            "(or --trust-pickle) if you trust it"
        )
    return arch


def rebuild(
    document: Mapping[str, Any],
    state: Mapping[str, torch.Tensor],
    trust_code: bool = False,
    source: str = "the file",
    import_paths: tuple[Path, ...] = (),
) -> nn.Module:
    """Build the slim architecture described by ``document`` and load ``state`` strictly.

    Args:
        import_paths: folders where the module of a ``pkg.module:factory`` architecture is found (``--import-path``).
    """
    arch = trusted_arch(document, trust_code, source)
    full = dict(state)
    for alias, target in document.get("tied", {}).items():
        full[alias] = full[target]
    model = _shaped(build_skeleton(arch, import_paths), document, full)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        model = _shaped(build_model(arch, import_paths), document, full)  # a buffer the file does not hold needs real init
    load_strict(model, full)
    return model.eval()


def _shaped(model: nn.Module, document: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Set the stored module attributes and give every stored tensor its stored shape (uninitialised)."""
    modules = dict(model.named_modules())
    for name, attrs in document.get("modules", {}).items():
        if name not in modules:
            raise CheckpointError(f"slim file names module {name!r}, which the architecture does not have")
        for attr, value in attrs.items():
            current = getattr(modules[name], attr, None)
            setattr(modules[name], attr, tuple(value) if isinstance(current, tuple | torch.Size) else value)
    _decompose_skeleton(model, document.get("decomposed", {}), modules)
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for name, param in list(module._parameters.items()):  # with the ones declared None (a conv's absent bias)
            stored = state.get(prefix + name)
            if stored is not None:  # reconstruction can give a bias-free layer a bias
                dtype = param.dtype if param is not None else stored.dtype
                setattr(module, name, nn.Parameter(torch.empty(stored.shape, dtype=dtype)))
        for name, buffer in list(module.named_buffers(recurse=False)):
            stored = state.get(prefix + name)
            if buffer is not None and stored is not None:
                module._buffers[name] = torch.empty(stored.shape, dtype=buffer.dtype)
    return model


def _decompose_skeleton(model: nn.Module, decomposed: Any, modules: Mapping[str, nn.Module]) -> None:
    """Put EDP's basis + coefficient pair where the document says a conv was kept decomposed."""
    if not isinstance(decomposed, dict):
        raise CheckpointError("the slim file's list of decomposed layers is damaged")
    for name, dims in decomposed.items():
        conv = modules.get(name)
        if not isinstance(conv, nn.Conv2d) or not (isinstance(dims, list) and len(dims) == 3
                                                   and all(isinstance(d, int) and d > 0 for d in dims)):
            raise CheckpointError(f"slim file says {name!r} was decomposed, which this architecture cannot match")
        model.set_submodule(name, DecomposedConv(conv, *dims, device=conv.weight.device))


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """``load_state_dict(strict=True)`` with an error that names every missing and unexpected key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                shown = ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")
                parts.append(f"{len(keys)} {label}: {shown}")
        raise CheckpointError("weights do not match the architecture: " + "; ".join(parts) + "; check --arch/--arch-kwargs")
    # safetensors files and rebuilt dicts carry no ``_metadata``; modules that read their state-dict version
    # (torchvision's MNASNet raises without one) get the versions of the architecture we just built
    versioned = OrderedDict(state)
    versioned._metadata = getattr(state, "_metadata", None) or getattr(expected, "_metadata", None)
    try:
        model.load_state_dict(versioned, strict=True)
    except (RuntimeError, ValueError, KeyError) as exc:
        first = first_line(exc, 200)
        raise CheckpointError(f"the weights do not load into the architecture ({type(exc).__name__}: {first})") from exc


def load(path: str | Path, trust_code: bool = False, import_paths: tuple[Path, ...] = ()) -> nn.Module:
    """Load a prunecli slim model as a ready ``nn.Module`` in eval mode, without pickle: a ``.safetensors``
    file, or a ``.pt``/``.pth`` state dict with its ``.json`` sidecar. Unreadable files raise CheckpointError.

    Args:
        trust_code: build an architecture other than torchvision's and the samples, which runs code the file names.
        import_paths: folders where that architecture's module is found.
    """
    path = Path(path)
    check_file(path)
    if sniff(path) == "safetensors":
        state = read_safetensors(path)  # validates the header and offsets before reading
        document = read_slim_metadata(path)
        if document is None:
            raise CheckpointError(f"{path} is a plain safetensors file, not a prunecli slim model; load it with --arch")
        return rebuild(document, state, trust_code, str(path), tuple(import_paths))
    document = read_sidecar(path)
    if document is None:
        raise CheckpointError(
            f"{path} is not a prunecli slim model (a .safetensors file, or a .pt/.pth with its .json sidecar)"
        )
    state = unwrap_state_dict(torch_load(path, trust_pickle=False))
    return rebuild(document, state, trust_code, str(path), tuple(import_paths))
