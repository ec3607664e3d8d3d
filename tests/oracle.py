"""Brute-force reference: run convs with torch.nn.functional directly, in float64.

Written independently of convmerge.engine.algebra on purpose: the tests compare the library's claims
against this, never against the library itself.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def run(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], spec) -> torch.Tensor:
    """One conv as PyTorch computes it; raises where PyTorch refuses (e.g. reflect pad >= size)."""
    nd = weight.dim() - 2
    pads = []
    for lo, hi in reversed(spec.padding):
        pads += [lo, hi]
    if spec.padding_mode == "zeros":
        x = F.pad(x, pads) if any(pads) else x
    elif any(pads):
        x = F.pad(x, pads, mode=spec.padding_mode)
    w = weight.double()
    b = None if bias is None else bias.double()
    return CONV[nd](x, w, b, stride=spec.stride, dilation=spec.dilation, groups=spec.groups)


def run_chain(x: torch.Tensor, convs) -> torch.Tensor:
    for c in convs:
        x = run(x, c.weight, c.bias, c.spec)
    return x


def compare(convs, merged, size: Sequence[int], seed: int = 0) -> Optional[bool]:
    """None: the chain is undefined at this size; else whether `merged` equals it there."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, convs[0].spec.in_channels, *size, generator=gen, dtype=torch.float64)
    try:
        want = run_chain(x, convs)
    except RuntimeError:
        return None
    if want.numel() == 0 or min(want.shape[2:]) < 1:
        return None
    try:
        got = run(x, merged.weight, merged.bias, merged.spec)
    except RuntimeError:
        return False
    if got.shape != want.shape:
        return False
    scale = max(1.0, float(want.abs().max()))
    return bool((want - got).abs().max() <= 1e-9 * scale)
