"""The plan: every region judged, the merges chosen, verified and computed once.

`build` is the one place that decides; `check`, `fuse`, `explain`, `--export` and the Python API
read the `Plan` it returns.  Per region (region.py) it reduces the whole region to one conv to give
its verdict (reduce.py), then chooses the merges with dynamic programming over the region's
series-parallel structure: a run of steps and parallel blocks either becomes one conv (where that
is exact at every size, or at the given --input-size) or stays, a block that stays having its
branches planned the same way.  'cheaper' minimises the fitted cost model then the layer count,
'all' the reverse.  A chosen merge is verified in float64 against the original layers
(verify.py, reference.py) and rounded to its storage dtype once; the file writer and the module builder
take exactly those tensors (`Unit.stored`).

Long because the dynamic programme, the cost model and the report entries read the same per-region state;
verification is in verify.py, transposed convs' folds in transpose_fold.py.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from .. import ops
from ..errors import ConvmergeError, Kind
from ..graph import CONV_OPS, JOIN_OPS, LINEAR_OPS, POOL_OPS, Graph, GraphError
from ..maths.reasons import Outcome, Why, sentence
from ..maths.region import Item, Region, Step, find_regions, layers_of, unit_name
from ..maths.spec import BYTE_WEIGHT, LAYER_OVERHEAD, ConvSpec, cost, fit_size, macs, padding_fields, params
from ..ops import affine
from ..ops.transpose import transpose_fields
from ..options import POLICIES, Options  # noqa: F401 (POLICIES: importable from here as before)
from ..reporting.report import MergeEntry, PairEntry, RegionEntry, Report
from . import algebra, reference
from .algebra import BatchNorm, Conv, Counterexample
from .reduce import Reducer, Reduction
from .verify import VERIFY_TOLERANCE, chain_runs, layer_sizes, layers_run, storage_problem  # noqa: F401 (explain.py)
from .verify import check as verify_merge
from .verify import sizes as verification_sizes

__all__ = ["Plan", "Tensors", "Unit", "VerificationError", "build", "POLICIES"]

DEFAULT_COST_SIZE = 224
"""Spatial size per axis the cost model assumes where neither --input-size nor the graph tells."""
KEEP_BYTES = 64 << 20
"""Merged weights kept in memory from verification to writing, and float64 ones awaiting a verification
left to `Plan.verify`, in all; past it a merge is verified at once and its stored weights are dropped
and recomputed from the same recipe when the writer reaches them, checked against a digest of the
bytes verified, so peak memory stays flat whatever the number of merges."""
LATER_MAX = 4 << 20
"""The largest merge (float64 bytes) whose verification waits for `Plan.verify`: a larger one is verified at
once, so the verifications beside the copy never run wide layers while the memory budget is full."""


class VerificationError(ConvmergeError, RuntimeError):
    """A merge that the rules called exact failed its numeric check: never written."""

    kind = Kind.VERIFICATION


@dataclass(frozen=True)
class Tensors:
    """Where a model's tensors come from: their metadata now, their values on demand."""

    info: Mapping[str, Any]  # name -> object with .shape, .dtype, .is_float
    get: Callable[[str], torch.Tensor]


class Loader:
    """Layers' tensors as float64 CPU copies (whatever device the model is on), cached per region."""

    def __init__(self, graph: Graph, tensors: Tensors) -> None:
        self.graph, self.tensors = graph, tensors
        self._cache: dict[str, Any] = {}
        self._finite: dict[str, bool] = {}  # kept by clear(): planning asks again for every segment

    def _get(self, key: str) -> Optional[torch.Tensor]:
        if key not in self.tensors.info:
            return None
        if key not in self._cache:
            self._cache[key] = self.tensors.get(key).detach().to("cpu", torch.float64)
        return self._cache[key]

    def conv(self, name: str) -> Conv:
        """A conv's tensors; a conv_transpose's with its TransposeSpec."""
        spec = self.graph.specs[name] if name in self.graph.specs else self.graph.transposes[name]
        return Conv(spec, self._get(f"{name}.weight"), self._get(f"{name}.bias"))

    def bn(self, name: str) -> BatchNorm:
        if self.graph.layers[name].op == "affine":
            return affine.batch_norm(self._get(f"{name}.weight"), self._get(f"{name}.bias"),
                                     self.graph.channels.get(name))
        eps = float(self.graph.layers[name].fields.get("eps", 1e-5))
        return BatchNorm(self._get(f"{name}.running_mean"), self._get(f"{name}.running_var"), eps,
                         self._get(f"{name}.weight"), self._get(f"{name}.bias"))

    def pad_value(self, name: str) -> Optional[torch.Tensor]:
        return self._get(f"{name}.value")

    def pad_value_dtype(self, name: str) -> torch.dtype:
        """The dtype a pad's value is stored in (float64 for a value given in the description)."""
        info = self.tensors.info.get(f"{name}.value")
        if info is None:
            return torch.float64
        return info.dtype if isinstance(info.dtype, torch.dtype) else _torch_dtype(info.dtype)

    def finite(self, name: str) -> bool:
        """No NaN or Inf in a layer's tensors (such a layer is never merged)."""
        if name not in self._finite:
            keys = [k for k in self.graph.tensor_names(name) if not k.endswith(".num_batches_tracked")]
            self._finite[name] = all(t is None or algebra.all_finite(t) for t in map(self._get, keys))
        return self._finite[name]

    def clear(self) -> None:
        self._cache.clear()


