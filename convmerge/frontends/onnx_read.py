"""An ONNX model read as a graph description (FORMAT.md, section 1), so the one rules engine judges it.

An ONNX graph says everything a description says: each Conv's strides, pads, dilations and group,
each BatchNormalization's epsilon, how values connect.  Each node becomes one layer named after the
node; its weights are the tensors `<layer>.weight`, `<layer>.bias` (and a batch norm's statistics),
read lazily from the constants they name.  A node convmerge does not understand, or one it
understands but whose inputs it cannot take as constants, is opaque, exactly as in a description.
Constants are initializers, Constant nodes and what foldable nodes compute from them; `x + 0` and
`x * 1` are identities; layers at the edge of a quantise/dequantise unit are opaque (onnxruntime
quantises the conv such a unit holds).  Local functions are inlined and opsets 9 and 10 converted
to 11 first; convs inside subgraphs are counted in a note, not read.

The file is hostile until proved otherwise: it is parsed by protobuf, checked by `onnx.checker`, and
every attribute convmerge reads is checked again here; a bad one ends in one `GraphError` (or
`ModelFileError`) naming the file, the node and the attribute.

Long because each ONNX op form convmerge accepts is read here with its attribute checks, next to the model
loading they share.
"""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Sequence

import onnx
import torch
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper

from ..ops import affine
from ..graph import CONV_OPS, CONV_TRANSPOSE_OPS, Graph, GraphError, parse
from ..io import ModelFileError
from ..engine.plan import Tensors

__all__ = ["MIN_OPSET", "OnnxGraph", "node_reads", "read_model", "raw_bytes", "tensor_of"]

MIN_OPSET = 11
OLDEST_OPSET = 9
"""Opsets 9 and 10 are converted to MIN_OPSET with onnx.version_converter (with a note)."""
MAX_PROTO_BYTES = 2**31 - 1
"""protobuf's limit on one message: a larger model keeps its weights as external data."""
DEFAULT_DOMAINS = ("", "ai.onnx")
_INFERRED_VALUES = 1024
"""Initializers of at most this many values keep their data for shape inference (data propagation reads
shapes, axes, pads from them); larger ones are weights, given to it as typed inputs."""

DTYPES: dict[int, tuple[str, Optional[torch.dtype]]] = {
    TensorProto.FLOAT: ("F32", torch.float32),
    TensorProto.FLOAT16: ("F16", torch.float16),
    TensorProto.BFLOAT16: ("BF16", torch.bfloat16),
    TensorProto.DOUBLE: ("F64", torch.float64),
    TensorProto.INT64: ("I64", torch.int64),
    TensorProto.INT32: ("I32", torch.int32),
    TensorProto.INT16: ("I16", torch.int16),
    TensorProto.INT8: ("I8", torch.int8),
    TensorProto.UINT8: ("U8", torch.uint8),
    TensorProto.BOOL: ("BOOL", torch.bool),
}
"""ONNX element types convmerge reads, as safetensors' names (the report's) and torch dtypes."""
_FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}

_UNARY = {"Relu": "relu", "LeakyRelu": "leaky_relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "HardSwish": "hardswish",
          "HardSigmoid": "hardsigmoid", "Elu": "elu", "Mish": "mish", "Softplus": "softplus", "Neg": "neg",
          "Clip": "clamp", "PRelu": "prelu", "Gelu": "gelu"}
"""Element-wise ops whose output has their first input's shape: named as descriptions name them, so
sizes carry across them (they stay opaque: convmerge never merges across one)."""
_BINARY = {"Mul": "mul", "Sub": "opaque_sub", "Div": "div"}
_ARITHMETIC = {"Mul": "mul", "Add": "add", "Sub": "sub", "Div": "div"}
"""Affine in a layer value where the other input is a constant holding one value per channel (affine.arithmetic)."""
_NEUTRAL = {"Add": (0.0, (0, 1)), "Sub": (0.0, (1,)), "Mul": (1.0, (0, 1)), "Div": (1.0, (1,))}
"""x + 0, 0 + x, x - 0, x * 1, 1 * x, x / 1: the identity, where the constant leaves x's shape as it is (timm's
MobileOne writes `scale_out + 0`, which the TorchScript exporter keeps).  op: (the neutral value, its sides)."""
_FOLDABLE = {"Cast", "Neg", "Abs", "Sqrt", "Reciprocal", "Add", "Sub", "Mul", "Div", "Pow", "Reshape", "Squeeze",
             "Unsqueeze", "Transpose", "Flatten", "Concat"}
"""Ops computed once where every input is a constant, so a weight computed from constants (`v * g`, a Cast of a
float16 weight, a BN scale from a Sqrt) is a constant: deterministic, and never larger than their inputs
(broadcasting is checked).  Not DequantizeLinear: quantised weights are never merged."""
_BROADCASTING = {"Add", "Sub", "Mul", "Div", "Pow"}
_PARAMETERS = {"Conv": 1, "ConvTranspose": 1, "BatchNormalization": 1, "InstanceNormalization": 1,
               "LayerNormalization": 1, "GroupNormalization": 1, "PRelu": 1}
"""Ops whose inputs from this position on are weights, not images."""
_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


@dataclass(frozen=True)
class Info:
    """Tensor metadata for a constant, shaped like io.TensorInfo."""

    shape: tuple[int, ...]
    dtype: str
    is_float: bool


@dataclass
class OnnxGraph:
    """An ONNX model and the description read from it."""

    path: str
    proto: onnx.ModelProto
    graph: Graph  # the description, parsed and validated
    tensors: Tensors  # `<layer>.weight` etc., read from the constants on demand
    where: str
    values: dict[str, str]  # description name (layer or graph input) -> the ONNX value it stands for
    nodes: dict[str, int]  # layer name -> index of its node in proto.graph.node
    constants: dict[str, TensorProto]  # ONNX value name -> the tensor it always holds
    input_size: Optional[tuple[int, ...]]  # the spatial size of the inputs, where the model fixes it
    external: bool  # some initializer lives in an external data file
    opset: int

    @property
    def base_dir(self) -> str:
        return os.path.dirname(os.path.abspath(self.path))

    def data_files(self) -> list[str]:
        """The external data files the model's initializers name (an output must not replace one)."""
        found = {e.value for t in self.proto.graph.initializer if _is_external(t)
                 for e in t.external_data if e.key == "location"}
        return [os.path.join(self.base_dir, name) for name in sorted(found)]


