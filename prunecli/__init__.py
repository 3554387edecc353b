"""prunecli: structured filter pruning for trained PyTorch CNNs.

Heavy modules (torch, torchvision, torch_pruning) are imported lazily so ``import prunecli`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prunecli._version import __version__

__all__ = [
    "__version__",
    "analyze_model",
    "evaluate_model",
    "export_artifact",
    "finetune_model",
    "load",
    "prune_model",
    "save_slim",
    "score_model",
]

if TYPE_CHECKING:
    from prunecli.api import analyze_model, evaluate_model, export_artifact, finetune_model, prune_model, score_model
    from prunecli.io.formats import load
    from prunecli.io.slim import save_slim

_LAZY = {
    "analyze_model": "prunecli.api",
    "prune_model": "prunecli.api",
    "score_model": "prunecli.api",
    "evaluate_model": "prunecli.api",
    "export_artifact": "prunecli.api",
    "finetune_model": "prunecli.api",
    "load": "prunecli.io.formats",
    "save_slim": "prunecli.io.slim",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'prunecli' has no attribute {name!r}")