@dataclass
class Unit:
    """One merged conv of the output: the layers it replaces and the tensors that replace them."""

    name: str  # the merged conv's layer name (its tensors: NAME.weight, NAME.bias)
    input: str  # the value it reads
    output: str  # the value it computes (consumers of this value read the merged conv)
    layers: tuple[str, ...]
    kept: Conv  # what `stored` returns; a weight on the meta device: dropped, recomputed on demand
    dtype: torch.dtype
    error: float  # verified max |layers - merged| relative to the layers' scale (algebra.max_errors), float64
    rounding: float  # the same with the stored weights
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    refused: Optional[Why] = None  # exact, but its stored weights would be off: not applied

    @property
    def stored(self) -> Conv:
        """Exactly what is written, in the storage dtype, verified: kept since verification, or recomputed
        by the same steps and checked byte for byte against what was verified."""
        if not self.kept.weight.is_meta:
            return self.kept
        conv = self.recipe()  # type: ignore[misc]
        if _digest(conv) != self.digest:
            raise VerificationError(f"{self.name}: the merged weights computed again for writing differ from "
                                    "those verified; nothing was written")
        return conv

    @property
    def dropped(self) -> bool:
        """Its weight is recomputed when read (see KEEP_BYTES)."""
        return self.kept.weight.is_meta

    @property
    def spec(self) -> ConvSpec:
        return self.kept.spec

    @property
    def bn_fold(self) -> bool:
        """A standalone conv -> batch norm (what every deploy pipeline folds)."""
        return len(self.layers) == 2 and self.kinds[1:] == ("batch_norm",) and self.kinds[:1] in (("conv",), ("conv_transpose",))

    kinds: tuple[str, ...] = ()
    every_size: bool = True  # exact at every input size (else only at the plan's input size, which chose it)
    recipe: Optional[Callable[[], Conv]] = field(default=None, repr=False, compare=False)
    digest: str = ""  # of the verified stored bytes (where the weight is dropped)
    checked_macs: int = 0  # multiply-adds its verification ran (verify.Checked)


@dataclass
class Plan:
    """Everything decided about one model; built once by `build`."""

    graph: Graph
    policy: str
    input_size: Optional[tuple[int, ...]]
    cost_size: Optional[tuple[int, ...]]
    pairs: list[PairEntry] = field(default_factory=list)
    regions: list[RegionEntry] = field(default_factory=list)
    units: list[Unit] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    kept_bytes: int = field(default=0, repr=False)  # merged weights held in memory (KEEP_BYTES)
    keep_bytes: int = field(default=KEEP_BYTES, repr=False)  # the budget of kept_bytes + pending_bytes
    pending: list[Callable[[], bool]] = field(default_factory=list, repr=False)  # verifications left for `verify`
    pending_bytes: int = field(default=0, repr=False)  # float64 merged weights those hold (KEEP_BYTES)

    @property
    def applied(self) -> list[Unit]:
        return [u for u in self.units if u.refused is None]

    def verify(self) -> bool:
        """Run the verifications `build(..., verify_later=True)` left (a VerificationError where a merge is
        wrong).  False where one refused its merge for its storage dtype: the decisions read from the
        plan before (which tensors the output holds) no longer hold, so build it again, verifying inline."""
        refused = False
        with algebra.single_threaded():
            while self.pending:
                refused = self.pending.pop(0)() or refused
        self.pending_bytes = 0
        return not refused

    def report(self) -> Report:
        rep = Report(policy=self.policy, input_size=list(self.input_size) if self.input_size else None,
                     cost_size=list(self.cost_size) if self.cost_size else None)
        rep.pairs, rep.regions, rep.notes = list(self.pairs), list(self.regions), list(self.notes)
        rep.merges = [_merge_entry(u) for u in self.applied]
        rep.convs = sum(layer.op in CONV_OPS or ops.kind(layer.op) is ops.Kind.CONV_TRANSPOSE  # linear layers too
                        for layer in self.graph.layers.values())
        return rep

    def description(self) -> dict:
        """The graph description after the merges (FORMAT.md, section 2)."""
        from ..graph import rewrite

        return rewrite(self.graph, [(u.layers, u.name, u.input, u.output, u.spec) for u in self.applied])

    def listing(self, order: Sequence[str], copy: Callable[[str], Any]) -> list[tuple[str, Any]]:
        """The output's tensors: the input's order, tensors of removed layers dropped, merged ones at the
        place of their unit's first tensor, exactly as verified."""
        drop = {key: u for u in self.applied for name in u.layers for key in self.graph.tensor_names(name)}
        out: list[tuple[str, Any]] = []
        done: set[str] = set()
        for key in order:
            unit = drop.get(key)
            if unit is None:
                out.append((key, copy(key)))
            elif unit.name not in done:
                done.add(unit.name)
                out += _unit_tensors(unit)
        for u in self.applied:
            if u.name not in done:
                out += _unit_tensors(u)
        return out


def build(graph: Graph, tensors: Tensors, options: Options = Options(),
          on_region: Optional[Callable[[], None]] = None, verify_later: bool = False,
          keep_bytes: Optional[int] = None) -> Plan:
    """Judge every region and pair, choose and verify the merges (FORMAT.md, section 3), with the policy and
    at the input size of `options` (validated where they entered; the size is fitted to the graph's axes here).

    `verify_later` leaves the verification of small merges (LATER_MAX, within KEEP_BYTES) to
    `Plan.verify`, which the writer runs while it copies the untouched tensors; the merges, their
    stored weights and the output's layout are all decided without it.  `keep_bytes`: the budget of
    KEEP_BYTES (read when called), where a caller holds more anyway."""
    keep = KEEP_BYTES if keep_bytes is None else keep_bytes
    with algebra.single_threaded():
        return _build(graph, tensors, options.input_size, options.policy, on_region, verify_later, keep)


