"""Convs evaluated a band of rows (the first spatial axis) at a time: memory set by the band, not the size.

`explain` maps |pair - candidate| at the size asked. PyTorch's float64 CPU conv unfolds its whole
input (channels x taps x positions), 25 times the input for a 5x5 candidate, so one evaluation
at 1024x1024 takes gigabytes. Here a band of output rows reads only the input rows it needs,
through the conv's own padding (PyTorch's F.pad applied to a row index), so every band holds the
values a full evaluation would give.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .algebra import Conv, apply

BAND_ELEMENTS = 1 << 21
"""Values a band may unfold (16 MiB of float64): a few output rows of a 1024-wide, 16-channel 5x5 conv."""

Rows = Callable[[torch.Tensor], torch.Tensor]
"""Sorted, distinct row indices (axis 0) -> those rows of a tensor, shaped [1, C, len(rows), *rest]."""


def random_rows(channels: int, rest: Sequence[int], seed: int = 0) -> Rows:
    """A random float64 input whose every row has its own seed: any band of it holds the same values."""
    def rows(index: torch.Tensor) -> torch.Tensor:
        return torch.stack([
            torch.randn(1, channels, *rest, generator=torch.Generator().manual_seed(seed + int(r)), dtype=torch.float64)
            for r in index
        ], dim=2) if len(index) else torch.zeros(1, channels, 0, *rest, dtype=torch.float64)
    return rows


def conv_rows(conv: Conv, below: Rows, length: int) -> Rows:
    """Rows of `conv`'s output, reading rows of its input (`length` long on axis 0) from `below`.

    Raises RuntimeError where PyTorch would refuse the conv's padding at this length.
    """
    spec, axis = conv.spec, conv.spec.axes[0]
    source = _padded_rows(length, axis.pad, spec.padding_mode)
    unpadded = replace(spec, axes=(replace(axis, pad=(0, 0)),) + spec.axes[1:])  # axis 0 padded by `source`
    flat = Conv(unpadded, conv.weight.double(), None if conv.bias is None else conv.bias.double())
    reach = axis.dilation * (axis.kernel - 1) + 1

    def rows(index: torch.Tensor) -> torch.Tensor:
        out = []
        for first, last in _runs(index):
            window = source[first * axis.stride:last * axis.stride + reach]
            inside = window >= 0
            need = torch.unique(window[inside])
            got = below(need)
            x = got.new_zeros(*got.shape[:2], len(window), *got.shape[3:])
            x[:, :, inside] = got[:, :, torch.searchsorted(need, window[inside])]
            out.append(apply(flat, x))
        if not out:  # no rows asked for: the right shape, for callers that concatenate
            rest = [a.out_len(n) for a, n in zip(spec.axes[1:], below(index).shape[3:])]
            return torch.zeros(1, spec.out_channels, 0, *rest, dtype=torch.float64)
        return torch.cat(out, dim=2)
    return rows


def band_rows(convs: Sequence[Conv], size: Sequence[int]) -> int:
    """Output rows per band so that the biggest unfolded input of a band stays near BAND_ELEMENTS values."""
    widest = max(c.spec.in_channels * math.prod(c.spec.kernel_size) for c in convs)
    stride = math.prod(c.spec.axes[0].stride for c in convs)
    return max(1, BAND_ELEMENTS // (widest * stride * math.prod(size[1:])))


def _padded_rows(length: int, pad: tuple[int, int], mode: str) -> torch.Tensor:
    """For each row of the padded input, the input row it copies, or -1 for a zero row."""
    index = torch.arange(length, dtype=torch.float64).view(1, 1, length)
    if mode == "zeros":
        return F.pad(index, pad, value=-1.0).view(-1).long()
    return F.pad(index, pad, mode=mode).view(-1).long()


def _runs(index: torch.Tensor) -> list[tuple[int, int]]:
    """Sorted distinct indices as (first, last) of each stretch of consecutive ones."""
    values = index.tolist()
    runs: list[tuple[int, int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], v)
        else:
            runs.append((v, v))
    return runs
