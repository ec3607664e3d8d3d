"""The fused module runs at sizes other than the traced one even where a map is 1x1 at the traced size.

torch.export fixes a size that is 1 at the traced shape (and every size computed from it) as soon as an op
asks whether it is 1, as broadcasting does: a squeeze-excitation `x * x.mean((2, 3), keepdim=True)` on a 1x1
map.  EfficientViT-M0 traced at 64x64 (its last stage 1x1) then padded its windows by a constant and ran at
no other size.  The oracle is the original module itself.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

import convmerge

from .models import right_or_refused


class _Windows(nn.Module):
    """EfficientViT-M's local window partition (timm's LocalWindowAttention), a 1x1 conv for the attention."""

    def __init__(self, channels: int, ws: int = 4) -> None:
        super().__init__()
        self.ws, self.attn = ws, nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        ws = self.ws
        if h == ws and w == ws:
            return self.attn(x)
        x = x.permute(0, 2, 3, 1)
        pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        ph, pw = h + pad_b, w + pad_r
        nh, nw = ph // ws, pw // ws
        x = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws, ws, c).permute(0, 3, 1, 2)
        x = self.attn(x).permute(0, 2, 3, 1).view(b, nh, nw, ws, ws, c)
        x = x.transpose(2, 3).reshape(b, ph, pw, c)
        return x[:, :h, :w].contiguous().permute(0, 3, 1, 2)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.down = nn.Conv2d(4, 4, 3, stride=4, padding=1)
        self.windows = _Windows(4)
        self.b, self.c = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(self.bn(self.a(x)))
        x = x * x.mean((2, 3), keepdim=True).sigmoid()  # asks whether the map is 1x1: broadcasting
        x = x + self.windows(x)
        return self.c(self.b(torch.relu(x)))


def test_a_map_that_is_1x1_at_the_traced_size_stays_symbolic():
    torch.manual_seed(0)
    net = _Net().eval()
    with torch.no_grad():
        net.bn.running_mean.normal_()
        net.bn.running_var.uniform_(0.5, 1.5)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="convmerge")
        fused = convmerge.fuse(net, input_size=(4, 4))  # the map after `down` is 1x1
    convs = sum(isinstance(m, nn.Conv2d) for m in fused.modules())
    assert convs < sum(isinstance(m, nn.Conv2d) for m in net.modules())  # a -> bn and b -> c merged
    for shape in ((1, 3, 4, 4), (2, 3, 9, 9), (1, 3, 16, 12), (2, 3, 33, 7)):
        x = torch.randn(shape)
        with torch.no_grad():
            want, got = net(x), fused(x)
        assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-5), shape


class BranchesOnSize(nn.Module):
    """A forward that branches on its input's size: neither tracer follows both branches."""

    def __init__(self, above: int) -> None:
        super().__init__()
        self.above = above
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if x.shape[-1] > self.above:
            y = y * 2
        return y


def test_a_model_branching_on_its_input_size_is_fused_for_the_traced_shape_only() -> None:
    """torch.export's graph at symbolic sizes follows the example's branch and holds up to the size the branch
    turns at (its range constraints); its guards were left out and the end-to-end check (the example's size and
    smaller ones) did not reach the other branch: fused at 8x8, the module computed the 8x8 branch at 9x9 (2x off).
    Now it runs at the traced shape only, and says why."""
    torch.manual_seed(0)
    module = BranchesOnSize(8).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = convmerge.fuse(module, input_size=(8, 8))
    assert any("branches on its input's size" in str(w.message) for w in caught)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), module(x), rtol=1e-5, atol=1e-5)
    right_or_refused(fused, module, [(1, 3, 9, 9), (2, 3, 16, 12)], ValueError, 1e-5)

