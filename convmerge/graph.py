"""The model graph: reading a description (FORMAT.md, section 1), finding conv pairs and chains,
and writing the description back after a merge.

A state dict does not say how layers connect, and guessing would merge across a ReLU, so
everything here comes from the description; tensors only confirm it (shapes, presence).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from .spec import ConvSpec, SpecError, padding_fields, spec_from_fields

VERSION = 1
CONV_OPS = {"conv1d": 1, "conv2d": 2, "conv3d": 3}
PASSTHROUGH_OPS = {"batch_norm", "identity", "dropout"}
SHAPE_PRESERVING_OPS = PASSTHROUGH_OPS | {
    "relu", "relu6", "leaky_relu", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "elu", "mish",
    "add", "sub", "mul", "neg", "prelu", "clamp", "hardtanh", "softplus",
}
BN_TENSORS = ("running_mean", "running_var", "weight", "bias", "num_batches_tracked")
MAX_DESCRIPTION_BYTES = 64 * 1024 * 1024
MAX_DEPTH = 64


class GraphError(ValueError):
    """A description that cannot be used; the message names the layer and the field."""


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
    blocked: Optional[str] = None  # why it is skipped (another consumer, not float...)


@dataclass
class Graph:
    doc: dict
    inputs: tuple[str, ...]
    layers: dict[str, Layer]
    outputs: tuple[str, ...]
    consumers: dict[str, list[str]] = field(default_factory=dict)
    specs: dict[str, ConvSpec] = field(default_factory=dict)

    def pairs(self) -> list[Pair]:
        """Every adjacent conv pair, in layer order, with skipped ones saying why."""
        out = []
        for name, layer in self.layers.items():
            if layer.op not in CONV_OPS:
                continue
            for via, second in self._next_convs(name):
                out.append(Pair(name, second, tuple(via), self._blocked(name, via, second)))
        return out

    def chains(self) -> list[list[Pair]]:
        """Maximal runs of pairs that may merge (none skipped), each as its consecutive pairs."""
        links = {p.first: p for p in self.pairs() if p.blocked is None}
        seconds = {p.second for p in links.values()}
        out = []
        for first in links:
            if first in seconds:
                continue
            run, cur = [], first
            while cur in links:
                run.append(links[cur])
                cur = links[cur].second
            out.append(run)
        return out

    def trailing(self, conv: str) -> list[str]:
        """Batch norm / identity / dropout right after a conv that a merged conv can absorb."""
        out, cur = [], conv
        while cur not in self.outputs and len(self.consumers.get(cur, [])) == 1:
            layer = self.layers[self.consumers[cur][0]]
            if layer.op not in PASSTHROUGH_OPS or layer.name in self.outputs or layer.fields.get("_not_float"):
                break
            out.append(layer.name)
            cur = layer.name
        return out

    def sizes(self, input_size: Optional[Sequence[int]]) -> dict[str, Optional[tuple[int, ...]]]:
        """Spatial size at each layer's output, where convs and shape-preserving ops determine it."""
        known: dict[str, Optional[tuple[int, ...]]] = {n: (tuple(input_size) if input_size else None) for n in self.inputs}
        for name, layer in self.layers.items():
            src = known.get(layer.inputs[0]) if layer.inputs else None
            if src is None:
                known[name] = None
            elif layer.op in CONV_OPS:
                spec = self.specs[name]
                known[name] = spec.out_size(src) if len(src) == spec.ndim else None
            else:
                known[name] = src if layer.op in SHAPE_PRESERVING_OPS else None
        return known

    def _next_convs(self, name: str) -> list[tuple[list[str], str]]:
        """Convs reached from `name` through passthrough layers only."""
        found = []
        stack: list[tuple[list[str], str]] = [([], name)]
        while stack:
            via, cur = stack.pop()
            for nxt in self.consumers.get(cur, []):
                layer = self.layers[nxt]
                if layer.op in CONV_OPS:
                    found.append((via, nxt))
                elif layer.op in PASSTHROUGH_OPS:
                    stack.append((via + [nxt], nxt))
        return sorted(found, key=lambda f: list(self.layers).index(f[1]))

    def _blocked(self, first: str, via: list[str], second: str) -> Optional[str]:
        for name in [first, *via]:
            if name in self.outputs:
                return f"{name} is a graph output"
            if len(self.consumers.get(name, [])) > 1:
                return f"{name} has {len(self.consumers[name])} consumers"
        for name in via:
            if self.layers[name].op == "batch_norm" and self.layers[name].fields.get("_not_float"):
                return f"{name} has non-float statistics"
        for name in (first, second):
            if self.layers[name].fields.get("_not_float"):
                return f"{name} has non-float weights"
        if self.specs[first].out_channels != self.specs[second].in_channels:
            return f"{second} takes {self.specs[second].in_channels} channels, {first} gives {self.specs[first].out_channels}"
        return None


