"""Small hand-made models with the coupling patterns that break naive pruners, each carrying its answer.

Every model class has:

* ``INPUT_SHAPE``: the (C, H, W) of one example.
* ``EXPECTED_GROUPS``: one entry per channel group, keyed by one of the group's producing layers (the
  root the graph picks is any of the group's ``out`` layers), a :class:`Expect` with the channel count,
  the number of blocks, the layers whose output channels (``out``) and input channels (``ins``) belong
  to the group, and the reason it is not prunable ("" when it is). Every group the graph reports is
  listed. A depthwise conv appears once, as an ``out`` member: its input channels follow its outputs.
* optionally ``EXPECTED_IN_INDICES``: ``{(key, consumer layer): indices}`` for consumers whose channel
  indices differ from the root positions (concatenation offsets, flatten into Linear).
* ``PLAN``: ``{key: channels to remove}`` and ``EXPECTED_SHAPES``: the weight shape of every conv,
  linear and norm layer after that plan, worked out by hand (grouped convs: in_channels / groups).

The answers are worked out by hand from the forward pass, not copied from the library's output.
"""

from __future__ import annotations

import copy
import itertools
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

OUTPUT = "feeds the model output"


@dataclass(frozen=True)
class Expect:
    channels: int
    out: frozenset[str]
    ins: frozenset[str] = field(default_factory=frozenset)
    blocks: int = 1
    reason: str = ""

    @property
    def prunable(self) -> bool:
        return not self.reason


def expect(channels: int, out: str, ins: str = "", blocks: int = 1, reason: str = "") -> Expect:
    """Shorthand: layer names as space-separated strings."""
    return Expect(channels, frozenset(out.split()), frozenset(ins.split()), blocks, reason)


class ResidualAdd(nn.Module):
    """stem -> [conv1 -> conv2] + identity -> head -> fc. stem and conv2 outputs are added: one group."""

    INPUT_SHAPE = (3, 16, 16)
    EXPECTED_GROUPS: ClassVar = {
        "stem": expect(8, "stem bn0 conv2 bn2", "conv1 head"),
        "conv1": expect(16, "conv1 bn1", "conv2"),
        "head": expect(12, "head", "fc"),
        "fc": expect(5, "fc", reason=OUTPUT),
    }
    PLAN: ClassVar = {"stem": 2, "conv1": 4, "head": 3}
    EXPECTED_SHAPES: ClassVar = {
        "stem": (6, 3, 3, 3), "bn0": (6,), "conv1": (12, 6, 3, 3), "bn1": (12,),
        "conv2": (6, 12, 3, 3), "bn2": (6,), "head": (9, 6, 1, 1), "fc": (5, 9),
    }

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 12, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        x = torch.relu(x + y)
        x = torch.relu(self.head(x))
        return self.fc(self.pool(x).flatten(1))


