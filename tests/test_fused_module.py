"""The fused PyTorch module: exact wherever the original runs, checked end to end before it is returned.

Every comparison here runs the original module itself (eager PyTorch, float64) as the oracle, at
shapes other than the ones `fuse` traced and checked."""

from __future__ import annotations

import io
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import convmerge
from convmerge.backends import endtoend, rebuild
from convmerge.frontends import trace, trace_export
from convmerge.frontends.modules import conv_calls
from convmerge.engine.plan import VerificationError

from . import nets


def same(original: nn.Module, fused: nn.Module, *inputs: torch.Tensor) -> None:
    with torch.no_grad():
        want, got = original(*inputs), fused(*inputs)
    want = want if isinstance(want, tuple) else (want,)
    got = got if isinstance(got, tuple) else (got,)
    assert len(want) == len(got)
    for a, b in zip(want, got):
        assert a.shape == b.shape
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9), (a - b).abs().max()


def x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


def prepared(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nets.randomize_bn(model.double(), seed).eval()


# --- wrong results, no error ----------------------------------------------------------------------


class HeadFirst(nn.Module):
    """Registers its head before its stem, and updates a value in place through an alias."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(8, 4, 1)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.skip = nn.Conv2d(3, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        t = y
        t += self.skip(x)
        return self.head(y)


def test_an_in_place_update_through_an_alias_is_kept() -> None:
    model = prepared(HeadFirst())
    fused = convmerge.fuse(model)
    same(model, fused, x(2, 3, 11, 9))


def test_the_example_input_takes_its_channels_from_the_first_conv_called() -> None:
    example, origin = trace_export.example_input(HeadFirst(), (16, 16))
    assert [tuple(t.shape) for t in example] == [(1, 3, 16, 16)]
    assert "channels of Conv2d 'stem', the first conv, batch norm or linear layer called" in origin


def test_the_fx_fallback_keeps_in_place_updates_and_merges_nothing_across_them(monkeypatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise trace_export.TraceError("torch.export: refused for the test")

    monkeypatch.setattr(trace_export, "describe", refuse)
    model = prepared(nn.Sequential(HeadFirst(), nn.Conv2d(4, 4, 3, padding=1)))
    report = convmerge.check(model)
    assert report["notes"][0].startswith("traced with torch.fx (torch.export: refused for the test)")
    assert any(note.startswith("2 layer(s) (0.stem, 0.head) write or read a value that is changed in place")
               for note in report["notes"])
    assert not any(pair["first"] == "0.head" and pair["applied"] for pair in report["pairs"])
    fused = convmerge.fuse(model)
    same(model, fused, x(1, 3, 8, 8))
    same(model, fused, x(2, 3, 5, 7))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b1 = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
        self.b2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x), self.b2(self.b1(y))


def test_a_size_dependent_merge_refuses_other_sizes_on_every_input() -> None:
    model = prepared(TwoInputs())
    fused = convmerge.fuse(model, input_size=(9, 9))
    assert conv_calls(fused) == 2
    same(model, fused, x(1, 3, 9, 9), x(2, 3, 9, 9))
    with pytest.raises(ValueError, match="runs only at input size 9x9 .* it got 10x10"):
        fused(x(1, 3, 9, 9), x(1, 3, 10, 10))
    with pytest.raises(ValueError, match="it got 10x10"):
        fused(x(1, 3, 10, 10), x(1, 3, 9, 9))


class PoolSum(nn.Module):
    """A sum of an identity and an average pooling: a merge with no conv in it (a depthwise 3x3)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(8, 8, 1)
        self.pool = nn.AvgPool2d(3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return y + self.pool(y)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_merge_of_no_conv_is_stored_in_the_model_dtype(dtype: torch.dtype) -> None:
    model = PoolSum().to(dtype).eval()
    assert [m["layers"] for m in convmerge.check(model)["merges"]] == [["pool", "add"]]
    fused = convmerge.fuse(model)
    merged = [m for m in fused.modules() if isinstance(m, nn.Conv2d) and m.weight.shape[-1] == 3]
    assert merged and all(m.weight.dtype == dtype for m in merged)
    inputs = torch.randn(2, 8, 7, 6, dtype=dtype)
    assert torch.allclose(fused(inputs), model(inputs), rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=1e-7)


# --- a module that refuses inputs the original accepts ----------------------------------------------


@pytest.mark.parametrize("model, shapes", [
    (nn.Conv2d(1, 2, 3), [(1, 1, 3, 3), (2, 1, 3, 4), (1, 1, 9, 9)]),
    (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AvgPool2d(2, ceil_mode=True), nn.Conv2d(4, 4, 1)),
     [(1, 3, 9, 9), (2, 3, 7, 8), (1, 3, 1, 1), (3, 3, 2, 3)]),
    (nets.TinyRepVGG(), [(1, 3, 32, 32), (2, 3, 8, 8), (1, 3, 3, 5)]),
])
def test_the_module_runs_where_the_original_runs(model: nn.Module, shapes: list) -> None:
    model = prepared(model)
    fused = convmerge.fuse(model)
    for shape in shapes:
        same(model, fused, x(*shape))


class DropoutTail(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=2, bias=False)
        self.d = nn.Conv2d(4, 4, 3, padding=1)
        self.drop = nn.Dropout()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.d(self.c(x)))