def load_description(text: str, where: str) -> dict:
    """Parse the JSON text of a description, refusing absurd sizes and nesting up front."""
    if len(text) > MAX_DESCRIPTION_BYTES:
        raise GraphError(f"{where}: description is {len(text)} bytes; more than {MAX_DESCRIPTION_BYTES} is refused")
    depth = _max_depth(text)
    if depth > MAX_DEPTH:
        raise GraphError(f"{where}: description nests {depth} levels deep; at most {MAX_DEPTH} are allowed")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise GraphError(f"{where}: description is not valid JSON ({_first_line(e)})") from None
    if not isinstance(doc, dict):
        raise GraphError(f"{where}: description must be a JSON object, not {type(doc).__name__}")
    return doc


def parse(doc: dict, tensors: Mapping[str, Any], where: str = "description") -> Graph:
    """Validate a description against the file's tensors (name -> object with .shape and .is_float)."""
    if doc.get("version") != VERSION:
        raise GraphError(f"{where}: field 'version': {doc.get('version')!r} is not supported (expected {VERSION})")
    inputs = _names(doc.get("inputs"), f"{where}: field 'inputs'")
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise GraphError(f"{where}: field 'layers' must be a list")
    layers: dict[str, Layer] = {}
    for i, raw in enumerate(raw_layers):
        layer = _layer(raw, i, where)
        if layer.name in layers or layer.name in inputs:
            raise GraphError(f"{where}: layer '{layer.name}': field 'name': duplicate name")
        layers[layer.name] = layer
    outputs = _names(doc.get("outputs"), f"{where}: field 'outputs'")
    known = set(inputs) | set(layers)
    for layer in layers.values():
        for src in layer.inputs:
            if src not in known:
                raise GraphError(f"{where}: layer '{layer.name}': field 'input': '{src}' is no layer or graph input")
    for name in outputs:
        if name not in known:
            raise GraphError(f"{where}: field 'outputs': '{name}' is no layer or graph input")
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
        elif layer.op == "batch_norm":
            _check_bn(layer, tensors, where)
    return graph


def rewrite(graph: Graph, merges: Sequence[tuple[Sequence[str], str, ConvSpec]]) -> dict:
    """The description after merging each segment's layers into one conv named `into`.

    Layers absorbed after `into` (a trailing batch norm) are referred to by `into` from then on.
    """
    doc = json.loads(json.dumps(graph.doc))
    gone: dict[str, str] = {}
    replaced: dict[str, tuple[Sequence[str], ConvSpec]] = {}
    for layers, into, spec in merges:
        gone.update({n: into for n in layers if n != into})
        replaced[into] = (layers, spec)
    kept = []
    for raw in doc["layers"]:
        name = raw["name"]
        if name in gone:
            continue
        if name in replaced:
            layers, spec = replaced[name]
            raw.pop("inputs", None)
            raw["input"] = graph.layers[layers[0]].inputs[0]
            raw.update(padding_fields(spec))
            raw["op"] = f"conv{spec.ndim}d"
            raw["merged_from"] = list(raw.get("merged_from", [])) + [n for n in layers if n != name]
        elif "input" in raw:
            raw["input"] = gone.get(raw["input"], raw["input"])
        elif isinstance(raw.get("inputs"), list):
            raw["inputs"] = [gone.get(n, n) for n in raw["inputs"]]
        kept.append(raw)
    doc["layers"] = kept
    doc["outputs"] = [gone.get(n, n) for n in doc["outputs"]]
    return doc


def removed_tensors(graph: Graph, names: Sequence[str]) -> list[str]:
    """Tensors owned by layers that a merge removes."""
    out = []
    for name in names:
        suffixes = ("weight", "bias") if graph.layers[name].op in CONV_OPS else BN_TENSORS
        out += [f"{name}.{s}" for s in suffixes]
    return out


