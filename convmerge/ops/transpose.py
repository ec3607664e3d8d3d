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

from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Optional, Sequence

from ..maths.spec import AXIS_NAMES, PerAxis, SpecError, _is_int, _positive_ints

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
class TransposeSpec(PerAxis):
    """A ConvTranspose1d/2d/3d without its weights."""

    axes: tuple[TAxis, ...]
    in_channels: int
    out_channels: int
    groups: int = 1
    bias: bool = False

    @property
    def padding(self) -> tuple[int, ...]:
        return tuple(a.padding for a in self.axes)

    @property
    def output_padding(self) -> tuple[int, ...]:
        return tuple(a.output_padding for a in self.axes)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.in_channels, self.out_channels // self.groups, *self.kernel_size)



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



# --- a transposed conv next to a conv (docs/design.md, "Transposed convolutions") -------------------
#
# Per axis, with generic weights.  Every output of either pair is a sum of terms x[i]·w1[t]·w2[c] (one
# per input cell and pair of nonzero taps); the candidate sums the same terms without the first layer's
# border, so it is exact at size n exactly when no term is *hidden*: summed by the candidate but cut
# off in the pair (by the conv's zero padding after a transposed conv, or because the conv before a
# transposed conv does not compute that window).  A bias of the first layer meets the same borders.


def conv_after(t: TAxis, c: Any) -> Optional[TAxis]:
    """The one transposed conv a stride-1 conv `c` (spec.Axis, zero padding) after `t` can be: stride
    t's, dense kernel of extent e_t + e_c − 1, padding p + e_c − 1 − l, output_padding op + r − l; None
    where PyTorch cannot express that (negative padding, output_padding outside 0 … stride − 1)."""
    if c.stride != 1:
        return None
    lo, hi = c.pad
    padding, extra = t.padding + c.extent - 1 - lo, t.output_padding + hi - lo
    if padding < 0 or not 0 <= extra < t.stride:
        return None
    return TAxis(t.extent + c.extent - 1, t.stride, 1, padding, extra)


def conv_before(c: Any, t: TAxis) -> Optional[TAxis]:
    """The one transposed conv a stride-1 conv `c` (spec.Axis, zero padding) before `t` can be: stride
    t's, kernel of extent e_t + s·(e_c − 1), padding p + s·(e_c − 1 − l), output_padding op + s·(r − l);
    None where PyTorch cannot express that."""
    if c.stride != 1:
        return None
    lo, hi = c.pad
    s = t.stride
    padding, extra = t.padding + s * (c.extent - 1 - lo), t.output_padding + s * (hi - lo)
    if padding < 0 or not 0 <= extra < s:
        return None
    return TAxis(t.extent + s * (c.extent - 1), s, 1, padding, extra)


class Reads(NamedTuple):
    """What one axis of a pair does at one input length, for the candidate's exactness."""

    hides: bool
    """Some term the candidate sums is cut off in the pair."""
    borders: bool
    """Some output meets the first layer's border, so that layer's bias reaches it unevenly (or not at all)."""
    terms: bool
    """Some output sums any term at all (an axis without any leaves both sides zero but for the bias)."""


def exact(reads: Sequence[Optional[Reads]], bias: bool) -> Optional[bool]:
    """Is the candidate exact at one size, from each axis's reads (None: the pair is undefined there)?
    A term is a product over the axes, hidden where one axis hides it and every other axis has terms."""
    if None in reads:
        return None
    if bias and any(r.borders for r in reads):  # type: ignore[union-attr]
        return False
    return not any(r.hides and all(o.terms for j, o in enumerate(reads) if j != k)  # type: ignore[union-attr]
                   for k, r in enumerate(reads))


