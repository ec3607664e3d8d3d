"""Reduce part of a region (one value to another) to the one conv that can replace it, and say where
that conv is exact.

Every linear op is a conv (a value is a depthwise delta, a batch norm a depthwise 1x1 with a bias,
a pad a delta that pads, an average pooling a depthwise box), so a part of a region reduces by two
moves: compose a conv after what came before (the pair rules, rules.py) and join branches (joins.py).
Each move yields a `Check`: its verdict and reason and where it is exact, as a predicate on the
size of the part's *input* (every reduced conv reads that input, so all checks speak of one size).
The part is exact where all its checks hold.  The conv is the forced candidate even where it is not
exact: that is what a counterexample is measured against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from itertools import product
from typing import Callable, Optional, Sequence

import torch

from ..ops import affine
from . import algebra
from ..maths import joins
from .. import ops
from .algebra import Conv
from ..graph import CONV_OPS, JOIN_OPS, POOL_OPS, Graph
from ..maths.reasons import Outcome, Why
from .reference import Params
from ..maths.rules import MAX_SIZES, Verdict, describe_sizes, full_support
from ..maths.spec import AXIS_NAMES, PoolSpec

__all__ = ["Check", "Reducer", "Reduction", "reduce_part", "combine"]


@dataclass(frozen=True)
class Check:
    """One move of a reduction: its verdict, and where it is exact as a function of the input size."""

    first: str  # the value the move starts from (for reasons: "first -> second: ...")
    second: str  # the layer it takes in
    verdict: Outcome
    why: Optional[Why]
    sizes: Optional[str]
    exact_at: Callable[[Sequence[int]], bool] = field(repr=False, compare=False)
    axis_ok: Callable[[int, int], Optional[bool]] = field(repr=False, compare=False)
    period: tuple[int, ...] = ()
    start: tuple[int, ...] = ()
    notes: tuple[Why, ...] = ()
    weight_dependent: bool = False
    tolerance: float = 0.0  # relative error the merge may show: the rounding of a stored pad value it equates


@dataclass(frozen=True)
class Reduction:
    """A part of a region as one conv (float64), and the checks that say where it equals the part."""

    conv: Optional[Conv]  # None: the branches share no output grid, so there is no candidate
    checks: tuple[Check, ...]

    @cached_property
    def summary(self) -> "Summary":
        return combine(self.checks)


@dataclass(frozen=True)
class Summary:
    verdict: Outcome
    why: Why
    sizes: Optional[str]
    notes: tuple[Why, ...]
    weight_dependent: bool


class Reducer:
    """Reduces the layers after one value, one layer at a time (planning extends a segment step by step)."""

    def __init__(self, graph: Graph, params: Params, start: str, channels: int, ndim: int) -> None:
        self.graph, self.params, self.start, self.channels, self.ndim = graph, params, start, channels, ndim
        self.parts: dict[str, tuple[Optional[Conv], tuple[Check, ...]]] = {start: (None, ())}

    def add(self, name: str) -> None:
        """Take in one layer whose inputs are already reduced (layers come in graph order)."""
        layer = self.graph.layers[name]
        if layer.op in JOIN_OPS:
            self.parts[name] = _join(self.graph, name, [self.parts[s] for s in layer.inputs], layer.inputs,
                                     self.channels, self.ndim)
            return
        conv, checks = self.parts[layer.inputs[0]]
        if conv is None and checks:  # a branch that already has no candidate
            self.parts[name] = (None, checks)
            return
        new, check = _step(self.graph, self.params, name, layer.inputs[0], conv, self.channels, self.ndim)
        self.parts[name] = self._through_pad(name, (new, checks + ((check,) if check else ())))

    def _through_pad(self, name: str, stepwise: tuple[Optional[Conv], tuple[Check, ...]]) -> tuple[
            Optional[Conv], tuple[Check, ...]]:
        """A conv after a zero pad, judged with its zero border taps trimmed first (as a pair is): the pad and the
        conv as one conv, then what came before the pad.  A border the conv's nonzero taps never read (a zero
        kernel row) is then no border at all.  Taken where it says more than judging the pad on its own."""
        graph, pad = self.graph, self.graph.layers[name].inputs[0]
        if graph.layers[name].op not in CONV_OPS or pad not in graph.pads or pad == self.start:
            return stepwise
        before = graph.layers[pad].inputs[0]
        m, checks = self.parts[before]
        conv = self.params.conv(name)
        value = self.params.pad_value(pad)
        if m is None or graph.pads[pad].mode != "constant" or graph.pads[pad].value != 0 or \
                (value is not None and bool(torch.any(value != 0))) or algebra.support(conv.weight) == full_support(conv.spec):
            return stepwise
        delta = algebra.pad_conv(graph.pads[pad].pairs(self.ndim), "constant", m.spec.out_channels)
        k, inner = _compose(delta, conv, pad, name, self.channels, self.ndim)
        new, outer = _compose(m, k, before, name, self.channels, self.ndim)
        joined = checks + tuple(c for c in (inner, outer) if c is not None)
        if _rank(combine(joined).verdict) >= _rank(combine(stepwise[1]).verdict):
            return stepwise
        note = Why.of("weights-decide", detail="zero border taps in the kernels",
                      generic=f"'{combine(stepwise[1]).verdict.value}'")
        return new, joined[:-1] + (replace(joined[-1], notes=joined[-1].notes + (note,), weight_dependent=True),)

    def result(self, end: str) -> Reduction:
        conv, checks = self.parts[end]
        if conv is None and not checks:
            conv = algebra.identity(self.channels, self.ndim)
        return Reduction(conv, checks)


def reduce_part(graph: Graph, params: Params, start: str, channels: int, ndim: int, layers: Sequence[str],
                end: str) -> Reduction:
    """The conv computing `end` from `start` (`layers` lie between them, in graph order)."""
    reducer = Reducer(graph, params, start, channels, ndim)
    for name in layers:
        reducer.add(name)
    return reducer.result(end)


def _step(graph: Graph, params: Params, name: str, before: str, m: Optional[Conv], channels: int,
          ndim: int) -> tuple[Optional[Conv], Optional[Check]]:
    """`m` (None: the start value itself) followed by the single-input layer `name`."""
    op = graph.layers[name].op
    if ops.kind(op) is ops.Kind.PASS:
        return m, None
    if ops.kind(op) is ops.Kind.AFFINE:
        bn = params.bn(name)
        return (algebra.bn_conv(bn, ndim) if m is None else algebra.fold_bn(m, bn)), None
    c = m.spec.out_channels if m is not None else channels
    if op in CONV_OPS:
        return _compose(m, params.conv(name), before, name, channels, ndim)
    if op in POOL_OPS:
        pool = graph.pools[name]
        new, check = _compose(m, algebra.pool_conv(pool, c), before, name, channels, ndim)
        return new, _pool_runs(name, before, pool, m, _pool_check(name, before, pool, m, check))
    pad = graph.pads[name]
    value = params.pad_value(name)
    value = value.double() if value is not None else torch.tensor(pad.value, dtype=torch.float64)
    delta = algebra.pad_conv(pad.pairs(ndim), pad.mode, c)
    if pad.mode != "constant" or not bool(torch.any(value != 0)):
        return _compose(m, delta, before, name, channels, ndim)
    # pad(y, v) = zero-pad(y - v) + v: exact where what comes before gives v on a zero input.  A value
    # stored in a dtype (DBB computes it from the batch norm, in float32) equals that response up to
    # its rounding: such a merge is exact to that rounding, and verified to it.  The rounding is that of
    # the terms (`bias - mean * weight / sqrt(var + eps)` may nearly cancel), so it is measured against
    # the largest of them in the layer, not against each channel's result.
    before_conv = m if m is not None else algebra.identity(c, ndim)
    bias = before_conv.bias.double() if before_conv.bias is not None else torch.zeros(c, dtype=torch.float64)
    eps = torch.finfo(params.pad_value_dtype(name)).eps
    diff = bias - value
    close = diff.abs() <= 16 * eps * max(float(bias.abs().max()), float(value.abs().max()))
    shifted = algebra.shift_bias(before_conv, -value)
    if bool(torch.any(close & (diff != 0))):
        shifted = Conv(shifted.spec, shifted.weight, torch.where(close, torch.zeros_like(diff), diff))
    new, check = _compose(shifted, delta, before, name, channels, ndim, track_weights=False)
    if check is not None and check.why is not None and check.why.kind == "bias-meets-padding":
        shown = f"{float(value):g}" if value.numel() == 1 else "per-channel values"
        check = replace(check, why=Why.of("pad-value", layer=name, value=shown))
    elif check is not None and bool(torch.any(close & (diff != 0))):
        check = replace(check, tolerance=64 * eps)
    return algebra.shift_bias(new, value), check


def _compose(m: Optional[Conv], b: Conv, before: str, name: str, channels: int, ndim: int,
             track_weights: bool = True) -> tuple[Conv, Optional[Check]]:
    if m is None:
        return b, None
    v = algebra.analyze(m, b, weight_dependence=track_weights)
    return algebra.merge(m, b, v.candidate), _pair_check(before, name, v)


def _pair_check(first: str, second: str, v: Verdict) -> Check:
    an = v.analysis
    return Check(first, second, v.verdict, v.why, v.sizes, v.exact_at, an.axis_exact_alone,
                 tuple(an.period), tuple(an.start), v.notes, v.weight_dependent)


def _pool_check(name: str, before: str, pool: PoolSpec, m: Optional[Conv], composed: Optional[Check]) -> Optional[Check]:
    """Average pooling is a conv only where every window has the same divisor."""
    nd = pool.ndim
    if not pool.count_include_pad and pool.divisor_override is None and any(pool.padding):
        why = Why.of("pool-excludes-padding", layer=name)
        return Check(before, name, Outcome.UNMERGEABLE, why, None, lambda size: False, lambda k, n: False,
                     (1,) * nd, (1,) * nd)
    if not pool.ceil_mode:
        return composed

    def pool_in(k: int, n: int) -> int:  # the pooling's input length when the part's input has length n
        return m.spec.axes[k].out_len(n) if m is not None else n

    def fits(k: int, n: int) -> bool:  # ceil mode adds no (partial) window: it changes nothing
        m = pool_in(k, n)
        return pool.out_len(k, m) == max(0, (m + 2 * pool.padding[k] - pool.kernel[k]) // pool.stride[k] + 1)

    period = tuple((m.spec.axes[k].stride if m is not None else 1) * pool.stride[k] for k in range(nd))
    start = tuple(pool.kernel[k] + 2 * (m.spec.axes[k].extent + sum(m.spec.axes[k].pad) if m is not None else 0) + 2
                  for k in range(nd))
    if all(fits(k, n) for k in range(nd) for n in range(1, start[k] + period[k])):
        return composed
    why = Why.of("pool-ceil-mode", layer=name, axis=" and ".join(_axis_names(nd)))
    ceil = Check(before, name, Outcome.SIZE_DEPENDENT, why, None,
                 lambda size: all(fits(k, n) for k, n in enumerate(size)), fits, period, start)
    ceil = replace(ceil, sizes=_sizes_words(ceil, nd, _axis_names(nd)))
    return _both(composed, ceil)


def _pool_runs(name: str, before: str, pool: PoolSpec, m: Optional[Conv], check: Optional[Check]) -> Optional[Check]:
    """Sizes where PyTorch refuses the pooling (avg_pool3d on an input smaller than its kernel) are no sizes of
    the part: never exact there, undefined for the words, so nothing verifies or names them."""
    nd = pool.ndim
    if all(pool.least_input(k) == 1 for k in range(nd)):
        return check

    def runs(k: int, n: int) -> bool:
        return (m.spec.axes[k].out_len(n) if m is not None else n) >= pool.least_input(k)

    first = [next(n for n in range(1, MAX_SIZES + 2) if runs(k, n) or n > MAX_SIZES) for k in range(nd)]
    base = check or Check(before, name, Outcome.MERGEABLE, None, None, lambda size: True, lambda k, n: True,
                          (1,) * nd, (1,) * nd)
    return replace(base, exact_at=lambda size: all(runs(k, n) for k, n in enumerate(size)) and base.exact_at(size),
                   axis_ok=lambda k, n: base.axis_ok(k, n) if runs(k, n) else None,
                   start=tuple(max(a, b + 1) for a, b in zip(base.start, first)))


def _both(a: Optional[Check], b: Check) -> Check:
    """Two checks on one move as one (the pooling's own condition, then the composition's)."""
    if a is None:
        return b
    worst = a if _rank(a.verdict) >= _rank(b.verdict) else b
    return Check(a.first, a.second, worst.verdict, worst.why, worst.sizes,
                 lambda size: a.exact_at(size) and b.exact_at(size),
                 lambda k, n: _and(a.axis_ok(k, n), b.axis_ok(k, n)),
                 tuple(math.lcm(p, q) for p, q in zip(a.period, b.period)),
                 tuple(max(p, q) for p, q in zip(a.start, b.start)), a.notes + b.notes,
                 a.weight_dependent or b.weight_dependent)


def _join(graph: Graph, name: str, parts: list[tuple[Optional[Conv], tuple[Check, ...]]], inputs: Sequence[str],
          channels: int, ndim: int) -> tuple[Optional[Conv], tuple[Check, ...]]:
    checks: list[Check] = []
    for _, cs in parts:
        checks += [c for c in cs if not any(c is d for d in checks)]
    if any(conv is None and cs for conv, cs in parts):
        return None, tuple(checks)
    convs = [conv if conv is not None else algebra.identity(channels, ndim) for conv, _ in parts]
    if graph.layers[name].op == "sub":
        convs[1] = affine.negated(convs[1])
    concat = graph.layers[name].op == "concat"
    j = joins.decide_join([c.spec for c in convs], [algebra.support(c.weight) for c in convs], list(inputs), concat)
    start = tuple(joins.periodic_from(j.candidate, k) if j.candidate else 1 for k in range(ndim))
    period = tuple(convs[0].spec.stride)
    why = j.why or Why.of("region-exact")
    check = Check(inputs[0], name, j.verdict, why, None, j.exact_at, j.axis_ok, period, start, j.notes)
    if j.verdict is Outcome.SIZE_DEPENDENT:
        check = replace(check, sizes=_sizes_words(check, ndim, convs[0].spec.axis_names))
    if j.candidate is None:
        return None, tuple(checks) + (check,)
    return algebra.join(convs, j.candidate, j.offsets, concat), tuple(checks) + (check,)


def combine(checks: Sequence[Check]) -> Summary:
    """The verdict of a whole reduction: every move must hold, at every size or at some."""
    notes = tuple(n for c in checks for n in c.notes)
    dependent = any(c.weight_dependent for c in checks)
    if not checks:
        return Summary(Outcome.MERGEABLE, Why.of("chain-exact"), None, (), False)
    if len(checks) == 1:
        c = checks[0]
        return Summary(c.verdict, c.why or Why.of("chain-exact"), c.sizes, notes, dependent)
    failing = [c for c in checks if c.verdict is not Outcome.MERGEABLE]
    if not failing:
        joined = any(c.why is not None and c.why.kind == "region-exact" for c in checks)
        return Summary(Outcome.MERGEABLE, Why.of("region-exact" if joined else "chain-exact"), None, notes, dependent)
    worst = next((c for c in failing if c.verdict in (Outcome.UNMERGEABLE, Outcome.UNDECIDED)), None)
    first = worst or failing[0]
    why = first.why if first.why is None or first.verdict is Outcome.UNDECIDED else \
        Why.of("step", first=first.first, second=first.second, detail=first.why.text())
    if worst is not None:
        return Summary(worst.verdict, why, None, notes, dependent)  # type: ignore[arg-type]
    nd = len(failing[0].period)
    merged = _Merged(checks)
    if any(not any(merged.axis_ok(k, n) for n in range(1, merged.start[k] + merged.period[k])) for k in range(nd)):
        # No length of some axis works while the others are large; the borders of small axes can still
        # meet so that every check holds (a 1x1 input): those sizes are named, not hidden.
        tiny = [size for size in product(range(1, 9), repeat=nd) if all(c.exact_at(size) for c in checks)]
        if not tiny:
            return Summary(Outcome.UNMERGEABLE, why, None, notes, dependent)  # type: ignore[arg-type]
        shown = " or ".join("x".join(map(str, size)) for size in tiny[:3]) + (" ..." if len(tiny) > 3 else "")
        words = f"{'x'.join(_axis_names(nd))} is {shown}"
        return Summary(Outcome.SIZE_DEPENDENT, why, words, notes, dependent)  # type: ignore[arg-type]
    sizes = _sizes_words(merged, nd, _axis_names(nd))
    return Summary(Outcome.SIZE_DEPENDENT, why, sizes, notes, dependent)  # type: ignore[arg-type]


class _Merged:
    """Several checks' size conditions as one (for the sizes sentence of a whole reduction)."""

    def __init__(self, checks: Sequence[Check]) -> None:
        self.checks = [c for c in checks if c.period]
        nd = len(self.checks[0].period)
        self.period = tuple(math.lcm(*(c.period[k] for c in self.checks)) for k in range(nd))
        self.start = tuple(min(MAX_SIZES, max(c.start[k] for c in self.checks)) for k in range(nd))

    def axis_ok(self, k: int, n: int) -> Optional[bool]:
        out: Optional[bool] = True
        for c in self.checks:
            out = _and(out, c.axis_ok(k, n))
        return out


def _sizes_words(check, nd: int, names: Sequence[str]) -> str:
    parts = []
    for k in range(nd):
        bound = min(check.start[k] + check.period[k], MAX_SIZES)
        ok = {n: check.axis_ok(k, n) for n in range(1, bound)}
        if all(v is not False for v in ok.values()):
            continue
        parts.append(describe_sizes(names[k], ok, min(check.start[k], bound - 1), check.period[k]))
    return " and ".join(parts) if parts else "the sizes of different axes fit together"


def _axis_names(nd: int) -> tuple[str, ...]:
    return AXIS_NAMES[nd]


def _and(a: Optional[bool], b: Optional[bool]) -> Optional[bool]:
    if a is False or b is False:
        return False
    if a is None or b is None:
        return None
    return True


def _rank(v: Outcome) -> int:
    return {Outcome.MERGEABLE: 0, Outcome.SIZE_DEPENDENT: 1, Outcome.UNMERGEABLE: 2, Outcome.UNDECIDED: 3}[v]
