"""The accuracy benchmarks' teacher: a ResNet-18 shaped for 28x28 images (a user model file, in no zoo).

torchvision's ResNet-18 brings a 28x28 image down to 7x7 before its first stage (a
stride-2 7x7 stem and a max-pool) and stalls near 91% on Fashion-MNIST (12 epochs on
55,000 images: 91.3% on the test split). This one keeps the layout and module names
(conv1, bn1, maxpool, layer1-4, fc) and torchvision's BasicBlock, with a 3x3 stride-1
stem, so its first stage runs at 14x14, and half the widths (32-256), which keeps the
MACs near torchvision's at 28x28 (30.9M). Trained by `kpc train` (30 epochs, 55,000
images) it reads 94.52% on the validation split and 94.01% on the test split. Being a
file model, it also exercises kpc's path for user architectures:
`--model-file benchmarks/fmnist_net.py:resnet18_small`.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

WIDTHS = (32, 64, 128, 256)


def _stage(inplanes: int, planes: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
    return nn.Sequential(BasicBlock(inplanes, planes, stride, downsample), BasicBlock(planes, planes))


class SmallImageResNet18(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, WIDTHS[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTHS[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = _stage(WIDTHS[0], WIDTHS[0], 1)
        self.layer2 = _stage(WIDTHS[0], WIDTHS[1], 2)
        self.layer3 = _stage(WIDTHS[1], WIDTHS[2], 2)
        self.layer4 = _stage(WIDTHS[2], WIDTHS[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(WIDTHS[3], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def resnet18_small(num_classes: int = 10) -> nn.Module:
    return SmallImageResNet18(num_classes)
