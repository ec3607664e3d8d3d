"""Tracing the models people write: parallel branches, kernels computed from parameters, constants
written into a padded border, submodules no tracer gets through.

Every traced description is run by the independent float64 evaluator (tests.models.evaluate) with
the state dict plus the tensors the tracer returned, and compared with the module itself."""

from __future__ import annotations

from typing import Any, Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from convmerge.frontends import trace_fx
from convmerge.frontends.trace import Traced
from convmerge.frontends.trace import describe_module as _describe_module

from .models import evaluate
from .nets import randomize_bn


def describe_module(*args: Any, **kwargs: Any) -> Traced:
    """The torch.export tracer's description (convmerge tries torch.fx with shapes first: test_trace_fx_shapes)."""
    return _describe_module(*args, fx_first=False, **kwargs)


def trace(model: nn.Module, **options: Any) -> Traced:
    traced = describe_module(model, **options)
    assert traced.notes[0].startswith("traced with torch.export"), traced.notes[0]
    return traced


def ops(traced: Traced) -> list[tuple[str, str]]:
    return [(layer["name"], layer["op"]) for layer in traced.doc["layers"]]


def layer(traced: Traced, name: str) -> dict:
    return next(item for item in traced.doc["layers"] if item["name"] == name)


def assert_same_function(model: nn.Module, traced: Traced, x: torch.Tensor,
                         opaque: Optional[dict[str, Callable[..., torch.Tensor]]] = None) -> None:
    tensors = {**model.state_dict(), **traced.tensors}
    got = evaluate(traced.doc, tensors, x, opaque)
    want = model(x)
    want = list(want) if isinstance(want, (tuple, list)) else [want]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert torch.allclose(g, w.double(), rtol=1e-10, atol=1e-10), (g - w).abs().max()


def prepared(model: nn.Module, seed: int = 0) -> nn.Module:
    """float64, eval mode, batch norms with non-trivial statistics."""
    torch.manual_seed(seed)
    return randomize_bn(model.double(), seed)


def conv_bn(cin: int, cout: int, k: Any, **kwargs: Any) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, bias=False, **kwargs), nn.BatchNorm2d(cout))


# --- parallel branches --------------------------------------------------------------------------


