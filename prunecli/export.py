"""Deployable artifacts of a (pruned) model: ONNX, a re-written slim safetensors, TorchScript; and latency.

Every file is written through :func:`prunecli.io.files.atomic_output`: it is produced in a temporary
file beside the target, checked, run and compared with the PyTorch model, and only then renamed into
place. A failed export or a failed parity check therefore leaves no file behind (and an existing file
untouched).

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

import contextlib
import copy
import dataclasses
import io
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunecli._version import __version__
from prunecli.errors import DataError, ExportError
from prunecli.io.arch import ArchSpec
from prunecli.io.files import atomic_output, check_suffix, write_through_memory
from prunecli.runtime import cpu_count, model_device

FORMATS = ("onnx", "safetensors", "torchscript")
EXPORTERS = ("auto", "dynamo", "legacy")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SUFFIXES = {"onnx": (".onnx",), "safetensors": (".safetensors",), "torchscript": (".pt", ".ts")}
RUNTIMES = ("torch", "onnxruntime")
METADATA_PREFIX = "prunecli."
# slim-document keys that ``save_slim`` regenerates from the model itself
_REAL_CHUNK = 16  # real images per onnxruntime/torch call when the batch axis is dynamic
_SEED = 1234  # random verification inputs are reproducible
_clock = time.perf_counter  # latency's timer (a seam for tests)


# ----------------------------------------------------------------------------- config and results


@dataclass(frozen=True)
class ExportConfig:
    """What to write and how. Validated on construction (``ExportError`` with the option to fix).

    Args:
        format: "onnx", "safetensors" or "torchscript".
        output: the file to write; its extension must match the format (.onnx, .safetensors, .pt/.ts).
        opset: ONNX opset; None takes the exporter's default (20 in torch 2.14).
        dynamic_batch: ONNX/TorchScript: make (and verify) the batch axis dynamic (checked at batch 1 and 3).
        exporter: ONNX exporter, "auto", "dynamo" or "legacy" (see the module docstring for what auto picks).
        verify: run the written artifact and compare it with the PyTorch model before it is put in place.
        atol: largest allowed max-abs difference in that comparison.
        dtype: safetensors only: store the weights as "fp32", "fp16" or "bf16".
        force: overwrite an existing output file.
        input_names, output_names: ONNX graph input/output names.
    """

    format: str
    output: Path
    opset: int | None = None
    dynamic_batch: bool = False
    exporter: str = "auto"
    verify: bool = True
    atol: float = 1e-4
    dtype: str = "fp32"
    force: bool = False
    input_names: tuple[str, ...] = ("input",)
    output_names: tuple[str, ...] = ("logits",)

    def __post_init__(self):
        object.__setattr__(self, "output", Path(self.output))
        object.__setattr__(self, "input_names", tuple(self.input_names))
        object.__setattr__(self, "output_names", tuple(self.output_names))
        if self.format not in FORMATS:
            raise ExportError(f"unknown --format {self.format!r}; choose one of {', '.join(FORMATS)}")
        check_suffix(self.output, SUFFIXES[self.format], f"--format {self.format}", " or pick the matching --format")
        if self.exporter not in EXPORTERS:
            raise ExportError(f"unknown --exporter {self.exporter!r}; choose one of {', '.join(EXPORTERS)}")
        if self.dtype not in DTYPES:
            raise ExportError(f"unknown --dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.format != "onnx" and (self.opset is not None or self.exporter != "auto"):
            raise ExportError(f"--opset and --exporter apply to --format onnx only, not {self.format}")
        if self.format != "safetensors" and self.dtype != "fp32":
            raise ExportError(f"--dtype {self.dtype} applies to --format safetensors only; {self.format} is written in fp32")
        if self.format == "safetensors" and self.dynamic_batch:
            raise ExportError("--dynamic-batch applies to --format onnx and torchscript; safetensors has no batch axis")
        if self.opset is not None and (isinstance(self.opset, bool) or not isinstance(self.opset, int) or self.opset < 1):
            raise ExportError(f"--opset {self.opset!r} must be a positive integer such as 17 or 18")
        if not self.atol >= 0:  # also rejects NaN
            raise ExportError(f"--atol {self.atol} must be zero or positive")
        if not self.input_names or not self.output_names:
            raise ExportError("input and output names must not be empty")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["output"] = str(self.output)
        data["input_names"] = list(self.input_names)
        data["output_names"] = list(self.output_names)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExportConfig:
        return cls(**{**data, "output": Path(data["output"])})


@dataclass(frozen=True)
class Parity:
    """Largest differences between an artifact's outputs and the reference model's, over all runs.

    ``max_rel`` is ``max_abs`` divided by the largest reference magnitude (element-wise relative errors
    explode near zero and say little about logits).
    """

    max_abs: float
    max_rel: float
    batches: tuple[int, ...]  # the batch size of each compared run

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Verification:
    """How the written artifact compares with the PyTorch model (``passed``: every max_abs <= atol).

    ``cast`` (safetensors fp16/bf16 only) is what the dtype cast itself costs against the fp32 model; it
    is informational: the pass/fail check compares the reloaded file with the cast model.
    """

    runtime: str
    atol: float
    random: Parity
    real: Parity | None
    passed: bool
    cast: Parity | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ExportResult:
    format: str
    output: str
    exporter: str  # "legacy"/"dynamo" (onnx), "torch.jit.trace", "safetensors"
    fallback_reason: str | None  # why ``auto`` did not use its first choice, one line
    opset: int | None
    dynamic_batch: bool
    dtype: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    verification: Verification | None
    file_size: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- helpers


def _one_line(exc: BaseException, limit: int = 200) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    text = text[:limit] + ("..." if len(text) > limit else "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _flatten(output: Any) -> list[torch.Tensor]:
    """The tensors of a model output (a tensor, or a tuple/list/dict of them), in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, list | tuple):
        return [t for item in output for t in _flatten(item)]
    raise ExportError(f"the model returns a {type(output).__name__}; only tensors (or tuples/dicts of them) export")


