"""Verification on mixtures of the output channels (issue 21, goal 5): `reference.run(..., out=Q)` is `Q @` the
layers' output, computed without the last layers at full width; the sizes other than the covering one compare such
mixtures and see a wrong entry in any output channel, while the covering size, compared on every channel, keeps the
sensitivity of a full-width check (no dilution of a tiny error or of a storage rounding in one channel)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from convmerge.engine import plan, reference, verify
from convmerge.engine.algebra import BatchNorm, Conv
from convmerge.graph import parse

from . import models
from .models import chain_of, infos
from .test_plan import mk
from .test_regions import SETTINGS, regions
from .test_verify_narrow import _bn, _plan


def _mixed(y: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return torch.einsum("mc,nc...->nm...", q, y)


@settings(max_examples=80, **SETTINGS)
@given(regions(), st.integers(2, 9), st.integers(1, 3), st.booleans(), st.integers(0, 2**16))
def test_output_mixtures_are_the_mixed_output(built, size: int, m: int, mixed_in: bool, seed: int) -> None:
    """Random regions (convs, batch norms, affine layers, identities, poolings, pads, add, sub, concat): the run
    with `out` equals the brute-force output (tests/models.evaluate) times Q, inputs mixed or not; with every term
    made positive (Magnitudes, |Q|) it bounds |Q @ output|."""
    b, cin, end = built
    doc, tensors = b.doc(end), b.tensors
    graph = parse(doc, infos(tensors))
    layers = [layer["name"] for layer in doc["layers"]]
    shape = (size,) * b.nd
    if end not in verify.layer_sizes(graph, layers, "x", shape):
        return  # PyTorch cannot run the region at this size
    gen = torch.Generator().manual_seed(seed)
    loader = plan.Loader(graph, plan.Tensors(infos(tensors), tensors.__getitem__))
    mix = torch.randn(cin, 2, generator=gen, dtype=torch.float64) if mixed_in else None
    u = torch.randn(1, 2 if mixed_in else cin, *shape, generator=gen, dtype=torch.float64)
    x = _mixed(u, mix) if mix is not None else u
    want = models.evaluate(doc, tensors, x)[0]
    q = torch.randn(m, want.shape[1], generator=gen, dtype=torch.float64)
    params = verify._Mixed(graph, loader, "x", mix)
    try:
        reference.run(graph, params, "x", layers, end, u, mix)
    except RuntimeError:
        return  # the reference cannot run it at full width either (an affine layer of a width the graph lacks)
    got = reference.run(graph, params, "x", layers, end, u, mix, q)
    torch.testing.assert_close(got, _mixed(want, q), rtol=1e-9, atol=1e-9 * float(want.abs().max() + 1))
    terms = verify._Mixed(graph, reference.Magnitudes(graph, loader), "x", None if mix is None else mix.abs())
    bound = reference.run(graph, terms, "x", layers, end, u.abs(), terms.mix, q.abs())
    assert bool((_mixed(want, q).abs() <= bound * (1 + 1e-9) + 1e-12).all())


def _wide_chain(c: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """3x3 pad 1 c -> c, batch norm, 1x1 c -> c: one 3x3 merge, c output channels."""
    gen = torch.Generator().manual_seed(4)
    bn = BatchNorm(*(_bn(c, gen)[k] for k in ("running_mean", "running_var")), 1e-5,
                   *(_bn(c, gen)[k] for k in ("weight", "bias")))
    return chain_of([mk((3, 3), c, c, 1, padding=1), mk((1, 1), c, c, 2)], {0: bn})


def _error(p: plan.Plan, tensors: dict[str, torch.Tensor], merged: Conv) -> float:
    (unit,) = p.applied
    loader = plan.Loader(p.graph, plan.Tensors(infos(tensors), tensors.__getitem__))
    sizes = verify.sizes(p.graph, unit.layers, unit.input, merged.spec, None)
    return verify.check(p.graph, loader, unit.input, unit.layers, unit.output, [merged], sizes).errors[0]


def test_a_size_other_than_the_covering_one_sees_every_output_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The covering size declared to be the smallest one (1x1, which reads the centre tap only): every other size
    compares mixtures of the 64 output channels, and a wrong corner tap shows there in whichever channel it lies.
    (A ten-thousandth of the largest weight: mixed with 63 others, a millionth falls below the tolerance.) The
    earlier check compared 8 random output channels at those sizes and missed it on the 56 others."""
    doc, tensors = _wide_chain(64)
    p = _plan(doc, tensors)
    (unit,) = p.applied
    merged = unit.stored
    sizes = verify.sizes(p.graph, unit.layers, unit.input, merged.spec, None)
    monkeypatch.setattr(verify, "FULL_VERIFY_MACS", 0)
    monkeypatch.setattr(verify, "covers", lambda spec, size: tuple(size) == tuple(sizes[0]))
    assert sizes[0] == (1, 1)
    assert _error(p, tensors, merged) <= 1e-12
    missed = []
    for o in range(merged.spec.out_channels):
        w = merged.weight.clone()
        w[o, o % 7, 0, 0] += 1e-4 * float(merged.weight.abs().max())
        if _error(p, tensors, Conv(merged.spec, w, merged.bias)) <= verify.VERIFY_TOLERANCE:
            missed.append(o)
    assert missed == []


