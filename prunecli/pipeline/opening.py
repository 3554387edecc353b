"""Opening a model for a verb: the checkpoint read, its example input, its costs and output, its images."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from prunecli.config import DataOptions, ModelSource
from prunecli.errors import ArchitectureError, DataError, OptionError, first_line
from prunecli.graph.architectures import refuse_unsupported
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
    if options.source is None:
        raise OptionError("no images were given (DataOptions.source is None); pass --data, or for evaluate and "
                          "finetune decide the source with DataOptions.for_model")
    spec = DataSpec(options.source, options.root, tuple(loaded.input.shape), options.mean or loaded.input.mean,
                    options.std or loaded.input.std)
    return open_images(spec, limit=limit, seed=seed)


def labelled_images(options: DataOptions, loaded: LoadedModel, limit: int | None, seed: int, purpose: str) -> ImageSet:
    """:func:`load_images`, refused when the images carry no labels (evaluation and training need them)."""
    images = load_images(options, loaded, limit, seed)
    if images.labels is None:
        raise DataError(f"--data {options.source} has no labels; {purpose} needs labelled images")
    return images


@dataclass(frozen=True)
class ChosenData:
    """A verb's labelled images decided for its model (:meth:`DataOptions.for_model`), and the note that says so
    when nothing was given and Fashion-MNIST was taken."""

    options: DataOptions
    notes: list[str]


def data_for_model(options: DataOptions, loaded: LoadedModel, split: str, done: str) -> ChosenData:
    """``options`` with the source decided for ``loaded``'s input; ``done`` says what the default is used for
    ("evaluated", "trained")."""
    chosen = options.for_model(tuple(loaded.input.shape), split)
    if options.source is not None:
        return ChosenData(chosen, [])
    return ChosenData(chosen, [f"no --data given: {done} on {chosen.source}, the default for a model that takes "
                               "1x28x28 images; give --data to choose"])


def fewer_than_asked(option: str, asked: int | None, data_option: str, images: ImageSet, done: str) -> list[str]:
    """A note when ``option`` asked for more images than the data holds: the run went on with all of them, and
    says so (``--calib-images 1024: --data imgs holds 300 images; calibrated on all 300``)."""
    return shortfall(option, asked, data_option, images.description, len(images), done)


def shortfall(option: str, asked: int | None, data_option: str, data: str, held: int, done: str) -> list[str]:
    """:func:`fewer_than_asked` for images already counted: ``held`` of ``data``."""
    if asked is None or held >= asked:
        return []
    return [f"{option} {asked}: {data_option} {data} holds {held} images; {done} on all {held}"]
