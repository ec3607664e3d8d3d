"""The model graph: reading a description (FORMAT.md, section 1), finding conv pairs and chains,
and writing the description back after a merge.

A state dict does not say how layers connect, and guessing would merge across a ReLU, so
everything here comes from the description; tensors only confirm it (shapes, presence).

Long because every field of every op is validated here, each error one line naming the layer and the field
(hostile descriptions are tested by the thousand); the facts about each op are in ops/.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from .ops import affine, linear
from . import ops, strictjson
from .errors import ConvmergeError, Kind
from .maths.reasons import Why
from .maths.spec import ConvSpec, PadSpec, PoolSpec, SpecError, pad_spec, padding_fields, pool_spec, spec_from_fields
from .ops.transpose import TransposeSpec, transpose_fields, transpose_spec_from_fields

VERSION = 1
CONV_OPS = ops.named(ops.Kind.CONV)
POOL_OPS = ops.named(ops.Kind.POOL)
CONV_TRANSPOSE_OPS = ops.named(ops.Kind.CONV_TRANSPOSE)
PASSTHROUGH_OPS = ops.of(ops.Kind.AFFINE, ops.Kind.PASS)
"""Ops a pair may have between its two convs."""
JOIN_OPS = ops.of(ops.Kind.JOIN)
LINEAR_OPS = frozenset(name for name, op in ops.OPS.items() if op.linear)
"""Ops a region may hold (FORMAT.md, section 1): each is linear (affine) in its input."""
ELEMENTWISE_OPS = ops.of(ops.Kind.ELEMENTWISE)
BROADCAST_OPS = ops.of(ops.Kind.BROADCAST) | {"add"}
"""Element-wise ops of several inputs; their output has the broadcast size of the inputs."""
SHAPE_PRESERVING_OPS = PASSTHROUGH_OPS | ELEMENTWISE_OPS | {"add", "sub", "mul"}
BN_TENSORS = ops.BN_TENSORS
MAX_DESCRIPTION_BYTES = 64 * 1024 * 1024
MAX_DEPTH = 64
MAX_INT = 2**63 - 1
"""Largest hyperparameter PyTorch can hold (int64); a bigger one cannot describe a real conv."""
INT_FIELDS = ("stride", "dilation", "padding", "output_padding", "groups", "kernel_size", "in_channels", "out_channels", "dim",
              "divisor_override")
CHANNEL_OPS = frozenset(name for name, op in ops.OPS.items() if op.keeps_channels)
"""Single-input ops whose output has as many channels as their input."""

_WIRING = {"name", "op", "input", "inputs"}
_SYNONYMS = {"epsilon": "eps", "kernel": "kernel_size", "pad": "padding", "pads": "padding", "axis": "dim",
             "strides": "stride", "dilations": "dilation", "group": "groups", "paddingmode": "padding_mode"}


class GraphError(ConvmergeError, ValueError):
    """A description that cannot be used; the message names the layer and the field."""

    kind = Kind.BAD_INPUT


@dataclass(frozen=True)
class Layer:
    name: str
    op: str
    inputs: tuple[str, ...]
    fields: Mapping[str, Any]


@dataclass(frozen=True)
class Pair:
    """conv `first`, then only batch_norm/identity/dropout (`via`), then conv `second`."""

    first: str
    second: str
    via: tuple[str, ...]
    blocked: Optional[Why] = None  # why it is skipped (another consumer, not float...)


@dataclass
class Graph:
    doc: dict
    inputs: tuple[str, ...]
    layers: dict[str, Layer]
    outputs: tuple[str, ...]
    consumers: dict[str, list[str]] = field(default_factory=dict)
    specs: dict[str, ConvSpec] = field(default_factory=dict)
    pools: dict[str, PoolSpec] = field(default_factory=dict)
    pads: dict[str, PadSpec] = field(default_factory=dict)
    transposes: dict[str, TransposeSpec] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    channels: dict[str, Optional[int]] = field(default_factory=dict)  # per value, where the description fixes it
    _index: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def tensor_names(self, name: str) -> list[str]:
        """The tensors a layer owns (what is dropped when a merge removes it)."""
        row = ops.get(self.layers[name].op)
        return [f"{name}.{s}" for s in (row.tensors if row is not None else ())]

    def pairs(self) -> list[Pair]:
        """Every adjacent conv pair, in layer order, with skipped ones saying why."""
        out = []
        for name, layer in self.layers.items():
            if layer.op not in CONV_OPS:
                continue
            for via, second in self._next_convs(name):
                out.append(Pair(name, second, tuple(via), self._blocked(name, via, second)))
        return out

    def sizes(self, input_size: Optional[Sequence[int]]) -> dict[str, Optional[tuple[int, ...]]]:
        """Spatial size of every value, where the description determines it (None where it does not)."""
        known: dict[str, Optional[tuple[int, ...]]] = {n: (tuple(input_size) if input_size else None) for n in self.inputs}
        traced = input_size is not None and self.doc.get("traced_input") == list(input_size)
        for name, layer in self.layers.items():
            known[name] = self.out_size(layer, [known.get(src) for src in layer.inputs])
            if known[name] is None and traced and layer.op not in LINEAR_OPS:
                known[name] = _traced_size(layer.fields.get("traced_size"))
        return known

    def out_size(self, layer: Layer, srcs: list[Optional[tuple[int, ...]]]) -> Optional[tuple[int, ...]]:
        src = srcs[0] if srcs else None
        op = layer.op
        if op == linear.OP:
            return ()  # a [N, C] value: no spatial axes, whatever came before
        if op in CONV_OPS or op in POOL_OPS or op in CONV_TRANSPOSE_OPS:
            spec = self.specs.get(layer.name) or self.pools.get(layer.name) or self.transposes[layer.name]
            return spec.out_size(src) if src is not None and len(src) == spec.ndim else None
        if op == "pad":
            pad = self.pads[layer.name]
            if src is None or pad.axes_given() not in (None, len(src)):
                return None
            return tuple(n + lo + hi for n, (lo, hi) in zip(src, pad.pairs(len(src))))
        if op == "concat":
            same = {s for s in srcs}
            return src if layer.fields.get("dim", 1) == 1 and len(same) == 1 else None
        if op in BROADCAST_OPS or op in SHAPE_PRESERVING_OPS:
            return _broadcast(srcs)
        return None

    def _next_convs(self, name: str) -> list[tuple[list[str], str]]:
        """Convs reached from `name` through passthrough layers only."""
        # Passthrough layers take one input, so they form a tree below `name`: walk it once, keeping
        # parent links rather than copying the path at every step (a description may hold very long runs).
        found: list[str] = []
        parent: dict[str, str] = {}
        stack = [name]
        while stack:
            cur = stack.pop()
            for nxt in self.consumers.get(cur, []):
                layer = self.layers[nxt]
                if layer.op in CONV_OPS:
                    parent.setdefault(nxt, cur)
                    found.append(nxt)
                elif layer.op in PASSTHROUGH_OPS and nxt not in parent:
                    parent[nxt] = cur
                    stack.append(nxt)
        if not found:
            return []
        order = self._order()
        out = []
        for conv in sorted(set(found), key=order.__getitem__):
            via, cur = [], parent[conv]
            while cur != name:
                via.append(cur)
                cur = parent[cur]
            out.append((via[::-1], conv))
        return out

    def _order(self) -> dict[str, int]:
        if len(self._index) != len(self.layers):
            self._index = {n: i for i, n in enumerate(self.layers)}
        return self._index

    def _blocked(self, first: str, via: list[str], second: str) -> Optional[Why]:
        for name in [first, *via]:
            if name in self.outputs:
                return Why.of("graph-output", layer=name)
            if len(self.consumers.get(name, [])) > 1:
                return Why.of("other-consumers", layer=name, count=len(self.consumers[name]))
        for name in via:
            if self.layers[name].fields.get("_not_float"):  # a batch norm's or an affine layer's tensors
                return Why.of("non-float-statistics", layer=name)
        for name in (first, second):
            if self.layers[name].fields.get("_not_float"):
                return Why.of("non-float-weights", layer=name)
        a, b = self.specs[first], self.specs[second]
        if a.ndim != b.ndim:
            return Why.of("axes-differ", first=first, second=second, axes1=a.ndim, axes2=b.ndim)
        if a.out_channels != b.in_channels:
            return Why.of("channels-differ", first=first, second=second, gives=a.out_channels, takes=b.in_channels)
        return None


def _traced_size(value: Any) -> Optional[tuple[int, ...]]:
    """An opaque layer's output size as the trace saw it (valid at the traced input size only)."""
    if isinstance(value, list) and 1 <= len(value) <= 3 and all(type(n) is int and 0 < n <= MAX_INT for n in value):
        return tuple(value)
    return None


