"""Transposed convolutions (`conv_transpose1d/2d/3d`) as plain values: no tensors, no torch.

A PyTorch ConvTranspose is the adjoint of a conv: each input cell `i` scatters its kernel onto the
output at `s·i − p + d·t` (tap `t`), and the output keeps the cells `0 … (n − 1)·s − 2p + e − 1 + op`
(`e = d·(k − 1) + 1` its extent, `op` its output_padding: extra cells on the high side, zeros plus the
bias where the scatter does not reach).  Padding crops both sides by `p`; PyTorch allows only zero
padding mode and `op < max(s, d)`.

The weight is `[in, out / groups, *k]` (the transpose of a conv's `[out, in / groups, *k]`).
What merges with what is in docs/design.md, "Transposed convolutions"; this module holds the
hyperparameter maths, `transpose_tensors` the tensor work.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from .spec import AXIS_NAMES, SpecError, _is_int, _positive_ints

__all__ = ["TAxis", "TransposeSpec", "transpose_spec", "transpose_spec_from_fields", "transpose_fields"]


@dataclass(frozen=True)
class TAxis:
    """One spatial axis of a transposed conv."""

    kernel: int
    stride: int = 1
    dilation: int = 1
    padding: int = 0
    output_padding: int = 0

    @property
    def extent(self) -> int:
        return self.dilation * (self.kernel - 1) + 1

    def out_len(self, n: int) -> int:
        """Output length for input length `n` (PyTorch's formula; <= 0: undefined there)."""
        return (n - 1) * self.stride - 2 * self.padding + self.extent + self.output_padding


@dataclass(frozen=True)
class TransposeSpec:
    """A ConvTranspose1d/2d/3d without its weights."""

    axes: tuple[TAxis, ...]
    in_channels: int
    out_channels: int
    groups: int = 1
    bias: bool = False

    @property
    def ndim(self) -> int:
        return len(self.axes)

    @property
    def axis_names(self) -> tuple[str, ...]:
        return AXIS_NAMES[self.ndim]

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(a.kernel for a in self.axes)

    @property
    def stride(self) -> tuple[int, ...]:
        return tuple(a.stride for a in self.axes)

    @property
    def dilation(self) -> tuple[int, ...]:
        return tuple(a.dilation for a in self.axes)

    @property
    def padding(self) -> tuple[int, ...]:
        return tuple(a.padding for a in self.axes)

    @property
    def output_padding(self) -> tuple[int, ...]:
        return tuple(a.output_padding for a in self.axes)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.in_channels, self.out_channels // self.groups, *self.kernel_size)

    def out_size(self, size: Sequence[int]) -> tuple[int, ...]:
        return tuple(a.out_len(n) for a, n in zip(self.axes, size))

    def with_bias(self, bias: bool) -> "TransposeSpec":
        return replace(self, bias=bias)


def transpose_spec(kernel_size: Sequence[int], in_channels: int, out_channels: int, *, stride: Any = 1,
                   padding: Any = 0, output_padding: Any = 0, dilation: Any = 1, groups: int = 1,
                   bias: bool = False) -> TransposeSpec:
    """Build and validate a spec from PyTorch-style arguments (an int or one int per axis each)."""
    nd = len(kernel_size)
    if nd not in AXIS_NAMES:
        raise SpecError(f"kernel_size: {nd} spatial axes; only 1, 2 or 3 are transposed convolutions")
    kernel = _positive_ints(tuple(kernel_size), nd, "kernel_size")
    strides = _positive_ints(stride, nd, "stride")
    dilations = _positive_ints(dilation, nd, "dilation")
    pads = _naturals(padding, nd, "padding")
    extra = _naturals(output_padding, nd, "output_padding")
    for op, s, d in zip(extra, strides, dilations):
        if op >= max(s, d):
            raise SpecError(f"output_padding: {list(extra)} must be smaller than the stride or the dilation on every "
                            f"axis (stride {list(strides)}, dilation {list(dilations)}), as in PyTorch")
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
        if not _is_int(value) or value < 1:
            raise SpecError(f"{name}: {value!r} must be a positive integer")
    if in_channels % groups or out_channels % groups:
        raise SpecError(f"groups: {groups} does not divide in_channels {in_channels} and out_channels {out_channels}")
    axes = tuple(TAxis(*values) for values in zip(kernel, strides, dilations, pads, extra))
    return TransposeSpec(axes, in_channels, out_channels, groups, bool(bias))


def transpose_spec_from_fields(fields: Mapping[str, Any], weight_shape: Sequence[int], has_bias: bool) -> TransposeSpec:
    """A conv_transpose layer of the graph description; kernel size and channels come from the weight."""
    nd = len(weight_shape) - 2
    op = fields.get("op", f"conv_transpose{nd}d")
    if op != f"conv_transpose{nd}d":
        raise SpecError(f"weight: shape {list(weight_shape)} has {nd} spatial axes but op is {op!r}")
    groups = fields.get("groups", 1)
    if not _is_int(groups) or groups < 1:
        raise SpecError(f"groups: {groups!r} must be a positive integer")
    kernel = tuple(weight_shape[2:])
    if any(k < 1 for k in kernel) or weight_shape[0] < 1 or weight_shape[1] < 1:
        raise SpecError(f"weight: shape {list(weight_shape)} has an empty axis")
    if "kernel_size" in fields:
        declared = _positive_ints(fields["kernel_size"], nd, "kernel_size")
        if declared != kernel:
            raise SpecError(f"kernel_size: {list(declared)} contradicts the weight's shape {list(weight_shape)}")
    if weight_shape[0] % groups:
        raise SpecError(f"groups: {groups} does not divide the weight's {weight_shape[0]} input channels "
                        f"(shape {list(weight_shape)})")
    for key, want in (("in_channels", weight_shape[0]), ("out_channels", weight_shape[1] * groups)):
        if key in fields and fields[key] != want:
            raise SpecError(f"{key}: {fields[key]!r} contradicts the weight's shape {list(weight_shape)} "
                            f"(a conv_transpose's weight is [in, out / groups, *kernel])")
    mode = fields.get("padding_mode", "zeros")
    if mode != "zeros":
        raise SpecError(f"padding_mode: {mode!r}: a transposed convolution pads with zeros only (as in PyTorch)")
    return transpose_spec(kernel, weight_shape[0], weight_shape[1] * groups, stride=fields.get("stride", 1),
                          padding=fields.get("padding", 0), output_padding=fields.get("output_padding", 0),
                          dilation=fields.get("dilation", 1), groups=groups, bias=has_bias)


def transpose_fields(spec: TransposeSpec) -> dict[str, Any]:
    """The spec's hyperparameters in the graph description's field names."""
    return {"kernel_size": list(spec.kernel_size), "stride": list(spec.stride), "padding": list(spec.padding),
            "output_padding": list(spec.output_padding), "dilation": list(spec.dilation), "groups": spec.groups}


def _naturals(value: Any, nd: int, field: str) -> tuple[int, ...]:
    values = (value,) * nd if _is_int(value) else value
    if not isinstance(values, (list, tuple)) or len(values) != nd or not all(_is_int(v) for v in values):
        raise SpecError(f"{field}: {value!r} is not an int or {nd} int(s) (a transposed conv crops both sides "
                        "alike: one value per axis)")
    if any(v < 0 for v in values):
        raise SpecError(f"{field}: {list(values)} must not be negative")
    return tuple(values)

