"""Linear layers: `nn.Linear` on a [N, C] value, as a convolution with no spatial axes.

A linear layer `y = x W^T + b` is a 1x1 conv of an input with no spatial axes, so convmerge holds it as a
`ConvSpec` with `axes == ()` and weight [out, in]: pairs, chains, joins and batch-norm folding then work as for
convs (the merged weight is the matrix product `W2 W1`, the bias `W2 b1 + b2`), and with no border a run of
linear ops is exact at every size.  This module holds what is particular to it: the description's fields, the
op name, and the layer as PyTorch and ONNX run it.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..maths.spec import ConvSpec, SpecError, _is_int

OP = "linear"


def op_name(ndim: int) -> str:
    """The description's op of a conv with `ndim` spatial axes (0: a linear layer)."""
    return OP if ndim == 0 else f"conv{ndim}d"


def spec(in_features: int, out_features: int, bias: bool = False) -> ConvSpec:
    return ConvSpec((), in_features, out_features, 1, "zeros", bias)


def spec_from_fields(fields: Mapping[str, Any], weight_shape: Sequence[int], has_bias: bool) -> ConvSpec:
    """A linear layer of the description; its features come from the weight [out, in], and fields that state
    them must agree."""
    if len(weight_shape) != 2:
        raise SpecError(f"weight: shape {list(weight_shape)} is not [out_features, in_features]")
    out_features, in_features = weight_shape
    if out_features < 1 or in_features < 1:
        raise SpecError(f"weight: shape {list(weight_shape)} has an empty axis")
    for key, want in (("in_features", in_features), ("out_features", out_features)):
        if key in fields and (not _is_int(fields[key]) or fields[key] != want):
            raise SpecError(f"{key}: {fields[key]!r} contradicts the weight's shape {list(weight_shape)}")
    return spec(in_features, out_features, has_bias)

