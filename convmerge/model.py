"""Whole model files: find the description, build the plan (plan.py), write the fused file.

Header first, tensors later (as mergekit does): planning reads the weights of one region at a
time; writing streams every untouched tensor byte for byte and takes each merged conv from the
plan, exactly as it was verified.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import torch

from . import io
from .engine import plan as planning
from .graph import MAX_DESCRIPTION_BYTES, Graph, GraphError, load_description, parse
from .engine.plan import Plan, Tensors
from .options import Options
from .reporting.report import Report

GRAPH_KEY = "convmerge.graph"


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


def traced_graph(module: Any, traced: Any) -> tuple[Graph, Tensors]:
    """The graph of a traced module (`trace.Traced`) and its tensors: the module's state and what the trace computed."""
    tensors = module_tensors({**module.state_dict(), **traced.tensors})
    graph = parse(traced.doc, tensors.info, "traced module")
    graph.notes[:0] = traced.notes
    return graph, tensors


@dataclass
class Described:
    """A model file with its description: the graph, where it came from, and its tensors, including
    those a trace computed that the file lacks (kernels computed from parameters, pad values)."""

    header: io.Header
    graph: Graph
    where: str
    tensors: Tensors
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def describe_file(path: str, graph_file: Optional[str] = None, arch: Optional[str] = None,
                  options: Options = Options()) -> Described:
    """Read a model's header and its description (FORMAT.md, section 1) and validate them together;
    an ``arch`` is traced keeping ``options.leaves`` opaque, at ``options.input_size`` (224 per axis when None)."""
    _safetensors_only(path)
    header = io.read_header(path)
    doc, where, extra, notes = _description(header, graph_file, arch, options.leaves, options.input_size)
    info = dict(header.tensors)
    info.update({k: ModuleTensor(v) for k, v in extra.items()})
    tensors = Tensors(info, lambda name: extra[name] if name in extra else io.read_tensor(header, name))
    graph = parse(doc, info, where)
    graph.notes[:0] = notes
    return Described(header, graph, where, tensors, extra, notes)


def find_description(header: io.Header, graph_file: Optional[str] = None, arch: Optional[str] = None) -> tuple[dict, str]:
    """The description from --graph, else the header, else by tracing --arch (FORMAT.md, section 1)."""
    doc, where, _, _ = _description(header, graph_file, arch, ())
    return doc, where


def _description(header: io.Header, graph_file: Optional[str], arch: Optional[str], leaves: Sequence[str],
                 input_size: Optional[Sequence[int]] = None) -> tuple[dict, str, dict[str, torch.Tensor], list[str]]:
    if graph_file:
        return load_description(_read_sidecar(graph_file), graph_file), graph_file, {}, _untraced(graph_file, arch,
                                                                                                  leaves)
    if GRAPH_KEY in header.metadata:
        where = f"{header.path}: header key '{GRAPH_KEY}'"
        return load_description(header.metadata[GRAPH_KEY], where), where, {}, _untraced(where, arch, leaves)
    if arch:
        from . import api
        from .frontends import trace

        traced = trace.describe_module(trace.build_module(arch), arch, leaves=leaves, example_size=input_size,
                                       runnable=False)
        if traced.missing:  # kernels computed from the weights: trace the module holding them
            traced = trace.describe_module(api.load_module(arch, header.path), arch, leaves=leaves,
                                           example_size=input_size, runnable=False)
        return traced.doc, f"--arch {arch}", dict(traced.tensors), list(traced.notes)
    raise GraphError(
        f"{header.path}: no graph description: pass --graph FILE or --arch MODULE:CALLABLE "
        "(or store one with `convmerge annotate`); convmerge never guesses how layers connect"
    )


def _untraced(where: str, arch: Optional[str], leaves: Sequence[str]) -> list[str]:
    """Notes for the tracing flags given where a description was found before tracing (FORMAT.md, section 1)."""
    notes = []
    if arch:
        notes.append(f"--arch {arch} was not traced: the description comes from {where}, which comes first "
                     "(--graph, then the file's header, then --arch)")
    if leaves:
        notes.append(f"--leaf {', '.join(map(str, leaves))} had no effect: nothing was traced")
    return notes


