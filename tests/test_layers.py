"""The one table of which parameters hold a channel, shared by soft pruning and EDP."""

from __future__ import annotations

from torch import nn

from prunecli.layers import channel_params


def _named(module: nn.Module, dim: str) -> list[tuple[str, int]]:
    names = {id(p): n for n, p in module.named_parameters()}
    return [(names[id(p)], d) for p, d in channel_params(module, dim)]


def test_convolutions_and_linear_layers_hold_outputs_in_dim_0_and_inputs_in_dim_1():
    for module in (nn.Conv1d(4, 6, 3), nn.Conv2d(4, 6, 3), nn.Conv3d(4, 6, 1), nn.Linear(4, 6)):
        assert _named(module, "out") == [("weight", 0), ("bias", 0)]
        assert _named(module, "in") == [("weight", 1)]
    assert _named(nn.Conv2d(4, 6, 3, bias=False), "out") == [("weight", 0)]


def test_transposed_convolutions_hold_them_the_other_way_round():
    module = nn.ConvTranspose2d(4, 6, 3)
    assert tuple(module.weight.shape[:2]) == (4, 6)
    assert _named(module, "out") == [("weight", 1), ("bias", 0)]
    assert _named(module, "in") == [("weight", 0)]


def test_depthwise_convolutions_have_no_inputs_of_their_own_and_norms_only_outputs():
    assert _named(nn.Conv2d(6, 6, 3, groups=6), "in") == []
    for norm in (nn.BatchNorm2d(6), nn.GroupNorm(2, 6), nn.LayerNorm(6)):
        assert _named(norm, "out") == [("weight", 0), ("bias", 0)]
        assert _named(norm, "in") == []
    assert _named(nn.BatchNorm2d(6, affine=False), "out") == []
    assert _named(nn.ReLU(), "out") == []
