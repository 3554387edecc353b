"""Architectures of the bundled sample models (``--arch sample:<name>``).

ResNet-20 follows He et al. (2016), CIFAR variant, with one departure: the shortcut that changes width is
a 1x1 conv + BN ("option B") instead of zero padding ("option A"), because a padding lambda cannot be
traced into a channel-dependency graph and would pin the stage widths.

MobileNetV2 follows Sandler et al. (2018): inverted residual blocks (1x1 expand, 3x3 depthwise, linear 1x1
project, residual add when the stride is 1 and the width stays), ReLU6 after every conv but the
projections. For 1x28x28 inputs it departs from the ImageNet network: the stem conv has stride 1 and only
two blocks have stride 2 (28 -> 14 -> 7, where the ImageNet network halves the resolution five times); 8
blocks of widths 16/24/32/64/96 instead of 17 up to 320; a final 1x1 conv to 384 channels instead of 1280.
That makes 222,890 parameters and 17.9 M MACs per image.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images: three stages of n basic blocks, widths 16/32/64."""

    def __init__(self, depth: int = 20, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


def resnet20(in_channels: int = 1, num_classes: int = 10) -> CifarResNet:
    return CifarResNet(20, in_channels, num_classes)


def resnet56(in_channels: int = 1, num_classes: int = 10) -> CifarResNet:
    return CifarResNet(56, in_channels, num_classes)


def conv_bn(
    in_planes: int, planes: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    """Conv (no bias, "same" padding) + BN, followed by ReLU6 unless ``act`` is false (linear bottleneck)."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_planes, planes, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(planes),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1x1 expand (skipped when ``expand_ratio`` is 1), 3x3 depthwise with the stride, linear 1x1 project."""

    def __init__(self, in_planes: int, planes: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_planes * expand_ratio
        layers = [conv_bn(in_planes, hidden)] if expand_ratio != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden), conv_bn(hidden, planes, act=False)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_planes == planes

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


# (expand ratio t, width c, blocks n, stride of the first block s), as in the paper's Table 2.
MOBILENETV2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 1), (6, 64, 2, 2), (6, 96, 1, 1))


class MobileNetV2(nn.Module):
    """MobileNetV2 for small images: stride-1 stem, 28 -> 14 -> 7, final 1x1 conv, global pool, Linear."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, stem: int = 16, last: int = 384):
        super().__init__()
        layers: list[nn.Module] = [conv_bn(in_channels, stem, 3)]
        in_planes = stem
        for t, c, n, s in MOBILENETV2_SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(in_planes, c, s if i == 0 else 1, t))
                in_planes = c
        layers.append(conv_bn(in_planes, last))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)
        # torchvision's MobileNetV2 initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def mobilenetv2(in_channels: int = 1, num_classes: int = 10) -> MobileNetV2:
    return MobileNetV2(in_channels, num_classes)


SAMPLE_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet56": resnet56,
    "mobilenetv2": mobilenetv2,
}
# Input shape (C, H, W) each sample architecture is trained for.
SAMPLE_INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "resnet20": (1, 28, 28),
    "resnet56": (1, 28, 28),
    "mobilenetv2": (1, 28, 28),
}
