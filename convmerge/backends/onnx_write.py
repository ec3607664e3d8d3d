"""The fused ONNX model: each merged part of the plan becomes one Conv node (Gemm for linear layers), everything
else stays.

A unit of the plan replaces some nodes; one Conv (after a Pad node where the merged conv pads by
reflection, replication or wrapping, which Conv cannot) reads the value the unit read and writes the
value the unit wrote, under its ONNX name, so no consumer changes.  It stands where the unit's last
node stood, which keeps the node order topological.  Initializers, Constant nodes and nodes computing
constants from constants that only the replaced nodes read are removed, and so is the value_info of
values that no longer exist; node order, metadata, opset imports, doc strings and everything else are
kept as they were.

The merged weights are not put in the model until it is written (`write`), one at a time, straight to the
file: a model with external data never holds its weights in memory, only the tensor being written.
"""

from __future__ import annotations

import os
from typing import BinaryIO, Callable, Optional

import onnx
import torch
from onnx import TensorProto, helper

from ..graph import GraphError
from ..frontends.onnx_read import DEFAULT_DOMAINS, DTYPES, MAX_PROTO_BYTES, OnnxGraph, node_reads, raw_bytes
from ..engine.plan import Plan, Unit
from ..ops.transpose import TransposeSpec

__all__ = ["EXTERNAL_THRESHOLD", "Fused", "fused_model", "write"]

EXTERNAL_THRESHOLD = 1024
"""Tensors of at least this many bytes go to the external data file (onnx's own default)."""
_PAD_MODE = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}
_ONNX_TYPE = {dtype: code for code, (_, dtype) in DTYPES.items()}


class Fused:
    """The fused model without its merged weights' data, and where each comes from."""

    def __init__(self, proto: onnx.ModelProto, weights: dict[str, Unit]) -> None:
        self.proto = proto
        self.weights = weights  # initializer name -> the unit whose stored weight it is (read when written)

    def external(self, source: OnnxGraph) -> bool:
        """Whether the weights go to an external data file: where the input kept its weights outside, or the
        model would pass protobuf's 2 GiB limit."""
        size = self.proto.ByteSize() + sum(u.kept.weight.numel() * u.kept.weight.element_size()
                                           for u in self.weights.values())
        return source.external or size >= MAX_PROTO_BYTES - (64 << 20)


def fused_model(model: OnnxGraph, plan: Plan) -> Fused:
    """A copy of the model with the plan's applied units in place of their nodes (their weights left empty)."""
    out = onnx.ModelProto()
    out.CopyFrom(model.proto)
    g = out.graph
    replaced: dict[int, Optional[Unit]] = {}
    for unit in plan.applied:
        for layer in unit.layers:
            replaced[model.nodes[layer]] = None
        replaced[model.nodes[unit.output]] = unit
    names = _Names(g, set(replaced))
    nodes, inits = [], []
    weights: dict[str, Unit] = {}
    for index, node in enumerate(g.node):
        if index not in replaced:
            nodes.append(node)
            continue
        unit = replaced[index]
        if unit is not None:
            new_nodes, new_inits = _conv_nodes(unit, model, names)
            nodes += new_nodes
            inits += new_inits
            weights[new_inits[0].name] = unit
    gone = [v for i in replaced for v in g.node[i].output if v]
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(inits)
    _drop_dead(g, {v for i in replaced for v in model.proto.graph.node[i].input if v}, set(model.constants))
    live = _produced(g)
    kept = [vi for vi in g.value_info if vi.name in live or vi.name not in gone]
    del g.value_info[:]
    g.value_info.extend(kept)
    return Fused(out, weights)


def _conv_nodes(unit: Unit, model: OnnxGraph, names: "_Names") -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    spec = unit.spec
    transposed = isinstance(spec, TransposeSpec)  # a conv_transpose with a batch norm folded in
    nd = spec.ndim
    source, target = model.values[unit.input], model.values[unit.output]
    kept = unit.kept  # the weight's data comes when the file is written (`write`): see Fused
    weight = _tensor(names.value(f"{unit.name}.weight"), kept.weight, data=False)
    inits = [weight]
    inputs = [source, weight.name]
    if kept.bias is not None:  # kept even where the weight is dropped (plan.KEEP_BYTES), and verified with it
        bias = _tensor(names.value(f"{unit.name}.bias"), kept.bias)
        inits.append(bias)
        inputs.append(bias.name)
    merged_from = ", ".join(n for n in unit.layers)
    if transposed:  # PyTorch's padding crops both sides, its output_padding adds cells at the end: ONNX's too
        return [helper.make_node(
            "ConvTranspose", inputs, [target], names.node(unit.name), doc_string=f"convmerge: merged from {merged_from}",
            kernel_shape=list(spec.kernel_size), strides=list(spec.stride), dilations=list(spec.dilation),
            group=spec.groups, pads=list(spec.padding) * 2, output_padding=list(spec.output_padding))], inits
    lo, hi = [a.pad[0] for a in spec.axes], [a.pad[1] for a in spec.axes]
    nodes = []
    if spec.padding_mode != "zeros" and spec.pads_anything:
        if spec.padding_mode == "circular" and model.opset < 19:
            raise GraphError(f"{model.where}: layer '{unit.name}' (merged from {', '.join(unit.layers)}): "
                             "padding_mode circular needs Pad mode 'wrap', which is in opset 19 and later")
        pads = _tensor(names.value(f"{unit.name}.pads"), torch.tensor([0, 0, *lo, 0, 0, *hi], dtype=torch.int64))
        inits.append(pads)
        padded = names.value(f"{unit.name}.padded")
        nodes.append(helper.make_node("Pad", [source, pads.name], [padded], names.node(f"{unit.name}.pad"),
                                      mode=_PAD_MODE[spec.padding_mode]))
        inputs[0], lo, hi = padded, [0] * nd, [0] * nd
    if nd == 0:  # linear layers: Y = X W^T + b
        nodes.append(helper.make_node("Gemm", inputs, [target], names.node(unit.name),
                                      doc_string=f"convmerge: merged from {merged_from}", transB=1))
        return nodes, inits
    nodes.append(helper.make_node(
        "Conv", inputs, [target], names.node(unit.name), doc_string=f"convmerge: merged from {merged_from}",
        kernel_shape=list(spec.kernel_size), strides=list(spec.stride), dilations=list(spec.dilation),
        group=spec.groups, pads=lo + hi))
    return nodes, inits