def _build(graph: Graph, tensors: Tensors, input_size: Optional[Sequence[int]], policy: str,
           on_region: Optional[Callable[[], None]], verify_later: bool, keep_bytes: int) -> Plan:
    if input_size is not None:
        dims = sorted({spec.ndim for spec in graph.specs.values()} - {0}) or [len(input_size)]
        input_size = fit_size(input_size, dims[0])
    size_at = graph.sizes(input_size)
    _check_sizes(graph, size_at, input_size)
    nominal = _nominal(graph, input_size)
    cost_at = graph.sizes(nominal)
    plan = Plan(graph, policy, tuple(input_size) if input_size else None, nominal, keep_bytes=keep_bytes)
    plan.notes += graph.notes
    loader = Loader(graph, tensors)
    pairs = graph.pairs()
    by_first: dict[str, list[int]] = {}
    for k, pair in enumerate(pairs):
        by_first.setdefault(pair.first, []).append(k)
    entries: dict[int, PairEntry] = {}
    for region in find_regions(graph):
        inside = set(region.layers)
        with algebra.memo():  # a pair is judged while its region's tensors and analyses are at hand
            _Planner(plan, loader, region, size_at, cost_at, tensors, verify_later).run()
            for k in (k for name in region.layers for k in by_first.get(name, ())):
                if pairs[k].second in inside:
                    entries[k] = _judge_pair(graph, loader, pairs[k], size_at, cost_at)
        loader.clear()
        if on_region:
            on_region()
    for k, pair in enumerate(pairs):
        if k not in entries:
            entries[k] = _judge_pair(graph, loader, pair, size_at, cost_at)
            loader.clear()
    plan.pairs += [entries[k] for k in range(len(pairs))]
    from .transpose_fold import fold_units

    plan.units += fold_units(plan, loader, tensors, cost_at)
    _mark_applied(plan)
    _size_notes(plan, size_at, input_size)
    _nothing_note(plan)
    _batch_norm_notes(plan)
    return plan


# --- planning one region ---------------------------------------------------------------------------


@dataclass
class _Option:
    """A way to compute a sequence of items: its score and the merges it makes."""

    score: tuple[float, float]
    units: list[tuple[str, tuple[str, ...], str, Reduction]]  # (input, layers, output, reduction)


