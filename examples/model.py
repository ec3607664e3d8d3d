"""A small network with every kind of conv pair convmerge judges (used by make_example.py and --arch).

- stem:    3x3 stride 2 pad 1 -> 3x3 pad 1          size-dependent (exact only for odd sizes)
- expand:  1x1 -> 3x3 pad 1 -> 1x1, no ReLU between  mergeable (ExpandNets-style linear expansion)
- bnpair:  3x3 pad 1 -> batch norm -> 1x1            mergeable (the 1x1 reads no padding)
- seed:    3x3 pad 0 -> 3x3 pad 2                    unmergeable (the seed thread's counterexample)
"""

from torch import nn


def build() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False),
        nn.Conv2d(16, 16, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(16, 64, 1, bias=False),
        nn.Conv2d(64, 64, 3, padding=1, bias=False),
        nn.Conv2d(64, 16, 1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.Conv2d(16, 16, 1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=0, bias=False),
        nn.Conv2d(16, 16, 3, padding=2, bias=False),
    )
