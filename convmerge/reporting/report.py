"""The report as data (FORMAT.md, section 3): what `check` and `fuse` found, ready for JSON or a table.

Counterexamples are searched only when something reads them (the JSON, the table with -v, a
--counterexamples folder): `fuse -q` never pays for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..engine.algebra import Counterexample
from ..maths.reasons import Why

__all__ = ["MergeEntry", "PairEntry", "RegionEntry", "Report", "VERDICTS"]

VERDICTS = ("mergeable", "size-dependent", "unmergeable", "skipped")
_UNSEARCHED = object()


class _LazyCounterexample:
    """A counterexample found on first read (None when nothing is searched or none is found).

    When a search finds none, the reason says so truly: whether inputs were tried and showed no
    difference (the weights may cancel), or none could be tried at all.
    """

    find_counterexample: Optional[Callable[[], tuple[Optional[Counterexample], str]]]
    _found: Any
    _reason: str
    sizes: Optional[str]
    exact_here: Optional[bool]
    weight_dependent: bool

    @property
    def counterexample(self) -> Optional[Counterexample]:
        if self._found is _UNSEARCHED:
            self._found = self.find_counterexample() if self.find_counterexample else (None, "no-counterexample")
        return self._found[0]

    @property
    def reason(self) -> str:
        if self.find_counterexample is None or self.counterexample is not None:
            return self._reason
        return self._reason + "; " + Why.of(self._found[1]).text()

    @reason.setter
    def reason(self, text: str) -> None:
        self._reason = text

    def _size_fields(self, out: dict[str, Any]) -> None:
        """The optional fields pairs and regions share (present only when they say something)."""
        if self.sizes is not None:
            out["sizes"] = self.sizes
        if self.exact_here is not None:
            out["exact_at_input_size"] = self.exact_here
        if self.weight_dependent:
            out["weight_dependent"] = True

    @property
    def searched(self) -> bool:
        """Whether the search has run (or there is none to run)."""
        return self.find_counterexample is None or self._found is not _UNSEARCHED

    def _counterexample_dict(self, search: bool = True) -> Optional[dict[str, Any]]:
        if not (search or self.searched):
            return None
        ce = self.counterexample
        return None if ce is None else ce.as_dict()

    def _reason_text(self, search: bool = True) -> str:
        """The reason; without `search`, what is known without running one (a table without -v)."""
        return self.reason if search or self.searched else self._reason


@dataclass
class PairEntry(_LazyCounterexample):
    """One adjacent conv pair (conv, then only batch norms/identity/dropout, then conv)."""

    first: str
    second: str
    via: list[str]
    verdict: str
    reason: str
    sizes: Optional[str] = None
    merged: Optional[dict[str, Any]] = None
    exact_here: Optional[bool] = None
    macs_before: Optional[int] = None
    macs_after: Optional[int] = None  # None where the pair cannot merge (no saving to show)
    applied: bool = False
    params_before: Optional[int] = None
    params_after: Optional[int] = None
    weight_dependent: bool = False
    find_counterexample: Optional[Callable[[], tuple[Optional[Counterexample], str]]] = field(default=None,
                                                                                              repr=False)
    _found: Any = field(default=_UNSEARCHED, repr=False)

    def to_dict(self, search: bool = True) -> dict[str, Any]:
        """Without `search`, the counterexample is left out unless already found (and the reason says
        nothing of it)."""
        out: dict[str, Any] = {
            "first": self.first,
            "second": self.second,
            "via": self.via,
            "verdict": self.verdict,
            "reason": self._reason_text(search),
            "merged": self.merged,
            "counterexample": self._counterexample_dict(search),
            "applied": self.applied,
        }
        self._size_fields(out)
        if self.macs_before is not None:
            out["macs"] = {"before": self.macs_before, "after": self.macs_after}
        if self.params_before is not None:
            out["params"] = {"before": self.params_before, "after": self.params_after}
        return out


@dataclass
class RegionEntry(_LazyCounterexample):
    """A region (FORMAT.md section 3): linear layers between one input and one output, judged as one conv."""

    input: str
    output: str
    layers: list[str]
    verdict: str
    reason: str
    branches: bool = False  # it joins parallel branches (else it is a chain)
    sizes: Optional[str] = None
    merged: Optional[dict[str, Any]] = None  # the single conv, where it is exact
    candidate: Optional[dict[str, Any]] = None  # the forced single conv, exact or not
    exact_here: Optional[bool] = None
    applied: bool = False  # the whole region became one conv
    macs_before: Optional[int] = None
    macs_after: Optional[int] = None
    weight_dependent: bool = False
    find_counterexample: Optional[Callable[[], tuple[Optional[Counterexample], str]]] = field(default=None,
                                                                                              repr=False)
    _found: Any = field(default=_UNSEARCHED, repr=False)

    def to_dict(self, search: bool = True) -> dict[str, Any]:
        """As PairEntry.to_dict."""
        out: dict[str, Any] = {
            "input": self.input,
            "output": self.output,
            "layers": self.layers,
            "kind": "branches" if self.branches else "chain",
            "verdict": self.verdict,
            "reason": self._reason_text(search),
            "merged": self.merged,
            "counterexample": self._counterexample_dict(search),
            "applied": self.applied,
            "macs": {"before": self.macs_before, "after": self.macs_after},
        }
        self._size_fields(out)
        return out


@dataclass
class MergeEntry:
    """One merged conv: the layers it replaces and how it was checked."""

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
    input: Optional[str] = None
    kind: str = "merge"  # or "bn-fold": a standalone conv -> batch norm
    convs: int = 1  # conv layers it replaces

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "into": self.into,
            "input": self.input,
            "kind": self.kind,
            "convs": self.convs,
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
    regions: list[RegionEntry] = field(default_factory=list)
    merges: list[MergeEntry] = field(default_factory=list)
    policy: str = "cheaper"
    input_size: Optional[list[int]] = None
    cost_size: Optional[list[int]] = None
    source: Optional[str] = None
    description: Optional[str] = None
    output: Optional[str] = None
    notes: list[str] = field(default_factory=list)
    convs: int = 0  # conv layers in the model

    def summary(self) -> dict[str, int]:
        count = {v: sum(p.verdict == v for p in self.pairs) for v in VERDICTS}
        regions = {v: sum(r.verdict == v for r in self.regions) for v in VERDICTS}
        removed = sum(len([n for n in m.layers if n != m.into]) for m in self.merges)
        convs_removed = sum(m.convs - 1 for m in self.merges)
        return {
            "pairs": len(self.pairs),
            "mergeable": count["mergeable"],
            "size_dependent": count["size-dependent"],
            "unmergeable": count["unmergeable"],
            "skipped": count["skipped"],
            "merged": sum(p.applied for p in self.pairs),
            "layers_removed": removed,
            "regions": len(self.regions),
            "regions_mergeable": regions["mergeable"],
            "regions_size_dependent": regions["size-dependent"],
            "regions_unmergeable": regions["unmergeable"],
            "regions_skipped": regions["skipped"],
            "regions_merged": sum(r.applied for r in self.regions),
            "bn_folded": sum(m.kind == "bn-fold" for m in self.merges),
            "convs_before": self.convs,
            "convs_after": self.convs - convs_removed,
        }

    def to_dict(self, search: bool = True) -> dict[str, Any]:
        """The JSON report (FORMAT.md, section 3). `search=False` runs no counterexample search: for a view
        that shows no counterexample (the table without -v, the --fail-on gate)."""
        return {
            "pairs": [p.to_dict(search) for p in self.pairs],
            "regions": [r.to_dict(search) for r in self.regions],
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
