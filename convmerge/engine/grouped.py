"""Grouped float64 convolutions on the CPU, fast: one batched product per kernel tap.

PyTorch's CPU convolution has no fast float64 kernel for groups > 1 (oneDNN takes no doubles): it loops over
the groups, so a depthwise 3x3 on 96 channels of 16x16 takes 11 ms in float64 against 0.1 ms in float32, and
the end-to-end check of a depthwise net (RepViT, MobileOne, FastViT) spent most of its time there.  The same
sum, taken tap by tap (``out[n, g, o] += w[g, o, c, tap] * x[n, g, c, at tap]`` over the kernel's taps), is a
few whole-tensor products.  `fast_grouped` routes every such convolution there while it is active.

A dense float64 convolution with few output channels and many input ones (a merge's verification narrowed to a few
output mixtures, reading a wide hidden layer at a large size) is slow for another reason: PyTorch unfolds the
input into a matrix of in_channels x taps x positions (75 MiB for 256 channels, 3x3, 59x59) to multiply a few rows
by it, 60-70 ms where the products take 5.  `dense_conv` multiplies the input by every tap's weight at once (one
GEMM to taps x out_channels channels at every input position) and adds the taps' shifted windows of that.  It
computes the GEMM at every input position, so a stride of s does s^ndim times the products: `fast_grouped`
routes a dense convolution there where the unfold would be large and the outputs (times that factor) are few
(`_dense_pays`).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["dense_conv", "fast_grouped", "grouped_conv"]

_CONVOLUTION = torch.ops.aten.convolution.default


def grouped_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
                 padding: Sequence[int], dilation: Sequence[int], groups: int) -> torch.Tensor:
    """``F.conv{1,2,3}d(x, weight, bias, stride, padding, dilation, groups)`` of a batched ``x``, tap by tap."""
    nd = weight.dim() - 2
    n, channels, *_ = x.shape
    out_channels, per_group, *kernel = weight.shape
    x = F.pad(x, [p for k in reversed(range(nd)) for p in (padding[k], padding[k])]) if any(padding) else x
    size = [(x.shape[2 + k] - dilation[k] * (kernel[k] - 1) - 1) // stride[k] + 1 for k in range(nd)]
    if any(s <= 0 for s in size):
        raise RuntimeError("grouped_conv: the input is smaller than the kernel")
    x = x.reshape(n, groups, per_group, *x.shape[2:])
    w = weight.reshape(groups, out_channels // groups, per_group, *kernel)
    out = x.new_zeros((n, groups, out_channels // groups, *size))
    for tap in itertools.product(*(range(k) for k in kernel)):
        window = (slice(None),) * 3 + tuple(slice(t * dilation[k], t * dilation[k] + stride[k] * (size[k] - 1) + 1,
                                                  stride[k]) for k, t in enumerate(tap))
        part = x[window]
        taps = w[(slice(None),) * 3 + tap]
        if per_group == 1:  # depthwise and its multiples: a broadcast product, no sum over channels, added in place
            out.addcmul_(part, taps.view(1, groups, -1, *[1] * nd))  # (no temporary: 2.2x faster on 256x33x33)
        else:
            out += torch.einsum("ngc...,goc->ngo...", part, taps)
    out = out.reshape(n, out_channels, *size)
    return out + bias.view(1, -1, *[1] * nd) if bias is not None else out


def dense_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
               padding: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    """``F.conv{1,2,3}d(x, weight, bias, stride, padding, dilation)`` of a batched ``x`` (groups 1): one product of
    every tap's weight with the input, then the taps' windows of it summed."""
    nd = weight.dim() - 2
    n, channels, *_ = x.shape
    out_channels, _, *kernel = weight.shape
    x = F.pad(x, [p for k in reversed(range(nd)) for p in (padding[k], padding[k])]) if any(padding) else x
    full = x.shape[2:]
    size = [(full[k] - dilation[k] * (kernel[k] - 1) - 1) // stride[k] + 1 for k in range(nd)]
    if any(s <= 0 for s in size):
        raise RuntimeError("dense_conv: the input is smaller than the kernel")
    taps = list(itertools.product(*(range(k) for k in kernel)))
    rows = weight.movedim(1, -1).reshape(out_channels, len(taps), channels).transpose(0, 1)  # [taps, out, in]
    every = torch.matmul(rows.reshape(len(taps) * out_channels, channels), x.reshape(n, channels, -1))
    every = every.view(n, len(taps), out_channels, *full)
    out = x.new_zeros((n, out_channels, *size))
    for i, tap in enumerate(taps):
        out += every[(slice(None), i, slice(None)) + tuple(
            slice(t * dilation[k], t * dilation[k] + stride[k] * (size[k] - 1) + 1, stride[k]) for k, t in enumerate(tap))]
    return out + bias.view(1, -1, *[1] * nd) if bias is not None else out


_UNFOLD_ELEMENTS = 1 << 19
"""An unfolded input (in_channels x taps x output positions) past which a dense float64 conv of few outputs is
faster as `dense_conv` (4 MiB: past the caches)."""


def _dense_pays(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int]) -> bool:
    """Whether `dense_conv` beats PyTorch's unfold-and-multiply: the unfold is large and the outputs, times the
    products the stride wastes, few (measured on 2D convs of 1-256 channels at 9x9 to 59x59)."""
    out_channels, channels, *kernel = weight.shape
    unfold = channels * math.prod(kernel) * math.prod(max(1, n // s) for n, s in zip(x.shape[2:], stride))
    return unfold >= _UNFOLD_ELEMENTS and out_channels * math.prod(stride) <= max(16, channels // 4)


class fast_grouped(TorchDispatchMode):
    """While active, every float64 CPU convolution with groups > 1 of a batched input runs `grouped_conv`, and a
    dense one with few outputs and a large unfold `dense_conv`."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        """No: TorchDispatchMode would otherwise wrap `__torch_dispatch__` in torch._dynamo.disable, whose first
        call imports torch._dynamo (about as long as importing torch itself) in every check and fuse.  Nothing
        compiles the code this mode runs under (convmerge's own float64 checks, run eagerly)."""
        return False

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if func is _CONVOLUTION and not kwargs:
            x, weight, bias, stride, padding, dilation, transposed, _, groups = args
            if (not transposed and x.dtype == weight.dtype == torch.float64 and x.device.type == "cpu"
                    and weight.device.type == "cpu" and x.dim() == weight.dim()
                    and (bias is None or bias.dtype == torch.float64)):
                nd = weight.dim() - 2  # one value reads for every axis, as in torch's own convolution
                stride, padding, dilation = ([*v] * nd if len(v) == 1 else v for v in (stride, padding, dilation))
                if groups > 1:
                    return grouped_conv(x, weight, bias, stride, padding, dilation, groups)
                if _dense_pays(x, weight, stride):
                    return dense_conv(x, weight, bias, stride, padding, dilation)
        return func(*args, **kwargs)
