"""torchvision's and timm's ResNet-18 layouts, written out: torchvision (and so timm) does not import beside this
machine's CPU build of torch 2.13 (`operator torchvision::nms does not exist`). Module names match the libraries', so
the patterns a user writes for ``torchvision.models.resnet18`` (``layer1.0.conv1``, ``downsample.0``) or timm's
``resnet18`` (``layer1.0.act1``) work unchanged here.

Used by the channel tests and by ``benchmarks/shrink_latency.py``.
"""

import torch
from torch import nn


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, with its module names."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class TimmBasicBlock(nn.Module):
    """timm's ResNet BasicBlock (``timm.models.resnet``): ``act1``/``act2``, ``drop_block`` and ``aa`` placeholders,
    and the residual added in place before the last activation."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.drop_block, self.act1, self.aa = nn.Identity(), nn.ReLU(inplace=True), nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        shortcut = x
        x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        x = self.bn2(self.conv2(x))
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        return self.act2(x)


class ResNet18(nn.Module):
    """torchvision's `resnet18` layout: stem conv/bn/relu/maxpool, four stages of two BasicBlocks, avgpool, fc.

    Args:
        num_classes: outputs of ``fc``.
        widths: the channels of the four stages (torchvision's: 64, 128, 256, 512).
        in_channels: image channels.
        small_inputs: a 3x3 stride-1 stem without max pooling, for 28x28 or 32x32 images (as CIFAR ResNets do).
        timm: timm's blocks instead of torchvision's.
    """

    def __init__(
        self,
        num_classes: int,
        widths: tuple[int, int, int, int] = (64, 128, 256, 512),
        in_channels: int = 3,
        small_inputs: bool = False,
        timm: bool = False,
    ) -> None:
        super().__init__()
        inplanes = widths[0]
        if small_inputs:
            self.conv1 = nn.Conv2d(in_channels, inplanes, 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, inplanes, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small_inputs else nn.MaxPool2d(3, 2, 1)
        block = TimmBasicBlock if timm else BasicBlock
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(block(inplanes, planes, stride), block(planes, planes)))
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))
