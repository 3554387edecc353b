"""What ``export`` writes and how: the formats, exporters and dtypes, and the validated :class:`ExportConfig`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prunecli.errors import OptionError
from prunecli.io.files import check_suffix

FORMATS = ("onnx", "safetensors", "torchscript")
EXPORTERS = ("auto", "dynamo", "legacy")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SUFFIXES = {"onnx": (".onnx",), "safetensors": (".safetensors",), "torchscript": (".pt", ".ts")}
METADATA_PREFIX = "prunecli."


def format_of(output: Path) -> str:
    """The format an output's suffix names (``.onnx``, ``.safetensors``, ``.pt``/``.ts``)."""
    for name, suffixes in SUFFIXES.items():
        if output.suffix.lower() in suffixes:
            return name
    raise OptionError(f"-o {output}: give --format, or an output ending in .onnx, .safetensors, .pt or .ts")


def _check(checks) -> None:
    for failed, message in checks:
        if failed:
            raise OptionError(message)


DEFAULT_OUTPUT_NAMES = ("logits",)  # a classifier's one output; models with several name theirs (export.onnx)


@dataclass(frozen=True)
class ExportConfig:
    """What to write and how. Validated on construction (``OptionError``, a usage error, naming the option to fix).

    Args:
        format: "onnx", "safetensors" or "torchscript"; None takes the one the output's extension names.
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

    format: str | None  # None: the one the output's suffix names
    output: Path
    opset: int | None = None
    dynamic_batch: bool = False
    exporter: str = "auto"
    verify: bool = True
    atol: float = 1e-4
    dtype: str = "fp32"
    force: bool = False
    input_names: tuple[str, ...] = ("input",)
    output_names: tuple[str, ...] = DEFAULT_OUTPUT_NAMES

    def __post_init__(self):
        object.__setattr__(self, "output", Path(self.output))
        object.__setattr__(self, "input_names", tuple(self.input_names))
        object.__setattr__(self, "output_names", tuple(self.output_names))
        if self.format is None:
            object.__setattr__(self, "format", format_of(self.output))
        _check([
            (self.format not in FORMATS, f"unknown --format {self.format!r}; choose one of {', '.join(FORMATS)}"),
            (self.exporter not in EXPORTERS, f"unknown --exporter {self.exporter!r}; choose one of {', '.join(EXPORTERS)}"),
            (self.dtype not in DTYPES, f"unknown --dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}"),
        ])
        check_suffix(self.output, SUFFIXES[self.format], f"--format {self.format}", " or pick the matching --format")
        _check([
            (self.format != "onnx" and (self.opset is not None or self.exporter != "auto"),
             f"--opset and --exporter apply to --format onnx only, not {self.format}"),
            (self.format != "safetensors" and self.dtype != "fp32",
             f"--dtype {self.dtype} applies to --format safetensors only; {self.format} is written in fp32"),
            (self.format == "safetensors" and self.dynamic_batch,
             "--dynamic-batch applies to --format onnx and torchscript; safetensors has no batch axis"),
            (self.opset is not None and (isinstance(self.opset, bool) or not isinstance(self.opset, int) or self.opset < 1),
             f"--opset {self.opset!r} must be a positive integer such as 17 or 18"),
            (not self.atol >= 0, f"--atol {self.atol} must be zero or positive"),  # also rejects NaN
            (not self.input_names or not self.output_names, "input and output names must not be empty"),
        ])

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["output"] = str(self.output)
        data["input_names"] = list(self.input_names)
        data["output_names"] = list(self.output_names)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExportConfig:
        return cls(**{**data, "output": Path(data["output"])})
