"""When are parallel branches, added or concatenated, one convolution?  Decided on specs and supports.

Each branch has already been reduced to one conv reading the region's input (DESIGN.md, regions).
Per axis a branch reads input cell s*o - l + t for its dilated taps t, so branches share an output
grid only with equal strides and equal c = l + r - e (else their outputs differ in length); the
forced candidate then pads L = max l on the left and embeds each kernel at offset L - l_i.  Zero
extension does not depend on how far one pads, nor do reflect, replicate and circular (within
PyTorch's limits), so the only other obstacle is two branches reading padding in different modes.
No tensors here: the kernels are embedded by `algebra.join`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence

from .reasons import Outcome, Why
from .rules import Support, padded_cell, reads_padding
from .spec import Axis, ConvSpec, pad_fits

__all__ = ["Join", "decide_join", "periodic_from"]


@dataclass(frozen=True)
class Join:
    """The verdict for summing (or stacking) branch convs, and the one conv that can replace them."""

    verdict: Outcome
    why: Optional[Why]
    candidate: Optional[ConvSpec]  # None when the branches share no output grid
    offsets: tuple[tuple[int, ...], ...]  # per branch, per axis: where its window starts in the candidate's
    lengths: tuple[tuple[int, ...], ...]  # per axis, the c = l + r - e of each branch (grids agree where equal)
    notes: tuple[Why, ...] = ()
    others: tuple[tuple[tuple[Axis, ...], tuple[tuple[int, ...], ...], str], ...] = ()
    """Per branch padded in another mode than the candidate: its axes, taps and mode."""

    def exact_at(self, size: Sequence[int]) -> bool:
        """Exact at this size: lengths agree, PyTorch runs the candidate, no other-mode branch reads padding."""
        return all(self.axis_ok(k, n) for k, n in enumerate(size))

    def axis_ok(self, k: int, n: int) -> Optional[bool]:
        """Axis k at length n while the other axes are large (None: PyTorch refuses the candidate there)."""
        if self.candidate is None:
            return False
        axis = self.candidate.axes[k]
        if len({(n + c) // axis.stride for c in self.lengths[k]}) > 1:
            return False
        mode = self.candidate.padding_mode
        if any(_differs_at(axes[k], taps[k], n, own, mode) for axes, taps, own in self.others):  # type: ignore[index]
            return False
        if not pad_fits(self.candidate.padding_mode, axis.pad, n):
            return None
        return True


def decide_join(specs: Sequence[ConvSpec], supports: Sequence[Support], names: Sequence[str],
                concat: bool = False) -> Join:
    """Branches (convs of one input) summed, or stacked along channels with `concat`."""
    first = specs[0]
    nd = first.ndim
    for i, s in enumerate(specs):
        if s.stride != first.stride:
            k = next(k for k in range(nd) if s.stride[k] != first.stride[k])
            why = Why.of("grid-differs", a=names[0], b=names[i], axis=first.axis_names[k],
                         sa=first.stride[k], sb=s.stride[k])
            return Join(Outcome.UNMERGEABLE, why, None, (), ())
    reading = [i for i, (s, t) in enumerate(zip(specs, supports)) if reads_padding(s, t)]
    mode = specs[reading[0]].padding_mode if reading else "zeros"
    other = [i for i in reading if specs[i].padding_mode != mode]
    cand, offsets, lengths = _candidate(specs, mode, concat)
    join = Join(Outcome.MERGEABLE, None, cand, offsets, lengths, _limit_notes(cand, specs, mode),
                tuple((tuple(specs[i].axes), tuple(supports[i]), specs[i].padding_mode) for i in other))
    failing = [k for k in range(nd) if any(join.axis_ok(k, n) is False for n in range(1, periodic_from(cand, k)))]
    if not failing:
        return join
    never = [k for k in range(nd) if not any(join.axis_ok(k, n) for n in range(1, periodic_from(cand, k)))]
    if other:
        b = other[0]
        why = Why.of("branch-modes-differ", a=names[reading[0]], b=names[b], ma=mode, mb=specs[b].padding_mode)
    else:
        k = failing[0]
        why = Why.of("lengths-differ", axis=first.axis_names[k], stride=first.stride[k],
                     spread=max(lengths[k]) - min(lengths[k]))
    return replace(join, verdict=Outcome.UNMERGEABLE if never else Outcome.SIZE_DEPENDENT, why=why)


def _differs_at(axis: Axis, taps: tuple[int, ...], n: int, mode: str, cand_mode: str) -> bool:
    """Whether a branch padded in `mode` reads, at input length n, a padded cell that the candidate's
    `cand_mode` fills from another cell (reflect and circular agree on some cells at some sizes)."""
    out = axis.out_len(n)
    if out < 1 or not taps:
        return False
    reach = (max(axis.pad) + axis.extent) // axis.stride + 2
    for o in set(range(min(out, reach))) | set(range(max(0, out - reach), out)):
        for t in taps:
            j = axis.stride * o - axis.pad[0] + axis.dilation * t
            if not 0 <= j < n and padded_cell(mode, j, n) != padded_cell(cand_mode, j, n):
                return True
    return False


def periodic_from(cand: ConvSpec, k: int) -> int:
    """Lengths that represent every length of axis k (the joins repeat with the stride past them)."""
    a = cand.axes[k]
    return 4 * (a.extent + sum(a.pad)) + 4 * a.stride + 8


def _candidate(specs: Sequence[ConvSpec], mode: str, concat: bool):
    """The forced single conv: common stride, left pad L = max l_i, each window at offset L - l_i."""
    nd = specs[0].ndim
    axes, offsets, lengths = [], [[] for _ in specs], []
    for k in range(nd):
        ax = [s.axes[k] for s in specs]
        left = max(a.pad[0] for a in ax)
        extent = max(left - a.pad[0] + a.extent for a in ax)
        cs = tuple(a.pad[0] + a.pad[1] - a.extent for a in ax)
        right = max(cs) + extent - left
        steps = [a.dilation for a in ax if a.kernel > 1] + [left - a.pad[0] for a in ax]
        dil = math.gcd(*steps) or 1
        axes.append(Axis((extent - 1) // dil + 1, ax[0].stride, dil, (left, right)))
        for i, a in enumerate(ax):
            offsets[i].append(left - a.pad[0])
        lengths.append(cs)
    groups = 1 if concat and len(specs) > 1 else math.gcd(*(s.groups for s in specs))
    out = sum(s.out_channels for s in specs) if concat else specs[0].out_channels
    if all(a.pad == (0, 0) for a in axes):
        mode = "zeros"
    cand = ConvSpec(tuple(axes), specs[0].in_channels, out, groups, mode, any(s.bias for s in specs))
    return cand, tuple(tuple(o) for o in offsets), tuple(lengths)


def _limit_notes(cand: ConvSpec, specs: Sequence[ConvSpec], mode: str) -> tuple[Why, ...]:
    """A reflect or circular candidate padding more than a branch did may not run on the smallest inputs."""
    if mode not in ("reflect", "circular"):
        return ()
    notes = []
    for k, axis in enumerate(cand.axes):
        pad, least_branch = max(axis.pad), max(max(s.axes[k].pad) for s in specs)
        if pad > least_branch:
            least = pad + 1 if mode == "reflect" else pad
            smallest = least_branch + 1 if mode == "reflect" else max(least_branch, 1)
            rule = "reflect padding must be smaller than the input" if mode == "reflect" else \
                "circular padding may not exceed the input"
            notes.append(Why.of("pytorch-pad-limit", mode=mode, pad=pad, axis=cand.axis_names[k], least=least,
                                rule=rule, smallest=smallest))
    return tuple(notes)