def read_model(path: str, input_size: Optional[Sequence[int]] = None) -> OnnxGraph:
    """Parse, check and describe an ONNX file; `input_size` (--input-size) must agree with a static one."""
    shown = _show(path)
    proto = _load(path, shown)
    opset = _opset(proto, shown)
    _check(proto, path, shown)
    proto, notes = _normalised(proto, opset, shown)
    read_as = max(opset, MIN_OPSET)
    external = any(_is_external(t) for t in proto.graph.initializer)
    base = os.path.dirname(os.path.abspath(path))
    constants = _constants(proto.graph, read_as, base, shown)
    shapes, shape_notes = _shapes(proto)
    notes += shape_notes + _subgraph_notes(proto.graph)
    fed = len({t.name for t in proto.graph.initializer} & {i.name for i in proto.graph.input})
    if fed:
        notes.append(f"{fed} initializer(s) are also graph inputs, which a caller may replace, so the layers "
                     "reading them stay opaque (export with keep_initializers_as_inputs=False)")
    static = _static_size(proto.graph, notes)
    reader = _Reader(proto.graph, shown, constants, shapes, static, base)
    doc, infos = reader.describe()
    graph = parse(doc, infos, shown)
    tensors = Tensors(infos, lambda key: tensor_of(constants[reader.tensors[key]], base, shown))
    size = _input_size(static, graph, input_size, shown)
    where = f"{shown}: ONNX graph (opset {opset}{f', read as opset {read_as}' if read_as != opset else ''})"
    graph.notes[:0] = notes + reader.notes
    return OnnxGraph(path, proto, graph, tensors, where, reader.values, reader.nodes, constants, size, external,
                     read_as)


# --- the file ----------------------------------------------------------------------------------------


def _load(path: str, shown: str) -> onnx.ModelProto:
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise ModelFileError(f"{shown}: not a regular file")
        size = os.stat(path).st_size
        if size > MAX_PROTO_BYTES:
            raise ModelFileError(f"{shown}: {size} bytes; an ONNX file holds at most 2 GiB (keep larger weights as "
                                 "external data)")
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ModelFileError(f"{shown}: cannot read: {e.strerror or e}") from None
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(raw)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ModelFileError(f"{shown}: not an ONNX model (its protobuf does not parse: {_line(e)})") from None
    if not proto.HasField("graph") or not proto.graph.node:
        raise ModelFileError(f"{shown}: not an ONNX model (no graph, or a graph with no nodes)")
    return proto


def _opset(proto: onnx.ModelProto, shown: str) -> int:
    versions = [o.version for o in proto.opset_import if o.domain in DEFAULT_DOMAINS]
    if not versions:
        raise ModelFileError(f"{shown}: field 'opset_import': no opset of the default ONNX domain")
    newest = onnx.defs.onnx_opset_version()
    if not OLDEST_OPSET <= versions[0] <= newest:
        raise ModelFileError(f"{shown}: field 'opset_import': opset {versions[0]}; convmerge reads opsets "
                             f"{OLDEST_OPSET} to {newest} (convert it with onnx.version_converter.convert_version)")
    return versions[0]


def _normalised(proto: onnx.ModelProto, opset: int, shown: str) -> tuple[onnx.ModelProto, list[str]]:
    """The model in the form convmerge reads: calls of its local functions inlined, an opset below MIN_OPSET
    converted to it.  The fused model is written in this form (it computes the same)."""
    notes = []
    local = {(f.domain, f.name) for f in proto.functions}
    calls = sum((n.domain, n.op_type) in local for n in proto.graph.node)
    if calls:
        from onnx import inliner

        try:
            proto = inliner.inline_local_functions(proto)
        except Exception as e:  # noqa: BLE001 - whatever a hostile function makes it raise
            raise GraphError(f"{shown}: field 'functions': onnx.inliner cannot inline them: {_line(e)}") from None
        notes.append(f"{calls} call(s) of local functions inlined (onnx.inliner.inline_local_functions), so the convs "
                     "inside them are read; the fused model keeps them inlined")
    if opset < MIN_OPSET:
        from onnx import version_converter

        try:
            proto = version_converter.convert_version(proto, MIN_OPSET)
        except Exception as e:  # noqa: BLE001
            raise ModelFileError(f"{shown}: field 'opset_import': opset {opset}; onnx.version_converter cannot "
                                 f"convert it to opset {MIN_OPSET}: {_line(e)}") from None
        notes.append(f"opset {opset} converted to opset {MIN_OPSET} with onnx.version_converter; the fused model has "
                     f"opset {MIN_OPSET}")
    return proto, notes


def _subgraph_notes(g: onnx.GraphProto) -> list[str]:
    """Convs inside If/Loop/Scan bodies are not read (the description is the main graph): say so."""
    holders = [(node.name or node.op_type, _subgraph_convs(node)) for node in g.node]
    holders = [(name, n) for name, n in holders if n]
    if not holders:
        return []
    shown = ", ".join(_quote(name) for name, _ in holders[:3]) + (" ..." if len(holders) > 3 else "")
    return [f"{sum(n for _, n in holders)} Conv node(s) inside the subgraphs of {len(holders)} node(s) ({shown}) are "
            "not analysed: convmerge reads the main graph only"]


def _subgraph_convs(node: onnx.NodeProto) -> int:
    count = 0
    for a in node.attribute:
        for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
            count += sum((n.op_type == "Conv") + _subgraph_convs(n) for n in sub.node)
    return count


def _check(proto: onnx.ModelProto, path: str, shown: str) -> None:
    """onnx.checker catches what the spec forbids (unsorted or cyclic graphs, missing inputs, wrong input
    counts, mistyped attributes); its first line names the node."""
    try:
        onnx.checker.check_model(path)  # by path: it checks the external data files beside the model, and the
        # weights are not serialized again to reach the checker
    except Exception as e:  # noqa: BLE001 - ValidationError, and whatever else a hostile model makes it raise
        text = " ".join(str(e).split("==> Context")[0].split()) or type(e).__name__
        raise GraphError(f"{shown}: onnx.checker: {text if len(text) <= 300 else text[:297] + '...'}") from None


