"""Chains of convs: which adjacent pairs merge, and the cheapest exact segmentation.

Pairwise mergeable is not chain mergeable (3x3 p0 -> 1x1 -> 3x3 p1: merging the first pair
gives a 3x3 p0 that cannot absorb the last conv), so a segment is decided by applying the rules
to the *merged* conv as it grows, and dynamic programming picks the segmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import torch

from . import algebra
from .algebra import Conv, Counterexample, Size
from .rules import Analysis, Verdict
from .spec import ConvSpec, cost, pad_fits

POLICIES = ("cheaper", "all")
VERIFY_TOLERANCE = 1e-9
MAX_VERIFY_LENGTH = 512
ROUNDING_ULPS = 64
"""How far (in units of the dtype's epsilon, relative to the output) stored merged weights may stray."""
"""Longest axis a verification input gets for the 'far from the borders' size."""


NO_COUNTEREXAMPLE = (
    "; yet these particular weights showed no difference on the inputs tried (they may cancel),"
    " and convmerge merges only what it can prove"
)
NOTHING_TRIED = (
    "; no input could be tried (PyTorch refuses the candidate's padding at every size tried),"
    " so no counterexample is shown, and convmerge merges only what it can prove"
)


class VerificationError(RuntimeError):
    """A merge that the rules called exact failed its numeric check: never written."""


@dataclass(frozen=True)
class PairReport:
    """One adjacent pair of the chain, judged on its own."""

    first: int
    verdict: Verdict
    exact_here: Optional[bool]  # at the given input size (None: no size known)
    counterexample: Optional[Counterexample]


@dataclass(frozen=True)
class Segment:
    """convs[start:stop] become `conv` (float64 when merged, else the original)."""

    start: int
    stop: int
    conv: Conv
    error: float = 0.0  # verified max |chain - merged| (relative, float64)
    rounding: float = 0.0  # the same once the weights are stored in their dtype
    refused: Optional[str] = None  # why an exact merge is not used after all (its stored weights are off)

    @property
    def merged(self) -> bool:
        return self.stop - self.start > 1 and self.refused is None


def sizes_along(convs: Sequence[Conv], size: Size) -> list[Size]:
    """The input size of each conv of the chain, and the chain's output size last."""
    out = [tuple(size)]
    for c in convs:
        out.append(c.spec.out_size(out[-1]))
    return out


def judge_pairs(convs: Sequence[Conv], size: Optional[Size]) -> list[PairReport]:
    """Each adjacent pair with its verdict and, where it cannot merge, a counterexample."""
    sizes = sizes_along(convs, size) if size else None
    reports = []
    for t in range(len(convs) - 1):
        a, b = convs[t], convs[t + 1]
        v = algebra.analyze(a, b)
        here = v.exact_at(sizes[t]) if sizes else None
        ce = None
        if v.verdict == "undecided":
            here = None
        elif v.verdict == "unmergeable" or (v.verdict == "size-dependent" and here is False):
            ce, tried = find_counterexample(a, b, v, sizes[t] if here is False else None)
            if ce is None:
                v = replace(v, reason=v.reason + (NO_COUNTEREXAMPLE if tried else NOTHING_TRIED))
        reports.append(PairReport(t, v, here, ce))
    return reports


def find_counterexample(a: Conv, b: Conv, v: Verdict, size: Optional[Size]) -> tuple[Optional[Counterexample], bool]:
    """At `size`, or else at the smallest square/cubic size where the candidate runs and differs.

    Also says whether any input was tried at all: at a size where PyTorch refuses the candidate's
    padding, none can be. A large `size` is searched at a congruent size past the border
    interactions (`representative`), where exactness is the same.
    """
    cand = algebra.merge(a, b, v.candidate)
    tries = [size] if size else [(n,) * a.spec.ndim for n in range(1, 65)]
    unfolds = max(c.spec.in_channels * math.prod(c.spec.kernel_size) for c in (a, b))
    tried = False
    for s in tries:
        if v.analysis.exact_at(s) or not defined(a, b, s):
            continue
        try:
            ce = algebra.counterexample(lambda x: algebra.apply_chain([a, b], x), cand, s, a.spec.in_channels,
                                        stand_in=representative(v.analysis, s), unfolds=unfolds)
        except RuntimeError:  # PyTorch refuses the candidate's padding at this size
            continue
        tried = True
        if ce is not None:
            return ce, True
    return None, tried


def representative(an: Analysis, size: Size) -> Size:
    """A size no larger than `size` where the pair behaves as there: per axis, congruent past its periodic start."""
    return tuple(_congruent(n, an.start[k], an.period[k]) for k, n in enumerate(size))


def _congruent(n: int, start: int, period: int) -> int:
    """n itself below start + period; else the length in [start, start + period) with n's residue."""
    return n if n < start + period else start + (n - start) % period


def plan(
    convs: Sequence[Conv],
    size: Optional[Size],
    policy: str = "cheaper",
    nominal: Optional[Size] = None,
    pairs: Optional[Sequence[PairReport]] = None,
    dtype: Optional[torch.dtype] = None,
) -> list[Segment]:
    """The best exact segmentation: lowest estimated cost then fewest layers ('cheaper'), or the reverse ('all').

    A segment merges only if every step is exact at every size, or at `size` when it is given.
    Costs (spec.cost) are counted at `size`, or at `nominal` when the real size is unknown.
    `pairs` (from `judge_pairs`) saves analysing adjacent pairs twice; with `dtype`, each chosen
    merge also reports the error of its weights rounded to that dtype.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy: {policy!r} is not one of {', '.join(POLICIES)}")
    n = len(convs)
    sizes = sizes_along(convs, size or nominal or (64,) * convs[0].spec.ndim)
    itemsize = torch.empty(0, dtype=dtype).element_size() if dtype is not None else 4
    specs: dict[tuple[int, int], ConvSpec] = {}
    steps: dict[tuple[int, int], tuple[Conv, Conv, ConvSpec]] = {}  # merged lazily: only chosen ones are built
    for i in range(n):
        specs[(i, i + 1)] = convs[i].spec
        m = convs[i]
        for j in range(i + 1, n):
            v = pairs[i].verdict if pairs is not None and j == i + 1 else algebra.analyze(m, convs[j])
            exact_here = size is not None and v.verdict != "undecided" and v.exact_at(sizes[i])
            if not (v.verdict == "mergeable" or exact_here):
                break
            specs[(i, j + 1)] = v.candidate
            steps[(i, j + 1)] = (m, convs[j], v.candidate)
            if j + 1 < n:  # the next step's verdict needs this merge's weights
                m = algebra.merge(m, convs[j], v.candidate)

    def score(i: int, j: int) -> tuple[float, int]:
        c = cost(specs[(i, j)], sizes[i], itemsize)
        return (c, 1) if policy == "cheaper" else (1, c)  # type: ignore[return-value]

    best: list[Optional[tuple[tuple[float, float], list[tuple[int, int]]]]] = [((0, 0), [])] + [None] * n
    for j in range(1, n + 1):
        for i in range(j):
            if (i, j) not in specs or best[i] is None:
                continue
            prev_score, prev = best[i]  # type: ignore[misc]
            k = score(i, j)
            total = (prev_score[0] + k[0], prev_score[1] + k[1])
            if best[j] is None or total < best[j][0]:  # type: ignore[index]
                best[j] = (total, prev + [(i, j)])
    segments = []
    for i, j in best[n][1]:  # type: ignore[index]
        if j - i == 1:
            segments.append(Segment(i, j, convs[i]))
            continue
        merged = algebra.merge(*steps[(i, j)])
        err, rounding = verify(convs[i:j], merged, sizes[i] if size else None, dtype)
        segments.append(Segment(i, j, merged, err, rounding, _storage_problem(rounding, dtype)))
    return segments


def _storage_problem(rounding: float, dtype: Optional[torch.dtype]) -> Optional[str]:
    """A merge whose weights overflow or underflow their dtype would change the model: refuse it."""
    if dtype is None:
        return None
    limit = ROUNDING_ULPS * torch.finfo(dtype).eps
    if rounding <= limit:
        return None
    name = str(dtype).removeprefix("torch.")
    off = "overflow" if rounding == float("inf") else f"are off by {rounding:.2g} (relative)"
    return (f"merge refused: stored as {name} the merged weights {off}, more than {ROUNDING_ULPS} ulps; "
            "the layers stay unmerged")


def merge_run(convs: Sequence[Conv]) -> Conv:
    """Merge convs left to right exactly as `plan` did (same candidates, same float64 arithmetic)."""
    m = convs[0]
    for c in convs[1:]:
        m = algebra.merge(m, c, algebra.analyze(m, c).candidate)
    return m


def verify(
    convs: Sequence[Conv], merged: Conv, size: Optional[Size], dtype: Optional[torch.dtype] = None
) -> tuple[float, float]:
    """Run chain and merged conv in float64 on sizes that exercise the borders; raise if they differ.

    Returns the float64 error and, with `dtype`, the error once the weights are rounded to it.
    """
    sizes = verification_sizes(convs, merged.spec, size)
    if not sizes:
        raise VerificationError("no input size where both the chain and the merged conv run")
    versions = [merged] + ([algebra.cast(merged, dtype)] if dtype is not None else [])
    errors = algebra.chain_errors(convs, versions, sizes)
    if not errors[0] <= VERIFY_TOLERANCE:
        raise VerificationError(f"merged conv differs from the chain by {errors[0]:.3g} (relative) at sizes {sizes}")
    return errors[0], errors[-1]


def verification_sizes(convs: Sequence[Conv], merged: ConvSpec, size: Optional[Size]) -> list[Size]:
    """Small sizes per axis covering every residue of the merged stride near the borders.

    For a merge exact only at `size`, a congruent size past the border interactions stands in
    for a large `size` (exactness is periodic in the size with the merged stride from there on).
    """
    per_axis = []
    for k in range(merged.ndim):
        period = merged.axes[k].stride
        first = _first(lambda n: _runs(convs, merged, k, n))
        if first is None:
            return []
        start = _periodic_start(convs, k)
        if size is None:
            sizes = list(range(first, first + period + 1))
            if start + period <= MAX_VERIFY_LENGTH:
                sizes.append(max(start, first) + period)
            per_axis.append(sizes)
            continue
        per_axis.append([_congruent(size[k], start, period)])
    longest = max(len(p) for p in per_axis)
    return [tuple(p[min(i, len(p) - 1)] for p in per_axis) for i in range(longest)]


def _first(ok: Callable[[int], bool], limit: int = 1 << 40) -> Optional[int]:
    """The least n >= 1 with ok(n), for ok monotone in n (a conv that runs at n runs at n + 1)."""
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


def _periodic_start(convs: Sequence[Conv], k: int) -> int:
    """A length past which the chain's border behaviour repeats (cf. rules._periodic_from)."""
    reach, scale = 0, 1
    for c in convs:
        a = c.spec.axes[k]
        reach += scale * (a.extent + sum(a.pad))
        scale *= a.stride
    return 4 * reach + 4 * scale + 8


def _runs(convs: Sequence[Conv], merged: ConvSpec, k: int, n: int) -> bool:
    """Whether the chain and the merged conv are defined at length n on axis k."""
    if not pad_fits(merged.padding_mode, merged.axes[k].pad, n):
        return False
    for c in convs:
        a = c.spec.axes[k]
        if not pad_fits(c.spec.padding_mode, a.pad, n):
            return False
        n = a.out_len(n)
        if n < 1:
            return False
    return True


def defined(a: Conv, b: Conv, size: Size) -> bool:
    return all(_runs([a, b], a.spec, k, n) for k, n in enumerate(size))
