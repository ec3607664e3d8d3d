"""Hypothesis strategies: random conv pairs over every hyperparameter convmerge must handle."""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

from convmerge.engine.algebra import Conv
from convmerge.maths.spec import PADDING_MODES, conv_spec


@st.composite
def padding(draw, nd: int, stride: tuple[int, ...]):
    forms = ["int", "per_axis", "pairs", "valid"] + (["same"] if all(s == 1 for s in stride) else [])
    form = draw(st.sampled_from(forms))
    p = st.integers(0, 4)
    if form == "int":
        return draw(p)
    if form == "per_axis":
        return [draw(p) for _ in range(nd)]
    if form == "pairs":
        return [[draw(p), draw(p)] for _ in range(nd)]
    return form


@st.composite
def conv(draw, nd: int, cin: int, cout: int, groups: int, mode: str | None = None, salt: int = 0):
    kernel = tuple(draw(st.integers(1, 4)) for _ in range(nd))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    if mode is None:
        mode = draw(st.sampled_from(["zeros"] * 3 + list(PADDING_MODES[1:])))
    spec = conv_spec(kernel, cin, cout, stride=stride, padding=draw(padding(nd, stride)), dilation=dilation,
                     groups=groups, padding_mode=mode, bias=draw(st.booleans()))
    # The salt keeps two convs of a pair from sharing weights when hypothesis shrinks both seeds to 0:
    # equal kernels are not generic (W2[0]W1[1] == W2[1]W1[0] can hide a difference).
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)) + 7919 * salt)
    weight = torch.randn(*spec.weight_shape, generator=gen, dtype=torch.float64)
    for axis in range(nd):  # zero border slices sometimes: effective support smaller than the kernel
        if kernel[axis] > 1 and draw(st.integers(0, 4)) == 0:
            index = [slice(None)] * weight.dim()
            index[2 + axis] = 0 if draw(st.booleans()) else kernel[axis] - 1
            weight[tuple(index)] = 0
    bias = torch.randn(cout, generator=gen, dtype=torch.float64) if spec.bias else None
    return Conv(spec, weight, bias)


@st.composite
def conv_pairs(draw, nd: int | None = None, mode: str | None = None):
    """Two convs that can follow each other: channels and groups chosen to fit."""
    if nd is None:
        nd = draw(st.sampled_from([1, 1, 1, 2, 2, 3]))
    g1, g2 = draw(st.sampled_from([1, 1, 2])), draw(st.sampled_from([1, 1, 2, 4]))
    c0 = g1 * draw(st.integers(1, 2))
    c1 = math.lcm(g1, g2) * draw(st.integers(1, 2))
    c2 = g2 * draw(st.integers(1, 2))
    return draw(conv(nd, c0, c1, g1, mode)), draw(conv(nd, c1, c2, g2, mode, salt=1))