class RepVGGBlock(nn.Module):
    """3x3 conv + BN, 1x1 conv + BN and a BN on the input, summed."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.dense = conv_bn(c, c, 3, padding=1)
        self.one = conv_bn(c, c, 1)
        self.identity = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.dense(x) + self.one(x) + self.identity(x))


class ACBlock(nn.Module):
    """A square 3x3 conv beside a 3x1 and a 1x3 one (each with its BN), summed (ACNet)."""

    def __init__(self, c: int = 3, out: int = 4) -> None:
        super().__init__()
        self.square = conv_bn(c, out, 3, padding=1)
        self.ver = conv_bn(c, out, (3, 1), padding=(1, 0))
        self.hor = conv_bn(c, out, (1, 3), padding=(0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.square(x)
        out += self.ver(x)
        out += self.hor(x)
        return out


class Inception(nn.Module):
    """Parallel branches concatenated on channels, one through an average pool, one through a pad module."""

    def __init__(self, c: int = 3) -> None:
        super().__init__()
        self.b1 = nn.Conv2d(c, 2, 1)
        self.b2 = nn.Sequential(nn.Conv2d(c, 2, 1), nn.Conv2d(2, 3, 3, padding=1))
        self.b3 = nn.Sequential(nn.AvgPool2d(3, 1, 1, count_include_pad=False), nn.Conv2d(c, 2, 1))
        self.b4 = nn.Sequential(nn.ZeroPad2d((1, 1, 1, 1)), nn.Conv2d(c, 2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], dim=1)


def test_repvgg_block() -> None:
    model = prepared(RepVGGBlock())
    traced = trace(model)
    assert ops(traced) == [("dense.0", "conv2d"), ("dense.1", "batch_norm"), ("one.0", "conv2d"),
                           ("one.1", "batch_norm"), ("add", "add"), ("identity", "batch_norm"), ("add_1", "add"),
                           ("relu", "relu")]
    assert layer(traced, "add")["inputs"] == ["dense.1", "one.1"]
    assert layer(traced, "add_1")["inputs"] == ["add", "identity"]
    assert layer(traced, "identity")["input"] == "x"
    assert traced.tensors == {} and traced.missing == []
    assert_same_function(model, traced, torch.randn(2, 4, 7, 9, dtype=torch.float64))


def test_acnet_block_with_in_place_sums() -> None:
    model = prepared(ACBlock())
    traced = trace(model)
    assert ops(traced) == [("square.0", "conv2d"), ("square.1", "batch_norm"), ("ver.0", "conv2d"),
                           ("ver.1", "batch_norm"), ("add", "add"), ("hor.0", "conv2d"), ("hor.1", "batch_norm"),
                           ("add_1", "add")]
    assert layer(traced, "ver.0")["kernel_size"] == [3, 1] and layer(traced, "ver.0")["padding"] == [[1, 1], [0, 0]]
    assert_same_function(model, traced, torch.randn(1, 3, 6, 5, dtype=torch.float64))


def test_concat_of_parallel_branches_with_pool_and_pad() -> None:
    model = prepared(Inception())
    traced = trace(model)
    assert ops(traced) == [("b1", "conv2d"), ("b2.0", "conv2d"), ("b2.1", "conv2d"), ("b3.0", "avg_pool2d"),
                           ("b3.1", "conv2d"), ("b4.0", "pad"), ("b4.1", "conv2d"), ("concat", "concat")]
    assert layer(traced, "concat") == {"name": "concat", "op": "concat", "inputs": ["b1", "b2.1", "b3.1", "b4.1"],
                                       "dim": 1}
    assert layer(traced, "b3.0") == {"name": "b3.0", "op": "avg_pool2d", "input": "x", "kernel_size": [3, 3],
                                     "stride": [1, 1], "padding": [1, 1], "ceil_mode": False,
                                     "count_include_pad": False}
    assert layer(traced, "b4.0") == {"name": "b4.0", "op": "pad", "input": "x", "padding": [[1, 1], [1, 1]],
                                     "mode": "constant", "value": 0.0}
    assert_same_function(model, traced, torch.randn(2, 3, 5, 6, dtype=torch.float64))


PAD_MODULES = [
    (nn.ZeroPad2d((1, 2, 0, 3)), [[0, 3], [1, 2]], "constant", 0.0),
    (nn.ConstantPad2d((1, 0, 2, 1), 0.5), [[2, 1], [1, 0]], "constant", 0.5),
    (nn.ReflectionPad2d((1, 1, 2, 0)), [[2, 0], [1, 1]], "reflect", None),
    (nn.ReplicationPad2d((0, 2, 1, 1)), [[1, 1], [0, 2]], "replicate", None),
    (nn.CircularPad2d((1, 2, 2, 1)), [[2, 1], [1, 2]], "circular", None),
]


@pytest.mark.parametrize("pad, pairs, mode, value", PAD_MODULES, ids=[type(p[0]).__name__ for p in PAD_MODULES])
def test_pad_modules(pad: nn.Module, pairs: list, mode: str, value: Optional[float]) -> None:
    model = prepared(nn.Sequential(nn.Conv2d(2, 3, 3), pad, nn.Conv2d(3, 2, 3)))
    traced = trace(model)
    expected = {"name": "1", "op": "pad", "input": "0", "padding": pairs, "mode": mode}
    assert layer(traced, "1") == (expected if value is None else {**expected, "value": value})
    assert_same_function(model, traced, torch.randn(1, 2, 7, 8, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate", "circular"])
def test_functional_pad_lists_the_first_axis_first(mode: str) -> None:
    class Padded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv3d(1, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return F.pad(y, (1, 2, 0, 1, 2, 0), mode=mode, **({"value": -1.5} if mode == "constant" else {}))

    model = prepared(Padded())
    traced = trace(model, example_size=(1, 1, 5, 6, 7))
    pad = layer(traced, "pad")
    assert pad["padding"] == [[2, 0], [0, 1], [1, 2]] and pad["mode"] == mode
    assert pad.get("value") == (-1.5 if mode == "constant" else None)
    assert_same_function(model, traced, torch.randn(2, 1, 4, 5, 6, dtype=torch.float64))


def test_average_pools_keep_every_argument() -> None:
    class Pools(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)
            self.pool = nn.AvgPool2d((3, 2), stride=(2, 1), padding=(1, 0), ceil_mode=True, divisor_override=4)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.conv(x)
            return self.pool(y), F.avg_pool2d(y, 3, 2, 1, ceil_mode=True, count_include_pad=False)

    model = prepared(Pools())
    traced = trace(model)
    assert layer(traced, "pool") == {"name": "pool", "op": "avg_pool2d", "input": "conv", "kernel_size": [3, 2],
                                     "stride": [2, 1], "padding": [1, 0], "ceil_mode": True,
                                     "count_include_pad": True, "divisor_override": 4}
    assert layer(traced, "avg_pool2d") == {"name": "avg_pool2d", "op": "avg_pool2d", "input": "conv",
                                           "kernel_size": [3, 3], "stride": [2, 2], "padding": [1, 1],
                                           "ceil_mode": True, "count_include_pad": False}
    assert_same_function(model, traced, torch.randn(1, 2, 8, 7, dtype=torch.float64))


@pytest.mark.parametrize("nd", [1, 3])
def test_average_pools_in_one_and_three_dimensions(nd: int) -> None:
    conv, pool = {1: (nn.Conv1d, nn.AvgPool1d), 3: (nn.Conv3d, nn.AvgPool3d)}[nd]
    model = prepared(nn.Sequential(conv(2, 2, 1), pool(2, 1, 1), conv(2, 2, 1)))
    traced = trace(model)
    assert layer(traced, "1")["op"] == f"avg_pool{nd}d" and layer(traced, "1")["kernel_size"] == [2] * nd
    assert_same_function(model, traced, torch.randn(1, 2, *[5] * nd, dtype=torch.float64))


# --- what is structural and what is not ---------------------------------------------------------


class Two(nn.Module):
    """Two convs on the input, joined by ``join``."""

    def __init__(self, join: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 2, 3, padding=1)
        self.b = nn.Conv2d(2, 2, 1)
        self.scale = nn.Parameter(torch.randn(1, 2, 4, 4))
        self.join = join

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.join(self, self.a(x), self.b(x))


def _in_place(m: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a += b
    return a


STRUCTURAL_JOINS = {
    "plus": (lambda m, a, b: a + b, "add", {}),
    "torch.add": (lambda m, a, b: torch.add(a, b), "add", {}),
    "method add": (lambda m, a, b: a.add(b), "add", {}),
    "in place": (_in_place, "add", {}),
    "sub": (lambda m, a, b: a - b, "sub", {}),
    "cat": (lambda m, a, b: torch.cat((a, b), 1), "concat", {"dim": 1}),
    "cat last axis": (lambda m, a, b: torch.cat([a, b], dim=-1), "concat", {"dim": 3}),
    "cat batch": (lambda m, a, b: torch.cat([a, b]), "concat", {"dim": 0}),
}

OPAQUE_JOINS = {
    "alpha": (lambda m, a, b: torch.add(a, b, alpha=2), "opaque_add"),
    "broadcast": (lambda m, a, b: a + F.adaptive_avg_pool2d(b, 1), "opaque_add"),
    "constant operand": (lambda m, a, b: a + m.scale, "opaque_add"),
    "sub alpha": (lambda m, a, b: torch.sub(a, b, alpha=2), "opaque_sub"),
    "constant over x": (lambda m, a, b: m.scale[:, :, :1, :1] / a, "div"),
    "constant along the last axis": (lambda m, a, b: a * m.scale[0, 0, 0], "mul"),
    "constant per position": (lambda m, a, b: a * m.scale, "mul"),
    "cat of a constant": (lambda m, a, b: torch.cat([a, m.scale], 1), "opaque_cat"),
    "negative pad": (lambda m, a, b: F.pad(a, (-1, 1, 0, 0)), "opaque_pad"),
    "pad of channels": (lambda m, a, b: F.pad(a, (1, 1, 1, 1, 1, 1)), "opaque_pad"),
    "unbatched pool": (lambda m, a, b: F.avg_pool2d(a[0], 2), "opaque_avg_pool2d"),
}


@pytest.mark.parametrize("case", STRUCTURAL_JOINS)
def test_structural_joins(case: str) -> None:
    join, op, fields = STRUCTURAL_JOINS[case]
    model = prepared(Two(join))
    traced = trace(model, example_size=(1, 2, 4, 4))
    last = traced.doc["layers"][-1]
    assert last == {"name": op, "op": op, "inputs": ["a", "b"], **fields}
    assert_same_function(model, traced, torch.randn(2, 2, 4, 4, dtype=torch.float64))


@pytest.mark.parametrize("case", OPAQUE_JOINS)
def test_anything_else_is_opaque(case: str) -> None:
    join, op = OPAQUE_JOINS[case]
    traced = trace(prepared(Two(join)), example_size=(1, 2, 4, 4))
    assert op in [layer["op"] for layer in traced.doc["layers"]]
    structural = {"add", "sub", "affine", "concat", "pad", "avg_pool2d"}
    assert not structural & {layer["op"] for layer in traced.doc["layers"]}


# --- kernels computed from parameters -----------------------------------------------------------


class IdentityConv1x1(nn.Conv2d):
    """A 1x1 conv whose kernel is its weight plus the identity (DBB's idea, written here)."""

    def __init__(self, c: int, as_buffer: bool = True) -> None:
        super().__init__(c, c, 1, bias=False)
        eye = torch.eye(c).view(c, c, 1, 1)
        if as_buffer:
            self.register_buffer("eye", eye)
        else:
            self.eye = eye  # a plain tensor attribute: torch.export lifts it as a constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight + self.eye.to(self.weight), None, 1, 0, 1, self.groups)


@pytest.mark.parametrize("as_buffer", [True, False])
def test_kernel_computed_from_a_parameter(as_buffer: bool) -> None:
    model = prepared(nn.Sequential(nn.Conv2d(3, 4, 3), IdentityConv1x1(4, as_buffer)))
    traced = trace(model)
    assert ops(traced) == [("0", "conv2d"), ("1.computed", "conv2d")]
    assert set(traced.tensors) == {"1.computed.weight"}
    kernel = model[1].weight + torch.eye(4, dtype=torch.float64).view(4, 4, 1, 1)
    assert torch.equal(traced.tensors["1.computed.weight"], kernel)
    assert "1.weight" in model.state_dict(), "the raw parameter keeps its own name"
    assert any("1.computed" in note and "computed" in note for note in traced.notes)
    assert_same_function(model, traced, torch.randn(2, 3, 6, 6, dtype=torch.float64))


def test_weight_normalised_conv_is_a_conv() -> None:
    conv = torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(4, 3, 3, padding=1))
    model = prepared(nn.Sequential(nn.Conv2d(2, 4, 1), conv))
    traced = trace(model)
    assert ops(traced) == [("0", "conv2d"), ("1", "conv2d")]
    assert set(traced.tensors) == {"1.weight"}, "the bias is the state dict's 1.bias"
    assert "1.weight" not in model.state_dict()
    assert_same_function(model, traced, torch.randn(1, 2, 5, 5, dtype=torch.float64))


