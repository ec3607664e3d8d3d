"""`convmerge.fuse` inside a submodule torch.fx cannot trace (issue 21: EfficientViT's window attention branches on
its input's size, which sent the whole model to torch.export's symbolic trace): the submodule stays whole in the
fx graph and the modules it calls are fused in place, each traced by fx on the input it had."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

import convmerge
from convmerge.frontends import trace_export
from convmerge.frontends.trace import describe_module

from .models import right_or_refused
from .test_trace_fx_shapes import _randomised


class Cached(nn.Module):
    """EfficientViT's CascadedGroupAttention: a bias cached in a dict under the input's device at the first call in
    inference (under fx the key is a Proxy's name and the value a Proxy), and an attribute its caller reads."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.resolution = 4
        self.qkv = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.proj = nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.bias = nn.Parameter(torch.randn(c))
        self.cache: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.bias.view(1, -1, 1, 1) * 2
        return self.proj(self.qkv(x) + self.cache[key])


class Windowed(nn.Module):
    """EfficientViT's LocalWindowAttention: branches on the input's size (fx cannot trace it) and reads an attribute
    of the module it calls."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.attn = Cached(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == self.attn.resolution:
            return self.attn(x)
        return self.attn(x.flip(-1)).flip(-1)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8))
        self.mixer = Windowed(8)
        self.head = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(torch.relu(x + self.mixer(x)))


def _net() -> nn.Module:
    torch.manual_seed(1)
    return _randomised(Net()).double()  # float64 weights: the merged ones are stored unrounded, compared to 1e-10


def _agrees(fused: nn.Module, module: nn.Module) -> None:
    """Against the original in float64, at sizes taking both branches of `Windowed` (8: its input is 4 wide)."""
    for shape in [(2, 3, 8, 8), (1, 3, 17, 20), (2, 3, 9, 8), (1, 3, 32, 31)]:
        x = torch.randn(*shape, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), module(x), rtol=1e-10, atol=1e-10)


def test_a_submodule_fx_cannot_trace_is_fused_inside_without_torch_export(monkeypatch: pytest.MonkeyPatch) -> None:
    module = _net()

    def no_export(*args, **kwargs):
        raise AssertionError("torch.export ran")

    monkeypatch.setattr(trace_export, "describe", no_export)
    fused = convmerge.fuse(module, input_size=(8, 8))
    assert not [m for m in fused.modules() if isinstance(m, nn.BatchNorm2d)]  # the four folded, two of them inside
    assert isinstance(fused.get_submodule("mixer"), Windowed)  # kept whole, running its own forward
    assert fused.get_submodule("mixer.attn").resolution == 4  # what Windowed reads of the module it calls
    assert not any(isinstance(v, torch.fx.Proxy) for v in module.mixer.attn.cache.values())
    _agrees(fused, module)
    _agrees(pickle.loads(pickle.dumps(fused)), module)


def test_check_still_traces_such_a_model_with_torch_export() -> None:
    """`check` reports the merges of one description: fx's, with a submodule it could not see into, would miss
    those inside, so a model with one is traced by torch.export (only `fuse` enters the submodule)."""
    assert describe_module(_net(), "m", example_size=(8, 8), fx_first=True).tracer == "torch.export"
    traced = describe_module(_net(), "m", example_size=(8, 8), fx_first=True, enter=True)
    assert traced.tracer == "torch.fx" and list(traced.untraced) == ["mixer"]
    assert [t.shape for t in traced.untraced["mixer"]] == [torch.Size([1, 8, 4, 4])]  # its input in the example run


class RemembersPeak(nn.Module):
    """A dict written with a value of the input (a calibration on the first call): later calls read the first's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.seen: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = str(x.device)  # under fx, a Proxy's name: a new entry
        if key not in self.seen:
            self.seen[key] = x.abs().amax()
        return self.conv(x) / self.seen[key]


def test_a_value_of_the_input_written_into_a_dict_sends_the_module_to_torch_export_with_the_dict_as_it_was() -> None:
    """fx records no write into a module's dict: its graph would compute the value anew at every call."""
    module = RemembersPeak().double().eval()
    traced = describe_module(module, "m", example_size=(8, 8), fx_first=True)
    assert traced.tracer == "torch.export"
    assert not any(isinstance(v, torch.fx.Proxy) for v in module.seen.values())


def test_a_cache_of_a_value_of_the_tensors_alone_is_no_blind_spot_and_is_left_empty() -> None:
    """CascadedGroupAttention's (and LeViT's) bias cache, filled under fx with a Proxy: the graph computes the value
    at every call, the same value, so fx's description stands (LeViT-128S: 0.5 s, where torch.export takes 3.5 s);
    the Proxy does not stay in the module's dict."""
    module = Cached(4).double().eval()
    traced = describe_module(module, "m", example_size=(8, 8), fx_first=True)
    assert traced.tracer == "torch.fx" and module.cache == {}
    fused = convmerge.fuse(module, input_size=(8, 8))
    assert not [m for m in fused.modules() if isinstance(m, nn.BatchNorm2d)]
    for shape in [(1, 4, 8, 8), (2, 4, 5, 7)]:
        x = torch.randn(*shape, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), module(x), rtol=1e-10, atol=1e-10)


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class ReadsInside(nn.Module):
    """Reads the weight of a module inside the module it calls, on a branch the example does not take."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.block = Block(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 4:
            return self.block(x) + nn.functional.conv2d(x, self.block.conv.weight, padding=1)
        return self.block(x)


class PerSample(nn.Module):
    """Calls the module it holds on the batch (4-d), and a module inside it on each sample alone (3-d)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.Conv2d(c, c, 1)),
                                   nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 100:
            x = x.flip(-1)
        return self.block(x) + torch.stack([self.block[0](s) for s in x])