def _broadcast(sizes: Sequence[Optional[tuple[int, ...]]]) -> Optional[tuple[int, ...]]:
    """The size of an element-wise op's output: the inputs broadcast (squeeze-excitation's x * s).

    With some inputs unknown, a known size with no axis of length 1 is still the answer: broadcasting
    only stretches length-1 axes, so a larger unknown input could not have been combined with it.
    """
    known = [s for s in sizes if s is not None]
    if not known or len({len(s) for s in known}) > 1:
        return None
    out = tuple(max(axis) for axis in zip(*known))
    if any(any(n not in (1, m) for n, m in zip(s, out)) for s in known):
        return None
    if len(known) < len(sizes) and any(n == 1 for n in out):
        return None
    return out


def load_description(text: str, where: str) -> dict:
    """Parse the JSON text of a description, refusing absurd sizes and nesting up front.

    Stricter than ``json.loads``: NaN/Infinity and duplicate keys are refused (two readers could
    otherwise see two different layers), as the safetensors header itself is read in io.py.
    """
    if len(text) > MAX_DESCRIPTION_BYTES:
        raise GraphError(f"{where}: description is {len(text)} bytes; more than {MAX_DESCRIPTION_BYTES} is refused")
    try:
        doc = strictjson.loads(text, MAX_DEPTH)
    except strictjson.TooDeep as e:
        raise GraphError(f"{where}: description nests {e.depth} levels deep; at most {MAX_DEPTH} are allowed") from None
    except ValueError as e:
        raise GraphError(f"{where}: description is not valid JSON ({_clip(_first_line(e))})") from None
    if not isinstance(doc, dict):
        raise GraphError(f"{where}: description must be a JSON object, not {_json_type(doc)}")
    return doc