def _tensor(name: str, t: torch.Tensor, data: bool = True) -> TensorProto:
    """A tensor stored as raw little-endian bytes, in its own dtype (bfloat16 included); without `data`, its
    name, type and shape only."""
    out = TensorProto()
    out.name = name
    out.data_type = _ONNX_TYPE[t.dtype]
    out.dims.extend(t.shape)
    if data:
        out.raw_data = _raw(t).tobytes()
    return out


def _raw(t: torch.Tensor) -> "memoryview":
    """The tensor's bytes, little-endian, without a copy where it is contiguous on the CPU."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy() if flat.numel() else b"")


class _Names:
    """Fresh value and node names: the wanted one where free, else with a number."""

    def __init__(self, g: onnx.GraphProto, replaced: set[int]) -> None:
        self.values = {i.name for i in g.input} | {t.name for t in g.initializer} | {
            v for n in g.node for v in (*n.input, *n.output)} | {o.name for o in g.output}
        # the merged conv may take the name of a node it replaces
        self.nodes = {n.name for i, n in enumerate(g.node) if i not in replaced}

    def value(self, want: str) -> str:
        return self._fresh(want, self.values)

    def node(self, want: str) -> str:
        return self._fresh(want, self.nodes)

    @staticmethod
    def _fresh(want: str, taken: set[str]) -> str:
        name, k = want, 1
        while name in taken:
            k += 1
            name = f"{want}_{k}"
        taken.add(name)
        return name


def _reads(g: onnx.GraphProto) -> set[str]:
    return {v for n in g.node for v in node_reads(n)} | {o.name for o in g.output}


def _produced(g: onnx.GraphProto) -> set[str]:
    return {i.name for i in g.input} | {t.name for t in g.initializer} | {v for n in g.node for v in n.output}


def _drop_dead(g: onnx.GraphProto, candidates: set[str], constants: set[str]) -> None:
    """Remove the initializers and constant-making nodes (Constant, an Identity or a folded node of constants)
    that only the replaced nodes read: no one reads them now.  Others, read or not, stay as they were."""
    while candidates:
        read = _reads(g)
        dead = {v for v in candidates if v not in read and v in constants}
        if not dead:
            return
        makers = {i for i, n in enumerate(g.node) if n.domain in DEFAULT_DOMAINS
                  and len(n.output) == 1 and n.output[0] in dead}
        candidates = {v for i in makers for v in g.node[i].input if v}
        if makers:
            kept_nodes = [n for i, n in enumerate(g.node) if i not in makers]
            del g.node[:]
            g.node.extend(kept_nodes)
        fed = {i.name for i in g.input}
        kept = [t for t in g.initializer if t.name not in dead or t.name in fed]
        if len(kept) != len(g.initializer):
            del g.initializer[:]
            g.initializer.extend(kept)


def write(fused: Fused, path: str, external: bool, source: OnnxGraph) -> None:
    """Write the model to `path` and, where `external`, its weights to `<path>.data` (the name the model gives
    them), one tensor at a time: each merged weight as the plan stored it (read once: a dropped one is computed
    again on each read), each other one from the input model or its data file.  Both files are fsynced."""
    g = fused.proto.graph
    if not external:
        for t in g.initializer:
            unit = fused.weights.get(t.name)
            if unit is not None:
                t.raw_data = _raw(unit.stored.weight).tobytes()
        _write_file(path, lambda f: f.write(fused.proto.SerializeToString()))
        return
    location = os.path.basename(path) + ".data"

    def fill(f: BinaryIO) -> None:
        offset = 0
        for t in g.initializer:
            unit = fused.weights.get(t.name)
            raw = _raw(unit.stored.weight) if unit is not None else raw_bytes(t, source.base_dir, source.path)
            if raw is None or len(raw) < EXTERNAL_THRESHOLD:
                if raw is not None and (unit is not None or t.data_location == TensorProto.EXTERNAL):
                    _inline(t, bytes(raw))
                continue
            pad = -offset % 64  # aligned, so a runtime may map it
            f.write(b"\0" * pad)
            offset += pad
            f.write(raw)
            t.ClearField("raw_data")
            del t.external_data[:]
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            offset += len(raw)

    _write_file(path + ".data", fill)
    _write_file(path, lambda f: f.write(fused.proto.SerializeToString()))


def _write_file(path: str, fill: Callable[[BinaryIO], object]) -> None:
    with open(path, "xb") as f:
        fill(f)
        f.flush()
        os.fsync(f.fileno())


def _inline(t: TensorProto, raw: bytes) -> None:
    del t.external_data[:]
    t.data_location = TensorProto.DEFAULT
    t.raw_data = raw