class _Planner:
    def __init__(self, plan: Plan, loader: Loader, region: Region, size_at: Mapping[str, Any],
                 cost_at: Mapping[str, Any], tensors: Tensors, verify_later: bool = False) -> None:
        self.plan, self.loader, self.region, self.verify_later = plan, loader, region, verify_later
        self.graph = plan.graph
        self.size_at, self.cost_at, self.tensors = size_at, cost_at, tensors
        convs = [n for n in region.layers if self.graph.layers[n].op in CONV_OPS]
        self.ndim = self.graph.specs[convs[0]].ndim
        self.itemsize = torch.empty(0, dtype=_storage_dtype(tensors, convs)).element_size()
        self._scanned: dict[int, tuple[Conv, bool]] = {}  # id -> (the conv, held so the id stays its own; finite)

    def run(self) -> None:
        region, graph = self.region, self.graph
        problem = self._problem()
        self._whole: Optional[Reducer] = None if problem else self._reducer(region.input, region.layers)
        whole = None if self._whole is None else self._whole.result(region.output)
        units: list[tuple[str, tuple[str, ...], str, Reduction]] = []
        if whole is not None and region.items is not None:
            units = self._sequence(region.items, region.input).units
        elif whole is not None and self._exact(whole, region.input):
            units = [(region.input, region.layers, region.output, whole)]
        built = [self._unit(*u) for u in units]
        self.plan.units += built
        applied = any(set(u.layers) == set(region.layers) and u.refused is None for u in built)
        self.plan.regions.append(self._entry(whole, problem, applied))
        del graph

    def _problem(self) -> Optional[str]:
        """Why this region cannot be judged at all (the judgement needs every layer's numbers)."""
        bad = [n for n in self.region.layers if not self.loader.finite(n)]
        if bad:
            return f"{bad[0]} has NaN or Inf in its tensors, so the region is not merged"
        for name in self.region.layers:
            layer = self.graph.layers[name]
            if layer.op == "pad" and self.ndim == 0:
                return f"pad {name} pads a value with no spatial axes (the linear layers' [N, C])"
            if layer.op == "pad" and self.graph.pads[name].axes_given() not in (None, self.ndim):
                return f"pad {name} names {self.graph.pads[name].axes_given()} axes but the convs have {self.ndim}"
            if layer.op in POOL_OPS and self.graph.pools[name].ndim != self.ndim:
                return f"{name} pools {self.graph.pools[name].ndim} axes but the convs have {self.ndim}"
            if layer.op in CONV_OPS and self.graph.specs[name].ndim != self.ndim:
                return f"{name} convolves {self.graph.specs[name].ndim} axes, other convs {self.ndim}"
        if self._channels(self.region.input) is None:
            return f"the channel count of {self.region.input} is unknown"
        return None

    def _finite(self, conv: Conv) -> bool:
        """`_finite`, once per reduced conv: the programme asks again for each segment and the region's entry (FastViT's
        float64 kernels of 170 MB were scanned several times each)."""
        found = self._scanned.get(id(conv))
        if found is None or found[0] is not conv:
            sure = isinstance(conv, algebra.Deferred) and conv.surely_finite()  # its kernel not composed for it
            found = self._scanned[id(conv)] = (conv, sure or _finite(conv))
        return found[1]

    def _channels(self, value: str) -> Optional[int]:
        return self.graph.channels.get(value)

    def _reducer(self, start: str, layers: Sequence[str]) -> Reducer:
        reducer = Reducer(self.graph, self.loader, start, self._channels(start), self.ndim)  # type: ignore[arg-type]
        for name in layers:
            reducer.add(name)
        return reducer

    def _exact(self, red: Reduction, start: str) -> bool:
        """Exact at every size, or at the given size where it is known (and finite: a batch norm with a
        negative variance folds into NaN)."""
        if red.conv is None or not self._finite(red.conv):
            return False
        verdict = red.summary.verdict
        here = self.size_at.get(start)
        if verdict is Outcome.MERGEABLE:
            return here is None or all(c.exact_at(here) for c in red.checks)
        return verdict is Outcome.SIZE_DEPENDENT and here is not None and all(c.exact_at(here) for c in red.checks)

    # The dynamic programme over a sequence of items (steps and parallel blocks).

    def _sequence(self, items: Sequence[Item], start: str) -> _Option:
        ends = [start] + [_end(item) for item in items]
        best: list[Optional[_Option]] = [_Option((0.0, 0.0), [])] + [None] * len(items)
        for i in range(len(items)):
            prev = best[i]
            if prev is None:
                continue
            kept = self._kept(items[i], ends[i])
            self._offer(best, i + 1, prev, kept)
            # From the region's input, the whole region's reduction already holds every part (the same steps).
            whole = ends[i] == self.region.input and self._whole is not None
            reducer = self._whole if whole else self._reducer(ends[i], ())
            layers: list[str] = []
            for j in range(i, len(items)):
                mine = set(layers_of((items[j],)))
                new = [n for n in self.region.layers if n in mine]
                if not all(self.loader.finite(n) for n in new):
                    break
                for name in new if not whole else ():
                    reducer.add(name)  # type: ignore[union-attr]
                layers += new
                red = reducer.result(ends[j + 1])  # type: ignore[union-attr]
                if not self._exact(red, ends[i]):
                    if self.graph.layers[ends[j + 1]].op == "pad":
                        continue  # the conv after a pad may never read its border (reduce: _through_pad)
                    break  # a segment that is not one conv does not become one by growing (DESIGN: chains)
                if len(layers) >= 2:
                    estimate = cost(red.conv.spec, self._cost_size(ends[i]), self.itemsize)  # type: ignore[union-attr]
                    self._offer(best, j + 1, prev, _Option(self._score(1, estimate),
                                                           [(ends[i], tuple(layers), ends[j + 1], red)]))
        return best[-1]  # type: ignore[return-value]

    def _offer(self, best: list[Optional[_Option]], j: int, prev: _Option, step: _Option) -> None:
        total = _Option((prev.score[0] + step.score[0], prev.score[1] + step.score[1]), prev.units + step.units)
        if best[j] is None or total.score < best[j].score:  # type: ignore[union-attr]
            best[j] = total

    def _kept(self, item: Item, start: str) -> _Option:
        """An item left as it is (a block's branches still planned)."""
        if isinstance(item, Step):
            return _Option(self._score(1, self._op_cost(item.layer)), [])
        total = _Option(self._score(1, self._op_cost(item.join)), [])
        for branch in item.branches:
            sub = self._sequence(branch, item.split)
            total = _Option((total.score[0] + sub.score[0], total.score[1] + sub.score[1]), total.units + sub.units)
        return total

    def _score(self, layers: int, estimate: float) -> tuple[float, float]:
        return (estimate, layers) if self.plan.policy == "cheaper" else (layers, estimate)

    def _cost_size(self, value: str) -> tuple[int, ...]:
        return self.cost_at.get(value) or (DEFAULT_COST_SIZE,) * self.ndim

    def _op_cost(self, name: str) -> float:
        """A layer left as it is, in the cost model's units."""
        layer = self.graph.layers[name]
        if layer.op in CONV_OPS:
            return cost(self.graph.specs[name], self._cost_size(layer.inputs[0]), self.itemsize)
        if ops.kind(layer.op) is ops.Kind.PASS:
            return 0.0
        channels = self._channels(name) or 1
        size_out = self._cost_size(name)
        size_in = [self._cost_size(s) for s in layer.inputs]
        elements = channels * (math.prod(size_out) + sum(math.prod(s) for s in size_in))
        work = channels * math.prod(size_out) * (math.prod(self.graph.pools[name].kernel) if layer.op in POOL_OPS else 1)
        return work + BYTE_WEIGHT * self.itemsize * elements + LAYER_OVERHEAD

    # Building what was chosen.

    def _unit(self, start: str, layers: tuple[str, ...], end: str, red: Reduction) -> Unit:
        graph = self.graph
        convs = [n for n in layers if graph.layers[n].op in CONV_OPS]
        dtype = _storage_dtype(self.tensors, convs, layers)
        merged = red.conv
        assert merged is not None
        here = self.size_at.get(start)
        exact_everywhere = red.summary.verdict is Outcome.MERGEABLE
        sizes = verification_sizes(graph, layers, start, merged.spec, None if exact_everywhere else here)
        if not sizes:
            raise VerificationError(f"{end}: no input size where both the layers and the merged conv run")
        stored = algebra.cast(merged, dtype)
        tolerance = max([VERIFY_TOLERANCE] + [c.tolerance for c in red.checks])
        at = self._cost_size(start)
        before_macs = sum(macs(graph.specs[n], self._cost_size(graph.layers[n].inputs[0])) for n in convs)
        unit = Unit(unit_name(graph, set(layers), end), start, end, layers, stored, dtype, math.nan, math.nan,
                    before_macs, macs(merged.spec, at), sum(params(graph.specs[n]) for n in convs),
                    params(merged.spec), None,
                    tuple("conv" if graph.layers[n].op in CONV_OPS else graph.layers[n].op for n in layers),
                    exact_everywhere)

        check = _checker(graph, self.loader, unit, [merged, stored], sizes, tolerance)
        room = self.plan.keep_bytes - self.plan.kept_bytes - self.plan.pending_bytes
        if self.verify_later and _nbytes(merged) <= LATER_MAX and _nbytes(merged) + _nbytes(stored) <= room:
            self.plan.pending_bytes += _nbytes(merged)
            self.plan.pending.append(_then_clear(check, self.loader))
        else:
            check()
        self._keep_or_drop(unit, start, end)
        return unit

    def _keep_or_drop(self, unit: Unit, start: str, end: str) -> None:
        """Hold the verified weight while the plan's budget lasts; past it keep a recipe and a digest."""
        weight = unit.kept.weight
        size = weight.numel() * weight.element_size()
        if unit.refused is not None or self.plan.kept_bytes + self.plan.pending_bytes + size <= self.plan.keep_bytes:
            self.plan.kept_bytes += size if unit.refused is None else 0
            return
        graph, tensors, layers, dtype = self.graph, self.tensors, unit.layers, unit.dtype
        channels, ndim, threads = self._channels(start), self.ndim, algebra.run_threads()

        def recipe() -> Conv:
            with algebra.single_threaded(threads):  # the same thread count: a threaded GEMM's sums may depend on it
                reducer = Reducer(graph, Loader(graph, tensors), start, channels, ndim)  # type: ignore[arg-type]
                for name in layers:
                    reducer.add(name)
                return algebra.cast(reducer.result(end).conv, dtype)  # type: ignore[arg-type]

        unit.digest, unit.recipe = _digest(unit.kept), recipe
        unit.kept = Conv(unit.kept.spec, torch.empty(weight.shape, dtype=weight.dtype, device="meta"), unit.kept.bias)

    def _entry(self, whole: Optional[Reduction], problem: Optional[str], applied: bool) -> RegionEntry:
        region, graph = self.region, self.graph
        convs = [n for n in region.layers if graph.layers[n].op in CONV_OPS]
        before = sum(macs(graph.specs[n], self._cost_size(graph.layers[n].inputs[0])) for n in convs)
        entry = RegionEntry(input=region.input, output=region.output, layers=list(region.layers),
                            verdict="skipped", reason=f"not merged: {problem}" if problem else "",
                            branches=sum(1 for n in region.layers if graph.layers[n].op in JOIN_OPS) > 0,
                            applied=applied, macs_before=before)
        if whole is None:
            return entry
        s = whole.summary
        if whole.conv is not None and not self._finite(whole.conv):
            entry.reason = "not merged: its layers fold into NaN or Inf (a batch norm's variance below zero?)"
            return entry
        if whole.conv is None:
            entry.reason = "not merged: " + (s.why.text() if s.why else "the branches share no output grid")
            return entry
        here = self.size_at.get(region.input)
        exact_here = None if here is None else all(c.exact_at(here) for c in whole.checks)
        entry.verdict = "skipped" if s.verdict is Outcome.UNDECIDED else s.verdict.value
        entry.reason = sentence(s.verdict, s.why, s.sizes, s.notes)
        entry.sizes, entry.exact_here, entry.weight_dependent = s.sizes, exact_here, s.weight_dependent
        exact = s.verdict is Outcome.MERGEABLE or exact_here is True
        entry.merged = padding_fields(whole.conv.spec) if exact else None
        entry.candidate = padding_fields(whole.conv.spec)
        entry.macs_after = macs(whole.conv.spec, self._cost_size(region.input)) if exact else None
        if s.verdict in (Outcome.UNMERGEABLE, Outcome.SIZE_DEPENDENT) and not exact:
            entry.find_counterexample = self._finder(whole.checks, here if exact_here is False else None)
        return entry

    def _finder(self, checks: Sequence[Any], fail_at: Optional[Sequence[int]]) -> Callable[[], Found]:
        """The region's counterexample search, run when something reads it; it holds no tensors meanwhile
        (the candidate is computed again from the layers, read again)."""
        graph, tensors, region = self.graph, self.tensors, self.region
        start, layers, end = region.input, region.layers, region.output
        channels, ndim = self._channels(start), self.ndim

        def find() -> Found:
            with algebra.single_threaded():
                loader = Loader(graph, tensors)
                reducer = Reducer(graph, loader, start, channels, ndim)  # type: ignore[arg-type]
                for name in layers:
                    reducer.add(name)
                conv = reducer.result(end).conv
                return _counterexample(graph, loader, start, layers, end, conv,  # type: ignore[arg-type]
                                       checks, fail_at)
        return find