def _conv_spec(layer: Layer, tensors: Mapping[str, Any], where: str) -> ConvSpec:
    weight = tensors.get(f"{layer.name}.weight")
    if weight is None:
        raise GraphError(f"{where}: layer '{layer.name}': tensor '{layer.name}.weight' is missing from the file")
    shape = tuple(weight.shape)
    if len(shape) != CONV_OPS[layer.op] + 2:
        raise GraphError(
            f"{where}: layer '{layer.name}': field 'op': {layer.op} needs a {CONV_OPS[layer.op] + 2}-d weight, "
            f"'{layer.name}.weight' has shape {list(shape)}"
        )
    bias = tensors.get(f"{layer.name}.bias")
    if bias is not None and tuple(bias.shape) != (shape[0],):
        raise GraphError(f"{where}: layer '{layer.name}': tensor '{layer.name}.bias' has shape {list(bias.shape)}, "
                         f"expected [{shape[0]}]")
    try:
        spec = spec_from_fields(layer.fields, shape, bias is not None)
    except SpecError as e:
        raise GraphError(f"{where}: layer '{layer.name}': field {e}") from None
    if not weight.is_float or (bias is not None and not bias.is_float):
        layer.fields["_not_float"] = True  # type: ignore[index]
    return spec


def _check_bn(layer: Layer, tensors: Mapping[str, Any], where: str) -> None:
    eps = layer.fields.get("eps", 1e-5)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise GraphError(f"{where}: layer '{layer.name}': field 'eps': {eps!r} must be a number >= 0")
    shapes = []
    for suffix in ("running_mean", "running_var", "weight", "bias"):
        t = tensors.get(f"{layer.name}.{suffix}")
        if t is None:
            if suffix.startswith("running"):
                raise GraphError(f"{where}: layer '{layer.name}': tensor '{layer.name}.{suffix}' is missing from the file")
            continue
        if len(t.shape) != 1:
            raise GraphError(f"{where}: layer '{layer.name}': tensor '{layer.name}.{suffix}' has shape {list(t.shape)}, "
                             "expected one channel axis")
        shapes.append(tuple(t.shape))
        if not t.is_float:
            layer.fields["_not_float"] = True  # type: ignore[index]
    if len(set(shapes)) > 1:
        raise GraphError(f"{where}: layer '{layer.name}': its tensors disagree on the channel count")


def _layer(raw: Any, i: int, where: str) -> Layer:
    if not isinstance(raw, dict):
        raise GraphError(f"{where}: layers[{i}] must be an object")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise GraphError(f"{where}: layers[{i}]: field 'name' must be a non-empty string")
    op = raw.get("op")
    if not isinstance(op, str) or not op:
        raise GraphError(f"{where}: layer '{name}': field 'op' must be a non-empty string")
    if "input" in raw and "inputs" in raw:
        raise GraphError(f"{where}: layer '{name}': fields 'input' and 'inputs' both given; use one")
    if "input" in raw:
        if not isinstance(raw["input"], str):
            raise GraphError(f"{where}: layer '{name}': field 'input' must be a string")
        inputs: tuple[str, ...] = (raw["input"],)
    else:
        inputs = tuple(_names(raw.get("inputs", []), f"{where}: layer '{name}': field 'inputs'"))
    if (op in CONV_OPS or op in PASSTHROUGH_OPS) and len(inputs) != 1:
        raise GraphError(f"{where}: layer '{name}': field 'input': {op} takes exactly one input, got {len(inputs)}")
    return Layer(name, op, inputs, dict(raw))


def _names(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise GraphError(f"{what} must be a list of names")
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
                    raise GraphError(f"{where}: layer '{name}': field 'input': the graph has a cycle through it")
                state[name] = 1
            deps = layers[name].inputs
            if k < len(deps):
                stack.append((name, k + 1))
                if state.get(deps[k]) != 2:
                    if state.get(deps[k]) == 1:
                        raise GraphError(f"{where}: layer '{deps[k]}': field 'input': the graph has a cycle through it")
                    stack.append((deps[k], 0))
            else:
                state[name] = 2
                order.append(name)
    return order


def _max_depth(text: str) -> int:
    """Bracket nesting depth outside strings: checked before json.loads can recurse."""
    depth = deepest = 0
    in_str = escape = False
    for ch in text:
        if in_str:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__