def test_a_tiny_error_in_one_output_channel_of_a_wide_merge_is_caught() -> None:
    """256 channels: one entry of one output channel off by 2e-5 of the largest weight gives an error a few
    times the tolerance (the output sums 2,304 terms per channel); mixed with the 255 other channels at the
    covering size it would fall about a hundred times below it."""
    c = 256
    doc, tensors = _wide_chain(c)
    p = _plan(doc, tensors)
    (unit,) = p.applied
    merged = unit.stored
    assert _error(p, tensors, merged) <= 1e-12
    for o, i, tap in ((0, 3, (0, 0)), (137, 255, (1, 1)), (255, 0, (2, 2))):
        w = merged.weight.clone()
        w[(o, i, *tap)] += 2e-5 * float(merged.weight.abs().max())
        error = _error(p, tensors, Conv(merged.spec, w, merged.bias))
        assert verify.VERIFY_TOLERANCE < error < 1e3 * verify.VERIFY_TOLERANCE, (o, i, tap, error)
    b = merged.bias.clone()
    b[200] += 2e-5 * float(merged.weight.abs().max())
    assert _error(p, tensors, Conv(merged.spec, merged.weight, b)) > verify.VERIFY_TOLERANCE


def _float16_chain(c: int, gen: torch.Generator, big_row: float = 0.0) -> tuple[dict, dict[str, torch.Tensor]]:
    """3x3 pad 1 c -> c (weights about 1), 1x1 c -> c (weights about 1/16), float16; `big_row` sets output
    channel 77's 1x1 weights, whose merged ones then sum 256 of them."""
    w1 = (1 + 0.1 * torch.randn(c, c, 3, 3, generator=gen)).half()
    w2 = torch.randn(c, c, 1, 1, generator=gen) / math.sqrt(c)
    if big_row:
        w2[77] = big_row
    return chain_of([Conv(mk((3, 3), c, c, padding=1, bias=False).spec, w1, None),
                     Conv(mk((1, 1), c, c).spec, w2.half(), torch.zeros(c).half())])


def test_float16_rounding_of_a_wide_merge_is_measured_on_every_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    """256 channels in float16: the rounding recorded (the stored weights against the float64 merge) is about
    what every size compared on every channel, inputs unmixed, gives (within 4x: other random inputs); mixing the
    output channels at the covering size too would divide it by about 25.  One output channel whose merged weights overflow float16 (256 x 300 > 65504) is refused."""
    c = 256
    doc, tensors = _float16_chain(c, torch.Generator().manual_seed(5))
    (unit,) = _plan(doc, tensors).applied
    assert unit.dtype == torch.float16 and unit.refused is None
    assert 0 < unit.rounding < 4 * torch.finfo(torch.float16).eps
    monkeypatch.setattr(verify, "MIXES", c)  # no mixtures: every channel at every size
    (full,) = _plan(doc, tensors).applied
    assert unit.rounding >= full.rounding / 4, (unit.rounding, full.rounding)  # 2.6e-6 and 5.9e-6 here
    monkeypatch.undo()
    doc, tensors = _float16_chain(c, torch.Generator().manual_seed(5), big_row=300.0)
    (bad,) = _plan(doc, tensors).units
    assert bad.refused is not None and bad.refused.kind == "storage-rounding" and bad.rounding == math.inf


def test_a_difference_of_nearly_equal_branches_is_verified_against_its_terms() -> None:
    """3x3 conv minus a 3x3 conv whose weights differ by 1e-9 relative: the output is about 1e-9 of its terms, and
    the merge's float64 rounding is relative to the terms (the magnitudes sum a difference).  The magnitudes run on
    input mixtures summed it as a difference, so the scale was the near-zero output itself and the exact merge
    failed its verification."""
    c = 8
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(c, c, 3, 3, generator=gen, dtype=torch.float64)
    layers = [{"name": name, "op": "conv2d", "input": "x", "stride": 1, "padding": 1, "dilation": 1, "groups": 1}
              for name in ("a", "b")] + [{"name": "diff", "op": "sub", "inputs": ["a", "b"]}]
    tensors = {"a.weight": w, "b.weight": w * (1 + 1e-9 * torch.randn(c, c, 3, 3, generator=gen, dtype=torch.float64))}
    p = _plan(models.describe(layers, ["diff"]), tensors)
    (unit,) = p.applied
    assert unit.error <= 1e-12
