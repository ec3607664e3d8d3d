"""Composed kernels against the layers themselves (torch.nn.functional, float64): a pair with no padding is one
conv at every size, so the merged conv must compute what the two convs compute.  Depthwise next to dense takes
its own path in algebra.compose_kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from convmerge.engine import algebra
from convmerge.engine.algebra import Conv
from convmerge.maths.spec import conv_spec


def _conv(cin: int, cout: int, k: int, groups: int, stride: int, dilation: int, bias: bool, gen) -> Conv:
    spec = conv_spec((k, k), cin, cout, stride=stride, padding=0, dilation=dilation, groups=groups, bias=bias)
    weight = torch.randn(cout, cin // groups, k, k, generator=gen, dtype=torch.float64)
    return Conv(spec, weight, torch.randn(cout, generator=gen, dtype=torch.float64) if bias else None)


def _run(c: Conv, x: torch.Tensor) -> torch.Tensor:
    s = c.spec
    return F.conv2d(x, c.weight, c.bias, stride=s.stride, dilation=s.dilation, groups=s.groups)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["dw-dense", "dense-dw", "dense-dense", "dw-dw"]), st.integers(1, 5), st.integers(1, 4),
       st.sampled_from([1, 3, 5]), st.sampled_from([1, 3]), st.integers(1, 2), st.integers(1, 2), st.integers(1, 2),
       st.booleans(), st.integers(0, 1000), st.booleans())
def test_a_composed_kernel_computes_the_pair(kind, c, mult, k1, k2, s1, d1, d2, bias, seed, deferred):
    """Composed at once, or when first read (`algebra.Deferred`, every kernel deferred here)."""
    gen = torch.Generator().manual_seed(seed)
    first_dw, second_dw = kind.startswith("dw"), kind.endswith("-dw")
    c0 = c
    c1 = c if first_dw else c * mult
    c2 = c1 if second_dw else c * mult + 1
    a = _conv(c0, c1, k1, c0 if first_dw else 1, s1, d1, bias, gen)
    b = _conv(c1, c2, k2, c1 if second_dw else 1, 1, d2, bias, gen)
    v = algebra.analyze(a, b)
    before, algebra.DEFER_ELEMENTS = algebra.DEFER_ELEMENTS, 1 if deferred else algebra.DEFER_ELEMENTS
    try:
        merged = algebra.merge(a, b, v.candidate)
    finally:
        algebra.DEFER_ELEMENTS = before
    assert isinstance(merged, algebra.Deferred) is deferred and not (deferred and merged.composed)
    if deferred:
        assert merged.surely_finite()
    for n in (23, 30):  # large enough for every drawn pair (extents up to 9 and 5, stride 2)
        x = torch.randn(2, c0, n, n + 3, generator=gen, dtype=torch.float64)
        want = _run(b, _run(a, x))
        got = _run(merged, x)
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-10), (kind, float((got - want).abs().max()))


def test_a_large_merge_the_cost_model_turns_down_is_never_composed(monkeypatch):
    """FastViT's 7x7 depthwise before a 1x1 expansion: one dense 7x7 conv would cost ~C times more, so planning
    keeps the two; the dense kernel (here 4 M float64 values) is never computed, and no unit holds it."""
    import torch.nn as nn

    import convmerge

    composed = []
    compose = algebra.compose_kernels
    monkeypatch.setattr(algebra, "compose_kernels", lambda *a: composed.append(a[1].spec.out_channels) or compose(*a))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(128, 128, 7, padding=3, groups=128), nn.Conv2d(128, 512, 1), nn.ReLU()).eval()
    report = convmerge.check(net, input_size=(16, 16))
    assert 512 not in composed, composed  # the expansion's product was judged from its spec
    assert report["merges"] == [] and report["regions"][0]["verdict"] == "mergeable", report
    x = torch.randn(2, 128, 9, 11)
    torch.testing.assert_close(convmerge.fuse(net, input_size=(16, 16))(x), net(x), rtol=1e-4, atol=1e-5)
