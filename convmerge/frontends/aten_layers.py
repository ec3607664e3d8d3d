"""ATen nodes read as layers: the mapper from torch.export's graph to a graph description.

Each recognised call (a conv, a batch norm, an addition, a pad...) becomes the layer its op means, with
the tensors the description needs; every other node is opaque.  One class, because the nodes are read in
order against shared state (the values that are active, the constants, the views written through); it is
long for that reason, and every op's reader is one method.
"""

from __future__ import annotations

import itertools
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Optional

import torch
from torch import fx, nn
from torch.export.graph_signature import InputKind, OutputKind

from ..maths.spec import SpecError, conv_spec, padding_fields
from ..ops import affine
from ..ops.transpose import transpose_fields, transpose_spec
from . import argument_ops
from .leaf_op import LEAF
from .trace_layers import (CONV_TRANSPOSES, STRUCTURAL_MODULES, STRUCTURAL_OPS, Traced, avg_pool_fields, is_plain,
                           module_fields, opaque, pad_fields)

__all__ = ["SIZES", "Mapper", "bind"]

aten = torch.ops.aten
SIZES = (int, float, torch.SymInt, torch.SymBool, torch.SymFloat)
"""The values of shape arithmetic (a symbolic export's), which the description leaves out."""


_CONVS = {aten.convolution.default, aten._convolution.default, aten.conv1d.default, aten.conv2d.default,
          aten.conv3d.default, aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding}
_CONV_TRANSPOSES = {aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input}
_BATCH_NORM = aten._native_batch_norm_legit_no_training.default
_POOLS = {aten.avg_pool1d.default: 1, aten.avg_pool2d.default: 2, aten.avg_pool3d.default: 3}
_PADS = {aten.constant_pad_nd.default: "constant", aten.pad.default: "", aten._pad_circular.default: "circular",
         aten.reflection_pad1d.default: "reflect", aten.reflection_pad2d.default: "reflect",
         aten.reflection_pad3d.default: "reflect", aten.replication_pad1d.default: "replicate",
         aten.replication_pad2d.default: "replicate", aten.replication_pad3d.default: "replicate"}
_ARITHMETIC = {aten.mul.Tensor: "mul", aten.mul.Scalar: "mul", aten.div.Tensor: "div", aten.div.Scalar: "div",
               aten.add.Tensor: "add", aten.add.Scalar: "add", aten.sub.Tensor: "sub", aten.sub.Scalar: "sub",
               aten.rsub.Tensor: "rsub", aten.rsub.Scalar: "rsub"}
"""Element-wise ops that are affine in a layer value when the other operand is a constant (affine.arithmetic)."""
_ALIASES = {aten.clone.default, aten.alias.default, aten.detach.default, aten.contiguous.default}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
"""Views with fixed sizes: a flatten (argument_ops) where the output is the input with one run of axes collapsed."""
_WRITES = {aten.copy.default, aten.fill.Scalar, aten.fill.Tensor}
"""What ``out[...] = v`` becomes once functionalized: a copy of ``v`` (or a fill) of the slice's shape."""
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class _NoWeights(Exception):
    """A computed tensor needs values the module (on the meta device) does not have."""


@dataclass
class _Call:
    """One call of a module kept whole: its nodes, the one node whose value leaves it, its inputs."""

    key: str
    qualname: str
    nodes: list[fx.Node]
    output: Optional[fx.Node] = None
    inputs: list[fx.Node] = field(default_factory=list)
    constants: list[fx.Node] = field(default_factory=list)


@dataclass
class _Border:
    """A constant pad whose border is then overwritten: the writes, and the nodes they take."""

    last: fx.Node
    nodes: list[fx.Node]
    writes: list[tuple[int, Any, Any, int, fx.Node, tuple[int, ...]]]