def _is_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


def raw_bytes(t: TensorProto, base_dir: str, shown: str) -> Optional[bytes]:
    """A tensor's raw little-endian bytes (from raw_data or its external file); None if it holds typed fields.

    External locations come from a hostile file: only a relative path inside the model's folder, to a
    regular file, with the range inside it.
    """
    if not _is_external(t):
        return t.raw_data if t.HasField("raw_data") else None
    where = {e.key: e.value for e in t.external_data}
    location = where.get("location", "")
    at = f"{shown}: initializer {_quote(t.name)}: external data"
    if not location or os.path.isabs(location) or ".." in location.replace("\\", "/").split("/"):
        raise ModelFileError(f"{at}: location {_quote(location)} is not a file name inside the model's folder")
    file = os.path.join(base_dir, location)
    try:
        offset, length = int(where.get("offset", "0")), where.get("length")
        with open(file, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ModelFileError(f"{at}: {_quote(location)} is not a regular file")
            size = os.fstat(f.fileno()).st_size
            want = _nbytes(t)
            n = int(length) if length is not None else (size - offset)
            if offset < 0 or n < 0 or offset + n > size or (want is not None and n != want):
                raise ModelFileError(f"{at}: bytes {offset} to {offset + n} of {_quote(location)} (of {size} bytes) "
                                     f"do not hold its {want} bytes")
            f.seek(offset)
            return f.read(n)
    except ValueError as e:
        if isinstance(e, ModelFileError):
            raise
        raise ModelFileError(f"{at}: offset or length is not an integer") from None
    except OSError as e:
        raise ModelFileError(f"{at}: cannot read {_quote(location)}: {e.strerror or e}") from None


def tensor_of(t: TensorProto, base_dir: str, shown: str) -> torch.Tensor:
    """A constant as a torch tensor in its own dtype."""
    name, dtype = DTYPES.get(t.data_type, ("", None))
    if dtype is None:
        raise ModelFileError(f"{shown}: tensor {_quote(t.name)}: element type {t.data_type} is not read by convmerge")
    shape = tuple(t.dims)
    raw = raw_bytes(t, base_dir, shown)
    if raw is not None:
        want = _nbytes(t)
        if len(raw) != want:
            raise ModelFileError(f"{shown}: tensor {_quote(t.name)}: {len(raw)} bytes of data for shape {list(shape)} "
                                 f"of {name} ({want} bytes)")
        if not raw:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)  # its own copy of the bytes
    try:
        array = numpy_helper.to_array(t)
    except Exception as e:  # noqa: BLE001 - onnx raises many kinds for malformed typed fields
        raise ModelFileError(f"{shown}: tensor {_quote(t.name)}: {_line(e)}") from None
    if dtype == torch.bfloat16:
        return torch.from_numpy(array.view("uint16").copy()).view(torch.bfloat16).reshape(shape)
    return torch.from_numpy(array.copy()).reshape(shape)


def _nbytes(t: TensorProto) -> Optional[int]:
    entry = DTYPES.get(t.data_type)
    if entry is None or entry[1] is None:
        return None
    size = torch.empty(0, dtype=entry[1]).element_size()
    return math.prod(t.dims) * size


# --- constants and shapes -----------------------------------------------------------------------------


def _constants(g: onnx.GraphProto, opset: int, base: str, shown: str) -> dict[str, TensorProto]:
    """Values that always hold the same tensor: initializers (not also graph inputs, which a caller may
    feed), Constant nodes, Identity nodes of those (PyTorch's exporter shares equal tensors so), and the
    outputs of foldable nodes (_FOLDABLE) that read only constants."""
    fed = {i.name for i in g.input}
    out = {t.name: t for t in g.initializer if t.name not in fed}
    for node in g.node:
        if node.domain not in DEFAULT_DOMAINS or len(node.output) != 1:
            continue
        if node.op_type == "Constant":
            t = _constant_value(node)
            if t is not None:
                out[node.output[0]] = t
        elif node.op_type == "Identity" and len(node.input) == 1 and node.input[0] in out:
            out[node.output[0]] = out[node.input[0]]
        elif node.op_type in _FOLDABLE and node.input and all(v and v in out for v in node.input):
            t = _fold(node, out, opset, base, shown)
            if t is not None:
                out[node.output[0]] = t
    return out


def _fold(node: onnx.NodeProto, known: Mapping[str, TensorProto], opset: int, base: str,
          shown: str) -> Optional[TensorProto]:
    """The node's output, computed by onnx's reference evaluator at the model's opset; None where it is no
    larger than its inputs only by broadcasting, reads a type numpy lacks, or fails (it stays a node)."""
    import numpy as np
    from onnx.reference import ReferenceEvaluator

    names = list(dict.fromkeys(node.input))
    if any(known[v].data_type not in DTYPES or known[v].data_type == TensorProto.BFLOAT16 for v in names):
        return None
    arrays = {v: tensor_of(known[v], base, shown).numpy() for v in names}
    if node.op_type in _BROADCASTING:
        try:
            shape = np.broadcast_shapes(*(a.shape for a in arrays.values()))
        except ValueError:
            return None
        if math.prod(shape) > max(a.size for a in arrays.values()):
            return None
    untyped = onnx.TypeProto()
    g = helper.make_graph([node], "fold", [helper.make_value_info(v, untyped) for v in names],
                          [helper.make_value_info(node.output[0], untyped)])
    try:
        (value,) = ReferenceEvaluator(g, opsets={"": opset}).run(None, arrays)
        t = numpy_helper.from_array(np.asarray(value), node.output[0])
    except Exception:  # noqa: BLE001 - a node that cannot be computed is left to the runtime
        return None
    return t if t.data_type in DTYPES else None