def _read_sidecar(path: str) -> str:
    """A --graph file: a regular file (not a FIFO or /dev/zero) of bounded size, UTF-8."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer, forever
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with open(fd, "rb") as f:
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


def analyze(graph: Any, tensors: Tensors, options: Options = Options(),
            on_region: Optional[Callable[[], None]] = None, verify_later: bool = False) -> Plan:
    """The plan for a parsed description and its tensors (every merge verified in float64, or by
    `Plan.verify` with `verify_later`)."""
    return planning.build(graph, tensors, options, on_region, verify_later=verify_later)


def fuse_file(
    path: str,
    out: str,
    options: Options = Options(),
    *,
    graph_file: Optional[str] = None,
    arch: Optional[str] = None,
    force: bool = False,
    on_region: Optional[Callable[[], None]] = None,
    before_write: Optional[Callable[[Report, dict], None]] = None,
    on_phase: Optional[Callable[[str], None]] = None,
) -> Report:
    """Read, plan, verify and write `<out>` atomically; the input is never modified.

    `before_write(report, description)` runs once everything is decided and verified, before the
    model is published, so companions (a report file, an export) can fail without leaving a fused model.
    `on_phase("verify")` says when planning is over and the checks left for the copy begin (`-v`).
    An ONNX file goes to onnx_model, which writes ONNX.
    """
    onnx_model = _onnx_reader(path, graph_file, arch, options.leaves)
    _same_format(path, os.fspath(out), onnx_model is not None)
    if onnx_model is not None:
        return onnx_model.fuse_file(path, out, options, force=force, on_region=on_region, before_write=before_write)
    model = describe_file(path, graph_file, arch, options)
    try:
        plan = analyze(model.graph, model.tensors, options, on_region, verify_later=True)
        return _write_fused(model, plan, path, out, force, before_write, on_phase)
    except _Refused:  # a merge verified beside the copy was refused for its dtype: the layout written was wrong
        plan = analyze(model.graph, model.tensors, options)
        return _write_fused(model, plan, path, out, force, before_write, on_phase)


class _Refused(Exception):
    pass


def _write_fused(model: Described, plan: Plan, path: str, out: str, force: bool,
                 before_write: Optional[Callable[[Report, dict], None]],
                 on_phase: Optional[Callable[[str], None]]) -> Report:
    """The output's layout comes from the plan's decisions; the merges left unverified are verified while
    the untouched tensors are copied, before any merged weight is written or the file published."""
    header, extra = model.header, model.extra
    new_doc = plan.description()
    metadata = dict(header.metadata)
    metadata[GRAPH_KEY] = json.dumps(new_doc)
    metadata["format"] = "pt"
    reports: list[Report] = []

    def verify() -> None:
        if on_phase is not None:
            on_phase("verify")
        if not plan.verify():
            raise _Refused
        report = plan.report()
        report.source, report.description, report.output = os.fspath(path), model.where, os.fspath(out)
        if before_write is not None:
            before_write(report, new_doc)
        reports.append(report)

    listing = plan.listing(list(header.tensors) + list(extra),
                           lambda n: extra[n].detach().cpu().contiguous() if n in extra else header.tensors[n])
    io.write_model(out, listing, metadata, src=header, force=force, alongside=verify)
    return reports[0]


def check_file(path: str, options: Options = Options(), *, graph_file: Optional[str] = None,
               arch: Optional[str] = None, on_region: Optional[Callable[[], None]] = None) -> Report:
    """The dry run: the same report as `fuse_file`, nothing written."""
    onnx_model = _onnx_reader(path, graph_file, arch, options.leaves)
    if onnx_model is not None:
        return onnx_model.check_file(path, options, on_region=on_region)
    model = describe_file(path, graph_file, arch, options)
    report = analyze(model.graph, model.tensors, options, on_region).report()
    report.source, report.description = os.fspath(path), model.where
    return report


def _same_format(path: str, out: str, onnx: bool) -> None:
    """The output is written in the input's format; an output named for the other one could not be read back."""
    written, other = (".onnx", ".safetensors") if onnx else (".safetensors", ".onnx")
    if out.lower().endswith(other):
        raise io.ModelFileError(f"{out}: {path} is written as {written[1:]}, so name the output *{written}")


def default_output(path: str) -> str:
    """`<stem>.fused.safetensors` beside the input, or `<stem>.fused.onnx` for an ONNX model."""
    suffix = ".onnx" if is_onnx(path) else ".safetensors"
    folder, name = os.path.split(path)
    return os.path.join(folder, os.path.splitext(name)[0] + ".fused" + suffix)


