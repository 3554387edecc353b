"""ONNX export, checked with onnx.checker and compared under onnxruntime before ``export_model`` puts it in place.

ONNX exporter choice. ``dynamo`` is ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript,
opsets 18-23 in torch 2.14); ``legacy`` is the TorchScript-based ``dynamo=False`` exporter (opsets 7-20).
``auto`` prefers **legacy** and falls back to dynamo when legacy fails (or when the requested opset is
above what legacy supports), recording the reason. Measured with torch 2.14.1 on CPU (2 cores shared
with other jobs, warm process, dynamic batch, export only): unpruned torchvision models at 3x64x64,
resnet18 legacy 2.5-2.9 s vs dynamo 10-13 s, mobilenet_v2 5.4-6.4 s vs 31-41 s, efficientnet_b0
7.7-8.9 s vs 42-44 s; the same models pruned to 50% MACs through ``export_model``, resnet18 3.4-4.2 s vs
26-27 s, mobilenet_v2 4.6-5.0 s vs 32-35 s, efficientnet_b0 4.5-5.2 s vs 20-23 s; resnet20 (1x28x28)
2.6 s vs 8-20 s. Both exporters match PyTorch to a relative 1e-6 on all of them (onnxruntime 1.32), so
for the CNNs prunecli targets the 4-8x faster legacy path is the better default; dynamo stays one flag
away and takes over automatically where legacy cannot export a model (or is gone from a future torch).
Dynamo's batch axis is traced from an example batch of 2, since torch.export specialises a batch of 1.

onnx and onnxruntime are imported inside the functions that need them, so ``import prunecli`` stays light.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunecli._version import __version__
from prunecli.errors import ExportError, first_line, one_line
from prunecli.export.config import DEFAULT_OUTPUT_NAMES, METADATA_PREFIX, ExportConfig
from prunecli.export.verify import REAL_CHUNK, random_batches, torch_runner, verify
from prunecli.outputs import output_tensors
from prunecli.runtime import cpu_count


def _opset_ranges() -> dict[str, tuple[int, int]]:
    """Opsets each exporter of the installed torch can write."""
    try:
        from torch.onnx import _constants as legacy_constants

        legacy = (int(legacy_constants.ONNX_MIN_OPSET), int(legacy_constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET))
        top = int(legacy_constants.ONNX_MAX_OPSET)
    except (ImportError, AttributeError):
        legacy, top = (7, 20), 23
    try:
        from torch.onnx._internal.exporter import _constants as dynamo_constants

        bottom = int(dynamo_constants.TORCHLIB_OPSET)
    except (ImportError, AttributeError):
        bottom = 18
    return {"legacy": legacy, "dynamo": (bottom, top)}


def _exporter_plan(exporter: str, opset: int | None) -> tuple[list[str], str | None]:
    """The exporters to try in order, and why ``auto`` skips its preferred one (or None)."""
    ranges = _opset_ranges()
    fits = {name: opset is None or lo <= opset <= hi for name, (lo, hi) in ranges.items()}
    described = ", ".join(f"{name} {lo}-{hi}" for name, (lo, hi) in ranges.items())
    if exporter != "auto":
        if not fits[exporter]:
            other = next(name for name in ranges if name != exporter)
            hint = f"; use --exporter {other}" if fits[other] else ""
            lo, hi = ranges[exporter]
            raise ExportError(
                f"--opset {opset} is not supported by the {exporter} exporter of torch {torch.__version__} "
                f"(opsets {lo}-{hi}){hint}"
            )
        return [exporter], None
    order = [name for name in ("legacy", "dynamo") if fits[name]]
    if not order:
        low = min(lo for lo, _ in ranges.values())
        high = max(hi for _, hi in ranges.values())
        raise ExportError(
            f"--opset {opset} is not supported by torch {torch.__version__}: choose an opset from {low} to {high} "
            f"({described})"
        )
    legacy_top = ranges["legacy"][1]
    note = None if order[0] == "legacy" else f"opset {opset} is above the legacy exporter's {legacy_top}; used dynamo"
    return order, note


def _run_exporter(name: str, model: nn.Module, example: torch.Tensor, config: ExportConfig):
    """One torch.onnx.export call, in memory; returns the ModelProto and the warnings it raised."""
    import onnx

    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        if name == "legacy":
            axes = {n: {0: "batch"} for n in (*config.input_names, *config.output_names)} if config.dynamic_batch else None
            buffer = io.BytesIO()
            torch.onnx.export(
                model, (example,), buffer, dynamo=False, opset_version=config.opset,
                input_names=list(config.input_names), output_names=list(config.output_names), dynamic_axes=axes,
            )
            proto = onnx.load_from_string(buffer.getvalue())
        else:
            shapes = ({0: "batch"},) if config.dynamic_batch else None
            program = torch.onnx.export(
                model, (example,), dynamo=True, opset_version=config.opset, verbose=False, optimize=True,
                input_names=list(config.input_names), output_names=list(config.output_names), dynamic_shapes=shapes,
            )
            proto = program.model_proto
    notes = sorted(
        {
            f"{name} exporter: {first_line(w.message, 160)}"
            for w in caught
            if not issubclass(w.category, DeprecationWarning | FutureWarning)
        }
    )
    return proto, notes


def name_outputs(model: nn.Module, example: torch.Tensor, config: ExportConfig) -> ExportConfig:
    """A model with several outputs gets one graph output name each, all batch-dynamic: a dict's keys ("out"
    for segmentation; a detector's feature levels "0", "pool" become "output_0", "pool"), ``output_<i>`` for a
    tuple. Names given by the user,
    and the single ``logits`` of a classifier, stay as they are."""
    if config.output_names != DEFAULT_OUTPUT_NAMES:
        return config
    with torch.no_grad():
        output = model(example)
    count = len(output_tensors(output))
    if count == 1:
        return config
    keys = [str(k) for k in output] if isinstance(output, Mapping) and len(output) == count else []
    names = [k if k.isidentifier() else f"output_{k}" for k in keys]  # the legacy exporter refuses "0"
    return dataclasses.replace(config, output_names=tuple(names or (f"output_{i}" for i in range(count))))


def _export_onnx(model: nn.Module, example: torch.Tensor, config: ExportConfig):
    """Export with the planned exporter(s): (proto, exporter, fallback reason, notes)."""
    order, note = _exporter_plan(config.exporter, config.opset)
    failures = []
    for name in order:
        try:
            proto, notes = _run_exporter(name, model, example, config)
        except Exception as exc:  # any exporter failure is a reason to try the next one
            failures.append(f"the {name} exporter failed ({one_line(exc)})")
            continue
        reason = f"{failures[0]}; fell back to {name}" if failures else note
        return proto, name, reason, notes
    if config.exporter == "auto":
        raise ExportError("ONNX export failed: " + "; ".join(failures))
    other = "dynamo" if config.exporter == "legacy" else "legacy"
    raise ExportError(f"ONNX export failed: {failures[0]}; try --exporter {other}")


def _opset_of(proto) -> int | None:
    return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def provenance(document: Mapping[str, Any] | None, input_shape: Sequence[int], exporter: str) -> dict[str, str]:
    """The ``prunecli.*`` ONNX metadata_props: where the model came from and how it was pruned."""
    doc = dict(document or {})
    achieved, original = doc.get("achieved") or {}, doc.get("original") or {}
    arch = doc.get("arch") or {}
    budget = doc.get("budget")
    values = {
        "version": __version__,
        "exporter": exporter,
        "input_shape": "x".join(str(int(d)) for d in input_shape),
        "format": doc.get("format"),
        "format_version": doc.get("format_version"),
        "pruned_with": doc.get("prunecli_version"),
        "arch": arch.get("spec"),
        "arch_kwargs": arch.get("kwargs") or None,
        "method": doc.get("method"),
        "allocation": doc.get("allocation"),
        "budget": budget,
        "achieved_macs": achieved.get("macs"),
        "achieved_params": achieved.get("params"),
        "original_macs": original.get("macs"),
        "original_params": original.get("params"),
        "source_sha256": doc.get("source_sha256"),
        "seed": doc.get("seed"),
        "mean": doc.get("mean"),
        "std": doc.get("std"),
        "num_classes": doc.get("num_classes"),
        "dataset": doc.get("dataset"),
        "test_accuracy": doc.get("test_accuracy"),
    }
    return {METADATA_PREFIX + key: _text(value) for key, value in sorted(values.items()) if value is not None}


def _set_metadata(proto, props: Mapping[str, str]) -> None:
    kept = [(p.key, p.value) for p in proto.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    del proto.metadata_props[:]
    for key, value in [*kept, *props.items()]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def _check_dynamic(proto, config: ExportConfig) -> None:
    first = proto.graph.input[0].type.tensor_type.shape.dim
    if config.dynamic_batch and (not first or first[0].HasField("dim_value")):
        raise ExportError("the exporter did not make the batch axis dynamic; try the other --exporter")


def ort_session(model: str | bytes, threads: int | None = None, timed: bool = False):
    """An onnxruntime CPU session. ``timed``: its worker threads stop spinning when a run ends. Timing alternates two
    sessions, and one session's workers, still spinning for more work, took the cores from the other's run
    (2 threads, one process: ResNet-18 8.4 ms alone, 17-18 ms alternating with a twin; MobileNetV2 2.6 and 4-8 ms).
    Stopping the spin at the end of each run keeps it within the run, as deployed: 8.8 and 2.4 ms alternating.
    Not spinning at all (``allow_spinning`` 0) wakes the workers for every op and costs small models up to 1.9x."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or cpu_count()
    options.log_severity_level = 3
    if timed:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"onnxruntime {ort.__version__} cannot load the ONNX model ({one_line(exc)})") from exc


