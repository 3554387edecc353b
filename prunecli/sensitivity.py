"""Per-group sensitivity: how far the model's output moves when one channel group alone is narrowed, measured on
calibration images. ``--allocation sensitivity`` spends the budget where it moves the output least per unit of cost.

A criterion's scores are normalised per layer (``criteria.base.normalise``), so they rank the channels inside a group
but say nothing about how much a group matters to the network: an allocation on scores alone may cut a bottleneck
(MobileNetV2's 64-channel residual stream) to a tenth because its channels save the most time each. Measuring the
damage instead is the classic sensitivity analysis: Han, Pool, Tran, Dally, "Learning both Weights and Connections
for Efficient Neural Networks", NeurIPS 2015, and Intel's Distiller prune each layer alone at increasing ratios and
read the accuracy; Yang et al., NetAdapt, ECCV 2018, choose per step the layer whose cut to a latency budget loses
least. Here, with no labels and no training: for every prunable group and a few of its allowed widths, the lowest
scored channels (in the order plans remove them) are cut by zeroing them at the inputs of every conv/linear that reads
them (exactly what removing them does to those layers), and the relative squared error of all the model's output
tensors against the unpruned outputs is the group's damage at that width. The allocation (``allocate``) then treats
the damages of different groups as additive, as the sources do.

The damage is exact where the channels reach conv/linear readers through per-channel operations only (batch norm,
activations, adds, concatenation, pooling). Something that reduces across channels before a reader (LayerNorm over
channels as in ConvNeXt, GroupNorm, a mean over channels) still counts the zeroed channels in its statistics, where
removal would not: there the damage is an estimate (on a toy model with each norm, within 20% of the pruned models' curve).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from prunecli.allocate import GroupLimits, lowest_positions
from prunecli.graph import DependencyGraph
from prunecli.layers import CONV_LINEAR
from prunecli.outputs import output_tensors

LEVELS = 8  # widths measured per group, from its floor to full (the damage between them is interpolated)


def sensitivity_widths(limits: GroupLimits, levels: int = LEVELS) -> np.ndarray:
    """The allowed widths a group is measured at: ``levels`` of them evenly spaced over its choices, floor and full
    width included, ascending."""
    allowed = limits.allowed_keeps()
    picks = np.unique(np.round(np.linspace(0, len(allowed) - 1, min(levels, len(allowed)))).astype(int))
    return allowed[picks]


def damage_at(curve: tuple[np.ndarray, np.ndarray], width: int) -> float:
    """A group's damage at any allowed width: linear between the measured ones, as the allocation reads it."""
    widths, damage = curve
    return float(np.interp(width, widths, damage))