def is_onnx(path: str) -> bool:
    """An ONNX model: named `.onnx`, or (under another name than `.safetensors`) a protobuf that opens with
    ModelProto's first field (a safetensors file's ninth byte is the `{` of its header)."""
    lower = os.fspath(path).lower()
    if lower.endswith((".onnx", ".safetensors")):
        return lower.endswith(".onnx")
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return head[:1] == b"\x08" and head[8:9] != b"{"


def _safetensors_only(path: str) -> None:
    """annotate writes safetensors; an ONNX file gets a sentence, not a header error."""
    if is_onnx(path):
        raise io.ModelFileError(f"{path}: an ONNX model carries its own graph; this command is for safetensors files")


class ReadGraph(NamedTuple):
    """What `read_graph` finds: the validated description, its tensors, where it came from, and the size
    the model's input is fixed at (a static ONNX model's; None where the model takes any size)."""

    graph: Graph
    tensors: Tensors
    where: str
    input_size: Optional[tuple[int, ...]] = None


def read_graph(path: str, graph_file: Optional[str] = None, arch: Optional[str] = None,
               leaves: Sequence[str] = ()) -> ReadGraph:
    """A safetensors file's or an ONNX model's description and tensors (`explain`, `inspect`)."""
    onnx_model = _onnx_reader(path, graph_file, arch, leaves)
    if onnx_model is not None:
        model = onnx_model.read_model(path)
        return ReadGraph(model.graph, model.tensors, model.where, model.input_size)
    described = describe_file(path, graph_file, arch, Options(leaves=tuple(leaves)))
    return ReadGraph(described.graph, described.tensors, described.where)


def _onnx_reader(path: str, graph_file: Optional[str], arch: Optional[str], leaves: Sequence[str] = ()) -> Any:
    """convmerge.onnx_model for an ONNX file (None for safetensors); one line to install it if onnx is missing."""
    if not is_onnx(path):
        return None
    if graph_file or arch or leaves:
        raise GraphError(f"{path}: an ONNX model carries its own graph; --graph, --arch and --leaf are for "
                         "safetensors files")
    try:
        from . import onnx_model
    except ImportError as e:
        if (e.name or "").partition(".")[0] not in ("onnx", "google"):
            raise
        raise io.ModelFileError(f"{path}: reading an ONNX model needs the onnx package: "
                                "pip install onnx onnxruntime") from None
    return onnx_model


def inspect_file(path: str, graph_file: Optional[str] = None, arch: Optional[str] = None) -> dict[str, Any]:
    """What `convmerge inspect` shows, as data: the conv-shaped tensors (in natural order: 2 before 10)
    and, when a description is found (FORMAT.md, section 1), the layer count and the conv pairs."""
    if is_onnx(path):
        g, tensors, where, _ = read_graph(path, graph_file, arch)
        return dict(_tensor_listing(path, tensors.info, []), description=where, layer_count=len(g.layers),
                    pairs=_pairs(g))
    header = io.read_header(path)
    info = _tensor_listing(path, header.tensors, sorted(header.metadata))
    if not (graph_file or arch or GRAPH_KEY in header.metadata):
        info["missing"] = ("pass --graph FILE or --arch MODULE:CALLABLE, or store one with `convmerge annotate "
                           "MODEL --arch MODULE:CALLABLE -o OUT`; `check`/`fuse` refuse to guess how layers connect")
        return info
    doc, where, extra, notes = _description(header, graph_file, arch, ())
    g = parse(doc, dict(header.tensors, **{k: ModuleTensor(v) for k, v in extra.items()}), where)
    info.update(description=where, layer_count=len(g.layers), pairs=_pairs(g), notes=[*notes, *g.notes])
    return info


def _tensor_listing(path: str, tensors: Mapping[str, Any], metadata_keys: list[str]) -> dict[str, Any]:
    convs = sorted((n for n, t in tensors.items() if n.endswith(".weight") and 3 <= len(t.shape) <= 5), key=_natural)
    return {"file": os.fspath(path), "tensor_count": len(tensors), "metadata_keys": metadata_keys,
            "conv_tensors": [{"name": n, "dtype": tensors[n].dtype, "shape": list(tensors[n].shape)} for n in convs],
            "description": None}


def _pairs(g: Graph) -> list[dict[str, Any]]:
    return [{"first": p.first, "second": p.second, "via": list(p.via), "blocked": p.blocked and p.blocked.text()}
            for p in g.pairs()]


def _natural(name: str) -> tuple:
    """Sort key that orders the digit runs of a name by value: '2.weight' before '10.weight'."""
    import re

    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))
