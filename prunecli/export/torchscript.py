"""TorchScript export: ``torch.jit.trace``, saved, reloaded with ``torch.jit.load`` and compared."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from prunecli.errors import ExportError, first_line, one_line
from prunecli.export.verify import REAL_CHUNK, random_batches, torch_runner, verify
from prunecli.io.files import write_through_memory


def write_torchscript(model, tmp: Path, input_shape, config, real_inputs) -> dict[str, Any]:
    example = random_batches(input_shape, [2 if config.dynamic_batch else 1])[0]
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        try:
            traced = torch.jit.trace(model, example, check_trace=False)
        except Exception as exc:
            raise ExportError(f"torch.jit.trace cannot trace the model ({one_line(exc)}); export --format onnx") from exc
        write_through_memory(tmp, lambda buffer: torch.jit.save(traced, buffer))
    notes = sorted(
        {
            f"torch.jit.trace: {first_line(w.message, 160)}"
            for w in caught
            if not issubclass(w.category, DeprecationWarning | FutureWarning)
        }
    )
    verification = None
    if config.verify:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
            loaded = torch.jit.load(str(tmp), map_location="cpu")
        verification = verify(
            "the TorchScript model", f"torch.jit.load (torch {torch.__version__})", torch_runner(loaded),
            torch_runner(model), input_shape, config, real_inputs, REAL_CHUNK if config.dynamic_batch else 1,
        )
    return {"exporter": "torch.jit.trace", "verification": verification, "notes": notes}
