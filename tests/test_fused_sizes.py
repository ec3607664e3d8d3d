"""The fused module runs at sizes other than the traced one even where a map is 1x1 at the traced size.

torch.export fixes a size that is 1 at the traced shape (and every size computed from it) as soon as an op
asks whether it is 1, as broadcasting does: a squeeze-excitation `x * x.mean((2, 3), keepdim=True)` on a 1x1
map.  EfficientViT-M0 traced at 64x64 (its last stage 1x1) then padded its windows by a constant and ran at
no other size.  The oracle is the original module itself.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import convmerge
from convmerge.frontends import trace

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



def _pad_same(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    ih, iw = x.size()[-2:]
    ph, pw = (max((math.ceil(n / s) - 1) * s + k - n, 0) for n in (ih, iw))
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


class PadSameAroundAChain(nn.Module):
    """timm's Conv2dSame (TF's 'same' padding, from the input's size) before and after a 1x1 conv chain: torch.export's
    graph computes the second pad from the size of a conv the chain's merge replaces."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(4, 4, 3, stride=2)
        self.a, self.bn_a = nn.Conv2d(4, 6, 1, bias=False), nn.BatchNorm2d(6)
        self.b, self.bn_b = nn.Conv2d(6, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.c = nn.Conv2d(8, 8, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(_pad_same(x, 3, 2))
        y = torch.relu(self.bn_b(self.b(self.bn_a(self.a(y)))))
        return self.c(_pad_same(y, 3, 2))


def test_a_replaced_conv_the_graphs_size_arithmetic_still_reads_keeps_its_own_weights(monkeypatch) -> None:
    """The merged conv took the module path of a conv it replaced, whose op stayed in the graph for the size it gives:
    that op then ran with the merged weights and the fused module raised (timm's tf_efficientnet_b0 on the
    torch.export route: no module returned).  The merged conv now takes a path of its own there."""
    monkeypatch.setattr(trace, "fx_with_shapes", lambda *args, **kwargs: None)  # the torch.export route
    torch.manual_seed(0)
    module = PadSameAroundAChain().double().eval()
    fused = convmerge.fuse(module, input_size=(16, 16))
    assert any(isinstance(m, nn.Conv2d) and (m.in_channels, m.out_channels) == (4, 8) for m in fused.modules())
    for shape in [(1, 4, 16, 16), (2, 4, 9, 13)]:
        x = torch.randn(*shape, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), module(x), rtol=1e-10, atol=1e-10)
