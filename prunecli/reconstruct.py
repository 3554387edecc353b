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

One forward pass suffices because every calibration batch runs in a thread of its own through each network, paused at
every refit layer: once all batches have reached layer L (only one thread computes at a time), L is solved on the
statistics of all of them and the threads run on to the next layer. The memory this takes is what one forward keeps
alive for one batch, times the number of batches, for both networks.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunecli.config import ReconstructOptions
from prunecli.errors import ArchitectureError, DataError

REFIT_TYPES = (nn.Conv2d, nn.Linear)
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


# ----------------------------------------------------------------------------- layers as least-squares problems


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


# ----------------------------------------------------------------------------- running batches in lockstep


class _Abort(BaseException):
    """Unwinds a paused forward pass that is no longer wanted (not an Exception: user code must not catch it)."""


_ACTIVE = threading.local()


class _PausedForward:
    """One forward pass of ``model`` on ``x`` in a thread of its own, stopping at the first call of every watched
    layer; :meth:`advance` runs it to its next stop and returns ``(layer, tensor)``, or None once it has finished."""

    def __init__(self, model: nn.Module, x: Tensor):
        self._model, self._x = model, x
        self._go, self._arrived = threading.Semaphore(0), threading.Semaphore(0)
        self._stop: tuple[str, Tensor] | None = None
        self._error: BaseException | None = None
        self._abort = False
        self._seen: set[str] = set()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._started = False

    def _main(self) -> None:
        _ACTIVE.forward = self
        self._go.acquire()
        try:
            if not self._abort:
                with torch.no_grad():
                    self._model(self._x)
        except _Abort:
            pass
        except BaseException as exc:  # handed to the coordinating thread
            self._error = exc
        self._stop = None
        self._arrived.release()

    def pause(self, layer: str, tensor: Tensor) -> None:
        """Called by a hook inside the pass: hand ``tensor`` over and wait to be resumed."""
        if layer in self._seen:
            return  # a layer called twice in one forward is fit on its first call
        self._seen.add(layer)
        self._stop = (layer, tensor)
        self._arrived.release()
        self._go.acquire()
        if self._abort:
            raise _Abort

    def advance(self) -> tuple[str, Tensor] | None:
        if not self._started:
            self._started = True
            self._thread.start()
        self._go.release()
        self._arrived.acquire()
        if self._error is not None:
            raise self._error
        return self._stop

    def close(self) -> None:
        if self._started and self._thread.is_alive():
            self._abort = True
            self._go.release()
            self._thread.join()


def _watch(model: nn.Module, layers: Sequence[str], where: str) -> list[Any]:
    """Hooks that pause the calling thread's forward pass at ``layers`` (their input or their output)."""

    def stop(layer: str, tensor: Tensor) -> None:
        forward = getattr(_ACTIVE, "forward", None)
        if forward is not None:
            forward.pause(layer, tensor)

    handles = []
    for layer in layers:
        module = model.get_submodule(layer)
        if where == "input":
            handles.append(module.register_forward_pre_hook(lambda mod, args, layer=layer: stop(layer, args[0])))
        else:
            handles.append(module.register_forward_hook(lambda mod, args, out, layer=layer: stop(layer, out)))
    return handles


class Lockstep:
    """The original and the pruned network run side by side over every batch, stopping at each watched layer.

    Iterating yields ``(layer, pairs)`` in forward order, ``pairs`` being each batch's (pruned input, original output)
    of that layer; a change made to the pruned layer before the next step is what the batches then run through.
    """

    def __init__(self, original: nn.Module, pruned: nn.Module, batches: Sequence[Tensor], layers: Sequence[str]):
        self._handles = _watch(original, layers, "output") + _watch(pruned, layers, "input")
        self._passes = [(_PausedForward(original, x), _PausedForward(pruned, x)) for x in batches]

    def __iter__(self):
        while True:
            stops = [(reference.advance(), slim.advance()) for reference, slim in self._passes]
            names = {stop[0] if stop else None for pair in stops for stop in pair}  # None: the pass has finished
            if len(names) != 1:
                raise ArchitectureError(
                    "the original and the pruned model ran their layers in different orders "
                    f"({sorted(names, key=str)[:3]}); reconstruction needs a forward that does not depend on the data"
                )
            (layer,) = names
            if layer is None:
                return
            yield layer, [(b[1], a[1]) for a, b in stops]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        for pair in self._passes:
            for forward in pair:
                forward.close()


# ----------------------------------------------------------------------------- the whole pass


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