class Mapper:
    """Walks the exported graph once, in order, and writes one layer per value the model computes."""

    def __init__(self, root: nn.Module, program: torch.export.ExportedProgram, sized: Collection[str] = ()) -> None:
        self.root = root
        self.sized = set(sized)  # transposed convs called with an output_size: opaque (their padding follows the size)
        self.program = program
        self.graph = program.graph
        self.modules = dict(root.named_modules())
        self.values = {**program.state_dict, **program.constants}
        self.state_keys = set(root.state_dict())
        signature = program.graph_signature
        by_name = {node.name: node for node in self.graph.nodes}
        self.keys = {by_name[s.arg.name]: s.target for s in signature.input_specs
                     if s.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)}
        self.inputs = [by_name[s.arg.name] for s in signature.input_specs if s.kind == InputKind.USER_INPUT]
        self.outputs = [by_name[s.arg.name] for s in signature.output_specs
                        if s.kind == OutputKind.USER_OUTPUT and getattr(s.arg, "name", None) in by_name]
        self.order = {node: i for i, node in enumerate(self.graph.nodes)}
        self.const = self._constants()
        self.leaf_calls = Counter(self._leaf_of(n)[0] for n in self.graph.nodes if n.target is LEAF)
        self.names: dict[fx.Node, str] = {node: node.name for node in self.inputs}
        self.reserved = set(self.modules) | set(self.names.values())
        self.used = set(self.names.values())
        self.layers: list[dict[str, Any]] = []
        self.tensors: dict[str, torch.Tensor] = {}
        self.missing: list[str] = []
        self.computed: list[str] = []
        self.skip: set[fx.Node] = set()
        self.single: set[fx.Node] = set()
        self.leaves_seen: set[str] = set()
        self.owners: dict[str, tuple[nn.Module, list[fx.Node]]] = {}
        self.memo: dict[bool, dict[fx.Node, Any]] = {False: {}, True: {}}

    def describe(self) -> Traced:
        calls = self._calls()
        for node in self.graph.nodes:
            if (node.op != "call_function" or node in self.const or node in self.skip
                    or isinstance(node.meta.get("val"), SIZES)):  # shape arithmetic of a symbolic export
                continue
            call = calls.get(node)
            if call is None:
                self._node(node)
            elif node is call.output:
                self._call(call)
        self._mark_shared()
        doc = {"version": 1, "inputs": [self.names[n] for n in self.inputs], "layers": self.layers,
               "outputs": [self._name(n) for n in self.outputs]}
        first = self.inputs[0].meta.get("val") if self.inputs else None
        if isinstance(first, torch.Tensor) and first.dim() >= 2:  # [] for an [N, C] input: the rank is recorded too
            doc["traced_input"] = list(first.shape[2:])
        notes = [f"layer {name!r} uses tensors computed from the module's parameters (returned beside the description)"
                 for name in self.computed]
        if self.missing:
            notes.append(f"{len(self.missing)} computed tensors ({', '.join(self.missing[:3])}"
                         f"{', ...' if len(self.missing) > 3 else ''}) need the weights, which a module on the meta "
                         "device does not have: build it on the CPU, load its weights and trace it again")
        nodes: dict[str, str] = {}
        for node in self.graph.nodes:  # the last node of a name holds its value (a BN's getitem, an alias)
            if node in self.names:
                nodes[self.names[node]] = node.name
        return Traced(doc, self.tensors, notes, self.missing, None, nodes)

    def _mark_shared(self) -> None:
        """A module whose tensors another layer also reads (a get_attr or constant layer computed
        from them) is opaque, as in fx: merging it away would change that other use.  Tensors read
        only to compute a kernel or pad value now in ``tensors`` are not read by any layer."""
        read: set[fx.Node] = set()
        stack = [n for n, name in self.names.items() if n in self.const]
        while stack:
            node = stack.pop()
            if node not in read:
                read.add(node)
                stack.extend(node.all_input_nodes)
        for name, (module, own) in self.owners.items():
            if read.intersection(own):
                layer = next(item for item in self.layers if item["name"] == name)
                wiring = {k: layer[k] for k in ("input", "inputs") if k in layer}
                layer.clear()
                layer.update({"name": name, "op": "shared_" + type(module).__name__.lower(), **wiring})

    # --- what each node is ---

    def _constants(self) -> set[fx.Node]:
        """Nodes computed from parameters, buffers and constants only (never from the input).  A buffer the
        forward writes (a counter, a running statistic) is no constant: its value changes from call to call."""
        written = set(self.program.graph_signature.buffers_to_mutate.values())
        for node in self.graph.nodes:
            target = node.target
            if isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable and node.args and \
                    node.args[0] in self.keys:
                written.add(self.keys[node.args[0]])
        const: set[fx.Node] = {n for n, key in self.keys.items() if key not in written}
        for node in self.graph.nodes:
            if node.op != "call_function" or node.target is LEAF:
                continue
            target = node.target
            seeded = isinstance(target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in target.tags
            if not seeded and all(n in const for n in node.all_input_nodes):
                const.add(node)
        return const

    def _active(self, value: Any) -> bool:
        return isinstance(value, fx.Node) and value not in self.const

    def _path(self, node: fx.Node) -> str:
        """The qualified name of the innermost module whose code computed ``node``."""
        stack = node.meta.get("nn_module_stack") or {}
        paths = [q for q, _ in stack.values() if q and q in self.modules]
        return paths[-1] if paths else ""

    def _calls(self) -> dict[fx.Node, _Call]:
        """The calls of modules kept whole (plain torch.nn modules), each mapped from its nodes; a
        call whose value leaves it in more than one place is left to the node-by-node reading."""
        calls: dict[str, _Call] = {}
        for node in self.graph.nodes:
            if node.op == "call_function" and node not in self.const and not isinstance(node.meta.get("val"), SIZES):
                found = self._whole_call(node)
                if found is not None:
                    calls.setdefault(found[0], _Call(found[0], found[1], [])).nodes.append(node)
        self.call_keys: dict[str, list[str]] = {}
        for call in calls.values():
            self.call_keys.setdefault(call.qualname, []).append(call.key)
        mapping: dict[fx.Node, _Call] = {}
        for call in calls.values():
            members = set(call.nodes)
            leaving = [n for n in call.nodes if any(u not in members for u in n.users)]
            inputs = list(dict.fromkeys(i for n in call.nodes for i in n.all_input_nodes
                                        if i not in members and not isinstance(i.meta.get("val"), SIZES)))
            if len(leaving) != 1 or any(self.order[i] > self.order[leaving[0]] for i in inputs):
                continue
            call.output = leaving[0]
            call.inputs = [i for i in inputs if i not in self.const]
            call.constants = [i for i in inputs if i in self.const]
            mapping.update((n, call) for n in call.nodes)
        return mapping

    def _whole_call(self, node: fx.Node) -> Optional[tuple[str, str]]:
        stack = node.meta.get("nn_module_stack") or {}
        for key, (qualname, _) in stack.items():
            module = self.modules.get(qualname)
            if qualname and module is not None and qualname not in self.leaf_calls and _kept_whole(module):
                return key, qualname
        return None

    # --- layers ---

    def _call(self, call: _Call) -> None:
        """A plain torch.nn module's call: one layer named by the module, as the fx tracer writes it."""
        module = self.modules[call.qualname]
        keys = self.call_keys[call.qualname]
        name = call.qualname if len(keys) == 1 else f"{call.qualname}@{keys.index(call.key)}"
        own = [n for n, key in self.keys.items() if key.startswith(call.qualname + ".")]
        shared = _has_tensors(module) and len(keys) > 1
        fields = {"op": "shared_" + type(module).__name__.lower()} if shared else module_fields(module)
        if fields["op"] in STRUCTURAL_OPS and not self._fits(fields, call.inputs):
            fields = {"op": opaque(type(module).__name__.lower())}
        inputs = call.inputs if fields["op"] in STRUCTURAL_OPS else call.inputs + [
            n for n in call.constants if n not in own]
        if name in self.used:
            name = self._fresh(call.output, type(module).__name__.lower())
        self._emit(call.output, name, fields, inputs)
        if fields["op"] in STRUCTURAL_OPS and own:
            self.owners[name] = (module, own)

    def _fits(self, fields: dict[str, Any], inputs: list[fx.Node]) -> bool:
        """A structural module reads one batched input with as many spatial axes as it has."""
        if len(inputs) != 1:
            return False
        rank = inputs[0].meta["val"].dim()
        if fields["op"] == "linear":
            return rank == 2  # nn.Linear on [N, *, C] maps the last axis: not a conv of channels
        axes = fields.get("kernel_size", fields.get("padding"))
        return rank >= 2 if axes is None else rank == len(axes) + 2

    def _node(self, node: fx.Node) -> None:
        target = node.target
        if target is operator.getitem and node.args[0] in self.single and node.args[1] == 0:
            self.names[node] = self.names[node.args[0]]
        elif (target in _ALIASES or (target is aten.dropout.default and not bind(node)["train"])
              or self._plus_zero(node)):
            self.names[node] = self._name(node.args[0])
        elif target is LEAF:
            self._leaf(node)
        elif not any(target in ops and handle(node) for ops, handle in (
                (_CONVS, self._conv), (_CONV_TRANSPOSES, self._conv_transpose), ({aten.linear.default}, self._linear),
                ({_BATCH_NORM, aten.batch_norm.default}, self._batch_norm), ({aten.add.Tensor}, self._add),
                ({aten.sub.Tensor}, self._sub), (_ARITHMETIC, self._affine),
                ({aten.cat.default}, self._cat), (_POOLS, self._pool), (_PADS, self._pad))):
            self._opaque(node)

    def _plus_zero(self, node: fx.Node) -> bool:
        """``x + 0`` keeping x's shape and dtype is x (MobileOne starts its sum of branches at the number 0)."""
        if node.target is not aten.add.Tensor:
            return False
        a = bind(node)
        x, other, out = a["self"], a["other"], node.meta["val"]
        return (self._active(x) and type(other) in (int, float) and other == 0
                and x.meta["val"].shape == out.shape and x.meta["val"].dtype == out.dtype)

    def _conv(self, node: fx.Node) -> bool:
        """A convolution of the input by a kernel that is a parameter or computed from parameters."""
        a = bind(node)
        x, weight, bias = a["input"], a["weight"], a["bias"]
        if a.get("transposed"):
            return self._conv_transpose(node)
        if any(a.get("output_padding") or []):
            return False
        if not self._active(x) or self._active(weight) or self._active(bias):
            return False
        shape = weight.meta["val"].shape
        nd, groups = len(shape) - 2, int(a["groups"])
        if nd not in (1, 2, 3) or x.meta["val"].dim() != nd + 2:
            return False
        padding = a["padding"] if isinstance(a["padding"], str) else _axes(a["padding"], nd)
        try:
            spec = conv_spec(tuple(shape[2:]), int(shape[1]) * groups, int(shape[0]), stride=_axes(a["stride"], nd),
                             padding=padding, dilation=_axes(a["dilation"], nd), groups=groups, bias=bias is not None)
        except SpecError:
            return False
        name = self._tensor_layer(node, f"conv{nd}d", {"weight": weight, "bias": bias})
        self._emit(node, name, {"op": f"conv{nd}d", **padding_fields(spec)}, [x])
        return True

    def _linear(self, node: fx.Node) -> bool:
        """``F.linear(x, w, b)`` of a [N, C] input by a weight that is a parameter or computed from parameters."""
        a = bind(node)
        x, weight, bias = a["input"], a["weight"], a["bias"]
        if not self._active(x) or self._active(weight) or self._active(bias):
            return False
        if x.meta["val"].dim() != 2 or weight.meta["val"].dim() != 2:
            return False
        name = self._tensor_layer(node, "linear", {"weight": weight, "bias": bias})
        self._emit(node, name, {"op": "linear"}, [x])
        return True

    def _conv_transpose(self, node: fx.Node) -> bool:
        """A transposed convolution (aten.conv_transpose*, or aten.convolution with transposed=True); one whose
        module was called with an `output_size` stays opaque (the output_padding it chose holds at this size)."""
        a = bind(node)
        x, weight, bias = a["input"], a["weight"], a["bias"]
        if not self._active(x) or self._active(weight) or self._active(bias) or self._path(node) in self.sized:
            return False
        shape = weight.meta["val"].shape
        nd, groups = len(shape) - 2, int(a["groups"])
        if nd not in (1, 2, 3) or x.meta["val"].dim() != nd + 2:
            return False
        try:
            spec = transpose_spec(tuple(int(k) for k in shape[2:]), int(shape[0]), int(shape[1]) * groups,
                                  stride=_axes(a["stride"], nd), padding=_axes(a["padding"], nd),
                                  output_padding=_axes(a["output_padding"], nd), dilation=_axes(a["dilation"], nd),
                                  groups=groups, bias=bias is not None)
        except (SpecError, TypeError):
            return False
        name = self._tensor_layer(node, f"conv_transpose{nd}d", {"weight": weight, "bias": bias})
        self._emit(node, name, {"op": f"conv_transpose{nd}d", **transpose_fields(spec)}, [x])
        return True

    def _batch_norm(self, node: fx.Node) -> bool:
        a = bind(node)
        x = a["input"]
        tensors = {k: a[k] for k in ("weight", "bias", "running_mean", "running_var")}
        if not self._active(x) or any(self._active(t) for t in tensors.values()) or x.meta["val"].dim() < 2:
            return False
        if (a["weight"] is None) != (a["bias"] is None) or a.get("training"):
            return False
        legit = node.target is _BATCH_NORM  # three outputs, of which only the first is read; batch_norm's is one
        if legit and any(u.target is not operator.getitem or u.args[1] != 0 for u in node.users):
            return False
        name = self._tensor_layer(node, "batch_norm", tensors)
        self._emit(node, name, {"op": "batch_norm", "eps": float(a["eps"]), "affine": a["weight"] is not None}, [x])
        if legit:
            self.single.add(node)
        return True

    def _add(self, node: fx.Node) -> bool:
        """``a + b`` of two layer values of one shape and dtype; ``x + 1``, ``alpha``, broadcasting are not."""
        return self._join(node, "add")

    def _sub(self, node: fx.Node) -> bool:
        """``a - b`` of two layer values of one shape and dtype (as ``_add``)."""
        return self._join(node, "sub")

    def _join(self, node: fx.Node, op: str) -> bool:
        a = bind(node)
        left, right, alpha = a["self"], a["other"], a["alpha"]
        if type(alpha) not in (int, float) or alpha != 1 or not (self._active(left) and self._active(right)):
            return False
        out, l, r = node.meta["val"], left.meta["val"], right.meta["val"]
        if not (l.shape == r.shape == out.shape and l.dtype == r.dtype == out.dtype):
            return False
        self._emit(node, self._fresh(node, op), {"op": op}, [left, right])
        return True

    def _affine(self, node: fx.Node) -> bool:
        """``x * c``, ``x / c``, ``x + c``, ``x - c``, ``c - x`` (either order where it commutes) of a layer value
        x and a constant c (a number, or a tensor from parameters, buffers and constants) holding one number per
        channel of x or one for all (LayerScale's ``x * gamma``), keeping x's shape and dtype: an affine layer,
        its weight and bias (affine.arithmetic) stored beside the description."""
        a = bind(node)
        op = _ARITHMETIC[node.target]
        left, right, alpha = a["self"], a["other"], a.get("alpha", 1)
        if op == "rsub":  # rsub(p, q) = q - alpha * p
            op, left, right = "sub", right, left
        if type(alpha) not in (int, float) or a.get("rounding_mode") is not None:
            return False
        x, c = (left, right) if self._active(left) else (right, left)
        if not self._active(x) or self._active(c):
            return False
        value, out = x.meta["val"], node.meta["val"]
        if not (isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape == out.shape
                and value.dtype == out.dtype and value.dtype.is_floating_point):
            return False
        if isinstance(c, fx.Node):
            shape = c.meta["val"].shape if isinstance(c.meta.get("val"), torch.Tensor) else None
            if shape is None or c.meta["val"].dtype.is_complex or not affine.per_channel(value.shape, shape):
                return False
        elif type(c) not in (int, float):
            return False
        try:
            constant = torch.as_tensor(self._value(c, stand_in=False), dtype=torch.float64)
        except _NoWeights:
            constant = torch.ones(c.meta["val"].shape, dtype=torch.float64)
            missing = True
        else:
            missing = False
        terms = affine.arithmetic(op, constant, alpha, constant_first=c is left)
        if terms is None:
            return False
        name = self._fresh(node, op)
        for suffix, term in zip(affine.TENSORS, terms):
            if term is not None:
                t = affine.channel_values(torch.as_tensor(term, dtype=torch.float64)).to(value.dtype)
                self._store(f"{name}.{suffix}", _NoWeights if missing else t)
        self._emit(node, name, {"op": "affine"}, [x])
        return True

    def _cat(self, node: fx.Node) -> bool:
        a = bind(node)
        parts = a["tensors"]
        if not parts or not all(self._active(p) for p in parts):
            return False
        vals, out = [p.meta["val"] for p in parts], node.meta["val"]
        rank = out.dim()
        if rank == 0 or any(v.dim() != rank or v.dtype != out.dtype for v in vals):
            return False
        self._emit(node, self._fresh(node, "concat"), {"op": "concat", "dim": int(a["dim"]) % rank}, parts)
        return True

    def _pool(self, node: fx.Node) -> bool:
        nd = _POOLS[node.target]
        a = bind(node)
        x = a["self"]
        if not self._active(x) or x.meta["val"].dim() != nd + 2:
            return False
        fields = avg_pool_fields(nd, a["kernel_size"], a["stride"], a["padding"], a["ceil_mode"],
                                 a["count_include_pad"], a.get("divisor_override"))
        self._emit(node, self._fresh(node, fields["op"]), fields, [x])
        return True

    def _pad(self, node: fx.Node) -> bool:
        """A pad; a constant one whose border is then overwritten with one per-channel value (DBB's
        BN-and-pad) is one pad layer with that value as the tensor ``<name>.value``."""
        a = bind(node)
        x = a["self"]
        mode = _PADS[node.target] or a["mode"]
        if not self._active(x) or x.meta["val"].dim() < 3:
            return False
        if any(isinstance(p, fx.Node) for p in a.get("pad", a.get("padding")) or ()):
            return False  # padded by an amount that depends on the size (to a multiple of a window): opaque
        fields = pad_fields(a.get("pad", a.get("padding")), x.meta["val"].dim() - 2, mode, a.get("value"))
        if fields is None:
            return False
        border = self._border(node, fields["padding"]) if mode == "constant" else None
        value = self._border_value(border) if border is not None else None
        name = self._fresh(node, "pad")
        if value is not None:
            del fields["value"]
            self._store(f"{name}.value", value)
            self.skip.update(border.nodes)
            self.names[border.last] = name
        self._emit(node, name, fields, [x])
        return True

    def _border(self, pad: fx.Node, pairs: list[list[int]]) -> Optional[_Border]:
        """The slice writes that follow ``pad`` in a line (each value read only by the next write),
        when together they overwrite exactly its padded border, with constants."""
        current, nodes, writes = pad, [], []
        while True:
            scatters = [u for u in current.users if u.target is aten.slice_scatter.default and u.args[0] is current]
            if len(scatters) != 1:
                break
            scatter = scatters[0]
            s = bind(scatter)
            src, others = s["src"], [u for u in current.users if u is not scatter]
            if src.target in _WRITES:
                view = src.args[0]
                if (others != [view] or view.target is not aten.slice.Tensor or len(view.users) != 1
                        or len(src.users) != 1):
                    break
                value, taken = src.args[1], [view, src]
            else:
                value, taken = src, []
                if others:
                    break
            if self._active(value):
                break
            writes.append((s["dim"], s["start"], s["end"], s["step"], value, tuple(src.meta["val"].shape)))
            nodes += taken + [scatter]
            current = scatter
        shape = tuple(pad.meta["val"].shape)
        if not writes or not _covers_border(writes, shape, pairs):
            return None
        return _Border(current, nodes, writes)

    def _border_value(self, border: _Border) -> Optional[Any]:
        """The per-channel value the writes put in the border (a tensor [C]); ``_NoWeights`` when the
        module has no weights and the writes are per-channel for made-up ones; None otherwise."""
        dtype = border.last.meta["val"].dtype
        try:
            return _per_channel(border, lambda n: self._value(n, stand_in=False), dtype)
        except _NoWeights:
            pass
        try:
            checked = _per_channel(border, lambda n: self._value(n, stand_in=True), dtype)
        except Exception:
            return None
        return None if checked is None else _NoWeights

    def _leaf(self, node: fx.Node) -> None:
        qualname, index = self._leaf_of(node)
        self.leaves_seen.add(qualname)
        module = self.modules[qualname]
        name = qualname if self.leaf_calls[qualname] == 1 else f"{qualname}@{index}"
        if name in self.used:
            name = self._fresh(node, type(module).__name__.lower())
        if len(node.meta["val"]) == 1:
            self.single.add(node)
        self._emit(node, name, {"op": opaque(type(module).__name__.lower())}, list(node.args[0]))

    def _leaf_of(self, node: fx.Node) -> tuple[str, int]:
        qualname, _, index = str(node.args[1]).split("/", 1)[1].rpartition("#")
        return qualname, int(index)

    def _opaque(self, node: fx.Node) -> None:
        target = node.target
        base = target._opname if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", "op")
        inputs: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), inputs.append)
        inputs = [n for n in inputs if not isinstance(n.meta.get("val"), SIZES)]  # a symbolic size is no layer
        known = self._arguments(node, base) if len(inputs) == 1 and self._active(node.args[0]) else None
        if known is not None:
            base, fields = known
            self._emit(node, self._fresh(node, base), {"op": base, **fields}, inputs)
        else:
            self._emit(node, self._fresh(node, base), {"op": opaque(base)}, inputs)

    def _arguments(self, node: fx.Node, base: str) -> Optional[tuple[str, dict[str, Any]]]:
        """The op and fields of an argument-carrying op (argument_ops), or None.  A view with fixed sizes
        is a flatten where its output is its input with one run of axes collapsed (torch.flatten(x, 1)
        becomes one); an adaptive pooling only where no output size equals its input's on that axis (a
        None output size, which keeps the input's size, is traced as that size)."""
        before, after = node.args[0].meta.get("val"), node.meta.get("val")
        if not (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)):
            return None
        if node.target in _VIEWS:
            dims = argument_ops.flatten_dims(before.shape, after.shape)
            return None if dims is None else ("flatten", argument_ops.fields("flatten", dims, {}) or {})
        if base not in argument_ops.ARGUMENT_OPS:
            return None
        found = argument_ops.fields(base, node.args[1:], node.kwargs)
        if found is None or (base.startswith("adaptive_") and any(
                n == m for n, m in zip(found["output_size"], before.shape[-len(found["output_size"]):]))):
            return None
        return base, found

    # --- names, tensors, emitting ---

    def _tensor_layer(self, node: fx.Node, base: str, tensors: dict[str, Optional[fx.Node]]) -> str:
        """A name for a conv or batch norm whose tensors are ``tensors`` (by suffix): the state-dict
        prefix when it uses its parameters as they are, else its module's name, else ``.computed``;
        never one under which the state dict holds other tensors.  Computed tensors are stored."""
        path = self._path(node)
        keys = {suffix: self._exclusive_key(tensor) for suffix, tensor in tensors.items()}
        prefixes = [key[: -len(suffix) - 1] for suffix, key in keys.items() if key and key.endswith("." + suffix)]
        owned = prefixes[:1] + ([path] if path else [])
        stem = f"{path}.computed" if path else base
        for name in itertools.chain(owned, [stem], (f"{stem}_{k}" for k in itertools.count(1))):
            if name in self.used or (name not in owned and name in self.reserved):
                continue
            needed = {}
            for suffix, tensor in tensors.items():
                key = f"{name}.{suffix}"
                if tensor is not None and self._exclusive_key(tensor) == key:
                    continue
                if key in self.state_keys:
                    break
                if tensor is not None:
                    needed[key] = tensor
            else:
                for key, tensor in needed.items():
                    self._store(key, self._try_value(tensor))
                if needed:
                    self.computed.append(name)
                return name
        raise AssertionError("unreachable: the names are endless")

    def _exclusive_key(self, node: Optional[fx.Node]) -> Optional[str]:
        """The state-dict key of a parameter or buffer used only here, so a merge may drop it."""
        key = self.keys.get(node) if node is not None else None
        return key if key in self.state_keys and len(node.users) == 1 else None

    def _try_value(self, node: fx.Node) -> Any:
        try:
            return self._value(node, stand_in=False)
        except _NoWeights:
            return _NoWeights

    def _store(self, key: str, value: Any) -> None:
        if value is _NoWeights or value.device.type == "meta":
            self.missing.append(key)
        else:
            self.tensors[key] = value.detach().to("cpu").clone().contiguous()

    def _value(self, node: Any, stand_in: bool) -> Any:
        """A constant node's value from the module's tensors (or, ``stand_in``, from made-up ones of
        the same shapes: enough to check a structure on the meta device)."""
        if not isinstance(node, fx.Node):
            return node
        memo = self.memo[stand_in]
        if node not in memo:
            if node in self.keys:
                tensor = self.values[self.keys[node]]
                if stand_in:
                    generator = torch.Generator().manual_seed(len(memo))
                    tensor = (torch.rand(tensor.shape, generator=generator) + 0.5).to(tensor.dtype)
                elif tensor.device.type == "meta":
                    raise _NoWeights()
                memo[node] = tensor
            else:
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: self._value(n, stand_in))
                with torch.no_grad():
                    memo[node] = node.target(*args, **kwargs)
        return memo[node]

    def _name(self, node: fx.Node) -> str:
        if node not in self.names and node in self.const:
            self._constant_layer(node)
        return self.names[node]

    def _constant_layer(self, node: fx.Node) -> None:
        """A value computed without the input, read by an opaque layer: a layer with no inputs."""
        key = self.keys.get(node)
        if key is not None:
            name = self._fresh(node, key.replace(".", "_"), prefixed=False)
            self._emit(node, name, {"op": "get_attr"}, [])
        else:
            self._emit(node, self._fresh(node, "constant"), {"op": "constant"}, [])

    def _fresh(self, node: fx.Node, base: str, prefixed: bool = True) -> str:
        """``<module>.<base>`` (``_k`` added until it is unused and no module's name)."""
        path = self._path(node) if prefixed else ""
        stem = f"{path}.{base}" if path else base
        name, k = stem, 1
        while name in self.used or name in self.reserved:
            name, k = f"{stem}_{k}", k + 1
        self.used.add(name)
        return name

    def _emit(self, node: fx.Node, name: str, fields: dict[str, Any], inputs: list[fx.Node]) -> None:
        self.used.add(name)
        producers = [self._name(n) for n in inputs]
        wiring = {"input": producers[0]} if len(producers) == 1 else {"inputs": producers}
        fields = dict(fields)
        val = node.meta.get("val")
        if fields["op"] not in STRUCTURAL_OPS and isinstance(val, torch.Tensor) and val.dim() >= 3 and all(
                isinstance(n, int) for n in val.shape):
            fields["traced_size"] = list(val.shape[2:])  # what the description cannot derive (an upsampling...)
        self.layers.append({"name": name, "op": fields.pop("op"), **wiring, **fields})
        self.names[node] = name


