"""Architecture specs -> freshly initialised ``nn.Module`` (never downloads weights).

Spec forms: ``torchvision:<model>``, ``timm:<model>``, ``sample:<name>``, ``hf:<transformers class>`` (its config as
the keyword arguments), ``hf-code:<class>`` (a class of a Hugging Face folder's own code: the folder among the import
paths), ``pkg.module:factory``, ``path/to/file.py:factory``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import json
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import init

from prunecli.errors import ArchitectureError, OptionError
from prunecli.io import hf_arch
from prunecli.io.timm_arch import timm_factory, timm_input, timm_matches

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ArchSpec:
    """How to build the base architecture of a model: a spec string plus factory keyword arguments."""

    spec: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ArchSpec:
        return cls(str(data["spec"]), dict(data.get("kwargs") or {}))


def parse_arch_kwargs(text: str | None) -> dict[str, Any]:
    """Parse ``--arch-kwargs`` JSON into a dict, with an error a user can act on."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OptionError(f"--arch-kwargs is not valid JSON ({exc.msg}); example: '{{\"num_classes\": 10}}'") from exc
    if not isinstance(value, dict):
        raise OptionError("--arch-kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'")
    return value


def torchvision_models() -> list[str]:
    """Every model torchvision registers: classification, quantization, segmentation, detection, video, optical flow."""
    import torchvision

    return sorted(torchvision.models.list_models())


def torchvision_task(name: str) -> str:
    """'classification', 'quantization', 'segmentation', 'detection', 'video' or 'optical_flow'."""
    import torchvision

    module = inspect.getmodule(torchvision.models.get_model_builder(name)).__name__
    task = module.removeprefix("torchvision.models.").split(".")[0]
    return task if task in TORCHVISION_TASKS else "classification"


TORCHVISION_TASKS = ("quantization", "segmentation", "detection", "video", "optical_flow")
VIDEO_FRAMES = 16  # the clip length torchvision's Kinetics-400 video weights were trained on


def _torchvision_builder(name: str) -> Callable[..., nn.Module]:
    """``name``'s builder without any weights: also none for the backbone of segmentation and detection models."""
    import torchvision

    builder = torchvision.models.get_model_builder(name)
    no_weights = {"weights": None}
    if "weights_backbone" in inspect.signature(builder).parameters:
        no_weights["weights_backbone"] = None
    return lambda **kw: builder(**{**kw, **no_weights})


