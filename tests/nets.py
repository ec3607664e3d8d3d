"""Small PyTorch models covering the shapes convmerge meets."""

from __future__ import annotations

import torch
from torch import nn


def randomize_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    """Batch norms with non-trivial statistics, so folding them is really tested."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=gen))
                m.bias.copy_(torch.randn(m.num_features, generator=gen))
    return module.eval()


class Residual(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=2, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=0, bias=False)
        self.conv3 = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv3(self.conv2(self.bn(self.conv1(x)))) + x)


class Branches(nn.Module):
    """stem feeds two convs: it must never be merged away."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=2, bias=False)
        self.left = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.right = nn.Conv2d(8, 8, 1, bias=False)
        self.tail = nn.Conv2d(8, 4, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        return self.tail(self.left(s) * self.right(s))


def expandnet(c: int = 4, wide: int = 16) -> nn.Module:
    """ExpandNets-style linear expansion: 1x1 -> 3x3 -> 1x1 with no nonlinearity, then ReLU."""
    return nn.Sequential(nn.Conv2d(c, wide, 1, bias=False), nn.Conv2d(wide, wide, 3, padding=1, bias=False),
                         nn.Conv2d(wide, c, 1), nn.ReLU())


def conv1d_chain() -> nn.Module:
    return nn.Sequential(nn.Conv1d(2, 4, 3, padding=2, bias=False), nn.Conv1d(4, 4, 3, padding=2, bias=False),
                         nn.Dropout(0.5), nn.Conv1d(4, 2, 5, padding=2), nn.Identity(), nn.Conv1d(2, 2, 1))


def grouped_chain() -> nn.Module:
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=2, groups=4, bias=False), nn.BatchNorm2d(8),
                         nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, 1, groups=2), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.Conv2d(8, 4, 3, padding=1, bias=False))


def conv3d_pair() -> nn.Module:
    return nn.Sequential(nn.Conv3d(2, 4, 3, padding=2, bias=False), nn.Conv3d(4, 2, 3, padding=1, bias=False))


def same_padding_chain() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 6, 4, padding="same", bias=False), nn.Conv2d(6, 6, 1, bias=False),
                         nn.Conv2d(6, 3, 3, padding=1, padding_mode="reflect", bias=False))


def vgg_bn() -> nn.Module:
    """conv -> BN -> conv -> BN pairs (the 1x1 reads no padding, so the BN shift between is fine)."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1, bias=False),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),
                         nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4), nn.ReLU())


ALL = {
    "residual": lambda: randomize_bn(Residual()),
    "branches": Branches,
    "expandnet": expandnet,
    "conv1d": conv1d_chain,
    "grouped": lambda: randomize_bn(grouped_chain()),
    "conv3d": conv3d_pair,
    "same": same_padding_chain,
    "vgg": lambda: randomize_bn(vgg_bn()),
}
INPUT_DIMS = {"conv1d": 1, "conv3d": 3}
CHANNELS = {"residual": 8, "branches": 3, "expandnet": 4, "conv1d": 2, "grouped": 4, "conv3d": 2, "same": 3, "vgg": 3}
