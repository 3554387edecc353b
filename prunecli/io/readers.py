"""Reading the bytes of model files: what kind of file it is, safetensors with a validated header, torch.save
files without running code unless trusted, what class a pickled object is (from its opcodes, without running it),
and the state dict inside common containers.

Below ``prunecli.io.slim`` (prunecli's own format) and the format adapters of ``prunecli.io.formats``.
"""

from __future__ import annotations

import importlib
import itertools
import json
import pickle
import pickletools
import struct
import sys
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunecli.errors import CheckpointError, first_line

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "state_dict_ema", "model_ema", "ema", "net", "module")
STRIPPED_PREFIXES = ("module.", "_orig_mod.")
# Globals a weights_only unpickler may construct when a file is a whole pickled model of these packages.
SAFE_MODULE_PREFIXES = ("torch.nn.", "torchvision.models.", "torchvision.ops.")
# and prunecli's own layer that a pruned model may hold (EDP keeps a conv decomposed where that saves MACs)
SAFE_CLASSES = ("prunecli.layers.DecomposedConv",)
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


def safetensors_header(path: Path) -> dict[str, Any]:
    """The header of a safetensors file (``__metadata__`` included), after checking its size, JSON and offsets."""
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors file; the file is truncated")
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if header_len > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise CheckpointError(f"{path}: safetensors header length {header_len} exceeds the file; the file is truncated")
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON; the file is damaged") from exc
    data_len = size - 8 - header_len
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object; the file is damaged")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info.get("data_offsets", (0, -1)) if isinstance(info, dict) else (0, -1)
        if not (0 <= begin <= end <= data_len):
            raise CheckpointError(f"{path}: tensor {name!r} lies outside the file; the file is truncated or damaged")
    return header


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Validate the header (size, JSON, offsets) before handing the file to safetensors."""
    from safetensors.torch import load_file

    safetensors_header(path)
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
            if not (qualified.startswith(SAFE_MODULE_PREFIXES) or qualified in SAFE_CLASSES):
                raise ImportError(qualified)
            found.append(getattr(importlib.import_module(module_name), attr))
        except (ImportError, AttributeError) as exc:
            outside = ", ".join(n for n in names if not (n.startswith(SAFE_MODULE_PREFIXES) or n in SAFE_CLASSES))
            outside = outside[:200] or qualified
            raise CheckpointError(
                f"{path} is a pickle that names classes outside torch.nn/torchvision ({outside}), and unpickling it "
                f"could run code; {TRUST_HINT}"
            ) from exc
    return found


def torch_load(path: Path, trust_pickle: bool, import_paths: tuple[Path, ...] = ()) -> Any:
    """``torch.load`` with ``weights_only=True`` (plus the torch.nn/torchvision classes of a whole pickled model),
    or a full unpickle only with ``trust_pickle``; TorchScript archives are refused.

    Args:
        import_paths: folders put first on ``sys.path`` while unpickling, where the classes of a trusted pickle live.
    """
    sys.path[:0] = [str(p) for p in import_paths]
    try:
        return _torch_load(path, trust_pickle)
    finally:
        del sys.path[: len(import_paths)]


def _torch_load(path: Path, trust_pickle: bool) -> Any:
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
    except Exception as exc:  # the safe loader runs no code: whatever it trips on (IndexError, KeyError...) is the file
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {first_line(exc, 120)}); "
            "the file is truncated or not a model"
        ) from exc


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the number a legacy (non-zip) torch.save file starts with
_MEMO_OPS = ("PROTO", "FRAME", "BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE")
_STRING_OPS = ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE")
_LEGACY = "<legacy torch.save header>"


def pickled_class(path: Path) -> str | None:
    """The class (``'module.Name'``) of the object a torch.save file holds when that object is an instance built by
    its class, as ``torch.save(model)`` writes a model; None for a dict, a tensor, anything else or an unreadable
    file. Read from the first opcodes of the pickle: nothing in it is run or imported."""
    try:
        if sniff(path) == "zip":
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
                if len(pickles) != 1 or any(n.endswith("/constants.pkl") for n in names):  # TorchScript
                    return None
                with archive.open(pickles[0]) as stream:
                    return _root_class(stream)
        with open(path, "rb") as stream:
            return _root_class(stream)
    except Exception:  # a damaged file: the reader that claims it says what is wrong
        return None


def _root_class(stream: Any) -> str | None:
    ops = pickletools.genops(stream)
    found = _instance_class(ops)
    if found != _LEGACY:
        return found
    for _ in ops:  # the rest of the magic number's pickle, then the protocol version's and the system info's
        pass
    for _ in range(2):
        for _ in pickletools.genops(stream):
            pass
    found = _instance_class(pickletools.genops(stream))
    return None if found == _LEGACY else found


def _instance_class(ops: Iterator[tuple[Any, Any, Any]]) -> str | None:
    """'module.Name' when the pickle begins by building an instance of that class: the class (a global; or, in a
    legacy torch.save file, the persistent id that carries the class with its source), no arguments, NEWOBJ."""
    seq = [(op.name, arg) for op, arg, _ in itertools.islice(ops, 32) if op.name not in _MEMO_OPS]
    names = [name for name, _ in seq]
    if names[:1] == ["LONG1"] and seq[0][1] == _LEGACY_MAGIC:
        return _LEGACY
    if names[:1] == ["GLOBAL"]:
        found, rest = str(seq[0][1]).replace(" ", "."), seq[1:]
    elif len(names) > 2 and names[0] in _STRING_OPS and names[1] in _STRING_OPS and names[2] == "STACK_GLOBAL":
        found, rest = f"{seq[0][1]}.{seq[1][1]}", seq[3:]
    elif names[:3] == ["MARK", "BINUNICODE", "GLOBAL"] and seq[1][1] == "module" and "BINPERSID" in names:
        found, rest = str(seq[2][1]).replace(" ", "."), seq[names.index("BINPERSID") + 1:]
    else:
        return None
    following = [name for name, _ in rest if name not in ("EMPTY_TUPLE", "EMPTY_DICT")]
    return found if following[:1] in (["NEWOBJ"], ["NEWOBJ_EX"]) else None


# what Lightning's Trainer writes beside the LightningModule's ``state_dict`` in a ``.ckpt`` (any one tells it apart)
LIGHTNING_KEYS = ("pytorch-lightning_version", "hyper_parameters", "optimizer_states", "loops")


def unwrap_state_dict(obj: Any, notes: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Find the state dict inside common containers and strip DDP/compile prefixes; in a Lightning checkpoint,
    also the prefix of the LightningModule attribute that holds the network (``model.``), said in ``notes``."""
    lightning = isinstance(obj, Mapping) and "state_dict" in obj and any(k in obj for k in LIGHTNING_KEYS)
    container = obj
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
    cleaned = {_strip_wrappers(str(key)): value for key, value in tensors.items()}
    if lightning:
        cleaned = _lightning_weights(cleaned, container, notes if notes is not None else [])
    return cleaned


