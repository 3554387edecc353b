"""The parts every config shares: closed sets of choices, JSON round-trips, models, images, runs and scoring.

Every config round-trips through ``to_dict`` / ``from_dict`` (plain JSON values), as the artifacts embed them, and
checks its own values on construction (an :class:`~prunecli.errors.OptionError`, a usage error, names the option).
Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunecli.errors import OptionError

# --group-scope: the weight criteria score the producers' filters only, or every member of a coupled group
GROUP_SCOPES = ("producers", "all")
GROUP_SCOPE = "all"
LEGACY_GROUP_SCOPE = "producers"  # what a config recorded before the option existed was scored with
REDUCTIONS = ("mean", "max", "sum")  # how the layers of a coupled group combine their scores
ALLOCATIONS = ("uniform", "global", "efficiency", "dispersion", "sensitivity")
EDP_INITS = ("svd", "identity")
OPTIMIZERS = ("sgd", "adamw")
KD_MODES = ("none", "fixed", "variable")
KD_SCHEDULES = ("cosine", "linear", "step", "constant")
AUGMENTS = ("auto", "none")
AMP_MODES = ("auto", "on", "off")
LATENCY_RUNTIMES = ("onnxruntime", "torch")
LATENCY_BATCH = 1  # the batch latency is measured at (besides batch 1, where larger): one request at a time
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_MNIST_SHAPE = (1, 28, 28)  # the one input a model may be given Fashion-MNIST for without asking


def check(checks: Iterable[tuple[Any, str]]) -> None:
    """Raise an OptionError with the message of the first failed check."""
    for failed, message in checks:
        if failed:
            raise OptionError(message)


def choose(option: str, value: Any, choices: Iterable[str]) -> str:
    return f"{option} {value!r} is not one of {', '.join(choices)}"


def _plain(value: Any) -> Any:
    """A config field as a JSON value: paths as strings, tuples as lists, nested configs as their dicts."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def fields_dict(config: Any) -> dict[str, Any]:
    return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def _typed(hint: Any, value: Any) -> Any:
    """A JSON value as the type a config field declares: nested configs, paths, tuples, optionals."""
    if value is None:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _typed(next(a for a in args if a is not type(None)), value)
    if origin is tuple:
        return tuple(_typed(args[0], v) for v in value) if args else tuple(value)
    if origin is dict or hint is dict:
        return dict(value)
    if hasattr(hint, "from_dict"):
        return hint.from_dict(value)
    if hint is Path:
        return Path(value)
    return value