@pytest.mark.parametrize("model, options, convs", [
    (DropoutTail(), {"input_size": (16, 16)}, 1),
    (nn.Sequential(nn.Conv2d(3, 4, 3, padding=2, bias=False), nn.Conv2d(4, 4, 3, padding=1), nn.Hardswish()),
     {"leaves": [nn.Hardswish]}, 1),
    (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Hardswish(), nn.Conv2d(4, 4, 1)),
     {"leaves": [nn.Hardswish], "input_size": (10, 12)}, 2),
    (nn.Sequential(nn.Hardswish(), nn.Conv2d(3, 4, (1, 3), padding=(0, 1), bias=False), nn.BatchNorm2d(4)),
     {"leaves": [nn.Hardswish]}, 1),  # a region whose input is a leaf's output
])
def test_opaque_leaves_and_a_dropout_tail_run_at_every_size(model: nn.Module, options: dict, convs: int) -> None:
    model = prepared(model)
    fused = convmerge.fuse(model, **options)
    assert conv_calls(fused) == convs
    for shape in [(1, 3, 16, 16), (2, 3, 17, 5), (3, 3, 1, 2)]:
        same(model, fused, x(*shape))


# --- crashes inside fuse ------------------------------------------------------------------------------


class Clones(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.d = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.d(self.c(x)), (x.clone() if self.how == "clone" else x.detach()) * 2


@pytest.mark.parametrize("model", [
    Clones("clone"), Clones("detach"),
    nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3)),
])
def test_clones_and_batch_norm_pairs_fuse(model: nn.Module) -> None:
    model = prepared(model)
    fused = convmerge.fuse(model)
    same(model, fused, x(2, 3, 9, 10))


# --- tracing with what the user gave ------------------------------------------------------------------


class Only16(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=2, bias=False)
        self.d = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 18 * 18, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.d(self.c(x)).flatten(1))


def test_tracing_uses_the_input_size_given() -> None:
    model = prepared(Only16())
    report = convmerge.check(model, input_size=(16, 16))
    assert report["notes"][0].startswith(("traced with torch.fx on an input of shape [1, 3, 16, 16] (spatial size as given;",
                                          "traced with torch.export on an input of shape [1, 3, 16, 16] (spatial size as given;"))
    assert not any("example_size" in note for note in report["notes"])
    fused = convmerge.fuse(model, input_size=(16, 16))
    assert conv_calls(fused) == 1
    same(model, fused, x(3, 3, 16, 16))


def test_explicit_example_inputs_are_traced_on() -> None:
    model = prepared(TwoInputs())
    fused = convmerge.fuse(model, example_inputs=(x(1, 3, 6, 6), x(1, 3, 7, 7)))
    same(model, fused, x(2, 3, 5, 5), x(1, 3, 11, 11))


