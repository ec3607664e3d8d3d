"""Grouped float64 convolutions on the CPU, fast: one batched product per kernel tap.

PyTorch's CPU convolution has no fast float64 kernel for groups > 1 (oneDNN takes no doubles): it loops over
the groups, so a depthwise 3x3 on 96 channels of 16x16 takes 11 ms in float64 against 0.1 ms in float32, and
the end-to-end check of a depthwise net (RepViT, MobileOne, FastViT) spent most of its time there.  The same
sum, taken tap by tap (``out[n, g, o] += w[g, o, c, tap] * x[n, g, c, at tap]`` over the kernel's taps), is a
few whole-tensor products.  `fast_grouped` routes every such convolution there while it is active.
"""

from __future__ import annotations

import itertools
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["fast_grouped", "grouped_conv"]

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
        if per_group == 1:  # depthwise and its multiples: a broadcast product, no sum over channels
            out += part * taps.view(1, groups, -1, *[1] * nd)
        else:
            out += torch.einsum("ngc...,goc->ngo...", part, taps)
    out = out.reshape(n, out_channels, *size)
    return out + bias.view(1, -1, *[1] * nd) if bias is not None else out


class fast_grouped(TorchDispatchMode):
    """While active, every float64 CPU convolution with groups > 1 of a batched input runs `grouped_conv`."""

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
            if (groups > 1 and not transposed and x.dtype == weight.dtype == torch.float64 and x.device.type == "cpu"
                    and weight.device.type == "cpu" and x.dim() == weight.dim()
                    and (bias is None or bias.dtype == torch.float64)):
                return grouped_conv(x, weight, bias, stride, padding, dilation, groups)
        return func(*args, **kwargs)