Found = tuple[Optional[Counterexample], str]
"""A counterexample (or None), and where there is none the reason kind saying why: inputs were tried and showed
no difference ('no-counterexample'), none could be tried ('nothing-tried'), or the search's bound
(algebra.Budget) stopped it first ('search-bounded')."""
Size = tuple[int, ...]


def _counterexample(graph: Graph, loader: Loader, start: str, layers: Sequence[str], end: str, cand: Conv,
                    checks: Sequence[Any], size: Optional[Sequence[int]]) -> Found:
    """A concrete input where the layers and the forced single conv differ (at `size`, or the smallest)."""
    periodic = [c for c in checks if c.period]

    def stand_in(s: Size) -> Optional[Size]:
        if not periodic:
            return None
        return tuple(_congruent(n, max(c.start[k] for c in periodic), math.lcm(*(c.period[k] for c in periodic)))
                     for k, n in enumerate(s))

    return _search(lambda x: reference.run(graph, loader, start, layers, end, x), cand, size,
                   lambda s: all(c.exact_at(s) for c in checks), lambda s: layers_run(graph, layers, start, s,
                                                                                      cand.spec), stand_in)


def _search(run: Callable[[torch.Tensor], torch.Tensor], cand: Conv, size: Optional[Sequence[int]],
            exact_at: Callable[[Size], bool], runs: Callable[[Size], bool],
            stand_in: Callable[[Size], Optional[Size]], unfolds: int = 0) -> Found:
    """The first size (`size`, or 1, 2, ... per axis) where the layers run and are not exact, searched for a
    counterexample; a large size at its congruent stand-in past the border interactions (same exactness)."""
    tries = [tuple(size)] if size else [(n,) * cand.spec.ndim for n in range(1, 65)]
    tried = False
    budget = algebra.Budget()  # one bound for every size tried
    for s in tries:
        if exact_at(s) or not runs(s):
            continue
        if not budget.allows():
            break
        try:
            found = algebra.counterexample(run, cand, s, cand.spec.in_channels, stand_in=stand_in(s), unfolds=unfolds,
                                           budget=budget)
        except RuntimeError:  # PyTorch refuses the candidate's padding at this size
            continue
        tried = True
        if found is not None:
            return found, ""
    return None, "search-bounded" if budget.spent else "no-counterexample" if tried else "nothing-tried"


