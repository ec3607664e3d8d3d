"""A convolution's hyperparameters as a plain value: no tensors, no torch.

Everything convmerge decides is decided per spatial axis, so a conv is a tuple of `Axis`
values plus the few things that are not per axis (channels, groups, padding mode, bias).
Padding is always stored as explicit ``(lo, hi)`` pairs: PyTorch's ``'same'`` is asymmetric
for even kernels, and merged convs are often asymmetric too.

Long (about 400 lines) because every form PyTorch accepts for a conv's, a pooling's and a pad's hyperparameters
(ints, tuples, 'same', 'valid', padding modes) is parsed and validated here; split, the per-axis machinery they
share would be repeated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Mapping, Optional, Sequence

from ..errors import ConvmergeError, Kind

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
AXIS_NAMES = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}


class SpecError(ConvmergeError, ValueError):
    """A conv description that cannot be a convolution; the message names the field."""

    kind = Kind.BAD_INPUT


@dataclass(frozen=True)
class Axis:
    """One spatial axis of a conv: what decides where each output reads its input."""

    kernel: int
    stride: int = 1
    dilation: int = 1
    pad: tuple[int, int] = (0, 0)

    @property
    def extent(self) -> int:
        """Input cells one output window spans (the dilated kernel)."""
        return self.dilation * (self.kernel - 1) + 1

    def out_len(self, n: int) -> int:
        """Output length for input length ``n`` (may be <= 0: the conv is undefined there)."""
        return (n + self.pad[0] + self.pad[1] - self.extent) // self.stride + 1


class PerAxis:
    """What a spec with one value per spatial axis (`axes`: kernel, stride, dilation, `out_len`) reads off them; a
    conv's and a transposed conv's spec share it."""

    axes: tuple[Any, ...]

    @property
    def ndim(self) -> int:
        return len(self.axes)

    @property
    def axis_names(self) -> tuple[str, ...]:
        return AXIS_NAMES.get(self.ndim, ())  # a linear layer has none

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(a.kernel for a in self.axes)

    @property
    def stride(self) -> tuple[int, ...]:
        return tuple(a.stride for a in self.axes)

    @property
    def dilation(self) -> tuple[int, ...]:
        return tuple(a.dilation for a in self.axes)

    def out_size(self, size: Sequence[int]) -> tuple[int, ...]:
        return tuple(a.out_len(n) for a, n in zip(self.axes, size))

    def with_bias(self, bias: bool) -> Any:
        return replace(self, bias=bias)  # type: ignore[type-var]


@dataclass(frozen=True)
class ConvSpec(PerAxis):
    """A Conv1d/2d/3d without its weights."""

    axes: tuple[Axis, ...]
    in_channels: int
    out_channels: int
    groups: int = 1
    padding_mode: str = "zeros"
    bias: bool = False

    @property
    def padding(self) -> tuple[tuple[int, int], ...]:
        return tuple(a.pad for a in self.axes)

    @property
    def pads_anything(self) -> bool:
        return any(a.pad != (0, 0) for a in self.axes)

    @property
    def symmetric(self) -> bool:
        return all(a.pad[0] == a.pad[1] for a in self.axes)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)


def conv_spec(
    kernel_size: Sequence[int],
    in_channels: int,
    out_channels: int,
    *,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    bias: bool = False,
) -> ConvSpec:
    """Build and validate a spec from PyTorch-style arguments (ints, tuples, 'same', 'valid')."""
    nd = len(kernel_size)
    if nd not in AXIS_NAMES:
        raise SpecError(f"kernel_size: {nd} spatial axes; only 1, 2 or 3 are convolutions")
    kernel = _positive_ints(kernel_size, nd, "kernel_size")
    strides = _positive_ints(stride, nd, "stride")
    dilations = _positive_ints(dilation, nd, "dilation")
    pads = parse_padding(padding, kernel, dilations, strides)
    if padding_mode not in PADDING_MODES:
        raise SpecError(f"padding_mode: {padding_mode!r} is not one of {', '.join(PADDING_MODES)}")
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
        if not _is_int(value) or value < 1:
            raise SpecError(f"{name}: {value!r} must be a positive integer")
    if in_channels % groups or out_channels % groups:
        raise SpecError(
            f"groups: {groups} does not divide in_channels {in_channels} and out_channels {out_channels}"
        )
    axes = tuple(Axis(k, s, d, p) for k, s, d, p in zip(kernel, strides, dilations, pads))
    return ConvSpec(axes, in_channels, out_channels, groups, padding_mode, bool(bias))


def parse_padding(
    padding: Any, kernel: Sequence[int], dilation: Sequence[int], stride: Sequence[int]
) -> tuple[tuple[int, int], ...]:
    """Every padding form of PyTorch and of the graph description, as explicit (lo, hi) pairs.

    Forms: int (all sides), one int per axis (symmetric), one [lo, hi] pair per axis
    (always nested, even for one axis), 'valid', or 'same' (stride 1 only, as in PyTorch;
    the odd cell of an even total goes to the high side, as PyTorch does).
    """
    nd = len(kernel)
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0),) * nd
        if padding == "same":
            if any(s != 1 for s in stride):
                raise SpecError("padding: 'same' needs stride 1 on every axis (as in PyTorch)")
            totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
            return tuple((t // 2, t - t // 2) for t in totals)
        raise SpecError(f"padding: {padding!r} is not 'same', 'valid', an int or a list")
    if _is_int(padding):
        return (_pad_pair((padding, padding)),) * nd
    if isinstance(padding, (list, tuple)) and len(padding) == nd:
        if all(_is_int(p) for p in padding):
            return tuple(_pad_pair((p, p)) for p in padding)
        if all(isinstance(p, (list, tuple)) for p in padding):
            return tuple(_pad_pair(p) for p in padding)
    raise SpecError(
        f"padding: {padding!r} is not an int, {nd} int(s), {nd} [lo, hi] pair(s), 'same' or 'valid'"
    )


def padding_fields(spec: ConvSpec) -> dict[str, Any]:
    """The spec's hyperparameters in the graph description's field names (padding as pairs)."""
    return {
        "kernel_size": list(spec.kernel_size),
        "stride": list(spec.stride),
        "padding": [list(a.pad) for a in spec.axes],
        "dilation": list(spec.dilation),
        "groups": spec.groups,
        "padding_mode": spec.padding_mode,
    }


def spec_from_fields(fields: Mapping[str, Any], weight_shape: Sequence[int], has_bias: bool) -> ConvSpec:
    """A conv layer of the graph description; kernel size and channels come from the weight."""
    nd = len(weight_shape) - 2
    op = fields.get("op", f"conv{nd}d")
    if op != f"conv{nd}d":
        raise SpecError(f"weight: shape {list(weight_shape)} has {nd} spatial axes but op is {op!r}")
    groups = fields.get("groups", 1)
    if not _is_int(groups) or groups < 1:
        raise SpecError(f"groups: {groups!r} must be a positive integer")
    kernel = tuple(weight_shape[2:])
    if "kernel_size" in fields:
        declared = _positive_ints(fields["kernel_size"], nd, "kernel_size")
        if declared != kernel:
            raise SpecError(f"kernel_size: {list(declared)} contradicts the weight's shape {list(weight_shape)}")
    if any(k < 1 for k in kernel) or weight_shape[0] < 1 or weight_shape[1] < 1:
        raise SpecError(f"weight: shape {list(weight_shape)} has an empty axis")
    for key in ("in_channels", "out_channels"):
        if key in fields:
            want = weight_shape[0] if key == "out_channels" else weight_shape[1] * groups
            if fields[key] != want:
                raise SpecError(f"{key}: {fields[key]!r} contradicts the weight's shape {list(weight_shape)}")
    return conv_spec(
        kernel,
        weight_shape[1] * groups,
        weight_shape[0],
        stride=fields.get("stride", 1),
        padding=fields.get("padding", 0),
        dilation=fields.get("dilation", 1),
        groups=groups,
        padding_mode=fields.get("padding_mode", "zeros"),
        bias=has_bias,
    )


@dataclass(frozen=True)
class PoolSpec:
    """An average pooling (PyTorch's fields) as a value; padding is symmetric per axis, as PyTorch's."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    count_include_pad: bool = True
    ceil_mode: bool = False
    divisor_override: Optional[int] = None

    @property
    def ndim(self) -> int:
        return len(self.kernel)

    def out_len(self, k: int, n: int) -> int:
        """PyTorch's output length on axis k: ceil mode adds a window that starts inside the input or left pad."""
        span = n + 2 * self.padding[k] - self.kernel[k]  # may be negative: ceil mode still gives one window
        out = (-(-span // self.stride[k]) if self.ceil_mode else span // self.stride[k]) + 1
        if self.ceil_mode and (out - 1) * self.stride[k] >= n + self.padding[k]:
            out -= 1
        return out

    def out_size(self, size: Sequence[int]) -> tuple[int, ...]:
        return tuple(self.out_len(k, n) for k, n in enumerate(size))

    def least_input(self, k: int) -> int:
        """The shortest input PyTorch pools on axis k: avg_pool3d refuses an input smaller than its kernel,
        padding and ceil mode notwithstanding (1-d and 2-d pooling need only one window)."""
        return self.kernel[k] if self.ndim == 3 else 1

    def size_problem(self, size: Sequence[int]) -> Optional[str]:
        """Why PyTorch refuses to pool an input of this spatial size (None when it runs)."""
        for k, (name, n) in enumerate(zip(AXIS_NAMES[self.ndim], size)):
            if n < self.least_input(k):
                return f"average pooling in 3-d needs at least its kernel {self.kernel[k]} on {name}, it gets {n}"
            if self.out_len(k, n) < 1:
                return f"its window {self.kernel[k]} leaves no output on {name} at {n} (padding {self.padding[k]})"
        return None


def pool_spec(ndim: int, fields: Mapping[str, Any]) -> PoolSpec:
    """Validate an avg_pool layer's fields (PyTorch's: kernel_size, stride, padding, ...)."""
    if "kernel_size" not in fields:
        raise SpecError("kernel_size: missing (an average pooling needs its window)")
    kernel = _positive_ints(fields["kernel_size"], ndim, "kernel_size")
    stride = fields.get("stride")
    strides = kernel if stride is None or stride == [] else _positive_ints(stride, ndim, "stride")
    pad = fields.get("padding", 0)
    pads = (pad,) * ndim if _is_int(pad) else pad
    if not isinstance(pads, (list, tuple)) or len(pads) != ndim or not all(_is_int(v) for v in pads):
        raise SpecError(f"padding: {pad!r} is not an int or {ndim} int(s)")
    for k, p in zip(kernel, pads):
        if p < 0 or 2 * p > k:
            raise SpecError(f"padding: {list(pads)} must be >= 0 and at most half the kernel {list(kernel)} (PyTorch)")
    flags = {}
    for key, default in (("count_include_pad", True), ("ceil_mode", False)):
        flag = fields.get(key, default)
        if not isinstance(flag, bool):
            raise SpecError(f"{key}: {flag!r} must be true or false")
        flags[key] = flag
    divisor = fields.get("divisor_override")
    if divisor is not None and (not _is_int(divisor) or divisor < 1):
        raise SpecError(f"divisor_override: {divisor!r} must be null or a positive integer")
    return PoolSpec(kernel, strides, tuple(pads), flags["count_include_pad"], flags["ceil_mode"], divisor)


PAD_MODES = ("constant", "reflect", "replicate", "circular")
CONV_MODE_OF_PAD = {"constant": "zeros", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


@dataclass(frozen=True)
class PadSpec:
    """A pad layer: explicit (lo, hi) per axis once the number of axes is known, a mode and a constant."""

    padding: Any  # as given: int, one int per axis, or [lo, hi] pairs; see `pairs`
    mode: str = "constant"
    value: float = 0.0

    def pairs(self, ndim: int) -> tuple[tuple[int, int], ...]:
        """The padding as explicit pairs for `ndim` spatial axes (SpecError if it does not fit)."""
        return parse_padding(self.padding, (1,) * ndim, (1,) * ndim, (1,) * ndim)

    def axes_given(self) -> Optional[int]:
        """How many axes the padding itself names (None for a bare int, which fits any)."""
        return None if _is_int(self.padding) else len(self.padding)


def pad_spec(fields: Mapping[str, Any]) -> PadSpec:
    """Validate a pad layer's fields: padding (the conv forms, without 'same'), mode, value."""
    if "padding" not in fields:
        raise SpecError("padding: missing (a pad layer needs its amounts)")
    padding = fields["padding"]
    if isinstance(padding, str):
        raise SpecError(f"padding: {padding!r}: a pad layer takes an int, one int per axis or [lo, hi] pairs")
    nd = 1 if _is_int(padding) else len(padding) if isinstance(padding, (list, tuple)) else 0
    if nd not in AXIS_NAMES:
        raise SpecError(f"padding: {padding!r} is not an int, one int per axis (1 to 3) or [lo, hi] pairs")
    parse_padding(padding, (1,) * nd, (1,) * nd, (1,) * nd)
    mode = fields.get("mode", "constant")
    if mode not in PAD_MODES:
        raise SpecError(f"mode: {mode!r} is not one of {', '.join(PAD_MODES)}")
    value = fields.get("value", 0.0)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise SpecError(f"value: {value!r} must be a finite number")
    if mode != "constant" and value != 0:
        raise SpecError(f"value: {value!r} applies only to mode 'constant', not {mode!r}")
    return PadSpec(padding, mode, float(value))


def fit_size(size: Sequence[int], ndim: int) -> tuple[int, ...]:
    """An input size for `ndim` spatial axes: one number per axis, or one number for all."""
    if len(size) == 1:
        return tuple(size) * ndim
    if len(size) != ndim:
        raise SpecError(f"input size: {len(size)} numbers given ({'x'.join(map(str, size))}) "
                        f"but the convs have {ndim} spatial axes")
    return tuple(size)


def pad_fits(mode: str, pad: tuple[int, int], n: int) -> bool:
    """PyTorch refuses reflect padding >= n and circular padding > n (zeros/replicate always fit)."""
    if mode == "reflect":
        return max(pad) < n
    if mode == "circular":
        return max(pad) <= n
    return True


def size_problem(spec: ConvSpec, size: Sequence[int]) -> Optional[str]:
    """Why this conv cannot run on an input of this spatial size (None when it can), as PyTorch decides."""
    if spec.ndim == 0 and len(size):
        return f"a linear layer reads a [N, C] value, with no spatial axes, not one of size {'x'.join(map(str, size))}"
    for name, axis, n in zip(spec.axis_names, spec.axes, size):
        pad = max(axis.pad)
        if not pad_fits(spec.padding_mode, axis.pad, n):
            least = pad + 1 if spec.padding_mode == "reflect" else pad
            return f"{spec.padding_mode} padding {pad} needs at least {least} on {name}, it gets {n}"
        if axis.out_len(n) < 1:
            return (f"its kernel spans {axis.extent} on {name}, more than the padded input "
                    f"{n} + {axis.pad[0]} + {axis.pad[1]}")
    return None


def macs(spec: ConvSpec, size: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass for one input of spatial ``size``."""
    out = spec.out_size(size)
    if any(n < 1 for n in out):
        return 0
    return math.prod(out) * spec.out_channels * (spec.in_channels // spec.groups) * math.prod(spec.kernel_size)


# The CPU cost model behind the 'cheaper' policy, in dense-MAC equivalents, fitted on 48 layer
# timings (benchmarks/README.md): dense convs ran at 46.6 GMAC/s, pointwise at 80.8, depthwise at
# 24.1, memory at 7.1 GB/s (one byte ~ 6.5 dense MACs), plus a fixed cost per layer. MACs alone
# miss that merging two depthwise convs saves a pass over the activation (measured 1.14-1.28x
# faster although the MACs grow 6 -> 9 per pixel and channel).
MAC_WEIGHT = {"dense": 1.0, "pointwise": 0.6, "depthwise": 2.0}
BYTE_WEIGHT = 6.5
LAYER_OVERHEAD = 1_000_000


def cost(spec: ConvSpec, size: Sequence[int], itemsize: int = 4) -> float:
    """Estimated CPU time of one forward pass, in dense-MAC equivalents (see MAC_WEIGHT)."""
    out = spec.out_size(size)
    if any(n < 1 for n in out):
        return 0.0
    if spec.groups > 1 and spec.groups == spec.in_channels:
        kind = "depthwise"
    elif all(k == 1 for k in spec.kernel_size):
        kind = "pointwise"
    else:
        kind = "dense"
    traffic = math.prod(size) * spec.in_channels + math.prod(out) * spec.out_channels + params(spec)
    return macs(spec, size) * MAC_WEIGHT[kind] + BYTE_WEIGHT * itemsize * traffic + LAYER_OVERHEAD


def params(spec: ConvSpec) -> int:
    """Weights plus bias."""
    return math.prod(spec.weight_shape) + (spec.out_channels if spec.bias else 0)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_ints(value: Any, nd: int, field: str) -> tuple[int, ...]:
    values = (value,) * nd if _is_int(value) else value
    if not isinstance(values, (list, tuple)) or len(values) != nd or not all(_is_int(v) for v in values):
        raise SpecError(f"{field}: {value!r} is not an int or {nd} int(s)")
    if any(v < 1 for v in values):
        raise SpecError(f"{field}: {list(values)} must be >= 1 on every axis")
    return tuple(values)


def _pad_pair(pair: Any) -> tuple[int, int]:
    if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(_is_int(p) for p in pair):
        raise SpecError(f"padding: {pair!r} is not an int or a [lo, hi] pair of ints")
    if pair[0] < 0 or pair[1] < 0:
        raise SpecError(f"padding: {list(pair)} must not be negative")
    return (pair[0], pair[1])