def _ort_runner(session) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        try:
            outputs = session.run(None, {name: x.detach().cpu().float().numpy()})
        except Exception as exc:
            raise ExportError(f"onnxruntime cannot run the exported model at batch {len(x)} ({one_line(exc)})") from exc
        return [torch.from_numpy(o) for o in outputs]

    return run


def write_onnx(model, tmp: Path, input_shape, document, config, real_inputs) -> dict[str, Any]:
    import onnx

    example = random_batches(input_shape, [2 if config.dynamic_batch else 1])[0]
    proto, exporter, reason, notes = _export_onnx(model, example, config)
    opset = _opset_of(proto)
    if config.opset is not None and opset != config.opset:
        raise ExportError(
            f"the {exporter} exporter wrote opset {opset}, not the requested --opset {config.opset}; "
            "choose another --opset or --exporter"
        )
    _check_dynamic(proto, config)
    _set_metadata(proto, provenance(document, input_shape, exporter))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise ExportError(
            f"the exported ONNX model fails onnx.checker ({one_line(exc)}); try the other --exporter"
        ) from exc
    try:
        data = proto.SerializeToString()
    except ValueError as exc:  # protobuf's 2 GB limit
        raise ExportError(f"the model is too large for a single-file ONNX ({one_line(exc)})") from exc
    tmp.write_bytes(data)
    verification = None
    if config.verify:
        import onnxruntime as ort

        verification = verify(
            "the ONNX model", f"onnxruntime {ort.__version__} (CPUExecutionProvider)",
            _ort_runner(ort_session(str(tmp))), torch_runner(model), input_shape, config, real_inputs,
            REAL_CHUNK if config.dynamic_batch else 1,
        )
    return {"exporter": exporter, "fallback_reason": reason, "opset": opset, "verification": verification, "notes": notes}


def onnx_bytes(
    model: nn.Module, input_shape: Sequence[int], *, exporter: str = "auto", opset: int | None = None
) -> bytes:
    """A batch-dynamic ONNX model in memory (no file, no verification), e.g. for onnxruntime latency."""
    config = ExportConfig("onnx", Path("memory.onnx"), opset=opset, dynamic_batch=True, exporter=exporter, verify=False)
    model = copy.deepcopy(model).to("cpu", torch.float32).eval()
    example = random_batches(input_shape, [2])[0]
    proto = _export_onnx(model, example, name_outputs(model, example, config))[0]
    return proto.SerializeToString()