def _unknown_torchvision(name: str) -> ArchitectureError:
    import difflib

    import torchvision

    names = torchvision_models()
    close = difflib.get_close_matches(name, names, n=4, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return ArchitectureError(
        f"unknown torchvision model {name!r}; {hint}torchvision {torchvision.__version__} has {len(names)} "
        "(torchvision.models.list_models() lists them)"
    )


def _resolve_factory(spec: str, import_paths: tuple[Path, ...] = ()) -> Callable[..., nn.Module]:
    kind, sep, name = spec.partition(":")
    if not sep or not kind or not name:
        raise ArchitectureError(
            f"architecture {spec!r} is not of the form 'torchvision:resnet50', 'timm:resnet50', 'sample:resnet20', "
            "'package.module:factory' or 'file.py:factory'"
        )
    if kind == "torchvision":
        if name not in torchvision_models():
            raise _unknown_torchvision(name)
        return _torchvision_builder(name)
    if kind == "timm":
        return timm_factory(name)
    if kind == hf_arch.KIND:
        return hf_arch.hf_factory(name)
    if kind == hf_arch.CODE_KIND:
        return hf_arch.code_factory(name, import_paths)
    if kind == "sample":
        from prunecli.samples import SAMPLE_ARCHITECTURES

        if name not in SAMPLE_ARCHITECTURES:
            raise ArchitectureError(f"unknown sample architecture {name!r}; choose one of {sorted(SAMPLE_ARCHITECTURES)}")
        return SAMPLE_ARCHITECTURES[name]
    if kind.endswith(".py"):
        path = Path(kind)
        if not path.is_file():
            raise ArchitectureError(f"architecture file {path} not found; give the path of a .py file defining {name}()")
        module_name = f"_prunecli_user_{abs(hash(path.resolve()))}"
        module = sys.modules.get(module_name)
        if module is None:
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module
            try:
                module_spec.loader.exec_module(module)
            except Exception as exc:
                del sys.modules[module_name]
                raise ArchitectureError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    else:
        with _extra_sys_path(import_paths):
            try:
                module = importlib.import_module(kind)
            except ImportError as exc:
                raise ArchitectureError(
                    f"cannot import module {kind!r} ({exc}); install it or add its folder with --import-path"
                ) from exc
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ArchitectureError(f"{kind} has no callable {name!r}; the spec names a function or class after ':'")
    return factory


@contextlib.contextmanager
def _extra_sys_path(paths: tuple[Path, ...]):
    added = [str(p) for p in paths if str(p) not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for p in added:
            sys.path.remove(p)


def build_model(arch: ArchSpec, import_paths: tuple[Path, ...] = ()) -> nn.Module:
    """Build the architecture with random weights, in eval mode."""
    factory = _resolve_factory(arch.spec, import_paths)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = factory(**dict(arch.kwargs))
    except TypeError as exc:
        raise ArchitectureError(f"building {arch.spec} with {dict(arch.kwargs)} failed: {exc}; check --arch-kwargs") from exc
    if not isinstance(model, nn.Module):
        raise ArchitectureError(f"{arch.spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


@contextlib.contextmanager
def parameters_left_to_load() -> Iterator[None]:
    """Within the block ``torch.nn.init`` leaves parameters as allocated: for a model whose every parameter a strict
    load overwrites next (a tenth of a second per 10M parameters). Buffers and plain tensors are initialised as
    usual, and a factory's own init code (timm's) still runs."""
    saved = {name: getattr(init, name) for name in dir(init)
             if name.endswith("_") and not name.startswith("_") and callable(getattr(init, name))}

    def skipping(initialise: Callable) -> Callable:
        return lambda tensor, *args, **kwargs: (
            tensor if isinstance(tensor, nn.Parameter) else initialise(tensor, *args, **kwargs))

    for name, initialise in saved.items():
        setattr(init, name, skipping(initialise))
    try:
        yield
    finally:
        for name, initialise in saved.items():
            setattr(init, name, initialise)


def build_skeleton(arch: ArchSpec, import_paths: tuple[Path, ...] = ()) -> nn.Module:
    """The architecture without initialised weights (on the meta device where the factory allows it)."""
    try:
        with torch.device("meta"):
            return build_model(arch, import_paths)
    except (NotImplementedError, RuntimeError):
        return build_model(arch, import_paths)


@dataclass(frozen=True)
class InputInfo:
    """What an architecture expects as input: (C, H, W), or (C, T, H, W) for video, and the normalisation, when known."""

    shape: tuple[int, ...]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def default_input(arch: ArchSpec) -> InputInfo | None:
    """Default input for known architectures (torchvision: the size and normalisation of its reference weights;
    timm: the input size and normalisation of its pretrained config)."""
    kind, _, name = arch.spec.partition(":")
    if kind == "sample":
        from prunecli.samples import SAMPLE_INPUT_SHAPES

        channels = int(arch.kwargs.get("in_channels", SAMPLE_INPUT_SHAPES[name][0]))
        return InputInfo((channels, *SAMPLE_INPUT_SHAPES[name][1:]))
    if kind == "torchvision":
        return _torchvision_input(arch)
    if kind == "timm":
        return InputInfo(*timm_input(name, arch.kwargs))
    if kind == hf_arch.KIND:
        shape = hf_arch.input_shape(arch.kwargs)
        return InputInfo(shape) if shape else None
    return None


def _torchvision_input(arch: ArchSpec) -> InputInfo:
    """Detectors: the size their transform resizes to and its normalisation; the others: their weights' preset."""
    import torchvision

    name = arch.spec.partition(":")[2]
    task = torchvision_task(name)
    if task == "detection":
        transform = build_skeleton(arch).transform
        return InputInfo((3, transform.min_size[-1], transform.min_size[-1]), tuple(transform.image_mean),
                         tuple(transform.image_std))
    preset = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    size = (getattr(preset, "crop_size", None) or getattr(preset, "resize_size", None) or [224])[0]
    frames = (VIDEO_FRAMES,) if task == "video" else ()
    mean, std = getattr(preset, "mean", IMAGENET_MEAN), getattr(preset, "std", IMAGENET_STD)
    return InputInfo((3, *frames, int(size), int(size)), tuple(mean), tuple(std))


def torchvision_input_of(model: nn.Module) -> InputInfo | None:
    """The default input of the torchvision family that ``model``'s class comes from, for a whole pickled model
    whose weights match no torchvision builder (a replaced stem or classifier): a detector's own resize size and
    normalisation; else the family's first builder's input with the channels its first convolution reads (without
    the 3-channel normalisation when those differ). None for classes from elsewhere."""
    family = type(model).__module__
    if not family.startswith("torchvision.models."):
        return None
    transform = getattr(model, "transform", None)  # a detector resizes and normalises its images itself
    if transform is not None and hasattr(transform, "min_size") and hasattr(transform, "image_mean"):
        size = int(transform.min_size[-1])
        return InputInfo((3, size, size), tuple(transform.image_mean), tuple(transform.image_std))
    names = [name for name in torchvision_models() if _family_of(name) == family]
    if not names:
        return None
    known = default_input(ArchSpec(f"torchvision:{names[0]}"))
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d)), None)
    if known is None or conv is None or conv.in_channels == known.shape[0]:
        return known
    return InputInfo((conv.in_channels, *known.shape[1:]))