class ConcatBranches(nn.Module):
    """stem -> (branch_a: 8 ch, branch_b: 12 ch) -> cat -> merge (20 in) -> fc.

    The two branches stay separate groups; merge sees branch_b's channels at offset 8.
    """

    INPUT_SHAPE = (3, 16, 16)
    EXPECTED_GROUPS: ClassVar = {
        "stem": expect(16, "stem bn0", "branch_a branch_b"),
        "branch_a": expect(8, "branch_a bn_a", "merge"),
        "branch_b": expect(12, "branch_b bn_b", "merge"),
        "merge": expect(16, "merge bn_m", "fc"),
        "fc": expect(5, "fc", reason=OUTPUT),
    }
    EXPECTED_IN_INDICES: ClassVar = {
        ("branch_a", "merge"): tuple(range(8)),
        ("branch_b", "merge"): tuple(range(8, 20)),
    }
    PLAN: ClassVar = {"stem": 4, "branch_a": 2, "branch_b": 3, "merge": 4}
    EXPECTED_SHAPES: ClassVar = {
        "stem": (12, 3, 3, 3), "bn0": (12,), "branch_a": (6, 12, 3, 3), "bn_a": (6,),
        "branch_b": (9, 12, 1, 1), "bn_b": (9,), "merge": (12, 15, 3, 3), "bn_m": (12,), "fc": (5, 12),
    }

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.branch_a = nn.Conv2d(16, 8, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(8)
        self.branch_b = nn.Conv2d(16, 12, 1, bias=False)
        self.bn_b = nn.BatchNorm2d(12)
        self.merge = nn.Conv2d(20, 16, 3, padding=1, bias=False)
        self.bn_m = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        a = torch.relu(self.bn_a(self.branch_a(x)))
        b = torch.relu(self.bn_b(self.branch_b(x)))
        x = torch.relu(self.bn_m(self.merge(torch.cat([a, b], dim=1))))
        return self.fc(self.pool(x).flatten(1))


class DepthwiseSeparable(nn.Module):
    """conv1 -> depthwise (groups = channels) -> pointwise -> fc.

    The depthwise conv's output channels are its input channels: it joins conv1's group, with one block.
    """

    INPUT_SHAPE = (3, 16, 16)
    EXPECTED_GROUPS: ClassVar = {
        "conv1": expect(16, "conv1 bn1 dw bn_dw", "pw"),
        "pw": expect(24, "pw bn_pw", "fc"),
        "fc": expect(5, "fc", reason=OUTPUT),
    }
    PLAN: ClassVar = {"conv1": 4, "pw": 6}
    EXPECTED_SHAPES: ClassVar = {
        "conv1": (12, 3, 3, 3), "bn1": (12,), "dw": (12, 1, 3, 3), "bn_dw": (12,),
        "pw": (18, 12, 1, 1), "bn_pw": (18,), "fc": (5, 18),
    }
    EXPECTED_CONV_GROUPS: ClassVar = {"dw": 12}

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn_dw = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 24, 1, bias=False)
        self.bn_pw = nn.BatchNorm2d(24)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(24, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn_dw(self.dw(x)))
        x = torch.relu(self.bn_pw(self.pw(x)))
        return self.fc(self.pool(x).flatten(1))


class DepthwiseMultiplier(nn.Module):
    """conv1 (8 ch) -> depthwise with channel multiplier 2 (8 -> 16, groups=8) -> pw -> fc.

    Each of dw's 8 groups reads exactly one conv1 channel: removing one would remove a whole group, so
    conv1's group has 8 blocks of one channel (not prunable). dw's outputs are 8 blocks of 2.
    """

    INPUT_SHAPE = (3, 16, 16)
    EXPECTED_GROUPS: ClassVar = {
        "conv1": expect(8, "conv1 bn1", "dw", blocks=8, reason="too few channels"),
        "dw": expect(16, "dw bn_dw", "pw", blocks=8),
        "pw": expect(12, "pw bn_pw", "fc"),
        "fc": expect(5, "fc", reason=OUTPUT),
    }
    PLAN: ClassVar = {"dw": 8, "pw": 4}
    EXPECTED_SHAPES: ClassVar = {
        "conv1": (8, 3, 3, 3), "bn1": (8,), "dw": (8, 1, 3, 3), "bn_dw": (8,),
        "pw": (8, 8, 1, 1), "bn_pw": (8,), "fc": (5, 8),
    }
    EXPECTED_CONV_GROUPS: ClassVar = {"dw": 8}

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8, bias=False)
        self.bn_dw = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 12, 1, bias=False)
        self.bn_pw = nn.BatchNorm2d(12)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn_dw(self.dw(x)))
        x = torch.relu(self.bn_pw(self.pw(x)))
        return self.fc(self.pool(x).flatten(1))


