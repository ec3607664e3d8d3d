"""A transposed conv followed by batch norms, identities and dropouts becomes one transposed conv.

A per-channel affine map after a transposed conv scales its output channels and shifts its bias, at
every input size (there is no border: the map acts on the output, not on a padded input), so the fold
is always exact; like every merge it is verified in float64 against the original layers
(reference.py) and rounded to the storage dtype once.  Regions never hold a transposed conv, so these
units are found after the regions are planned, on the layers no applied unit took (a batch norm that
a region merged into the conv after it stays there).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from . import ops, reference, transpose_tensors
from .algebra import Conv
from .graph import Graph
from .plan import VERIFY_TOLERANCE, Loader, Plan, Tensors, Unit, VerificationError, _storage_dtype, _storage_problem
from .region import unit_name
from .transpose import TransposeSpec

__all__ = ["fold_units", "macs"]

_FOLDS = (ops.Kind.AFFINE, ops.Kind.PASS)


def fold_units(plan: Plan, loader: Loader, tensors: Tensors, cost_at: Mapping[str, Any]) -> list[Unit]:
    """One verified unit per transposed conv with foldable layers after it."""
    graph = plan.graph
    taken = {n for u in plan.applied for n in u.layers}
    units = []
    for name in graph.transposes:
        layers = (name, *_chain(graph, name, taken))
        if len(layers) == 1 or not all(loader.finite(n) for n in layers):
            continue
        units.append(_unit(graph, loader, tensors, layers, cost_at))
        loader.clear()
    return units


def _chain(graph: Graph, name: str, taken: set[str]) -> list[str]:
    """The affine and pass layers after `name`, each the only reader of the value before it."""
    chain, cur = [], name
    if graph.layers[name].fields.get("_not_float"):
        return chain
    while cur not in graph.outputs and len(graph.consumers.get(cur, [])) == 1:
        nxt = graph.consumers[cur][0]
        layer = graph.layers[nxt]
        if ops.kind(layer.op) not in _FOLDS or nxt in taken or layer.fields.get("_not_float"):
            break
        chain.append(nxt)
        cur = nxt
    return chain


def folded(graph: Graph, loader: Loader, layers: Sequence[str]) -> Conv:
    """The transposed conv `layers[0]` with the affine layers after it folded in (float64)."""
    conv = loader.conv(layers[0])
    for name in layers[1:]:
        if ops.kind(graph.layers[name].op) is ops.Kind.AFFINE:
            conv = transpose_tensors.scale_outputs(conv, *loader.bn(name).scale_shift())
    return conv


def _unit(graph: Graph, loader: Loader, tensors: Tensors, layers: tuple[str, ...], cost_at: Mapping[str, Any]) -> Unit:
    first, end = layers[0], layers[-1]
    spec: TransposeSpec = graph.transposes[first]
    start = graph.layers[first].inputs[0]
    merged = folded(graph, loader, layers)
    dtype = _storage_dtype(tensors, [first], layers)
    stored = Conv(merged.spec, merged.weight.to(dtype), None if merged.bias is None else merged.bias.to(dtype))
    errors = _errors(graph, loader, start, layers, end, [merged, stored])
    if not errors[0] <= VERIFY_TOLERANCE:
        raise VerificationError(f"{end}: the folded conv_transpose differs from its layers by {errors[0]:.3g} "
                                "(relative)")
    at = cost_at.get(start) or (224,) * spec.ndim
    unit = Unit(unit_name(graph, set(layers), end), start, end, layers, stored, dtype, errors[0], errors[1],
                macs(spec, at), macs(merged.spec, at), _params(spec), _params(merged.spec),
                _storage_problem(errors[1], dtype), (ops.Kind.CONV_TRANSPOSE.value, *(graph.layers[n].op for n in layers[1:])))
    return unit


def _errors(graph: Graph, loader: Loader, start: str, layers: Sequence[str], end: str,
            merged: Sequence[Conv]) -> list[float]:
    """Largest |layers - merged| per version, relative to the magnitude of the terms the layers sum
    (reference.Magnitudes), on random inputs at the three smallest sizes where the layers run."""
    spec: TransposeSpec = merged[0].spec  # type: ignore[assignment]
    least = [next(n for n in range(1, 2 * a.padding + 2) if a.out_len(n) >= 1) for a in spec.axes]
    gen = torch.Generator().manual_seed(0)
    terms = reference.Magnitudes(graph, loader)
    worst = [0.0] * len(merged)
    for extra in (0, 1, 3):
        x = torch.randn(2, spec.in_channels, *[n + extra for n in least], generator=gen, dtype=torch.float64)
        want = reference.run(graph, loader, start, layers, end, x)
        scale = max(float(want.abs().max()), float(reference.run(graph, terms, start, layers, end, x.abs()).max()))
        for k, conv in enumerate(merged):
            got = transpose_tensors.apply(Conv(conv.spec, conv.weight.double(),
                                               None if conv.bias is None else conv.bias.double()), x)
            err = float((want - got).abs().max()) / (scale or 1.0) if got.shape == want.shape else math.inf
            worst[k] = max(worst[k], err if err == err else math.inf)
    return worst


def macs(spec: TransposeSpec, size: Sequence[int]) -> int:
    """Multiply-adds of a transposed conv on an input of `size`: every input cell scatters its kernel."""
    return math.prod(size) * spec.in_channels * (spec.out_channels // spec.groups) * math.prod(spec.kernel_size)


def _params(spec: TransposeSpec) -> int:
    return math.prod(spec.weight_shape) + (spec.out_channels if spec.bias else 0)
