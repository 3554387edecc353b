"""Opening a model for a verb: the checkpoint read, its example input, its costs and output, its images."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from prunecli.config import DataOptions, ModelSource
from prunecli.errors import ArchitectureError, DataError, first_line
from prunecli.graph import refuse_unsupported
from prunecli.io.data import DataSpec, ImageSet, open_images
from prunecli.io.formats import LoadedModel, open_checkpoint
from prunecli.measure import LayerCost, costs_and_output, count_params
from prunecli.results import ModelSummary, Totals


def open_model(source: ModelSource) -> LoadedModel:
    """The model of ``source``, read by the checkpoint format adapter that claims the file."""
    return open_checkpoint(source)


def with_base_arch(source: ModelSource, reference: LoadedModel) -> ModelSource:
    """A companion model (teacher, original) given as a bare state dict is read with the reference's base arch."""
    if source.arch is not None or reference.arch is None:
        return source
    return dataclasses.replace(source, arch=reference.arch.spec, arch_kwargs=dict(reference.arch.kwargs))


@dataclass(frozen=True)
class Profile:
    """A model run once on its example input: the per-layer costs, the output and the totals."""

    example: torch.Tensor  # a fixed pseudo-random batch of one, for tracing and costing
    costs: list[LayerCost]
    output: Any
    totals: Totals


def example_input(loaded: LoadedModel) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn((1, *loaded.input.shape), generator=generator)


def profile(loaded: LoadedModel) -> Profile:
    """Run the model once on its example input, or say clearly that it does not run on that input."""
    refuse_unsupported(loaded.model)
    x = example_input(loaded)
    try:
        costs, output = costs_and_output(loaded.model, x)
    except Exception as exc:
        raise ArchitectureError(
            f"the model does not run on input {tuple(x.shape[1:])} "
            f"({type(exc).__name__}: {first_line(exc, 150)}); pass the right --input-shape"
        ) from exc
    return Profile(x, costs, output, Totals(count_params(loaded.model), sum(c.macs for c in costs)))


def summary(loaded: LoadedModel, totals: Totals) -> ModelSummary:
    arch = loaded.arch
    return ModelSummary(str(loaded.source), arch.spec if arch else None, dict(arch.kwargs) if arch else {},
                        tuple(loaded.input.shape), totals.params, totals.macs, loaded.sha256)


def load_images(options: DataOptions, loaded: LoadedModel, limit: int | None, seed: int) -> ImageSet:
    """The images of ``options`` as the model expects them (its input shape and normalisation): ``limit`` of them
    (a seeded subset), or all."""
    spec = DataSpec(options.source, options.root, tuple(loaded.input.shape), options.mean or loaded.input.mean,
                    options.std or loaded.input.std)
    return open_images(spec, limit=limit, seed=seed)


def labelled_images(options: DataOptions, loaded: LoadedModel, limit: int | None, seed: int, purpose: str) -> ImageSet:
    """:func:`load_images`, refused when the images carry no labels (evaluation and training need them)."""
    images = load_images(options, loaded, limit, seed)
    if images.labels is None:
        raise DataError(f"--data {options.source} has no labels; {purpose} needs labelled images")
    return images
