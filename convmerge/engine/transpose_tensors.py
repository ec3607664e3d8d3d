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
from ..ops.transpose import TransposeSpec

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


def _dense(weight: torch.Tensor, groups: int, rows_first: bool) -> torch.Tensor:
    """A grouped weight as the dense one it acts as: a conv's `[out, in/g, *k]` -> `[out, in, *k]`, a transposed
    conv's `[in, out/g, *k]` -> `[in, out, *k]` (`rows_first`: the first axis is the full one either way)."""
    rows, per = weight.shape[0], weight.shape[1]
    dense = weight.new_zeros(rows, per * groups, *weight.shape[2:])
    block = rows // groups
    for g in range(groups):
        dense[g * block:(g + 1) * block, g * per:(g + 1) * per] = weight[g * block:(g + 1) * block]
    return dense


def compose_after(t: Conv, c: Conv, spec: TransposeSpec) -> Conv:
    """The transposed conv `spec` (transpose.conv_after on every axis) that `t` then the conv `c` compose to
    (float64): K[i, o, d_t·b + d_c·(k_c − 1 − a)] = Σ_m w_t[i, m, b]·w_c[o, m, a], B = b_c + Σ_a w_c·b_t."""
    wt = _dense(t.weight.double(), t.spec.groups, True)  # [in, mid, *k_t]
    wc = _dense(c.weight.double(), c.spec.groups, True)  # [out, mid, *k_c]
    k = wt.new_zeros(wt.shape[0], wc.shape[0], *spec.kernel_size)
    for a in _taps(c.spec.kernel_size):
        start = [dc * (kc - 1 - ai) for dc, kc, ai in zip(c.spec.dilation, c.spec.kernel_size, a)]
        window = tuple(slice(s0, s0 + dt * (kt - 1) + 1, dt)
                       for s0, dt, kt in zip(start, t.spec.dilation, t.spec.kernel_size))
        k[(slice(None), slice(None), *window)] += torch.einsum("im...,om->io...", wt, wc[(slice(None), slice(None), *a)])
    bias = None
    if t.bias is not None or c.bias is not None:
        bias = torch.zeros(spec.out_channels, dtype=torch.float64)
        if c.bias is not None:
            bias = bias + c.bias.double()
        if t.bias is not None:
            bias = bias + wc.flatten(2).sum(2) @ t.bias.double()
    return Conv(spec.with_bias(bias is not None), k, bias)


def compose_before(c: Conv, t: Conv, spec: TransposeSpec) -> Conv:
    """The transposed conv `spec` (transpose.conv_before on every axis) that the conv `c` then `t` compose to
    (float64): K[i, o, d_t·b + s·d_c·(k_c − 1 − a)] = Σ_m w_c[m, i, a]·w_t[m, o, b], B = b_t + Σ_b w_tᵀ·b_c."""
    wc = _dense(c.weight.double(), c.spec.groups, True)  # [mid, in, *k_c]
    wt = _dense(t.weight.double(), t.spec.groups, True)  # [mid, out, *k_t]
    k = wt.new_zeros(wc.shape[1], wt.shape[1], *spec.kernel_size)
    for a in _taps(c.spec.kernel_size):
        start = [s * dc * (kc - 1 - ai) for s, dc, kc, ai in zip(t.spec.stride, c.spec.dilation, c.spec.kernel_size, a)]
        window = tuple(slice(s0, s0 + dt * (kt - 1) + 1, dt)
                       for s0, dt, kt in zip(start, t.spec.dilation, t.spec.kernel_size))
        k[(slice(None), slice(None), *window)] += torch.einsum("mi,mo...->io...", wc[(slice(None), slice(None), *a)], wt)
    bias = None
    if t.bias is not None or c.bias is not None:
        bias = torch.zeros(spec.out_channels, dtype=torch.float64)
        if t.bias is not None:
            bias = bias + t.bias.double()
        if c.bias is not None:
            bias = bias + wt.flatten(2).sum(2).T @ c.bias.double()
    return Conv(spec.with_bias(bias is not None), k, bias)


def _taps(kernel: tuple[int, ...]) -> list[tuple[int, ...]]:
    return [tuple(int(v) for v in idx) for idx in torch.cartesian_prod(*[torch.arange(k) for k in kernel]).reshape(
        -1, len(kernel)).tolist()]
