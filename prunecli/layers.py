"""Layer-level facts shared by the pruning methods and the slim file format.

EDP's :class:`DecomposedConv` lives here, not in ``prunecli.methods.edp``, because a slim file can hold one and the
reader (``prunecli.io.slim``) must rebuild it without importing a training method. :func:`channel_params` is the
one table of which parameters of a layer hold a channel, used by soft pruning (to mask channels) and by EDP (to
regularise and scale them).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from prunecli.config import EDP_INITS

CONV_LINEAR = (nn.modules.conv._ConvNd, nn.Linear)  # the layers whose channels prunecli scores, costs and removes
NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


class DecomposedConv(nn.Module):
    """A 2-d convolution as a basis conv (``rank`` filters, same geometry, no bias) and a 1x1 coefficient conv."""

    def __init__(self, conv: nn.Conv2d, in_channels: int, out_channels: int, rank: int, device=None):
        super().__init__()
        self.basis = nn.Conv2d(
            in_channels, rank, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=False,
            padding_mode=conv.padding_mode, device=device, dtype=conv.weight.dtype,
        )
        self.coeff = nn.Conv2d(rank, out_channels, 1, bias=conv.bias is not None, device=device, dtype=conv.weight.dtype)

    @classmethod
    def of(cls, conv: nn.Conv2d, init: str = "svd") -> DecomposedConv:
        """The block computing exactly (SVD: up to float rounding) what ``conv`` computes."""
        weight = conv.weight.detach()
        out_channels, in_channels = weight.shape[:2]
        if init == "identity":
            block = cls(conv, in_channels, out_channels, out_channels, weight.device)
            basis, coeff = weight, torch.eye(out_channels, dtype=weight.dtype, device=weight.device)
        elif init == "svd":
            u, s, vh = torch.linalg.svd(weight.reshape(out_channels, -1).double(), full_matrices=False)
            block = cls(conv, in_channels, out_channels, len(s), weight.device)
            basis, coeff = vh.reshape(len(s), *weight.shape[1:]), u * s
        else:
            raise ValueError(f"unknown EDP initialisation {init!r}; choose one of {', '.join(EDP_INITS)}")
        with torch.no_grad():
            block.basis.weight.copy_(basis)
            block.coeff.weight.copy_(coeff[:, :, None, None])
            if conv.bias is not None:
                block.coeff.bias.copy_(conv.bias)
        return block.train(conv.training)

    @property
    def rank(self) -> int:
        return self.basis.weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        return self.coeff(self.basis(x))

    def saves_macs(self) -> bool:
        """Whether the two convs cost fewer MACs than the one conv they compose: ``M (C k^2 + N) < N C k^2``."""
        out_channels, in_channels = self.coeff.weight.shape[0], self.basis.weight.shape[1]
        kernel = math.prod(self.basis.kernel_size)
        return self.rank * (in_channels * kernel + out_channels) < out_channels * in_channels * kernel

    def merged(self) -> nn.Conv2d:
        """The single conv with ``W'[i] = sum_j A[i, j] B[j]``: the same function, exactly in real arithmetic."""
        basis, coeff = self.basis, self.coeff
        conv = nn.Conv2d(
            basis.in_channels, coeff.out_channels, basis.kernel_size, basis.stride, basis.padding, basis.dilation,
            bias=coeff.bias is not None, padding_mode=basis.padding_mode, device=basis.weight.device,
            dtype=basis.weight.dtype,
        )
        with torch.no_grad():
            merged = torch.einsum("ij,jckl->ickl", coeff.weight[:, :, 0, 0].double(), basis.weight.double())
            conv.weight.copy_(merged)
            if coeff.bias is not None:
                conv.bias.copy_(coeff.bias)
        return conv.train(self.training)


def decomposed_layers(model: nn.Module) -> dict[str, DecomposedConv]:
    return {name: m for name, m in model.named_modules() if isinstance(m, DecomposedConv)}


def is_depthwise(module: nn.Module) -> bool:
    """A grouped convolution with one input channel per group: its input channels move with its outputs."""
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.groups == module.in_channels


def channel_params(module: nn.Module, dim: str) -> list[tuple[Tensor, int]]:
    """The parameters of ``module`` that hold a channel-group member along ``dim`` ("out" or "in"), each with the
    tensor dimension that indexes the channel.

    Convolutions (any dimensionality) and linear layers hold output channels in weight dim 0 and the bias and input
    channels in weight dim 1; transposed convolutions the other way round. A depthwise convolution has no input
    channels of its own (they are its output channels). Norm layers hold output channels in their affine weight and
    bias. Absent (``None``) parameters and buffers are left out.
    """
    if isinstance(module, NORMS):
        found = [(module.weight, 0), (module.bias, 0)] if dim == "out" else []
    elif isinstance(module, nn.modules.conv._ConvTransposeNd):
        if dim == "out":
            found = [(module.weight, 1), (module.bias, 0)]
        else:
            found = [] if is_depthwise(module) else [(module.weight, 0)]
    elif isinstance(module, nn.modules.conv._ConvNd | nn.Linear):
        if dim == "out":
            found = [(module.weight, 0), (module.bias, 0)]
        else:
            found = [] if is_depthwise(module) else [(module.weight, 1)]
    else:
        found = []
    return [(p, d) for p, d in found if isinstance(p, nn.Parameter)]