def parse_input_shape(text: str) -> tuple[int, ...]:
    """'3x224x224' (or '3,224,224') -> (3, 224, 224); volumes and video: '1x64x64x64', '3x16x112x112' (C x D x H x W)."""
    parts = text.replace(",", "x").lower().split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) not in (3, 4) or min(shape) < 1:
        raise OptionError(
            f"--input-shape {text!r} is not CxHxW (or CxDxHxW for volumes and video) with positive integers, e.g. 3x224x224"
        )
    return shape


def _family_of(name: str) -> str:
    import torchvision

    return inspect.getmodule(torchvision.models.get_model_builder(name)).__name__


def _signature(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _build_for_matching(name: str, num_classes: int | None) -> nn.Module | None:
    """``name`` on the meta device where its builder allows it; ``num_classes`` None keeps the builder's default."""
    builder = _torchvision_builder(name)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for device in ("meta", "cpu"):
            try:
                with torch.device(device):
                    return builder(**kwargs)
            except (NotImplementedError, RuntimeError):
                continue
            except (TypeError, ValueError):
                return None
    return None


def detect_torchvision_arch(
    state_dict: Mapping[str, torch.Tensor], model_class: type | None = None
) -> ArchSpec | None:
    """Find the one torchvision model whose keys and shapes match ``state_dict`` exactly.

    Candidates are narrowed by the top-level module names of the first model of each family, so only
    the matching family is built in full (on the meta device where the builder allows it). A classifier's
    number of classes is read off its last matrix; other tasks are matched at their builders' default too.
    The quantization family is skipped: its float models hold the same weights as the plain classifiers.

    Args:
        model_class: the class of a whole pickled model: only the families whose module holds that class are
            tried (a torchvision MobileNetV2 with a replaced stem would otherwise build every family that shares
            its ``features``/``classifier`` layout, seconds of work, to match none).
    """
    wanted = {k: tuple(v.shape) for k, v in state_dict.items()}
    top_level = {k.split(".")[0] for k in wanted}
    matrices = [shape for shape in wanted.values() if len(shape) == 2]
    class_counts = dict.fromkeys([None, matrices[-1][0] if matrices else None])  # the builder's default first
    families: dict[str, list[str]] = {}
    for name in torchvision_models():
        if torchvision_task(name) != "quantization":
            families.setdefault(_family_of(name), []).append(name)
    if model_class is not None:
        families = {family: names for family, names in families.items()
                    if getattr(importlib.import_module(family), model_class.__name__, None) is model_class}
    matches = []
    for names in families.values():
        probe = _build_for_matching(names[0], None)
        if probe is None or {k.split(".")[0] for k in probe.state_dict()} != top_level:
            continue
        for name in names:
            for count in class_counts:
                model = _build_for_matching(name, count)
                if model is not None and _signature(model) == wanted:
                    matches.append((name, count))
                    break
    if len(matches) != 1:
        return None
    (name, count), = matches
    return ArchSpec(f"torchvision:{name}", {} if count is None else {"num_classes": count})


def detect_timm_arch(state_dict: Mapping[str, torch.Tensor]) -> ArchSpec | None:
    """The one timm model whose keys and shapes match ``state_dict`` exactly; None without timm or a match.

    timm registers many models with one layout (DeiT and ViT, tf_ and plain EfficientNets): several matches
    raise an error that names them, since guessing one could pick the wrong forward.
    """
    if importlib.util.find_spec("timm") is None:
        return None
    matches, kwargs = timm_matches(state_dict)
    if len(matches) > 1:
        shown = ", ".join(matches[:5]) + (f" (+{len(matches) - 5} more)" if len(matches) > 5 else "")
        raise ArchitectureError(f"the weights match {len(matches)} timm models ({shown}); pass --arch timm:NAME")
    return ArchSpec(f"timm:{matches[0]}", kwargs) if matches else None
