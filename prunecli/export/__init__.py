"""Deployable artifacts of a (pruned) model: ONNX (``onnx``), a re-written slim safetensors (``slim``), TorchScript
(``torchscript``), each compared with the PyTorch model (``verify``) before it is put in place.

Every file is written through :func:`prunecli.io.files.atomic_output`: it is produced in a temporary
file beside the target, checked, run and compared with the PyTorch model, and only then renamed into
place. A failed export or a failed parity check therefore leaves no file behind (and an existing file
untouched).

onnx and onnxruntime are imported inside the functions that need them, so ``import prunecli`` stays light.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunecli.export.config import ExportConfig
from prunecli.export.onnx import name_outputs, write_onnx
from prunecli.export.slim import write_safetensors
from prunecli.export.torchscript import write_torchscript
from prunecli.export.verify import REAL_CHUNK, random_batches, real_batches
from prunecli.io.arch import ArchSpec
from prunecli.io.files import atomic_output
from prunecli.results import ExportResult

__all__ = ["ExportConfig", "ExportResult", "export_model"]


def export_model(
    model: nn.Module,
    *,
    input_shape: Sequence[int],
    document: Mapping[str, Any] | None,
    config: ExportConfig,
    real_inputs: torch.Tensor | None = None,
    arch: ArchSpec | str | None = None,
    inputs: tuple[Path, ...] = (),
    import_paths: tuple[Path, ...] = (),
) -> ExportResult:
    """Write ``model`` as ``config.format`` atomically, after checking and (``config.verify``) verifying it.

    The model is copied to CPU/fp32 in eval mode; the caller's model is not touched.

    Args:
        input_shape: one example's shape without the batch axis, e.g. (3, 224, 224).
        document: the prunecli slim document of the model (``read_slim_metadata``), or None for a
            plain model; it becomes the ONNX metadata_props and the safetensors metadata.
        real_inputs: a batch of real, already normalised images (N x input_shape) verified besides
            the random inputs.
        arch: the base architecture, needed for ``safetensors`` when there is no document.
        inputs: source files the output must not overwrite.
        import_paths: folders where a ``pkg.module:factory`` architecture is found, to reload a safetensors copy.

    Raises:
        ExportError: bad output path, exporter failure, opset the exporter does not support, a checker
            failure, or outputs differing from PyTorch by more than ``config.atol``. No file is left behind.
        DataError: ``real_inputs`` of the wrong shape.
    """
    started = time.perf_counter()
    input_shape = tuple(int(d) for d in input_shape)
    if real_inputs is not None:
        real_batches(real_inputs, input_shape, REAL_CHUNK)  # fail on bad data before any work
    model = copy.deepcopy(model).to("cpu", torch.float32).eval()
    with atomic_output(config.output, force=config.force, inputs=tuple(Path(p) for p in inputs)) as tmp:
        if config.format == "onnx":
            config = name_outputs(model, random_batches(input_shape, [1])[0], config)
            details = write_onnx(model, tmp, input_shape, document, config, real_inputs)
        elif config.format == "safetensors":
            details = write_safetensors(model, tmp, input_shape, document, arch, config, real_inputs, import_paths)
        else:
            details = write_torchscript(model, tmp, input_shape, config, real_inputs)
    return ExportResult(
        format=config.format,
        output=str(config.output),
        exporter=details["exporter"],
        fallback_reason=details.get("fallback_reason"),
        opset=details.get("opset"),
        dynamic_batch=config.dynamic_batch,
        dtype=config.dtype,
        input_names=config.input_names if config.format == "onnx" else (),
        output_names=config.output_names if config.format == "onnx" else (),
        verification=details["verification"],
        file_size=config.output.stat().st_size,
        seconds=time.perf_counter() - started,
        notes=details.get("notes", []),
    )
