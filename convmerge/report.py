"""The report as data (FORMAT.md, section 3): what `check` and `fuse` found, as JSON or a table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .algebra import Counterexample

VERDICTS = ("mergeable", "size-dependent", "unmergeable", "skipped")


@dataclass
class PairEntry:
    first: str
    second: str
    via: list[str]
    verdict: str
    reason: str
    sizes: Optional[str] = None
    merged: Optional[dict[str, Any]] = None
    counterexample: Optional[Counterexample] = None
    exact_here: Optional[bool] = None
    macs_before: Optional[int] = None
    macs_after: Optional[int] = None
    applied: bool = False
    params_before: Optional[int] = None
    params_after: Optional[int] = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "first": self.first,
            "second": self.second,
            "via": self.via,
            "verdict": self.verdict,
            "reason": self.reason,
            "merged": self.merged,
            "counterexample": None if self.counterexample is None else self.counterexample.as_dict(),
            "applied": self.applied,
        }
        if self.sizes is not None:
            out["sizes"] = self.sizes
        if self.exact_here is not None:
            out["exact_at_input_size"] = self.exact_here
        if self.macs_before is not None:
            out["macs"] = {"before": self.macs_before, "after": self.macs_after}
        if self.params_before is not None:
            out["params"] = {"before": self.params_before, "after": self.params_after}
        return out


@dataclass
class MergeEntry:
    """One merged segment: the layers it replaces and how it was checked."""

    layers: list[str]
    into: str
    conv: dict[str, Any]
    dtype: str
    max_error: float
    rounding_error: float
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "into": self.into,
            "conv": self.conv,
            "dtype": self.dtype,
            "verified_max_error": self.max_error,
            "rounding_error": self.rounding_error,
            "macs": {"before": self.macs_before, "after": self.macs_after},
            "params": {"before": self.params_before, "after": self.params_after},
        }


@dataclass
class Report:
    pairs: list[PairEntry] = field(default_factory=list)
    merges: list[MergeEntry] = field(default_factory=list)
    policy: str = "cheaper"
    input_size: Optional[list[int]] = None
    cost_size: Optional[list[int]] = None
    source: Optional[str] = None
    description: Optional[str] = None
    output: Optional[str] = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        count = {v: sum(p.verdict == v for p in self.pairs) for v in VERDICTS}
        return {
            "pairs": len(self.pairs),
            "mergeable": count["mergeable"],
            "size_dependent": count["size-dependent"],
            "unmergeable": count["unmergeable"],
            "skipped": count["skipped"],
            "merged": sum(p.applied for p in self.pairs),
            "layers_removed": sum(len([n for n in m.layers if n != m.into]) for m in self.merges),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "pairs": [p.to_dict() for p in self.pairs],
            "summary": self.summary(),
            "merges": [m.to_dict() for m in self.merges],
            "policy": self.policy,
            "input_size": self.input_size,
            "cost_size": self.cost_size,
            "source": self.source,
            "description": self.description,
            "output": self.output,
            "notes": self.notes,
        }