def _random_batches(input_shape: Sequence[int], batches: Sequence[int]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(_SEED)
    return [torch.randn((b, *input_shape), generator=generator) for b in batches]


def _real_batches(real: torch.Tensor | None, input_shape: Sequence[int], chunk: int) -> list[torch.Tensor]:
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


def _compare(
    run: Callable[[torch.Tensor], list[torch.Tensor]],
    reference: Callable[[torch.Tensor], list[torch.Tensor]],
    inputs: Iterable[torch.Tensor],
    what: str,
) -> Parity | None:
    tracker = _Tracker()
    for x in inputs:
        tracker.add(run(x), reference(x), len(x), what)
    return tracker.parity() if tracker.batches else None


def _torch_runner(model: nn.Module) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    def run(x: torch.Tensor) -> list[torch.Tensor]:
        parameter = next(iter(model.parameters()), None)
        dtype = parameter.dtype if parameter is not None else torch.float32
        with torch.no_grad():
            return [t.float() for t in _flatten(model(x.to(dtype)))]

    return run


def _verify(
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
    random = _compare(run, reference, _random_batches(input_shape, batches), what)
    real = _compare(run, reference, _real_batches(real_inputs, input_shape, real_chunk), what)
    for label, parity in (("random", random), ("real", real)):
        if parity is not None and not parity.max_abs <= config.atol:
            raise ExportError(
                f"{what} differs from the PyTorch model by max abs {parity.max_abs:.3g} (relative {parity.max_rel:.3g}) "
                f"on {label} inputs, above --atol {config.atol:g}; nothing was written (look for Python-side state or "
                "data-dependent control flow the tracer cannot capture, or try the other --exporter)"
            )
    return Verification(runtime, config.atol, random, real, True)


# ----------------------------------------------------------------------------- ONNX


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
            f"{name} exporter: {str(w.message).splitlines()[0][:160]}"
            for w in caught
            if not issubclass(w.category, DeprecationWarning | FutureWarning)
        }
    )
    return proto, notes


