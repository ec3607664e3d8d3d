"""convmerge.load runs classifier heads and squeeze-excitation blocks: `torch.flatten(x, 1)`, functional
adaptive average pooling and `mean` over axes are recorded with their arguments (convmerge/frontends/argument_ops.py)
by both tracers, and run from them at any size; checked against the original modules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import convmerge
from convmerge.frontends import argument_ops, trace_export, trace_fx
from convmerge import model
from convmerge.options import Options

from . import models, nets


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class TinyResNet(nn.Module):
    """torchvision's ResNet head: an AdaptiveAvgPool2d module, then `torch.flatten(x, 1)`, then an nn.Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block = _conv_bn(3, 8, 2), _conv_bn(8, 8)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.block(x) + x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TinyMobileNetV2(nn.Module):
    """torchvision's MobileNetV2 head: `F.adaptive_avg_pool2d(x, (1, 1))`, `torch.flatten(x, 1)`, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(_conv_bn(3, 8, 2), _conv_bn(8, 6))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(6, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


class SqueezeExcite(nn.Module):
    """An SE block (`x.mean((2, 3), keepdim=True)`) and an EfficientNet-like head (`x.mean((2, 3))`)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = _conv_bn(3, 8)
        self.reduce, self.expand = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        scale = torch.sigmoid(self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        y = x * scale
        return torch.cat([y.mean((-2, -1)), F.adaptive_avg_pool1d(y.flatten(2), 1).flatten(1)], 1)


NETS = {"resnet": TinyResNet, "mobilenetv2": TinyMobileNetV2, "se": SqueezeExcite}
SIZES = [(1, (7, 7)), (2, (16, 16)), (2, (9, 13)), (3, (32, 20))]


def _net(name: str) -> nn.Module:
    torch.manual_seed(11)
    return nets.randomize_bn(NETS[name]()).double().eval()


def _fused(tmp_path: Path, net: nn.Module) -> Path:
    src, out = tmp_path / "m.safetensors", tmp_path / "m.fused.safetensors"
    convmerge.save(net, src)
    model.fuse_file(str(src), str(out), Options(policy="all"))
    return out


def _same_at_every_size(loaded: nn.Module, net: nn.Module) -> None:
    for batch, size in SIZES:
        x = torch.randn(batch, 3, *size, dtype=torch.float64)
        with torch.no_grad():
            want = net(x)
            got = loaded(x)
        assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-9, atol=1e-9), (batch, size)


@pytest.mark.parametrize("name", sorted(NETS))
def test_heads_load_from_the_fused_file_and_run_at_any_size(tmp_path, name):
    net = _net(name)
    out = _fused(tmp_path, net)
    _same_at_every_size(convmerge.load(out, arch=net), net)


def test_an_se_block_and_a_mean_head_load_without_arch(tmp_path):
    net = _net("se")
    _same_at_every_size(convmerge.load(_fused(tmp_path, net)), net)


def _argument_layers(doc: dict) -> dict[str, dict]:
    keys = {"name", "input", "inputs", "traced_size"}
    return {layer["name"]: {k: v for k, v in layer.items() if k not in keys} for layer in doc["layers"]
            if layer["op"] in argument_ops.ARGUMENT_OPS}


@pytest.mark.parametrize("name", sorted(NETS))
def test_both_tracers_record_the_same_arguments_and_an_fx_description_loads(tmp_path, name):
    net = _net(name)
    exported, fx_doc = trace_export.describe(net).doc, trace_fx.describe(net).doc
    wanted = {"resnet": ["flatten"], "mobilenetv2": ["adaptive_avg_pool2d", "flatten"],
              "se": ["mean", "mean", "flatten", "adaptive_avg_pool1d", "flatten"]}[name]
    assert sorted(layer["op"] for layer in _argument_layers(fx_doc).values()) == sorted(wanted)
    assert sorted(map(str, _argument_layers(exported).values())) == sorted(map(str, _argument_layers(fx_doc).values()))
    if name != "resnet":  # fx sees no shapes: its residual `+` is an opaque_add, which nothing loads
        path = models.save(tmp_path / "fx.safetensors", net.state_dict(), fx_doc)
        _same_at_every_size(convmerge.load(path, arch=net), net)


class Ambiguous(nn.Module):
    """Calls whose arguments a trace at one size cannot tell: an adaptive pooling keeping an axis (None),
    and a view that collapses axes only at the traced size."""

    def __init__(self, body) -> None:
        super().__init__()
        self.conv, self.body = nn.Conv2d(3, 4, 3), body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.conv(x))


@pytest.mark.parametrize("body, op", [
    (lambda y: F.adaptive_avg_pool2d(y, (None, 1)), "adaptive_avg_pool2d"),
    (lambda y: y.view(y.shape[0], 2, -1), "view"),
    (lambda y: y.mean(), "mean"),
])
def test_what_one_traced_size_cannot_tell_is_still_refused(tmp_path, body, op):
    path = tmp_path / "m.safetensors"
    convmerge.save(Ambiguous(body), path)
    layer = next(layer for layer in models.description_of(path)["layers"] if layer["op"] == op)
    assert set(layer) <= {"name", "op", "input", "traced_size"}
    with pytest.raises(ValueError, match=rf"1 opaque layer\(s\).*\({op}\)"):
        convmerge.load(path)


def test_fields_an_op_does_not_take_are_refused_naming_the_layer(tmp_path):
    t = {"c.weight": torch.randn(4, 3, 1, 1)}
    layers = [{"name": "c", "op": "conv2d", "input": "x"},
              {"name": "f", "op": "flatten", "input": "c", "start_dim": "1", "end_dim": -1}]
    path = models.save(tmp_path / "m.safetensors", t, models.describe(layers, ["f"]))
    with pytest.raises(ValueError, match=r"m\.safetensors: layer 'f': fields start_dim='1', end_dim=-1 are not"):
        convmerge.load(path)


@settings(deadline=None, max_examples=200)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=5), st.data())
def test_flatten_dims_is_what_torch_flatten_collapses(shape, data):
    start = data.draw(st.integers(0, len(shape) - 1))
    end = data.draw(st.integers(start, len(shape) - 1))
    after = torch.flatten(torch.empty(shape), start, end).shape
    found = argument_ops.flatten_dims(shape, after)
    if found is not None:  # whatever it finds collapses this shape to that one
        assert torch.flatten(torch.empty(shape), *found).shape == after
    if start < end and all(n > 1 for n in shape):  # no size 1 to blur it: the one collapse there is
        assert found == (start, -1 if end == len(shape) - 1 else end)
    if start == end:
        assert found is None
