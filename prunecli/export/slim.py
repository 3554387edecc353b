"""A slim safetensors copy of a model (optionally in fp16/bf16), reloaded with ``prunecli.load`` and compared."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch

from prunecli.errors import ExportError
from prunecli.export.config import DTYPES
from prunecli.export.verify import REAL_CHUNK, cast_tolerance, check_cast, torch_runner, verify
from prunecli.io.arch import ArchSpec


def write_safetensors(model, tmp: Path, input_shape, document, arch, config, real_inputs, import_paths) -> dict[str, Any]:
    from prunecli.io.slim import STRUCTURAL_KEYS, load, save_slim

    if document is not None and document.get("arch"):
        spec = ArchSpec.from_dict(document["arch"])
    elif arch is not None:
        spec = arch if isinstance(arch, ArchSpec) else ArchSpec(str(arch))
    else:
        raise ExportError(  # a whole pickled model without one: its graph exports, or prune wrote it as a whole .pt
            "--format safetensors needs the base architecture, which this model does not name (a whole pickled "
            "model); export it with --format onnx or --format torchscript, or give the --arch that builds it"
        )
    cast = copy.deepcopy(model).to(DTYPES[config.dtype])
    cast_error = None
    if config.verify and config.dtype != "fp32":  # first: a cast that breaks the model is not the file's fault
        cast_error = check_cast(cast, copy.deepcopy(model).float(), config.dtype, input_shape, real_inputs)
    metadata = {k: v for k, v in (document or {}).items() if k not in STRUCTURAL_KEYS}
    metadata["dtype"] = config.dtype
    save_slim(cast, tmp, arch=spec, input_shape=tuple(input_shape), metadata=metadata, force=True)
    verification = None
    if config.verify:
        reloaded = load(tmp, trust_code=True, import_paths=import_paths)  # the architecture the source was built with
        dtype = next((p.dtype for p in reloaded.parameters()), torch.float32)
        rounded = copy.deepcopy(cast).to(dtype)  # the weights the file holds, in the dtype load gives back
        verification = verify(
            "the reloaded safetensors model", "prunecli.load", torch_runner(reloaded), torch_runner(rounded),
            input_shape, config, real_inputs, REAL_CHUNK,
        )
        if cast_error is not None:
            verification = dataclasses.replace(verification, cast=cast_error, cast_dtype=config.dtype,
                                               cast_tolerance=cast_tolerance(DTYPES[config.dtype]))
    return {"exporter": "safetensors", "verification": verification}
