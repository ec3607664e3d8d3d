"""A merge checked against the layers it replaces, in float64: random inputs through the original layers
(reference.py) and through the merged conv, at the sizes that show every border case and one past them (the
first size from which, at every value, some output reads neither border: `_past_borders`).

The cost stays in proportion to the layers at those sizes.  Where the merged conv is dense and reads more
than MIXES channels, the input is MIXES random mixtures of its channels: x = R u, R a Gaussian
[channels, MIXES] matrix, u random.  A dense conv that reads x runs on u with its weight times R (exact:
a conv is linear in its input channels); any other reader (a batch norm, an identity, a pad, a pooling:
per-channel ops, an identity or BN branch being a delta) reads R u itself; the merged conv becomes its
weight times R.  Where the check would still cost more than FULL_VERIFY_MACS at a size, and the size is not
the covering one (below), the outputs are compared as MIXES random mixtures too: y -> Q y, Q a Gaussian
[MIXES, channels] matrix.  The merged conv becomes Q times its weight and bias; on the layers' side Q goes back
from the output (reference.run's `out`) through a dense conv (run with Q times its weight: its outputs are
MIXES, whatever its inputs), a per-channel affine layer or batch norm s y + t (Q diag(s) goes on, Q t is
added), an identity, a sum or difference (Q goes to each term) and the start (an identity branch reads Q R u);
any other layer, or a value read twice, is computed whole and mixed.  At the size past the borders a chain
with a wide hidden layer then costs its first conv and MIXES outputs of the others, not every output.

Why nothing wrong hides.  The layers and the merged conv are both affine in x.  At the smallest size where an
output of the merged conv reads the input alone on every tap ('covering'), every output channel is compared
(no output mixtures), and an output of every channel o sees every tap t on random input, so a difference
D[o, c, t] between the merged weight and the layers' shows unless sum over c of D[o, c, t] R[c, j] is zero
for every mixture j: for any D that is not zero, Gaussian R makes that an event of probability zero.  A wrong
weight at any output channel, input channel or tap, or a wrong bias, is caught (tests/test_verify_narrow.py
corrupts each entry in turn).  At the other sizes a difference d at an output position shows unless Q d = 0:
probability zero for any d that is not zero, in whichever channels it lies (the 8 random channels compared there
before saw a channel with probability 8/channels).  Grouped merged convs are checked on every channel (they are
cheap: their weights hold a group's channels only).

Why the covering size keeps every output channel.  Errors are relative to the largest magnitude of the terms
the layers add (algebra.max_errors).  Mixing the outputs mixes that scale too: a mixture's scale sums |Q[j, o]|
times each channel's, so an error confined to one channel of C shrinks about C-fold against it (a mixture's
relative error is never more than the largest channel's, so mixing never refuses what the whole width would
pass).  The two checks that need the size of one channel's error -- a difference near VERIFY_TOLERANCE and the
rounding of the stored weights (Unit.rounding, refused past ROUNDING_ULPS) -- get it from the covering size,
where every tap of every output channel is read on every channel; the sizes past it add border cases, which any
mixture shows.  The covering size is small (about a kernel wide), so its whole width costs little
(tests/test_verify_outputs.py: a 2e-5 error in one of 256 channels, float16 rounding of a 256-channel merge).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import torch

from . import algebra, reference
from .algebra import BatchNorm, Conv
from ..maths.reasons import Why
from ..graph import CONV_OPS, CONV_TRANSPOSE_OPS, JOIN_OPS, POOL_OPS, Graph
from .reference import Params
from ..maths.spec import Axis, ConvSpec, macs, pad_fits

__all__ = ["Checked", "chain_runs", "check", "covers", "layer_sizes", "layers_run", "sizes", "storage_problem"]

VERIFY_TOLERANCE = 1e-9
ROUNDING_ULPS = 64
"""How far (in units of the dtype's epsilon, relative to the layers' scale) stored merged weights may stray."""
MAX_VERIFY_LENGTH = 512
MIXES = 4
FULL_VERIFY_MACS = 1 << 22
"""Multiply-adds (layers, their magnitudes and the merged convs, inputs mixed) past which a size other than
the covering one compares MIXES mixtures of the output channels, where the merged conv is dense."""


@dataclass(frozen=True)
class Checked:
    """What one verification found and what it cost."""

    errors: list[float]  # per version of the merge: max |layers - merged| relative to the layers' scale
    macs: int  # multiply-adds it ran: the layers twice (values and magnitudes) and each version, every size


def check(graph: Graph, params: Params, start: str, layers: Sequence[str], end: str, merged: Sequence[Conv],
          sizes: Sequence[tuple[int, ...]]) -> Checked:
    """Relative errors of each version of the merge against the layers (see the module's docstring)."""
    gen = torch.Generator().manual_seed(0)
    spec = merged[0].spec
    mix = out = None
    if spec.groups == 1 and spec.in_channels > MIXES:
        mix = torch.randn(spec.in_channels, MIXES, generator=gen, dtype=torch.float64) / math.sqrt(MIXES)
    if spec.groups == 1 and spec.ndim > 0 and spec.out_channels > MIXES:
        out = torch.randn(MIXES, spec.out_channels, generator=gen, dtype=torch.float64) / math.sqrt(MIXES)
    wide = [reference.mixed(m, mix) for m in merged] if mix is not None else list(merged)
    covering = [s for s in sizes if covers(spec, s)]
    cover = min(covering, key=math.prod) if covering else None
    oracle = _Mixed(graph, params, start, mix)
    terms = _Mixed(graph, reference.Magnitudes(graph, params), start, None if mix is None else mix.abs())
    cost = {s: _macs(graph, oracle, start, layers, wide, mix, s) for s in sizes}
    parts: dict[bool, list[tuple[int, ...]]] = {False: [], True: []}
    for s in sizes:
        parts[out is not None and cover is not None and s != cover and cost[s] > FULL_VERIFY_MACS].append(s)
    errors, total = [0.0] * len(merged), 0
    for narrow, part in parts.items():
        if not part:
            continue
        q = out if narrow else None
        convs = [reference.mixed_out(m, q) for m in wide] if q is not None else wide
        run = lambda x: reference.run(graph, oracle, start, layers, end, x, oracle.mix, q)  # noqa: E731
        bound = lambda x: reference.run(graph, terms, start, layers, end, x, terms.mix,  # noqa: E731
                                        None if q is None else q.abs())
        got = algebra.max_errors(run, convs, part, convs[0].spec.in_channels, magnitude=bound)
        errors = [max(a, b) for a, b in zip(errors, got)]
        total += sum(cost[s] if q is None else _macs(graph, oracle, start, layers, convs, mix, s, end) for s in part)
    return Checked(errors, total)


def covers(spec: ConvSpec, size: Sequence[int]) -> bool:
    """Whether some output of the conv reads the input alone (no padding) on every tap, on every axis."""
    return all(-(-a.pad[0] // a.stride) * a.stride - a.pad[0] + a.extent <= n for a, n in zip(spec.axes, size))


def _macs(graph: Graph, params: Params, start: str, layers: Sequence[str], merged: Sequence[Conv],
          mix: Optional[torch.Tensor], size: Sequence[int], end: Optional[str] = None) -> int:
    """What one size of the check costs: the layers twice (values, magnitudes), the mixing, each merged conv; with
    `end`, the layers' outputs compared as mixtures (as many as the merged convs' outputs: reference.run's `out`)."""
    at = layer_sizes(graph, layers, start, size)
    readers = [n for n in layers if start in graph.layers[n].inputs]
    widened = mix is not None and not all(reference.takes_mix(graph, n, start) for n in readers)
    ref = mix.numel() * math.prod(size) if widened else 0  # R u, for the readers of the channels themselves
    whole = reference.full_width(graph, layers, start, end) if end is not None else set(layers)
    for name in layers:
        layer = graph.layers[name]
        if layer.op in CONV_OPS and layer.inputs[0] in at:
            spec = params.conv(name).spec
            if name not in whole:  # run for the mixtures only
                spec = replace(spec, out_channels=merged[0].spec.out_channels)
            ref += macs(spec, at[layer.inputs[0]])
    return 2 * ref + sum(macs(m.spec, size) for m in merged)


class _Mixed:
    """The layers' tensors for a run on mixtures (reference.run's `mix`): a dense conv reading the start with its
    weight times `mix`; each layer's tensors made once for all the sizes of one check (reference.Params)."""

    def __init__(self, graph: Graph, params: Params, start: str, mix: Optional[torch.Tensor]) -> None:
        self.graph, self.params, self.start, self.mix = graph, params, start, mix
        self.positive = reference.positive(params)  # magnitudes: a difference is summed
        self._convs: dict[str, Conv] = {}
        self._bns: dict[str, BatchNorm] = {}

    def conv(self, name: str) -> Conv:
        if name not in self._convs:
            conv = self.params.conv(name)
            if self.mix is not None and reference.takes_mix(self.graph, name, self.start):
                conv = reference.mixed(conv, self.mix)
            self._convs[name] = conv
        return self._convs[name]

    def bn(self, name: str) -> BatchNorm:
        if name not in self._bns:
            self._bns[name] = self.params.bn(name)
        return self._bns[name]

    def pad_value(self, name: str) -> Optional[torch.Tensor]:
        return self.params.pad_value(name)

    def pad_value_dtype(self, name: str) -> torch.dtype:
        return self.params.pad_value_dtype(name)


# --- verification sizes ----------------------------------------------------------------------------


def sizes(graph: Graph, layers: Sequence[str], start: str, merged: ConvSpec,
          size: Optional[Sequence[int]]) -> list[tuple[int, ...]]:
    """Small sizes per axis covering every residue of the merged stride near the borders, the smallest size
    where an output reads every tap inside the input (`covers`), and one past the borders (`_past_borders`); for
    a merge exact only at `size`, a congruent size past the borders stands in (the same border cases)."""
    if merged.ndim == 0:
        return [()]  # linear layers: one size, none
    per_axis, cover = [], []
    for k in range(merged.ndim):
        a = merged.axes[k]
        period = a.stride
        first = _first(lambda n: _runs_axis(graph, layers, start, k, n, merged))
        if first is None:
            return []
        begin = _past_borders(graph, layers, start, merged, k, first)
        if size is None:
            found = list(range(first, first + period + 1))
            if begin + period <= MAX_VERIFY_LENGTH and begin + period not in found:
                found.append(begin + period)
            per_axis.append(found)
            cover.append(max(first, -(-a.pad[0] // period) * period - a.pad[0] + a.extent))
        else:
            want = size[k]
            per_axis.append([want if want < begin + period else begin + (want - begin) % period])
    longest = max(len(p) for p in per_axis)
    out = [tuple(p[min(i, len(p) - 1)] for p in per_axis) for i in range(longest)]
    if cover and tuple(cover) not in out and layers_run(graph, layers, start, tuple(cover), merged):
        out = sorted(out + [tuple(cover)], key=math.prod)
    return out


def _past_borders(graph: Graph, layers: Sequence[str], start: str, merged: ConvSpec, k: int, first: int) -> int:
    """The least length n >= `first` on axis k from which on the borders are apart: at every value of the part and
    at the merged conv's output, some output reads neither border (`_zones`).  Past it a length n + stride is n with
    one more stride of interior: each value's zones stay as they are (each layer's input grows by whole strides of
    its own) and only the interior grows, so every larger size congruent to n shows the same border cases.  Found
    by trying n, n + 1, ... until a whole stride of lengths is apart; the generous bound 4 reach + 4 stride + 8
    stands where a layer's zones are not known (a transposed conv)."""
    a = merged.axes[k]
    period = a.stride
    fallback = max(first, 4 * (a.extent + sum(a.pad)) + 4 * period + 8)
    n, run = first, 0
    while n < fallback:
        apart = _apart(graph, layers, start, merged, _on_axis(merged, k, n), k)
        if apart is None:
            return fallback
        run = run + 1 if apart else 0
        if run == period:
            return n - period + 1
        n += 1
    return fallback


def _apart(graph: Graph, layers: Sequence[str], start: str, merged: ConvSpec, size: tuple[int, ...],
           k: int) -> Optional[bool]:
    """Whether, on an input of this size, every value of the part and the merged conv's output have an output
    on axis k that reads neither border, and the part's output and the merged conv's have one in common: there
    both are the interior's function of the input, so a shift between them shows (replicate padding copies the
    one cell of a length-1 input, where no shift shows).  None: a layer whose zones are not known."""
    zones = _zones(graph, layers, start, size, k)
    if zones is None or merged.padding_mode == "circular":
        return None
    if layers and layers[-1] not in zones:
        return False
    inner = _conv_zone(merged.axes[k], (0, 0, size[k]))
    last = zones[layers[-1]] if layers else zones[start]
    both = (max(last[0], inner[0]), max(last[1], inner[1]), inner[2])  # an output reading neither border on both sides
    return all(lo + hi < n for lo, hi, n in [*zones.values(), inner, both])


def _zones(graph: Graph, layers: Sequence[str], start: str, size: tuple[int, ...],
           k: int) -> Optional[dict[str, tuple[int, int, int]]]:
    """For each value of the part that runs at this input size: (outputs at the start of axis k that read the
    left border, outputs at its end that read the right border, length).  An output reads a border where its
    window covers some layer's padding (or the missing cells of a partial window), or an output of a layer that
    reads it; the rest are the same function of the input, shifted.  None where a layer's windows are not known."""
    at = layer_sizes(graph, layers, start, size)
    zones = {start: (0, 0, size[k])}
    for name in layers:
        if name not in at:
            continue
        layer = graph.layers[name]
        if _wraps(graph, name):
            return None
        ins = [zones[s] for s in layer.inputs]
        n = at[name][k]
        lo, hi = max(z[0] for z in ins), max(z[1] for z in ins)
        if layer.op in CONV_OPS:
            zone = _conv_zone(graph.specs[name].axes[k], ins[0])
        elif layer.op in POOL_OPS:
            pool = graph.pools[name]
            p = pool.padding[k]
            zone = _conv_zone(Axis(pool.kernel[k], pool.stride[k], 1, (p, p)), ins[0], n)
        elif layer.op == "pad":
            before, after = graph.pads[name].pairs(len(at[start]))[k]
            zone = (max(0, lo + before), max(0, hi + after), n)
        elif layer.op in CONV_TRANSPOSE_OPS or len(at[name]) != len(size):
            return None
        elif any(z[2] != n for z in ins):
            zone = (n, n, n)  # broadcast along the axis: every output reads every input
        else:
            zone = (lo, hi, n)
        zones[name] = (min(zone[0], n), min(zone[1], n), n)
    return zones


def _wraps(graph: Graph, name: str) -> bool:
    """Circular padding: an output at one end reads the other end too, so at a small length the cells it reads at
    both ends can be the same cells, where at a larger one they are not (no size where the zones are apart shows
    every border case; the generous bound stands)."""
    spec = graph.specs.get(name)
    pad = graph.pads.get(name)
    return (spec is not None and spec.padding_mode == "circular") or (pad is not None and pad.mode == "circular")


def _conv_zone(a: Axis, src: tuple[int, int, int], n: Optional[int] = None) -> tuple[int, int, int]:
    """A conv-like window on one axis (output o reads o·stride - pad[0] onward, `extent` cells) after a value with
    zones `src`: output o reads the left border unless o·stride - pad[0] >= src's left zone, and the right one
    unless its last cell lies before src's right zone.  `n`: the output length where it is not the conv's (a
    pooling's ceil mode)."""
    lo, hi, length = src
    n = a.out_len(length) if n is None else n
    left = -(-(lo + a.pad[0]) // a.stride)
    last = (length - hi - a.extent + a.pad[0]) // a.stride  # the last output inside the right zone's bound
    return max(0, left), max(0, n - 1 - last), n


def _runs_axis(graph: Graph, layers: Sequence[str], start: str, k: int, n: int, merged: ConvSpec) -> bool:
    return layers_run(graph, layers, start, _on_axis(merged, k, n), merged)


def _on_axis(merged: ConvSpec, k: int, n: int) -> tuple[int, ...]:
    """Length n on axis k, and on the others one well past the merged conv's reach (where they run and are apart)."""
    return tuple(n if i == k else 4 * (a.extent + sum(a.pad)) + 64 for i, a in enumerate(merged.axes))


def layer_sizes(graph: Graph, layers: Sequence[str], start: str, size: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """The spatial size of every value of a part when its input has `size` (a value missing: it cannot run)."""
    known: dict[str, tuple[int, ...]] = {start: tuple(size)}
    for name in layers:
        layer = graph.layers[name]
        if any(s not in known for s in layer.inputs):
            continue
        ins = [known[s] for s in layer.inputs]
        x = ins[0]
        if layer.op in CONV_OPS:
            spec = graph.specs[name]
            if not all(pad_fits(spec.padding_mode, a.pad, n) for a, n in zip(spec.axes, x)):
                continue
        elif layer.op == "pad":
            pad = graph.pads[name]
            mode = "zeros" if pad.mode == "constant" else pad.mode
            if not all(pad_fits(mode, p, n) for p, n in zip(pad.pairs(len(x)), x)):
                continue
        elif layer.op in JOIN_OPS and len(set(ins)) > 1:
            continue
        elif layer.op in POOL_OPS and graph.pools[name].size_problem(x) is not None:
            continue
        out = graph.out_size(layer, ins)
        if out is not None and all(n >= 1 for n in out):
            known[name] = out
    return known


def layers_run(graph: Graph, layers: Sequence[str], start: str, size: Sequence[int],
               merged: Optional[ConvSpec]) -> bool:
    """Whether PyTorch runs these layers (and the merged conv) on an input of this spatial size."""
    if merged is not None and not all(pad_fits(merged.padding_mode, a.pad, n) and a.out_len(n) >= 1
                                      for a, n in zip(merged.axes, size)):
        return False
    return not layers or layers[-1] in layer_sizes(graph, layers, start, size)


def chain_runs(convs: Sequence[Conv], k: int, n: int) -> bool:
    for c in convs:
        a = c.spec.axes[k]
        if not pad_fits(c.spec.padding_mode, a.pad, n):
            return False
        n = a.out_len(n)
        if n < 1:
            return False
    return True


def _first(ok: Callable[[int], bool], limit: int = 1 << 20) -> Optional[int]:
    """The least n >= 1 with ok(n), for ok monotone in n (layers that run at n run at n + 1)."""
    hi = 1
    while not ok(hi):
        hi *= 2
        if hi > limit:
            return None
    lo = hi // 2 + 1 if hi > 1 else 1
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


def storage_problem(rounding: float, dtype: torch.dtype) -> Optional[Why]:
    """A merge whose weights overflow or underflow their dtype would change the model: refuse it."""
    limit = ROUNDING_ULPS * torch.finfo(dtype).eps
    if rounding <= limit:
        return None
    name = str(dtype).removeprefix("torch.")
    off = "overflow" if rounding == float("inf") else f"are off by {rounding:.2g} (relative)"
    return Why.of("storage-rounding", dtype=name, off=off, ulps=ROUNDING_ULPS)