def _constant_value(node: onnx.NodeProto) -> Optional[TensorProto]:
    for a in node.attribute:
        if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
            return a.t
        if a.name in ("value_float", "value_floats", "value_int", "value_ints"):
            value = helper.get_attribute_value(a)
            kind = TensorProto.FLOAT if "float" in a.name else TensorProto.INT64
            many = a.name.endswith("s")
            return helper.make_tensor(node.output[0], kind, [len(value)] if many else [],
                                      list(value) if many else [value])
    return None


Shape = Optional[tuple[Optional[int], ...]]


def _shapes(proto: onnx.ModelProto) -> tuple[dict[str, Shape], list[str]]:
    """Every value's shape as far as ONNX shape inference knows (None: an unknown or symbolic size)."""
    notes: list[str] = []
    g = proto.graph
    try:
        inferred = onnx.shape_inference.infer_shapes(_weightless(proto), strict_mode=False, data_prop=True).graph
        infos = list(inferred.value_info) + list(inferred.input) + list(inferred.output)
    except Exception as e:  # noqa: BLE001 - a model shape inference cannot handle still has its own shapes
        notes.append(f"ONNX shape inference failed ({_line(e)}); adds of unknown shapes stay opaque")
        infos = list(g.value_info) + list(g.input) + list(g.output)
    shapes: dict[str, Shape] = {}
    for vi in infos:
        tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
        if tt is None or not tt.HasField("shape"):
            continue
        shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
    for t in g.initializer:
        shapes.setdefault(t.name, tuple(t.dims))
    return shapes, notes


