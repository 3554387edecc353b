"""Reconstruction: refit the layers that pruning touched so the slim model reproduces the original, layer by layer.

After channels are removed, every Conv2d and Linear whose inputs or outputs lost channels is refit by ridge least
squares on unlabelled calibration images, in forward order: its output (before any norm) on the *pruned* network's
input must match the original layer's output on the kept channels, so the errors of earlier layers are corrected
instead of accumulated. No labels and no gradients: one forward pass of each network and one Gram matrix per layer.

Sources: He, Zhang, Sun, "Channel Pruning for Accelerating Very Deep Neural Networks", ICCV 2017 (least-squares
reconstruction of a layer's output after its input channels are pruned); Luo, Wu, Lin, "ThiNet", ICCV 2017 (the same
objective taken on the pruned network's input). Where we depart: the ridge shrinks towards the pruned weights instead
of towards zero (a direction the images do not excite keeps its trained value); biases are refit too, folded into the
running mean of a batch norm that is the layer's only consumer, else added to the layer; every eighth image is held
out, and a layer whose fit is not better than its pruned weights on those images keeps its pruned weights.

The layers are least-squares problems (``least_squares``: streamed Gram statistics, the ridge fit) solved in forward
order while both networks run over the calibration images in lockstep (``lockstep``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from prunecli.config import ReconstructOptions
from prunecli.errors import DataError
from prunecli.reconstruct.least_squares import REFIT_TYPES, GramStatistics, LayerView, ridge_fit, sample_positions
from prunecli.reconstruct.lockstep import Lockstep

MIN_GAIN = 1e-3  # a fit must cut the held-out error by this share to replace the pruned weights
EXACT = 1e-10  # a relative output error below this is rounding: the layer is exact as pruned


@dataclass(frozen=True)
class LayerFit:
    """The outcome for one layer: relative output errors on the held-out images before and after the fit."""

    layer: str
    inputs: int  # input dimensions of one group's least-squares problem (C_in/groups * k * k)
    rows: int  # patch rows the statistics were built from
    error_before: float
    error_after: float
    refit: bool  # False: the fit was not better and the pruned weights stay
    bias: str  # "refit", "folded into <norm>", "added" or "none"


@dataclass(frozen=True)
class ReconstructReport:
    images: int
    layers: list[LayerFit] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> why it was not refit
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "seconds": self.seconds, "layers": [asdict(fit) for fit in self.layers]}

    def summary(self) -> dict[str, Any]:
        """What the artifact records: the options' effect in a few numbers, not every layer."""
        refit = [fit for fit in self.layers if fit.refit]
        return {
            "images": self.images,
            "layers_refit": len(refit),
            "layers_kept": len(self.layers) - len(refit),
            "biases_added": [fit.layer for fit in refit if fit.bias == "added"],
            "mean_error_before": sum(f.error_before for f in self.layers) / max(1, len(self.layers)),
            "mean_error_after": sum(f.error_after for f in self.layers) / max(1, len(self.layers)),
            "skipped": self.skipped,
        }


def refit_layers(original: nn.Module, pruned: nn.Module) -> tuple[list[str], dict[str, str]]:
    """The layers to refit (conv/linear whose input or output width changed) and why other changed layers are not."""
    before = dict(original.named_modules())
    chosen, skipped = [], {}
    for name, module in pruned.named_modules():
        reference = before.get(name)
        if reference is None or not isinstance(module, nn.modules.conv._ConvNd | nn.Linear):
            continue
        if module.weight.shape == reference.weight.shape:
            continue
        if isinstance(module, REFIT_TYPES) and type(module) is type(reference):
            chosen.append(name)
        else:
            skipped[name] = f"{type(module).__name__} layers are not refit (only Conv2d and Linear)"
    return chosen, skipped


