"""When is conv2(conv1(x)) one convolution?  Decided on hyperparameters and kernel supports.

The candidate single conv is forced (DESIGN.md, rule 8): stride s1*s2, the kernels convolved,
padding l1 + s1*l2.  It differs from the pair only at the borders, where the pair pads the
*intermediate* while the candidate sees what conv1 would have computed there.  We apply the
master rule literally: for every output o, every nonzero tap c of conv2 and a of conv1, the
input cell the pair uses (after both paddings) must be the cell the candidate uses, or both
must be zero.  With generic weights that is exact (each (c, a) is its own monomial W2[c]W1[a]);
the one place where actual numbers matter, conv1's bias meeting conv2's zero padding, is a
predicate the caller supplies (`BiasCheck`).

Only border outputs are enumerated, so a size costs O(border x taps), whatever the size.  Past
a bound that the kernels, paddings and strides fix, an axis behaves periodically in the size
with period s1*s2, so "every size" is decided by a finite enumeration, not by trusting closed
forms; the closed forms of DESIGN.md are what the tests check this against.

Long because it is the master rule and its closed forms for one pair, which share the per-axis enumeration and
are read side by side with docs/design.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import product
from typing import Callable, Optional, Sequence

from .reasons import Outcome, Why, sentence
from .spec import Axis, ConvSpec, pad_fits

Support = tuple[tuple[int, ...], ...]
"""Per axis, the kernel tap indices whose slice holds a nonzero (sorted)."""

BiasCheck = Callable[[tuple[tuple[int, ...], ...]], bool]
"""Given, per axis, the conv2 taps that read inside the intermediate at one output, say whether
conv1's bias reaching the other (zero-padded) taps cancels (True) or shows (False)."""

EQ, NE, PZ, CZ, ZZ = "EQ", "NE", "PZ", "CZ", "ZZ"
MAX_SIZES = 600
"""Sizes per axis that deciding 'every size' may enumerate (a few ms each); beyond it: 'undecided'."""
_ZERO = None


@dataclass(frozen=True)
class AxisView:
    """What one axis does at one input length."""

    types: frozenset[str]  # kinds of (o, c, a) triples: equal cells, different, zero on one side...
    fails: frozenset[str]  # sides ('left', 'right') with a triple that differs on its own
    inside_sets: frozenset[tuple[int, ...]]  # conv2 taps reading the intermediate, per output
    limit: bool = False  # the pair runs here but PyTorch refuses the candidate's padding (reflect/circular)


@dataclass(frozen=True)
class Verdict:
    """The decision for one pair (or a merged conv and the next one), with its reason as data."""

    verdict: Outcome
    why: Why
    sizes: Optional[str]  # for size-dependent: which sizes, in words
    candidate: ConvSpec
    analysis: "Analysis" = field(repr=False, compare=False)
    notes: tuple[Why, ...] = ()
    weight_dependent: bool = False  # the verdict holds only because of these weights (zero bias, zero taps)

    @property
    def reason(self) -> str:
        return sentence(self.verdict, self.why, self.sizes, self.notes)

    def exact_at(self, size: Sequence[int]) -> bool:
        return self.analysis.exact_at(size)


def merged_mode(spec1: ConvSpec, spec2: ConvSpec, sup1: Support, sup2: Support) -> str:
    """conv1's mode if conv2 reads no padding, conv2's if conv1 reads none, the common one, or zeros."""
    reads2, reads1 = reads_padding(spec2, sup2), reads_padding(spec1, sup1)
    if not reads2:
        return spec1.padding_mode if reads1 else "zeros"
    if not reads1:
        return spec2.padding_mode
    return spec1.padding_mode if spec1.padding_mode == spec2.padding_mode else "zeros"


