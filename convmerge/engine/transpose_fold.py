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
from typing import Any, Mapping, Optional, Sequence

import torch

from . import algebra, reference, transpose_tensors
from .. import ops
from ..ops import transpose
from .algebra import Conv
from ..graph import Graph
from .plan import Loader, Plan, Tensors, Unit, VerificationError, _storage_dtype
from .verify import VERIFY_TOLERANCE, storage_problem
from ..maths.region import unit_name
from ..maths.spec import macs as spec_macs
from ..maths.spec import params as spec_params
from ..ops.transpose import TransposeSpec

__all__ = ["fold_units", "macs"]

_FOLDS = (ops.Kind.AFFINE, ops.Kind.PASS)


def fold_units(plan: Plan, loader: Loader, tensors: Tensors, cost_at: Mapping[str, Any]) -> list[Unit]:
    """One verified unit per transposed conv with foldable layers after it, and with the stride-1 conv next
    to it where the pair is one transposed conv at every size (transpose.conv_after / conv_before)."""
    graph = plan.graph
    taken = {n for u in plan.applied for n in u.layers}
    units = []
    for name in graph.transposes:
        if name in taken:
            continue
        layers = [name, *_chain(graph, name, taken)]
        if all(loader.finite(n) for n in layers):
            layers = _with_conv(plan, loader, layers, taken, cost_at)
        if len(layers) == 1 or not all(loader.finite(n) for n in layers):
            continue
        taken.update(layers)
        units.append(_unit(graph, loader, tensors, tuple(layers), cost_at))
        loader.clear()
    return units


def _chain(graph: Graph, name: str, taken: set[str]) -> list[str]:
    """The affine and pass layers after `name`, each the only reader of the value before it."""
    chain, cur = [], name
    if graph.layers[name].fields.get("_not_float"):
        return chain
    while (nxt := _only_reader(graph, cur)) is not None:
        layer = graph.layers[nxt]
        if ops.kind(layer.op) not in _FOLDS or nxt in taken or layer.fields.get("_not_float"):
            break
        chain.append(nxt)
        cur = nxt
    return chain


def _only_reader(graph: Graph, value: str) -> Optional[str]:
    readers = graph.consumers.get(value, [])
    return readers[0] if len(readers) == 1 and value not in graph.outputs else None


def _with_conv(plan: Plan, loader: Loader, layers: list[str], taken: set[str], cost_at: Mapping[str, Any]) -> list[str]:
    """`layers` (a transposed conv and what folds into it) with the conv after it or before it (and what folds
    into that conv) where the pair is exactly one transposed conv at every size, and (policy 'cheaper') one
    costing no more multiply-adds.  A conv a region already folded its batch norms into (a unit of that conv
    and fold layers only) is taken with them, and that unit dropped."""
    graph = plan.graph
    after = _only_reader(graph, layers[-1])
    owner = _owner(plan, after) if after is not None else None
    if owner is not None:  # folds before its conv fold into the transposed conv: any order
        tail = list(owner.layers) if owner.input == layers[-1] and _one_conv(graph, owner.layers) else []
    else:
        tail = [after, *_chain(graph, after, taken)] if after is not None and after in graph.specs else []
    if tail and _merges(plan, loader, [*layers, *tail], cost_at):
        if owner is not None:
            plan.units.remove(owner)
        return [*layers, *tail]
    source = graph.layers[layers[0]].inputs[0]
    owner = _owner(plan, source)
    if owner is not None:  # its conv must come first: a batch norm before it is no fold
        before = list(owner.layers) if owner.output == source and _one_conv(graph, owner.layers) and \
            owner.layers[0] in graph.specs else []
    else:
        before, cur = [], source
        while cur in graph.layers and _only_reader(graph, cur) is not None and cur not in taken:
            before.insert(0, cur)
            if cur in graph.specs or ops.kind(graph.layers[cur].op) not in _FOLDS:
                break
            cur = graph.layers[cur].inputs[0]
    if before and before[0] in graph.specs and _merges(plan, loader, [*before, *layers], cost_at):
        if owner is not None:
            plan.units.remove(owner)
        return [*before, *layers]
    return layers


def _owner(plan: Plan, name: str) -> Optional[Unit]:
    return next((u for u in plan.applied if name in u.layers), None)


