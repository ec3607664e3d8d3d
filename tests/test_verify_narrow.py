"""Verification in proportion (issue 21, goal 3): a region with an identity or batch-norm branch is checked on
a few mixtures of its input channels like any other, and no wrong merged weight hides from the narrowed check:
every single entry of the merged weight (any output channel, input channel, tap) and of its bias, corrupted
in turn, is caught."""

from __future__ import annotations

from typing import Any, Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from convmerge.engine import algebra, plan, verify
from convmerge.engine.algebra import BatchNorm, Conv
from convmerge.graph import GraphError, parse
from convmerge.options import Options

from .models import chain_of, describe, infos
from .test_plan import mk
from .test_regions import SETTINGS, regions


def _bn(c: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"running_mean": torch.randn(c, generator=gen, dtype=torch.float64),
            "running_var": torch.rand(c, generator=gen, dtype=torch.float64) + 0.5,
            "weight": torch.randn(c, generator=gen, dtype=torch.float64),
            "bias": torch.randn(c, generator=gen, dtype=torch.float64)}


def repvgg_block(c: int, identity: str = "batch_norm", seed: int = 0) -> tuple[dict, dict[str, torch.Tensor]]:
    """3x3 + BN, 1x1 + BN and an identity branch (a BN, or the value itself), summed: RepVGG's training form."""
    gen = torch.Generator().manual_seed(seed)
    layers: list[dict] = []
    tensors: dict[str, torch.Tensor] = {}
    for name, k in (("dense", 3), ("point", 1)):
        layers.append({"name": name, "op": "conv2d", "input": "x", "stride": 1, "padding": k // 2, "dilation": 1,
                       "groups": 1})
        tensors[f"{name}.weight"] = torch.randn(c, c, k, k, generator=gen, dtype=torch.float64)
        layers.append({"name": f"{name}.bn", "op": "batch_norm", "input": name, "eps": 1e-5})
        tensors.update({f"{name}.bn.{key}": t for key, t in _bn(c, gen).items()})
    layers.append({"name": "skip", "op": identity, "input": "x", **({"eps": 1e-5} if identity == "batch_norm" else {})})
    if identity == "batch_norm":
        tensors.update({f"skip.{key}": t for key, t in _bn(c, gen).items()})
    layers.append({"name": "sum", "op": "add", "inputs": ["dense.bn", "point.bn", "skip"]})
    return describe(layers, ["sum"]), tensors


def _plan(doc: dict, tensors: dict[str, torch.Tensor]) -> plan.Plan:
    graph = parse(doc, infos(tensors))
    return plan.build(graph, plan.Tensors(infos(tensors), tensors.__getitem__), Options("all"))


def _runs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[int, ...], int, int]]:
    """(spatial size, input channels, output channels) of every conv the verification runs, the layers' and the
    merged conv's alike."""
    seen: list[tuple[tuple[int, ...], int, int]] = []
    real = algebra.apply

    def recorded(conv: Conv, x: torch.Tensor) -> torch.Tensor:
        seen.append((tuple(x.shape[2:]), x.shape[1], conv.spec.out_channels))
        return real(conv, x)

    monkeypatch.setattr(algebra, "apply", recorded)
    return seen


@pytest.mark.parametrize("identity", ["batch_norm", "identity", "dropout"])
def test_an_identity_or_bn_branch_no_longer_stops_the_narrowing(monkeypatch: pytest.MonkeyPatch,
                                                                 identity: str) -> None:
    c = 48
    doc, tensors = repvgg_block(c, identity)
    runs = _runs(monkeypatch)
    p = _plan(doc, tensors)
    (unit,) = p.applied
    assert set(unit.layers) == {"dense", "dense.bn", "point", "point.bn", "skip", "sum"}
    assert unit.error <= 1e-12
    large = max(verify.sizes(p.graph, unit.layers, unit.input, unit.spec, None), key=lambda s: s[0] * s[1])
    seen = [(cin, cout) for size, cin, cout in runs if size == large]
    assert seen, "the check runs a size past the borders"
    assert all(cin <= verify.MIXES for cin, _ in seen), seen  # every conv there reads the mixtures, none all 48
    # the whole check costs less than half the layers' own convs (3x3 and 1x1 on 48 channels) once at its sizes
    sizes = verify.sizes(p.graph, unit.layers, unit.input, unit.spec, None)
    one_pass = c * c * (9 + 1) * sum(h * w for h, w in sizes)
    assert 0 < unit.checked_macs < one_pass / 2


