"""The fast float64 grouped and dense convolutions against torch.nn.functional's own, over random shapes and
options."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from convmerge.engine.grouped import dense_conv, fast_grouped, grouped_conv

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@st.composite
def convs(draw: st.DrawFn) -> tuple:
    nd = draw(st.integers(1, 3))
    groups = draw(st.integers(2, 4))
    per_group, out_per_group = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kernel = [draw(st.integers(1, 4 if nd < 3 else 3)) for _ in range(nd)]
    stride = [draw(st.integers(1, 3)) for _ in range(nd)]
    dilation = [draw(st.integers(1, 2)) for _ in range(nd)]
    padding = [draw(st.integers(0, 3)) for _ in range(nd)]
    size = [draw(st.integers(dilation[k] * (kernel[k] - 1) + 1, 9)) for k in range(nd)]
    batch, bias = draw(st.integers(1, 2)), draw(st.booleans())
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(batch, groups * per_group, *size, generator=gen, dtype=torch.float64)
    w = torch.randn(groups * out_per_group, per_group, *kernel, generator=gen, dtype=torch.float64)
    b = torch.randn(groups * out_per_group, generator=gen, dtype=torch.float64) if bias else None
    return x, w, b, stride, padding, dilation, groups


@settings(max_examples=200, deadline=None)
@given(convs())
def test_grouped_conv_is_torchs_conv(case: tuple) -> None:
    x, w, b, stride, padding, dilation, groups = case
    want = _CONV[w.dim() - 2](x, w, b, stride=stride, padding=padding, dilation=dilation, groups=groups)
    got = grouped_conv(x, w, b, stride, padding, dilation, groups)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with fast_grouped():
        routed = _CONV[w.dim() - 2](x, w, b, stride=stride, padding=padding, dilation=dilation, groups=groups)
    torch.testing.assert_close(routed, want, rtol=1e-12, atol=1e-12)


@st.composite
def dense_convs(draw: st.DrawFn) -> tuple:
    nd = draw(st.integers(1, 3))
    kernel = [draw(st.integers(1, 4 if nd < 3 else 3)) for _ in range(nd)]
    stride = [draw(st.integers(1, 3)) for _ in range(nd)]
    dilation = [draw(st.integers(1, 2)) for _ in range(nd)]
    padding = [draw(st.integers(0, 3)) for _ in range(nd)]
    size = [draw(st.integers(max(1, dilation[k] * (kernel[k] - 1) + 1 - 2 * padding[k]), 9)) for k in range(nd)]
    batch, bias = draw(st.integers(1, 2)), draw(st.booleans())
    cin, cout = draw(st.integers(1, 9)), draw(st.integers(1, 5))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(batch, cin, *size, generator=gen, dtype=torch.float64)
    w = torch.randn(cout, cin, *kernel, generator=gen, dtype=torch.float64)
    b = torch.randn(cout, generator=gen, dtype=torch.float64) if bias else None
    return x, w, b, stride, padding, dilation


@settings(max_examples=200, deadline=None)
@given(dense_convs())
def test_dense_conv_is_torchs_conv(case: tuple) -> None:
    x, w, b, stride, padding, dilation = case
    want = _CONV[w.dim() - 2](x, w, b, stride=stride, padding=padding, dilation=dilation)
    got = dense_conv(x, w, b, stride, padding, dilation)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stride", [1, 2])
def test_wide_input_few_outputs_routed_to_dense_conv(stride: int) -> None:
    """A few output channels reading many at a large size (a narrowed verification) take `dense_conv`, with
    torch's values."""
    from convmerge.engine import grouped

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 256, 59, 59, generator=gen, dtype=torch.float64)
    w = torch.randn(4, 256, 3, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(4, generator=gen, dtype=torch.float64)
    calls = []
    original = grouped.dense_conv
    want = F.conv2d(x, w, b, stride=stride, padding=1, dilation=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(grouped, "dense_conv", lambda *a: calls.append(a) or original(*a))
        with fast_grouped():
            got = F.conv2d(x, w, b, stride=stride, padding=1, dilation=2)
    assert len(calls) == 1
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_only_float64_grouped_convolutions_are_routed(monkeypatch) -> None:
    from convmerge.engine import grouped

    calls = []
    monkeypatch.setattr(grouped, "grouped_conv", lambda *a: calls.append(a) or torch.zeros(()))
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    with fast_grouped():
        F.conv2d(x.float(), torch.randn(4, 1, 3, 3), groups=4)  # float32: torch's own
        F.conv2d(x, torch.randn(4, 4, 3, 3, dtype=torch.float64))  # dense: torch's own
        F.conv2d(x, torch.randn(4, 1, 3, 3, dtype=torch.float64), groups=4)
    assert len(calls) == 1


def test_routing_does_not_import_torch_dynamo() -> None:
    """The mode's dispatch is not wrapped in torch._dynamo.disable, whose first call imports torch._dynamo (about
    as long as importing torch): every check and fuse runs under the mode."""
    import subprocess
    import sys

    code = ("import sys, torch, torch.nn.functional as F\n"
            "from convmerge.engine.grouped import fast_grouped\n"
            "before = 'torch._dynamo' in sys.modules\n"
            "x = torch.randn(1, 4, 5, 5, dtype=torch.float64)\n"
            "w = torch.randn(4, 1, 3, 3, dtype=torch.float64)\n"
            "with fast_grouped():\n"
            "    got = F.conv2d(x, w, groups=4)\n"
            "assert torch.allclose(got, F.conv2d(x, w, groups=4))\n"
            "print(before, 'torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    if out[0] == "True":
        pytest.skip("this torch imports torch._dynamo with torch")
    assert out == ["False", "False"]


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2])
def test_one_value_for_every_axis_is_routed_as_torch_reads_it(monkeypatch, nd: int, groups: int) -> None:
    """``F.conv2d(x, w, None, (2,), (1,), (1,))`` is legal (one value, every axis) and reaches the dispatch as
    one-element lists: the routed convolutions read it for every axis, as torch does (it raised IndexError, and
    the end-to-end check then ran the original in the model's dtype instead of float64)."""
    from convmerge.engine import grouped
    monkeypatch.setattr(grouped, "_UNFOLD_ELEMENTS", 0)  # route every dense conv of few outputs
    gen = torch.Generator().manual_seed(nd)
    x = torch.randn(2, 4 * groups, *[7] * nd, generator=gen, dtype=torch.float64)
    w = torch.randn(2 * groups, 4, *[3] * nd, generator=gen, dtype=torch.float64)
    want = _CONV[nd](x, w, None, (2,), (1,), (2,), groups)
    with fast_grouped():
        got = _CONV[nd](x, w, None, (2,), (1,), (2,), groups)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