def parse(doc: dict, tensors: Mapping[str, Any], where: str = "description") -> Graph:
    """Validate a description against the file's tensors (name -> object with .shape and .is_float).

    Every error names the layer (or the top-level field) and the field at fault, in one line.
    """
    if not isinstance(doc, dict):
        raise GraphError(f"{where}: description must be a JSON object, not {_json_type(doc)}")
    version = doc.get("version")
    if type(version) is not int or version != VERSION:
        raise GraphError(f"{where}: field 'version': {_brief(version)} is not supported (expected {VERSION})")
    inputs = _names(doc.get("inputs"), f"{where}: field 'inputs'")
    input_set = set(inputs)
    if len(input_set) != len(inputs):
        twice = next(n for i, n in enumerate(inputs) if n in inputs[:i])
        raise GraphError(f"{where}: field 'inputs': {_q(twice)} is named twice")
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise GraphError(f"{where}: field 'layers' must be a list, not {_json_type(raw_layers)}")
    layers: dict[str, Layer] = {}
    unknown: list[str] = []
    for i, raw in enumerate(raw_layers):
        layer = _layer(raw, i, where, unknown)
        if layer.name in layers or layer.name in input_set:
            raise GraphError(f"{where}: layer {_q(layer.name)}: field 'name': duplicate name "
                             f"({'a graph input' if layer.name in input_set else 'another layer'} has it)")
        layers[layer.name] = layer
    outputs = _names(doc.get("outputs"), f"{where}: field 'outputs'")
    for layer in layers.values():
        for src in layer.inputs:
            if src not in layers and src not in input_set:
                field_name = "input" if "input" in layer.fields else "inputs"
                raise GraphError(f"{where}: layer {_q(layer.name)}: field '{field_name}': {_q(src)} is no layer "
                                 "or graph input")
    for name in outputs:
        if name not in layers and name not in input_set:
            raise GraphError(f"{where}: field 'outputs': {_q(name)} is no layer or graph input")
    order = _topological(layers, inputs, where)
    graph = Graph(doc, tuple(inputs), {n: layers[n] for n in order}, tuple(outputs))
    for layer in graph.layers.values():
        for src in layer.inputs:
            graph.consumers.setdefault(src, []).append(layer.name)
    for name in outputs:
        graph.consumers.setdefault(name, [])
    for layer in graph.layers.values():
        if layer.op in CONV_OPS:
            graph.specs[layer.name] = _conv_spec(layer, tensors, where)
        elif layer.op in CONV_TRANSPOSE_OPS:
            graph.transposes[layer.name] = _conv_spec(layer, tensors, where, transposed=True)
        elif layer.op == "batch_norm":
            _check_bn(layer, tensors, where)
        elif layer.op == "affine":
            _check_affine(layer, tensors, where)
        elif layer.op in POOL_OPS:
            graph.pools[layer.name] = _checked(layer, where, lambda f: pool_spec(POOL_OPS[layer.op], f))
        elif layer.op == "pad":
            graph.pads[layer.name] = _pad_spec(layer, tensors, where)
        elif layer.op == "concat":
            dim = layer.fields.get("dim", 1)
            if type(dim) is not int:
                raise GraphError(f"{where}: layer {_q(layer.name)}: field 'dim': {_brief(dim)} must be an integer")
    _check_channels(graph, tensors, where)
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        graph.notes.append(f"unknown description fields kept as they are (convmerge does not read them): {shown}")
    return graph