class GroupedConv(nn.Module):
    """conv1 -> grouped conv (groups=4, 16 -> 16, not depthwise) -> conv3 -> fc.

    The grouped conv's input group (rooted at conv1) and its output group are one group that loses whole conv groups:
    4 blocks (the group width), a position taken from every block being one conv group of 4 channels.
    """

    INPUT_SHAPE = (3, 16, 16)
    EXPECTED_GROUPS: ClassVar = {
        "conv1": expect(16, "conv1 bn1 grouped bn2", "grouped conv3", blocks=4),
        "conv3": expect(8, "conv3", "fc"),
        "fc": expect(5, "fc", reason=OUTPUT),
    }
    PLAN: ClassVar = {"conv1": 8, "conv3": 2}  # two of the four conv groups
    EXPECTED_SHAPES: ClassVar = {
        "conv1": (8, 3, 3, 3), "bn1": (8,), "grouped": (8, 4, 3, 3), "bn2": (8,),
        "conv3": (6, 8, 1, 1), "fc": (5, 6),
    }
    EXPECTED_CONV_GROUPS: ClassVar = {"grouped": 2}

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 8, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.grouped(x)))
        x = torch.relu(self.conv3(x))
        return self.fc(self.pool(x).flatten(1))


class SqueezeExcite(nn.Module):
    """conv -> x * sigmoid(excite(relu(squeeze(avgpool(x))))) -> proj -> fc.

    The gate multiplies conv's channels one to one: excite's outputs join conv's group; squeeze's 4
    hidden channels are a group of their own.
    """

    INPUT_SHAPE = (3, 16, 16)
    EXPECTED_GROUPS: ClassVar = {
        "conv": expect(16, "conv bn excite", "squeeze proj"),
        "squeeze": expect(4, "squeeze", "excite"),
        "proj": expect(8, "proj bn_p", "fc"),
        "fc": expect(5, "fc", reason=OUTPUT),
    }
    PLAN: ClassVar = {"conv": 4, "squeeze": 1, "proj": 2}
    EXPECTED_SHAPES: ClassVar = {
        "conv": (12, 3, 3, 3), "bn": (12,), "squeeze": (3, 12, 1, 1), "excite": (12, 3, 1, 1),
        "proj": (6, 12, 1, 1), "bn_p": (6,), "fc": (5, 6),
    }

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.squeeze = nn.Conv2d(16, 4, 1)
        self.excite = nn.Conv2d(4, 16, 1)
        self.proj = nn.Conv2d(16, 8, 1, bias=False)
        self.bn_p = nn.BatchNorm2d(8)
        self.head_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        gate = torch.sigmoid(self.excite(torch.relu(self.squeeze(self.pool(x)))))
        x = x * gate
        x = torch.relu(self.bn_p(self.proj(x)))
        return self.fc(self.head_pool(x).flatten(1))


