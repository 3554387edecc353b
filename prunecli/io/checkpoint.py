"""Read a model from a slim file, a state dict (+ architecture) or, only when trusted, a full pickle.

Loading is lenient about containers ({"state_dict"}, {"model"}, EMA copies, ``module.`` prefixes) and
strict about weights: every missing, unexpected or mis-shaped key is named.
"""

from __future__ import annotations

import importlib
import json
import pickle
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunecli.errors import CheckpointError
from prunecli.io.arch import ArchSpec, InputInfo, build_model, default_input, detect_torchvision_arch
from prunecli.io.files import sha256_file
from prunecli.io.slim import load_strict, read_sidecar, read_slim_metadata, rebuild

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "state_dict_ema", "model_ema", "ema", "net", "module")
STRIPPED_PREFIXES = ("module.", "_orig_mod.")
# Globals a weights_only unpickler may construct when a file is a whole pickled model of these packages.
SAFE_MODULE_PREFIXES = ("torch.nn.", "torchvision.models.", "torchvision.ops.")
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


@dataclass
class LoadedModel:
    """A model ready to prune, with what we know of where it came from."""

    model: nn.Module
    arch: ArchSpec | None
    input: InputInfo
    source: Path
    sha256: str
    document: dict[str, Any] | None = None  # the slim metadata when the source is a slim file
    notes: list[str] = field(default_factory=list)


def _sniff(path: Path) -> str:
    """'safetensors', 'zip' (torch.save), 'pickle' (legacy torch.save) or 'unknown', from the first bytes."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    # safetensors first: its 8-byte little-endian header length may well begin with 0x80 (a 0x..80 byte header);
    # bytes 5-7 of that length are zero (headers under 1 TiB), which neither a zip nor a pickle starts with
    if len(head) >= 9 and head[8:9] == b"{" and head[5:8] == b"\0\0\0":
        return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; give the checkpoint file inside it")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); the file was not written completely")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Validate the header (size, JSON, offsets) before handing the file to safetensors."""
    from safetensors.torch import load_file

    size = path.stat().st_size
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if header_len > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise CheckpointError(f"{path}: safetensors header length {header_len} exceeds the file; the file is truncated")
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON; the file is damaged") from exc
    data_len = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info.get("data_offsets", (0, -1)) if isinstance(info, dict) else (0, -1)
        if not (0 <= begin <= end <= data_len):
            raise CheckpointError(f"{path}: tensor {name!r} lies outside the file; the file is truncated or damaged")
    try:
        return load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from exc


_TRUST_HINT = "pass --trust-pickle (with --import-path DIR for your classes) only if you trust its source"


def _safe_globals(path: Path) -> list[Any]:
    """The classes a pickled torch.nn/torchvision model needs; CheckpointError if any other global is named."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as exc:  # not a zip checkpoint: a legacy or plain pickle, or random bytes
        raise CheckpointError(
            f"{path} is a pickle the safe loader cannot read (not a torch.save zip checkpoint), and unpickling it "
            f"could run code; if it is a model you saved, {_TRUST_HINT}; otherwise the file is damaged"
        ) from exc
    found = []
    for qualified in names:
        module_name, _, attr = qualified.rpartition(".")
        try:
            if not qualified.startswith(SAFE_MODULE_PREFIXES):
                raise ImportError(qualified)
            found.append(getattr(importlib.import_module(module_name), attr))
        except (ImportError, AttributeError) as exc:
            outside = ", ".join(n for n in names if not n.startswith(SAFE_MODULE_PREFIXES))[:200] or qualified
            raise CheckpointError(
                f"{path} is a pickle that names classes outside torch.nn/torchvision ({outside}), and unpickling it "
                f"could run code; {_TRUST_HINT}"
            ) from exc
    return found


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    if _sniff(path) == "zip":
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise CheckpointError(
                f"{path} is not a readable PyTorch checkpoint (damaged zip archive: {exc}); the file is truncated or damaged"
            ) from exc
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            raise CheckpointError(
                f"{path} is a TorchScript archive, which cannot be pruned; pass the eager model's state dict with --arch"
            )
    if trust_pickle:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise CheckpointError(f"{path}: unpickling failed ({type(exc).__name__}: {exc}); check --import-path") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        allowed = _safe_globals(path)
        with torch.serialization.safe_globals(allowed):
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception as inner:
                raise CheckpointError(f"{path}: cannot read the pickled model safely ({inner})") from inner
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({str(exc).splitlines()[0][:120]}); "
            "the file is truncated or not a model"
        ) from exc


def unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """Find the state dict inside common containers and strip DDP/compile prefixes."""
    seen = 0
    while isinstance(obj, Mapping) and seen < 4:
        seen += 1
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping | nn.Module)), None)
        if inner is None:
            break
        obj = inner.state_dict() if isinstance(inner, nn.Module) else inner
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a state dict or model")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(
            f"checkpoint has no tensors (keys: {', '.join(map(str, list(obj)[:6]))}); pass the file that holds the weights"
        )
    cleaned = {}
    for key, value in tensors.items():
        # strip in any order and nesting: DDP(compile(m)) -> "module._orig_mod.", compile(DDP(m)) -> "_orig_mod.module."
        while prefix := next((p for p in STRIPPED_PREFIXES if key.startswith(p)), None):
            key = key[len(prefix):]
        cleaned[key] = value
    return cleaned


def _model_from_state(
    state: dict[str, torch.Tensor], arch: ArchSpec | None, import_paths: tuple[Path, ...], notes: list[str]
) -> tuple[nn.Module, ArchSpec]:
    if arch is None:
        arch = detect_torchvision_arch(state)
        if arch is None:
            raise CheckpointError(
                "the file holds only weights and they match no torchvision classifier; "
                "pass --arch (e.g. torchvision:resnet50, sample:resnet20, mypkg.models:factory)"
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
    input_shape: tuple[int, int, int] | None = None,
    trust_pickle: bool = False,
    import_paths: tuple[Path, ...] = (),
) -> LoadedModel:
    """Load any supported model file; see the module docstring for the accepted forms."""
    path = Path(path)
    _check_file(path)
    notes: list[str] = []
    document = None
    kind = _sniff(path)
    if kind == "safetensors":
        state = _read_safetensors(path)
        document = read_slim_metadata(path)
        if document is not None:
            model = rebuild(document, state, _consents(document, arch, trust_pickle), str(path))
            arch = ArchSpec.from_dict(document["arch"])
        else:
            model, arch = _model_from_state(state, arch, import_paths, notes)
    elif kind in ("zip", "pickle"):
        import sys

        sys.path[:0] = [str(p) for p in import_paths]
        try:
            obj = _torch_load(path, trust_pickle)
        finally:
            del sys.path[: len(import_paths)]
        sidecar = read_sidecar(path)
        if sidecar is not None and not isinstance(obj, nn.Module):
            document = sidecar
            model = rebuild(document, unwrap_state_dict(obj), _consents(document, arch, trust_pickle), str(path))
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
    return LoadedModel(model.eval(), arch, info, path, sha256_file(path), document, notes)


def _input_info(
    document: dict[str, Any] | None, arch: ArchSpec | None, input_shape: tuple[int, int, int] | None
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
