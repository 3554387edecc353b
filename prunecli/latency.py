"""Latency: median milliseconds of a forward pass under PyTorch eager and onnxruntime, the measured speedup of
a slim model beside the MACs ratio that promised it (``analyze --latency``, ``prune --latency``), and the timings
``prune --latency-target`` builds on: one layer alone (for ``prunecli.latency_model``'s tables) and slim models
against their original."""

from __future__ import annotations

import contextlib
import copy
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
from prunecli.latency_model import LayerSpec, TimingKey
from prunecli.results import LatencyComparison, LatencyRow
from prunecli.runtime import cpu_count, model_device

RUNTIMES = ("torch", "onnxruntime")
MODEL_SECONDS = 0.25  # the least time a whole model is timed for in one measurement
LAYER_SECONDS = 0.02  # the same for one layer of a latency table (hundreds are timed, once, then cached)
MAX_REPEATS = 2000
_clock = time.perf_counter  # latency's timer (a seam for tests)


def _medians_ms(runs: Sequence[Callable[[], Any]], warmup: int, repeats: int, seconds: float) -> list[float]:
    """Median milliseconds of each of ``runs`` after ``warmup`` untimed calls. The runs alternate within each
    round, so a change of load on the machine hits all of them alike; rounds go on past ``repeats`` until they
    took ``seconds`` a run (at most ``MAX_REPEATS``): a model that runs in a fraction of a millisecond gets
    hundreds of rounds, whose median a busy machine's stalls cannot move."""
    for run in runs:
        for _ in range(warmup):
            run()
    times: list[list[float]] = [[] for _ in runs]
    spent_total = 0.0
    while len(times[0]) < repeats or (spent_total < seconds * len(runs) and len(times[0]) < MAX_REPEATS):
        for run, spent in zip(runs, times, strict=True):
            start = _clock()
            run()
            spent.append(_clock() - start)
            spent_total += spent[-1]
    return [1000 * statistics.median(spent) for spent in times]


def latency(
    model: nn.Module | str | Path | bytes,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 16),
    warmup: int = 3,
    repeats: int = 10,
    runtime: str = "torch",
    threads: int | None = None,
    seconds: float = MODEL_SECONDS,
) -> dict[int, float]:
    """Median milliseconds of one forward pass per batch size, after ``warmup`` untimed runs.

    Args:
        model: an ``nn.Module`` (both runtimes; for onnxruntime it is exported in memory with a dynamic
            batch) or, for onnxruntime, an ONNX file path or its bytes.
        runtime: "torch" (eager, on the model's device, ``inference_mode``) or "onnxruntime"
            (CPUExecutionProvider).
        threads: intra-op threads; onnxruntime defaults to the CPU count, torch keeps its own setting
            unless given.
        seconds: the least time each batch size is timed for (more rounds than ``repeats`` when they are quick).
    """
    with _runners(model, input_shape, batch_sizes, warmup, repeats, runtime, threads) as runs:
        return {batch: _medians_ms([run], warmup, repeats, seconds)[0] for batch, run in runs.items()}


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
    session = ort_session(str(model) if isinstance(model, str | Path) else model, threads, timed=True)
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
    seconds: float = MODEL_SECONDS,
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
                old, new = _medians_ms([before[batch], after[batch]], warmup, repeats, seconds)
                rows.append(LatencyRow(runtime, batch, old, new, old / new))
    return LatencyComparison(input_shape, rows, macs[0], macs[1], macs[0] / max(macs[1], 1), warmup, repeats)


# ----------------------------------------------------------------------------- --latency-target


def timing_key(runtime: str, device: torch.device, batch: int, threads: int | None) -> TimingKey:
    """The key of the latency tables measured with these settings (the thread count resolved as the runtime
    resolves it, the runtime's version included: an upgrade re-measures)."""
    if runtime == "onnxruntime":
        import onnxruntime

        return TimingKey(runtime, onnxruntime.__version__, "cpu", batch, threads or cpu_count())
    return TimingKey(runtime, torch.__version__, str(device), batch, threads or torch.get_num_threads())