def _export_onnx(model: nn.Module, example: torch.Tensor, config: ExportConfig):
    """Export with the planned exporter(s): (proto, exporter, fallback reason, notes)."""
    order, note = _exporter_plan(config.exporter, config.opset)
    failures = []
    for name in order:
        try:
            proto, notes = _run_exporter(name, model, example, config)
        except Exception as exc:  # any exporter failure is a reason to try the next one
            failures.append(f"the {name} exporter failed ({_one_line(exc)})")
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


def _ort_session(model: str | bytes, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or cpu_count()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"onnxruntime {ort.__version__} cannot load the ONNX model ({_one_line(exc)})") from exc


def _ort_runner(session) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        try:
            outputs = session.run(None, {name: x.detach().cpu().float().numpy()})
        except Exception as exc:
            raise ExportError(f"onnxruntime cannot run the exported model at batch {len(x)} ({_one_line(exc)})") from exc
        return [torch.from_numpy(o) for o in outputs]

    return run


def _write_onnx(model, tmp: Path, input_shape, document, config, real_inputs) -> dict[str, Any]:
    import onnx

    example = _random_batches(input_shape, [2 if config.dynamic_batch else 1])[0]
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
            f"the exported ONNX model fails onnx.checker ({_one_line(exc)}); try the other --exporter"
        ) from exc
    try:
        data = proto.SerializeToString()
    except ValueError as exc:  # protobuf's 2 GB limit
        raise ExportError(f"the model is too large for a single-file ONNX ({_one_line(exc)})") from exc
    tmp.write_bytes(data)
    verification = None
    if config.verify:
        import onnxruntime as ort

        verification = _verify(
            "the ONNX model", f"onnxruntime {ort.__version__} (CPUExecutionProvider)",
            _ort_runner(_ort_session(str(tmp))), _torch_runner(model), input_shape, config, real_inputs,
            _REAL_CHUNK if config.dynamic_batch else 1,
        )
    return {"exporter": exporter, "fallback_reason": reason, "opset": opset, "verification": verification, "notes": notes}


# ----------------------------------------------------------------------------- safetensors and TorchScript


def _write_safetensors(model, tmp: Path, input_shape, document, arch, config, real_inputs, import_paths) -> dict[str, Any]:
    from prunecli.io.slim import STRUCTURAL_KEYS, load, save_slim

    if document is not None and document.get("arch"):
        spec = ArchSpec.from_dict(document["arch"])
    elif arch is not None:
        spec = arch if isinstance(arch, ArchSpec) else ArchSpec(str(arch))
    else:
        raise ExportError(
            "--format safetensors needs the base architecture: export a prunecli slim model or give the --arch"
        )
    cast = copy.deepcopy(model).to(DTYPES[config.dtype])
    metadata = {k: v for k, v in (document or {}).items() if k not in STRUCTURAL_KEYS}
    metadata["dtype"] = config.dtype
    save_slim(cast, tmp, arch=spec, input_shape=tuple(input_shape), metadata=metadata, force=True)
    verification = None
    if config.verify:
        reloaded = load(tmp, trust_code=True, import_paths=import_paths)  # the architecture the source was built with
        dtype = next((p.dtype for p in reloaded.parameters()), torch.float32)
        rounded = copy.deepcopy(cast).to(dtype)  # the weights the file holds, in the dtype load gives back
        verification = _verify(
            "the reloaded safetensors model", "prunecli.load", _torch_runner(reloaded), _torch_runner(rounded),
            input_shape, config, real_inputs, _REAL_CHUNK,
        )
        if config.dtype != "fp32":
            original = copy.deepcopy(model).float()
            cast_error = _compare(
                _torch_runner(rounded), _torch_runner(original), _random_batches(input_shape, (1, 3)), "the cast model"
            )
            verification = dataclasses.replace(verification, cast=cast_error)
    return {"exporter": "safetensors", "verification": verification}