def conv_after_at(t: TAxis, c: Any, n: int, t_taps: Sequence[int], c_taps: Sequence[int]) -> Optional[Reads]:
    """One axis of t then c at input length n (None: the pair is undefined there).

    Output o of the conv reads t's output at q = o − l + d_c·a (tap a); inside 0 ≤ q < L_t it is the
    transposed conv's full scatter at q + p, which holds x[i]·w[b] where s·i + d·b = q + p.  A read in the
    conv's padding is zero in the pair and that scatter (and t's bias) in the candidate."""
    inner = t.out_len(n)
    lo, hi = c.pad
    outer = inner + lo + hi - c.extent + 1
    if inner < 1 or outer < 1:
        return None
    hides = borders = terms = False
    for o in _borders(outer, c.extent + lo + t.padding + t.extent):
        for a in c_taps:
            q = o - lo + c.dilation * a
            lands = any(_lands(q + t.padding - t.dilation * b, t.stride, n) for b in t_taps)
            terms = terms or lands
            if not 0 <= q < inner:
                borders, hides = True, hides or lands
    return Reads(hides, borders, terms or outer > 2 * (c.extent + lo + t.padding + t.extent))


def conv_before_at(c: Any, t: TAxis, n: int, c_taps: Sequence[int], t_taps: Sequence[int]) -> Optional[Reads]:
    """One axis of c then t at input length n (None: the pair is undefined there).

    Output o of t is its full scatter at m = o + p, which holds y[j]·w[b] where s·j + d·b = m; y[j] holds
    x[i]·w_c[a] for i = j − l + d_c·a.  The candidate sums those terms for every j; the pair only for the
    windows the conv computes (0 ≤ j < n_c), and the conv's bias only there, tap by tap."""
    lo, hi = c.pad
    inner = n + lo + hi - c.extent + 1
    outer = t.out_len(inner)
    if inner < 1 or outer < 1:
        return None
    hides = borders = terms = False
    reach = t.padding + t.extent + t.stride * (c.extent + lo + hi)
    for o in _borders(outer, reach):
        m = o + t.padding
        for b in t_taps:
            if (m - t.dilation * b) % t.stride:
                borders = True  # a stride skips this tap here: t spreads the conv's bias unevenly
                continue
            j = (m - t.dilation * b) // t.stride
            lands = any(0 <= j - lo + c.dilation * a < n for a in c_taps)
            terms = terms or lands
            if not 0 <= j < inner:
                borders, hides = True, hides or lands
    return Reads(hides, borders, terms or outer > 2 * reach)


def after_every_size(t: TAxis, c: Any, t_taps: Sequence[int], c_taps: Sequence[int], bias: bool) -> Optional[bool]:
    """Is t then c exact at every input length on this axis (None: the pair runs at none)?  On several axes
    the pair is exact at every size exactly when each axis is (an axis has terms at some size)."""
    reach = c.extent + sum(c.pad) + 2 * t.padding + t.extent + t.output_padding
    return _every_size(lambda n: exact([conv_after_at(t, c, n, t_taps, c_taps)], bias), reach, t.stride)


def before_every_size(c: Any, t: TAxis, c_taps: Sequence[int], t_taps: Sequence[int], bias: bool) -> Optional[bool]:
    """As after_every_size, for c then t."""
    reach = t.padding + t.extent + t.output_padding + t.stride * (2 * c.extent + 2 * sum(c.pad))
    return _every_size(lambda n: exact([conv_before_at(c, t, n, c_taps, t_taps)], bias), reach, t.stride)


def _every_size(exact: Any, reach: int, stride: int) -> Optional[bool]:
    """Whether `exact(n)` holds at every n where the pair runs.  Past the length where the two borders
    no longer meet (each within `reach` output cells of its end) every n is the same: a transposed conv's
    output grows by its stride per input cell and each border only shifts, so checking up to there decides
    every size."""
    limit = 3 + (4 * reach) // stride
    verdicts = [v for v in (exact(n) for n in range(1, limit + 1)) if v is not None]
    return all(verdicts) if verdicts else None


def _lands(m: int, stride: int, n: int) -> bool:
    """Does a scatter cell at offset m hold an input cell (m = s·i, 0 ≤ i < n)?"""
    return m % stride == 0 and 0 <= m // stride < n


def _borders(length: int, reach: int) -> range | list[int]:
    """The outputs within `reach` of either end (all of them when they overlap): only they can read a border."""
    if length <= 2 * reach:
        return range(length)
    return [*range(reach), *range(length - reach, length)]