def rewrite(graph: Graph, merges: Sequence[tuple[Sequence[str], str, str, str, Any]]) -> dict:
    """The description after each merge (layers, name, input, output, spec) became one conv `name` (a
    conv_transpose where `spec` is a TransposeSpec).

    The conv reads `input` and sits where `output` sat; every reference to a replaced layer now
    names the conv, so consumers keep working.  Fields a merged conv no longer has (channel counts,
    kernel size) are rewritten; other fields of a conv that keeps its name are kept.
    """
    doc = json.loads(json.dumps(graph.doc))
    gone: dict[str, str] = {}
    placed: dict[str, tuple[Sequence[str], str, str, ConvSpec]] = {}
    for layers, name, source, output, spec in merges:
        gone.update({n: name for n in layers})
        placed[output] = (layers, name, source, spec)
    raws = {raw["name"]: raw for raw in doc["layers"]}
    kept = []
    for raw in doc["layers"]:
        if raw["name"] in placed:
            layers, name, source, spec = placed[raw["name"]]
            old = raws.get(name)
            transposed = isinstance(spec, TransposeSpec)  # a conv_transpose with what followed it folded in
            kind = CONV_TRANSPOSE_OPS if transposed else CONV_OPS
            new = dict(old) if old is not None and old.get("op") in kind else {}
            for key in ("inputs", "in_channels", "out_channels", "in_features", "out_features", "bias"):
                new.pop(key, None)
            new.update({"name": name, "op": f"conv_transpose{spec.ndim}d" if transposed else linear.op_name(spec.ndim),
                        "input": gone.get(source, source),
                        **(transpose_fields(spec) if transposed else padding_fields(spec) if spec.ndim else {})})
            new["merged_from"] = list(new.get("merged_from", [])) + [n for n in layers if n != name]
            kept.append(new)
            continue
        if raw["name"] in gone:
            continue  # a layer of a merge: the merged conv stands where the merge's output stood
        if "input" in raw:
            raw["input"] = gone.get(raw["input"], raw["input"])
        elif isinstance(raw.get("inputs"), list):
            raw["inputs"] = [gone.get(n, n) for n in raw["inputs"]]
        kept.append(raw)
    doc["layers"] = kept
    doc["outputs"] = [gone.get(n, n) for n in doc["outputs"]]
    return doc