def test_functional_conv_of_module_parameters_keeps_their_names() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3)
            self.kernel = nn.Parameter(torch.randn(3, 2, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.conv2d(x, self.conv.weight, self.conv.bias, padding=1) + F.conv2d(x, self.kernel)

    model = prepared(Functional())
    traced = trace(model, example_size=(1, 2, 5, 5))
    assert ops(traced) == [("conv", "conv2d"), ("conv2d", "conv2d"), ("add", "add")]
    assert layer(traced, "conv")["padding"] == [[1, 1], [1, 1]]
    assert set(traced.tensors) == {"conv2d.weight"}, "conv.* come from the state dict"
    assert_same_function(model, traced, torch.randn(2, 2, 5, 5, dtype=torch.float64))


def test_standardised_weights_are_computed_once() -> None:
    class StdConv2d(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
            return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    model = prepared(nn.Sequential(StdConv2d(2, 3, 3, padding=2, dilation=2)))
    traced = trace(model)
    assert ops(traced) == [("0.computed", "conv2d")]
    assert layer(traced, "0.computed")["dilation"] == [2, 2]
    assert set(traced.tensors) == {"0.computed.weight", "0.computed.bias"}, "0.weight is the raw parameter"
    assert_same_function(model, traced, torch.randn(1, 2, 6, 6, dtype=torch.float64))


class CPConv2d(nn.Module):
    """A rank-R CP-factorised k x k conv run as a 1x1, a depthwise k x 1, a depthwise 1 x k and a
    1x1 conv, with a loop over the input's shape as tensorly-torch's factorized convs have: fx
    cannot iterate a Proxy."""

    def __init__(self, cin: int, cout: int, rank: int, k: int) -> None:
        super().__init__()
        self.factors = nn.ParameterList([nn.Parameter(torch.randn(rank, cin)), nn.Parameter(torch.randn(rank, k)),
                                         nn.Parameter(torch.randn(rank, k)), nn.Parameter(torch.randn(cout, rank))])
        self.bias = nn.Parameter(torch.randn(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.factors[0][:, :, None, None])
        for axis, _ in enumerate(x.shape[2:]):
            factor = self.factors[1 + axis]
            shape, padding = [factor.shape[0], 1, 1, 1], [0, 0]
            shape[2 + axis], padding[axis] = factor.shape[1], factor.shape[1] // 2
            y = F.conv2d(y, factor.reshape(shape), padding=padding, groups=factor.shape[0])
        return F.conv2d(y, self.factors[-1][:, :, None, None], self.bias)


def test_factorised_conv_is_a_chain_of_convs() -> None:
    model = prepared(nn.Sequential(nn.Conv2d(2, 4, 1), CPConv2d(4, 3, 5, 3)))
    traced = trace(model)
    convs = [name for name, op in ops(traced) if op == "conv2d"]
    assert convs == ["0", "1.computed", "1.computed_1", "1.computed_2", "1"]
    assert layer(traced, "1.computed_1")["groups"] == 5 and layer(traced, "1.computed_1")["padding"] == [[1, 1], [0, 0]]
    assert "1.bias" not in traced.tensors, "the last conv's bias is the state dict's"
    assert_same_function(model, traced, torch.randn(1, 2, 6, 5, dtype=torch.float64))


def test_factorised_conv_is_an_opaque_leaf_for_fx() -> None:
    model = prepared(nn.Sequential(nn.Conv2d(2, 4, 1), CPConv2d(4, 3, 5, 3)))
    traced = trace_fx.describe(model)
    assert ops(traced) == [("0", "conv2d"), ("1", "cpconv2d")]
    assert traced.notes == ["module '1' (CPConv2d) is opaque: torch.fx: TraceError: Proxy object cannot be iterated. "
                            "This can be attempted when the Proxy is used in a loop or as a *args or **kwargs "
                            "function argument. See the torch.fx docs on pytorch.org for a more detailed "
                            "explanation of what types of control flow can be traced, and check out the Proxy "
                            "docstring for help troubleshooting Proxy iteration errors"]
    assert_same_function(model, traced, torch.randn(1, 2, 6, 5, dtype=torch.float64), {"1": model[1]})


# --- constants written into a padded border -----------------------------------------------------


class BNAndPad(nn.Module):
    """A batch norm, then a pad whose border holds the batch norm's response to zero (so a conv
    after it sees what it would see padding the batch norm's input): DBB's idea, written here.
    ``variant`` breaks the pattern in one way each, for the tests that it is then not a pad."""

    def __init__(self, c: int, p: int, variant: str = "") -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.p = p
        self.variant = variant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(x)
        bn, p = self.bn, self.p
        fill = (bn.bias.detach() - bn.running_mean * bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps))
        fill = fill.view(1, -1, 1, 1)
        out = F.pad(out, [p] * 4)
        other = fill * 2 if self.variant == "two values" else fill
        ramp = torch.arange(out.shape[3], dtype=fill.dtype, device=fill.device).view(1, 1, 1, -1)
        top = fill + ramp if self.variant == "ramp" else fill
        out[:, :, 0:p, :] = top
        out[:, :, -p:, :] = other
        if self.variant != "three sides":
            out[:, :, :, 0:p] = fill
        out[:, :, :, -p:] = fill
        if self.variant == "interior":
            out[:, :, p:p + 1, :] = fill
        return out


def dbb_like(variant: str = "") -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), BNAndPad(4, 1, variant), nn.Conv2d(4, 2, 3))


def test_padded_border_of_batch_norm_values_is_one_pad() -> None:
    model = prepared(dbb_like())
    traced = trace(model)
    assert ops(traced) == [("0", "conv2d"), ("1.bn", "batch_norm"), ("1.pad", "pad"), ("2", "conv2d")]
    assert layer(traced, "1.pad") == {"name": "1.pad", "op": "pad", "input": "1.bn", "padding": [[1, 1], [1, 1]],
                                      "mode": "constant"}
    bn = model[1].bn
    expected = bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)
    assert set(traced.tensors) == {"1.pad.value"}
    assert torch.equal(traced.tensors["1.pad.value"], expected.detach())
    assert layer(traced, "2")["input"] == "1.pad"
    assert_same_function(model, traced, torch.randn(2, 3, 5, 4, dtype=torch.float64))