def _congruent(n: int, start: int, period: int) -> int:
    """n itself below start + period; else the length in [start, start + period) with n's residue."""
    return n if n < start + period else start + (n - start) % period


# --- pairs ---------------------------------------------------------------------------------------


def _judge_pair(graph: Graph, loader: Loader, pair: Any, size_at: Mapping[str, Any],
                cost_at: Mapping[str, Any]) -> PairEntry:
    """An adjacent conv pair (conv, batch norms/identity, conv) with its own verdict (FORMAT.md section 3)."""
    if pair.blocked is not None:
        return PairEntry(pair.first, pair.second, list(pair.via), "skipped", f"not merged: {pair.blocked.text()}")
    names = [pair.first, *pair.via, pair.second]
    a = loader.conv(pair.first)
    for v in pair.via:
        if ops.kind(graph.layers[v].op) is ops.Kind.AFFINE:
            a = algebra.fold_bn(a, loader.bn(v))
    b = loader.conv(pair.second)
    bad = next((n for n in names if not loader.finite(n)), None) or (None if _finite(a) else pair.via[-1])
    if bad is not None:
        return PairEntry(pair.first, pair.second, list(pair.via), "skipped",
                         f"{bad} has NaN or Inf in its tensors (or once its batch norm is folded), "
                         f"so {pair.first} -> {pair.second} is not merged")
    v = algebra.analyze(a, b)
    src = graph.layers[pair.first].inputs[0]
    here = size_at.get(src)
    at = cost_at.get(src) or (DEFAULT_COST_SIZE,) * a.spec.ndim
    mid = a.spec.out_size(at)
    exact_here = None if here is None or v.verdict is Outcome.UNDECIDED else v.exact_at(here)
    exact = v.verdict is Outcome.MERGEABLE or exact_here is True
    entry = PairEntry(
        first=pair.first, second=pair.second, via=list(pair.via),
        verdict="skipped" if v.verdict is Outcome.UNDECIDED else v.verdict.value, reason=v.reason, sizes=v.sizes,
        merged=padding_fields(v.candidate) if exact else None, exact_here=exact_here,
        macs_before=macs(a.spec, at) + macs(b.spec, mid), macs_after=macs(v.candidate, at) if exact else None,
        params_before=params(a.spec) + params(b.spec), params_after=params(v.candidate) if exact else None,
        weight_dependent=v.weight_dependent)
    if v.verdict is Outcome.UNMERGEABLE or (v.verdict is Outcome.SIZE_DEPENDENT and exact_here is False):
        entry.find_counterexample = _pair_finder(graph, loader.tensors, pair, v, here if exact_here is False else None)
    return entry


def _mark_applied(plan: Plan) -> None:
    """A judged pair is applied where one applied merge holds both its convs (a pair skipped unjudged,
    blocked or not finite, has no MACs and is never applied)."""
    together = {n: u.name for u in plan.applied for n in u.layers}
    for entry in plan.pairs:
        if entry.macs_before is not None:
            first = together.get(entry.first)
            entry.applied = first is not None and first == together.get(entry.second)


def _pair_finder(graph: Graph, tensors: Tensors, pair: Any, v: Any,
                 size: Optional[Sequence[int]]) -> Callable[[], Found]:
    """A pair's search, run when something reads it; it holds no tensors meanwhile (read again then)."""
    def find() -> Found:
        with algebra.single_threaded():
            loader = Loader(graph, tensors)
            a = loader.conv(pair.first)
            for name in pair.via:
                if ops.kind(graph.layers[name].op) is ops.Kind.AFFINE:
                    a = algebra.fold_bn(a, loader.bn(name))
            return pair_counterexample(a, loader.conv(pair.second), v, size)()
    return find


