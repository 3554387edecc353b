"""Latency: median milliseconds of a forward pass under PyTorch eager and onnxruntime, and the measured speedup of
a slim model beside the MACs ratio that promised it (``analyze --latency``, ``prune --latency``)."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunecli.errors import ExportError
from prunecli.export.onnx import onnx_bytes, ort_session
from prunecli.export.verify import random_batches
from prunecli.results import LatencyComparison, LatencyRow
from prunecli.runtime import model_device

RUNTIMES = ("torch", "onnxruntime")
_clock = time.perf_counter  # latency's timer (a seam for tests)


def _medians_ms(runs: Sequence[Callable[[], Any]], warmup: int, repeats: int) -> list[float]:
    """Median milliseconds of each of ``runs`` after ``warmup`` untimed calls; the runs alternate within each
    repeat, so a change of load on the machine hits all of them alike."""
    for run in runs:
        for _ in range(warmup):
            run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, spent in zip(runs, times, strict=True):
            start = _clock()
            run()
            spent.append(_clock() - start)
    return [1000 * statistics.median(spent) for spent in times]


def latency(
    model: nn.Module | str | Path | bytes,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 16),
    warmup: int = 3,
    repeats: int = 10,
    runtime: str = "torch",
    threads: int | None = None,
) -> dict[int, float]:
    """Median milliseconds of one forward pass per batch size, after ``warmup`` untimed runs.

    Args:
        model: an ``nn.Module`` (both runtimes; for onnxruntime it is exported in memory with a dynamic
            batch) or, for onnxruntime, an ONNX file path or its bytes.
        runtime: "torch" (eager, on the model's device, ``inference_mode``) or "onnxruntime"
            (CPUExecutionProvider).
        threads: intra-op threads; onnxruntime defaults to the CPU count, torch keeps its own setting
            unless given.
    """
    with _runners(model, input_shape, batch_sizes, warmup, repeats, runtime, threads) as runs:
        return {batch: _medians_ms([run], warmup, repeats)[0] for batch, run in runs.items()}


@contextlib.contextmanager
def _runners(model, input_shape, batch_sizes, warmup, repeats, runtime, threads) -> Iterator[dict[int, Callable[[], Any]]]:
    """One forward pass per batch size as a callable (synchronised on CUDA), inside the runtime's settings."""
    if runtime not in RUNTIMES:
        raise ExportError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if warmup < 0 or repeats < 1 or not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ExportError("latency needs warmup >= 0, repeats >= 1 and batch sizes >= 1")
    input_shape = tuple(int(d) for d in input_shape)
    inputs = {int(b): x for b, x in zip(batch_sizes, random_batches(input_shape, batch_sizes), strict=True)}
    if runtime == "torch":
        if not isinstance(model, nn.Module):
            raise ExportError("runtime 'torch' times an nn.Module; time ONNX files with runtime 'onnxruntime'")
        with _torch_settings(model, threads):
            yield _torch_runners(model, inputs)
        return
    if isinstance(model, nn.Module):
        model = onnx_bytes(model, input_shape)
    session = ort_session(str(model) if isinstance(model, str | Path) else model, threads)
    name = session.get_inputs()[0].name
    fixed = session.get_inputs()[0].shape[0]
    for batch in inputs:
        if isinstance(fixed, int) and fixed != batch:
            raise ExportError(
                f"the ONNX model has a fixed batch of {fixed}; re-export it with --dynamic-batch to time batch {batch}"
            )

    def runner(x: torch.Tensor) -> Callable[[], Any]:
        feed = {name: x.numpy()}
        return lambda: session.run(None, feed)

    yield {batch: runner(x) for batch, x in inputs.items()}


@contextlib.contextmanager
def _torch_settings(model: nn.Module, threads: int | None) -> Iterator[None]:
    """Eval mode, ``threads`` and ``inference_mode`` while timing; the model's mode and the thread count restored."""
    was_training, previous_threads = model.training, torch.get_num_threads()
    model.eval()
    if threads:
        torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)
        torch.set_num_threads(previous_threads)


def _torch_runners(model: nn.Module, inputs: dict[int, torch.Tensor]) -> dict[int, Callable[[], Any]]:
    parameter = next(iter(model.parameters()), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def runner(x: torch.Tensor) -> Callable[[], Any]:
        return lambda: (model(x), sync())

    return {batch: runner(x.to(device, dtype)) for batch, x in inputs.items()}


def compare_latency(
    original: nn.Module,
    slim: nn.Module,
    input_shape: Sequence[int],
    *,
    batch_sizes: Sequence[int] = (1, 16),
    warmup: int = 3,
    repeats: int = 10,
    runtimes: Sequence[str] = RUNTIMES,
    threads: int | None = None,
) -> LatencyComparison:
    """Time ``original`` and ``slim`` under each runtime and batch size (``--latency --compare``), their runs
    alternating, so the speedup is a ratio of medians taken under the same load."""
    from prunecli.measure import layer_costs

    input_shape = tuple(int(d) for d in input_shape)
    example = random_batches(input_shape, [1])[0]
    macs = [sum(c.macs for c in layer_costs(m, example.to(model_device(m)))) for m in (original, slim)]
    rows = []
    for runtime in runtimes:
        with (_runners(original, input_shape, batch_sizes, warmup, repeats, runtime, threads) as before,
              _runners(slim, input_shape, batch_sizes, warmup, repeats, runtime, threads) as after):
            for batch in before:
                old, new = _medians_ms([before[batch], after[batch]], warmup, repeats)
                rows.append(LatencyRow(runtime, batch, old, new, old / new))
    return LatencyComparison(input_shape, rows, macs[0], macs[1], macs[0] / max(macs[1], 1), warmup, repeats)