def _write_torchscript(model, tmp: Path, input_shape, config, real_inputs) -> dict[str, Any]:
    example = _random_batches(input_shape, [2 if config.dynamic_batch else 1])[0]
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        try:
            traced = torch.jit.trace(model, example, check_trace=False)
        except Exception as exc:
            raise ExportError(f"torch.jit.trace cannot trace the model ({_one_line(exc)}); export --format onnx") from exc
        write_through_memory(tmp, lambda buffer: torch.jit.save(traced, buffer))
    notes = sorted(
        {
            f"torch.jit.trace: {str(w.message).splitlines()[0][:160]}"
            for w in caught
            if not issubclass(w.category, DeprecationWarning | FutureWarning)
        }
    )
    verification = None
    if config.verify:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
            loaded = torch.jit.load(str(tmp), map_location="cpu")
        verification = _verify(
            "the TorchScript model", f"torch.jit.load (torch {torch.__version__})", _torch_runner(loaded),
            _torch_runner(model), input_shape, config, real_inputs, _REAL_CHUNK if config.dynamic_batch else 1,
        )
    return {"exporter": "torch.jit.trace", "verification": verification, "notes": notes}


# ----------------------------------------------------------------------------- export_model


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
        _real_batches(real_inputs, input_shape, _REAL_CHUNK)  # fail on bad data before any work
    model = copy.deepcopy(model).to("cpu", torch.float32).eval()
    with atomic_output(config.output, force=config.force, inputs=tuple(Path(p) for p in inputs)) as tmp:
        if config.format == "onnx":
            details = _write_onnx(model, tmp, input_shape, document, config, real_inputs)
        elif config.format == "safetensors":
            details = _write_safetensors(model, tmp, input_shape, document, arch, config, real_inputs, import_paths)
        else:
            details = _write_torchscript(model, tmp, input_shape, config, real_inputs)
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


def onnx_bytes(
    model: nn.Module, input_shape: Sequence[int], *, exporter: str = "auto", opset: int | None = None
) -> bytes:
    """A batch-dynamic ONNX model in memory (no file, no verification), e.g. for onnxruntime latency."""
    config = ExportConfig("onnx", Path("memory.onnx"), opset=opset, dynamic_batch=True, exporter=exporter, verify=False)
    model = copy.deepcopy(model).to("cpu", torch.float32).eval()
    proto = _export_onnx(model, _random_batches(input_shape, [2])[0], config)[0]
    return proto.SerializeToString()


# ----------------------------------------------------------------------------- latency


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
    inputs = {int(b): x for b, x in zip(batch_sizes, _random_batches(input_shape, batch_sizes), strict=True)}
    if runtime == "torch":
        if not isinstance(model, nn.Module):
            raise ExportError("runtime 'torch' times an nn.Module; time ONNX files with runtime 'onnxruntime'")
        with _torch_settings(model, threads):
            yield _torch_runners(model, inputs)
        return
    if isinstance(model, nn.Module):
        model = onnx_bytes(model, input_shape)
    session = _ort_session(str(model) if isinstance(model, str | Path) else model, threads)
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


@dataclass(frozen=True)
class LatencyRow:
    runtime: str
    batch: int
    original_ms: float
    slim_ms: float
    speedup: float  # original_ms / slim_ms


@dataclass(frozen=True)
class LatencyComparison:
    """Measured speedups of the slim model beside the MACs ratio that promised them."""

    input_shape: tuple[int, ...]
    rows: list[LatencyRow]
    original_macs: int
    slim_macs: int
    macs_ratio: float  # original_macs / slim_macs: the speedup the MACs alone predict
    warmup: int
    repeats: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    example = _random_batches(input_shape, [1])[0]
    macs = [sum(c.macs for c in layer_costs(m, example.to(model_device(m)))) for m in (original, slim)]
    rows = []
    for runtime in runtimes:
        with (_runners(original, input_shape, batch_sizes, warmup, repeats, runtime, threads) as before,
              _runners(slim, input_shape, batch_sizes, warmup, repeats, runtime, threads) as after):
            for batch in before:
                old, new = _medians_ms([before[batch], after[batch]], warmup, repeats)
                rows.append(LatencyRow(runtime, batch, old, new, old / new))
    return LatencyComparison(input_shape, rows, macs[0], macs[1], macs[0] / max(macs[1], 1), warmup, repeats)