def _kept_whole(module: nn.Module) -> bool:
    """A module described as one layer: a plain structural module, or any other torch.nn module
    (an opaque op, as fx keeps it) unless hooks or parametrizations change what it computes."""
    if isinstance(module, CONV_TRANSPOSES):
        return False  # read from its ATen call, which carries the output_padding an `output_size` argument gives
    if is_plain(module, STRUCTURAL_MODULES):
        return True
    cls = type(module)
    return (cls.__module__.startswith(("torch.nn.", "torch.ao.nn.")) and not isinstance(module, _CONTAINERS)
            and not module._forward_hooks and not module._forward_pre_hooks
            and not torch.nn.utils.parametrize.is_parametrized(module))


def _has_tensors(module: nn.Module) -> bool:
    return any(True for _ in itertools.chain(module.parameters(), module.buffers()))


def bind(node: fx.Node) -> dict[str, Any]:
    """A call's arguments by name, defaults filled in, read by the op's schema."""
    bound: dict[str, Any] = {}
    positional = list(node.args)
    for argument in node.target._schema.arguments:
        if positional and not argument.kwarg_only:
            bound[argument.name] = positional.pop(0)
        elif argument.name in node.kwargs:
            bound[argument.name] = node.kwargs[argument.name]
        else:
            bound[argument.name] = argument.default_value if argument.has_default_value() else None
    return bound


