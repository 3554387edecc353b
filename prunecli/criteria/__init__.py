"""The registry of importance criteria: ``--method`` choices, help text and the test matrix come from it."""

from __future__ import annotations

import importlib

from prunecli.criteria.base import Criterion
from prunecli.errors import PrunecliError

_REGISTRY: dict[str, type[Criterion]] = {}
_BUILTIN = ("l1", "l2", "fpgm", "bn", "random", "lrmf", "dct", "icie", "sfp", "hrank", "chip", "taylor", "recon")
_loaded = False


def register_criterion(cls: type[Criterion]) -> type[Criterion]:
    """Class decorator: make a criterion selectable by its ``name``; a name may be registered once."""
    if cls.name in _REGISTRY:
        raise ValueError(f"criterion {cls.name!r} is already registered by {_REGISTRY[cls.name].__module__}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _BUILTIN:
            importlib.import_module(f"prunecli.criteria.{module}")


def list_criteria() -> list[str]:
    _load_builtin()
    return list(_REGISTRY)


def get_criterion(name: str) -> type[Criterion]:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise PrunecliError(f"unknown method {name!r}; choose one of: {', '.join(_REGISTRY)}") from None