def group_sensitivity(
    graph: DependencyGraph,
    scores: Mapping[int, Tensor],
    limits: Mapping[int, GroupLimits],
    batches: Iterable[Tensor],
    device: torch.device,
    levels: int = LEVELS,
    progress: Callable[[int, int], None] | None = None,
    replay: bool = True,
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per scored prunable group, (widths ascending, relative output error at each width), each width measured
    with only that group narrowed; the error at full width is 0.

    ``batches`` are the calibration images (unlabelled). ``progress(done, total)`` follows the forward passes.
    ``replay=False`` reruns the whole model for every width (the same numbers, slower: for tests and benchmarks)."""
    groups = [g for g in graph.groups if g.index in scores and g.prunable and len(limits[g.index].allowed_keeps()) > 1]
    widths = {g.index: sensitivity_widths(limits[g.index], levels) for g in groups}
    batches = list(batches)
    cuts = [(g, int(k)) for g in groups for k in widths[g.index][:-1]]
    error = {cut: 0.0 for cut in ((g.index, k) for g, k in cuts)}
    total = len(batches) * (len(cuts) + 1)
    done = 0
    model = graph.model.eval().to(device)
    try:
        with torch.no_grad(), _Replay(model, replay) as replayer:
            reference_energy = 0.0
            for images in batches:
                images = images.to(device)
                reference = [t.double() for t in output_tensors(replayer.record(images))]
                reference_energy += sum(float(t.square().sum()) for t in reference)
                done += 1
                for group, keep in cuts:
                    removed = lowest_positions(scores[group.index], group.channels - keep, limits[group.index].blocks,
                                               limits[group.index].parts)
                    out = output_tensors(replayer.masked(images, _input_masks(graph, group, removed, device)))
                    error[group.index, keep] += sum(float((o.double() - r).square().sum())
                                                    for o, r in zip(out, reference, strict=True))
                    done += 1
                    if progress is not None:
                        progress(done, total)
    finally:
        model.to("cpu")
    scale = max(reference_energy, 1e-30)
    curves = {}
    for group in groups:
        keeps = widths[group.index]
        damage = np.array([error[group.index, int(k)] / scale for k in keeps[:-1]] + [0.0])
        curves[group.index] = (keeps, np.maximum.accumulate(damage[::-1])[::-1])  # narrower never hurts less
    return curves


def _input_masks(graph: DependencyGraph, group, removed: Sequence[int], device) -> dict[str, list[tuple[int, Tensor]]]:
    """Per conv/linear reading the group: (channel dim, its own input indices of the removed positions)."""
    gone = set(removed)
    masks: dict[str, list[tuple[int, Tensor]]] = {}
    for member in group.members:
        module = graph.module(member.layer)
        if member.dim != "in" or not isinstance(module, CONV_LINEAR):
            continue
        indices = [i for i, root in zip(member.indices, member.root_indices, strict=True) if root in gone]
        if indices:
            dim = -1 if isinstance(module, nn.Linear) else 1
            masks.setdefault(member.layer, []).append((dim, torch.as_tensor(indices, dtype=torch.long, device=device)))
    return masks


class _Replay:
    """While open, every conv/linear of ``model`` runs through this object. ``record`` runs the unpruned model and
    keeps each conv/linear call's output, in call order; ``masked`` zeroes the given input channels of the named
    layers and replays the recorded outputs of every call before the first masked one, which cannot differ: a group
    read late in the network costs only the layers from its readers on (the elementwise layers in between still run).
    Holds one batch's conv/linear outputs."""

    def __init__(self, model: nn.Module, replay: bool = True):
        self.model, self.replay = model, replay
        self.layers = [(name, m) for name, m in model.named_modules() if isinstance(m, CONV_LINEAR)]
        self.recording = False
        self.outputs: list[Tensor] = []
        self.callers: list[str] = []  # the layer of each recorded call
        self.masks: Mapping[str, list[tuple[int, Tensor]]] = {}
        self.replay_until = 0
        self.calls = 0

    def record(self, images: Tensor):
        self.outputs, self.callers, self.masks, self.replay_until, self.calls = [], [], {}, 0, 0
        self.recording = True
        try:
            return self.model(images)
        finally:
            self.recording = False

    def masked(self, images: Tensor, masks: Mapping[str, list[tuple[int, Tensor]]]):
        self.masks, self.calls = masks, 0
        first_masked = next((i for i, name in enumerate(self.callers) if name in masks), len(self.callers))
        self.replay_until = first_masked if self.replay else 0
        return self.model(images)

    def _forward(self, name: str, original: Callable):
        def forward(x, *args, **kwargs):
            call = self.calls
            self.calls += 1
            if call < self.replay_until:
                return self.outputs[call]
            if name in self.masks:
                x = x.clone()
                for dim, indices in self.masks[name]:
                    x.index_fill_(dim, indices, 0)
            out = original(x, *args, **kwargs)
            if self.recording and self.replay:
                self.outputs.append(out)
                self.callers.append(name)
            return out
        return forward

    def __enter__(self):
        self.shadowed = [m.__dict__.get("forward") for _, m in self.layers]
        for name, module in self.layers:  # an instance attribute shadows the class's forward
            module.forward = self._forward(name, module.forward)
        return self

    def __exit__(self, *exc):
        for (_, module), own in zip(self.layers, self.shadowed, strict=True):
            if own is None:
                del module.forward
            else:
                module.forward = own
        self.outputs, self.callers = [], []
