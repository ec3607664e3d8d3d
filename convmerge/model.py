"""Whole models: find the description, judge every pair, plan the merges, write the fused file.

Header first, tensors later (as mergekit does): planning reads only the weights of conv
chains, one chain at a time; writing streams every untouched tensor byte for byte and
recomputes each merged conv just before it is written, so memory follows the largest chain,
not the file.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from . import algebra, chain, io
from .algebra import BatchNorm, Conv
from .graph import (MAX_DESCRIPTION_BYTES, Graph, GraphError, load_description, parse,
                    removed_tensors, rewrite)
from .report import MergeEntry, PairEntry, Report
from .spec import ConvSpec, fit_size, macs, padding_fields, params, size_problem

GRAPH_KEY = "convmerge.graph"
DEFAULT_COST_SIZE = 224
"""Spatial size per axis the cost model assumes where neither --input-size nor the graph tells."""


@dataclass(frozen=True)
class Tensors:
    """Where a model's tensors come from: their metadata now, their values on demand."""

    info: Mapping[str, Any]  # name -> object with .shape, .dtype, .is_float
    get: Callable[[str], torch.Tensor]


@dataclass(frozen=True)
class MergePlan:
    """One merged segment: its layers (convs and what lies between), and what replaces them."""

    layers: list[str]
    convs: list[str]
    spec: ConvSpec
    dtype: torch.dtype


class ModuleTensor:
    """Tensor metadata for a state-dict entry, shaped like io.TensorInfo."""

    def __init__(self, t: torch.Tensor) -> None:
        self.shape = tuple(t.shape)
        self.dtype = io.dtype_name(t.dtype)
        self.is_float = t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def file_tensors(header: io.Header) -> Tensors:
    return Tensors(header.tensors, lambda name: io.read_tensor(header, name))


def module_tensors(state: Mapping[str, torch.Tensor]) -> Tensors:
    return Tensors({k: ModuleTensor(v) for k, v in state.items()}, lambda name: state[name].detach())


def find_description(header: io.Header, graph_file: Optional[str] = None, arch: Optional[str] = None) -> tuple[dict, str]:
    """The description from --graph, else the header, else by tracing --arch (FORMAT.md, section 1)."""
    if graph_file:
        return load_description(_read_sidecar(graph_file), graph_file), graph_file
    if GRAPH_KEY in header.metadata:
        where = f"{header.path}: header key '{GRAPH_KEY}'"
        return load_description(header.metadata[GRAPH_KEY], where), where
    if arch:
        from . import trace

        return trace.describe_module(trace.build_module(arch), arch).doc, f"--arch {arch}"
    raise GraphError(
        f"{header.path}: no graph description: pass --graph FILE or --arch MODULE:CALLABLE "
        "(or store one with `convmerge annotate`); convmerge never guesses how layers connect"
    )