class FlattenLinear(nn.Module):
    """conv (8 ch) -> 4x4 pool -> flatten -> fc1 (128 in) -> fc2. Each conv channel is 16 fc1 inputs."""

    INPUT_SHAPE = (3, 16, 16)
    EXPECTED_GROUPS: ClassVar = {
        "conv": expect(8, "conv bn", "fc1"),
        "fc1": expect(16, "fc1", "fc2"),
        "fc2": expect(5, "fc2", reason=OUTPUT),
    }
    EXPECTED_IN_INDICES: ClassVar = {("conv", "fc1"): tuple(range(128))}
    PLAN: ClassVar = {"conv": 2, "fc1": 4}
    EXPECTED_SHAPES: ClassVar = {"conv": (6, 3, 3, 3), "bn": (6,), "fc1": (12, 6 * 16), "fc2": (5, 12)}
    SPATIAL = 16  # fc1 inputs per conv channel

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc1 = nn.Linear(8 * 16, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(torch.relu(self.bn(self.conv(x))))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


class SharedLayer(nn.Module):
    """One conv (``shared``) applied to two branches in one forward, its two outputs added.

    Both branches feed ``shared``'s input channels, so branch_a and branch_b are one group; ``shared``
    runs twice, so its MACs count twice.
    """

    INPUT_SHAPE = (3, 16, 16)
    EXPECTED_GROUPS: ClassVar = {
        "stem": expect(8, "stem bn0", "branch_a branch_b"),
        "branch_a": expect(16, "branch_a bn_a branch_b bn_b", "shared"),
        "shared": expect(12, "shared", "head"),
        "head": expect(8, "head bn_h", "fc"),
        "fc": expect(5, "fc", reason=OUTPUT),
    }
    PLAN: ClassVar = {"stem": 2, "branch_a": 4, "shared": 3, "head": 2}
    EXPECTED_SHAPES: ClassVar = {
        "stem": (6, 3, 3, 3), "bn0": (6,), "branch_a": (12, 6, 3, 3), "bn_a": (12,), "branch_b": (12, 6, 1, 1),
        "bn_b": (12,), "shared": (9, 12, 3, 3), "head": (6, 9, 1, 1), "bn_h": (6,), "fc": (5, 6),
    }

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.branch_a = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(16)
        self.branch_b = nn.Conv2d(8, 16, 1, bias=False)
        self.bn_b = nn.BatchNorm2d(16)
        self.shared = nn.Conv2d(16, 12, 3, padding=1)
        self.head = nn.Conv2d(12, 8, 1, bias=False)
        self.bn_h = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        a = torch.relu(self.bn_a(self.branch_a(x)))
        b = torch.relu(self.bn_b(self.branch_b(x)))
        x = torch.relu(self.shared(a) + self.shared(b))
        x = torch.relu(self.bn_h(self.head(x)))
        return self.fc(self.pool(x).flatten(1))


SLICE = "split into fixed-size parts (slice/unbind)"


class ChunkBranches(nn.Module):
    """stem (16 ch) -> chunk(2) -> (left: 8 -> 8, right: 8 -> 12) -> cat -> fc.

    chunk cuts whatever width it is given in two, so stem's channels go in two blocks, the same positions from
    each half, and left and right each keep reading their own half. The branches are ordinary groups.
    """

    INPUT_SHAPE = (3, 16, 16)
    EXPECTED_GROUPS: ClassVar = {
        "stem": expect(16, "stem bn0", "left right", blocks=2),
        "left": expect(8, "left", "fc"),
        "right": expect(12, "right", "fc"),
        "fc": expect(5, "fc", reason=OUTPUT),
    }
    EXPECTED_IN_INDICES: ClassVar = {("left", "fc"): tuple(range(8)), ("right", "fc"): tuple(range(8, 20))}
    EXPECTED_PARTIAL: ClassVar = {("stem", "left"), ("stem", "right")}  # each sees half of stem's channels
    PLAN: ClassVar = {"stem": 4, "left": 2, "right": 5}
    EXPECTED_SHAPES: ClassVar = {
        "stem": (12, 3, 3, 3), "bn0": (12,), "left": (6, 6, 3, 3), "right": (7, 6, 1, 1), "fc": (5, 13),
    }

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.left = nn.Conv2d(8, 8, 3, padding=1)
        self.right = nn.Conv2d(8, 12, 1)
        self.fc = nn.Linear(20, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        left, right = torch.chunk(x, 2, dim=1)
        x = torch.cat([torch.relu(self.left(left)), torch.relu(self.right(right))], dim=1)
        return self.fc(x.mean((2, 3)))


class C2fBlock(nn.Module):
    """Ultralytics' C2f: cv1 (12 ch) -> chunk(2) -> y0, y1; y2 = y1 + m2(m1(y1)) (a residual bottleneck on the second
    half); cat(y0, y1, y2) (18 ch) -> cv2 -> fc. The bottleneck's m2 adds into cv1's second half: one group of two
    blocks, rooted at cv1 (started at m2, the walk would reach only half of cv1). The concat reads both halves of the
    same split, which Torch-Pruning paired with the wrong parts."""

    INPUT_SHAPE = (3, 12, 12)
    EXPECTED_GROUPS: ClassVar = {
        "cv1": expect(12, "cv1 cv1_bn m2 m2_bn", "m1 cv2", blocks=2),
        "m1": expect(4, "m1 m1_bn", "m2"),
        "cv2": expect(10, "cv2 cv2_bn", "fc"),
        "fc": expect(5, "fc", reason=OUTPUT),
    }
    # cat(y0, y1, y2): cv1's channels 0..11 are cv2's inputs 0..11, and the bottleneck's sum (y1's roots 6..11) is
    # inputs 12..17 too, in the order walked
    EXPECTED_IN_INDICES: ClassVar = {("cv1", "cv2"): (*range(12, 18), *range(6, 12), *range(6))}
    EXPECTED_PARTIAL: ClassVar = {("cv1", "m1"), ("cv1", "m2"), ("cv1", "m2_bn")}
    PLAN: ClassVar = {"cv1": 4, "m1": 1, "cv2": 3}
    EXPECTED_SHAPES: ClassVar = {
        "cv1": (8, 3, 3, 3), "cv1_bn": (8,), "m1": (3, 4, 3, 3), "m1_bn": (3,), "m2": (4, 3, 3, 3), "m2_bn": (4,),
        "cv2": (7, 12, 1, 1), "cv2_bn": (7,), "fc": (5, 7),
    }

    def __init__(self):
        super().__init__()
        for name, (c_in, c_out, kernel) in {"cv1": (3, 12, 3), "m1": (6, 4, 3), "m2": (4, 6, 3), "cv2": (18, 10, 1)}.items():
            setattr(self, name, nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False))
            setattr(self, f"{name}_bn", nn.BatchNorm2d(c_out))
        self.fc = nn.Linear(10, 5)

    def conv(self, name: str, x: Tensor) -> Tensor:  # Ultralytics' Conv: conv, batch norm, SiLU
        return nn.functional.silu(getattr(self, f"{name}_bn")(getattr(self, name)(x)))

    def forward(self, x: Tensor) -> Tensor:
        y = list(self.conv("cv1", x).chunk(2, 1))
        y.append(y[-1] + self.conv("m2", self.conv("m1", y[-1])))
        return self.fc(self.conv("cv2", torch.cat(y, 1)).mean((2, 3)))


class HeldSplits(nn.Module):
    """Splits no removal keeps right: split((4, 4)) gives its widths as constants, and split(5) of 8 channels makes
    parts of 5 and 3. Those groups stay whole; the layers that read the parts prune."""

    INPUT_SHAPE = (3, 8, 8)
    EXPECTED_GROUPS: ClassVar = {
        "given": expect(8, "given", "a b", reason="split into parts of widths fixed in the forward (4, 4) "
                                                  "(split with sizes)"),
        "uneven": expect(8, "uneven", "c d", reason="split into parts of unequal widths (5, 3)"),
        "a": expect(2, "a", "fc"), "b": expect(2, "b", "fc"), "c": expect(2, "c", "fc"), "d": expect(2, "d", "fc"),
        "fc": expect(5, "fc", reason=OUTPUT),
    }
    EXPECTED_PARTIAL: ClassVar = {("given", "a"), ("given", "b"), ("uneven", "c"), ("uneven", "d")}
    EXPECTED_IN_INDICES: ClassVar = {("b", "fc"): (2, 3), ("c", "fc"): (4, 5), ("d", "fc"): (6, 7)}
    PLAN: ClassVar = {"a": 1, "d": 1}
    EXPECTED_SHAPES: ClassVar = {
        "given": (8, 3, 1, 1), "uneven": (8, 3, 1, 1), "a": (1, 4, 1, 1), "b": (2, 4, 1, 1), "c": (2, 5, 1, 1),
        "d": (1, 3, 1, 1), "fc": (5, 6),
    }

    def __init__(self):
        super().__init__()
        self.given = nn.Conv2d(3, 8, 1)
        self.uneven = nn.Conv2d(3, 8, 1)
        for name, width in (("a", 4), ("b", 4), ("c", 5), ("d", 3)):
            setattr(self, name, nn.Conv2d(width, 2, 1))
        self.fc = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        a, b = torch.relu(self.given(x)).split((4, 4), 1)
        c, d = torch.relu(self.uneven(x)).split(5, 1)
        parts = [self.a(a), self.b(b), self.c(c), self.d(d)]
        return self.fc(torch.cat([p.mean((2, 3)) for p in parts], 1))


class ChannelSlice(nn.Module):
    """stem (16 ch) -> x[:, 2:8] -> conv -> fc: the slice bounds are constants, so stem is pinned."""

    INPUT_SHAPE = (3, 16, 16)
    EXPECTED_GROUPS: ClassVar = {
        "stem": expect(16, "stem bn0", "conv", reason=SLICE),
        "conv": expect(8, "conv", "fc"),
        "fc": expect(5, "fc", reason=OUTPUT),
    }
    EXPECTED_PARTIAL: ClassVar = {("stem", "conv")}
    PLAN: ClassVar = {"conv": 3}
    EXPECTED_SHAPES: ClassVar = {"stem": (16, 3, 3, 3), "bn0": (16,), "conv": (5, 6, 3, 3), "fc": (5, 5)}

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.conv = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.conv(x[:, 2:8]))
        return self.fc(x.mean((2, 3)))