# --- the end-to-end check -----------------------------------------------------------------------------


def test_a_module_that_computes_something_else_is_not_returned(monkeypatch) -> None:
    build = rebuild._conv

    def wrong(unit: Any) -> nn.Module:
        conv = build(unit)
        with torch.no_grad():
            conv.weight[0].mul_(1.001)
        return conv

    monkeypatch.setattr(rebuild, "_conv", wrong)
    model = prepared(nn.Sequential(nn.Conv2d(3, 4, 3, padding=2, bias=False), nn.Conv2d(4, 4, 3, padding=1)))
    with pytest.raises(VerificationError, match=r"the output differs from the original's by .* at the traced shape "
                                                r"\(1x3x224x224\)"):
        convmerge.fuse(model)


def test_a_merge_wrong_only_at_another_size_is_caught(monkeypatch) -> None:
    build = rebuild._conv

    def shifted(unit: Any) -> nn.Module:  # right in the interior, wrong at the borders (padding one short)
        conv = build(unit)
        conv.padding = tuple(max(0, p - 1) for p in conv.padding)
        return conv

    monkeypatch.setattr(rebuild, "_conv", shifted)
    model = prepared(nn.Sequential(nn.Conv2d(3, 4, 3, padding=2, bias=False), nn.Conv2d(4, 4, 3, padding=1)))
    with pytest.raises(VerificationError, match="does not compute what the module does: the output has shape"):
        convmerge.fuse(model)


class AtLeast(nn.Module):
    """A conv that refuses inputs smaller than ``side`` (a model with a minimum size)."""

    def __init__(self, side: int, only: bool = False) -> None:
        super().__init__()
        self.conv, self.side, self.only = nn.Conv2d(3, 4, 3, padding=1), side, only

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if t.shape[-1] < self.side or (self.only and t.shape[-1] != self.side):
            raise ValueError(f"needs {self.side}")
        return self.conv(t)


@pytest.mark.parametrize("model, second", [
    (AtLeast(1), (2, 3, 33, 33)),  # about half, odd where the traced size is even
    (AtLeast(40), (2, 3, 65, 65)),  # the original refuses half: one larger
    (AtLeast(64, only=True), (2, 3, 64, 64)),  # the original runs at one size: another batch there
])
def test_the_check_runs_another_batch_at_a_smaller_size_of_the_other_parity(model: nn.Module, second: tuple) -> None:
    cases = endtoend.Cases(prepared(model), (x(1, 3, 64, 64),), fixed_size=False, smallest=(64, 64))
    shapes = [tuple(c.inputs[0].shape) for c in cases.cases]
    assert shapes[:2] == [(1, 3, 64, 64), second]
    assert sum(s[0] == 2 for s in shapes) == 1