def layer_module(spec: LayerSpec) -> nn.Module:
    """The layer of ``spec`` alone, with seeded random weights."""
    torch.manual_seed(0)
    if spec.kind == "linear":
        return nn.Linear(spec.in_channels, spec.out_channels, bias=spec.bias)
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[len(spec.kernel) - 1]
    return conv(spec.in_channels, spec.out_channels, spec.kernel, spec.stride, spec.padding, spec.dilation,
                spec.groups, spec.bias)


def _layer_onnx(spec: LayerSpec, batch: int) -> bytes:
    """One Conv (or MatMul + Add) node with random weights, built directly: exporting a module per grid point
    would take longer than timing it."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes = []
    if spec.kind == "linear":
        weights = [rng.standard_normal((spec.in_channels, spec.out_channels), dtype=np.float32)]
        nodes.append(helper.make_node("MatMul", ["X", "W"], ["Y" if not spec.bias else "XW"]))
        if spec.bias:
            weights.append(rng.standard_normal(spec.out_channels, dtype=np.float32))
            nodes.append(helper.make_node("Add", ["XW", "B"], ["Y"]))
    else:
        weights = [rng.standard_normal((spec.out_channels, spec.in_channels // spec.groups, *spec.kernel),
                                       dtype=np.float32)]
        if spec.bias:
            weights.append(rng.standard_normal(spec.out_channels, dtype=np.float32))
        nodes.append(helper.make_node("Conv", ["X", "W", "B"][: 2 + spec.bias], ["Y"], kernel_shape=list(spec.kernel),
                                      strides=list(spec.stride), pads=[*spec.padding, *spec.padding],
                                      dilations=list(spec.dilation), group=spec.groups))
    initialisers = [numpy_helper.from_array(w, n) for w, n in zip(weights, ("W", "B"), strict=False)]
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [batch, *spec.input_shape])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "layer", [x], [y], initialisers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def layer_timer(runtime: str, device: torch.device, batch: int, threads: int | None, warmup: int,
                repeats: int) -> Callable[[LayerSpec], float]:
    """spec -> median milliseconds of that layer alone at ``batch`` under ``runtime`` (torch on ``device``)."""

    def measure(spec: LayerSpec) -> float:
        if runtime == "onnxruntime":
            model: nn.Module | bytes = _layer_onnx(spec, batch)
        else:
            model = layer_module(spec).to(device)
        with _runners(model, spec.input_shape, (batch,), warmup, repeats, runtime, threads) as runs:
            return _medians_ms([runs[batch]], warmup, repeats, LAYER_SECONDS)[0]

    return measure


def latency_meter(original: nn.Module, input_shape: Sequence[int], runtime: str, device: torch.device, batch: int,
                  threads: int | None, warmup: int, repeats: int) -> Callable[..., list[float]]:
    """``measure(*slim_models)`` -> milliseconds of the original and of each, their runs alternating so all see
    the same load; the original is prepared once (exported, or moved to ``device``) for every call. Nothing is
    held between calls (torch's ``inference_mode`` would stop the tracer from following the next slim model)."""

    def place(model: nn.Module) -> nn.Module:
        return copy.deepcopy(model).to(device) if runtime == "torch" and device.type != "cpu" else model

    prepared = onnx_bytes(original, input_shape) if runtime == "onnxruntime" else place(original)

    def measure(*slim: nn.Module) -> list[float]:
        with contextlib.ExitStack() as stack:
            runs = [stack.enter_context(_runners(model, input_shape, (batch,), warmup, repeats, runtime, threads))[batch]
                    for model in (prepared, *map(place, slim))]
            return _medians_ms(runs, warmup, repeats, MODEL_SECONDS)

    return measure