def pair_counterexample(a: Conv, b: Conv, v: Any, size: Optional[Sequence[int]]) -> Callable[[], Found]:
    """The search for a pair's counterexample, run when something reads it: first on one input and one output
    channel of a dense pair (slicing is exact, and the whole width costs minutes at 1024 channels), then,
    where that finds none, on every channel."""
    def search(a: Conv, b: Conv) -> Found:
        an = v.analysis
        cand = replace(v.candidate, in_channels=a.spec.in_channels, out_channels=b.spec.out_channels)
        return _search(lambda x: algebra.apply_chain([a, b], x), algebra.merge(a, b, cand), size, v.exact_at,
                       lambda s: all(chain_runs([a, b], k, n) for k, n in enumerate(s)),
                       lambda s: tuple(_congruent(n, an.start[k], an.period[k]) for k, n in enumerate(s)),
                       max(c.spec.in_channels * math.prod(c.spec.kernel_size) for c in (a, b)))

    def find() -> Found:
        narrow = a.spec.groups == b.spec.groups == 1 and (a.spec.in_channels > 1 or b.spec.out_channels > 1)
        if narrow:
            i = int(a.weight.abs().flatten(2).sum((0, 2)).argmax())  # the input and output channels with the most weight
            o = int(b.weight.abs().flatten(1).sum(1).argmax())
            a_i = Conv(replace(a.spec, in_channels=1), a.weight[:, i:i + 1], a.bias)
            b_o = Conv(replace(b.spec, out_channels=1), b.weight[o:o + 1], None if b.bias is None else b.bias[o:o + 1])
            found, why = search(a_i, b_o)
            if found is not None:
                return _widened(found, a_i, b, v, a.spec.in_channels, i, o), why
            if why == "search-bounded":  # the whole width, slower per trial, would stop on the same bound
                return found, why
        return search(a, b)
    return find


def _widened(found: Counterexample, a_i: Conv, b: Conv, v: Any, in_channels: int, i: int, o: int) -> Counterexample:
    """A counterexample found on input channel i and output channel o, as one of the whole pair: the input
    zero on every other channel, both outputs on every channel (input channel i of the candidate is the
    merge of a's column i with b)."""
    x = found.input
    cand_i = algebra.merge(a_i, b, replace(v.candidate, in_channels=1))
    wide = torch.zeros(x.shape[0], in_channels, *x.shape[2:], dtype=x.dtype)
    wide[:, i] = x[:, 0]
    index = (found.index[0], o, *found.index[2:])
    return replace(found, input=wide, pair_output=algebra.apply_chain([a_i, b], x),
                   candidate_output=algebra.apply(cand_i, x), index=index)


# --- small helpers ---------------------------------------------------------------------------------


def _finite(conv: Conv) -> bool:
    return algebra.all_finite(conv.weight) and (conv.bias is None or algebra.all_finite(conv.bias))


def _end(item: Item) -> str:
    return item.layer if isinstance(item, Step) else item.join


def _unit_tensors(unit: Unit) -> list[tuple[str, Any]]:
    kept = unit.kept
    weight: Any = kept.weight.contiguous()
    if unit.dropped:
        from ..io import LazyTensor, dtype_name

        weight = LazyTensor(dtype_name(kept.weight.dtype), tuple(kept.weight.shape),
                            lambda: unit.stored.weight.contiguous())
    out = [(f"{unit.name}.weight", weight)]
    if kept.bias is not None:
        out.append((f"{unit.name}.bias", kept.bias.contiguous()))
    return out


def _checker(graph: Graph, loader: Loader, unit: Unit, merged: list[Conv], sizes: Sequence[tuple[int, ...]],
             tolerance: float) -> Callable[[], bool]:
    """A merge's verification (verify.py): it records the errors and says whether the stored weights refuse the
    merge.  It holds only what it needs (not the planner's reductions), since it may wait for `Plan.verify`."""
    def check() -> bool:
        checked = verify_merge(graph, loader, unit.input, unit.layers, unit.output, merged, sizes)
        errors = checked.errors
        if not errors[0] <= tolerance:
            raise VerificationError(f"{unit.output}: the merged conv differs from its layers by {errors[0]:.3g} "
                                    f"(relative) at sizes {list(sizes)}")
        unit.error, unit.rounding, unit.checked_macs = errors[0], errors[1], checked.macs
        unit.refused = storage_problem(errors[1], unit.dtype)
        return unit.refused is not None
    return check


def _nbytes(conv: Conv) -> int:
    return sum(t.numel() * t.element_size() for t in (conv.weight, conv.bias) if t is not None)


def _then_clear(check: Callable[[], bool], loader: Loader) -> Callable[[], bool]:
    """A verification run after its region: the layers' float64 copies it loads are let go after it."""
    def run() -> bool:
        try:
            return check()
        finally:
            loader.clear()
    return run


def _digest(conv: Conv) -> str:
    h = hashlib.sha256()
    for t in (conv.weight, conv.bias):
        if t is not None:
            h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _merge_entry(u: Unit) -> MergeEntry:
    from ..io import dtype_name

    conv = padding_fields(u.spec) if isinstance(u.spec, ConvSpec) else {**transpose_fields(u.spec), "transposed": True}
    return MergeEntry(layers=list(u.layers), into=u.name, conv=conv, dtype=dtype_name(u.dtype),
                      max_error=u.error, rounding_error=u.rounding, macs_before=u.macs_before,
                      macs_after=u.macs_after, params_before=u.params_before, params_after=u.params_after,
                      input=u.input, kind="bn-fold" if u.bn_fold else "merge",
                      convs=u.kinds.count("conv") + u.kinds.count("conv_transpose"))


def _torch_dtype(name: str) -> torch.dtype:
    from ..io import torch_dtype

    return torch_dtype(name)