class RightBorder(nn.Module):
    """A rebuilt stride-2 conv whose right and bottom padding repeats the edge instead of zeros: exact wherever its
    input is of even size (a stride-2 3x3 with padding 1 then reads no right padding), wrong at odd sizes."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        padded = F.pad(F.pad(t, (1, 0, 1, 0)), (0, 1, 0, 1), mode="replicate")
        return F.conv2d(padded, self.conv.weight, self.conv.bias, 2)


def test_a_merge_wrong_only_at_odd_sizes_of_a_deep_map_is_caught(monkeypatch) -> None:
    """A net that downsamples 32 times at 224 (maps 112, 56, 28, 14, 7), its last stride-2 merge reading the 14x14
    map, ending in a 4x4 pooling (it runs at half the size, not at the smallest): the batch-2 size must give that
    map the other parity too (half, 113, gives 8; 97 gives 7), or a merge wrong only at odd sizes there passes."""
    build = rebuild._conv
    monkeypatch.setattr(rebuild, "_conv", lambda unit: RightBorder(build(unit)) if unit.spec.stride == (2, 2) else
                        build(unit))
    torch.manual_seed(0)
    down = [nn.Conv2d(3 if i == 0 else 8, 8, 3, stride=2, padding=1) for i in range(4)]
    model = prepared(nn.Sequential(*[m for c in down for m in (c, nn.ReLU())], nn.Conv2d(8, 8, 1, bias=False),
                                   nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AvgPool2d(4)))
    with pytest.raises(VerificationError, match="the output differs from the original's"):
        convmerge.fuse(model)


# --- a module that travels ----------------------------------------------------------------------------


def test_the_fused_module_pickles_exports_and_keeps_its_checks() -> None:
    model = prepared(TwoInputs())
    fused = convmerge.fuse(model, input_size=(9, 9))
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.load(buffer, weights_only=False)
    same(model, loaded, x(2, 3, 9, 9), x(1, 3, 9, 9))
    with pytest.raises(ValueError, match="runs only at input size 9x9"):
        loaded(x(1, 3, 9, 9), x(1, 3, 11, 11))
    with pytest.raises(RuntimeError, match="cannot be put in training mode"):
        loaded.train()
    assert loaded.eval() is loaded
    program = torch.export.export(loaded, (x(1, 3, 9, 9), x(1, 3, 9, 9)))
    same(model, program.module(), x(1, 3, 9, 9), x(1, 3, 9, 9))
    assert set(loaded.state_dict()) == set(fused.state_dict())


# --- random modules against the original ---------------------------------------------------------------


class Random(nn.Module):
    """A stack of blocks drawn by hypothesis: convs of every kind, batch norms, pools, pads, adds, concats,
    relus (in place too), in-place sums through aliases, an opaque leaf; one or two inputs."""

    def __init__(self, blocks: list[tuple[str, Any]], channels: int, two: bool) -> None:
        super().__init__()
        self.kinds = [kind for kind, _ in blocks]
        self.blocks = nn.ModuleList(module for _, module in blocks)
        self.two = two
        self.channels = channels

    def forward(self, x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        if self.two:
            x = x + rest[0]
        for kind, block in zip(self.kinds, self.blocks):
            if kind == "residual":
                x = x + block(x)
            elif kind == "alias":
                y = block[0](x)
                t = y
                t += block[1](x)
                x = block[2](y)
            elif kind == "concat":
                x = torch.cat([block[0](x), block[1](x)], 1)
            elif kind == "sub":
                x = block[0](x) - block[1](x)
            else:
                x = block(x)
        return x


class Leaf(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


ARITHMETIC = {
    "x*2+1": lambda m, x: x * 2 + 1, "2-x": lambda m, x: 2 - x, "x/3-0.5": lambda m, x: x / 3 - 0.5,
    "x-buffer": lambda m, x: x - m.shift, "buffer+x": lambda m, x: m.shift + x, "x/buffer": lambda m, x: x / m.shift,
    "scale*x": lambda m, x: m.scale * x, "rsub": lambda m, x: torch.rsub(x, m.shift, alpha=2),
    "add alpha": lambda m, x: torch.add(x, m.shift, alpha=-0.5), "x-=1": lambda m, x: x.sub_(1),
}


class Arithmetic(nn.Module):
    """A conv, then one element-wise op with a constant (ARITHMETIC): per-channel and scalar tensors, numbers."""

    def __init__(self, c: int, which: str) -> None:
        super().__init__()
        self.conv, self.which = nn.Conv2d(c, c, 3, padding=1), which
        self.register_buffer("shift", torch.rand(1, c, 1, 1) + 0.5)
        self.scale = nn.Parameter(torch.randn(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ARITHMETIC[self.which](self, self.conv(x))


@st.composite
def random_modules(draw: Any) -> tuple[Random, int]:
    c = channels = draw(st.integers(1, 3))
    blocks: list[tuple[str, Any]] = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv", "conv_bn", "dw", "strided", "residual", "alias", "concat", "pool",
                                     "ceil_pool", "pad", "relu", "relu_", "leaf", "bn", "scale", "arithmetic",
                                     "repmixer", "sub"]))
        k = draw(st.sampled_from([1, 3]))
        if kind == "conv":
            mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
            block = nn.Conv2d(c, c, k, padding=k // 2, padding_mode=mode, bias=draw(st.booleans()),
                              dilation=draw(st.sampled_from([1, 2])) if k == 3 and mode == "zeros" else 1)
            if block.dilation[0] == 2:
                block.padding = (2, 2)
        elif kind == "conv_bn":
            block = nn.Sequential(nn.Conv2d(c, c, (k, 3), padding=(k // 2, 1), bias=False), nn.BatchNorm2d(c))
        elif kind == "dw":
            block = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.Conv2d(c, c, 1))
        elif kind == "strided":
            block = nn.Sequential(nn.Conv2d(c, c, 3, stride=2, padding=1, bias=False), nn.Conv2d(c, c, 3, padding=1))
        elif kind == "residual":
            block = nn.Sequential(nn.Conv2d(c, c, k, padding=k // 2), nn.BatchNorm2d(c))
        elif kind == "alias":
            block = nn.ModuleList([nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)])
        elif kind == "concat":
            block = nn.ModuleList([nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 3, padding=1)])
            c *= 2
        elif kind == "pool":
            block = nn.AvgPool2d(3, 1, 1, count_include_pad=draw(st.booleans()))
        elif kind == "ceil_pool":
            block = nn.AvgPool2d(2, ceil_mode=True)
        elif kind == "pad":
            block = nn.Sequential(nn.ZeroPad2d((1, 0, 0, 1)), nn.Conv2d(c, c, 2))
        elif kind == "relu":
            block = nn.ReLU()
        elif kind == "relu_":
            block = nn.ReLU(inplace=True)
        elif kind == "leaf":
            block = Leaf()
        elif kind == "scale":
            block = nn.Sequential(nn.Conv2d(c, c, k, padding=k // 2),
                                  nets.LayerScale(c, draw(st.sampled_from(["inplace", "view", "scalar"]))))
        elif kind == "arithmetic":
            block = Arithmetic(c, draw(st.sampled_from(sorted(ARITHMETIC))))
        elif kind == "repmixer":
            block = nets.RepMixer(c, draw(st.booleans()))
        elif kind == "sub":
            block = nn.ModuleList([nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 3, padding=1)])
        else:
            block = nn.BatchNorm2d(c)
        blocks.append((kind, block))
    model = Random(blocks, channels, draw(st.booleans()))
    return model, draw(st.integers(0, 2**16))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(random_modules(), st.sampled_from(["cheaper", "all"]), st.booleans(),
       st.tuples(st.integers(1, 3), st.integers(3, 12), st.integers(3, 12)))
def test_random_modules_compute_what_the_original_does(drawn: tuple[Random, int], policy: str, leaf: bool,
                                                       shape: tuple[int, int, int]) -> None:
    model, seed = drawn
    model = prepared(model, seed)
    inputs = [x(shape[0], model.channels, shape[1], shape[2]) for _ in range(2 if model.two else 1)]
    try:
        with torch.no_grad():
            model(*inputs)
    except RuntimeError:
        return  # a size this model does not run at
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        leaves = [Leaf] if leaf and any(isinstance(m, Leaf) for m in model.modules()) else ()
        fused = convmerge.fuse(model, policy=policy, leaves=leaves,
                               example_inputs=[x(1, model.channels, 12, 11) for _ in inputs])
    try:
        same(model, fused, *inputs)
    except ValueError as e:  # only a module restricted to its traced shape may refuse, and it says so
        assert "runs only at input shape" in str(e)


@pytest.mark.parametrize("inplace", [False, True])
def test_a_repmixer_block_becomes_one_depthwise_conv_with_no_batch_norm_left(inplace: bool) -> None:
    """FastViT's RepMixer (issue 20): its three batch norms, layer scale, subtraction and residual add are
    one depthwise 3x3 conv, exact at every size (1 to 14 here, odd and even, against the original)."""
    model = prepared(nets.RepMixer(4, inplace))
    fused = convmerge.fuse(model, input_size=(8, 8))
    kinds = [type(m) for m in fused.modules()]
    assert nn.BatchNorm2d not in kinds and conv_calls(fused) == 1
    (conv,) = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert conv.groups == 4 and conv.kernel_size == (3, 3)
    ops = {n.target for n in fused.graph.nodes if n.op == "call_function"}
    assert not ops & {torch.ops.aten.mul.Tensor, torch.ops.aten.sub.Tensor, torch.ops.aten.add.Tensor}
    for n in range(1, 15):
        same(model, fused, x(2, 4, n, 15 - n))


def test_the_fx_fallback_keeps_arithmetic_with_constants_and_sub_opaque(monkeypatch) -> None:
    """The fx tracer sees no shapes, so it cannot tell `x * gamma` per channel from a broadcast: opaque there."""
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise trace_export.TraceError("torch.export: refused for the test")

    monkeypatch.setattr(trace_export, "describe", refuse)
    monkeypatch.setattr(trace, "fx_with_shapes", lambda *args: None)  # fx without the shapes one run gives
    model = prepared(nets.RepMixer(4))
    fused = convmerge.fuse(model)
    ops = {node.target for node in fused.graph.nodes if node.op == "call_function"}
    assert {"sub", "mul"} <= {getattr(op, "__name__", str(op)) for op in ops}, ops
    for n in (1, 6, 13):
        same(model, fused, x(2, 4, n, 14 - n))


@pytest.mark.parametrize("which", sorted(ARITHMETIC))
def test_a_conv_then_arithmetic_with_a_constant_is_one_conv(which: str) -> None:
    model = prepared(Arithmetic(3, which))
    fused = convmerge.fuse(model, input_size=(6, 6))
    assert conv_calls(fused) == 1 and len([n for n in fused.graph.nodes if n.op == "call_function"]) == 0
    for n in (1, 2, 5, 9):
        same(model, fused, x(2, 3, n, n + 1))



def test_a_merge_that_takes_a_batch_norms_name_rebuilds() -> None:
    """BN -> BN -> conv -> BN: the merged conv takes the first batch norm's name, whose nodes (running_mean...)
    the graph still held when the conv took its place (found by the random-module property test)."""
    blocks = [("bn", nn.BatchNorm2d(1)), ("bn", nn.BatchNorm2d(1)),
              ("conv_bn", nn.Sequential(nn.Conv2d(1, 1, (1, 3), padding=(0, 1), bias=False), nn.BatchNorm2d(1)))]
    model = prepared(Random(blocks, 1, False))
    for policy in ("cheaper", "all"):
        fused = convmerge.fuse(model, policy=policy, example_inputs=[x(1, 1, 12, 11)])
        assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
        for shape in ((1, 1, 3, 3), (2, 1, 12, 11)):
            same(model, fused, x(*shape))


def test_the_end_to_end_check_puts_the_fused_modules_tensors_back_even_when_it_fails() -> None:
    """The check runs a fused module with its tensors swapped for float64 CPU copies (no deep copy of the graph
    module); afterwards the module holds its own tensors again, in its dtype, whatever the check found."""
    torch.manual_seed(0)
    model = nets.randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())).eval()
    fused = convmerge.fuse(model, input_size=(9, 9))
    cases = endtoend.Cases(model, (torch.randn(1, 3, 9, 9),), fixed_size=False)
    own = dict(fused.state_dict(keep_vars=True))
    assert cases.compare(fused) is None
    conv = next(m for m in fused.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        conv.bias.add_(1e-3)  # a planted error: found, and the tensors still put back
    assert cases.compare(fused) is not None
    after = dict(fused.state_dict(keep_vars=True))
    assert after.keys() == own.keys() and all(after[k] is own[k] for k in own)
    assert all(t.dtype == torch.float32 for t in after.values() if t.is_floating_point())
    assert not fused.training
