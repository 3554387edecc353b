"""An Ultralytics checkpoint: the dict its trainer and ``YOLO.save`` write (``model``, ``ema``, ``train_args``,
``date``, ``version``, ...), whose models are pickled Ultralytics modules.

Mine when a ``torch.save`` zip holds a dict (not a pickled instance) whose pickle names an Ultralytics task model
(``ultralytics.nn.tasks.DetectionModel`` and its siblings), read from its opcodes: nothing runs. Reading it runs
the pickle, so it takes ``--trust-pickle``, and ultralytics itself (``pip install 'prunecli[yolo]'``).

The model read is the EMA when the file has one, as Ultralytics' own loader takes it, in float32 whatever the
file stores (fp16, as Ultralytics writes). Its input is the training image size the checkpoint records
(``train_args["imgsz"]``, else the model's own ``args``), else 640, Ultralytics' default; ``--input-shape``
overrides it and must be a multiple of the model's largest stride.

Written back as the same container, the way Ultralytics' ``strip_optimizer`` finalises a checkpoint: the pruned
model under ``model``, in the dtype the input stored; ``ema`` None (a second copy that would have to be pruned
alike, and which ``YOLO()`` would prefer); and the training state that belongs to the unpruned widths (optimizer,
scaler, EMA updates, best fitness, early stopper) None with ``epoch`` -1, so that nothing resumes the old run. The
other keys stay as they were, ``date`` included, so the same prune writes the same bytes. The provenance is the
JSON string under ``prunecli``, a key Ultralytics carries along and otherwise ignores. ``YOLO("x.pt")`` loads
the result, predicts, validates, exports and trains it (training: ``prunecli finetune``, or docs/yolo.md).
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prunecli._version import __version__
from prunecli.errors import CheckpointError, OptionError
from prunecli.io.arch import InputInfo
from prunecli.io.files import atomic_output, check_suffix, write_through_memory
from prunecli.io.formats.base import CheckpointFormat, LoadedModel, Probe, json_document, loaded_model
from prunecli.io.formats.whole_model import save_pickle
from prunecli.io.readers import torch_load
from prunecli.yolo import IMGSZ, TASK_MODELS, is_ultralytics

if TYPE_CHECKING:
    from prunecli.config import ModelSource

FORMAT = "prunecli-ultralytics"
FORMAT_VERSION = 1
METADATA_KEY = "prunecli"  # the JSON provenance, a key of the checkpoint dict
# what belongs to the unpruned model's training run; Ultralytics' strip_optimizer sets the same keys to None
TRAINING_STATE = ("optimizer", "best_fitness", "stopper", "updates", "scaler")
INSTALL_HINT = "install ultralytics (pip install 'prunecli[yolo]')"


@functools.lru_cache(maxsize=16)
def _task_model(path: Path, size: int, mtime: int) -> str | None:
    """The Ultralytics task model class (``'DetectionModel'``) a torch.save zip of a dict names, if it names one."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # not a zip checkpoint, or a damaged one: not claimed (another adapter says what is wrong)
        return None
    found = [n.rpartition(".")[2] for n in names if n.startswith("ultralytics.nn.tasks.")]
    return next((n for n in found if n in TASK_MODELS), found[0] if found else None)


def task_model(probe: Probe) -> str | None:
    if probe.kind != "zip" or probe.pickled_class is not None:  # a pickled instance is a whole model, not a dict
        return None
    status = probe.path.stat()
    return _task_model(probe.path.resolve(), status.st_size, status.st_mtime_ns)


def _image_size(checkpoint: dict[str, Any], model: nn.Module) -> tuple[int, int] | None:
    """The training image size the checkpoint records (an int or [h, w]), if any."""
    for args in (checkpoint.get("train_args"), getattr(model, "args", None)):
        imgsz = (args.get("imgsz") if isinstance(args, dict) else getattr(args, "imgsz", None)) if args else None
        if isinstance(imgsz, int) and imgsz > 0:
            return imgsz, imgsz
        if isinstance(imgsz, list | tuple) and 1 <= len(imgsz) <= 2 and all(isinstance(v, int) and v > 0 for v in imgsz):
            return int(imgsz[0]), int(imgsz[-1])
    return None


def _input(checkpoint: dict[str, Any], model: nn.Module, source: ModelSource,
           document: dict[str, Any] | None) -> tuple[InputInfo, list[str]]:
    """The input shape (``--input-shape``, else the one prunecli pruned at, else the training size, else 640) and
    Ultralytics' normalisation (pixels / 255, no mean or std), refusing a size that is not a multiple of the
    model's largest stride."""
    yaml = getattr(model, "yaml", None)
    channels = int(yaml.get("channels", yaml.get("ch", 3))) if isinstance(yaml, dict) else 3
    notes = []
    if source.input_shape is not None:
        shape = tuple(source.input_shape)
    elif document and document.get("input_shape"):
        shape = tuple(document["input_shape"])
    else:
        size = _image_size(checkpoint, model)
        shape = (channels, *(size or (IMGSZ, IMGSZ)))
        where = "the checkpoint's training image size" if size else "Ultralytics' default size"
        notes.append(f"input {'x'.join(map(str, shape))}: {where}; pass --input-shape to change it")
    stride = int(max(getattr(model, "stride", torch.tensor([1.0])).tolist() or [1]))
    if len(shape) != 3 or shape[0] != channels or any(side % stride for side in shape[1:]):
        fit = "x".join(map(str, (channels, *(max(stride, round(side / stride) * stride) for side in shape[-2:]))))
        raise OptionError(f"--input-shape {'x'.join(map(str, shape))}: this {type(model).__name__} takes {channels} "
                          f"channels and sides that are multiples of its stride {stride}, e.g. {fit}")
    return InputInfo(shape, (0.0,) * channels, (1.0,) * channels), notes