def _storage_dtype(tensors: Tensors, convs: Sequence[str], others: Sequence[str] = ()) -> torch.dtype:
    """The dtype merged weights are stored in: the convs' weights' (promoted), else the other layers'
    tensors' (a pooling and a batch norm merged without a conv), else (pools, pads and adds alone) the
    model's: the first floating-point tensor's."""
    keys = [f"{n}.weight" for n in convs] or [k for n in others for k in (f"{n}.running_var", f"{n}.value",
                                                                          f"{n}.weight", f"{n}.bias")]
    dtype = None
    for key in keys:
        info = tensors.info.get(key)
        if info is None:
            continue
        t = _dtype_of(info)
        dtype = t if dtype is None else torch.promote_types(dtype, t)
    if dtype is None:
        dtype = next((_dtype_of(info) for info in tensors.info.values() if getattr(info, "is_float", False)), None)
    return dtype or torch.float32


def _dtype_of(info: Any) -> torch.dtype:
    return info.dtype if isinstance(info.dtype, torch.dtype) else _torch_dtype(info.dtype)


def _nominal(graph: Graph, input_size: Optional[Sequence[int]]) -> Optional[tuple[int, ...]]:
    if input_size:
        return tuple(input_size)
    dims = {spec.ndim for spec in graph.specs.values()} - {0}  # linear layers have no size to assume
    return (DEFAULT_COST_SIZE,) * dims.pop() if len(dims) == 1 else None


def _check_sizes(graph: Graph, size_at: Mapping[str, Any], input_size: Optional[Sequence[int]]) -> None:
    """An --input-size at which the model itself cannot run is bad input, named by its first victim."""
    from ..maths.spec import size_problem

    for name, layer in graph.layers.items():
        spec = graph.specs.get(name) or graph.pools.get(name)
        n = size_at.get(layer.inputs[0]) if spec is not None else None
        problem = None if n is None or (len(n) != spec.ndim and spec.ndim) else \
            size_problem(spec, n) if isinstance(spec, ConvSpec) else spec.size_problem(n)
        if problem:
            shown = "x".join(map(str, input_size or ()))
            raise GraphError(f"--input-size {shown}: layer '{name}' cannot run there: {problem}")


def _nothing_note(plan: Plan) -> None:
    """When nothing merges, say what was found: where the convs sit and why their regions stay."""
    if plan.applied:
        return
    graph = plan.graph
    convs = [n for n, layer in graph.layers.items() if layer.op in CONV_OPS]
    inside = {n for r in plan.regions for n in r.layers}
    verdicts = Counter(r.verdict for r in plan.regions)
    kept = sum(r.verdict == "mergeable" for r in plan.regions)
    judged = ", ".join(f"{count} {verdict}" for verdict, count in sorted(verdicts.items()))
    plan.notes.append(
        f"nothing merged: {len(convs)} conv(s); {sum(n in inside for n in convs)} in {len(plan.regions)} region(s) "
        f"({sum(r.branches for r in plan.regions)} with parallel branches{'; ' + judged if judged else ''}"
        f"{f'; the {kept} mergeable one(s) would cost more merged (--policy all merges them)' if kept else ''}); "
        f"{sum(n not in inside for n in convs)} conv(s) between non-linear or opaque ops, or read by several layers, "
        "with no linear neighbour to merge with")


BN_NOTES = 20  # batch norms named one by one; the rest are counted


def _batch_norm_notes(plan: Plan) -> None:
    """Name each batch norm left unfolded, with the op that stops it (what a user compares with a deploy
    conversion that folds more, e.g. a BN after a Linear)."""
    graph = plan.graph
    folded = {name for u in plan.applied for name in u.layers}
    left = [n for n, layer in graph.layers.items() if layer.op == "batch_norm" and n not in folded]
    for name in left[:BN_NOTES]:
        plan.notes.append(f"batch norm '{name}' is not folded: {_bn_blocker(plan, name)}")
    if len(left) > BN_NOTES:
        plan.notes.append(f"{len(left) - BN_NOTES} more batch norm(s) not folded")


def _bn_blocker(plan: Plan, name: str) -> str:
    graph = plan.graph
    source = graph.layers[name].inputs[0]
    producer = graph.layers.get(source)
    if producer is None:
        return f"it reads the model input '{source}', and no linear layer after it could take it"
    if producer.op not in LINEAR_OPS:
        return f"it reads '{source}' ({producer.op}), which convmerge treats as opaque (not linear here)"
    others = [c for c in graph.consumers.get(source, []) if c != name]
    if others or source in graph.outputs:
        return f"its input '{source}' is also " + (f"read by '{others[0]}'" if others else "a model output")
    unit = next((u for u in plan.units if name in u.layers and u.refused), None)
    if unit is not None:
        return unit.refused.text()
    region = next((r for r in plan.regions if name in r.layers), None)
    if region is not None:
        costlier = "; merged it would cost more" if region.verdict == "mergeable" else ""
        return f"the region '{region.input}' -> '{region.output}' holding it stays unmerged ({region.verdict}{costlier})"
    return f"it reads '{source}' ({producer.op}), and no conv reaches it through linear layers alone"


def _size_notes(plan: Plan, size_at: Mapping[str, Any], input_size: Optional[Sequence[int]]) -> None:
    """Say where sizes were lost (behind an op whose output size the description does not fix)."""
    if not input_size:
        return
    graph = plan.graph
    lost = [n for n, spec in graph.specs.items() if spec.ndim and size_at.get(graph.layers[n].inputs[0]) is None]
    if lost:
        first = lost[0]
        plan.notes.append(f"input sizes unknown for {len(lost)} conv(s) from '{first}' on (after an op whose output "
                          f"size the description does not fix): their costs assume {DEFAULT_COST_SIZE} per axis and "
                          "size-dependent merges there are not made")
