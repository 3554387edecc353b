"""timm architectures (``--arch timm:NAME``): building without weights, default inputs, recognising state dicts.

timm is optional (``pip install prunecli[timm]``) and imported only here, when a ``timm:`` spec or a bare
state dict needs it. Nothing here downloads: models are built with ``pretrained=False`` and the keyword
arguments that would read weights or configs from elsewhere are refused.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from prunecli.errors import ArchitectureError

# create_model arguments that load weights or a pretrained config from a file or the hub
WEIGHT_KWARGS = frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir"})
# models built on the meta device to recognise a bare state dict: about a second's work on a small machine
MAX_CANDIDATES = 48


def _timm():
    try:
        import timm
    except ImportError as exc:
        raise ArchitectureError("timm:... architectures need timm; pip install prunecli[timm]") from exc
    return timm


# ``--arch timm:create_model --arch-kwargs '{"model_name": NAME, ...}'``: before ``timm:NAME`` existed, a timm
# model was named as a ``package.module:factory`` spec, and slim files written then record it that way
LEGACY_FACTORY = "create_model"


def _legacy_create_model(model_name: str | None = None, **kwargs: Any) -> nn.Module:
    """The factory ``timm:create_model`` named before ``timm:NAME``: the model ``model_name`` built with the rest.

    Keyword arguments that would load weights (``pretrained``, ``checkpoint_path``, ...) are dropped rather than
    refused: a spec recorded in a file cannot be changed, and the weights come from the file being loaded.
    """
    if not isinstance(model_name, str):
        raise ArchitectureError(
            "--arch timm:create_model (the spec of timm models before timm:NAME) needs \"model_name\" in "
            "--arch-kwargs; or pass --arch timm:NAME"
        )
    return timm_factory(model_name)(**{k: v for k, v in kwargs.items() if k not in WEIGHT_KWARGS})


def _legacy_name(name: str, kwargs: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``timm:create_model`` with ``{"model_name": NAME, ...}`` read as ``timm:NAME`` with the rest; other names as
    they are."""
    if name != LEGACY_FACTORY or not isinstance(kwargs.get("model_name"), str):
        return name, dict(kwargs)
    return kwargs["model_name"], {k: v for k, v in kwargs.items() if k != "model_name"}


def timm_factory(name: str) -> Callable[..., nn.Module]:
    """``timm.create_model(name, pretrained=False, **kwargs)`` for a registered model name (tags allowed);
    ``create_model`` is the older spelling ``timm:create_model`` with the name in the kwargs."""
    timm = _timm()
    if name == LEGACY_FACTORY and not timm.is_model(name):
        return _legacy_create_model
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"close matches: {', '.join(close)}; " if close else ""
        raise ArchitectureError(f"unknown timm model {name!r}; {hint}see timm.list_models() for the names")

    def create(**kwargs: Any) -> nn.Module:
        refused = sorted(WEIGHT_KWARGS & set(kwargs))
        if refused:
            raise ArchitectureError(
                f"--arch-kwargs {', '.join(refused)} would load weights; prunecli builds timm models without them "
                "and loads the model file you give"
            )
        try:
            return timm.create_model(name, pretrained=False, **kwargs)
        except TypeError:
            raise  # build_model turns it into an error naming --arch-kwargs
        except Exception as exc:
            raise ArchitectureError(f"timm could not build {name} with {kwargs} ({type(exc).__name__}: {exc})") from exc

    return create


def _size(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int):
        return value, value
    if isinstance(value, list | tuple) and len(value) == 2:
        return int(value[0]), int(value[1])
    return None


def timm_input(name: str, kwargs: Mapping[str, Any]) -> tuple[tuple[int, int, int], tuple[float, ...], tuple[float, ...]]:
    """(C, H, W), mean and std of ``name`` from its pretrained config, which timm holds in its registry
    (no download); ``img_size`` and ``in_chans`` in ``kwargs`` change the shape the model is built for."""
    name, kwargs = _legacy_name(name, kwargs)
    cfg = _timm().models.get_pretrained_cfg(name)
    channels, height, width = cfg.input_size if cfg is not None else (3, 224, 224)
    height, width = _size(kwargs.get("img_size")) or (height, width)
    channels = int(kwargs.get("in_chans", channels))
    mean = tuple(cfg.mean) if cfg is not None else (0.485, 0.456, 0.406)
    std = tuple(cfg.std) if cfg is not None else (0.229, 0.224, 0.225)
    if len(mean) != channels:  # a config for RGB on a model built for other channel counts
        mean, std = (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
    return (channels, height, width), mean, std


def _meta_signature(name: str, kwargs: Mapping[str, Any]) -> dict[str, tuple[int, ...]] | None:
    """Keys and shapes of ``name`` built on the meta device (no memory, no init cost), or None if it cannot be."""
    timm = _timm()
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = timm.create_model(name, pretrained=False, **kwargs)
    except Exception:  # an architecture that cannot take these kwargs or be built on meta is no match
        return None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def timm_matches(state_dict: Mapping[str, torch.Tensor]) -> tuple[list[str], dict[str, Any]]:
    """The timm models whose keys and shapes equal ``state_dict``'s, and the kwargs they were built with.

    Candidates are the models whose pretrained config names a first conv and classifier that the file holds;
    each is built on the meta device and compared in full, so a match is never a guess. A layout that
    hundreds of models share (ViTs, EfficientNets) would take minutes to check; past ``MAX_CANDIDATES`` the
    error asks for ``--arch timm:NAME`` instead.
    """
    timm = _timm()
    wanted = {k: tuple(v.shape) for k, v in state_dict.items()}
    candidates: dict[str, dict[str, Any]] = {}
    for name in timm.list_models():
        cfg = timm.models.get_pretrained_cfg(name)
        classifiers = (cfg.classifier,) if isinstance(cfg.classifier, str) else tuple(cfg.classifier or ())
        first = wanted.get(f"{cfg.first_conv}.weight") if isinstance(cfg.first_conv, str) else None
        heads = [wanted.get(f"{c}.weight") for c in classifiers]
        if first is not None and len(first) > 1 and heads and all(h is not None and len(h) == 2 for h in heads):
            candidates[name] = {"num_classes": heads[0][0], "in_chans": first[1]}
    if len(candidates) > MAX_CANDIDATES:
        raise ArchitectureError(
            f"the weights have the layout of {len(candidates)} timm models (e.g. {', '.join(list(candidates)[:3])}), "
            "too many to tell apart quickly; pass --arch timm:NAME (or the spec of your own architecture)"
        )
    matches = [name for name, kwargs in candidates.items() if _meta_signature(name, kwargs) == wanted]
    found = candidates[matches[0]] if matches else {}
    return matches, {k: v for k, v in found.items() if (k, v) not in (("num_classes", 1000), ("in_chans", 3))}
