"""Parity of a written artifact with the PyTorch model, on seeded random and real inputs."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from prunecli.errors import DataError, ExportError
from prunecli.export.config import ExportConfig
from prunecli.outputs import output_tensors
from prunecli.results import Parity, Verification

# slim-document keys that ``save_slim`` regenerates from the model itself
REAL_CHUNK = 16  # real images per onnxruntime/torch call when the batch axis is dynamic
_SEED = 1234  # random verification inputs are reproducible


def random_batches(input_shape: Sequence[int], batches: Sequence[int]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(_SEED)
    return [torch.randn((b, *input_shape), generator=generator) for b in batches]


def real_batches(real: torch.Tensor | None, input_shape: Sequence[int], chunk: int) -> list[torch.Tensor]:
    if real is None:
        return []
    real = real.detach().to("cpu", torch.float32)
    if tuple(real.shape[1:]) != tuple(input_shape) or real.dim() != len(input_shape) + 1 or len(real) == 0:
        raise DataError(
            f"the real images have shape {tuple(real.shape)} but the model takes N x {'x'.join(map(str, input_shape))}; "
            "pass data that matches --input-shape"
        )
    return list(real.split(chunk))


def _nanmax(a: float, b: float) -> float:
    """``max`` that keeps a NaN (a NaN output must fail the parity check, not vanish in ``max``)."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


class _Tracker:
    """Accumulates the largest differences between pairs of output lists."""

    def __init__(self):
        self.max_abs, self.scale, self.batches = 0.0, 0.0, []

    def add(self, got: list[torch.Tensor], want: list[torch.Tensor], batch: int, what: str) -> None:
        if len(got) != len(want):
            raise ExportError(f"{what} returns {len(got)} outputs but the PyTorch model {len(want)}")
        for g, w in zip(got, want, strict=True):
            g, w = g.detach().to("cpu", torch.float64), w.detach().to("cpu", torch.float64)
            if g.shape != w.shape:
                raise ExportError(
                    f"{what} gives an output of shape {tuple(g.shape)} at batch {batch}, PyTorch {tuple(w.shape)}; "
                    "the batch axis is not exported as dynamic or the trace specialised a shape"
                )
            if g.numel():
                self.max_abs = _nanmax(self.max_abs, float((g - w).abs().max()))
                self.scale = _nanmax(self.scale, float(w.abs().max()))
        self.batches.append(batch)

    def parity(self) -> Parity:
        return Parity(self.max_abs, self.max_abs / max(self.scale, 1e-12), tuple(self.batches))


def compare(
    run: Callable[[torch.Tensor], list[torch.Tensor]],
    reference: Callable[[torch.Tensor], list[torch.Tensor]],
    inputs: Iterable[torch.Tensor],
    what: str,
) -> Parity | None:
    tracker = _Tracker()
    for x in inputs:
        tracker.add(run(x), reference(x), len(x), what)
    return tracker.parity() if tracker.batches else None


def torch_runner(model: nn.Module) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    def run(x: torch.Tensor) -> list[torch.Tensor]:
        parameter = next(iter(model.parameters()), None)
        dtype = parameter.dtype if parameter is not None else torch.float32
        with torch.no_grad():
            return [t.float() for t in output_tensors(model(x.to(dtype)))]

    return run


def verify(
    what: str,
    runtime: str,
    run: Callable[[torch.Tensor], list[torch.Tensor]],
    reference: Callable[[torch.Tensor], list[torch.Tensor]],
    input_shape: Sequence[int],
    config: ExportConfig,
    real_inputs: torch.Tensor | None,
    real_chunk: int,
) -> Verification:
    """Compare ``run`` with ``reference`` on random (and real) inputs; raise ExportError above ``atol``."""
    batches = (1, 3) if config.dynamic_batch else (1, 1)
    random = compare(run, reference, random_batches(input_shape, batches), what)
    real = compare(run, reference, real_batches(real_inputs, input_shape, real_chunk), what)
    for label, parity in (("random", random), ("real", real)):
        if parity is not None and not parity.max_abs <= config.atol:
            raise ExportError(
                f"{what} differs from the PyTorch model by max abs {parity.max_abs:.3g} (relative {parity.max_rel:.3g}) "
                f"on {label} inputs, above --atol {config.atol:g}; nothing was written (look for Python-side state or "
                "data-dependent control flow the tracer cannot capture, or try the other --exporter)"
            )
    return Verification(runtime, config.atol, random, real, True)
