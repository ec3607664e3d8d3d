"""Chains of convs: which adjacent pairs merge, and the cheapest exact segmentation.

Pairwise mergeable is not chain mergeable (3x3 p0 -> 1x1 -> 3x3 p1: merging the first pair
gives a 3x3 p0 that cannot absorb the last conv), so a segment is decided by applying the rules
to the *merged* conv as it grows, and dynamic programming picks the segmentation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

from . import algebra
from .algebra import Conv, Counterexample
from .rules import Verdict
from .spec import ConvSpec, macs

Size = tuple[int, ...]
POLICIES = ("cheaper", "all")
VERIFY_TOLERANCE = 1e-9


NO_COUNTEREXAMPLE = (
    "; yet these particular weights showed no difference on the inputs tried (they may cancel),"
    " and convmerge merges only what it can prove"
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

    @property
    def merged(self) -> bool:
        return self.stop - self.start > 1


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
        if v.verdict == "unmergeable" or (v.verdict == "size-dependent" and here is False):
            ce = find_counterexample(a, b, v, sizes[t] if here is False else None)
            if ce is None:
                v = replace(v, reason=v.reason + NO_COUNTEREXAMPLE)
        reports.append(PairReport(t, v, here, ce))
    return reports


def find_counterexample(a: Conv, b: Conv, v: Verdict, size: Optional[Size]) -> Optional[Counterexample]:
    """At `size`, or else at the smallest square/cubic size where the candidate runs and differs."""
    cand = algebra.merge(a, b, v.candidate)
    tries = [size] if size else [(n,) * a.spec.ndim for n in range(1, 65)]
    for s in tries:
        if v.analysis.exact_at(s) or not defined(a, b, s):
            continue
        try:
            ce = algebra.counterexample([a, b], cand, s)
        except RuntimeError:  # PyTorch refuses the candidate's padding at this size
            continue
        if ce is not None:
            return ce
    return None


def plan(
    convs: Sequence[Conv],
    size: Optional[Size],
    policy: str = "cheaper",
    nominal: Optional[Size] = None,
    pairs: Optional[Sequence[PairReport]] = None,
) -> list[Segment]:
    """The best exact segmentation: fewest MACs then fewest layers ('cheaper'), or the reverse ('all').

    A segment merges only if every step is exact at every size, or at `size` when it is given.
    Costs are counted at `size`, or at `nominal` when the real size is unknown. `pairs` (from
    `judge_pairs`) saves analysing the adjacent pairs twice.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy: {policy!r} is not one of {', '.join(POLICIES)}")
    n = len(convs)
    cost_size = size or nominal or (64,) * convs[0].spec.ndim
    sizes = sizes_along(convs, cost_size)
    merged: dict[tuple[int, int], Conv] = {}
    for i in range(n):
        merged[(i, i + 1)] = convs[i]
        m = convs[i]
        for j in range(i + 1, n):
            v = pairs[i].verdict if pairs is not None and j == i + 1 else algebra.analyze(m, convs[j])
            ok = v.verdict == "mergeable" or (size is not None and v.exact_at(sizes[i]))
            if not ok:
                break
            m = algebra.merge(m, convs[j], v.candidate)
            merged[(i, j + 1)] = m

    def key(segs: tuple[int, int]) -> tuple[int, int]:
        cost = macs(merged[segs].spec, sizes[segs[0]])
        return (cost, 1) if policy == "cheaper" else (1, cost)

    best: list[Optional[tuple[tuple[int, int], list[tuple[int, int]]]]] = [((0, 0), [])] + [None] * n
    for j in range(1, n + 1):
        for i in range(j):
            if (i, j) not in merged or best[i] is None:
                continue
            prev_score, prev = best[i]  # type: ignore[misc]
            k = key((i, j))
            score = (prev_score[0] + k[0], prev_score[1] + k[1])
            if best[j] is None or score < best[j][0]:  # type: ignore[index]
                best[j] = (score, prev + [(i, j)])
    segments = []
    for i, j in best[n][1]:  # type: ignore[index]
        err = verify(convs[i:j], merged[(i, j)], sizes[i] if size else None) if j - i > 1 else 0.0
        segments.append(Segment(i, j, merged[(i, j)], err))
    return segments


def merge_run(convs: Sequence[Conv]) -> Conv:
    """Merge convs left to right exactly as `plan` did (same candidates, same float64 arithmetic)."""
    m = convs[0]
    for c in convs[1:]:
        m = algebra.merge(m, c, algebra.analyze(m, c).candidate)
    return m


def verify(convs: Sequence[Conv], merged: Conv, size: Optional[Size]) -> float:
    """Run chain and merged conv in float64 on sizes that exercise the borders; raise if they differ."""
    sizes = verification_sizes(convs, merged.spec, size)
    if not sizes:
        raise VerificationError("no input size where both the chain and the merged conv run")
    err = algebra.max_error(convs, merged, sizes)
    if not err <= VERIFY_TOLERANCE:
        raise VerificationError(f"merged conv differs from the chain by {err:.3g} (relative) at sizes {sizes}")
    return err


def verification_sizes(convs: Sequence[Conv], merged: ConvSpec, size: Optional[Size]) -> list[Size]:
    """Small sizes per axis covering every residue of the merged stride near the borders.

    For a merge exact only at `size`, a congruent size past the border interactions stands in
    for a large `size` (exactness is periodic in the size with the merged stride from there on).
    """
    per_axis = []
    for k in range(merged.ndim):
        period = merged.axes[k].stride
        first = next((n for n in range(1, 1024) if _runs(convs, merged, k, n)), None)
        if first is None:
            return []
        if size is None:
            per_axis.append(list(range(first, first + period + 1)) + [_periodic_start(convs, k) + period])
            continue
        start = _periodic_start(convs, k)
        want = size[k]
        per_axis.append([want if want < start + period else start + (want - start) % period])
    longest = max(len(p) for p in per_axis)
    return [tuple(p[min(i, len(p) - 1)] for p in per_axis) for i in range(longest)]


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
    if not _pad_ok(merged.padding_mode, merged.axes[k].pad, n):
        return False
    for c in convs:
        a = c.spec.axes[k]
        if not _pad_ok(c.spec.padding_mode, a.pad, n):
            return False
        n = a.out_len(n)
        if n < 1:
            return False
    return True


def _pad_ok(mode: str, pad: tuple[int, int], n: int) -> bool:
    return (mode != "reflect" or max(pad) < n) and (mode != "circular" or max(pad) <= n)


def defined(a: Conv, b: Conv, size: Size) -> bool:
    return all(_runs([a, b], a.spec, k, n) for k, n in enumerate(size))
