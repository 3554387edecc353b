"""A Conv2d or Linear layer as least-squares problems: streamed Gram statistics of its inputs (and targets), the
ridge fit that ``prune --reconstruct`` refits a layer with, and the Optimal Brain Surgeon errors ``criteria/recon``
scores channels with."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunecli.errors import ArchitectureError

REFIT_TYPES = (nn.Conv2d, nn.Linear)


class LayerView:
    """A Conv2d or Linear seen as ``groups`` independent problems ``y[g] = W[g] @ columns[g] + b[g]``.

    ``columns`` turns the layer's input into ``[B, groups, D, L]`` (D inputs of one group, L positions per image) and
    ``targets`` the layer's output into ``[B, groups, O/groups, L]``.
    """

    def __init__(self, module: nn.Module):
        if isinstance(module, nn.Conv2d):
            self.groups = module.groups
            self.inputs = module.in_channels // module.groups * math.prod(module.kernel_size)
        elif isinstance(module, nn.Linear):
            self.groups, self.inputs = 1, module.in_features
        else:
            raise ArchitectureError(f"cannot refit a {type(module).__name__}; only Conv2d and Linear layers")
        self.module = module

    def columns(self, x: Tensor) -> Tensor:
        m = self.module
        if isinstance(m, nn.Linear):
            return x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2).unsqueeze(1)
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        padded = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
        patches = F.unfold(padded, m.kernel_size, dilation=m.dilation, stride=m.stride)
        return patches.view(x.shape[0], self.groups, self.inputs, patches.shape[-1])

    def targets(self, y: Tensor, kept: Tensor | None) -> Tensor:
        if isinstance(self.module, nn.Linear):
            y = y if kept is None else y.index_select(-1, kept)
            return y.reshape(y.shape[0], -1, y.shape[-1]).transpose(1, 2).unsqueeze(1)
        y = y if kept is None else y.index_select(1, kept)
        return y.reshape(y.shape[0], self.groups, -1, y.shape[2] * y.shape[3])

    def matrix(self) -> Tensor:
        """The weights and bias as ``[groups, O/groups, D + 1]`` (last column the bias, 0 when there is none)."""
        weight = self.module.weight.detach()
        rows = weight.reshape(self.groups, weight.shape[0] // self.groups, self.inputs)
        bias = self.module.bias
        bias = weight.new_zeros(weight.shape[0]) if bias is None else bias.detach()
        return torch.cat([rows, bias.reshape(self.groups, -1, 1)], dim=2)


class GramStatistics:
    """Streamed sums over patch rows, in float64: ``X X^T`` and, with targets, ``X Y^T`` and ``|Y|^2`` per group.

    ``X`` carries a constant row of ones after the layer's inputs, so the last row/column belongs to the bias.
    """

    def __init__(self, groups: int, inputs: int, outputs: int | None):
        self.gram = torch.zeros(groups, inputs + 1, inputs + 1, dtype=torch.float64)
        self.cross = torch.zeros(groups, inputs + 1, outputs, dtype=torch.float64) if outputs is not None else None
        self.energy = torch.zeros(groups, dtype=torch.float64)
        self.rows = 0

    def add(self, columns: Tensor, targets: Tensor | None = None) -> None:
        """``columns`` ``[B, G, D, L]`` and ``targets`` ``[B, G, O, L]`` of the same rows."""
        batch, groups, _, positions = columns.shape
        dtype = torch.promote_types(columns.dtype, torch.float32)  # float64 models stay float64
        ones = columns.new_ones(batch, groups, 1, positions, dtype=dtype)
        x = torch.cat([columns.to(dtype), ones], dim=2).permute(1, 2, 0, 3).reshape(groups, -1, batch * positions)
        self.gram += (x @ x.transpose(1, 2)).double().cpu()
        if targets is not None:
            y = targets.to(dtype).permute(1, 2, 0, 3).reshape(groups, -1, batch * positions)
            self.cross += (x @ y.transpose(1, 2)).double().cpu()
            self.energy += y.square().sum((1, 2)).double().cpu()
        self.rows += batch * positions

    def merged(self, other: GramStatistics) -> GramStatistics:
        total = GramStatistics(self.gram.shape[0], self.gram.shape[1] - 1, None)
        total.gram = self.gram + other.gram
        total.cross = self.cross + other.cross
        total.energy = self.energy + other.energy
        total.rows = self.rows + other.rows
        return total

    def error(self, weights: Tensor) -> float:
        """Summed squared error of ``weights`` ``[G, O, D + 1]`` on these rows, relative to the targets' energy."""
        w = weights.double().cpu()
        fitted = torch.einsum("god,gde,goe->", w, self.gram, w)
        residual = fitted - 2 * torch.einsum("god,gdo->", w, self.cross) + self.energy.sum()
        return float(residual.clamp_min(0) / self.energy.sum().clamp_min(1e-30))

    def regularised(self, ridge: float) -> tuple[Tensor, Tensor]:
        """The Gram matrix plus the ridge (on the inputs, barely on the bias) and the diagonal added."""
        inputs = self.gram.shape[1] - 1
        scale = self.gram[:, torch.arange(inputs), torch.arange(inputs)].mean(1).clamp_min(1e-12)
        diagonal = torch.ones(self.gram.shape[:2], dtype=torch.float64) * (ridge * scale)[:, None]
        diagonal[:, inputs] *= 1e-6
        return self.gram + torch.diag_embed(diagonal), diagonal