def _conv_spec(layer: Layer, tensors: Mapping[str, Any], where: str, transposed: bool = False) -> Any:
    """A conv's spec (a conv_transpose's with `transposed`), checked against its tensors."""
    at = f"{where}: layer {_q(layer.name)}"
    weight = tensors.get(f"{layer.name}.weight")
    if weight is None:
        raise GraphError(f"{at}: tensor {_q(layer.name + '.weight')} is missing from the file")
    shape = tuple(weight.shape)
    nd = ops.OPS[layer.op].ndim
    if len(shape) != nd + 2:
        raise GraphError(
            f"{at}: field 'op': {layer.op} needs a {nd + 2}-d weight, "
            f"{_q(layer.name + '.weight')} has shape {list(shape)}"
        )
    bias = tensors.get(f"{layer.name}.bias")
    for key in INT_FIELDS:
        if key in layer.fields and _too_big(layer.fields[key]):
            raise GraphError(f"{at}: field '{key}': {_brief(layer.fields[key])} is out of range "
                             f"(PyTorch holds at most {MAX_INT})")
    try:
        build = transpose_spec_from_fields if transposed else \
            linear.spec_from_fields if layer.op == linear.OP else spec_from_fields
        spec = build(layer.fields, shape, bias is not None)
    except SpecError as e:
        raise GraphError(f"{at}: {_spec_message(e)}") from None
    if bias is not None and tuple(bias.shape) != (spec.out_channels,):
        raise GraphError(f"{at}: tensor {_q(layer.name + '.bias')} has shape {list(bias.shape)}, "
                         f"expected [{spec.out_channels}]")
    if not weight.is_float or (bias is not None and not bias.is_float):
        layer.fields["_not_float"] = True  # type: ignore[index]
    return spec


def _checked(layer: Layer, where: str, build: Any) -> Any:
    """Run a spec builder on a layer's fields; its SpecError becomes a GraphError naming the layer."""
    for key in INT_FIELDS:
        if key in layer.fields and _too_big(layer.fields[key]):
            raise GraphError(f"{where}: layer {_q(layer.name)}: field '{key}': {_brief(layer.fields[key])} is out of "
                             f"range (PyTorch holds at most {MAX_INT})")
    try:
        return build(layer.fields)
    except SpecError as e:
        raise GraphError(f"{where}: layer {_q(layer.name)}: {_spec_message(e)}") from None


def _pad_spec(layer: Layer, tensors: Mapping[str, Any], where: str) -> PadSpec:
    """A pad layer; a tensor `<name>.value` of shape [C] makes its constant per channel (DBB's BN-and-pad)."""
    spec = _checked(layer, where, pad_spec)
    value = tensors.get(f"{layer.name}.value")
    if value is not None:
        at = f"{where}: layer {_q(layer.name)}"
        if "value" in layer.fields:
            raise GraphError(f"{at}: field 'value' given and tensor {_q(layer.name + '.value')} too; keep one")
        if spec.mode != "constant":
            raise GraphError(f"{at}: tensor {_q(layer.name + '.value')} needs mode 'constant', not {spec.mode!r}")
        if len(value.shape) != 1:
            raise GraphError(f"{at}: tensor {_q(layer.name + '.value')} has shape {list(value.shape)}, "
                             "expected one value per channel")
        if not value.is_float:
            layer.fields["_not_float"] = True  # type: ignore[index]
    return spec


