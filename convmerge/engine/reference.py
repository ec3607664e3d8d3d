"""Run part of a model exactly as PyTorch would, in float64: the oracle every merge is checked against.

This evaluates the *original* layers with torch.nn.functional (a pad is F.pad, a pooling is
F.avg_pool), never through the conv forms that reduce.py builds, so verifying a merge against it
checks the reduction itself.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Protocol, Sequence

import torch
import torch.nn.functional as F

from . import algebra, transpose_tensors
from .. import ops
from .algebra import BatchNorm, Conv
from ..graph import CONV_OPS, POOL_OPS, Graph
from ..maths.spec import PadSpec, PoolSpec

__all__ = ["Magnitudes", "Params", "avg_pool", "channel_mix", "full_width", "mixed", "mixed_out", "pad", "positive",
           "run", "takes_mix"]

_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


class Params(Protocol):
    """Float64 CPU copies of layers' tensors."""

    def conv(self, name: str) -> Conv: ...

    def bn(self, name: str) -> BatchNorm: ...

    def pad_value(self, name: str) -> Optional[torch.Tensor]: ...

    def pad_value_dtype(self, name: str) -> torch.dtype: ...


def run(graph: Graph, params: Params, start: str, layers: Sequence[str], end: str, x: torch.Tensor,
        mix: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The value of `end` when `start` holds `x`; `layers` are those between them, in graph order.

    With `mix` ([channels, k]), `x` holds k mixtures and `start` the channels `mix @ x` at each position: a
    dense conv reading `start` (`takes_mix`) runs on `x`, `params` giving it with its weight times `mix`
    (`mixed`: exact, a conv is linear in its input channels, whatever its padding); any other reader reads
    `mix @ x` itself.

    With `out` ([m, channels of end]), the value is `out @ end` at each position, computed without `end` at full
    width where the layers allow (`_Outputs`): a demand `Q @ v` on a value v of one consumer goes back through
    v's layer: a dense conv runs with weight `Q @ W` and bias `Q @ b` (its m outputs), a per-channel affine
    layer (batch norm) `s * v + t` passes `(Q * s) @ v` back and adds `Q @ t`, an identity passes Q, a sum or
    difference passes Q to each term, the start is `(Q @ mix) @ x`; any other layer, or a value read twice,
    is computed at full width and multiplied by Q.  Every step is an identity of linear algebra, so the result
    is `out @ end` up to float64 rounding."""
    full = full_width(graph, layers, start, end) if out is not None else set(layers)
    values = {start: x}
    wide: Optional[torch.Tensor] = None
    for name in layers:
        if name not in full:
            continue
        layer = graph.layers[name]
        if mix is not None and start in layer.inputs and not takes_mix(graph, name, start) and wide is None:
            wide = channel_mix(x, mix)
        args = [values[src] if src != start or wide is None or takes_mix(graph, name, start) else wide
                for src in layer.inputs]
        values[name] = _op(graph, params, name, layer.op, args)
    if out is None:
        return values[end]
    return _Outputs(graph, params, start, mix, full, values).of(end, out)


def channel_mix(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """`q @ x` at each position: x [N, C, ...], q [k, C] -> [N, k, ...]."""
    return torch.matmul(x.movedim(1, -1), q.T).movedim(-1, 1)


def _mixes_back(graph: Graph, name: str) -> bool:
    """A layer through which a demand `Q @ value` goes back (`run`'s `out`)."""
    op = graph.layers[name].op
    if op in CONV_OPS:
        return graph.specs[name].groups == 1 and graph.specs[name].ndim > 0
    return ops.kind(op) in (ops.Kind.AFFINE, ops.Kind.PASS) or op in ("add", "sub")


def full_width(graph: Graph, layers: Sequence[str], start: str, end: str) -> set[str]:
    """The layers `run` computes at full width for an `out`: those a demand does not reach (`_mixes_back`),
    those read by a conv, and those with more than one reader inside."""
    inside = set(layers)
    readers = {n: sum(1 for c in graph.consumers.get(n, []) if c in inside) for n in layers}
    demanded, full = {end}, set()
    for name in reversed(layers):
        if name not in demanded and name not in full:
            continue
        if name in demanded and not _mixes_back(graph, name):
            demanded.discard(name)
            full.add(name)
        conv = graph.layers[name].op in CONV_OPS
        for src in graph.layers[name].inputs:
            if src == start:
                continue
            if name in full or conv or readers[src] != 1:
                full.add(src)
            else:
                demanded.add(src)
    return full


class _Outputs:
    """`run`'s `out @ end`, from the values computed at full width and demands passed back (see `run`)."""

    def __init__(self, graph: Graph, params: Params, start: str, mix: Optional[torch.Tensor], full: set[str],
                 values: dict[str, torch.Tensor]) -> None:
        self.graph, self.params, self.start, self.mix, self.full, self.values = graph, params, start, mix, full, values

    def of(self, name: str, q: torch.Tensor) -> torch.Tensor:
        """`q @ value` of `name`, q [m, its channels]."""
        if name == self.start:
            return channel_mix(self.values[name], q if self.mix is None else q @ self.mix)
        if name in self.full:
            return channel_mix(self.values[name], q)
        layer = self.graph.layers[name]
        if layer.op in CONV_OPS:
            return algebra.apply(mixed_out(self.params.conv(name), q), self.values[layer.inputs[0]])
        if ops.kind(layer.op) is ops.Kind.AFFINE:
            scale, shift = self.params.bn(name).scale_shift()
            got = self.of(layer.inputs[0], q * scale)
            return got + (q * shift).sum(1).view(1, -1, *[1] * (got.dim() - 2))
        if layer.op in ("add", "sub"):  # the magnitudes of a - b are those of a + b
            minus = layer.op == "sub" and not positive(self.params)
            terms = [self.of(src, -q if minus and i else q) for i, src in enumerate(layer.inputs)]
            return sum(terms[1:], terms[0])
        return self.of(layer.inputs[0], q)  # an identity


def takes_mix(graph: Graph, name: str, start: str) -> bool:
    """A dense conv reading `start`: given mixtures, it runs on them (`run`)."""
    layer = graph.layers[name]
    return layer.op in CONV_OPS and graph.specs[name].groups == 1 and layer.inputs[0] == start


def mixed(conv: Conv, mix: torch.Tensor) -> Conv:
    """A dense conv read through `mix` ([in_channels, k]): the conv of k channels with weight W @ mix, float64."""
    w = conv.weight.double()
    weight = torch.matmul(mix.T, w.reshape(w.shape[0], w.shape[1], -1))  # [k, in] @ [out, in, taps]: no transposed copy
    return Conv(replace(conv.spec, in_channels=mix.shape[1]), weight.view(w.shape[0], mix.shape[1], *w.shape[2:]),
                conv.bias)


def mixed_out(conv: Conv, out: torch.Tensor) -> Conv:
    """A conv's outputs mixed by `out` ([m, out_channels]): the conv of m outputs, weight `out @ W`, bias `out @ b`."""
    weight = (out @ conv.weight.double().flatten(1)).view(out.shape[0], *conv.weight.shape[1:])
    bias = None if conv.bias is None else out @ conv.bias.double()
    return Conv(replace(conv.spec, out_channels=out.shape[0]), weight, bias)


def _op(graph: Graph, params: Params, name: str, op: str, args: list[torch.Tensor]) -> torch.Tensor:
    x = args[0]
    if op in CONV_OPS:
        return algebra.apply(params.conv(name), x)
    if ops.kind(op) is ops.Kind.CONV_TRANSPOSE:
        return transpose_tensors.apply(params.conv(name), x)
    if ops.kind(op) is ops.Kind.AFFINE:
        bn = params.bn(name)
        return F.batch_norm(x, bn.mean.double(), bn.var.double(), _opt(bn.weight), _opt(bn.bias), False, 0.0, bn.eps)
    if ops.kind(op) is ops.Kind.PASS:
        return x
    if op == "add":
        return sum(args[1:], x)
    if op == "sub":  # the magnitudes of a - b are those of a + b
        return x + args[1] if positive(params) else x - args[1]
    if op == "concat":
        return torch.cat(args, dim=graph.layers[name].fields.get("dim", 1))
    if op in POOL_OPS:
        return avg_pool(x, graph.pools[name])
    if op == "pad":
        return pad(x, graph.pads[name], params.pad_value(name))
    raise ValueError(f"layer {name!r}: op {op!r} is not linear")


def positive(params: Params) -> bool:
    """Whether `params` give every term made positive (`Magnitudes`, or a wrapper that says so, as verify's
    mixtures do): a difference is then summed."""
    return bool(getattr(params, "positive", False))


class Magnitudes:
    """The same layers with every term made positive (reference.Params): |weights| and |biases|, a batch norm
    as (x + |mean|) * |weight| / sqrt(var + eps) + |bias|, |pad values|.  Run on |x|, each output is the sum of
    the magnitudes of the terms the layers add there: the scale their float64 rounding is relative to."""

    positive = True

    def __init__(self, graph: Graph, params: Params) -> None:
        self.graph, self.params = graph, params

    def conv(self, name: str) -> Conv:
        c = self.params.conv(name)
        return Conv(c.spec, c.weight.abs(), _abs(c.bias))

    def bn(self, name: str) -> BatchNorm:
        bn = self.params.bn(name)
        return BatchNorm(-bn.mean.abs(), bn.var, bn.eps, _abs(bn.weight), _abs(bn.bias))

    def pad_value(self, name: str) -> Optional[torch.Tensor]:
        value = self.params.pad_value(name)
        return value.abs() if value is not None else torch.tensor([abs(self.graph.pads[name].value)])

    def pad_value_dtype(self, name: str) -> torch.dtype:
        return self.params.pad_value_dtype(name)


def _abs(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.abs()


def avg_pool(x: torch.Tensor, p: PoolSpec) -> torch.Tensor:
    """An avg_pool layer, as `F.avg_pool1d/2d/3d` with its fields."""
    extra = {"divisor_override": p.divisor_override} if p.divisor_override else {}
    return _POOL[p.ndim](x, p.kernel, p.stride, p.padding, p.ceil_mode, p.count_include_pad, **extra)


def pad(x: torch.Tensor, spec: PadSpec, value: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A pad layer, as `F.pad` (whose amounts list the last axis first); `value`: one constant per channel."""
    flat = [v for pair in reversed(spec.pairs(x.dim() - 2)) for v in pair]
    if spec.mode != "constant":
        return F.pad(x, flat, mode=spec.mode)
    if value is None:
        return F.pad(x, flat, value=spec.value)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    inside = F.pad(torch.ones_like(x[:1, :1]), flat)
    return F.pad(x, flat) + (1 - inside) * value.to(x.dtype).view(shape)


def _opt(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.double()
