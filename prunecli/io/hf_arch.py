"""Hugging Face transformers vision models: ``hf:ClassName`` architectures built from their config, the input a
folder's config and preprocessor describe, and a folder's own code (``auto_map``) run with the user's consent:
``hf-code:ClassName``, a class of the code in the folder the model was written to.

transformers is optional (``pip install prunecli[hf]``) and imported only here, when a folder or an ``hf:`` spec
needs it. Nothing downloads: a model is built from its config with random weights, and the weights are the
file's. An ``hf:`` spec names a class of the ``transformers`` package itself, so building it runs no code a
file chose; it must be an image model (its forward takes ``pixel_values``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunecli.errors import ArchitectureError, CheckpointError, one_line

KIND = "hf"  # the spec kind: hf:ResNetForImageClassification, its config as the keyword arguments
CODE_KIND = "hf-code"  # hf-code:TinyForImageClassification: a class of a folder's own code, its config likewise
INSTALL = "pip install 'prunecli[hf]'"


def transformers_module() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ArchitectureError(f"Hugging Face models need transformers; {INSTALL}") from exc
    return transformers


def model_class(name: str) -> type:
    """The transformers class ``name``, refused when transformers has none or it is no image model."""
    transformers = transformers_module()
    try:
        cls = getattr(transformers, name, None)
    except Exception:  # a lazily imported model module whose own requirements are missing
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ArchitectureError(f"transformers {transformers.__version__} has no model class {name!r}; check the "
                                "architectures in config.json, or upgrade transformers")
    check_vision(cls)
    return cls


def check_vision(cls: type) -> None:
    """Refuse a model whose forward does not take images first (``pixel_values``): text, audio, multimodal."""
    params = [p for p in inspect.signature(cls.forward).parameters if p != "self"]
    if params[:1] != ["pixel_values"]:
        taken = params[0] if params else "no input"
        raise ArchitectureError(f"{cls.__name__} is not an image model (its forward takes {taken}, not pixel_values); "
                                "prunecli prunes vision models such as ResNetForImageClassification")


def build(name: str, config: Mapping[str, Any]) -> nn.Module:
    """``hf:name`` with ``config`` (the JSON of its config.json): the class built from its config, random weights."""
    cls = model_class(name)
    return cls(config_of(cls, config)).eval()


def hf_factory(name: str) -> Callable[..., nn.Module]:
    """The factory of the spec ``hf:name``: keyword arguments are the fields of its config."""
    model_class(name)  # refused now, not when called
    return lambda **config: build(name, config)


def remote_classes(config: Mapping[str, Any]) -> list[str]:
    """The classes a config's ``auto_map`` has transformers import from the folder (empty: none)."""
    auto_map = config.get("auto_map")
    return sorted({str(v) for v in auto_map.values()}) if isinstance(auto_map, Mapping) else []


def remote_class(folder: Path, config: Mapping[str, Any], name: str) -> tuple[type, Any]:
    """The folder's own class ``name`` (``auto_map``) and its config object, through transformers' loader of a
    folder's code (``trust_remote_code=True``: the user consented). Code that lives in another repository is
    refused: nothing is downloaded."""
    transformers = transformers_module()
    auto_map = config.get("auto_map") or {}
    auto = next((k for k, v in auto_map.items() if str(v).rpartition(".")[2] == name and k.startswith("AutoModel")),
                None)
    if auto is None or not hasattr(transformers, auto):
        raise ArchitectureError(f"{folder}/config.json names {name} but its auto_map gives no AutoModel class for it")
    if "--" in str(auto_map[auto]):
        raise CheckpointError(f"{folder}/config.json takes {name}'s code from another repository "
                              f"({auto_map[auto]}); prunecli downloads nothing: put the code in the folder")
    try:
        hf_config = transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True)
        cls = transformers.dynamic_module_utils.get_class_from_dynamic_module(auto_map[auto], str(folder),
                                                                              local_files_only=True)
    except Exception as exc:
        raise ArchitectureError(f"importing {name} from the code in {folder} failed ({one_line(exc)})") from exc
    check_vision(cls)
    return cls, hf_config