def read_checkpoint(path: Path, trust_pickle: bool, import_paths: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The checkpoint dict, unpickled only with ``trust_pickle`` and ultralytics importable."""
    if not trust_pickle:
        raise CheckpointError(f"{path} is an Ultralytics checkpoint, a pickle that runs code when read; pass "
                              "--trust-pickle if you trust its source")
    try:
        import ultralytics  # noqa: F401  (its classes are what the pickle builds)
    except ImportError as exc:
        raise CheckpointError(f"{path} is an Ultralytics checkpoint; reading it needs ultralytics: {INSTALL_HINT}") from exc
    checkpoint = torch_load(path, True, import_paths)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not an Ultralytics checkpoint dict")
    return checkpoint


def chosen_model(checkpoint: dict[str, Any], path: Path) -> tuple[str, nn.Module]:
    """The key of the model Ultralytics would load (``ema`` when set, else ``model``) and that model, checked."""
    key = "ema" if checkpoint.get("ema") is not None else "model"
    model = checkpoint.get(key)
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"{path}: the checkpoint's {key!r} is a {type(model).__name__}, not a model; the file "
                              "is damaged")
    if checkpoint.get("modelopt"):
        raise CheckpointError(f"{path} is a quantization-aware (QAT) checkpoint; prune the float model it was "
                              "trained from")
    if not is_ultralytics(model) or type(model).__name__ not in TASK_MODELS:
        raise CheckpointError(f"{path} holds an Ultralytics {type(model).__name__}; prunecli prunes "
                              f"{', '.join(TASK_MODELS)} (detect, segment, pose, obb, classify)")
    return key, model


@dataclass(frozen=True)
class UltralyticsFormat(CheckpointFormat):
    """``container``: the checkpoint's other keys, to write back around the pruned model; ``dtype``: the dtype the
    file stored the model in (both known once the file is read)."""

    container: dict[str, Any] = field(default_factory=dict, compare=False)
    dtype: torch.dtype | None = None
    name = "Ultralytics checkpoint"

    def claims(self, probe: Probe) -> bool:
        return task_model(probe) is not None

    def read(self, probe: Probe, source: ModelSource) -> LoadedModel:
        checkpoint = read_checkpoint(probe.path, source.trust_pickle, source.import_paths)
        key, model = chosen_model(checkpoint, probe.path)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        model = model.float().eval()
        document = json_document(checkpoint.get(METADATA_KEY), probe.path, f"the checkpoint's {METADATA_KEY!r} entry",
                                 FORMAT, FORMAT_VERSION, "Ultralytics checkpoint provenance")
        info, notes = _input(checkpoint, model, source, document)
        stored = "fp16" if dtype == torch.float16 else str(dtype).removeprefix("torch.")
        notes.insert(0, f"Ultralytics {type(model).__name__} ({key} weights, stored in {stored}, pruned in fp32)")
        container = {k: v for k, v in checkpoint.items() if k not in ("model", "ema")}
        container.pop(METADATA_KEY, None)
        return loaded_model(model, None, info, probe, UltralyticsFormat(container, dtype), document, notes)

    def module(self, probe: Probe, trust_code: bool, import_paths: tuple[Path, ...]) -> nn.Module:
        checkpoint = read_checkpoint(probe.path, trust_code, import_paths)
        return chosen_model(checkpoint, probe.path)[1].float().eval()

    def default_output(self, source_path: Path, tag: str = "slim") -> Path:
        """``yolov8n.pt`` -> ``yolov8n.slim.pt``: written back as an Ultralytics checkpoint, which must end in .pt."""
        return source_path.with_name(f"{source_path.stem}.{tag}.pt")

    def check_output(self, output: Path) -> None:
        check_suffix(output, (".pt",), "an Ultralytics checkpoint (YOLO() reads .pt files)")

    def write(
        self, loaded: LoadedModel, model: nn.Module, output: Path, metadata: dict[str, Any], *, force: bool,
        inputs: tuple[Path, ...],
    ) -> Path:
        self.check_output(output)
        model = copy.deepcopy(model).cpu().to(self.dtype or torch.float32)
        for param in model.parameters():
            param.requires_grad_(False)  # as Ultralytics stores a finished model; its trainer turns them back on
        document = {**metadata, "format": FORMAT, "format_version": FORMAT_VERSION, "prunecli_version": __version__,
                    "input_shape": list(loaded.input.shape)}
        checkpoint = {**self.container, "model": model, "ema": None,
                      **{k: None for k in TRAINING_STATE if k in self.container},
                      **({"epoch": -1} if "epoch" in self.container else {}),
                      METADATA_KEY: json.dumps(document, sort_keys=True)}
        with atomic_output(output, force=force, inputs=inputs) as tmp:
            write_through_memory(tmp, lambda buffer: save_pickle(checkpoint, buffer))
        return output


ULTRALYTICS = UltralyticsFormat()
