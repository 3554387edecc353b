"""Reading the bytes of model files: what kind of file it is, safetensors with a validated header, torch.save
files without running code unless trusted, and the state dict inside common containers.

Below both ``prunecli.io.checkpoint`` (any model file) and ``prunecli.io.slim`` (prunecli's own format).
"""

from __future__ import annotations

import importlib
import json
import pickle
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunecli.errors import CheckpointError, first_line

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "state_dict_ema", "model_ema", "ema", "net", "module")
STRIPPED_PREFIXES = ("module.", "_orig_mod.")
# Globals a weights_only unpickler may construct when a file is a whole pickled model of these packages.
SAFE_MODULE_PREFIXES = ("torch.nn.", "torchvision.models.", "torchvision.ops.")
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
TRUST_HINT = "pass --trust-pickle (with --import-path DIR for your classes) only if you trust its source"


def sniff(path: Path) -> str:
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


def check_file(path: Path) -> None:
    """Refuse a path that is missing, a directory or empty, with what to do about it."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; give the checkpoint file inside it")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); the file was not written completely")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
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


def _safe_globals(path: Path) -> list[Any]:
    """The classes a pickled torch.nn/torchvision model needs; CheckpointError if any other global is named."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as exc:  # not a zip checkpoint: a legacy or plain pickle, or random bytes
        raise CheckpointError(
            f"{path} is a pickle the safe loader cannot read (not a torch.save zip checkpoint), and unpickling it "
            f"could run code; if it is a model you saved, {TRUST_HINT}; otherwise the file is damaged"
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
                f"could run code; {TRUST_HINT}"
            ) from exc
    return found


def torch_load(path: Path, trust_pickle: bool) -> Any:
    """``torch.load`` with ``weights_only=True`` (plus the torch.nn/torchvision classes of a whole pickled model),
    or a full unpickle only with ``trust_pickle``; TorchScript archives are refused."""
    if sniff(path) == "zip":
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
            f"{path} is not a readable PyTorch checkpoint ({first_line(exc, 120)}); "
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