def from_plain(cls: type, data: Mapping[str, Any]) -> Any:
    """``cls`` from its ``to_dict``; keys it does not know (an older or newer release's) are left out."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: _typed(hints[k], v) for k, v in data.items() if k in known})


class JsonConfig:
    """What every config shares: ``to_dict`` gives plain JSON values, ``from_dict`` reads them back."""

    def to_dict(self) -> dict[str, Any]:
        return fields_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        return from_plain(cls, data)


@dataclass(frozen=True)
class LatencyTarget(JsonConfig):
    """How ``--latency-target`` measures: the runtime, the table grid and the correction loop (the batch is
    :attr:`LatencyOptions.batch`).

    Attributes:
        runtime: "onnxruntime" (CPU) or "torch" (eager, on the prune ``device``).
        tolerance: the measured latency may miss the target by this share of the target.
        iterations: whole slim models measured at most while correcting the target (seven: on torchvision
            MobileNetV2 a 0.7 target's measured times jump from 0.68 to 0.83 of the original between neighbouring
            plans, which five attempts did not always get back from; docs/benchmarks.md).
        grid: channel counts timed per layer dimension for the per-layer table (more where ``--round-to``
            leaves fewer choices).
        warmup, repeats: untimed and timed runs of every measurement (medians).
    """

    runtime: str = "onnxruntime"
    tolerance: float = 0.05
    iterations: int = 7
    grid: int = 5
    warmup: int = 3
    repeats: int = 10

    def __post_init__(self):
        check([
            (self.runtime not in LATENCY_RUNTIMES, choose("--latency-runtime", self.runtime, LATENCY_RUNTIMES)),
            (not 0 < self.tolerance < 1, f"the latency tolerance {self.tolerance} must lie strictly between 0 and 1"),
            (self.iterations < 1 or self.grid < 2 or self.warmup < 0 or self.repeats < 1,
             "latency targets need iterations >= 1, grid >= 2, warmup >= 0 and repeats >= 1"),
        ])



@dataclass(frozen=True)
class ModelSource(JsonConfig):
    """Where a model comes from and how to read it."""

    path: Path
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None
    trust_pickle: bool = False
    import_paths: tuple[Path, ...] = ()



@dataclass(frozen=True)
class DataOptions(JsonConfig):
    """Images for a command (``--data`` and friends): where they are, how many, in which batches, normalised how.

    ``source`` None: none given. Only ``evaluate`` and ``finetune`` accept that, and only for a model whose input
    is Fashion-MNIST's (:meth:`for_model`); there is no hidden default dataset for any other model.
    """

    source: str | None = None
    root: Path = FASHION_MNIST_ROOT
    calib_images: int = 256
    batch_size: int = 64
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self):
        check([
            (self.calib_images < 1, f"--calib-images {self.calib_images} must be at least 1"),
            (self.batch_size < 1, f"--batch-size {self.batch_size} must be at least 1"),
        ])

    def for_model(self, input_shape: tuple[int, ...], split: str, option: str = "--data",
                  purpose: str = "labelled images") -> DataOptions:
        """These options with their source decided: the one given, else Fashion-MNIST's ``split`` for a model
        that takes its 1x28x28 images (the sample models). Any other model must be given data: guessing a
        dataset for it would fail later with an error about image shapes, or worse, run on the wrong images.

        Raises:
            OptionError: no source was given and the model does not take 1x28x28 images.
        """
        if self.source is not None:
            return self
        shape = tuple(input_shape)
        if shape != FASHION_MNIST_SHAPE:
            raise OptionError(
                f"give {option} ({purpose}: an image folder with one sub-folder per class, or a tensor file with "
                f"'images' and 'labels'): this model takes {'x'.join(map(str, shape))} images, and only models "
                f"that take {'x'.join(map(str, FASHION_MNIST_SHAPE))} images default to fashion-mnist:{split}"
            )
        return dataclasses.replace(self, source=f"fashion-mnist:{split}")



@dataclass(frozen=True)
class RunOptions(JsonConfig):
    """How a command runs, whatever it does: seed, device, time limits and the threads of every timing.

    Attributes:
        seed: the random criterion, image subsets, training.
        device: a resolved device name ("cpu", "cuda:0"): where scoring, recovery and evaluation run.
        timeout: seconds allowed for tracing the model's channel dependencies.
        score_timeout: seconds allowed for each pass over the calibration images (scoring, sensitivity,
            reconstruction); None: no limit.
        threads: intra-op threads of every timing (None: onnxruntime the CPU count, torch its own setting).
    """

    seed: int = 0
    device: str = "cpu"
    timeout: float | None = 120.0
    score_timeout: float | None = None
    threads: int | None = None

    def __post_init__(self):
        check([
            (self.timeout is not None and not self.timeout > 0, f"--timeout {self.timeout} must be positive"),
            (self.score_timeout is not None and not self.score_timeout > 0,
             f"--score-timeout {self.score_timeout} must be positive"),
            (self.threads is not None and self.threads < 1, f"--threads {self.threads} must be at least 1"),
        ])



@dataclass(frozen=True)
class ScoringOptions(JsonConfig):
    """How channels are scored: the criterion and its options, how coupled layers combine, or a scores file.

    Attributes:
        method: a registered criterion (``prunecli.criteria``), or "edp" for ``prune --method edp``.
        options: the criterion's own options (``dct_band``, ``icie_lambda``, ``icie_capacity``).
        group_reduction: how the per-layer normalised scores of a coupled group combine (:data:`REDUCTIONS`).
        group_scope: weight criteria: "producers" (their output filters) or "all" group members.
        scores: ``prune --scores``: reuse a ``prunecli score`` file instead of scoring again.
    """

    method: str = "l1"
    options: dict[str, Any] = field(default_factory=dict)
    group_reduction: str = "mean"
    group_scope: str = GROUP_SCOPE
    scores: Path | None = None

    def __post_init__(self):
        check([
            (self.group_reduction not in REDUCTIONS, choose("--group-reduction", self.group_reduction, REDUCTIONS)),
            (self.group_scope not in GROUP_SCOPES, choose("--group-scope", self.group_scope, GROUP_SCOPES)),
        ])

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScoringOptions:
        return from_plain(cls, {"group_scope": LEGACY_GROUP_SCOPE, **data})


@dataclass(frozen=True)
class OutputOptions(JsonConfig):
    """Where a command writes, and whether it may replace an existing file there."""

    path: Path | None = None  # None: the command's default beside the input
    force: bool = False


