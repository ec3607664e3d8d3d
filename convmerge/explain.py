"""One pair in depth: both specs, the per-side conditions, the candidate, and where they differ."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from . import algebra, bands, chain
from .graph import Graph, GraphError
from .model import Tensors, load_conv
from .rules import side_conditions
from .spec import fit_size, macs, padding_fields

DEFAULT_SIZE = 12


def explain_pair(graph: Graph, tensors: Tensors, first: str, second: str,
                 size: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """Everything `convmerge explain` shows, as data."""
    pair = next((p for p in graph.pairs() if (p.first, p.second) == (first, second)), None)
    if pair is None:
        known = ", ".join(f"{p.first} -> {p.second}" for p in graph.pairs()) or "none"
        raise GraphError(f"no conv pair {first} -> {second} in the description (pairs: {known})")
    a = load_conv(graph, tensors, first, pair.via)
    b = load_conv(graph, tensors, second, ())
    v = algebra.analyze(a, b)
    nd = a.spec.ndim
    size = _default_size(a, b, v) if size is None else fit_size(size, nd)
    cand = algebra.merge(a, b, v.candidate)
    exact = v.exact_at(size)
    ce = None if exact else chain.find_counterexample(a, b, v, size)[0]
    sizes = chain.sizes_along([a, b], size)
    return {
        "first": first, "second": second, "via": list(pair.via), "blocked": pair.blocked,
        "specs": [dict(padding_fields(c.spec), bias=c.bias is not None) for c in (a, b)],
        "conditions": side_conditions(v, size),
        "candidate": dict(padding_fields(v.candidate), bias=v.candidate.bias),
        "verdict": v.verdict, "reason": v.reason, "sizes": v.sizes,
        "size": list(size), "exact_at_size": exact,
        "counterexample": None if ce is None else ce.as_dict(),
        "macs": {"before": macs(a.spec, sizes[0]) + macs(b.spec, sizes[1]), "after": macs(v.candidate, sizes[0])},
        "error_map": _error_map(a, b, cand, size) if nd else None,
    }


def _default_size(a: algebra.Conv, b: algebra.Conv, v) -> tuple[int, ...]:
    """A small size where the pair runs, preferring one where it fails (to show the border)."""
    nd = a.spec.ndim
    runs = [n for n in range(1, 65) if chain.defined(a, b, (n,) * nd)]
    failing = [n for n in runs if n >= DEFAULT_SIZE and not v.exact_at((n,) * nd)]
    n = failing[0] if failing else next((n for n in runs if n >= DEFAULT_SIZE), runs[0] if runs else DEFAULT_SIZE)
    return (n,) * nd


def _error_map(a: algebra.Conv, b: algebra.Conv, cand: algebra.Conv, size: Sequence[int]) -> Optional[list[list[float]]]:
    """|pair - candidate| per output position (max over channels) on a random input, one 2-d slice of it.

    Computed a band of rows at a time (`bands`): at 1024x1024 a whole evaluation would take gigabytes.
    """
    sizes = chain.sizes_along([a, b], size)
    out = sizes[-1]
    if cand.spec.out_size(size) != out or min(out) < 1:
        return None
    x = bands.random_rows(a.spec.in_channels, size[1:])
    wanted = [out[0] // 2] if len(out) == 3 else list(range(out[0]))  # a 3-d output shows its middle slice
    grid: list = []
    try:
        pair = bands.conv_rows(b, bands.conv_rows(a, x, sizes[0][0]), sizes[1][0])
        single = bands.conv_rows(cand, x, sizes[0][0])
        for index in torch.tensor(wanted).split(bands.band_rows([a, b, cand], size)):
            diff = (pair(index) - single(index)).abs().amax(dim=(0, 1))
            grid += (diff.flatten(0, -2) if diff.dim() > 1 else diff).tolist()  # lists: no tensors pile up
    except RuntimeError:
        return None
    return grid if len(out) > 1 else [grid]
