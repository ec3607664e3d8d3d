"""Tensor work for transposed convolutions (their maths without tensors is in transpose.py): run one as
PyTorch does, fold a per-channel affine map after it into its weights, build its module.

A transposed conv's weight is `[in, out / groups, *k]`: output channel `o` of group `g` is column
`o mod (out / groups)` of the rows of that group, so scaling output channels scales those columns.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .algebra import Conv
from .transpose import TransposeSpec

__all__ = ["apply", "scale_outputs", "transpose_module", "to_module"]

_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MODULES = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def apply(conv: Conv, x: torch.Tensor) -> torch.Tensor:
    """Run one transposed conv (`conv.spec` a TransposeSpec) exactly as PyTorch would."""
    spec: TransposeSpec = conv.spec  # type: ignore[assignment]
    w = conv.weight.to(x.dtype)
    b = None if conv.bias is None else conv.bias.to(x.dtype)
    return _CONV_T[spec.ndim](x, w, b, stride=spec.stride, padding=spec.padding, output_padding=spec.output_padding,
                              groups=spec.groups, dilation=spec.dilation)


def scale_outputs(conv: Conv, scale: torch.Tensor, shift: torch.Tensor) -> Conv:
    """`y * scale + shift` per output channel after a transposed conv, as one transposed conv (float64)."""
    spec: TransposeSpec = conv.spec  # type: ignore[assignment]
    if scale.numel() != spec.out_channels:
        raise ValueError(f"the affine map has {scale.numel()} channels, the conv_transpose outputs {spec.out_channels}")
    g, per = spec.groups, spec.out_channels // spec.groups
    w = conv.weight.double().reshape(g, spec.in_channels // g, per, *spec.kernel_size)
    w = w * scale.double().reshape(g, 1, per, *([1] * spec.ndim))
    b = shift.double() if conv.bias is None else conv.bias.double() * scale.double() + shift.double()
    return Conv(spec.with_bias(True), w.reshape(spec.weight_shape), b)


def transpose_module(spec: TransposeSpec, **factory: Any) -> nn.Module:
    """An empty ConvTranspose*d for `spec`; `factory`: dtype, device."""
    return _MODULES[spec.ndim](spec.in_channels, spec.out_channels, spec.kernel_size, stride=spec.stride,
                               padding=spec.padding, output_padding=spec.output_padding, groups=spec.groups,
                               bias=spec.bias, dilation=spec.dilation, **factory)


def to_module(conv: Conv) -> nn.Module:
    """A ConvTranspose*d holding these weights."""
    module = transpose_module(conv.spec.with_bias(conv.bias is not None), dtype=conv.weight.dtype)  # type: ignore
    with torch.no_grad():
        module.weight.copy_(conv.weight)
        if conv.bias is not None:
            module.bias.copy_(conv.bias)
    return module