class Reranked(nn.Module):
    """Calls the module it holds on the batch (4-d), then on each sample alone (3-d)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.Conv2d(c, c, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 100:
            x = x.flip(-1)
        return self.block(x) + torch.stack([self.block(s) for s in x])


def _with(mixer: nn.Module) -> nn.Module:
    net = _net()
    net.mixer = mixer.double().eval()
    for m in mixer.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return net


def test_a_kept_forward_reading_a_merged_module_fails_rather_than_reading_the_merged_weights() -> None:
    """The merged conv took the name of the conv it replaced: `ReadsInside` read its weight, BN folded in, beside
    the call at other sizes (a silent wrong result).  Moved to a name the module never had, the read fails."""
    module = _with(ReadsInside(8))
    fused = convmerge.fuse(module, input_size=(8, 8))  # the mixer's input is 4 wide: the branch is not taken
    assert not [m for m in fused.modules() if isinstance(m, nn.BatchNorm2d)]
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), module(x), rtol=1e-10, atol=1e-10)
    right_or_refused(fused, module, [(1, 3, 17, 20), (2, 3, 12, 11)], AttributeError, 1e-10, torch.float64)


def test_a_module_called_on_tensors_of_another_rank_or_beside_its_callers_call_is_not_fused_whole() -> None:
    """`block` fused whole lost the `block[0]` its caller calls on each sample, and `block[0]` fused whole from its
    first call (4-d) would refuse the 3-d calls (its rank check): either sent the model to torch.export, which failed
    on it (`fuse` raised).  Now both are entered (their modules have none of their own: nothing merges there)."""
    for mixer in (PerSample(8), Reranked(8)):
        module = _with(mixer)
        fused = convmerge.fuse(module, input_size=(8, 8))
        _agrees(fused, module)


class CastsToItsWeight(nn.Module):
    """EdgeNeXt's pattern inside a kept forward: its input cast to its conv's weight dtype, read beside the call."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.block = Block(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.bn(self.block.conv(x.to(self.block.conv.weight.dtype)))


class Casting(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.inner = CastsToItsWeight(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 100:
            x = x.flip(-1)
        return self.inner(x)


def test_a_module_whose_graph_reads_its_own_weights_dtype_keeps_that_module_where_it_was(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`inner` is fused from fx's graph, which reads
    `block.conv.weight.dtype`: the merged conv moves away from `block.conv`, and the old module stays there for that
    read (deleted, the fused module failed and torch.export traced the model)."""
    def no_export(*args, **kwargs):
        raise AssertionError("torch.export ran")

    monkeypatch.setattr(trace_export, "describe", no_export)
    module = _with(Casting(8))
    fused = convmerge.fuse(module, input_size=(8, 8))
    _agrees(fused, module)
    assert not [m for m in fused.modules() if isinstance(m, nn.BatchNorm2d)]
    assert fused.get_submodule("mixer.inner.block.conv").weight.dtype == torch.float64