@pytest.mark.parametrize("variant", ["three sides", "interior", "two values", "ramp"])
def test_other_border_writes_stay_opaque(variant: str) -> None:
    model = prepared(dbb_like(variant))
    traced = trace(model)
    assert "1.pad.value" not in traced.tensors
    assert layer(traced, "1.pad").get("value") == 0.0
    assert "slice_scatter" in [op for _, op in ops(traced)]
    assert layer(traced, "2")["input"] != "1.pad"


def test_meta_module_gives_the_same_description_and_names_what_it_misses() -> None:
    with torch.device("meta"):
        meta = nn.Sequential(dbb_like(), IdentityConv1x1(2)).eval()
    cpu = prepared(nn.Sequential(dbb_like(), IdentityConv1x1(2)))
    on_meta, on_cpu = trace(meta), trace(cpu)
    assert on_meta.doc == on_cpu.doc
    assert on_meta.tensors == {}
    assert on_meta.missing == ["0.1.pad.value", "1.computed.weight"]
    assert set(on_cpu.tensors) == set(on_meta.missing) and on_cpu.missing == []
    assert any("meta device" in note for note in on_meta.notes)


@pytest.mark.parametrize("variant", ["two values", "ramp"])
def test_meta_module_checks_the_border_structure_with_made_up_values(variant: str) -> None:
    with torch.device("meta"):
        meta = dbb_like(variant).eval()
    traced = trace(meta)
    assert "1.pad.value" not in traced.missing
    assert "slice_scatter" in [op for _, op in ops(traced)]


