"""One pair or one region in depth: the specs, the conditions, the candidate, and where they differ."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from ..engine import algebra, bands, plan as planning, reference
from .. import ops
from ..engine.algebra import Conv
from ..graph import CONV_OPS, Graph, GraphError
from ..engine.plan import Loader, Tensors
from ..maths.reasons import sentence
from ..engine.reduce import Reducer
from ..maths.region import Par, find_regions
from ..maths.rules import side_conditions
from ..maths.spec import fit_size, macs, padding_fields

__all__ = ["explain_pair", "explain_region"]

DEFAULT_SIZE = 12


def explain_pair(graph: Graph, tensors: Tensors, first: str, second: str,
                 size: Optional[Sequence[int]] = None, model_size: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """Everything `convmerge explain MODEL FIRST SECOND` shows, as data.  `size` is the size at FIRST's
    input; without it, a model fixed at `model_size` (a static ONNX model) is shown at the size it gives
    there, any other at a small size (one where the merge fails, if any)."""
    pair = next((p for p in graph.pairs() if (p.first, p.second) == (first, second)), None)
    if pair is None:
        known = ", ".join(f"{p.first} -> {p.second}" for p in graph.pairs()) or "none"
        raise GraphError(f"no conv pair {first} -> {second} in the description (pairs: {known}; "
                         "for a region give only its output layer)")
    loader = Loader(graph, tensors)
    a = loader.conv(first)
    folded = [v for v in pair.via if ops.kind(graph.layers[v].op) is ops.Kind.AFFINE]
    for v in folded:
        a = algebra.fold_bn(a, loader.bn(v))
    b = loader.conv(second)
    v = algebra.analyze(a, b)
    nd = a.spec.ndim
    cand = algebra.merge(a, b, v.candidate)
    runs = lambda s: all(planning.chain_runs([a, b], k, n) for k, n in enumerate(s))  # noqa: E731
    size = size or _size_at_value(graph, model_size, graph.layers[first].inputs[0], nd)
    size = _default_size(nd, runs, v.exact_at) if size is None else fit_size(size, nd)
    exact = v.exact_at(size)
    ce = None if exact else planning.pair_counterexample(a, b, v, size)()[0]
    mid = a.spec.out_size(size)
    specs = [dict(padding_fields(c.spec), bias=c.bias is not None) for c in (a, b)]
    if folded and graph.specs[first].bias is False:
        specs[0]["bias_from"] = f"{', '.join(folded)} (shift folded)"
    return {
        "kind": "pair", "first": first, "second": second, "via": list(pair.via), "blocked": pair.blocked and pair.blocked.text(),
        "specs": specs,
        "conditions": side_conditions(v, size),
        "candidate": dict(padding_fields(v.candidate), bias=v.candidate.bias),
        "verdict": v.verdict.value, "reason": v.reason, "sizes": v.sizes, "why": v.why.as_dict(),
        "weight_dependent": v.weight_dependent,
        "size": list(size), "exact_at_size": exact,
        "counterexample": None if ce is None else ce.as_dict(),
        "macs": {"before": macs(a.spec, size) + macs(b.spec, mid), "after": macs(v.candidate, size) if exact else None},
        "error_map": _pair_map(a, b, cand, size),
    }


def explain_region(graph: Graph, tensors: Tensors, output: str, size: Optional[Sequence[int]] = None,
                   model_size: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """Everything `convmerge explain MODEL OUTPUT` shows for the region computing OUTPUT, as data (`size`
    and `model_size` as for `explain_pair`, at the region's input)."""
    regions = find_regions(graph)
    region = next((r for r in regions if r.output == output), None)
    if region is None:
        region = next((r for r in regions if output in r.layers), None)
    if region is None:
        known = ", ".join(r.output for r in regions) or "none"
        raise GraphError(f"no region ends at {output} (regions end at: {known}; for a pair give FIRST SECOND)")
    loader = Loader(graph, tensors)
    convs = [n for n in region.layers if graph.layers[n].op in CONV_OPS]
    nd = graph.specs[convs[0]].ndim
    channels = _channels_of(graph, region.input)
    whole = _reduce(graph, loader, region.input, channels, nd, region.layers, region.output)
    s = whole.summary
    run = lambda x: reference.run(graph, loader, region.input, region.layers, region.output, x)  # noqa: E731
    cand = whole.conv
    runs = lambda sz: planning.layers_run(graph, region.layers, region.input, sz, None)  # noqa: E731
    exact_at = lambda sz: all(c.exact_at(sz) for c in whole.checks)  # noqa: E731
    size = size or _size_at_value(graph, model_size, region.input, nd)
    size = _default_size(nd, runs, exact_at) if size is None else fit_size(size, nd)
    exact = cand is not None and exact_at(size)
    branches = []
    top = region.items[-1] if region.items else None
    if isinstance(top, Par):
        for src in graph.layers[top.join].inputs:
            inside = [n for n in region.layers if n in _before(graph, src, top.split)]
            red = _reduce(graph, loader, top.split, _channels_of(graph, top.split, channels), nd,
                          inside, src)
            branches.append({"output": src, "layers": inside,
                             "conv": None if red.conv is None else dict(padding_fields(red.conv.spec),
                                                                        bias=red.conv.bias is not None),
                             "verdict": red.summary.verdict.value,
                             "reason": sentence(red.summary.verdict, red.summary.why, red.summary.sizes)})
    ce = None
    if cand is not None and not exact and planning.layers_run(graph, region.layers, region.input, size, cand.spec):
        ce = algebra.counterexample(run, cand, size, cand.spec.in_channels)
    return {
        "kind": "region", "input": region.input, "output": region.output, "layers": list(region.layers),
        "branches": branches,
        "steps": [{"from": c.first, "to": c.second, "verdict": c.verdict.value,
                   "reason": sentence(c.verdict, c.why, c.sizes, c.notes) if c.why else c.verdict.value}
                  for c in whole.checks],
        "candidate": None if cand is None else dict(padding_fields(cand.spec), bias=cand.bias is not None),
        "verdict": s.verdict.value, "reason": sentence(s.verdict, s.why, s.sizes, s.notes), "sizes": s.sizes,
        "weight_dependent": s.weight_dependent,
        "size": list(size), "exact_at_size": exact,
        "counterexample": None if ce is None else ce.as_dict(),
        "macs": {"before": sum(macs(graph.specs[n], _size_at(graph, region, n, size)) for n in convs),
                 "after": macs(cand.spec, size) if exact and cand is not None else None},
        "error_map": None if cand is None else _error_map(run, cand, size),
    }


def _reduce(graph: Graph, loader: Loader, start: str, channels: int, nd: int, layers: Sequence[str], end: str):
    reducer = Reducer(graph, loader, start, channels, nd)
    for name in layers:
        reducer.add(name)
    return reducer.result(end)


def _channels_of(graph: Graph, value: str, fallback: Optional[int] = None) -> int:
    """A value's channel count (the graph knows it, from its readers where its producer does not fix it)."""
    found = graph.channels.get(value)
    if found is None and fallback is None:
        raise GraphError(f"the channel count of {value} is unknown")
    return found if found is not None else fallback  # type: ignore[return-value]


def _before(graph: Graph, value: str, stop: str) -> set[str]:
    seen, stack = set(), [value]
    while stack:
        cur = stack.pop()
        if cur == stop or cur in seen or cur not in graph.layers:
            continue
        seen.add(cur)
        stack.extend(graph.layers[cur].inputs)
    return seen


def _size_at(graph: Graph, region: Any, conv: str, size: Sequence[int]) -> tuple[int, ...]:
    sizes = planning.layer_sizes(graph, region.layers, region.input, size)
    return sizes.get(graph.layers[conv].inputs[0]) or tuple(size)


def _size_at_value(graph: Graph, model_size: Optional[Sequence[int]], value: str,
                   nd: int) -> Optional[tuple[int, ...]]:
    """The size `value` has when the model's input is `model_size` (None where that is not known)."""
    if model_size is None:
        return None
    here = graph.sizes(model_size).get(value)
    return here if here is not None and len(here) == nd else None


def _default_size(nd: int, runs: Callable[[tuple[int, ...]], bool],
                  exact_at: Callable[[tuple[int, ...]], bool]) -> tuple[int, ...]:
    """A small size where the layers run, preferring one where the merge fails (to show the border)."""
    ok = [n for n in range(1, 65) if runs((n,) * nd)]
    failing = [n for n in ok if n >= DEFAULT_SIZE and not exact_at((n,) * nd)]
    n = failing[0] if failing else next((n for n in ok if n >= DEFAULT_SIZE), ok[0] if ok else DEFAULT_SIZE)
    return (n,) * nd


def _pair_map(a: Conv, b: Conv, cand: Conv, size: Sequence[int]) -> Optional[list[list[float]]]:
    """|pair - candidate| per output position (max over channels) on a random input, one 2-d slice of it.

    Computed a band of rows at a time (`bands`): at 1024x1024 a whole evaluation would take gigabytes.
    """
    if not size:
        return None  # linear layers: no positions to map
    sizes = [tuple(size), a.spec.out_size(size), b.spec.out_size(a.spec.out_size(size))]
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


def _error_map(run: Callable[[torch.Tensor], torch.Tensor], cand: Conv,
               size: Sequence[int]) -> Optional[list[list[float]]]:
    """|layers - candidate| per output position (max over channels), one 2-d slice of it."""
    if not size:
        return None  # linear layers: no positions to map
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, cand.spec.in_channels, *size, generator=gen, dtype=torch.float64)
    try:
        want, got = run(x), algebra.apply(cand, x)
    except RuntimeError:
        return None
    if want.shape != got.shape:  # no position-by-position map (the counterexample names the extra position)
        return None
    diff = (want - got).abs().amax(dim=(0, 1))
    while diff.dim() > 2:
        diff = diff[diff.shape[0] // 2]
    if diff.dim() == 1:
        diff = diff.unsqueeze(0)
    return diff.tolist()
