"""The model as Torch-Pruning's tracer must see it: activations out of place, and ShuffleNetV2's channel shuffle
as the permutation conv it is."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

SHUFFLE = "reaches a channel shuffle (ShuffleNetV2 interleaves the two branches' channels)"


class ShuffleStandIn(nn.Conv2d):
    """ShuffleNetV2's channel shuffle as the 1x1 convolution with a permutation matrix that it is, for tracing only.

    The real shuffle (view, transpose, view) defeats Torch-Pruning's index mapping (it crashes on it). As a conv it
    is a boundary the tracer understands: the block outputs that feed it, and the chunk after it, form groups
    that stay whole, while the channels inside each branch (most of the network's MACs) prune freely."""

    def __init__(self, channels: int, groups: int):
        with torch.random.fork_rng(devices=[]):  # its random init must not move the seeded stream of a run
            super().__init__(channels, channels, 1, bias=False)
        order = torch.arange(channels).view(groups, channels // groups).t().reshape(-1)
        with torch.no_grad():
            self.weight.zero_()
            self.weight[torch.arange(channels), order] = 1.0


@contextlib.contextmanager
def out_of_place(model: nn.Module):
    """Activations run out of place while tracing: an in-place ReLU straight after a conv rewrites the tensor's
    autograd history so that the tracer no longer sees the conv (SSD300's VGG traced no layer at all)."""
    changed = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    for module in changed:
        module.inplace = False
    try:
        yield
    finally:
        for module in changed:
            module.inplace = True


@contextlib.contextmanager
def traceable_shuffles(model: nn.Module):
    """While tracing, every ShuffleNetV2 block shuffles through a ``ShuffleStandIn`` child; afterwards the
    model is as it was (the stand-ins only ever sit in groups that are not pruned)."""
    from torchvision.models import shufflenetv2

    blocks = [m for m in model.modules() if isinstance(m, shufflenetv2.InvertedResidual)]
    if not blocks:
        yield
        return
    original, current = shufflenetv2.channel_shuffle, []

    def shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
        return current[-1].shuffle_stand_in(x)

    def enter(block, args) -> None:
        current.append(block)

    def leave(block, args, output) -> None:
        current.pop()

    hooks = []
    for block in blocks:
        block.shuffle_stand_in = ShuffleStandIn(2 * block.branch2[5].out_channels, 2).to(block.branch2[5].weight)
        hooks += [block.register_forward_pre_hook(enter), block.register_forward_hook(leave)]
    shufflenetv2.channel_shuffle = shuffle
    try:
        yield
    finally:
        shufflenetv2.channel_shuffle = original
        for hook in hooks:
            hook.remove()
        for block in blocks:
            del block.shuffle_stand_in
