"""The size past the borders (verify._past_borders): the border zones it is computed from hold against an
independent oracle (the region run by F ops on the input with random cells beside it), every larger size is past
the borders too, and the sizes stay near a kernel wide (issue 21: FastViT's 7x7 regions were checked at 70x70)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from convmerge.engine import verify
from convmerge.graph import GraphError, parse

from .models import infos
from .test_regions import SETTINGS, region_output, regions
from .test_verify_narrow import _plan, repvgg_block

CONTEXT = 8
"""Cells put beside the input: a multiple of every stride the regions compose (1, 2 or 4)."""


@settings(max_examples=150, **SETTINGS)
@given(regions(), st.integers(1, 20), st.data())
def test_no_output_outside_a_border_zone_reads_that_border(built, n: int, data) -> None:
    """Random regions (convs with pads, strides, dilation and every padding mode, pads, poolings in ceil mode,
    joins): each output that `_zones` puts after the left zone is the same when random cells stand before the
    input, and each one before the right zone the same when they stand after it (with circular padding: each
    output between the zones)."""
    b, cin, out = built
    doc, tensors = b.doc(out), b.tensors
    try:
        graph = parse(doc, infos(tensors))
    except GraphError:
        return
    k = data.draw(st.integers(0, b.nd - 1), label="axis")
    size = tuple(n if i == k else 9 for i in range(b.nd))
    zones = verify._zones(graph, [layer["name"] for layer in doc["layers"]], "x", size, k)
    assert zones is not None  # every layer of these regions has known windows
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(2, cin, *size, generator=gen, dtype=torch.float64)
    y = region_output(doc, tensors, x)
    if out not in zones:
        assert y is None or min(y.shape[2:]) < 1 or y.dim() < 3  # PyTorch does not run it at this size either
        return
    if y is None:
        return
    lo, hi, length = zones[out]
    assert y.shape[2 + k] == length
    cells = torch.randn(2, cin, *(CONTEXT if i == k else s for i, s in enumerate(size)), generator=gen,
                        dtype=torch.float64)
    before = region_output(doc, tensors, torch.cat([cells, x], 2 + k))
    after = region_output(doc, tensors, torch.cat([x, cells], 2 + k))
    assert before is not None and after is not None
    shift = before.shape[2 + k] - length
    # circular padding reads the far end: there an output of one zone reads both ends' cells (each zone's outputs
    # are still the same function of the cells at the ends at every larger size); the interior reads neither
    wraps = any(layer.get("padding_mode", layer.get("mode")) == "circular" for layer in doc["layers"])
    start, stop = lo, length - hi
    for side, got, at in (("left", before, shift), ("right", after, 0)):
        a, b = (start, stop) if wraps else (start, length) if side == "left" else (0, stop)
        if a < b:
            assert torch.allclose(y.narrow(2 + k, a, b - a), got.narrow(2 + k, a + at, b - a), rtol=1e-9,
                                  atol=1e-9), (side, lo, hi, length)

@settings(max_examples=60, **SETTINGS)
@given(regions())
def test_every_size_from_the_one_past_the_borders_on_is_past_them(built) -> None:
    """The argument for checking one size past the borders and for standing a congruent size in for a large one:
    from `_past_borders` on, every size has the borders apart at every value (a few periods tried)."""
    b, _, out = built
    try:
        p = _plan(b.doc(out), b.tensors)
    except GraphError:
        return
    for unit in p.applied:
        for k, a in enumerate(unit.spec.axes):
            first = verify._first(lambda n: verify._runs_axis(p.graph, unit.layers, unit.input, k, n, unit.spec))
            assert first is not None
            begin = verify._past_borders(p.graph, unit.layers, unit.input, unit.spec, k, first)
            size = [64] * unit.spec.ndim
            for n in range(begin, begin + 4 * a.stride + 1):
                size[k] = n
                assert verify._apart(p.graph, unit.layers, unit.input, unit.spec, tuple(size), k), (unit.layers, n)


def test_a_repvgg_block_is_checked_at_sizes_near_its_kernel() -> None:
    """3x3 + 1x1 + identity BN: one border cell each side, so 4x4 has an output reading neither (was 33x33)."""
    doc, tensors = repvgg_block(8)
    p = _plan(doc, tensors)
    (unit,) = p.applied
    assert verify.sizes(p.graph, unit.layers, unit.input, unit.spec, None) == [(1, 1), (2, 2), (3, 3), (4, 4)]
