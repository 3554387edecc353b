"""Model outputs as structures of tensors: segmentation models return dicts, detectors' feature paths ordered
dicts of feature maps, some classifiers tuples. Every check of an output (its shape kept by pruning, its parity
after reloading or exporting) walks all of its tensors, in one fixed order."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from prunecli.errors import ArchitectureError


def output_tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a model output (a tensor, or tuples/lists/dicts of them, nested), in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, list | tuple):
        return [t for item in output for t in output_tensors(item)]
    raise ArchitectureError(f"the model returns a {type(output).__name__}; prunecli handles tensors and tuples, lists "
                            "or dicts of them")


def output_shapes(output: Any) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(t.shape) for t in output_tensors(output))


def describe_shapes(shapes: tuple[tuple[int, ...], ...]) -> str:
    """'1x10', or '[1x21x64x64, 1x21x64x64]' for a structure."""
    text = ["x".join(map(str, shape)) for shape in shapes]
    return text[0] if len(text) == 1 else f"[{', '.join(text)}]"


def single_tensor(output: Any, what: str) -> torch.Tensor:
    """The output of a model that must return one tensor (class scores), with an error naming ``what`` needs it."""
    if isinstance(output, torch.Tensor):
        return output
    raise ArchitectureError(f"{what} needs a model that returns one tensor of class scores; this one returns a "
                            f"{type(output).__name__}")