def _axes(value: Any, nd: int) -> list[int]:
    values = [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    return values * nd if len(values) == 1 else values


def _covers_border(writes: list, shape: tuple[int, ...], pairs: list[list[int]]) -> bool:
    """Whether slabs written along spatial axes cover exactly the padded border: every border
    position of each axis, and no interior one (a slab spans every other axis entirely)."""
    rank = len(shape)
    border = {2 + k: set(range(lo)) | set(range(shape[2 + k] - hi, shape[2 + k])) for k, (lo, hi) in enumerate(pairs)}
    written: dict[int, set[int]] = {axis: set() for axis in border}
    for dim, start, end, step, _, _ in writes:
        axis = dim % rank
        if axis not in border or step != 1:
            return False
        span = set(range(shape[axis]))
        covered = set(range(*slice(start, end).indices(shape[axis])))
        if not covered <= border[axis] or not covered <= span:
            return False
        written[axis] |= covered
    return written == border


def _per_channel(border: _Border, value: Callable[[fx.Node], Any], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The one vector [C] every write puts in the border (broadcast over all other axes), or None."""
    vectors = []
    for *_, node, shape in border.writes:
        written = torch.broadcast_to(torch.as_tensor(value(node)), shape).to(dtype)
        vector = written[(0, slice(None)) + (0,) * (len(shape) - 2)]
        if not torch.equal(written, vector.view(1, -1, *[1] * (len(shape) - 2)).expand(shape)):
            return None
        vectors.append(vector)
    if any(not torch.equal(vectors[0], v) for v in vectors[1:]):
        return None
    return vectors[0]