def candidate(spec1: ConvSpec, spec2: ConvSpec, sup1: Support, sup2: Support) -> ConvSpec:
    """The only single conv that can equal the pair (zero border taps trimmed while pads allow)."""
    axes = []
    for a1, a2, t1, t2 in zip(spec1.axes, spec2.axes, sup1, sup2):
        extent = a1.extent + a1.stride * (a2.extent - 1)
        lo, hi = a1.pad[0] + a1.stride * a2.pad[0], a1.pad[1] + a1.stride * a2.pad[1]
        if t1 and t2:  # zero border taps of the merged kernel are dropped, never below pad 0
            cut_lo = min(a1.dilation * t1[0] + a1.stride * a2.dilation * t2[0], lo)
            cut_hi = min(
                a1.dilation * (a1.kernel - 1 - t1[-1]) + a1.stride * a2.dilation * (a2.kernel - 1 - t2[-1]), hi
            )
        else:
            cut_lo = cut_hi = 0
        axes.append(Axis(extent - cut_lo - cut_hi, a1.stride * a2.stride, 1, (lo - cut_lo, hi - cut_hi)))
    mode = merged_mode(spec1, spec2, sup1, sup2)
    if all(a.pad == (0, 0) for a in axes):
        mode = "zeros"
    return ConvSpec(
        tuple(axes),
        spec1.in_channels,
        spec2.out_channels,
        math.gcd(spec1.groups, spec2.groups),
        mode,
        spec1.bias or spec2.bias,
    )


class Analysis:
    """The per-axis enumeration behind a verdict; answers exactness at any size."""

    def __init__(
        self, spec1: ConvSpec, spec2: ConvSpec, sup1: Support, sup2: Support, bias_ok: Optional[BiasCheck]
    ) -> None:
        if spec1.ndim != spec2.ndim or spec1.out_channels != spec2.in_channels:
            raise ValueError("conv2 does not take conv1's output: dimensions or channels differ")
        self.spec1, self.spec2, self.sup1, self.sup2 = spec1, spec2, sup1, sup2
        self.cand = candidate(spec1, spec2, sup1, sup2)
        self.bias_ok = bias_ok if spec2.padding_mode == "zeros" else None
        self.period = [a1.stride * a2.stride for a1, a2 in zip(spec1.axes, spec2.axes)]
        self.start = [_periodic_from(a1, a2, am) for a1, a2, am in zip(spec1.axes, spec2.axes, self.cand.axes)]
        self._views: list[Optional[tuple[Optional[AxisView], ...]]] = [None] * spec1.ndim

    def view(self, k: int, n: int) -> Optional[AxisView]:
        """Axis k at input length n; None where the pair is undefined there."""
        if self._views[k] is None:  # every length the verdict reads, fetched with one cache lookup
            self._views[k] = _axis_views(*self._axis_key(k), self.start[k] + self.period[k] - 1)
        views = self._views[k]
        return views[n - 1] if 1 <= n <= len(views) else axis_view(*self._axis_key(k), n)  # type: ignore[arg-type]

    def _axis_key(self, k: int) -> tuple:
        s1, s2 = self.spec1, self.spec2
        return (s1.axes[k], s2.axes[k], self.cand.axes[k], (s1.padding_mode, s2.padding_mode, self.cand.padding_mode),
                self.sup1[k], self.sup2[k])

    def sizes(self, k: int) -> range:
        """Input lengths that represent every length of axis k (the tail repeats with the period)."""
        return range(1, self.start[k] + self.period[k])

    def combo_exact(self, views: Sequence[AxisView]) -> bool:
        if any(v.limit for v in views):
            return False
        if not _x_exact([v.types for v in views]):
            return False
        if self.bias_ok is None:
            return True
        full = tuple(self.sup2)
        for sets in product(*[v.inside_sets for v in views]):
            if sets != full and not self.bias_ok(sets):
                return False
        return True

    def exact_at(self, size: Sequence[int]) -> bool:
        """Whether the candidate equals the pair at this input size (False where undefined)."""
        if len(size) != self.spec1.ndim:
            raise ValueError(f"size {list(size)} has {len(size)} axes; the convs have {self.spec1.ndim}")
        views = [self.view(k, n) for k, n in enumerate(size)]
        if any(v is None for v in views):
            return False
        return self.combo_exact(views)  # type: ignore[arg-type]

    def axis_exact_alone(self, k: int, n: int) -> Optional[bool]:
        """Axis k at length n while every other axis is large; None where undefined."""
        v = self.view(k, n)
        if v is None or v.limit:
            return None
        if not v.types <= {EQ, ZZ}:
            return False
        if self.bias_ok is None:
            return True
        full = list(self.sup2)
        for s in v.inside_sets:
            sets = tuple(full[:k] + [s] + full[k + 1:])
            if sets != tuple(full) and not self.bias_ok(sets):
                return False
        return True