def _check_catches_every_entry(p: plan.Plan, tensors: dict[str, torch.Tensor], channels_checked: Optional[Any] = None
                               ) -> None:
    """The merge passes; each entry of its weight and bias, off by a millionth of the weight's scale, fails."""
    (unit,) = p.applied
    graph, loader = p.graph, plan.Loader(p.graph, plan.Tensors(infos(tensors), tensors.__getitem__))
    merged = unit.stored
    assert merged.weight.dtype == torch.float64
    sizes = verify.sizes(graph, unit.layers, unit.input, merged.spec, None)

    def error(conv: Conv) -> float:
        return verify.check(graph, loader, unit.input, unit.layers, unit.output, [conv], sizes).errors[0]

    assert error(merged) <= 1e-12
    delta = 1e-6 * float(merged.weight.abs().max())
    missed = []
    for index in torch.cartesian_prod(*(torch.arange(n) for n in merged.weight.shape)).tolist():
        w = merged.weight.clone()
        w[tuple(index)] += delta
        if error(Conv(merged.spec, w, merged.bias)) <= verify.VERIFY_TOLERANCE:
            missed.append(("weight", *index))
    assert merged.bias is not None
    for o in range(merged.spec.out_channels):
        b = merged.bias.clone()
        b[o] += delta
        if error(Conv(merged.spec, merged.weight, b)) <= verify.VERIFY_TOLERANCE:
            missed.append(("bias", o))
    assert missed == []


def test_every_corrupted_entry_of_a_block_with_an_identity_bn_branch_is_caught() -> None:
    doc, tensors = repvgg_block(verify.MIXES + 1)  # wider than the mixtures: the input is mixed
    _check_catches_every_entry(_plan(doc, tensors), tensors)


def test_every_corrupted_entry_of_a_chain_narrowed_at_its_output_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """A chain ending in a dense conv and a batch norm, wider than MIXES: every size but the covering one
    compares a few mixtures of the output channels, and the end taps (read at no border size) are still checked
    on every one (1-d: the same per axis, a fifth of the entries)."""
    monkeypatch.setattr(verify, "FULL_VERIFY_MACS", 0)
    gen = torch.Generator().manual_seed(1)
    cout = verify.MIXES + 1
    convs = [mk((3,), verify.MIXES + 1, 6, 1, padding=2), mk((3,), 6, cout, 2, padding=1)]
    bn = BatchNorm(*(_bn(cout, gen)[k] for k in ("running_mean", "running_var")), 1e-5,
                   *(_bn(cout, gen)[k] for k in ("weight", "bias")))
    doc, tensors = chain_of(convs, {1: bn})
    runs = _runs(monkeypatch)
    p = _plan(doc, tensors)
    assert any(cout_ == verify.MIXES for _, _, cout_ in runs), runs  # the output mixing is in use
    _check_catches_every_entry(p, tensors)


def test_a_grouped_merge_with_an_identity_branch_is_checked_on_every_channel() -> None:
    """Depthwise 3x3 + BN and an identity BN (MobileOne's form): every corrupted entry is caught."""
    gen = torch.Generator().manual_seed(2)
    c = verify.MIXES + 4
    layers = [{"name": "dw", "op": "conv2d", "input": "x", "stride": 1, "padding": 1, "dilation": 1, "groups": c},
              {"name": "dw.bn", "op": "batch_norm", "input": "dw", "eps": 1e-5},
              {"name": "skip", "op": "batch_norm", "input": "x", "eps": 1e-5},
              {"name": "sum", "op": "add", "inputs": ["dw.bn", "skip"]}]
    tensors = {"dw.weight": torch.randn(c, 1, 3, 3, generator=gen, dtype=torch.float64),
               **{f"dw.bn.{k}": t for k, t in _bn(c, gen).items()}, **{f"skip.{k}": t for k, t in _bn(c, gen).items()}}
    p = _plan(describe(layers, ["sum"]), tensors)
    assert p.applied[0].spec.groups == c
    _check_catches_every_entry(p, tensors)