# --- submodules no tracer gets through ----------------------------------------------------------


class Gate(nn.Module):
    """Data-dependent control flow: neither torch.export nor torch.fx can trace it."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return self.conv(x)
        return -x


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = Gate(4)
        self.head = conv_bn(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return self.head(self.gate(y)) + self.head[0](y)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_untraceable_submodule_is_an_opaque_leaf(device: str) -> None:
    with torch.device(device):
        model = Gated()
    model = prepared(model) if device == "cpu" else model.eval()
    traced = trace(model)
    assert ops(traced) == [("stem", "conv2d"), ("gate", "gate"), ("head.0@0", "shared_conv2d"),
                           ("head.1", "batch_norm"), ("head.0@1", "shared_conv2d"), ("add", "add")]
    assert layer(traced, "gate")["input"] == "stem" and layer(traced, "head.0@0")["input"] == "gate"
    assert traced.notes[1].startswith("module 'gate' (Gate) is opaque: torch.export: ")
    if device == "cpu":
        x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
        opaque = {"gate": model.gate, "head.0@0": model.head[0], "head.0@1": model.head[0]}
        assert_same_function(model, traced, x, opaque)


def test_leaf_with_several_outputs() -> None:
    class Split(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor]:
            if x.sum() > 0:
                return x[:, :2], 7, x[:, 2:]
            return x[:, 2:], 7, x[:, :2]

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 1)
            self.split = Split()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, k, b = self.split(self.conv(x))
            return torch.cat([a, b], 1) * k

    model = prepared(Model())
    traced = trace(model)
    assert ops(traced) == [("conv", "conv2d"), ("split", "split"), ("split.getitem", "getitem"),
                           ("split.getitem_1", "getitem"), ("concat", "concat"), ("mul", "affine")]
    assert layer(traced, "concat")["inputs"] == ["split.getitem", "split.getitem_1"]
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    pick = {"split.getitem": lambda t: t[0], "split.getitem_1": lambda t: t[2]}
    traced.doc["layers"] = [item for item in traced.doc["layers"] if item["op"] != "mul"]
    traced.doc["outputs"] = ["concat"]
    out = evaluate(traced.doc, {**model.state_dict(), **traced.tensors}, x, {"split": model.split, **pick})[0]
    assert torch.equal(out * 7, model(x))


@pytest.mark.parametrize("leaf", [RepVGGBlock, "RepVGGBlock", "tests.test_trace_export.RepVGGBlock"])
def test_leaves_are_kept_opaque_on_request(leaf: Any) -> None:
    model = prepared(nn.Sequential(nn.Conv2d(4, 4, 1), RepVGGBlock(), RepVGGBlock()))
    traced = trace(model, leaves=[leaf])
    assert ops(traced) == [("0", "conv2d"), ("1", "repvggblock"), ("2", "repvggblock")]
    assert traced.notes[1:] == ["module '1' (RepVGGBlock) is opaque: marked as a leaf",
                                "module '2' (RepVGGBlock) is opaque: marked as a leaf"]
    assert_same_function(model, traced, torch.randn(1, 4, 5, 5, dtype=torch.float64), {"1": model[1], "2": model[2]})
    fx = trace_fx.describe(model, leaves=[leaf])
    assert ops(fx) == ops(traced)


def test_a_torch_module_asked_to_be_a_leaf_is_opaque() -> None:
    model = prepared(nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)))
    traced = trace(model, leaves=[nn.Conv2d])
    assert ops(traced) == [("0", "opaque_conv2d"), ("1", "batch_norm")]
    assert ops(trace_fx.describe(model, leaves=["Conv2d"])) == ops(traced)


def test_fx_fallback_erases_what_a_failed_submodule_traced() -> None:
    class Writes(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(x) * 2
            y[:, :, 0] = 0
            return y

    model = nn.Sequential(nn.Conv2d(1, 1, 1), Writes(), nn.ReLU())
    traced = trace_fx.describe(model)
    assert ops(traced) == [("0", "conv2d"), ("1", "writes"), ("2", "relu")]
    assert traced.notes == ["module '1' (Writes) is opaque: torch.fx: TypeError: 'Proxy' object does not support "
                            "item assignment"]


# --- models people write ------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """A ResNet basic block in torchvision's style (in-place ReLU, ``out += identity``)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = conv_bn(cin, cout, 1, stride=stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def small_resnet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                         BasicBlock(4, 4), BasicBlock(4, 8, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def test_resnet_style_model() -> None:
    model = prepared(small_resnet())
    traced = trace(model)
    assert ops(traced) == [
        ("0", "conv2d"), ("1", "batch_norm"), ("2", "relu"),
        ("3.conv1", "conv2d"), ("3.bn1", "batch_norm"), ("3.relu@0", "relu"), ("3.conv2", "conv2d"),
        ("3.bn2", "batch_norm"), ("3.add", "add"), ("3.relu@1", "relu"),
        ("4.downsample.0", "conv2d"), ("4.downsample.1", "batch_norm"), ("4.conv1", "conv2d"), ("4.bn1", "batch_norm"),
        ("4.relu@0", "relu"), ("4.conv2", "conv2d"), ("4.bn2", "batch_norm"), ("4.add", "add"), ("4.relu@1", "relu"),
        ("5", "adaptiveavgpool2d"), ("6", "flatten"), ("7", "linear")]
    assert layer(traced, "3.add")["inputs"] == ["3.bn2", "2"]
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert_same_function(model, traced, x, {"5": model[5], "6": model[6], "7": model[7]})
    fx = trace_fx.describe(model)
    structural = {"conv2d", "batch_norm"}
    assert [(n, o) for n, o in ops(fx) if o in structural] == [(n, o) for n, o in ops(traced) if o in structural]