def reconstruct(
    original: nn.Module,
    pruned: nn.Module,
    kept_outputs: Mapping[str, Sequence[int]],
    batches: Iterable[Tensor],
    options: ReconstructOptions | None = None,
    bias_sink: Callable[[str], str | None] = lambda layer: None,
    device: torch.device | str = "cpu",
    progress: Callable[[str, int, int], None] | None = None,
) -> ReconstructReport:
    """Refit ``pruned``'s changed conv/linear layers in place on ``batches`` (images only).

    Args:
        original: the model before removal (left unchanged).
        pruned: the model after removal, with the same module names.
        kept_outputs: for every layer that lost output channels, the original indices that stay, in order.
        bias_sink: the name of the norm layer a bias-free layer's bias folds into (its only consumer), or None.
        progress: called with (layer, layers done, layers in all) after each layer.
    """
    started = time.perf_counter()
    options = options or ReconstructOptions()
    layers, skipped = refit_layers(original, pruned)
    images = [x.to(device) for x in batches]
    count = sum(len(x) for x in images)
    if count == 0:
        raise DataError("reconstruction needs calibration images; the data is empty")
    fits: list[LayerFit] = []
    was_training = (original.training, pruned.training)
    original.to(device).eval()
    pruned.to(device).eval()
    generator = torch.Generator().manual_seed(options.seed)
    lockstep = Lockstep(original, pruned, images, layers)
    try:
        for layer, pairs in lockstep:
            fits.append(_refit(layer, pruned, pairs, kept_outputs.get(layer), count, options, generator, bias_sink))
            if progress is not None:
                progress(layer, len(fits), len(layers))
    finally:
        lockstep.close()
        original.train(was_training[0])
        pruned.train(was_training[1])
    for layer in set(layers) - {fit.layer for fit in fits}:
        skipped[layer] = "never called as a module in forward (e.g. used through a functional call)"
    return ReconstructReport(count, fits, skipped, time.perf_counter() - started)


def _refit(
    layer: str,
    pruned: nn.Module,
    pairs: list[tuple[Tensor, Tensor]],
    kept: Sequence[int] | None,
    images: int,
    options: ReconstructOptions,
    generator: torch.Generator,
    bias_sink: Callable[[str], str | None],
) -> LayerFit:
    module = pruned.get_submodule(layer)
    view = LayerView(module)
    outputs = module.weight.shape[0] // view.groups
    fit, held = GramStatistics(view.groups, view.inputs, outputs), GramStatistics(view.groups, view.inputs, outputs)
    index = torch.as_tensor(list(kept), device=pairs[0][1].device) if kept is not None else None
    first = 0  # the number of the batch's first image
    for x, y in pairs:
        columns, targets = sample_positions(view, images, options.rows_per_input, generator, view.columns(x),
                                            view.targets(y, index))
        numbers = torch.arange(first, first + len(x), device=columns.device)
        first += len(x)
        out = numbers % options.holdout_every == options.holdout_every - 1 if options.holdout_every else numbers < 0
        for stats, chosen in ((fit, ~out), (held, out)):
            if chosen.any():
                stats.add(columns[chosen], targets[chosen])
    prior = view.matrix()
    judge = held if held.rows else fit
    before = judge.error(prior)
    solution = ridge_fit(fit, prior, options.ridge) if fit.rows else None
    after = judge.error(solution) if solution is not None else before
    better = solution is not None and before > EXACT and after < before * (1 - MIN_GAIN)
    if better and held.rows:
        solution = ridge_fit(fit.merged(held), prior, options.ridge)  # the held-out images count in the final fit
        better = solution is not None
    rows = fit.rows + held.rows
    if not better:
        return LayerFit(layer, view.inputs, rows, before, before, False, "none")
    return LayerFit(layer, view.inputs, rows, before, after, True, _assign(layer, pruned, view, solution, bias_sink))


def _assign(layer: str, pruned: nn.Module, view: LayerView, solution: Tensor, bias_sink) -> str:
    """Write the fitted weights; a layer without a bias gets it folded into its norm or as a new parameter."""
    module = view.module
    weight = module.weight
    weight.data.copy_(solution[:, :, :-1].reshape(weight.shape).to(weight))
    bias = solution[:, :, -1].reshape(-1).to(weight)
    if module.bias is not None:
        module.bias.data.copy_(bias)
        return "refit"
    sink = bias_sink(layer)
    norm = pruned.get_submodule(sink) if sink else None
    if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.running_mean is not None:
        norm.running_mean.data.sub_(bias.to(norm.running_mean))  # BN(x + b) with mean m equals BN(x) with mean m - b
        return f"folded into {sink}"
    module.bias = nn.Parameter(bias.clone(), requires_grad=weight.requires_grad)
    return "added"