class FeatureTaps(nn.Module):
    """A detector backbone in small: a dict of feature maps, two of which the network also goes on from.

    ``mid``'s output is feature "0" and the input of ``deep``; ``lateral``'s is feature "1" and the input of
    ``extra`` (an FPN level that also feeds P6). A head reads each feature at its width, so those groups must
    stay whole although they have consumers; ``stem`` and ``deep`` are internal and prunable.
    """

    INPUT_SHAPE = (3, 16, 16)
    EXPECTED_GROUPS: ClassVar = {
        "stem": expect(8, "stem bn0", "mid"),
        "mid": expect(12, "mid bn1", "deep", reason=OUTPUT),
        "deep": expect(16, "deep", "lateral"),
        "lateral": expect(10, "lateral", "extra", reason=OUTPUT),
        "extra": expect(6, "extra", reason=OUTPUT),
    }
    PLAN: ClassVar = {"stem": 3, "deep": 5}
    EXPECTED_SHAPES: ClassVar = {
        "stem": (5, 3, 3, 3), "bn0": (5,), "mid": (12, 5, 3, 3), "bn1": (12,), "deep": (11, 12, 3, 3),
        "lateral": (10, 11, 1, 1), "extra": (6, 10, 3, 3),
    }

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.mid = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.deep = nn.Conv2d(12, 16, 3, stride=2, padding=1)
        self.lateral = nn.Conv2d(16, 10, 1)
        self.extra = nn.Conv2d(10, 6, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = torch.relu(self.bn0(self.stem(x)))
        c2 = torch.relu(self.bn1(self.mid(x)))
        p3 = self.lateral(torch.relu(self.deep(c2)))
        return {"0": c2, "1": p3, "2": self.extra(torch.relu(p3))}
class Heads(nn.Module):
    """Splits its features into heads whose width is an attribute, as timm's attention keeps ``head_dim``."""

    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.proj = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        y = self.proj(x).reshape(b, n, self.heads, self.head_dim).softmax(-1)
        return self.out(y.reshape(b, n, -1))


class HeadsInAttribute(nn.Module):
    """stem (8 ch, as tokens) -> Heads -> fc1 (64) -> fc2 -> head. Removing any channel Heads touches (its input,
    ``proj``, ``out``) breaks or skews its reshape; fc1's 64 hidden channels are free and hold most MACs."""

    INPUT_SHAPE = (3, 8, 8)

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.attn = Heads(8)
        self.fc1 = nn.Linear(8, 64)
        self.fc2 = nn.Linear(64, 8)
        self.head = nn.Linear(8, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.attn(self.stem(x).flatten(2).transpose(1, 2))
        x = self.fc2(torch.relu(self.fc1(x)))
        return self.head(x.mean(1))


class WidenAndAdd(nn.Module):
    """ReXNet's blocks: each widens the tensor with a 1x1 conv and adds its input into the first channels, through a
    slice and a concat. Every block hands the earlier groups another subset of indices."""

    INPUT_SHAPE = (3, 8, 8)

    def __init__(self, blocks: int = 5):
        super().__init__()
        widths = [8 + 4 * i for i in range(blocks + 1)]
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList(nn.Conv2d(a, b, 1) for a, b in itertools.pairwise(widths))
        self.fc = nn.Linear(widths[-1], 4)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for conv in self.blocks:
            y = conv(x)
            x = torch.cat([y[:, : x.shape[1]] + x, y[:, x.shape[1]:]], 1)
        return self.fc(x.mean((2, 3)))


class GhostModule(nn.Module):
    """GhostNet's module: primary 1x1 conv (6 ch) -> "cheap" depthwise conv on its output (6 ch) -> cat (12) ->
    depthwise conv_dw (12) -> pw (8) -> fc. Primary channel j feeds cat channels j and j + 6, so the group of
    conv_dw's 12 channels is two blocks of 6: position j goes with position j + 6."""

    INPUT_SHAPE = (3, 8, 8)

    def __init__(self):
        super().__init__()
        self.primary = nn.Conv2d(3, 6, 1, bias=False)
        self.cheap = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)
        self.conv_dw = nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False)
        self.pw = nn.Conv2d(12, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.primary(x))
        y = torch.cat([y, torch.relu(self.cheap(y))], 1)
        return self.fc(torch.relu(self.pw(torch.relu(self.conv_dw(y)))).mean((2, 3)))