def code_factory(name: str, folders: tuple[Path, ...]) -> Callable[..., nn.Module]:
    """The factory of the spec ``hf-code:name``: the class of that name in the code of the first of ``folders``
    (the Hugging Face folder a model is read from) that holds a config.json. Reached only with the user's consent:
    the spec is no builtin kind, so a file naming it is refused without ``--trust-remote-code``."""
    folder = next((Path(f) for f in folders if (Path(f) / "config.json").is_file()), None)
    if folder is None:
        raise ArchitectureError(f"{CODE_KIND}:{name} is a class of a Hugging Face folder's own code; read the folder "
                                "the model was written to (with --trust-remote-code), not its model.safetensors alone")
    return lambda **config: own_model(folder, config, name)


def own_model(folder: Path, config: Mapping[str, Any], name: str) -> nn.Module:
    """The folder's own class ``name`` built from ``config`` (the JSON of its config.json), random weights."""
    cls, _ = remote_class(folder, config, name)
    return cls(config_of(cls, config)).eval()


def config_of(cls: type, config: Mapping[str, Any]) -> Any:
    """The config object of a transformers class from the JSON of its config.json."""
    return cls.config_class.from_dict(dict(config))


def pretrained(cls: type, hf_config: Any, state: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """``cls`` with ``state`` loaded the way ``from_pretrained`` loads a folder (its renamings of older checkpoint
    keys included: transformers 5 saves ViT's ``attention.attention.query`` for its ``attention.q_proj``), in
    float32 and eval mode; refused, naming the keys, unless every weight is there and is used."""
    transformers = transformers_module()
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(None, config=hf_config, state_dict=dict(state), output_loading_info=True)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{source}: the weights do not load into {cls.__name__} ({one_line(exc)})") from exc
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
    problems = [f"{len(keys)} {label}: {', '.join(sorted(map(str, keys))[:6])}{' (+more)' if len(keys) > 6 else ''}"
                for label, keys in (("missing", info.get("missing_keys")), ("unexpected", info.get("unexpected_keys")),
                                    ("shape mismatch", info.get("mismatched_keys"))) if keys]
    if problems:
        raise CheckpointError(f"{source}: the weights do not match {cls.__name__} as config.json describes it: "
                              + "; ".join(problems))
    return model.float().eval()


def _size(value: Any) -> tuple[int, int] | None:
    """(H, W) of an ``image_size``, ``crop_size`` or ``size`` entry: an int, [H, W], or a dict with height and width
    or a shortest edge."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value > 0:
        return value, value
    if isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return int(value[0]), int(value[1])
    if isinstance(value, Mapping):
        if isinstance(value.get("height"), int) and isinstance(value.get("width"), int):
            return int(value["height"]), int(value["width"])
        return _size(value.get("shortest_edge"))
    return None


def input_shape(config: Mapping[str, Any], preprocessor: Mapping[str, Any] | None = None) -> tuple[int, ...] | None:
    """(C, H, W): ``num_channels`` of the config (3 without one) and the size the preprocessor hands the model (its
    crop, else its resize), else the config's ``image_size``; None when neither gives a size."""
    channels = config.get("num_channels", 3)
    pre = preprocessor or {}
    cropped = pre.get("do_center_crop", "crop_size" in pre) and _size(pre.get("crop_size"))
    size = cropped or _size(pre.get("size")) or _size(config.get("image_size"))
    if size is None or not isinstance(channels, int) or channels < 1:
        return None
    return (channels, *size)


def normalisation(preprocessor: Mapping[str, Any] | None, channels: int) -> tuple[tuple[float, ...], ...] | None:
    """(mean, std) of the preprocessor, one value per channel; None when it does not normalise or says nothing."""
    pre = preprocessor or {}
    if pre.get("do_normalize") is False:
        return None
    values = []
    for key in ("image_mean", "image_std"):
        value = pre.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = [value] * channels
        if not (isinstance(value, list) and len(value) == channels and all(isinstance(v, int | float) for v in value)):
            return None
        values.append(tuple(float(v) for v in value))
    return tuple(values)