def ridge_fit(stats: GramStatistics, prior: Tensor, ridge: float) -> Tensor | None:
    """``argmin_W |W X - Y|^2 + ridge' |W - prior|^2`` per group (``prior`` ``[G, O, D + 1]``), or None if singular.

    The ridge grows tenfold up to three times before giving up on a matrix that is not positive definite.
    """
    prior64 = prior.double().cpu()
    for attempt in range(4):
        system, diagonal = stats.regularised(ridge * 10**attempt)
        factor, info = torch.linalg.cholesky_ex(system)
        if not bool((info != 0).any()):
            rhs = stats.cross + diagonal[:, :, None] * prior64.transpose(1, 2)
            solution = torch.cholesky_solve(rhs, factor).transpose(1, 2)
            if torch.isfinite(solution).all():
                return solution
    return None


def sample_positions(
    view: LayerView, images: int, rows_per_input: int, generator: torch.Generator, *tensors: Tensor
) -> tuple[Tensor, ...]:
    """The same random positions of ``[B, G, *, L]`` tensors: about ``rows_per_input`` rows per input dimension of
    the layer over ``images`` images in all, or every position where there are not more."""
    positions = tensors[0].shape[-1]
    wanted = max(1, math.ceil(rows_per_input * (view.inputs + 1) / images))
    if wanted >= positions:
        return tensors
    chosen = torch.randperm(positions, generator=generator)[:wanted].to(tensors[0].device)
    return tuple(t.index_select(3, chosen) for t in tensors)


@torch.no_grad()
def input_grams(
    model: nn.Module,
    layers: Sequence[str],
    batches: Sequence[Tensor],
    rows_per_input: int = 64,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> dict[str, GramStatistics]:
    """One pass over ``batches``: the Gram statistics of each layer's input patches (the layers' own inputs)."""
    images = sum(len(x) for x in batches)
    generator = torch.Generator().manual_seed(seed)
    views = {layer: LayerView(model.get_submodule(layer)) for layer in layers}
    stats = {layer: GramStatistics(view.groups, view.inputs, None) for layer, view in views.items()}

    def record(layer: str, x: Tensor) -> None:
        view = views[layer]
        (columns,) = sample_positions(view, images, rows_per_input, generator, view.columns(x))
        stats[layer].add(columns)

    handles = [
        model.get_submodule(layer).register_forward_pre_hook(lambda mod, args, layer=layer: record(layer, args[0]))
        for layer in layers
    ]
    was_training = model.training
    model.eval()
    try:
        for x in batches:
            model(x.to(device))
            if progress is not None:
                progress(len(x))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return stats


def removal_errors(view: LayerView, stats: GramStatistics, columns_of: Sequence[Sequence[int]], ridge: float) -> Tensor:
    """The output error a least-squares refit leaves in the layer when each set of its input channels goes.

    ``columns_of[r]`` lists the input channels removed together as one unit r. Removing the input dimensions S and
    refitting the rest optimally raises the squared error by ``tr(W_S [(G^-1)_SS]^-1 W_S^T)`` (the block form of
    Hassibi and Stork's Optimal Brain Surgeon), G the regularised Gram matrix of the layer's inputs (bias included,
    so a channel whose mean alone matters costs nothing) and W the weights.
    """
    system, _ = stats.regularised(ridge)
    inverse = torch.linalg.inv(system)  # [G, D + 1, D + 1]
    weights = view.matrix().double().cpu()  # [G, O, D + 1]
    per_group = view.module.weight.shape[1] if isinstance(view.module, nn.Conv2d) else view.inputs
    kernel = view.inputs // per_group
    width = {len(channels) for channels in columns_of}
    if len(width) != 1:
        raise ArchitectureError(f"units of different widths {sorted(width)} cannot be scored together")
    channels = torch.as_tensor([list(c) for c in columns_of], dtype=torch.long)  # [R, n]
    group = channels // per_group
    if not bool((group == group[:, :1]).all()):
        raise ArchitectureError("a unit spans several groups of a grouped layer")
    group = group[:, 0]
    columns = ((channels % per_group)[:, :, None] * kernel + torch.arange(kernel)).flatten(1)  # [R, n * k]
    blocks = inverse[group[:, None, None], columns[:, :, None], columns[:, None, :]]  # [R, nk, nk]
    removed = weights[group[:, None, None], torch.arange(weights.shape[1])[None, :, None], columns[:, None, :]]
    return torch.einsum("roi,rij,roj->r", removed, torch.linalg.inv(blocks), removed)
