"""Parity of a written artifact with the PyTorch model, on seeded random and real inputs."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from prunecli.errors import DataError, ExportError
from prunecli.export.config import DTYPES, ExportConfig
from prunecli.outputs import output_tensors
from prunecli.results import Parity, Verification

REAL_CHUNK = 16  # real images per onnxruntime/torch call when the batch axis is dynamic
_SEED = 1234  # random verification inputs are reproducible
CAST_EPS = 8  # a cast to fp16/bf16 may move the outputs by this many of its machine epsilons (see cast_tolerance)


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


def cast_tolerance(dtype: torch.dtype) -> float:
    """The largest output change a cast of the weights to ``dtype`` may make, relative to the largest output of
    the fp32 model: ``CAST_EPS`` (8) times the dtype's machine epsilon, 0.0078 for fp16 and 0.0625 for bf16.

    Why 8 eps: rounding to nearest moves every weight, and every activation the cast model then computes in
    ``dtype``, by at most u = eps/2 of itself. These roundings are independent and add in quadrature (the
    probabilistic rounding-error analysis of Higham and Mary, SIAM J. Sci. Comput. 41(5), 2019), so n of them
    on the way to the output move it by about sqrt(n) u of its scale; 8 eps = 16 u is n = 256, more than the
    weight and activation roundings on any path of a ResNet-50. Measured: 0.07 to 2.0 eps on ResNet-20,
    MobileNetV2 (trained) and ResNet-18/50 (random weights) in fp16 and bf16. A cast that breaks the model is
    far above it: fp16 turns values beyond 65504 into inf and flushes values below 6e-8 to zero, which moved
    the logits of randomly initialised MobileNetV3 and EfficientNet (near 1e-9) by 1024 and 55 eps.
    """
    return CAST_EPS * torch.finfo(dtype).eps


def check_cast(
    cast: nn.Module, original: nn.Module, dtype: str, input_shape: Sequence[int], real_inputs: torch.Tensor | None
) -> Parity:
    """Compare the model cast to ``dtype`` (run in that dtype) with the fp32 ``original`` on the seeded random
    inputs (and the real ones); raise ExportError when it moves the outputs by more than :func:`cast_tolerance`."""
    inputs = [*random_batches(input_shape, (1, 3)), *real_batches(real_inputs, input_shape, REAL_CHUNK)]
    parity = compare(torch_runner(cast), torch_runner(original), inputs, f"the {dtype} model")
    tolerance = cast_tolerance(DTYPES[dtype])
    if not parity.max_rel <= tolerance:  # also fails a NaN
        other = "bf16 (fp16 ends at 65504 and loses values below 6e-8) or fp32" if dtype == "fp16" else "fp16 or fp32"
        raise ExportError(
            f"the cast to {dtype} moves the outputs by max abs {parity.max_abs:.3g}, {parity.max_rel:.3g} of their "
            f"largest value, above the {tolerance:.3g} ({CAST_EPS} x {dtype} eps) a {dtype} cast may; nothing was "
            f"written (try --dtype {other}, or --no-verify to write it anyway)"
        )
    return parity