# --- generated modules --------------------------------------------------------------------------


class Generated(nn.Module):
    """Branches on one input (convs with BN, an average pool, an identity), summed or concatenated."""

    def __init__(self, branches: list[nn.Module], join: str) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.join = join

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        if self.join == "cat":
            return torch.cat(outs, 1)
        total = outs[0]
        for out in outs[1:]:
            total = total + out
        return total


@st.composite
def generated(draw: Any) -> nn.Module:
    c = draw(st.integers(1, 3))
    branches: list[nn.Module] = []
    for _ in range(draw(st.integers(2, 3))):
        kind = draw(st.sampled_from(["conv", "conv_bn", "pool", "identity", "pad_conv"]))
        k = draw(st.sampled_from([1, 3]))
        if kind == "conv":
            branches.append(nn.Conv2d(c, c, k, padding=k // 2, bias=draw(st.booleans())))
        elif kind == "conv_bn":
            branches.append(conv_bn(c, c, (k, draw(st.sampled_from([1, 3]))), padding="same"))
        elif kind == "pool":
            branches.append(nn.AvgPool2d(3, 1, 1, count_include_pad=draw(st.booleans())))
        elif kind == "identity":
            branches.append(nn.BatchNorm2d(c) if draw(st.booleans()) else nn.Identity())
        else:
            branches.append(nn.Sequential(nn.ReflectionPad2d(k // 2), nn.Conv2d(c, c, k)))
    model = Generated(branches, draw(st.sampled_from(["add", "cat"])))
    model.c = c
    return model


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(generated(), st.integers(0, 2**16))
def test_generated_branches_are_traced_exactly(model: Generated, seed: int) -> None:
    model = prepared(model, seed)
    traced = trace(model, example_size=(1, model.c, 6, 6))
    assert {op for _, op in ops(traced)} <= {"conv2d", "batch_norm", "avg_pool2d", "pad", "add", "concat"}
    assert_same_function(model, traced, torch.randn(2, model.c, 5, 7, dtype=torch.float64))


# --- the example input --------------------------------------------------------------------------


def test_example_input_is_guessed_from_the_first_conv_or_given() -> None:
    model = nn.Sequential(nn.Conv3d(2, 3, 1), nn.ReLU())
    assert trace(model).notes[0] == ("traced with torch.export on an input of shape [1, 2, 32, 32, 32] (spatial size "
                                     "the default; channels of Conv3d '0', the first conv, batch norm or linear layer "
                                     "called; give input_size or example inputs if it is wrong)")
    assert trace(model, example_size=(4, 5, 6)).notes[0].startswith(
        "traced with torch.export on an input of shape [1, 2, 4, 5, 6] (spatial size as given;")
    assert trace(model, example_size=(2, 2, 4, 5, 6)).notes[0].startswith(
        "traced with torch.export on an input of shape [2, 2, 4, 5, 6]")
    fallback = describe_module(model, example_size=(4, 5))
    assert fallback.notes[0] == ("traced with torch.fx (input size [4, 5] is neither 3 spatial sizes nor a full "
                                 "input shape)")
    assert [item["op"] for item in fallback.doc["layers"]] == ["conv3d", "relu"]


def test_a_wrong_guess_falls_back_to_fx_and_says_why() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 2))
    traced = describe_module(model)
    assert traced.notes[0].startswith("traced with torch.fx (torch.export: RuntimeError: ")
    assert [item["op"] for item in traced.doc["layers"]] == ["conv2d", "flatten", "linear"]
    assert trace(model, example_size=(3, 3)).doc == {**traced.doc, "inputs": ["input"], "traced_input": [3, 3],
                                                     "layers": [{**traced.doc["layers"][0], "input": "input"},
                                                                *traced.doc["layers"][1:]]}


def test_every_instance_of_a_failing_class_is_a_leaf_after_one_failure() -> None:
    model = prepared(nn.Sequential(nn.Conv2d(2, 4, 1), Gate(4), nn.Conv2d(4, 4, 1), Gate(4)))
    traced = trace(model)
    assert ops(traced) == [("0", "conv2d"), ("1", "gate"), ("2", "conv2d"), ("3", "gate")]
    assert traced.notes[1].startswith("module '1' (Gate) is opaque: torch.export: GuardOnDataDependentSymNode")
    assert traced.notes[2].startswith("module '3' (Gate) is opaque: torch.export: GuardOnDataDependentSymNode")
    assert traced.notes[2].endswith("(in '1', of the same class)")
    assert_same_function(model, traced, torch.randn(1, 2, 3, 3, dtype=torch.float64), {"1": model[1], "3": model[3]})


class _InPlace(nn.Module):
    """ACNet-style `out += branch` and an in-place ReLU, with the written tensor also read before the write;
    ``view``: a view of it is taken first (the write is then not simple: the earlier route is taken)."""

    def __init__(self, view: bool = False) -> None:
        super().__init__()
        self.view = view
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.a(x)
        before = out * 2 if not self.view else out[:, :2]
        out += self.bn(self.b(x))
        out = F.relu(out, inplace=True)
        return torch.cat([out, before], 1)


@pytest.mark.parametrize("view", [False, True])
def test_one_export_serves_planning_and_the_module(view: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """No timing: the trace-once route exports once and never decomposes; a write through a view takes the earlier
    route (static export, decomposition, a second export).  Either way the module computes what the original does."""
    import convmerge
    from tests.nets import randomize_bn

    exports, decompositions = [], []
    export, decompose = torch.export.export, torch.export.ExportedProgram.run_decompositions
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: exports.append(k) or export(*a, **k))
    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions",
                        lambda self, *a, **k: decompositions.append(1) or decompose(self, *a, **k))
    model = randomize_bn(_InPlace(view)).double()
    fused = convmerge.fuse(model, input_size=(6, 7))
    assert (len(exports), len(decompositions)) == ((3, 2) if view else (1, 0))
    assert "dynamic_shapes" in exports[0] or view
    assert sum(isinstance(m, nn.Conv2d) for m in fused.modules()) == 1  # a + b, BN folded (the view sees the sum)
    for shape in [(1, 3, 6, 7), (2, 3, 9, 4), (1, 3, 1, 1)]:
        x = torch.randn(shape, dtype=torch.float64)
        torch.testing.assert_close(fused(x), model(x), rtol=1e-9, atol=1e-9)


# --- arithmetic with constants (issue 20) ----------------------------------------------------------


class Scaled(nn.Module):
    """A conv, then ``op`` of its value and constants; a float32 module unless prepared."""

    def __init__(self, op: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.gamma = nn.Parameter(torch.randn(3, 1, 1))
        self.register_buffer("shift", torch.randn(1, 3, 1, 1))
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(self, self.conv(x))


AFFINE_FORMS = {
    "layer scale in place": (lambda m, y: y.mul_(m.gamma), [("weight", [3])]),
    "viewed": (lambda m, y: y * m.gamma.view(1, -1, 1, 1), [("weight", [3])]),
    "flattened then viewed": (lambda m, y: m.gamma.flatten().view(3, 1, 1) * y, [("weight", [3])]),
    "times a number": (lambda m, y: y * 2.5, [("weight", [1])]),
    "plus a buffer": (lambda m, y: y + m.shift, [("bias", [3])]),
    "minus a number": (lambda m, y: y - 1, [("bias", [1])]),
    "number minus": (lambda m, y: 2 - y, [("weight", [1]), ("bias", [1])]),
    "over a buffer": (lambda m, y: y / m.shift, [("weight", [3])]),
    "in place minus": (lambda m, y: y.sub_(m.shift, alpha=3), [("bias", [3])]),
    "a 0-d constant": (lambda m, y: y * torch.tensor(0.5, dtype=y.dtype), [("weight", [1])]),
}


@pytest.mark.parametrize("form", AFFINE_FORMS)
def test_arithmetic_with_a_per_channel_or_scalar_constant_is_an_affine_layer(form: str) -> None:
    op, tensors = AFFINE_FORMS[form]
    model = prepared(Scaled(op))
    traced = trace(model, example_size=(1, 2, 5, 5))
    (name, kind), = ops(traced)[1:]
    assert kind == "affine" and layer(traced, name)["input"] == "conv"
    assert {k: list(v.shape) for k, v in traced.tensors.items()} == {f"{name}.{s}": shape for s, shape in tensors}
    for size in [(1, 1), (4, 7)]:
        assert_same_function(model, traced, torch.randn(2, 2, *size, dtype=torch.float64))


def test_a_constant_that_changes_the_dtype_stays_opaque() -> None:
    model = Scaled(lambda m, y: y * m.gamma.double()).eval()  # float32 times float64 [3, 1, 1]: float64
    traced = trace(model, example_size=(1, 2, 5, 5))
    assert "affine" not in [op for _, op in ops(traced)]



class Held(nn.Module):
    """Every kind of tensor an export lifts: parameters, a persistent and a non-persistent buffer, a tensor
    constant; keyword and tuple outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.register_buffer("shift", torch.randn(1, 4, 1, 1), persistent=False)
        self.scale = torch.randn(1, 4, 1, 1)  # a plain attribute: a lifted constant

    def forward(self, x: torch.Tensor, *, gain: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
        y = self.conv(x) * self.scale + self.shift
        return y, {"gain": y * gain if gain is not None else y}


def test_the_runnable_module_is_the_program_s_own() -> None:
    """`trace_export._module` unlifts a program as `program.module()` does: same tensors (shared, same names),
    same calling convention, same results at other sizes."""
    from convmerge.frontends import trace_export

    model = randomize_bn(Held()).eval()
    x, gain = torch.randn(2, 3, 8, 8), torch.randn(1, 4, 1, 1)
    dims = ({0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO},)
    program = torch.export.export(model, (x,), {"gain": gain}, dynamic_shapes=dims + ({},), strict=False)
    ours, theirs = trace_export._module(program), program.module()
    assert {k: v.data_ptr() for k, v in ours.state_dict().items()}.items() >= {
        k: v.data_ptr() for k, v in model.state_dict().items()}.items()
    for shape in [(2, 3, 8, 8), (1, 3, 5, 7)]:
        t = torch.randn(shape)
        want = model(t, gain=gain)
        for got in (ours(t, gain=gain), theirs(t, gain=gain)):
            assert torch.equal(got[0], want[0]) and torch.equal(got[1]["gain"], want[1]["gain"])


class NoGrad(nn.Module):
    """A forward with a `torch.no_grad()` block: the export holds it as a higher-order op whose subgraph is a
    submodule of the program's graph module, read by a get_attr."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        with torch.no_grad():
            y = self.b(y)
        return y + 1


def test_the_runnable_module_keeps_higher_order_subgraphs() -> None:
    from convmerge.frontends import trace_export

    model = NoGrad().eval()
    x = torch.randn(2, 3, 9, 9)
    program = torch.export.export(model, (x,), strict=False)
    assert any(n.op == "get_attr" for n in program.graph.nodes)
    got = trace_export._module(program)(x)
    assert torch.allclose(got, model(x), rtol=1e-5, atol=1e-6)
