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
    "inverted": lambda: randomize_bn(inverted_residuals()),  # defined below, with the other blocks
}
INPUT_DIMS = {"conv1d": 1, "conv3d": 3}
CHANNELS = {"residual": 8, "branches": 3, "expandnet": 4, "conv1d": 2, "grouped": 4, "conv3d": 2, "same": 3, "vgg": 3, "inverted": 4}


# --- structural re-parameterisation blocks (written for these tests, after the papers' descriptions) ------


def _conv_bn(cin: int, cout: int, k, stride: int = 1, padding=0, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(cout))


class RepVGGBlock(nn.Module):
    """3x3 + BN, 1x1 + BN and (stride 1) a BN on the input, summed, then ReLU (RepVGG's training form)."""

    def __init__(self, c: int, stride: int = 1, cout: int = 0) -> None:
        super().__init__()
        cout = cout or c
        self.dense = _conv_bn(c, cout, 3, stride, 1)
        self.point = _conv_bn(c, cout, 1, stride, 0)
        self.skip = nn.BatchNorm2d(c) if stride == 1 and cout == c else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dense(x) + self.point(x)
        if self.skip is not None:
            y = y + self.skip(x)
        return torch.relu(y)


class TinyRepVGG(nn.Module):
    """Four RepVGG blocks: a deployed copy has one 3x3 conv per block."""

    deploy_convs = 4

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(RepVGGBlock(3, 2, 8), RepVGGBlock(8), RepVGGBlock(8, 2, 16), RepVGGBlock(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ACBlock(nn.Module):
    """ACNet: a square 3x3 and the horizontal 1x3 and vertical 3x1 kernels, each with a BN, summed."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.square = _conv_bn(c, c, 3, 1, 1)
        self.hor = _conv_bn(c, c, (1, 3), 1, (0, 1))
        self.ver = _conv_bn(c, c, (3, 1), 1, (1, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.square(x)
        out += self.hor(x)
        out += self.ver(x)
        return out


class MobileOneBlock(nn.Module):
    """MobileOne: k over-parameterised k x k branches, a 1x1 'scale' branch and a BN skip, summed."""

    def __init__(self, c: int, k: int = 3, depthwise: bool = True, branches: int = 3) -> None:
        super().__init__()
        g = c if depthwise else 1
        self.branches = nn.ModuleList([_conv_bn(c, c, k, 1, k // 2, g) for _ in range(branches)])
        self.scale = _conv_bn(c, c, 1, 1, 0, g)
        self.skip = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.scale(x) + self.skip(x)
        for b in self.branches:
            out = out + b(x)
        return torch.relu(out)


class LargeKernel(nn.Module):
    """RepLKNet: a large depthwise kernel and a small one beside it, each with a BN."""

    def __init__(self, c: int, big: int = 7, small: int = 3) -> None:
        super().__init__()
        self.big = _conv_bn(c, c, big, 1, big // 2, c)
        self.small = _conv_bn(c, c, small, 1, small // 2, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.big(x) + self.small(x)


class DBBLike(nn.Module):
    """Diverse Branch Block: k x k, 1x1, 1x1 -> BN -> k x k and 1x1 -> BN -> average pooling, each with a BN.

    With `bn_pad`, the inner BNs' outputs are padded with what the BN gives a zero input (its shift),
    as DBB does, and the k x k conv and pooling read no padding of their own; without it they
    zero-pad the BN's output, which is not one conv.
    """

    def __init__(self, c: int, bn_pad: bool) -> None:
        super().__init__()
        self.bn_pad = bn_pad
        p = 0 if bn_pad else 1
        self.origin = _conv_bn(c, c, 3, 1, 1)
        self.one = _conv_bn(c, c, 1)
        self.kxk_first = _conv_bn(c, c, 1)
        self.kxk = _conv_bn(c, c, 3, 1, p)
        self.avg_first = _conv_bn(c, c, 1)
        self.avg = nn.AvgPool2d(3, 1, p)
        self.avg_bn = nn.BatchNorm2d(c)

    def _pad(self, y: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
        if not self.bn_pad:
            return y
        value = (bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(1, -1, 1, 1)
        return torch.nn.functional.pad(y - value, [1, 1, 1, 1]) + value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.origin(x) + self.one(x)
        out = out + self.kxk(self._pad(self.kxk_first(x), self.kxk_first[1]))
        return out + self.avg_bn(self.avg(self._pad(self.avg_first(x), self.avg_first[1])))


def dbb_description(net: DBBLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """The graph description of a DBBLike with BN-and-pad: pads with a per-channel value tensor."""
    state = {k: v.detach() for k, v in net.state_dict().items()}
    layers: list[dict] = []

    def conv(name: str, src: str, padding: int) -> None:
        layers.append({"name": name, "op": "conv2d", "input": src, "padding": padding})

    def bn(name: str, src: str) -> None:
        layers.append({"name": name, "op": "batch_norm", "input": src, "eps": 1e-5})

    conv("origin.0", "x", 1), bn("origin.1", "origin.0")
    conv("one.0", "x", 0), bn("one.1", "one.0")
    conv("kxk_first.0", "x", 0), bn("kxk_first.1", "kxk_first.0")
    layers.append({"name": "kxk_pad", "op": "pad", "input": "kxk_first.1", "padding": 1})
    conv("kxk.0", "kxk_pad", 0), bn("kxk.1", "kxk.0")
    conv("avg_first.0", "x", 0), bn("avg_first.1", "avg_first.0")
    layers.append({"name": "avg_pad", "op": "pad", "input": "avg_first.1", "padding": 1})
    layers.append({"name": "avg", "op": "avg_pool2d", "input": "avg_pad", "kernel_size": 3, "stride": 1})
    bn("avg_bn", "avg")
    layers.append({"name": "sum", "op": "add", "inputs": ["origin.1", "one.1", "kxk.1", "avg_bn"]})
    for first, pad in (("kxk_first.1", "kxk_pad"), ("avg_first.1", "avg_pad")):
        b = net.get_submodule(first)
        state[f"{pad}.value"] = (b.bias - b.running_mean * b.weight / torch.sqrt(b.running_var + b.eps)).detach()
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    return {"version": 1, "inputs": ["x"], "layers": layers, "outputs": ["sum"]}, state


class PoolBranch(nn.Module):
    """A 3x3 conv beside a 3x3 average pooling of the same input (padding 1), summed."""

    def __init__(self, c: int, count_include_pad: bool) -> None:
        super().__init__()
        self.conv = _conv_bn(c, c, 3, 1, 1)
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=count_include_pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.pool(x)


class MixedModes(nn.Module):
    """Two 3x3 convs of one input, one reflect-padded, one zero-padded: never one conv."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=1, padding_mode="reflect")
        self.b = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


class Inception(nn.Module):
    """Parallel 1x1, 3x3 and 1x3 convs concatenated along channels (horizontal fusion)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(c, 4, 1)
        self.b = nn.Conv2d(c, 4, 3, padding=1)
        self.c = nn.Conv2d(c, 4, (1, 3), padding=(0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x), self.c(x)], dim=1)


class OddEven(nn.Module):
    """3x3 s2 p1 beside 2x2 s2 p0: their outputs have one length only for even inputs."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, 2, 1)
        self.b = nn.Conv2d(c, c, 2, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, BN, ReLU6, depthwise 3x3, BN, ReLU6, 1x1 project, BN (no activation),
    plus the input where the shape allows; a stack of them puts a residual add right before a conv."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand: int = 4) -> None:
        super().__init__()
        wide = cin * expand
        self.residual = stride == 1 and cin == cout
        self.body = nn.Sequential(_conv_bn(cin, wide, 1), nn.ReLU6(inplace=True),
                                  _conv_bn(wide, wide, 3, stride, 1, groups=wide), nn.ReLU6(inplace=True),
                                  _conv_bn(wide, cout, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


def inverted_residuals(c: int = 4) -> nn.Module:
    return nn.Sequential(InvertedResidual(c, c), InvertedResidual(c, 2 * c, stride=2), InvertedResidual(2 * c, 2 * c),
                         InvertedResidual(2 * c, 2 * c))


class LayerScale(nn.Module):
    """timm's LayerScale2d forms: `x.mul_(gamma)` with gamma [C, 1, 1], `x * gamma.view(1, -1, 1, 1)`, a scalar."""

    def __init__(self, c: int, form: str) -> None:
        super().__init__()
        self.form = form
        self.gamma = nn.Parameter(torch.randn(*{"inplace": (c, 1, 1), "view": (c,), "scalar": (1,)}[form]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "inplace":
            return x.mul_(self.gamma)
        return x * (self.gamma.view(1, -1, 1, 1) if self.form == "view" else self.gamma)


class RepMixer(nn.Module):
    """FastViT's token mixer, `x + ls * (mixer(x) - norm(x))`: a depthwise conv-BN plus a BN (MobileOne's mixer),
    minus a BN, scaled per channel, plus the input; all linear, so one depthwise conv."""

    def __init__(self, c: int, inplace: bool = False) -> None:
        super().__init__()
        self.dw = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c))
        self.skip, self.norm = nn.BatchNorm2d(c), nn.BatchNorm2d(c)
        self.ls = LayerScale(c, "inplace" if inplace else "view")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ls((self.dw(x) + self.skip(x)) - self.norm(x))