def _one_conv(graph: Graph, layers: Sequence[str]) -> bool:
    """One conv, and otherwise only batch norms, identities and dropouts (a chain: each reads the one before)."""
    convs = [n for n in layers if n in graph.specs]
    return len(convs) == 1 and all(n in graph.specs or ops.kind(graph.layers[n].op) in _FOLDS for n in layers)


def _merges(plan: Plan, loader: Loader, layers: Sequence[str], cost_at: Mapping[str, Any]) -> bool:
    """Whether a conv and a transposed conv (with what folds into them) are one transposed conv at every size."""
    graph = plan.graph
    if not all(loader.finite(n) and not graph.layers[n].fields.get("_not_float") for n in layers):
        return False
    merged = candidate(graph, loader, layers)
    if merged is None:
        return False
    if plan.policy == "all":
        return True
    start = graph.layers[layers[0]].inputs[0]
    before = sum(_layer_macs(graph, n, cost_at) for n in layers if n in graph.specs or n in graph.transposes)
    return macs(merged.spec, _size(graph, start, cost_at, merged.spec.ndim)) <= before


def candidate(graph: Graph, loader: Loader, layers: Sequence[str]) -> Optional[Conv]:
    """The one transposed conv `layers` compute (float64): a transposed conv with what folds into it, and
    maybe a conv (with what folds into it) before or after; None where that is not exact at every input
    size, or not a transposed conv PyTorch can express."""
    convs = [k for k, n in enumerate(layers) if n in graph.specs]
    if not convs:
        return folded(graph, loader, layers)
    k_c, k_t = convs[0], next(k for k, n in enumerate(layers) if n in graph.transposes)
    if k_c < k_t:
        conv, t = _conv_folded(graph, loader, layers[k_c:k_t]), folded(graph, loader, layers[k_t:])
    else:
        t, conv = folded(graph, loader, layers[k_t:k_c]), _conv_folded(graph, loader, layers[k_c:])
    cspec, tspec = conv.spec, t.spec
    if cspec.padding_mode != "zeros" and cspec.pads_anything:
        return None
    c_taps, t_taps = _taps(conv.weight), _taps(t.weight)
    if k_t < k_c:  # transposed conv, then conv: t's bias meets the conv's zero padding
        bias = t.bias is not None and bool((t.bias != 0).any())
        axes = [transpose.conv_after(a, c) for a, c in zip(tspec.axes, cspec.axes)]
        if None in axes or not all(transpose.after_every_size(a, c, tt, ct, bias) for a, c, tt, ct in
                                   zip(tspec.axes, cspec.axes, t_taps, c_taps)):
            return None
        return transpose_tensors.compose_after(t, conv, TransposeSpec(tuple(axes), tspec.in_channels,
                                                                      cspec.out_channels))
    bias = conv.bias is not None and bool((conv.bias != 0).any())  # conv, then transposed conv
    axes = [transpose.conv_before(c, a) for c, a in zip(cspec.axes, tspec.axes)]
    if None in axes or not all(transpose.before_every_size(c, a, ct, tt, bias) for c, a, ct, tt in
                               zip(cspec.axes, tspec.axes, c_taps, t_taps)):
        return None
    return transpose_tensors.compose_before(conv, t, TransposeSpec(tuple(axes), cspec.in_channels,
                                                                   tspec.out_channels))


def folded(graph: Graph, loader: Loader, layers: Sequence[str]) -> Conv:
    """The transposed conv `layers[0]` with the affine layers after it folded in (float64)."""
    conv = loader.conv(layers[0])
    for name in layers[1:]:
        if ops.kind(graph.layers[name].op) is ops.Kind.AFFINE:
            conv = transpose_tensors.scale_outputs(conv, *loader.bn(name).scale_shift())
    return conv


def _conv_folded(graph: Graph, loader: Loader, layers: Sequence[str]) -> Conv:
    """The conv `layers[0]` with the affine layers after it folded in (float64)."""
    conv = loader.conv(layers[0])
    for name in layers[1:]:
        if ops.kind(graph.layers[name].op) is ops.Kind.AFFINE:
            conv = algebra.fold_bn(conv, loader.bn(name))
    return conv


def _taps(weight: torch.Tensor) -> list[list[int]]:
    """Per spatial axis, the kernel indices where some weight is nonzero."""
    nz = weight != 0
    return [[int(k) for k in nz.transpose(0, 2 + axis).flatten(1).any(1).nonzero().flatten()]
            for axis in range(weight.dim() - 2)]


