"""How the structural re-parameterisation repositories write their blocks, in plain torch.nn.

Each module here reproduces one pattern met in RepVGG, MobileOne, ACNet, RepLKNet or DBB (their
code never enters this repository) that once kept `convmerge.fuse` from reaching the repository's
own deploy conv count or from running at all.  Each is fused and compared with itself in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import convmerge

from .nets import randomize_bn


def conv_bn(cin: int, cout: int, k: int, **kwargs) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, bias=False, **kwargs), nn.BatchNorm2d(cout))


def convs(module: nn.Module) -> int:
    return sum(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in module.modules())


def fused_and_checked(net: nn.Module, channels: int, sizes=((9, 9), (10, 12))) -> nn.Module:
    torch.manual_seed(0)
    net = randomize_bn(net).double().eval()
    fused = convmerge.fuse(net, policy="all")
    with torch.no_grad():
        for size in sizes:
            x = torch.randn(2, channels, *size, dtype=torch.float64)
            want = net(x)
            assert torch.allclose(fused(x), want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))
    return fused


class InputNamedInput(nn.Module):
    """ACNet's ACBlock names its forward argument `input`, a Python builtin."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.square = conv_bn(c, c, 3, padding=1)
        self.one = conv_bn(c, c, 1)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.square(input) + self.one(input)


def test_an_input_named_after_a_builtin_is_found_in_the_rebuilt_graph() -> None:
    assert convs(fused_and_checked(InputNamedInput(4), 4)) == 1


class ZeroStart(nn.Module):
    """MobileOne's block: `identity_out = 0` when there is no skip branch, then `scale_out + identity_out`
    and `out += conv(x)` for each conv branch."""

    def __init__(self, c: int = 4, stride: int = 2, zero_first: bool = False) -> None:
        super().__init__()
        self.zero_first = zero_first
        self.scale = conv_bn(c, c, 1, stride=stride, groups=c)
        self.branches = nn.ModuleList(conv_bn(c, c, 3, stride=stride, padding=1, groups=c) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = 0 + self.scale(x) if self.zero_first else self.scale(x) + 0
        for branch in self.branches:
            out += branch(x)
        return torch.relu(out)


@pytest.mark.parametrize("zero_first", [False, True])
def test_adding_the_number_zero_is_no_layer(zero_first: bool) -> None:
    assert convs(fused_and_checked(ZeroStart(4, zero_first=zero_first), 4)) == 1


class SyncLargeKernel(nn.Module):
    """RepLKNet builds its batch norms as SyncBatchNorm (its default `use_sync_bn=True`): a 7x7 and a 3x3
    depthwise conv, each with its norm, summed.  In eval mode a SyncBatchNorm is a batch norm."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.large = nn.Sequential(nn.Conv2d(c, c, 7, padding=3, groups=c, bias=False), nn.SyncBatchNorm(c))
        self.small = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.SyncBatchNorm(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.large(x)
        out += self.small(x)
        return out


def test_sync_batch_norm_in_eval_mode_is_a_batch_norm() -> None:
    fused = fused_and_checked(SyncLargeKernel(4), 4)
    assert convs(fused) == 1
    assert not [m for m in fused.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class PoolThenNorm(nn.Module):
    """DBB's average-pooling branch: pooling, then a batch norm, with no conv.  Beside a branch that pads
    by reflection, the sum is no conv, but each branch is one."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.pool = nn.Sequential(nn.AvgPool2d(3, stride=1, padding=1), nn.BatchNorm2d(c))
        self.conv = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, padding_mode="reflect", bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x) + self.conv(x)


def test_a_merge_without_convs_is_stored_in_the_models_dtype() -> None:
    fused = fused_and_checked(PoolThenNorm(4), 4)
    merged = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert len(merged) == 2 and all(m.weight.dtype == m.bias.dtype == torch.float64 for m in merged)


class OffsetBorder(nn.Module):
    """DBB's BNAndPadLayer (a batch norm, a zero pad, the border overwritten per channel) with a border
    value that is not the batch norm's response to zero, so the pad stays a layer of its own."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.pad(self.bn(x), [1, 1, 1, 1])
        fill = (self.bn.bias.detach() + 1).view(1, -1, 1, 1)
        out[:, :, 0:1, :] = fill
        out[:, :, -1:, :] = fill
        out[:, :, :, 0:1] = fill
        out[:, :, :, -1:] = fill
        return out


class BorderThenHead(nn.Module):
    """A conv + BN fold that reads the written border, and a head that flattens by the batch size: the
    fused module must be the graph exported at symbolic sizes (the traced one fixes batch and size)."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 1)
        self.border = OffsetBorder(c)
        self.conv = conv_bn(c, c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(self.border(torch.relu(self.stem(x)))))
        return y.view(y.size(0), -1)


def test_a_merge_reading_a_written_border_runs_at_any_batch_and_size() -> None:
    fused = fused_and_checked(BorderThenHead(4), 3)
    assert _batch_norms_run(fused, torch.randn(1, 3, 9, 9, dtype=torch.float64)) == 1  # the border's: the conv's folded


def _batch_norms_run(module: nn.Module, x: torch.Tensor) -> int:
    """How many batch norms a forward computes (whichever tracer built the module: a module or an aten call)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        seen = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.seen += "batch_norm" in func.name()
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count():
        module(x)
    return Count.seen


def test_a_fused_module_takes_eval_but_not_train() -> None:
    fused = fused_and_checked(InputNamedInput(4), 4)
    assert fused.eval() is fused
    holder = nn.Sequential(fused, nn.ReLU())
    assert holder.eval() is holder  # a model holding a fused part is put in eval mode as usual
    with pytest.raises(RuntimeError, match="inference form"):
        fused.train()


def test_fusing_prints_no_warnings_of_torch() -> None:
    """torch.export's own deprecation warnings are not the user's business (every fuse printed one)."""
    import warnings

    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=2), nn.Conv2d(8, 8, 3, padding=1)).eval()
    with warnings.catch_warnings(record=True) as seen:  # recorded, not raised: torch catches what it raises
        warnings.simplefilter("always")
        convmerge.fuse(net)
    assert [str(w.message) for w in seen] == []
