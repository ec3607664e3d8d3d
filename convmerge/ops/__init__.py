"""The op table: every op a description may name, declared once with the facts the rest of convmerge reads.

A row says what kind of op it is (which decides how the engine treats it: a conv, a per-channel affine map, a
join of branches...), how many spatial axes it works on, the fields it reads, the tensors it owns and how many
inputs it takes.  The sets other modules use (`graph.CONV_OPS`, `graph.LINEAR_OPS`, `trace_layers.STRUCTURAL_OPS`,
the fields a near-miss is checked against, the tensors a merge drops) are all derived from this table, so a new
op is a row here plus its maths; an op with no row is opaque: the engine merges nothing across it.

Linear ops (kinds CONV, POOL, PAD, AFFINE, PASS, JOIN) are those a region may hold: each is linear (affine) in
its input, so a run of them can be one conv.  The other kinds only say what a layer does to sizes and channels.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

__all__ = ["OPS", "Kind", "Op", "get", "kind", "named", "of"]


class Kind(enum.Enum):
    CONV = "conv"
    """A convolution: `<name>.weight`, optional `<name>.bias`; a linear layer is one with no spatial axes."""
    POOL = "pool"
    """Average pooling: a conv with a box kernel where every window has the same divisor."""
    PAD = "pad"
    """Padding; a constant one is a delta kernel plus a border value."""
    AFFINE = "affine"
    """A per-channel affine map `x * scale + shift` (a batch norm in inference): a scaled delta kernel."""
    PASS = "pass"
    """Returns its input (identity, dropout in inference)."""
    JOIN = "join"
    """Joins branches: a sum or a concatenation over channels."""
    ELEMENTWISE = "elementwise"
    """A nonlinear map of one input, value by value (relu...): keeps the shape, merges nothing across it."""
    BROADCAST = "broadcast"
    """An element-wise op of several inputs (x * s): its output has the inputs' broadcast size."""
    CONV_TRANSPOSE = "conv_transpose"
    """A transposed convolution: `<name>.weight` of shape [in, out/groups, *k], optional `<name>.bias`; no region
    holds it (convmerge/ops/transpose.py), a batch norm after it folds into it."""


_LINEAR = frozenset({Kind.CONV, Kind.POOL, Kind.PAD, Kind.AFFINE, Kind.PASS, Kind.JOIN})


@dataclass(frozen=True)
class Op:
    name: str
    kind: Kind
    fields: frozenset[str] = frozenset()
    """Fields it reads besides name/op/input/inputs (a near miss of one is an error, not a default)."""
    tensors: tuple[str, ...] = ()
    """Suffixes of the tensors it owns (`<name>.<suffix>`): what a merge that removes it drops."""
    ndim: Optional[int] = None
    """Spatial axes, where the op fixes them (conv2d: 2)."""
    inputs: tuple[int, Optional[int]] = (1, 1)
    """Least and most inputs (None: no limit)."""

    @property
    def linear(self) -> bool:
        """May a region hold it (is it linear or affine in its input)?"""
        return self.kind in _LINEAR

    @property
    def keeps_channels(self) -> bool:
        """Has its output as many channels as its (one) input?"""
        return self.kind in (Kind.POOL, Kind.PAD, Kind.AFFINE, Kind.PASS, Kind.ELEMENTWISE)


_CONV_FIELDS = frozenset({"stride", "padding", "dilation", "groups", "padding_mode", "kernel_size", "in_channels",
                          "out_channels", "bias", "merged_from"})
_LINEAR_FIELDS = frozenset({"in_features", "out_features", "bias", "merged_from"})
_POOL_FIELDS = frozenset({"kernel_size", "stride", "padding", "count_include_pad", "ceil_mode", "divisor_override"})
_CONV_TRANSPOSE_FIELDS = frozenset({"stride", "padding", "output_padding", "dilation", "groups", "padding_mode",
                                    "kernel_size", "in_channels", "out_channels", "bias", "merged_from"})
BN_TENSORS = ("running_mean", "running_var", "weight", "bias", "num_batches_tracked")

_ROWS = [
    *(Op(f"conv{n}d", Kind.CONV, _CONV_FIELDS, ("weight", "bias"), n) for n in (1, 2, 3)),
    # nn.Linear on a [N, C] value: a conv with no spatial axes (weight [out, in]), so it pairs, chains, joins and
    # folds batch norms as convs do; with no border it is exact at every size (convmerge/ops/linear.py).
    Op("linear", Kind.CONV, _LINEAR_FIELDS, ("weight", "bias"), 0),
    *(Op(f"conv_transpose{n}d", Kind.CONV_TRANSPOSE, _CONV_TRANSPOSE_FIELDS, ("weight", "bias"), n) for n in (1, 2, 3)),
    *(Op(f"avg_pool{n}d", Kind.POOL, _POOL_FIELDS, (), n) for n in (1, 2, 3)),
    Op("pad", Kind.PAD, frozenset({"padding", "mode", "value"}), ("value",)),
    Op("batch_norm", Kind.AFFINE, frozenset({"eps", "affine", "momentum", "num_features", "track_running_stats"}),
       BN_TENSORS),
    Op("identity", Kind.PASS),
    Op("dropout", Kind.PASS, frozenset({"p", "inplace"})),
    Op("add", Kind.JOIN, inputs=(2, None)),
    Op("concat", Kind.JOIN, frozenset({"dim"}), inputs=(1, None)),
    Op("affine", Kind.AFFINE, tensors=("weight", "bias")),  # x * weight + bias, per channel (affine.py)
    Op("sub", Kind.JOIN, inputs=(2, 2)),  # a - b, of one shape
    *(Op(n, Kind.ELEMENTWISE, inputs=(1, None)) for n in (
        "relu", "relu6", "leaky_relu", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "elu", "mish",
        "neg", "prelu", "clamp", "hardtanh", "softplus")),
    *(Op(n, Kind.BROADCAST, inputs=(1, None)) for n in (
        "mul", "div", "truediv", "iadd", "imul", "isub", "mul_", "add_", "opaque_sub")),
]

OPS: dict[str, Op] = {op.name: op for op in _ROWS}


def get(name: str) -> Optional[Op]:
    """The row of op `name`, or None (an op convmerge does not know: opaque)."""
    return OPS.get(name)


def of(*kinds: Kind) -> frozenset[str]:
    """The names of the ops of these kinds."""
    return frozenset(op.name for op in _ROWS if op.kind in kinds)


def named(kind: Kind) -> dict[str, Optional[int]]:
    """The ops of one kind, each with its spatial axes (conv2d -> 2)."""
    return {op.name: op.ndim for op in _ROWS if op.kind is kind}


def kind(name: str) -> Optional[Kind]:
    """The kind of op `name` (None: unknown, opaque)."""
    row = OPS.get(name)
    return row.kind if row is not None else None