def _size(graph: Graph, value: str, cost_at: Mapping[str, Any], ndim: int) -> tuple[int, ...]:
    size = cost_at.get(value)
    return tuple(size) if size is not None and len(size) == ndim else (224,) * ndim


def _layer_macs(graph: Graph, name: str, cost_at: Mapping[str, Any]) -> int:
    src = graph.layers[name].inputs[0]
    if name in graph.specs:
        spec = graph.specs[name]
        return spec_macs(spec, _size(graph, src, cost_at, spec.ndim))
    tspec = graph.transposes[name]
    return macs(tspec, _size(graph, src, cost_at, tspec.ndim))


def _unit(graph: Graph, loader: Loader, tensors: Tensors, layers: tuple[str, ...], cost_at: Mapping[str, Any]) -> Unit:
    first, end = layers[0], layers[-1]
    start = graph.layers[first].inputs[0]
    merged = candidate(graph, loader, layers)
    assert merged is not None
    convs = [n for n in layers if n in graph.specs or n in graph.transposes]
    dtype = _storage_dtype(tensors, convs, layers)
    stored = Conv(merged.spec, merged.weight.to(dtype), None if merged.bias is None else merged.bias.to(dtype))
    errors = _errors(graph, loader, start, layers, end, [merged, stored])
    if not errors[0] <= VERIFY_TOLERANCE:
        raise VerificationError(f"{end}: the merged conv_transpose differs from its layers by {errors[0]:.3g} "
                                "(relative)")
    at = _size(graph, start, cost_at, merged.spec.ndim)
    params_before = sum(_params(graph.transposes[n]) if n in graph.transposes else spec_params(graph.specs[n])
                        for n in convs)
    kinds = tuple("conv" if n in graph.specs else "conv_transpose" if n in graph.transposes else graph.layers[n].op
                  for n in layers)
    return Unit(unit_name(graph, set(layers), end), start, end, layers, stored, dtype, errors[0], errors[1],
                sum(_layer_macs(graph, n, cost_at) for n in convs), macs(merged.spec, at), params_before,
                _params(merged.spec), storage_problem(errors[1], dtype), kinds)


def _errors(graph: Graph, loader: Loader, start: str, layers: Sequence[str], end: str,
            merged: Sequence[Conv]) -> list[float]:
    """Largest |layers - merged| per version, relative to the magnitude of the terms the layers sum
    (reference.Magnitudes), on random inputs at the smallest size where the layers run (every axis alike),
    the next two, and one past where the borders meet."""
    spec: TransposeSpec = merged[0].spec  # type: ignore[assignment]
    gen = torch.Generator().manual_seed(0)
    terms = reference.Magnitudes(graph, loader)
    worst = [0.0] * len(merged)
    runs = 0
    for n in range(1, 64):
        if runs == 3:
            n += 3 * max(spec.kernel_size) + 4 * max(spec.padding)
        x = torch.randn(2, spec.in_channels, *[n] * spec.ndim, generator=gen, dtype=torch.float64)
        try:
            want = reference.run(graph, loader, start, layers, end, x)
        except RuntimeError:
            continue  # the layers do not run at this size
        if want.numel() == 0:
            continue
        runs += 1
        scale = max(float(want.abs().max()), float(reference.run(graph, terms, start, layers, end, x.abs()).max()))
        for k, conv in enumerate(merged):
            got = transpose_tensors.apply(Conv(conv.spec, conv.weight.double(),
                                               None if conv.bias is None else conv.bias.double()), x)
            err = float((want - got).abs().max()) / (scale or 1.0) if got.shape == want.shape else math.inf
            worst[k] = max(worst[k], err if err == err else math.inf)
        if runs == 4:
            return worst
    return worst if runs else [math.inf] * len(merged)


def macs(spec: TransposeSpec, size: Sequence[int]) -> int:
    """Multiply-adds of a transposed conv on an input of `size`: every input cell scatters its kernel."""
    return math.prod(size) * spec.in_channels * (spec.out_channels // spec.groups) * math.prod(spec.kernel_size)


def _params(spec: TransposeSpec) -> int:
    return math.prod(spec.weight_shape) + (spec.out_channels if spec.bias else 0)
