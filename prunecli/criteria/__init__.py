"""The registry of importance criteria: ``--method`` choices, help text and the test matrix come from it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from prunecli.criteria.base import Criterion, score_weights, score_with_data
from prunecli.errors import OptionError
from prunecli.io.data import ImageSet, iterate_batches

if TYPE_CHECKING:
    import torch

    from prunecli.config import ScoringOptions
    from prunecli.graph import DependencyGraph

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
    """The built-in criteria in their documented order, then any registered later."""
    _load_builtin()
    return sorted(_REGISTRY, key=lambda name: _BUILTIN.index(name) if name in _BUILTIN else len(_BUILTIN))


def get_criterion(name: str) -> type[Criterion]:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise OptionError(f"unknown method {name!r}; choose one of: {', '.join(list_criteria())}") from None


def score_channels(scoring: ScoringOptions, seed: int, graph: DependencyGraph, images: ImageSet | None,
                   batch_size: int, device: torch.device | str = "cpu", progress=None) -> dict[int, torch.Tensor]:
    """Per-channel scores of every prunable group of ``graph``: from its weights, or for a data criterion from one
    pass over ``images`` in batches of ``batch_size`` on ``device`` (``progress(n)`` after each batch)."""
    criterion = get_criterion(scoring.method)(seed=seed, **scoring.options)
    groups = [g for g in graph.groups if g.prunable]
    if not criterion.needs_data:
        return score_weights(criterion, graph, groups, scoring.group_reduction, scoring.group_scope)
    return score_with_data(criterion, graph, groups, iterate_batches(images, batch_size), scoring.group_reduction,
                           device, progress)