def _strip_wrappers(key: str) -> str:
    # strip in any order and nesting: DDP(compile(m)) -> "module._orig_mod.", compile(DDP(m)) -> "_orig_mod.module."
    while prefix := next((p for p in STRIPPED_PREFIXES if key.startswith(p)), None):
        key = key[len(prefix):]
    return key


def _lightning_weights(state: dict[str, torch.Tensor], container: Mapping, notes: list[str]) -> dict[str, torch.Tensor]:
    """A Lightning checkpoint's weights without the LightningModule attribute they all sit under (``self.model``
    -> ``model.``); as they are when they sit under several (the LightningModule is then the network)."""
    heads = sorted({key.partition(".")[0] for key in state})
    where = ", ".join(f"{name} {container[key]}" for key, name in (("epoch", "epoch"), ("global_step", "step"))
                      if isinstance(container.get(key), int))
    what = f"a Lightning checkpoint{f' ({where})' if where else ''}"
    if len(heads) != 1 or any("." not in key for key in state):
        notes.append(f"{what}: its state_dict read as the LightningModule holds it (attributes {', '.join(heads[:6])}"
                     f"{', ...' if len(heads) > 6 else ''})")
        return state
    prefix = f"{heads[0]}."
    notes.append(f"{what}: stripped the prefix {prefix!r} (the LightningModule's {heads[0]!r} attribute) from its "
                 f"{len(state)} weights")
    return {_strip_wrappers(key[len(prefix):]): value for key, value in state.items()}