def _weightless(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model with each initializer of more than _INFERRED_VALUES values as a graph input of its type and
    shape: shape inference gives every value the same shape (data propagation reads small constants only:
    shapes, axes, pads) and neither copies nor serializes the weights."""
    light = onnx.ModelProto()
    _copy_fields(proto, light, skip="graph")
    _copy_fields(proto.graph, light.graph, skip="initializer")
    inputs = {i.name for i in proto.graph.input}
    for t in proto.graph.initializer:
        if math.prod(t.dims) <= _INFERRED_VALUES and not _is_external(t):
            light.graph.initializer.append(t)
        elif t.name not in inputs:
            light.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return light


def _copy_fields(source: Any, into: Any, skip: str) -> None:
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if hasattr(value, "extend"):  # repeated
            getattr(into, field.name).extend(value)
        elif hasattr(value, "CopyFrom"):  # a message
            getattr(into, field.name).CopyFrom(value)
        else:
            setattr(into, field.name, value)


def _static_size(g: onnx.GraphProto, notes: list[str]) -> Optional[tuple[int, ...]]:
    """The spatial size the model fixes for its inputs, where they all agree (None where one is symbolic)."""
    sizes = set()
    dynamic = False
    weights = {t.name for t in g.initializer}
    images = set()  # values some node reads as an image, not as a weight (_PARAMETERS)
    for node in g.node:
        images.update(node.input[:_PARAMETERS[node.op_type]] if node.op_type in _PARAMETERS else node_reads(node))
    weights |= {v for node in g.node if node.op_type in _PARAMETERS for v in node.input[_PARAMETERS[node.op_type]:]
                if v not in images}
    for vi in g.input:
        if vi.name in weights or not vi.type.HasField("tensor_type"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if len(dims) < 3:
            continue
        spatial = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims[2:])
        if None in spatial:
            dynamic = True
        else:
            sizes.add(spatial)
    if len(sizes) > 1 or (sizes and dynamic):
        notes.append("the model's inputs have different spatial sizes; costs assume 224 per axis and size-dependent "
                     "merges are made only with --input-size")
    return next(iter(sizes)) if len(sizes) == 1 and not dynamic and len(next(iter(sizes))) <= 3 else None


def _input_size(static: Optional[tuple[int, ...]], graph: Graph, given: Optional[Sequence[int]],
                shown: str) -> Optional[tuple[int, ...]]:
    """The static size acts as --input-size (a given one must agree with it); else the given one."""
    if static is not None and any(spec.ndim != len(static) for spec in graph.specs.values()):
        static = None  # convs of another rank (behind a reshape): the input's size says nothing about theirs
    if static is None:
        return tuple(given) if given else None
    if given and (tuple(given) * len(static) if len(given) == 1 else tuple(given)) != static:
        raise GraphError(f"--input-size {'x'.join(map(str, given))}: {shown} fixes its input size at "
                         f"{'x'.join(map(str, static))}")
    return static


# --- nodes to layers ----------------------------------------------------------------------------------


class _Reader:
    """Walks the nodes once, in their (topological) order, writing one description layer per node."""

    def __init__(self, g: onnx.GraphProto, shown: str, constants: dict[str, TensorProto],
                 shapes: Mapping[str, Shape], static: Optional[tuple[int, ...]], base: str = "") -> None:
        self.g, self.shown, self.constants, self.shapes, self.static = g, shown, constants, shapes, static
        self.base = base  # where external data lies (an affine layer's tensors are computed from constants)
        self.names: dict[str, str] = {}  # ONNX value -> description name
        self.values: dict[str, str] = {}  # description name -> ONNX value
        self.nodes: dict[str, int] = {}
        self.tensors: dict[str, str] = {}  # "<layer>.weight" -> constant value name
        self.taken: set[str] = set()
        self.notes: list[str] = []
        self._same_later: list[str] = []
        self._transposes_left: dict[str, list[str]] = {}  # why -> ConvTranspose nodes kept opaque
        self.read = {v for node in g.node for v in node_reads(node)} | {o.name for o in g.output}
        self.dequantized = {v for node in g.node if node.op_type == "DequantizeLinear" for v in node.output}
        self.quantized = {node.input[0] for node in g.node if node.op_type == "QuantizeLinear" and node.input}
        self._qdq: list[str] = []
        self.makers = {node.output[0]: node for node in g.node if len(node.output) == 1}

    def describe(self) -> tuple[dict, dict[str, Info]]:
        inputs = []
        for vi in self.g.input:
            if vi.name not in self.constants:
                name = self._fresh(vi.name)
                self.names[vi.name], self.values[name] = name, vi.name
                inputs.append(name)
        layers = []
        for index, node in enumerate(self.g.node):
            if node.domain in DEFAULT_DOMAINS and all(o in self.constants for o in node.output if o):
                continue  # a Constant, or an Identity of one: a value, not a layer
            layers += self._layers(index, node)
        if self._same_later:
            shown = ", ".join(self._same_later[:3]) + (" ..." if len(self._same_later) > 3 else "")
            self.notes.append(f"auto_pad SAME with stride > 1 needs a static input size; opaque: {shown}")
        for why, names in self._transposes_left.items():
            shown = ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
            self.notes.append(f"ConvTranspose {why}; opaque: {shown}")
        if self._qdq:
            shown = ", ".join(self._qdq[:3]) + (" ..." if len(self._qdq) > 3 else "")
            self.notes.append(f"{len(self._qdq)} layer(s) read a DequantizeLinear or feed a QuantizeLinear and are left "
                              f"as they are ({shown}): onnxruntime's optimiser quantises a conv between the two, so a "
                              "merge there would change what the model computes")
        outputs = [self.names[o.name] for o in self.g.output if o.name in self.names]
        infos = {key: self._info(value) for key, value in self.tensors.items()}
        doc = {"version": 1, "inputs": inputs, "layers": layers, "outputs": outputs}
        if self.static is not None:
            doc["traced_input"] = list(self.static)  # the opaque layers' traced_size hold at this size
        return doc, infos

    def _info(self, value: str) -> Info:
        t = self.constants[value]
        name, dtype = DTYPES.get(t.data_type, (f"ONNX_{TensorProto.DataType.Name(t.data_type)}", None))
        return Info(tuple(t.dims), name, t.data_type in _FLOATS and dtype is not None)

    def _fresh(self, name: str) -> str:
        """A layer name no layer or input has: the node's own where it is free."""
        base = name or "node"
        cand, k = base, 1
        while cand in self.taken:
            k += 1
            cand = f"{base}_{k}"
        self.taken.add(cand)
        return cand

    def _layers(self, index: int, node: onnx.NodeProto) -> list[dict]:
        outs = [o for o in node.output if o]
        name = self._fresh(node.name or (outs[0] if outs else f"{node.op_type}_{index}"))
        single = bool(outs) and node.output[0] == outs[0] and not any(o in self.read for o in outs[1:])
        mapped = self._map(node, name) if node.domain in DEFAULT_DOMAINS and single else None
        if mapped is not None and (self.dequantized.intersection(node.input) or self.quantized.intersection(outs)):
            mapped = None  # a conv merged up to both would be a DQ -> Conv -> Q unit, which onnxruntime quantises
            self._qdq.append(_quote(name))
        if mapped is not None:  # a known op whose other outputs (a dropout's mask) no one reads
            layer, tensors = mapped
            self.tensors.update({f"{name}.{k}": v for k, v in tensors.items()})
            self._bind(outs[0], name, index)
            return [{"name": name, **layer}]
        # Opaque: one layer per output (so two convs reading two outputs of a Split never look like
        # branches of one value), reading every value the node reads, its subgraphs' outer names included.
        sources = [self.names[v] for v in node_reads(node) if v in self.names]
        op = f"{'onnx' if node.domain in DEFAULT_DOMAINS else node.domain}.{node.op_type}"
        out = []
        for k, value in enumerate(outs or [""]):
            layer_name = name if k == 0 else self._fresh(f"{name}:{k}")
            out.append({"name": layer_name, "op": op, "inputs": list(dict.fromkeys(sources))})
            size = self._static_out(node, value)
            if size is not None:
                out[-1]["traced_size"] = size
            if value:
                self._bind(value, layer_name, index)
        return out

    def _static_out(self, node: onnx.NodeProto, value: str) -> Optional[list[int]]:
        """An opaque output's spatial size as shape inference gives it for the model's static input (so sizes
        carry past a MaxPool).  Not for pooling in ceil mode, where onnxruntime's sizes and onnx's disagree."""
        shape = self.shapes.get(value)
        if self.static is None or shape is None or not 3 <= len(shape) <= 5 or None in shape:
            return None
        if any(a.name == "ceil_mode" and a.i for a in node.attribute):
            return None
        return [int(n) for n in shape[2:]]

    def _bind(self, value: str, layer: str, index: int) -> None:
        self.names[value], self.values[layer], self.nodes[layer] = layer, value, index

    def _data(self, value: str) -> Optional[str]:
        """The layer or input a data input names; None for a constant or an absent input."""
        return self.names.get(value) if value and value not in self.constants else None

    def _const(self, value: str) -> bool:
        return bool(value) and value in self.constants

    def _map(self, node: onnx.NodeProto, name: str) -> Optional[tuple[dict, dict[str, str]]]:
        """The layer (fields and tensors) for a node convmerge understands; None keeps it opaque."""
        ins = list(node.input)
        attrs = _Attrs(node, f"{self.shown}: node {_quote(name)} ({node.op_type})", name)
        op = node.op_type
        x = self._data(ins[0]) if ins else None
        if op == "Conv":
            return self._conv(ins, x, attrs)
        if op == "Gemm":
            return self._gemm(ins, x, attrs)
        if op == "MatMul":
            return self._matmul(ins, x)
        if op == "ConvTranspose":
            return self._conv_transpose(ins, x, attrs)
        if op == "BatchNormalization":
            if x is None or len(ins) != 5 or not all(self._const(v) for v in ins[1:]) or attrs.int("training_mode", 0):
                return None
            eps = attrs.float("epsilon", 1e-5)
            keys = ("weight", "bias", "running_mean", "running_var")
            return {"op": "batch_norm", "input": x, "eps": eps}, dict(zip(keys, ins[1:]))
        if op == "Identity":
            return ({"op": "identity", "input": x}, {}) if x is not None and len(ins) == 1 else None
        if op == "Dropout":
            training = ins[2] if len(ins) > 2 else ""
            if x is None or (training and not (self._const(training) and not self._scalar(training))):
                return None
            return {"op": "dropout", "input": x}, {}
        if op in _NEUTRAL and len(ins) == 2:
            same = self._neutral(op, ins)
            if same is not None:
                return {"op": "identity", "input": same}, {}
        if op in _ARITHMETIC and len(ins) == 2:
            found = self._affine(op, ins, name)
            if found is not None:
                return found
        if op == "Add":
            return self._add(ins)
        if op == "Sub" and (same := self._add(ins)) is not None:  # two layer values of one shape, as Add
            return {**same[0], "op": "sub"}, {}
        if op == "Concat":
            return self._concat(ins, attrs)
        if op == "AveragePool":
            return self._pool(ins, x, attrs)
        if op == "Pad":
            return self._pad(ins, x, attrs)
        if op in _UNARY and x is not None and all(self._const(v) or not v for v in ins[1:]):
            return {"op": _UNARY[op], "input": x}, {}
        if op in _BINARY and len(ins) == 2 and None not in (x, self._data(ins[1])):
            a, b = self.shapes.get(ins[0]), self.shapes.get(ins[1])
            if a is not None and b is not None and len(a) == len(b):
                return {"op": _BINARY[op], "inputs": [x, self._data(ins[1])]}, {}
        return None

    def _weight_bias(self, ins: list[str], x: Optional[str]) -> Optional[tuple[str, str]]:
        """The constant weight and bias ("" where absent) a Conv, ConvTranspose or Gemm reads after its data input
        `x`; None where there is no data input or either is no constant."""
        weight, bias = ins[1] if len(ins) > 1 else "", ins[2] if len(ins) > 2 else ""
        if x is None or not self._const(weight) or (bias and not self._const(bias)):
            return None
        return weight, bias

    def _conv(self, ins: list[str], x: Optional[str], attrs: "_Attrs") -> Optional[tuple[dict, dict[str, str]]]:
        found = self._weight_bias(ins, x)
        if found is None:
            return None
        weight, bias = found
        dims = tuple(self.constants[weight].dims)
        nd = len(dims) - 2
        if f"conv{nd}d" not in CONV_OPS:
            return None
        group = attrs.int("group", 1)
        shape = self.shapes.get(ins[0])
        if shape is not None and len(shape) == nd + 2 and shape[1] is not None and shape[1] != dims[1] * group:
            attrs.fail("group", f"{group}: weight {_quote(weight)} of shape {list(dims)} takes {dims[1] * group} "
                                f"channels, its input has {shape[1]}")
        kernel = list(dims[2:])
        strides = attrs.ints("strides", nd, 1)
        dilations = attrs.ints("dilations", nd, 1)
        pads = self._pads(ins[0], attrs, kernel, strides, dilations)
        if pads is None:
            return None
        fields = {"op": f"conv{nd}d", "input": x, "kernel_size": attrs.ints("kernel_shape", nd, None) or kernel,
                  "stride": strides, "padding": pads, "dilation": dilations, "groups": group}
        return fields, {"weight": weight, **({"bias": bias} if bias else {})}

    def _gemm(self, ins: list[str], x: Optional[str], attrs: "_Attrs") -> Optional[tuple[dict, dict[str, str]]]:
        """Gemm(A, B, C) as nn.Linear exports it: A a [N, C] value, B a constant [out, in] read transposed (transB
        1), C absent or a constant [out], alpha and beta 1.  Other forms (B to transpose, scaled) stay opaque."""
        found = self._weight_bias(ins, x)
        if found is None:
            return None
        weight, bias = found
        if attrs.int("transA", 0) or not attrs.int("transB", 0) or attrs.float("alpha", 1.0) != 1.0 or \
                (bias and attrs.float("beta", 1.0) != 1.0):
            return None
        dims, shape = tuple(self.constants[weight].dims), self.shapes.get(ins[0])
        if len(dims) != 2 or shape is None or len(shape) != 2:
            return None
        if bias and tuple(self.constants[bias].dims) != dims[:1]:
            return None
        return {"op": "linear", "input": x}, {"weight": weight, **({"bias": bias} if bias else {})}

    def _matmul(self, ins: list[str], x: Optional[str]) -> Optional[tuple[dict, dict[str, str]]]:
        """MatMul(A, Transpose(W)) as a bias-less nn.Linear exports it: A a [N, C] value, W a constant [out, in]
        (the weight as it stands; a MatMul by any other constant would need it transposed, and stays opaque)."""
        made = self.makers.get(ins[1]) if len(ins) == 2 else None
        if x is None or made is None or made.op_type != "Transpose" or len(made.input) != 1:
            return None
        weight, perm = made.input[0], next((list(a.ints) for a in made.attribute if a.name == "perm"), [1, 0])
        shape = self.shapes.get(ins[0])
        if not self._const(weight) or len(self.constants[weight].dims) != 2 or perm != [1, 0] or \
                shape is None or len(shape) != 2:
            return None
        return {"op": "linear", "input": x}, {"weight": weight}

    def _conv_transpose(self, ins: list[str], x: Optional[str], attrs: "_Attrs"
                        ) -> Optional[tuple[dict, dict[str, str]]]:
        """A ConvTranspose with PyTorch's geometry: pads (lo, hi) crop lo on the left and hi on the right of the
        full scatter, output_padding adds cells on the right, so PyTorch's padding is lo and its output_padding
        onnx's plus lo - hi, where that is in PyTorch's range (0 <= op < max(stride, dilation)).  output_shape
        and auto_pad SAME compute the pads from the output size: opaque, with a note."""
        found = self._weight_bias(ins, x)
        if found is None:
            return None
        weight, bias = found
        dims = tuple(self.constants[weight].dims)
        nd = len(dims) - 2
        if f"conv_transpose{nd}d" not in CONV_TRANSPOSE_OPS:
            return None
        group = attrs.int("group", 1)
        strides, dilations = attrs.ints("strides", nd, 1), attrs.ints("dilations", nd, 1)
        extra = attrs.ints("output_padding", nd, 0)
        auto_pad = attrs.string("auto_pad", "NOTSET")
        if attrs.ints("output_shape", None, None) is not None or auto_pad not in ("NOTSET", "VALID"):
            self._transposes_left.setdefault("with output_shape or auto_pad SAME (pads set by the output size)",
                                             []).append(_quote(attrs.layer))
            return None
        pads = attrs.ints("pads", 2 * nd, 0) if auto_pad == "NOTSET" else [0] * (2 * nd)
        lo, hi = pads[:nd], pads[nd:]
        output_padding = [e + a - b for e, a, b in zip(extra, lo, hi)]
        if any(not 0 <= p < max(s, d) for p, s, d in zip(output_padding, strides, dilations)):
            self._transposes_left.setdefault("with pads PyTorch's ConvTranspose cannot express (end pad above the "
                                             "begin pad, or by a stride or more below it)", []).append(_quote(attrs.layer))
            return None
        fields = {"op": f"conv_transpose{nd}d", "input": x, "kernel_size": attrs.ints("kernel_shape", nd, None) or
                  list(dims[2:]), "stride": strides, "padding": lo, "output_padding": output_padding,
                  "dilation": dilations, "groups": group}
        return fields, {"weight": weight, **({"bias": bias} if bias else {})}

    def _pads(self, value: str, attrs: "_Attrs", kernel: Sequence[int], strides: Sequence[int],
              dilations: Sequence[int]) -> Optional[list[list[int]]]:
        """Explicit (lo, hi) pads per axis; auto_pad SAME with a stride needs the input's static size."""
        nd = len(kernel)
        mode = attrs.string("auto_pad", "NOTSET")
        if mode == "NOTSET":
            pads = attrs.ints("pads", 2 * nd, 0)
            return [[pads[i], pads[i + nd]] for i in range(nd)]
        if mode == "VALID":
            return [[0, 0] for _ in range(nd)]
        if mode not in ("SAME_UPPER", "SAME_LOWER"):
            attrs.fail("auto_pad", f"{mode!r} is not NOTSET, SAME_UPPER, SAME_LOWER or VALID")
        shape = self.shapes.get(value)
        size = shape[2:] if shape is not None and len(shape) == nd + 2 else (None,) * nd
        out = []
        for k, s, d, n in zip(kernel, strides, dilations, size):
            if s == 1:
                total = d * (k - 1)
            elif n is None:
                self._same_later.append(_quote(attrs.layer))
                return None
            else:
                total = max(0, (-(-n // s) - 1) * s + d * (k - 1) + 1 - n)
            small = total // 2
            out.append([small, total - small] if mode == "SAME_UPPER" else [total - small, small])
        return out

    def _add(self, ins: list[str]) -> Optional[tuple[dict, dict[str, str]]]:
        """Add broadcasts; a description's add does not.  Only two layer values of one shape map (a size
        neither side knows, a symbolic one, counts as the same: a region's branches run from one value)."""
        if len(ins) != 2 or None in (self._data(ins[0]), self._data(ins[1])):
            return None
        a, b = self.shapes.get(ins[0]), self.shapes.get(ins[1])
        if a is None or b is None or len(a) != len(b) or len(a) < 3 or a[1] is None or a[1] != b[1]:
            return None
        if any(m != n for m, n in zip(a, b)):
            return None
        return {"op": "add", "inputs": [self._data(ins[0]), self._data(ins[1])]}, {}

    def _affine(self, op: str, ins: list[str], name: str) -> Optional[tuple[dict, dict[str, str]]]:
        """Mul, Add, Sub or Div of a layer value x and a constant c holding one value per channel of x or one for
        all (a LayerScale, a normalisation, `x * 2 + 1`), leaving x's shape: an affine layer whose weight and bias
        (affine.arithmetic: 1 / c, -c...) are new constants beside the model's (not written into it)."""
        k = 0 if self._data(ins[0]) is not None else 1
        x, c = self._data(ins[k]), ins[1 - k]
        shape = self.shapes.get(ins[k])
        if x is None or not self._const(c) or shape is None or self.constants[c].data_type not in _FLOATS:
            return None
        dims = tuple(self.constants[c].dims)
        if self.constants[c].data_type == TensorProto.BFLOAT16 or not affine.per_channel(shape, dims):
            return None
        value = tensor_of(self.constants[c], self.base, self.shown)
        terms = affine.arithmetic(_ARITHMETIC[op], value.double(), constant_first=k == 1)
        if terms is None:
            return None
        tensors = {}
        for suffix, term in zip(affine.TENSORS, terms):
            if term is not None:
                t = affine.channel_values(torch.as_tensor(term, dtype=torch.float64)).to(value.dtype)
                key = self._computed(f"{name}.{suffix}")
                self.constants[key] = numpy_helper.from_array(t.numpy(), key)
                tensors[suffix] = key
        return {"op": "affine", "input": x}, tensors

    def _computed(self, want: str) -> str:
        """A name for a computed constant that no ONNX value has."""
        cand, k = f"convmerge:{want}", 1
        while cand in self.constants or cand in self.read or cand in self.names:
            k += 1
            cand = f"convmerge:{want}_{k}"
        return cand

    def _neutral(self, op: str, ins: list[str]) -> Optional[str]:
        """The layer x where the node is x + 0, x * 1 and the like (_NEUTRAL); None otherwise."""
        unit, sides = _NEUTRAL[op]
        for k in sides:
            constant, x = ins[k], self._data(ins[1 - k])
            if x is None or not self._const(constant):
                continue
            dims, shape = tuple(self.constants[constant].dims), self.shapes.get(ins[1 - k])
            if dims and (shape is None or len(dims) > len(shape)
                         or any(d != 1 and d != n for d, n in zip(reversed(dims), reversed(shape)))):
                continue  # it could broadcast x to a larger shape
            values = self._values(constant)
            if values and all(v == unit for v in values):
                return x
        return None

    def _concat(self, ins: list[str], attrs: "_Attrs") -> Optional[tuple[dict, dict[str, str]]]:
        sources = [self._data(v) for v in ins]
        if not sources or None in sources:
            return None
        ranks = {len(s) for s in (self.shapes.get(v) for v in ins) if s is not None}
        axis = attrs.int("axis", None)
        if axis is None or len(ranks) > 1 or (axis < 0 and not ranks):
            return None
        if axis < 0:
            axis += next(iter(ranks))
        if axis != 1:
            return None
        if len(sources) == 1:
            return {"op": "identity", "input": sources[0]}, {}
        return {"op": "concat", "inputs": sources, "dim": 1}, {}

    def _pool(self, ins: list[str], x: Optional[str], attrs: "_Attrs") -> Optional[tuple[dict, dict[str, str]]]:
        kernel = attrs.ints("kernel_shape", None, None)
        if x is None or not kernel:
            return None
        nd = len(kernel)
        if nd not in (1, 2, 3) or any(k < 1 for k in kernel):
            return None
        if any(d != 1 for d in attrs.ints("dilations", nd, 1)):
            return None
        strides = attrs.ints("strides", nd, 1)
        pads = self._pads(ins[0], attrs, kernel, strides, [1] * nd)
        if pads is None or any(lo != hi or 2 * lo > k for (lo, hi), k in zip(pads, kernel)):
            return None  # asymmetric, or more than PyTorch's avg_pool pads: opaque
        return {"op": f"avg_pool{nd}d", "input": x, "kernel_size": kernel, "stride": strides,
                "padding": [lo for lo, _ in pads], "count_include_pad": bool(attrs.int("count_include_pad", 0)),
                "ceil_mode": bool(attrs.int("ceil_mode", 0))}, {}

    def _pad(self, ins: list[str], x: Optional[str], attrs: "_Attrs") -> Optional[tuple[dict, dict[str, str]]]:
        mode = attrs.string("mode", "constant")
        if x is None or mode not in _PAD_MODES:
            return None
        if len(ins) < 2 or not self._const(ins[1]) or any(v and not self._const(v) for v in ins[2:]):
            return None  # pads computed at run time (from Shape and the like): opaque
        pads = [int(v) for v in self._values(ins[1])]
        value = self._values(ins[2]) if len(ins) > 2 and ins[2] else [0.0]
        axes = [int(v) for v in self._values(ins[3])] if len(ins) > 3 and ins[3] else None
        if len(value) != 1 or not isinstance(value[0], (int, float)):
            return None
        value = float(value[0])
        shape = self.shapes.get(ins[0])
        rank = len(shape) if shape is not None else (len(pads) // 2 if axes is None else None)
        if rank is None or len(pads) != 2 * len(axes if axes is not None else range(rank)):
            return None
        axes = [a + rank if a < 0 else a for a in (axes if axes is not None else range(rank))]
        full = [[0, 0] for _ in range(rank)]
        half = len(pads) // 2
        for i, a in enumerate(axes):
            if not 0 <= a < rank:
                return None
            full[a] = [pads[i], pads[i + half]]
        if rank - 2 not in (1, 2, 3) or full[0] != [0, 0] or full[1] != [0, 0] or min(min(p) for p in full) < 0:
            return None  # pads the batch or channels, or crops: opaque
        if not math.isfinite(value):
            return None
        fields = {"op": "pad", "input": x, "padding": full[2:], "mode": _PAD_MODES[mode]}
        if mode == "constant" and value != 0:
            fields["value"] = value
        return fields, {}

    def _values(self, value: str) -> list[Any]:
        t = self.constants[value]
        if _is_external(t) or math.prod(t.dims) > 64:
            return []
        return numpy_helper.to_array(t).reshape(-1).tolist()

    def _scalar(self, value: str) -> Any:
        got = self._values(value)
        return got[0] if len(got) == 1 else True


def node_reads(node: onnx.NodeProto) -> Iterator[str]:
    """The values a node reads: its inputs and the outer-scope names its subgraphs (If, Loop, Scan) use."""
    yield from (v for v in node.input if v)
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for sub in graphs:
            yield from _outer_names(sub)


def _outer_names(g: onnx.GraphProto) -> Iterator[str]:
    inner = {i.name for i in g.input} | {t.name for t in g.initializer}
    for node in g.node:
        for v in node_reads(node):
            if v not in inner:
                yield v
        inner.update(node.output)


class _Attrs:
    """A node's attributes, each checked for the type and range convmerge relies on."""

    def __init__(self, node: onnx.NodeProto, at: str, layer: str) -> None:
        self.at, self.layer = at, layer
        self.raw = {a.name: a for a in node.attribute}

    def fail(self, name: str, problem: str) -> None:
        raise GraphError(f"{self.at}: attribute {_quote(name)}: {problem}")

    def _get(self, name: str, kind: int) -> Any:
        a = self.raw.get(name)
        if a is None:
            return None
        if a.type != kind:
            self.fail(name, f"is a {onnx.AttributeProto.AttributeType.Name(a.type)}, expected "
                            f"{onnx.AttributeProto.AttributeType.Name(kind)}")
        return helper.get_attribute_value(a)

    def int(self, name: str, default: Any) -> Any:
        value = self._get(name, onnx.AttributeProto.INT)
        if value is None:
            return default
        if name in ("group",) and value < 1:
            self.fail(name, f"{value} must be a positive integer")
        return int(value)

    def float(self, name: str, default: float) -> float:
        value = self._get(name, onnx.AttributeProto.FLOAT)
        if value is None:
            return default
        if not math.isfinite(value) or (name == "epsilon" and value < 0):
            self.fail(name, f"{value!r} must be a finite number{' >= 0' if name == 'epsilon' else ''}")
        return float(value)

    def string(self, name: str, default: str) -> str:
        value = self._get(name, onnx.AttributeProto.STRING)
        if value is None:
            return default
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(name, "is not UTF-8")
            raise

    def ints(self, name: str, count: Optional[int], default: Optional[int]) -> Optional[list[int]]:
        """A list of `count` ints (any count when None); absent: `default` repeated (or None)."""
        value = self._get(name, onnx.AttributeProto.INTS)
        if value is None:
            return None if default is None or count is None else [default] * count
        value = [int(v) for v in value]
        if count is not None and len(value) != count:
            self.fail(name, f"{value[:9]} has {len(value)} values, expected {count}")
        least = 0 if name in ("pads", "output_padding") else 1
        if any(v < least for v in value):
            self.fail(name, f"{value[:9]} must be {'>= 0' if least == 0 else 'positive'}")
        return value


def _line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


def _quote(name: str) -> str:
    text = f"'{name}'" if name.isprintable() and "'" not in name else repr(name)
    return text if len(text) <= 80 else text[:76] + "...'"


def _show(path: str) -> str:
    text = os.fsdecode(path)
    return text if text.isprintable() else repr(text)

