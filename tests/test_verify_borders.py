"""The size past the borders (verify._past_borders): the border zones it is computed from hold against an
independent oracle (the region run by F ops on the input with random cells beside it), every larger size is past
the borders too, and the sizes stay near a kernel wide (issue 21: FastViT's 7x7 regions were checked at 70x70)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from convmerge.engine import plan, verify
from convmerge.engine.algebra import Conv
from convmerge.engine.reduce import reduce_part
from convmerge.graph import GraphError, parse
from convmerge.maths.region import find_regions

from .models import infos
from .oracle import run
from .test_regions import SETTINGS, Builder, region_output, regions
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
    wraps = any(layer.get("padding_mode", layer.get("mode")) == "circular" for layer in doc["layers"])
    assert zones is not None or wraps  # every other layer of these regions has known windows
    if zones is None:
        return  # circular padding: the far end's cells are the near end's at a small length (the bound stands)
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
    start, stop = lo, length - hi
    for side, got, at in (("left", before, shift), ("right", after, 0)):
        a, b = (start, length) if side == "left" else (0, stop)
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
                apart = verify._apart(p.graph, unit.layers, unit.input, unit.spec, tuple(size), k)
                wraps = any(p.graph.specs[n].padding_mode == "circular" for n in unit.layers if n in p.graph.specs)
                wraps |= any(p.graph.pads[n].mode == "circular" for n in unit.layers if n in p.graph.pads)
                assert apart or (apart is None and wraps), (unit.layers, n)  # circular: the generous bound


def test_a_repvgg_block_is_checked_at_sizes_near_its_kernel() -> None:
    """3x3 + 1x1 + identity BN: one border cell each side, so 4x4 has an output reading neither (was 33x33)."""
    doc, tensors = repvgg_block(8)
    p = _plan(doc, tensors)
    (unit,) = p.applied
    assert verify.sizes(p.graph, unit.layers, unit.input, unit.spec, None) == [(1, 1), (2, 2), (3, 3), (4, 4)]


# --- a wrong merged conv that passes the check at its sizes is wrong nowhere else ----------------------------------


def _wrong_versions(conv: Conv) -> list[tuple[str, Conv]]:
    """The candidate and versions of it that differ at the borders only: its padding one cell to the other side
    on one axis (the same output length), or another padding mode."""
    spec, out = conv.spec, [("candidate", conv)]
    for k, a in enumerate(spec.axes):
        for d in (1, -1):
            pad = (a.pad[0] + d, a.pad[1] - d)
            if min(pad) >= 0:
                axes = tuple(replace(b, pad=pad) if i == k else b for i, b in enumerate(spec.axes))
                out.append((f"pad {pad} on axis {k}", Conv(replace(spec, axes=axes), conv.weight, conv.bias)))
    if any(sum(a.pad) for a in spec.axes):
        out += [(mode, Conv(replace(spec, padding_mode=mode), conv.weight, conv.bias))
                for mode in ("zeros", "reflect", "replicate", "circular") if mode != spec.padding_mode]
    return out


def _differs(doc: dict, tensors: dict, conv: Conv, cin: int, size: tuple[int, ...]) -> bool:
    """Brute force: both sides run at this size and give different outputs (F ops on the description)."""
    x = torch.randn(2, cin, *size, generator=torch.Generator().manual_seed(sum(size)), dtype=torch.float64)
    want = region_output(doc, tensors, x)
    if want is None or want.numel() == 0:
        return False
    try:
        got = run(x, conv.weight, conv.bias, conv.spec)
    except RuntimeError:
        return False
    return got.shape != want.shape or not torch.allclose(got, want, rtol=1e-8, atol=1e-8 * float(want.abs().max()))


@settings(max_examples=80, **SETTINGS)
@given(regions(), st.data())
def test_a_merged_conv_the_check_passes_at_its_sizes_is_right_at_every_size(built, data) -> None:
    """The rules' candidate for a random region, exact or not, and versions of it wrong at the borders only: where
    `verify.check` passes one at `verify.sizes` (no size given: at every size 1..40 where both run; a size given:
    at that size, whose stand-in the check ran), brute force finds no size of those where it differs."""
    b, cin, out = built
    doc = b.doc(out)
    try:
        graph = parse(doc, infos(b.tensors))
    except GraphError:
        return
    found = find_regions(graph)
    if not found or found[0].output != out:
        return
    region = found[0]
    loader = plan.Loader(graph, plan.Tensors(infos(b.tensors), b.tensors.__getitem__))
    red = reduce_part(graph, loader, region.input, cin, b.nd, region.layers, region.output)
    if red.conv is None:
        return
    given_n = data.draw(st.sampled_from([None, None, *range(1, 25)]), label="size given")
    for name, conv in _wrong_versions(red.conv):
        size = None if given_n is None else (given_n,) * b.nd
        checked = verify.sizes(graph, region.layers, region.input, conv.spec, size)
        if not checked:
            continue
        try:
            errors = verify.check(graph, loader, region.input, region.layers, region.output, [conv], checked).errors
        except RuntimeError:  # a forced version that does not run at a stand-in size (its reflect padding): refused
            continue
        if not errors[0] <= 1e-9:
            continue
        for n in range(1, 41) if given_n is None else [given_n]:
            assert not _differs(doc, b.tensors, conv, cin, (n,) * b.nd), (name, given_n, n, checked, doc["layers"], conv.spec)


@pytest.mark.parametrize("mode", ["circular", "replicate"])
def test_a_length_one_input_is_no_stand_in_where_the_padding_copies_its_cell(mode: str) -> None:
    """A 1-tap conv padded (0, 1) reads [x0, x0] at length 1 and [x0, x1, x0] (circular) or [x0, x1, x1]
    (replicate) at 2; padded (1, 0): [x0, x0], then [x1, x0, x1] or [x0, x0, x1].  At length 1 the padding copies
    the input's one cell, so no shift between the two shows: the stand-in for 2 was 1, where the wrong padding
    passed.  The region's output and the merged conv's need an output reading neither border in common."""
    b = Builder(1, torch.Generator().manual_seed(0))
    out = b.conv("x", 2, 2, [1], [1], [[0, 1]], [1], mode=mode)
    doc = b.doc(out)
    graph = parse(doc, infos(b.tensors))
    loader = plan.Loader(graph, plan.Tensors(infos(b.tensors), b.tensors.__getitem__))
    red = reduce_part(graph, loader, "x", 2, 1, [out], out)
    assert red.conv is not None
    wrong = dict(_wrong_versions(red.conv))["pad (1, 0) on axis 0"]
    assert _differs(doc, b.tensors, wrong, 2, (2,))
    for given in (None, (2,)):
        checked = verify.sizes(graph, [out], "x", wrong.spec, given)
        assert verify.check(graph, loader, "x", [out], out, [wrong], checked).errors[0] > 1e-6, checked