class SkipConcatPReLU(nn.Module):
    """MONAI's UNet skip: stem -> bn0 -> PReLU (one shared slope) = skip; inner -> bn1 -> PReLU = deeper;
    cat([skip, deeper]) (8 + 12) -> merge -> fc. Torch-Pruning inferred no width for a PReLU's output (its last
    autograd input is the reshaped slope), so the concat had no offsets; merge sees inner's channels at offset 8."""

    INPUT_SHAPE = (3, 16, 16)
    EXPECTED_GROUPS: ClassVar = {
        "stem": expect(8, "stem bn0 act0", "inner merge"),
        "inner": expect(12, "inner bn1 act1", "merge"),
        "merge": expect(16, "merge bn_m", "fc"),
        "fc": expect(5, "fc", reason=OUTPUT),
    }
    EXPECTED_IN_INDICES: ClassVar = {
        ("stem", "merge"): tuple(range(8)),
        ("inner", "merge"): tuple(range(8, 20)),
    }
    PLAN: ClassVar = {"stem": 2, "inner": 3, "merge": 4}
    EXPECTED_SHAPES: ClassVar = {
        "stem": (6, 3, 3, 3), "bn0": (6,), "act0": (1,), "inner": (9, 6, 3, 3), "bn1": (9,), "act1": (1,),
        "merge": (12, 15, 3, 3), "bn_m": (12,), "fc": (5, 12),
    }

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.act0 = nn.PReLU()
        self.inner = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.act1 = nn.PReLU()
        self.merge = nn.Conv2d(20, 16, 3, padding=1, bias=False)
        self.bn_m = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        skip = self.act0(self.bn0(self.stem(x)))
        deeper = self.act1(self.bn1(self.inner(skip)))
        x = torch.relu(self.bn_m(self.merge(torch.cat([skip, deeper], dim=1))))
        return self.fc(self.pool(x).flatten(1))