def _read_sidecar(path: str) -> str:
    """A --graph file: a regular file (not a FIFO or /dev/zero) of bounded size, UTF-8."""
    try:
        with open(path, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise GraphError(f"{path}: not a regular file; pass a JSON description file")
            raw = f.read(MAX_DESCRIPTION_BYTES + 1)
    except OSError as e:
        raise GraphError(f"{path}: cannot read the description ({e.strerror or e})") from None
    if len(raw) > MAX_DESCRIPTION_BYTES:
        raise GraphError(f"{path}: description is over {MAX_DESCRIPTION_BYTES} bytes; refused")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GraphError(f"{path}: description is not UTF-8 ({e.reason} at byte {e.start})") from None


def analyze(
    graph: Graph,
    tensors: Tensors,
    input_size: Optional[Sequence[int]] = None,
    policy: str = "cheaper",
    on_chain: Optional[Callable[[], None]] = None,
) -> tuple[Report, list[MergePlan]]:
    """Judge every pair and plan the merges; every planned merge has been verified in float64."""
    if input_size is not None:
        dims = sorted({spec.ndim for spec in graph.specs.values()}) or [len(input_size)]
        input_size = fit_size(input_size, dims[0])
    size_at = graph.sizes(input_size)
    _check_sizes(graph, size_at, input_size)
    nominal = graph.sizes(_nominal(graph, input_size))
    entries: dict[tuple[str, str], PairEntry] = {}
    plans: list[MergePlan] = []
    merges: list[MergeEntry] = []
    for run in graph.chains():
        names = [run[0].first] + [p.second for p in run]
        tail = graph.trailing(names[-1])  # a batch norm after the last conv folds into a merge ending there
        convs = [load_conv(graph, tensors, n, via) for n, via in zip(names, [p.via for p in run] + [tail])]
        for piece in _finite_pieces(names, convs, run, entries):
            p_names, p_convs, p_run = piece
            p_tail = tail if p_names[-1] == names[-1] else []
            src = graph.layers[p_names[0]].inputs[0]
            here, cost_in = size_at.get(src), nominal.get(src) or (DEFAULT_COST_SIZE,) * p_convs[0].spec.ndim
            cost_sizes = chain.sizes_along(p_convs, cost_in)
            pair_reports = chain.judge_pairs(p_convs, here)
            dtype = _storage_dtype(tensors, p_names)
            segments = chain.plan(p_convs, here, policy, nominal=cost_in, pairs=pair_reports, dtype=dtype)
            applied = {t for s in segments if s.merged for t in range(s.start, s.stop - 1)}
            refused = {t: s.refused for s in segments if s.refused for t in range(s.start, s.stop - 1)}
            for t, rep in enumerate(pair_reports):
                v = rep.verdict
                reason = v.reason + (f"; {refused[t]}" if t in refused else "")
                exact = v.verdict == "mergeable" or rep.exact_here is True
                entries[(p_names[t], p_names[t + 1])] = PairEntry(
                    p_names[t], p_names[t + 1], list(p_run[t].via),
                    "skipped" if v.verdict == "undecided" else v.verdict, reason, v.sizes,
                    padding_fields(v.candidate) if exact else None, rep.counterexample, rep.exact_here,
                    macs(p_convs[t].spec, cost_sizes[t]) + macs(p_convs[t + 1].spec, cost_sizes[t + 1]),
                    macs(v.candidate, cost_sizes[t]), t in applied,
                    params(p_convs[t].spec) + params(p_convs[t + 1].spec), params(v.candidate),
                )
            for seg in segments:
                if seg.merged:
                    seg_tail = p_tail if seg.stop == len(p_convs) else []
                    plan, entry = _plan_segment(tensors, p_names, p_run, p_convs, seg, cost_sizes, here, seg_tail)
                    plans.append(plan)
                    merges.append(entry)
            if on_chain:
                on_chain()
    cost = _nominal(graph, input_size)
    report = Report(policy=policy, input_size=list(input_size) if input_size else None,
                    cost_size=list(cost) if cost else None)
    for pair in graph.pairs():
        key = (pair.first, pair.second)
        report.pairs.append(entries.get(key) or PairEntry(pair.first, pair.second, list(pair.via), "skipped",
                                                           _skip_reason(pair.blocked)))
    report.merges = merges
    return report, plans


def merged_conv(graph: Graph, tensors: Tensors, plan: MergePlan) -> Conv:
    """Recompute a planned merge (deterministically, as verified) in its storage dtype."""
    vias = _vias(plan)
    convs = [load_conv(graph, tensors, n, via) for n, via in zip(plan.convs, vias)]
    return algebra.cast(chain.merge_run(convs), plan.dtype)


def fused_tensors(graph: Graph, tensors: Tensors, plans: Sequence[MergePlan], order: Sequence[str],
                  copy: Callable[[str], Any]) -> list[tuple[str, Any]]:
    """The output's tensors in the input's order: removed ones dropped, merged ones computed lazily."""
    drop: set[str] = set()
    replace: dict[str, MergePlan] = {}
    for plan in plans:
        drop.update(removed_tensors(graph, [n for n in plan.layers if n != plan.convs[-1]]))
        replace[plan.convs[-1]] = plan
    out: list[tuple[str, Any]] = []
    done: set[str] = set()
    for name in order:
        layer = name.rsplit(".", 1)[0]
        if name in drop or (layer in replace and name in (f"{layer}.weight", f"{layer}.bias")):
            if layer in replace and layer not in done:
                done.add(layer)
                out += _lazy_merged(graph, tensors, replace[layer])
            continue
        out.append((name, copy(name)))
    for layer, plan in replace.items():
        if layer not in done:
            out += _lazy_merged(graph, tensors, plan)
    return out


def fuse_file(
    path: str,
    out: str,
    *,
    graph_file: Optional[str] = None,
    arch: Optional[str] = None,
    input_size: Optional[Sequence[int]] = None,
    policy: str = "cheaper",
    force: bool = False,
    on_chain: Optional[Callable[[], None]] = None,
    before_write: Optional[Callable[[Report, dict], None]] = None,
) -> Report:
    """Read, plan, verify and write `<out>` atomically; the input is never modified.

    `before_write(report, description)` runs once everything is decided and before the model is
    written, so companions (a report file, an export) can fail without leaving a fused model.
    """
    header = io.read_header(path)
    doc, where = find_description(header, graph_file, arch)
    tensors = file_tensors(header)
    graph = parse(doc, header.tensors, where)
    report, plans = analyze(graph, tensors, input_size, policy, on_chain)
    metadata = dict(header.metadata)
    new_doc = rewrite(graph, [(p.layers, p.convs[-1], p.spec) for p in plans])
    metadata[GRAPH_KEY] = json.dumps(new_doc)
    metadata["format"] = "pt"
    report.source, report.description, report.output = os.fspath(path), where, os.fspath(out)
    if before_write is not None:
        before_write(report, new_doc)
    listing = fused_tensors(graph, tensors, plans, list(header.tensors), lambda n: header.tensors[n])
    io.write_model(out, listing, metadata, src=header, force=force)
    return report


def check_file(path: str, *, graph_file: Optional[str] = None, arch: Optional[str] = None,
               input_size: Optional[Sequence[int]] = None, policy: str = "cheaper",
               on_chain: Optional[Callable[[], None]] = None) -> Report:
    """The dry run: the same report as `fuse_file`, nothing written."""
    header = io.read_header(path)
    doc, where = find_description(header, graph_file, arch)
    graph = parse(doc, header.tensors, where)
    report, _ = analyze(graph, file_tensors(header), input_size, policy, on_chain)
    report.source, report.description = os.fspath(path), where
    return report


def _lazy_merged(graph: Graph, tensors: Tensors, plan: MergePlan) -> list[tuple[str, io.LazyTensor]]:
    """Weight and bias of one merged conv, computed once when the writer reaches the weight."""
    cache: dict[str, torch.Tensor] = {}
    name = plan.convs[-1]
    dtype = io.dtype_name(plan.dtype)

    def take(part: str) -> torch.Tensor:
        if not cache:
            conv = merged_conv(graph, tensors, plan)
            cache["weight"], cache["bias"] = conv.weight, conv.bias
        return cache.pop(part)

    out = [(f"{name}.weight", io.LazyTensor(dtype, plan.spec.weight_shape, lambda: take("weight")))]
    if plan.spec.bias:
        out.append((f"{name}.bias", io.LazyTensor(dtype, (plan.spec.out_channels,), lambda: take("bias"))))
    return out


def _plan_segment(
    tensors: Tensors, names: list[str], run: Sequence[Any], convs: list[Conv], seg: chain.Segment,
    cost_sizes: list[tuple[int, ...]], here: Optional[tuple[int, ...]], tail: Sequence[str],
) -> tuple[MergePlan, MergeEntry]:
    seg_names = names[seg.start:seg.stop]
    layers = [seg_names[0]]
    for t in range(seg.start, seg.stop - 1):
        layers += list(run[t].via) + [names[t + 1]]
    layers += list(tail)
    dtype = _storage_dtype(tensors, seg_names)
    spec = seg.conv.spec
    seg_convs = convs[seg.start:seg.stop]
    entry = MergeEntry(
        layers, seg_names[-1], padding_fields(spec), io.dtype_name(dtype), seg.error, seg.rounding,
        sum(macs(c.spec, cost_sizes[seg.start + i]) for i, c in enumerate(seg_convs)),
        macs(spec, cost_sizes[seg.start]),
        sum(params(c.spec) for c in seg_convs), params(spec),
    )
    return MergePlan(layers, seg_names, spec, dtype), entry


def load_conv(graph: Graph, tensors: Tensors, name: str, via: Sequence[str]) -> Conv:
    """A conv's weights in float64 with the batch norms after it (in `via`) folded in."""
    spec = graph.specs[name]
    bias = f"{name}.bias"
    conv = Conv(spec, tensors.get(f"{name}.weight").double(), tensors.get(bias).double() if bias in tensors.info else None)
    for v in via:
        if graph.layers[v].op == "batch_norm":
            bn = _load_bn(graph, tensors, v)
            if bn.mean.numel() != conv.spec.out_channels:
                raise GraphError(f"layer '{v}': tensor '{v}.running_mean' has {bn.mean.numel()} channels, "
                                 f"but conv '{name}' before it gives {conv.spec.out_channels}")
            conv = algebra.fold_bn(conv, bn)
    return conv


def _load_bn(graph: Graph, tensors: Tensors, name: str) -> BatchNorm:
    def opt(suffix: str) -> Optional[torch.Tensor]:
        key = f"{name}.{suffix}"
        return tensors.get(key).double() if key in tensors.info else None

    return BatchNorm(opt("running_mean"), opt("running_var"), float(graph.layers[name].fields.get("eps", 1e-5)),
                     opt("weight"), opt("bias"))


def _finite_pieces(names, convs, run, entries):
    """Split a chain at convs with NaN/Inf weights (after folding): those never merge."""
    bad = [not (bool(torch.isfinite(c.weight).all()) and (c.bias is None or bool(torch.isfinite(c.bias).all())))
           for c in convs]
    pieces, start = [], 0
    for t in range(len(convs) + 1):
        if t == len(convs) or bad[t]:
            if t - start >= 2:
                pieces.append((names[start:t], convs[start:t], run[start:t - 1]))
            start = t + 1
    for t in range(len(convs) - 1):
        if bad[t] or bad[t + 1]:
            culprit = names[t] if bad[t] else names[t + 1]
            entries[(names[t], names[t + 1])] = PairEntry(
                names[t], names[t + 1], list(run[t].via), "skipped",
                f"{culprit} has NaN or Inf in its weights (or its batch norm's), so this pair is not merged",
            )
    return pieces


def _vias(plan: MergePlan) -> list[list[str]]:
    """Per conv of the plan, the layers after it that it absorbs (batch norms fold into it)."""
    vias: list[list[str]] = []
    for name in plan.layers:
        if name in plan.convs:
            vias.append([])
        else:
            vias[-1].append(name)
    return vias


def _storage_dtype(tensors: Tensors, convs: Sequence[str]) -> torch.dtype:
    dtype = None
    for n in convs:
        t = io.torch_dtype(tensors.info[f"{n}.weight"].dtype)
        dtype = t if dtype is None else torch.promote_types(dtype, t)
    return dtype


def _nominal(graph: Graph, input_size: Optional[Sequence[int]]) -> Optional[tuple[int, ...]]:
    if input_size:
        return tuple(input_size)
    dims = {spec.ndim for spec in graph.specs.values()}
    return (DEFAULT_COST_SIZE,) * dims.pop() if len(dims) == 1 else None


def _check_sizes(graph: Graph, size_at: Mapping[str, Any], input_size: Optional[Sequence[int]]) -> None:
    """An --input-size at which the model itself cannot run is bad input, named by its first victim."""
    for name, spec in graph.specs.items():
        n = size_at.get(graph.layers[name].inputs[0])
        problem = size_problem(spec, n) if n is not None and len(n) == spec.ndim else None
        if problem:
            shown = "x".join(map(str, input_size or ()))
            raise GraphError(f"--input-size {shown}: layer '{name}' cannot run there: {problem}")


def _skip_reason(blocked: Optional[str]) -> str:
    return f"not merged: {blocked}"