def _check_bn(layer: Layer, tensors: Mapping[str, Any], where: str) -> None:
    at = f"{where}: layer {_q(layer.name)}"
    eps = layer.fields.get("eps", 1e-5)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not (eps >= 0 and math.isfinite(eps)):
        raise GraphError(f"{at}: field 'eps': {_brief(eps)} must be a finite number >= 0")
    shapes = []
    for suffix in ("running_mean", "running_var", "weight", "bias"):
        t = tensors.get(f"{layer.name}.{suffix}")
        if t is None:
            if suffix.startswith("running"):
                raise GraphError(f"{at}: tensor {_q(f'{layer.name}.{suffix}')} is missing from the file "
                                 "(a batch_norm needs its running statistics)")
            continue
        if len(t.shape) != 1:
            raise GraphError(f"{at}: tensor {_q(f'{layer.name}.{suffix}')} has shape {list(t.shape)}, "
                             "expected one channel axis")
        shapes.append((suffix, tuple(t.shape)))
        if not t.is_float:
            layer.fields["_not_float"] = True  # type: ignore[index]
    if len({shape for _, shape in shapes}) > 1:
        detail = ", ".join(f"{suffix} {list(shape)}" for suffix, shape in shapes)
        raise GraphError(f"{at}: its tensors disagree on the channel count ({detail})")


def _check_affine(layer: Layer, tensors: Mapping[str, Any], where: str) -> None:
    at = f"{where}: layer {_q(layer.name)}"
    for key in affine.TENSORS:
        if key in layer.fields:
            raise GraphError(f"{at}: field '{key}': an affine layer's {key} is the tensor {_q(layer.name + '.' + key)} "
                             "([C] or [1]), not a field")
    problem = affine.check(layer.name, tensors, at, _q)
    if problem:
        raise GraphError(problem)
    if any(not tensors[f"{layer.name}.{s}"].is_float for s in affine.TENSORS if f"{layer.name}.{s}" in tensors):
        layer.fields["_not_float"] = True  # type: ignore[index]


def _check_channels(graph: Graph, tensors: Mapping[str, Any], where: str) -> None:
    """Channel counts must agree along every edge where both ends are known (convs, batch norms and
    the single-input ops between them): a description that contradicts its weights is an error, not
    a pair to skip."""
    channels: dict[str, Optional[int]] = {n: _read_channels(graph, tensors, n) for n in graph.inputs}
    for name, layer in graph.layers.items():
        got = [channels.get(src) for src in layer.inputs]
        src_channels = got[0] if len(got) == 1 else None
        at = f"{where}: layer {_q(name)}: field '{'input' if 'input' in layer.fields else 'inputs'}'"
        if layer.op in CONV_OPS:
            spec = graph.specs[name]
            if src_channels is not None and src_channels != spec.in_channels:
                raise GraphError(
                    f"{at}: {_q(layer.inputs[0])} gives {src_channels} channels, but {_q(name + '.weight')} "
                    f"(shape {list(spec.weight_shape)}, groups {spec.groups}) takes {spec.in_channels}"
                )
            channels[name] = spec.out_channels
        elif layer.op in CONV_TRANSPOSE_OPS:
            tspec = graph.transposes[name]
            if src_channels is not None and src_channels != tspec.in_channels:
                raise GraphError(f"{at}: {_q(layer.inputs[0])} gives {src_channels} channels, but "
                                 f"{_q(name + '.weight')} (shape {list(tspec.weight_shape)}, a conv_transpose's "
                                 f"[in, out / groups, *kernel]) takes {tspec.in_channels}")
            channels[name] = tspec.out_channels
        elif layer.op == "batch_norm":
            mean = tensors.get(f"{name}.running_mean")
            count = int(mean.shape[0]) if mean is not None else None
            if src_channels is not None and count is not None and src_channels != count:
                raise GraphError(
                    f"{at}: {_q(layer.inputs[0])} gives {src_channels} channels, but {_q(name + '.running_mean')} "
                    f"has {count}"
                )
            channels[name] = count if count is not None else src_channels
        elif layer.op == "affine" and affine.count(name, tensors) is not None:
            count = affine.count(name, tensors)
            if src_channels is not None and src_channels != count:
                raise GraphError(f"{at}: {_q(layer.inputs[0])} gives {src_channels} channels, but the tensors of "
                                 f"{_q(name)} hold {count} values")
            channels[name] = count
        elif layer.op == "pad" and f"{name}.value" in tensors:
            count = int(tensors[f"{name}.value"].shape[0])
            if src_channels is not None and src_channels != count:
                raise GraphError(f"{at}: {_q(layer.inputs[0])} gives {src_channels} channels, but "
                                 f"{_q(name + '.value')} has {count} values")
            channels[name] = count
        elif layer.op in CHANNEL_OPS and len(got) == 1:
            channels[name] = src_channels
        elif layer.op in ("add", "sub") and len({c for c in got if c is not None}) > 1:
            shown = ", ".join(f"{_q(src)} gives {c}" for src, c in zip(layer.inputs, got) if c is not None)
            raise GraphError(f"{at}: {layer.op} needs equal shapes, but the channel counts differ ({shown})")
        elif layer.op == "concat" and layer.fields.get("dim", 1) == 1:
            channels[name] = sum(got) if got and None not in got else None  # type: ignore[arg-type]
        elif layer.op in SHAPE_PRESERVING_OPS and got and None not in got and len(set(got)) == 1:
            channels[name] = got[0]
        else:
            channels[name] = None
        if channels[name] is None:
            channels[name] = _read_channels(graph, tensors, name)
    graph.channels = channels