class InputConcat(nn.Module):
    """cat([x, conv(x)]) -> merge -> head: the model's input (no node of the traced graph) comes first, so conv's
    channels sit at offset 3 of merge's input, where Torch-Pruning's offsets (of traced operands only) put them at 0."""

    INPUT_SHAPE = (3, 8, 8)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.merge = nn.Conv2d(11, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.merge(torch.cat([x, torch.relu(self.conv(x))], 1))))


TRICKY_MODELS: tuple[type[nn.Module], ...] = (
    ResidualAdd,
    ConcatBranches,
    DepthwiseSeparable,
    DepthwiseMultiplier,
    GroupedConv,
    SqueezeExcite,
    FlattenLinear,
    SharedLayer,
    ChunkBranches,
    C2fBlock,
    HeldSplits,
    ChannelSlice,
    FeatureTaps,
    SkipConcatPReLU,
)


def randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics (fresh ones are identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
    return model


# --- helpers shared by the graph, criteria and zero-invariance tests --------------------------------------


def example(cls: type[nn.Module], batch: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *cls.INPUT_SHAPE, generator=generator).to(dtype)


def find_group(groups, key: str):
    """The one group whose producing (``out``) layers include ``key``."""
    found = [g for g in groups if key in g.layers("out")]
    if len(found) != 1:
        raise AssertionError(f"{key!r} is an out member of {len(found)} groups: {[g.root for g in found]}")
    return found[0]


def spread_positions(channels: int, blocks: int, remove: int, seed: int = 0) -> list[int]:
    """``remove`` root positions chosen at random, the same offsets from each of ``blocks`` blocks."""
    if remove % blocks:
        raise ValueError(f"{remove} is not a multiple of {blocks} blocks")
    per_block = channels // blocks
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.randperm(per_block, generator=generator)[: remove // blocks].tolist()
    return sorted(b * per_block + o for b in range(blocks) for o in offsets)


def kill_and_prune(model: nn.Module, graph, plan) -> nn.Module:
    """Kill the plan's channels in a copy of ``model`` (returned) and in ``graph.model``, then remove them there."""
    dead = copy.deepcopy(model)
    by_index = {g.index: g for g in graph.groups}
    for index, positions in plan.items():
        kill_channels(dead, by_index[index], positions)
        kill_channels(graph.model, by_index[index], positions)
    graph.prune(plan)
    return dead


@torch.no_grad()
def kill_channels(model: nn.Module, group, positions) -> None:
    """Make the group's root channels ``positions`` exactly 0 wherever they are consumed.

    Zero the producing conv/linear filters and biases, and the following norm's gamma, beta and running
    mean (an instance norm's beta), so the channel is 0 after its norm, stays 0 through ReLU and PReLU, adds 0 in
    a residual and multiplies to 0 through a gate.
    """
    chosen = set(positions)
    for member in group.members:
        if member.dim != "out":
            continue
        module = model.get_submodule(member.layer)
        rows = [i for i, r in zip(member.indices, member.root_indices, strict=True) if r in chosen]
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            module.weight[:, rows] = 0
        elif isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            module.weight[rows] = 0
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.weight[rows] = 0
            module.running_mean[rows] = 0
        elif isinstance(module, nn.modules.instancenorm._InstanceNorm):  # a channel of zeros normalises to zeros
            if module.affine:
                module.bias[rows] = 0
        elif isinstance(module, nn.PReLU):  # zero stays zero, whatever the slope
            pass
        else:
            raise TypeError(f"do not know how to silence {type(module).__name__} {member.layer}")
        if getattr(module, "bias", None) is not None:
            module.bias[rows] = 0


def torchrun(tmp_path, script: str, *args) -> tuple[subprocess.CompletedProcess, Path]:
    """Run ``script`` in 2 gloo processes under torchrun with an empty ``out`` folder as its first argument."""
    path, out = tmp_path / "ddp_script.py", tmp_path / "out"
    path.write_text(script)
    out.mkdir()
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(path), str(out),
         *map(str, args)], capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1],
    )
    return run, out


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Torch's intra-op thread count set to ``count`` inside the block (or the decorated test), then restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class TinyBody(nn.Module):
    """Two stages of a CNN, for a detector's backbone in small."""

    def __init__(self):
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
                                    nn.Conv2d(12, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.layer2(self.layer1(x))


def tiny_detector(num_classes: int = 3) -> nn.Module:
    """A torchvision Faster R-CNN on a two-level FPN over ``TinyBody``, at 64x64: RPN, RoI heads, NMS and all."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops import MultiScaleRoIAlign

    torch.manual_seed(0)
    backbone = BackboneWithFPN(TinyBody(), {"layer1": "0", "layer2": "1"}, [8, 16], out_channels=8)
    anchors = AnchorGenerator(sizes=((8,), (16,), (32,)), aspect_ratios=((0.5, 1.0, 2.0),) * 3)
    return FasterRCNN(
        backbone, num_classes=num_classes, min_size=64, max_size=64, rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(["0", "1"], output_size=4, sampling_ratio=2), box_detections_per_img=20,
    ).eval()