@lru_cache(maxsize=1 << 12)
def _axis_views(a1: Axis, a2: Axis, am: Axis, modes: tuple[str, str, str], t1: tuple[int, ...], t2: tuple[int, ...],
                count: int) -> tuple[Optional[AxisView], ...]:
    """axis_view at lengths 1..count."""
    return tuple(axis_view(a1, a2, am, modes, t1, t2, n) for n in range(1, count + 1))


@lru_cache(maxsize=1 << 12)
def _signature(a1: Axis, a2: Axis, am: Axis, modes: tuple[str, str, str], t1: tuple[int, ...], t2: tuple[int, ...],
               count: int) -> tuple[AxisView, ...]:
    """The distinct behaviours of one axis over lengths 1..count (where the pair and the candidate run)."""
    sig: dict = {}
    for v in _axis_views(a1, a2, am, modes, t1, t2, count):
        if v is not None and not v.limit:
            sig.setdefault((v.types, v.inside_sets), v)
    return tuple(sig.values())


@lru_cache(maxsize=1 << 16)
def axis_view(
    a1: Axis, a2: Axis, am: Axis, modes: tuple[str, str, str], t1: tuple[int, ...], t2: tuple[int, ...], n: int
) -> Optional[AxisView]:
    """Classify every (output, conv2 tap, conv1 tap) triple at the borders of one axis.

    Cached: every argument is a value, and real networks repeat the same conv shapes many times.
    """
    mode1, mode2, modem = modes
    if not pad_fits(mode1, a1.pad, n):
        return None
    n1 = a1.out_len(n)
    if n1 < 1 or not pad_fits(mode2, a2.pad, n1):
        return None
    n2 = a2.out_len(n1)
    if n2 < 1:
        return None
    if not pad_fits(modem, am.pad, n):
        return AxisView(frozenset(), frozenset(), frozenset(), limit=True)
    if not t2:
        return AxisView(frozenset(), frozenset(), frozenset())
    s1, d1, l1 = a1.stride, a1.dilation, a1.pad[0]
    s2, d2, l2 = a2.stride, a2.dilation, a2.pad[0]
    # Outputs whose every read lies inside the intermediate and the input are all equal cells.  A zero
    # conv1 (no taps) reads no input, but conv2 still pads its bias: the inside sets still count.
    p_lo = max(0, _ceil_div(l1 - d1 * t1[0], s1)) if t1 else 0
    o_first = max(0, _ceil_div(p_lo + l2 - d2 * t2[0], s2))
    p_hi = min(n1 - 1, (n - 1 + l1 - d1 * t1[-1]) // s1) if t1 else n1 - 1
    o_last = min(n2 - 1, (p_hi + l2 - d2 * t2[-1]) // s2)
    types: set[str] = set()
    fails: set[str] = set()
    inside: set[tuple[int, ...]] = set()
    if o_first <= o_last:
        types.add(EQ)
        inside.add(t2)
    border = list(range(0, min(o_first, n2))) + list(range(max(o_last + 1, min(o_first, n2)), n2))
    for o in border:
        inside_taps = []
        for c in t2:
            p = s2 * o + d2 * c - l2
            if 0 <= p < n1:
                pp = p
                inside_taps.append(c)
            else:
                pp = padded_cell(mode2, p, n1)
            for a in t1:
                j = s1 * p - l1 + d1 * a
                cand = padded_cell(modem, j, n)
                pair = _ZERO if pp is _ZERO else padded_cell(mode1, s1 * pp - l1 + d1 * a, n)
                kind = _kind(pair, cand)
                types.add(kind)
                if kind in (NE, PZ, CZ):
                    fails.add("left" if p < 0 or (p < n1 and j < 0) else "right")
        inside.add(tuple(inside_taps))
    return AxisView(frozenset(types), frozenset(fails), frozenset(inside))


def decide(
    spec1: ConvSpec, spec2: ConvSpec, sup1: Support, sup2: Support, bias_ok: Optional[BiasCheck] = None
) -> Verdict:
    """Mergeable at every size, at some sizes, or at none; with the reason as data (`Verdict.why`)."""
    an = Analysis(spec1, spec2, sup1, sup2, bias_ok)
    longest = max((an.start[k] + an.period[k] for k in range(spec1.ndim)), default=0)
    if longest > MAX_SIZES:
        return Verdict(Outcome.UNDECIDED, Why.of("undecided", sizes=longest, limit=MAX_SIZES), None, an.cand, an)
    verdict = _classify(an)
    sizes = _sizes_sentence(an) if verdict is Outcome.SIZE_DEPENDENT else None
    bias_blocks = an.bias_ok is not None and verdict is not Outcome.MERGEABLE and (
        _classify(Analysis(spec1, spec2, sup1, sup2, None)) != verdict
    )
    return Verdict(verdict, _why(an, verdict, bias_blocks), sizes, an.cand, an, _limit_notes(an))


def _classify(an: Analysis) -> Outcome:
    """Sizes where PyTorch refuses only the candidate's padding do not count against the merge (issue: a
    circular 'same' pair is one conv wherever PyTorch can run that conv)."""
    signatures = [_signature(*an._axis_key(k), an.start[k] + an.period[k] - 1) for k in range(an.spec1.ndim)]
    outcomes = {an.combo_exact(views) for views in product(*signatures)}
    if outcomes == {True}:
        return Outcome.MERGEABLE
    return Outcome.SIZE_DEPENDENT if True in outcomes else Outcome.UNMERGEABLE


def _limit_notes(an: Analysis) -> tuple[Why, ...]:
    """Where the layers run at sizes that PyTorch refuses for the candidate's reflect/circular padding."""
    notes = []
    mode = an.cand.padding_mode
    for k, name in enumerate(an.spec1.axis_names):
        limited = [n for n in an.sizes(k) if (v := an.view(k, n)) is not None and v.limit]
        if not limited:
            continue
        pad = max(an.cand.axes[k].pad)
        rule = "reflect padding must be smaller than the input" if mode == "reflect" else \
            "circular padding may not exceed the input"
        notes.append(Why.of("pytorch-pad-limit", mode=mode, pad=pad, axis=name, least=max(limited) + 1, rule=rule,
                            smallest=min(limited)))
    return tuple(notes)


def side_conditions(v: Verdict, size: Optional[Sequence[int]] = None) -> list[dict]:
    """Per axis and side: both paddings, the least conv1 padding that suffices, and whether it holds.

    `holds` is judged at `size` when given, else over every size (the axis on its own).
    """
    an = v.analysis
    rows = []
    for k, name in enumerate(an.spec1.axis_names):
        ns = [size[k]] if size else list(an.sizes(k))
        views = [an.view(k, n) for n in ns]
        for i, where in enumerate(("left", "right")):
            zeros = an.spec1.padding_mode == an.spec2.padding_mode == "zeros"
            need = _pad_needed(an, k, where) if zeros else None
            rows.append({
                "axis": name, "side": where,
                "conv1_pad": an.spec1.axes[k].pad[i], "conv2_pad": an.spec2.axes[k].pad[i],
                "conv1_pad_needed": need,
                "conv2_reads_padding": _eff_pad(an.spec2.axes[k], an.sup2[k])[i] > 0,
                "holds": all(w is None or where not in w.fails for w in views),
            })
    return rows


def an_views(an: Analysis, k: int) -> list[Optional[AxisView]]:
    return [an.view(k, n) for n in an.sizes(k)]


def reads_padding(spec: ConvSpec, sup: Support) -> bool:
    """Whether a conv ever reads a padded cell (at some input size) through a nonzero tap."""
    return any(_eff_pad(a, s) != (0, 0) for a, s in zip(spec.axes, sup))


def full_support(spec: ConvSpec) -> Support:
    """The support of a kernel with no zero slices (what hyperparameters alone can say)."""
    return tuple(tuple(range(a.kernel)) for a in spec.axes)


# --- reasons -------------------------------------------------------------------------------


def _why(an: Analysis, verdict: Outcome, bias_blocks: bool) -> Why:
    s1, s2 = an.spec1, an.spec2
    if verdict is Outcome.MERGEABLE:
        if s1.ndim == 0:
            return Why.of("linear-product")
        if not any(an.sup1) or not any(an.sup2):
            return Why.of("zero-kernel", which="conv1" if not all(an.sup1) else "conv2")
        if not reads_padding(s2, an.sup2):
            return Why.of("no-padding-read")
        if s2.padding_mode != "zeros" and _pointwise(s1, an.sup1):
            return Why.of("pointwise-commutes", mode=s2.padding_mode)
        return Why.of("padding-covers")
    side = _bias_side(an) if bias_blocks else _failing_side(an)
    if side is None:
        return Why.of("corners")
    k, where = side
    ax = s1.axis_names[k]
    if bias_blocks:
        return Why.of("bias-meets-padding", side=where, axis=ax)
    if s1.padding_mode == "zeros" and s2.padding_mode == "zeros":
        pad1 = s1.axes[k].pad[0 if where == "left" else 1]
        pad2 = s2.axes[k].pad[0 if where == "left" else 1]
        need = _pad_needed(an, k, where, pad1 + 1)
        if need is not None:
            return Why.of("padding-too-short", pad1=pad1, side=where, axis=ax, need=need, pad2=pad2)
        return Why.of("padding-hides", side=where, axis=ax)
    return Why.of("modes-differ", mode2=s2.padding_mode, side=where, axis=ax, modem=an.cand.padding_mode,
                  mode1=s1.padding_mode)


def _bias_side(an: Analysis) -> Optional[tuple[int, str]]:
    """An axis and side where conv2's zero padding cuts off conv1's bias."""
    full = list(an.sup2)
    for k in range(an.spec1.ndim):
        for n in reversed(an.sizes(k)):
            v = an.view(k, n)
            for inside in (v.inside_sets if v is not None else ()):
                sets = tuple(full[:k] + [inside] + full[k + 1:])
                if sets != tuple(full) and an.bias_ok is not None and not an.bias_ok(sets):
                    return k, "left" if not inside or inside[0] != full[k][0] else "right"
    return None


def _failing_side(an: Analysis) -> Optional[tuple[int, str]]:
    """First axis and side that differ on their own, preferring the periodic tail (large sizes)."""
    found = None
    for k in range(an.spec1.ndim):
        for n in reversed(an.sizes(k)):
            v = an.view(k, n)
            if v is not None and v.fails:
                side = "left" if "left" in v.fails else "right"
                if n >= an.start[k]:
                    return k, side
                found = found or (k, side)
    return found


def _pad_needed(an: Analysis, k: int, where: str, start: int = 0) -> Optional[int]:
    """The least conv1 padding >= start on this side that makes the side exact at every size (searched)."""
    a1 = an.spec1.axes[k]
    for pad_side in range(start, max(a1.pad) + a1.extent + a1.stride + 2):
        pad = (pad_side, a1.pad[1]) if where == "left" else (a1.pad[0], pad_side)
        axes = list(an.spec1.axes)
        axes[k] = Axis(a1.kernel, a1.stride, a1.dilation, pad)
        spec1 = ConvSpec(tuple(axes), an.spec1.in_channels, an.spec1.out_channels, an.spec1.groups,
                         an.spec1.padding_mode, an.spec1.bias)
        trial = Analysis(spec1, an.spec2, an.sup1, an.sup2, None)
        if all(where not in (v or _NO_FAIL).fails for v in an_views(trial, k)):
            return pad_side
    return None


_NO_FAIL = AxisView(frozenset(), frozenset(), frozenset())


def _sizes_sentence(an: Analysis) -> str:
    parts = []
    for k in range(an.spec1.ndim):
        ok = {n: an.axis_exact_alone(k, n) for n in an.sizes(k)}
        if all(v is not False for v in ok.values()):
            continue
        parts.append(describe_sizes(an.spec1.axis_names[k], ok, an.start[k], an.period[k]))
    return " and ".join(parts) if parts else "the sizes of different axes fit together"


def describe_sizes(name: str, ok: dict[int, Optional[bool]], start: int, period: int) -> str:
    """Words for a set of lengths that is periodic from `start` on (None: the pair is undefined)."""
    tail = {n % period for n in range(start, start + period) if ok.get(n)}
    period, tail = _shortest_period(period, tail)
    rule = _residue_words(name, period, tail)

    def follows(n: int) -> bool:
        return (n % period) in tail

    extra = sorted(n for n, v in ok.items() if n < start and v and not follows(n))
    missing = sorted(n for n, v in ok.items() if n < start and v is False and follows(n))
    if rule is None:
        return f"{name} is {_list_words(extra)}" if extra else f"{name} fits no size"
    words = rule
    if missing:
        low = [n for n in missing if all(m in missing or ok.get(m) is None or not follows(m) for m in range(1, n))]
        if low == missing:
            words += f" and {name} >= {missing[-1] + 1}"
        else:
            words += f", except {name} = {_list_words(missing)}"
    if extra:
        words += f", or {name} = {_list_words(extra)}"
    return words


def _shortest_period(period: int, tail: set[int]) -> tuple[int, set[int]]:
    for p in range(1, period + 1):
        if period % p == 0 and all(((r % p) in {t % p for t in tail}) == (r in tail) for r in range(period)):
            return p, {t % p for t in tail}
    return period, tail


def _residue_words(name: str, period: int, tail: set[int]) -> Optional[str]:
    if not tail:
        return None
    if len(tail) == period:
        return f"{name} is any size"
    if period == 2:
        return f"{name} is {'odd' if tail == {1} else 'even'}"
    if tail == {0}:
        return f"{name} is a multiple of {period}"
    return f"{name} mod {period} is {_list_words(sorted(tail))}"


def _list_words(values: Sequence[int]) -> str:
    return ", ".join(map(str, values[:-1])) + (" or " if len(values) > 1 else "") + str(values[-1])


# --- small arithmetic ----------------------------------------------------------------------


def _eff_pad(axis: Axis, taps: tuple[int, ...]) -> tuple[int, int]:
    """Padding that nonzero taps can reach: l' = l - d*a_lo, r' = r - d*(k-1-a_hi), floored at 0."""
    if not taps:
        return (0, 0)
    lo = axis.pad[0] - axis.dilation * taps[0]
    hi = axis.pad[1] - axis.dilation * (axis.kernel - 1 - taps[-1])
    return (max(lo, 0), max(hi, 0))


def _pointwise(spec: ConvSpec, sup: Support) -> bool:
    return all(len(t) <= 1 and a.stride == 1 and _eff_pad(a, t) == (0, 0) for a, t in zip(spec.axes, sup))


def _periodic_from(a1: Axis, a2: Axis, am: Axis) -> int:
    """A length past which the axis repeats with period s1*s2 (borders no longer interact)."""
    reach = a1.extent + sum(a1.pad) + a1.stride * (a2.extent + sum(a2.pad)) + am.extent + sum(am.pad)
    return 2 * reach + 4 * a1.stride * a2.stride + 8


def padded_cell(mode: str, j: int, n: int):
    """The input cell a padded read at j takes its value from, or _ZERO."""
    if 0 <= j < n:
        return j
    if mode == "zeros":
        return _ZERO
    if mode == "reflect":
        return -j if j < 0 else 2 * (n - 1) - j
    if mode == "replicate":
        return 0 if j < 0 else n - 1
    return j % n


def _kind(pair, cand) -> str:
    if pair is _ZERO:
        return ZZ if cand is _ZERO else PZ
    if cand is _ZERO:
        return CZ
    return EQ if pair == cand else NE


def _x_exact(type_sets: Sequence[frozenset[str]]) -> bool:
    """N-d triples combine per axis: a cell is zero if any axis says so, equal if all axes agree."""
    for combo in product(*type_sets):
        pair_zero = any(t in (PZ, ZZ) for t in combo)
        cand_zero = any(t in (CZ, ZZ) for t in combo)
        if pair_zero and cand_zero:
            continue
        if not pair_zero and not cand_zero and all(t == EQ for t in combo):
            continue
        return False
    return True


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)