def _read_channels(graph: Graph, tensors: Mapping[str, Any], value: str) -> Optional[int]:
    """The channels the layers reading a value take, where its producer does not fix them (a graph input, whose
    channel count the description does not state; an opaque op): the first conv, batch norm or valued pad
    reached through ops that keep the channel count.  A reader that disagrees is then caught as a contradiction."""
    stack, seen = [value], set()
    while stack:
        for c in graph.consumers.get(stack.pop(), []):
            layer = graph.layers[c]
            if c in seen or len(layer.inputs) != 1:
                continue
            seen.add(c)
            if layer.op in CONV_OPS:
                return graph.specs[c].in_channels
            if layer.op in CONV_TRANSPOSE_OPS:
                return graph.transposes[c].in_channels
            count = tensors.get(f"{c}.running_mean" if layer.op == "batch_norm" else f"{c}.value")
            if layer.op in ("batch_norm", "pad") and count is not None:
                return int(count.shape[0])
            if layer.op == "affine" and affine.count(c, tensors) is not None:
                return affine.count(c, tensors)
            if layer.op in CHANNEL_OPS:
                stack.append(c)
    return None


def _layer(raw: Any, i: int, where: str, unknown: list[str]) -> Layer:
    if not isinstance(raw, dict):
        raise GraphError(f"{where}: layers[{i}] must be an object, not {_json_type(raw)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise GraphError(f"{where}: layers[{i}]: field 'name' must be a non-empty string, not {_brief(name)}")
    at = f"{where}: layer {_q(name)}"
    op = raw.get("op")
    if not isinstance(op, str) or not op:
        raise GraphError(f"{at}: field 'op' must be a non-empty string, not {_brief(op)}")
    if "input" in raw and "inputs" in raw:
        raise GraphError(f"{at}: fields 'input' and 'inputs' both given; use one")
    if "input" in raw:
        if not isinstance(raw["input"], str):
            raise GraphError(f"{at}: field 'input' must be a string (a layer or graph input name), "
                             f"not {_brief(raw['input'])}")
        inputs: tuple[str, ...] = (raw["input"],)
    else:
        inputs = tuple(_names(raw.get("inputs", []), f"{at}: field 'inputs'"))
    row = ops.get(op)
    least, most = row.inputs if row is not None else (0, None)
    if most == 1 and len(inputs) != 1:
        raise GraphError(f"{at}: field 'input': {op} takes exactly one input, got {len(inputs)}")
    if op == "add" and len(inputs) < least:
        raise GraphError(f"{at}: field 'inputs': add sums two or more layers, got {len(inputs)} "
                         "(adding a constant is another op)")
    if len(inputs) < least or (most is not None and len(inputs) > most):
        wanted = f"exactly {least}" if least == most else f"at least {least}" if len(inputs) < least else f"at most {most}"
        raise GraphError(f"{at}: field 'inputs': {op} takes {wanted} inputs, got {len(inputs)}" if least > 1 else
                         f"{at}: field 'input': {op} needs an input, got none")
    if row is not None and (row.linear or row.kind is ops.Kind.CONV_TRANSPOSE):
        for key in raw:
            if key in _WIRING or key in row.fields or not isinstance(key, str):
                continue
            near = _resembles(key, row.fields)
            if near:
                raise GraphError(f"{at}: field {_q(key)} is not a field of {op}; did you mean {_q(near)}? "
                                 "(a misspelled field would silently fall back to its default)")
            unknown.append(f"{name}.{key}")
    return Layer(name, op, inputs, dict(raw))


def _resembles(key: str, known: set[str]) -> Optional[str]:
    """The known field that `key` misspells: same but for case or separators, a synonym, or a small edit."""
    squash = key.lower().replace("-", "").replace("_", "").replace(" ", "")
    for field_name in sorted(known):
        if squash == field_name.replace("_", ""):
            return field_name
    if _SYNONYMS.get(squash) in known:
        return _SYNONYMS[squash]
    best = min(sorted(known), key=lambda f: _edits(key.lower(), f), default=None)
    if best is not None and _edits(key.lower(), best) <= (1 if min(len(key), len(best)) <= 4 else 2):
        return best
    return None


def _edits(a: str, b: str) -> int:
    """Levenshtein distance (a few short field names: the plain dynamic programme is enough)."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def _names(value: Any, what: str) -> list[str]:
    if not isinstance(value, list):
        raise GraphError(f"{what} must be a list of names, not {_json_type(value)}")
    for v in value:
        if not isinstance(v, str):
            raise GraphError(f"{what} must be a list of names; it holds {_brief(v)}")
    return value


def _topological(layers: dict[str, Layer], inputs: Sequence[str], where: str) -> list[str]:
    """Layer names in dependency order; a cycle is an error naming a layer on it."""
    order: list[str] = []
    state: dict[str, int] = {n: 2 for n in inputs}
    for root in layers:
        stack = [(root, 0)]
        while stack:
            name, k = stack.pop()
            if k == 0:
                if state.get(name) == 2:
                    continue
                if state.get(name) == 1:
                    raise GraphError(f"{where}: layer {_q(name)}: field 'input': the graph has a cycle through it")
                state[name] = 1
            deps = layers[name].inputs
            if k < len(deps):
                stack.append((name, k + 1))
                if state.get(deps[k]) != 2:
                    if state.get(deps[k]) == 1:
                        raise GraphError(f"{where}: layer {_q(deps[k])}: field 'input': the graph has a cycle "
                                         "through it")
                    stack.append((deps[k], 0))
            else:
                state[name] = 2
                order.append(name)
    return order


def _too_big(value: Any) -> bool:
    """An int beyond int64 anywhere in a (nested) field value."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_INT:
            return True
        if isinstance(v, list):
            stack.extend(v[:64])
    return False


def _spec_message(e: SpecError) -> str:
    """spec.py says 'stride: ...'; here every message reads "field 'stride': ..."."""
    text = _clip(str(e))
    key, sep, rest = text.partition(": ")
    return f"field '{key}': {rest}" if sep and key.isidentifier() else f"field {text}"


def _q(name: str) -> str:
    """A name from the description, quoted; hostile ones (control characters, megabytes) stay short and on one line."""
    text = f"'{name}'" if name.isprintable() and "'" not in name else repr(name)
    return text if len(text) <= 80 else text[:76] + "...'"


def _brief(value: Any) -> str:
    text = repr(value[:9] if isinstance(value, list) else value)
    return _clip(text, 80)


def _clip(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__