def test_the_covering_size_is_checked_for_a_stride_two_merge() -> None:
    """3x3 pad 1 stride 2: the top-left tap reads the input first at size 3, an output at size 4 reads every tap
    inside it; the sizes include one such size below the one past the borders."""
    c = verify.MIXES + 1
    doc, tensors = chain_of([mk((3, 3), c, c, 1, padding=1, stride=2), mk((1, 1), c, c, 2, bias=True)])
    p = _plan(doc, tensors)
    (unit,) = p.applied
    sizes = verify.sizes(p.graph, unit.layers, unit.input, unit.spec, None)
    assert (4, 4) in sizes and verify.covers(unit.spec, (4, 4)) and not verify.covers(unit.spec, (3, 3))
    _check_catches_every_entry(p, tensors)


def test_a_corner_tap_of_a_wide_stride_two_block_is_checked_on_every_output_channel() -> None:
    """RepVGG-A0's last block (192 -> 1280, 3x3 and 1x1 at stride 2, BNs) at the default settings: tap (0, 0)
    reads the input first at size 3, where the whole width costs more than FULL_VERIFY_MACS.  The earlier check
    compared 8 random output channels there and at the size past the borders, so a wrong corner tap on any
    other channel passed; now the covering size compares every output channel."""
    gen = torch.Generator().manual_seed(0)
    layers: list[dict] = []
    tensors: dict[str, torch.Tensor] = {}
    for name, k in (("dense", 3), ("point", 1)):
        layers.append({"name": name, "op": "conv2d", "input": "x", "stride": 2, "padding": k // 2, "dilation": 1,
                       "groups": 1})
        tensors[f"{name}.weight"] = torch.randn(1280, 192, k, k, generator=gen, dtype=torch.float64)
        layers.append({"name": f"{name}.bn", "op": "batch_norm", "input": name, "eps": 1e-5})
        tensors.update({f"{name}.bn.{key}": t for key, t in _bn(1280, gen).items()})
    layers.append({"name": "sum", "op": "add", "inputs": ["dense.bn", "point.bn"]})
    p = _plan(describe(layers, ["sum"]), tensors)
    (unit,) = p.applied
    loader = plan.Loader(p.graph, plan.Tensors(infos(tensors), tensors.__getitem__))
    merged = unit.stored
    sizes = verify.sizes(p.graph, unit.layers, unit.input, merged.spec, None)
    for o, c in ((0, 5), (641, 100), (1279, 191)):
        w = merged.weight.clone()
        w[o, c, 0, 0] += 1e-6 * float(merged.weight.abs().max())
        checked = verify.check(p.graph, loader, unit.input, unit.layers, unit.output, [Conv(merged.spec, w, merged.bias)],
                               sizes)
        assert checked.errors[0] > verify.VERIFY_TOLERANCE, (o, c)


@settings(max_examples=60, **SETTINGS)
@given(regions(), st.data())
def test_a_corrupted_entry_of_any_random_region_is_caught(built, data) -> None:
    """Random regions (convs with strides, pads, dilation, groups and every mode, batch norms, identities,
    poolings, pads, 1x1 -> kxk chains, add and concat), checked with every input mixed and every size but the
    covering one on one mixture of the output channels where the merge is dense: each merge passes, and one
    entry of its weight or bias, off by a millionth of its largest weight or bias, is caught."""
    b, cin, out = built
    doc, tensors = b.doc(out), b.tensors
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(verify, "MIXES", 1)
        mp.setattr(verify, "FULL_VERIFY_MACS", 0)
        try:
            p = _plan(doc, tensors)
        except GraphError:
            return  # a region PyTorch cannot run at any size: nothing to verify
        for unit in p.applied:
            merged = unit.stored
            graph = p.graph
            loader = plan.Loader(graph, plan.Tensors(infos(tensors), tensors.__getitem__))
            sizes = verify.sizes(graph, unit.layers, unit.input, merged.spec, None)
            delta = 1e-6 * max(float(merged.weight.abs().max()), 1e-3,  # of the output's scale: a bias may set it
                                0.0 if merged.bias is None else float(merged.bias.abs().max()))
            w, bias = merged.weight.clone(), None if merged.bias is None else merged.bias.clone()
            if bias is not None and data.draw(st.booleans(), label="bias"):
                bias[data.draw(st.integers(0, bias.numel() - 1), label="channel")] += delta
            else:
                index = tuple(data.draw(st.integers(0, n - 1), label=f"axis {k}") for k, n in enumerate(w.shape))
                w[index] += delta
            checked = verify.check(graph, loader, unit.input, unit.layers, unit.output, [Conv(merged.spec, w, bias)],
                                   sizes)
            assert checked.errors[0] > verify.VERIFY_TOLERANCE, (unit.layers, sizes)
