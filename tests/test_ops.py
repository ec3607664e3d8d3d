"""The op table (convmerge/ops.py) against what the engine does with each op.

Every op a region may hold needs an example here: a test fails for a new linear row without one.  Each example sits
between two convs in a described file; `fuse` (policy `all`) must give a file that computes what the original
computes, judged by tests/models.evaluate (torch.nn.functional only, independent of the library), at sizes
around the one planned for, and must merge the op away.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from convmerge import model, ops
from convmerge.graph import BN_TENSORS, CHANNEL_OPS, CONV_OPS, LINEAR_OPS, PASSTHROUGH_OPS
from convmerge.options import Options
from tests import models

C = 3

Example = Callable[[torch.Generator], tuple[list[dict], dict[str, torch.Tensor]]]


def _single(op: dict, tensors: Callable[[torch.Generator], dict[str, torch.Tensor]] = lambda g: {}) -> Example:
    """c1 -> <op> -> c2 (the op is layer "op", reading c1)."""
    def build(gen: torch.Generator) -> tuple[list[dict], dict[str, torch.Tensor]]:
        return [{"name": "op", "input": "c1", **op}], tensors(gen)
    return build


def _bn(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"op.running_mean": torch.randn(C, generator=gen), "op.running_var": torch.rand(C, generator=gen) + 0.5,
            "op.weight": torch.randn(C, generator=gen), "op.bias": torch.randn(C, generator=gen)}


def _join(op: dict) -> Example:
    """c1 -> (c1 itself, and a 1x1 conv of it) -> <op> -> c2."""
    def build(gen: torch.Generator) -> tuple[list[dict], dict[str, torch.Tensor]]:
        side, t = models.conv("side", "c1", C, C, 1, gen=gen)
        return [side, {"name": "op", "inputs": ["c1", "side"], **op}], t
    return build


EXAMPLES: dict[str, Example] = {
    "conv1d": None,  # type: ignore[dict-item]  # the convs themselves: every test here is built of conv2d
    "conv2d": None,  # type: ignore[dict-item]
    "conv3d": None,  # type: ignore[dict-item]
    "linear": None,  # type: ignore[dict-item]  # no spatial axes, so not between conv2ds: tests/test_linear.py
    "avg_pool1d": None,  # type: ignore[dict-item]  # pooling of other ranks: tests/test_regions.py
    "avg_pool3d": None,  # type: ignore[dict-item]
    "avg_pool2d": _single({"op": "avg_pool2d", "kernel_size": 3, "stride": 1}),
    "pad": _single({"op": "pad", "padding": [1, 1], "mode": "constant", "value": 0.0}),
    "batch_norm": _single({"op": "batch_norm", "eps": 1e-5}, _bn),
    "identity": _single({"op": "identity"}),
    "dropout": _single({"op": "dropout", "p": 0.5}),
    "add": _join({"op": "add"}),
    "concat": _join({"op": "concat", "dim": 1}),
    "affine": _single({"op": "affine"}, lambda g: {"op.weight": torch.randn(C, generator=g),
                                                   "op.bias": torch.randn(1, generator=g)}),
    "sub": _join({"op": "sub"}),
}


def test_every_op_a_region_may_hold_has_an_example():
    assert set(EXAMPLES) == {name for name, row in ops.OPS.items() if row.linear}


def test_the_sets_the_engine_reads_derive_from_the_table():
    assert LINEAR_OPS == {name for name, row in ops.OPS.items() if row.linear}
    assert set(CONV_OPS) == ops.of(ops.Kind.CONV)
    assert PASSTHROUGH_OPS == ops.of(ops.Kind.AFFINE, ops.Kind.PASS)
    assert CHANNEL_OPS == {name for name, row in ops.OPS.items() if row.keeps_channels}
    assert ops.get("batch_norm").tensors == BN_TENSORS
    assert ops.get("relu").linear is False and ops.kind("no_such_op") is None


@pytest.mark.parametrize("op", sorted(name for name, build in EXAMPLES.items() if build is not None))
def test_an_op_between_convs_fuses_into_one_conv_that_computes_the_same(op, tmp_path):
    gen = torch.Generator().manual_seed(7)
    # Exact at every size: c1 pads 2 (its extent - 1), so a zero pad after it reads what a merged conv would; c2
    # reads no padding.  A bias before a zero pad would be cut off by it: the pad's c1 has none.
    c1, t1 = models.conv("c1", "x", C, C, 3, padding=2, bias=op != "pad", gen=gen)
    middle, tm = EXAMPLES[op](gen)
    c2, t2 = models.conv("c2", "op", C + (C if op == "concat" else 0), 2, 3, padding=0, bias=True, gen=gen)
    doc = models.describe([c1, *middle, c2], ["c2"])
    tensors = {**t1, **tm, **t2}
    src = models.save(tmp_path / "m.safetensors", tensors, doc)
    out = tmp_path / "m.fused.safetensors"
    model.fuse_file(str(src), str(out), Options(policy="all", input_size=(8, 8)))
    fused_doc, fused = models.described(out)
    assert not any(layer["name"] == "op" for layer in fused_doc["layers"]), f"{op} was not merged"
    for size in ((8, 8), (7, 9), (3, 4)):
        x = torch.randn(2, C, *size, generator=gen, dtype=torch.float64)
        (want,) = models.evaluate(doc, tensors, x)
        (got,) = models.evaluate(fused_doc, fused, x)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (op, size, float((got - want).abs().max()))
