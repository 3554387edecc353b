"""What a criterion is, and the per-layer handling every criterion shares.

A criterion only maps tensors to per-channel scores (higher = more important): filter weights to
scores, or a batch of feature maps to a per-channel sum. Everything else lives here once: finding the
layers of each channel group, slicing their weights or activations to the group's channels, one
streaming pass over calibration data with hooks, normalising each layer's scores and reducing them to
one score per group channel.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from prunecli.config import GROUP_SCOPE, GROUP_SCOPES, REDUCTIONS
from prunecli.errors import DataError
from prunecli.graph import ChannelGroup, DependencyGraph, Member
from prunecli.layers import CONV_LINEAR, NORMS
from prunecli.outputs import single_tensor


class Criterion:
    """Base class. Subclasses set the class attributes and override one of the scoring methods.

    Attributes:
        name: the ``--method`` value.
        paper: citation of the method's source.
        summary: one line for ``--help``; marks reconstructed parts as [INFERRED].
        needs_data: scores come from feature maps of calibration images.
        needs_labels: scores need a loss, hence labelled data and gradients.
        scored_types: layer types whose output channels the criterion looks at.
        hook: for data criteria, ``"output"`` (the layer's raw output, before any norm) or
            ``"activation"`` (the channels as the next layer receives them: after norm, activation and
            residual add).
        needs_range: ``feature_statistic`` also takes each layer's activation range (min, max) over all
            the calibration images, which a first pass over the data measures.
        own_pass: statistics that are not per-channel sums (Gram matrices): ``pass_scores`` reads the data itself.
        group_members: with ``--group-scope all``, the member kinds besides the producers' filters that
            ``weight_scores`` also reads: ``"norm"`` (affine scales, as [n, 1] rows) and ``"in"`` (consumers'
            input slices). Empty: the criterion takes no scope and always scores ``scored_types`` outputs
            (data criteria read activations, not weights; per-layer statistics of a layer's filters do not
            extend to other layers' weights).
    """

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs_data: ClassVar[bool] = False
    needs_labels: ClassVar[bool] = False
    scored_types: ClassVar[tuple[type[nn.Module], ...]] = CONV_LINEAR
    hook: ClassVar[str] = "output"
    needs_range: ClassVar[bool] = False
    own_pass: ClassVar[bool] = False
    group_members: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, seed: int = 0, **options):
        self.seed = seed
        self.options = options

    def weight_scores(self, weight: Tensor) -> Tensor:
        """[n, ...] weights of n output channels -> [n] scores."""
        raise NotImplementedError(f"{self.name} does not score weights")

    def feature_statistic(self, features: Tensor, value_range: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """[B, n, ...] feature maps of n channels -> [n], summed over the batch (averaged later).

        ``value_range`` is the layer's (min, max) over all calibration images when ``needs_range`` is set.
        """
        raise NotImplementedError(f"{self.name} does not score feature maps")

    def finish(
        self, scores: dict[int, Tensor], graph: DependencyGraph, groups: list[ChannelGroup], reduction: str
    ) -> dict[int, Tensor]:
        """Last step of data scoring, per group: the scores as they are, unless a criterion adds weight terms."""
        return scores

    def gradient_statistic(self, module: nn.Module, indices: Tensor) -> Tensor:
        """After a backward pass: [n] scores of ``module``'s channels ``indices``, summed over the batch."""
        raise NotImplementedError(f"{self.name} does not score gradients")

    def pass_scores(
        self, graph: DependencyGraph, groups: list[ChannelGroup], batches: list[Tensor], device, progress
    ) -> dict[int, list[Tensor]]:
        """With ``own_pass``: one pass of the criterion's own over the image batches -> per group, a [channels]
        score of each member it reads (normalised and reduced like the hooked statistics)."""
        raise NotImplementedError(f"{self.name} makes no pass of its own")


def _regroup(weight: Tensor, groups: int) -> Tensor:
    """[A, b, ...] weights whose second dim holds each of ``groups`` blocks' b channels -> [groups * b, A / groups,
    ...]: row ``g * b + j`` is channel j of block g with the rows of block g along dim 0 (what a grouped layer
    connects it to)."""
    a, b = weight.shape[0] // groups, weight.shape[1]
    return weight.reshape(groups, a, b, *weight.shape[2:]).transpose(1, 2).reshape(groups * b, a, *weight.shape[2:])


def out_weight(module: nn.Module) -> Tensor | None:
    """The module's weight with output channels first, or None when it has none."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        return None
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return _regroup(weight, module.groups)  # stored [in, out / groups, ...]
    return weight


def in_weight(module: nn.Module) -> Tensor | None:
    """A conv/linear weight with input channels first: row c holds every weight that reads input channel c."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        return None
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return weight
    return _regroup(weight, getattr(module, "groups", 1))  # stored [out, in / groups, ...]


def to_root(member: Member, scores: Tensor, channels: int) -> Tensor:
    """Scatter a member's per-index scores onto the group's channels (mean where several map to one)."""
    return scatter(member.root_indices, scores, channels)


def scatter(root_indices: Iterable[int], scores: Tensor, channels: int) -> Tensor:
    """Scores of positions ``root_indices`` of a group -> [channels] (mean where several map to one, else 0)."""
    roots = torch.as_tensor(tuple(root_indices), dtype=torch.long)
    total = torch.zeros(channels, dtype=torch.float64).index_add_(0, roots, scores.double().cpu())
    counts = torch.zeros(channels, dtype=torch.float64).index_add_(0, roots, torch.ones(len(roots), dtype=torch.float64))
    return total / counts.clamp_min(1)


def normalise(scores: Tensor) -> Tensor:
    """Scale a layer's scores to mean magnitude 1, so layers of different scales can be combined."""
    return scores / (scores.abs().mean() + 1e-12)


def reduce_members(per_member: list[Tensor], reduction: str) -> Tensor:
    """The normalised scores of a group's members combined into one per channel (one of ``REDUCTIONS``)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown group reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    stacked = torch.stack([normalise(s) for s in per_member])
    if reduction == "max":
        return stacked.max(0).values
    if reduction == "sum":
        return stacked.sum(0)
    return stacked.mean(0)


@dataclass(frozen=True)
class ScoredMember:
    group: ChannelGroup
    member: Member


def scored_members(criterion: Criterion, graph: DependencyGraph, groups: Iterable[ChannelGroup]) -> list[ScoredMember]:
    """The (group, layer) pairs a criterion reads, by its hook point."""
    chosen = []
    for group in groups:
        outs = [m for m in group.members if m.dim == "out" and isinstance(graph.module(m.layer), criterion.scored_types)]
        if criterion.needs_data and criterion.hook == "activation":
            consumers = [
                m for m in group.members
                if m.dim == "in" and isinstance(graph.module(m.layer), nn.modules.conv._ConvNd)
                and len(m.indices) == group.channels
            ]
            outs = consumers[:1] or outs  # the channels as the next conv sees them; else the producers
        chosen.extend(ScoredMember(group, m) for m in outs)
    return chosen


def _member_weight(criterion: Criterion, module: nn.Module, dim: str, scope: str) -> Tensor | None:
    """The weight a criterion reads of one group member, channels first, or None when the scope skips it."""
    if dim == "out" and isinstance(module, criterion.scored_types):
        return out_weight(module)
    if scope != "all":
        return None
    if dim == "out" and isinstance(module, NORMS) and "norm" in criterion.group_members:
        weight = getattr(module, "weight", None)  # None without affine scales
        return weight.unsqueeze(1) if isinstance(weight, Tensor) and weight.dim() == 1 else None
    if dim == "in" and isinstance(module, CONV_LINEAR) and "in" in criterion.group_members:
        return in_weight(module)
    return None


def _member_rows(weight: Tensor, member: Member) -> tuple[Tensor, tuple[int, ...]]:
    """The member's rows of ``weight`` with their group channels. Where every channel has k rows (a Linear after a
    flatten reads k columns per channel) they are joined into one row per channel, so a channel is scored on
    all its weights at once."""
    whole = len(member.indices) == weight.shape[0] and member.indices == tuple(range(weight.shape[0]))
    rows = (weight.detach() if whole else weight.detach()[torch.as_tensor(member.indices, device=weight.device)]).float()
    roots = torch.as_tensor(member.root_indices, dtype=torch.long)
    channels, counts = roots.unique(return_counts=True)
    if len(channels) == len(roots) or not (counts == counts[0]).all():
        return rows, member.root_indices  # one row per channel, or uneven: to_root averages the rows
    order = torch.argsort(roots, stable=True).to(rows.device)
    joined = rows[order].reshape(len(channels), int(counts[0]), *rows.shape[1:]).flatten(1)
    return joined, tuple(channels.tolist())


def score_weights(
    criterion: Criterion,
    graph: DependencyGraph,
    groups: list[ChannelGroup],
    reduction: str = "mean",
    scope: str = GROUP_SCOPE,
) -> dict[int, Tensor]:
    """Weight-only scoring: one score per channel of each group.

    ``scope`` is ``"producers"`` (the output filters of the ``scored_types`` layers) or ``"all"``: also the
    members named by ``criterion.group_members``. Each member's scores are normalised, then reduced.
    """
    if scope not in GROUP_SCOPES:
        raise ValueError(f"unknown group scope {scope!r}; choose one of {', '.join(GROUP_SCOPES)}")
    per_group: dict[int, list[Tensor]] = {}
    for group in groups:
        for member in group.members:
            weight = _member_weight(criterion, graph.module(member.layer), member.dim, scope)
            if weight is None:
                continue
            rows, roots = _member_rows(weight, member)
            scores = criterion.weight_scores(rows)
            per_group.setdefault(group.index, []).append(scatter(roots, scores, group.channels))
    return _finish(groups, per_group, reduction, criterion)


@contextmanager
def gradients_only_for(model: nn.Module, modules: Iterable[nn.Module]) -> Iterator[None]:
    """Within the block only the parameters of ``modules`` require gradients, whatever they required before.

    A gradient criterion needs dL/d(its layers' parameters) only: without the other weights' gradients the
    backward pass skips every weight-gradient product (about half its cost) and the layers before the first
    scored one entirely.
    """
    wanted = {id(p) for module in modules for p in module.parameters(recurse=False)}
    before = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for param, _ in before:
            param.requires_grad_(id(param) in wanted)
        yield
    finally:
        for param, required in before:
            param.requires_grad_(required)


def score_with_data(
    criterion: Criterion,
    graph: DependencyGraph,
    groups: list[ChannelGroup],
    batches: Iterable[tuple[Tensor, Tensor | None]],
    reduction: str = "mean",
    device: torch.device | str = "cpu",
    progress=None,
) -> dict[int, Tensor]:
    """One streaming pass over ``batches``: hooks reduce each batch to per-channel sums at once.

    A criterion that ``needs_range`` gets a first pass that only measures each layer's activation range.
    """
    if criterion.own_pass:
        listed = [x for x, _ in batches]
        if not listed:
            raise DataError("the calibration data is empty; give at least one batch of images")
        per_member = criterion.pass_scores(graph, groups, listed, device, progress)
        return criterion.finish(_finish(groups, per_member, reduction, criterion), graph, groups, reduction)
    model = graph.model
    pairs = scored_members(criterion, graph, groups)
    # a layer can be one group's consumer (read at its input) and another's fallback producer (read at its output)
    by_layer: dict[tuple[str, bool], list[tuple[int, ScoredMember]]] = {}
    for i, pair in enumerate(pairs):
        at_input = criterion.hook == "activation" and pair.member.dim == "in"
        by_layer.setdefault((pair.member.layer, at_input), []).append((i, pair))
    sums: list[Tensor | None] = [None] * len(pairs)
    index_cache: dict[int, Tensor] = {}
    selects_all: dict[int, bool] = {}
    ranges: dict[int, tuple[Tensor, Tensor]] = {}
    measuring = criterion.needs_range

    def record(layer: str, at_input: bool, tensor: Tensor) -> None:
        for i, pair in by_layer[layer, at_input]:
            if selects_all.setdefault(i, list(pair.member.indices) == list(range(tensor.shape[1]))):
                channels = tensor.detach()  # no copy of the whole activation for the common case
            else:
                idx = index_cache.setdefault(i, torch.as_tensor(pair.member.indices, device=tensor.device))
                channels = tensor.detach().index_select(1, idx)
            if measuring:
                low, high = channels.min().float(), channels.max().float()
                if i in ranges:
                    low, high = torch.minimum(low, ranges[i][0]), torch.maximum(high, ranges[i][1])
                ranges[i] = (low, high)
                continue
            if criterion.needs_range:
                stat = criterion.feature_statistic(channels.float(), ranges[i])
            else:
                stat = criterion.feature_statistic(channels.float())
            if not torch.isfinite(stat).all():
                raise DataError(f"non-finite activations in {layer}; check the data's normalisation (--mean/--std)")
            sums[i] = stat if sums[i] is None else sums[i] + stat

    handles = []
    for layer, at_input in by_layer:
        module = graph.module(layer)
        if at_input:
            handles.append(module.register_forward_pre_hook(lambda mod, inputs, layer=layer: record(layer, True, inputs[0])))
        elif not criterion.needs_labels:
            handles.append(module.register_forward_hook(lambda mod, inputs, out, layer=layer: record(layer, False, out)))
    images = 0
    was_training = model.training
    model.eval()
    gradients = (
        gradients_only_for(model, {graph.module(pair.member.layer) for pair in pairs})
        if criterion.needs_labels
        else nullcontext()
    )
    try:
        if measuring:
            batches = list(batches)  # read twice
            with torch.no_grad():
                for x, _ in batches:
                    model(x.to(device))
            measuring = False
        with gradients:
            for x, y in batches:
                x = x.to(device)
                if criterion.needs_labels:
                    if y is None:
                        raise DataError(f"method {criterion.name} needs labelled data; the data has no labels")
                    model.zero_grad(set_to_none=True)
                    logits = single_tensor(model(x), f"method {criterion.name} (a loss on labels)")
                    loss = nn.functional.cross_entropy(logits, y.to(device))
                    loss.backward()
                    for i, pair in enumerate(pairs):
                        idx = index_cache.setdefault(i, torch.as_tensor(pair.member.indices, device=x.device))
                        stat = criterion.gradient_statistic(graph.module(pair.member.layer), idx)
                        sums[i] = stat if sums[i] is None else sums[i] + stat
                else:
                    with torch.no_grad():
                        model(x)
                images += len(x)
                if progress is not None:
                    progress(len(x))
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
        for handle in handles:
            handle.remove()
    if images == 0:
        raise DataError("the calibration data is empty; give at least one batch of images")
    per_group: dict[int, list[Tensor]] = {}
    for total, pair in zip(sums, pairs, strict=True):
        if total is not None:
            per_group.setdefault(pair.group.index, []).append(
                to_root(pair.member, total / images, pair.group.channels)
            )
    return criterion.finish(_finish(groups, per_group, reduction, criterion), graph, groups, reduction)


def _finish(
    groups: list[ChannelGroup], per_group: Mapping[int, list[Tensor]], reduction: str, criterion: Criterion
) -> dict[int, Tensor]:
    scores = {}
    for group in groups:
        found = per_group.get(group.index)
        if found:
            scores[group.index] = reduce_members(found, reduction)
    return scores
