"""The fallback tracer: torch.fx, symbolic, no example input needed.

fx sees Python calls, not tensors: it keeps modules whole and records function calls, but knows
no shapes, so an addition (which may broadcast) and ``F.pad`` (whose axes depend on the input's
rank) stay opaque here.  A submodule fx cannot trace (data-dependent control flow, iterating a
Proxy, item assignment) becomes an opaque leaf instead of failing the whole model.
"""

from __future__ import annotations

import operator
import types
from collections import Counter
from typing import Any, Optional, Sequence

import torch
from torch import fx, nn
from torch.fx.operator_schemas import normalize_function

from . import argument_ops, fx_values
from .. import ops
from ..maths.spec import SpecError
from .trace_layers import (CONV_TRANSPOSES, STRUCTURAL_MODULES, STRUCTURAL_OPS, TraceError, Traced, avg_pool_fields, first_line, is_leaf_class, is_plain,
                           module_fields, opaque, smallest)

__all__ = ["describe", "mutates"]

_CATS = {torch.cat, torch.concat, torch.concatenate}
_PASSES = ops.of(ops.Kind.PASS)
_AVG_POOLS = {torch.nn.functional.avg_pool1d: 1, torch.nn.functional.avg_pool2d: 2, torch.nn.functional.avg_pool3d: 3}
_ADDS = {operator.add, operator.iadd, torch.add}


def describe(module: nn.Module, leaves: Sequence[type | str] = (),
             example: Optional[Sequence[torch.Tensor]] = None) -> Traced:
    """The description of ``module`` traced by fx; raises TraceError when its own forward cannot be
    traced (a failing submodule becomes an opaque leaf and a note).

    With ``example`` inputs the traced graph is run once on them, in inference mode (`fx_values`): additions,
    functional batch norms and per-channel arithmetic are then structural where their shapes say so, the
    description records the traced size (`Traced.example`, `Traced.smallest`), and `Traced.blind_spots` says what
    this trace left opaque that torch.export may see into.  A graph that does not run on them raises TraceError."""
    module.eval()  # the inference form, which the description means (the module is the caller's copy), before the
    tracer = _Tracer(leaves)  # trace: a forward reads ``self.training`` as it is traced (a branch, F.dropout's flag)
    try:
        graph = tracer.trace(module)
    except Exception as exc:
        raise TraceError(f"torch.fx: {first_line(exc)}") from exc
    for node in graph.nodes:
        node.type = None  # annotations (``x: "torch.Tensor"``) a fused module's code would have to import to unpickle
    if example is not None:
        _drop_shape_asserts(graph)
    names, shared = layer_names(graph), _shared_targets(graph, module)
    active = _active(graph)
    values = None
    if example is not None:
        writes = [n for n in graph.nodes if mutates(n, module) and n.args and n.args[0] not in active]
        if writes:  # a run would change the module; torch.export's functional graph follows such writes
            raise TraceError(f"torch.fx: {names[writes[0]]} writes a parameter or buffer in place")
        values = fx_values.run(module, graph, example, active, calls=set(tracer.opaque))
    mutated = _seen_mutated(graph, module)
    layers, tensors, not_export_either = [], {}, set()
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        try:
            layer = describe_node(node, module, names, shared, active, tracer.forced, values, tensors)
        except SpecError as exc:
            raise TraceError(f"layer {names[node]}: {exc}") from exc
        if node in mutated and layer["op"] in STRUCTURAL_OPS:
            layer["op"] = opaque(layer["op"])
        elif values is not None and layer["op"] == opaque("linear") and _rank(node.args[:1], values) not in (None, 2):
            not_export_either.add(layer["name"])  # torch.export's mapper reads a linear of an [N, C] value only
        elif values is not None and layer["op"] in _PASSES and "input" in layer:
            names[node] = layer["input"]  # an alias, as torch.export's mapper makes it: its readers read its input
            continue
        if values is not None and layer["op"] not in STRUCTURAL_OPS and len(values.meta.get(node, ((),))[0]) >= 3:
            layer["traced_size"] = list(values.meta[node][0][2:])  # what the description cannot derive (a max pool)
        layers.append(layer)
    output = next(node for node in graph.nodes if node.op == "output")
    outputs = _input_names(output, names)
    doc = {
        "version": 1,
        "inputs": [names[node] for node in graph.nodes if node.op == "placeholder"],
        "layers": layers,
        "outputs": outputs,
    }
    notes = [f"module {q!r} ({type(module.get_submodule(q)).__name__}) is opaque: {why}"
             for q, why in tracer.opaque.items()]
    notes += [f"module {q!r} ({type(module.get_submodule(q)).__name__}) is opaque: marked as a leaf"
              for q in tracer.forced]
    if mutated:
        notes.append(f"{len(mutated)} layer(s) ({', '.join([names[n] for n in graph.nodes if n in mutated][:3])}) write or read a "
                     "value that is changed in place where another layer can see it: opaque, since torch.fx "
                     "does not follow what the change does to aliases")
    if values is None and any(layer["op"] == "opaque_add" for layer in layers):
        notes.append("torch.fx sees no shapes, so additions (which may broadcast) are opaque")
    nodes: dict[str, str] = {}
    for node in graph.nodes:  # an alias's name is its input's, whose node holds the value
        if node in names:
            nodes.setdefault(names[node], node.name)
    traced = Traced(doc, tensors=tensors, notes=notes, nodes=nodes, tracer="torch.fx",
                    graph_module=lambda dynamic=True: (fx.GraphModule(module, graph), {n.name: n.name for n in graph.nodes}))
    if values is not None:
        traced.example = tuple(example)
        rank = example[0].dim()
        if rank >= 2:
            doc["traced_input"] = list(example[0].shape[2:])
        traced.smallest = smallest([shape for shape, _ in values.meta.values()], rank)
        calls = Counter(str(node.target) for node in graph.nodes if node.op == "call_module")
        hooked = module._forward_hooks or module._forward_pre_hooks  # fx traces the root's forward alone
        traced.untraced = {q: values.calls.get(q) for q in tracer.opaque}
        traced.blind_spots = (["the module's own forward hooks"] if hooked else []) + [
            f"module {t!r} has its tensors read beside its call" for t in sorted(shared) if calls[t] == 1] + [
            f"{names[n]} is changed in place" for n in graph.nodes if n in mutated][:1] + [
            f"layer {names[n]} calls {n.target.__module__}.{n.target.__name__}, which fx keeps whole" for n in graph.nodes
            if _kept_whole(n) and n not in values.passed and n in active] + [
            f"layer {layer['name']} ({layer['op']})" for layer in layers
            if not layer.get("_constant") and _export_may_read(layer["op"]) and layer["name"] not in not_export_either]
        doc["layers"] = _read(layers, outputs)
    return traced


_SHAPE_ATTRIBUTES = {"ndim", "shape", "dtype", "device", "is_cuda"}
_SHAPE_METHODS = {"dim", "size", "ndimension"}
_SHAPE_ARITHMETIC = {operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.mod,
                     operator.floordiv, operator.add, operator.sub, operator.mul, operator.getitem, operator.and_,
                     operator.or_, operator.not_, operator.truth, len}


def _drop_shape_asserts(graph: fx.Graph) -> None:
    """Remove ``torch._assert`` calls on shapes (timm's ``_assert(x.ndim == 4, ...)`` in every batch norm) and the
    unused shape reads left by them (their messages' ``x.ndim``): read as layers, they would keep every value whose
    shape they check from merging.  The module then runs on inputs the original refuses with an AssertionError,
    which its rank check mostly still refuses; it computes the same wherever the original runs."""
    shape_only: set[fx.Node] = set()
    for node in graph.nodes:
        inputs = node.all_input_nodes
        if ((node.op == "call_function" and node.target is getattr and len(node.args) == 2
             and node.args[1] in _SHAPE_ATTRIBUTES)
                or (node.op == "call_method" and node.target in _SHAPE_METHODS)
                or (node.op == "call_function" and node.target in _SHAPE_ARITHMETIC and inputs
                    and all(n in shape_only for n in inputs))):
            shape_only.add(node)
    for node in reversed(list(graph.nodes)):
        cond = node.args[0] if node.op == "call_function" and node.target is torch._assert and node.args else None
        if (isinstance(cond, fx.Node) and cond in shape_only) or (node in shape_only and not node.users):
            graph.erase_node(node)


_MAY_BE_STRUCTURAL = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
                      "linear", "batch_norm", "cat", "concat", "concatenate", "avg_pool1d", "avg_pool2d", "avg_pool3d",
                      "pad", "dropout", "clone", "contiguous", "detach", "alias", "setitem", "rsub"}
"""The ops torch.export's mapper may make structural (or see through) where fx, even with shapes, leaves them
opaque.  Not arithmetic: with shapes, `fx_values` reads ``+ - * /`` under the mapper's own conditions."""


def _rank(args: Sequence[Any], values: fx_values.Values) -> Optional[int]:
    """The rank of the first argument's tensor at the example, None where it is no tensor."""
    meta = values.meta.get(args[0]) if args and isinstance(args[0], fx.Node) else None
    return len(meta[0]) if meta is not None else None


def _kept_whole(node: fx.Node) -> bool:
    """A call of a Python function from outside torch that fx records without tracing into it (``torch.fx.wrap``,
    timm's ``register_notrace_function``: ``pad_same``): torch.export sees the ops inside."""
    module = getattr(node.target, "__module__", None) or ""
    return (node.op == "call_function" and isinstance(node.target, types.FunctionType)
            and module != "torch" and not module.startswith("torch."))


def _export_may_read(op: str) -> bool:
    base = op[len("opaque_"):] if op.startswith("opaque_") else op
    return op not in STRUCTURAL_OPS and (base in _MAY_BE_STRUCTURAL or (base.endswith("_") and not base.startswith("_")))


def _read(layers: list[dict[str, Any]], outputs: list[str]) -> list[dict[str, Any]]:
    """The layers without those computed from parameters alone that no layer reads any more (a LayerScale's
    ``gamma.view(1, -1, 1, 1)``, once its product is an affine layer holding its values)."""
    read, kept = set(outputs), []
    for layer in reversed(layers):
        if layer.pop("_constant", False) and layer["name"] not in read:
            continue
        read.update(layer.get("inputs", [layer["input"]] if "input" in layer else []))
        kept.append(layer)
    return kept[::-1]


def layer_names(graph: fx.Graph) -> dict[fx.Node, str]:
    """A unique layer name per node: the module's qualified name for ``call_module`` (so a conv's
    tensors are ``NAME.weight``), ``NAME@k`` for the k-th call of a module called several times,
    and fx's node name for the rest (suffixed in the rare case it equals a module's name).
    """
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    seen: Counter[str] = Counter()
    names: dict[fx.Node, str] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            target = str(node.target)
            names[node] = target if calls[target] == 1 else f"{target}@{seen[target]}"
            seen[target] += 1
    others = [node for node in graph.nodes if node not in names]
    fx_names = {node.name for node in others}
    used = set(names.values())
    for node in others:
        base = str(node.target) if node.op == "placeholder" else node.name  # the forward's own argument name
        candidate, k = base, 1
        while candidate in used or (candidate != node.name and candidate in fx_names):
            candidate, k = f"{base}_{k}", k + 1
        names[node] = candidate
        used.add(candidate)
    return names


def describe_node(node: fx.Node, root: nn.Module, names: dict[fx.Node, str], shared: set[str],
                  active: set[fx.Node], leaves: set[str] = frozenset(), values: Optional[fx_values.Values] = None,
                  tensors: Optional[dict[str, torch.Tensor]] = None) -> dict[str, Any]:
    """One layer of the description; ``shared`` holds the modules whose tensors are used elsewhere
    too, ``active`` the nodes that depend on the graph's inputs, ``leaves`` the modules marked so; ``values``
    (a run at the example) makes more layers structural (`fx_values`), their tensors going into ``tensors``, and
    marks the layers computed from parameters alone (``_constant``)."""
    fields: dict[str, Any]
    found = fx_values.read(node, names[node], active, values) if values is not None else None
    if found is not None:
        fields, inputs, computed = found
        (tensors if tensors is not None else {}).update(computed)
        wiring = {"input": names[inputs[0]]} if len(inputs) == 1 else {"inputs": [names[n] for n in inputs]}
        return {"name": names[node], "op": fields.pop("op"), **wiring, **fields}
    if node.op == "call_module":
        module = root.get_submodule(str(node.target))
        if node.target in leaves:
            fields = {"op": opaque(type(module).__name__.lower())}
        elif node.target in shared:
            fields = {"op": "shared_" + type(module).__name__.lower()}
        elif isinstance(module, CONV_TRANSPOSES) and (len(node.args) > 1 or node.kwargs):
            fields = {"op": opaque(type(module).__name__.lower())}  # an output_size argument sets its output_padding
        else:
            fields = module_fields(module)
            two_d = _two_d(node.args[0], root) if values is None else _rank(node.args[:1], values) == 2
            if fields["op"] == "linear" and not two_d:
                fields = {"op": opaque("linear")}
    elif node.op == "get_attr":
        fields = {"op": "get_attr"}
    elif node.op == "call_method":
        fields = {"op": opaque("add" if node.target in ("add", "add_") else str(node.target))}
        fields.update(_argument_fields(fields["op"], node, active))
    else:
        fields = _function_fields(node, active)
        if fields["op"] == "concat" and values is not None and node in values.meta:
            fields["dim"] %= len(values.meta[node][0])  # ``torch.cat(xs, -3)``: the axis counted from the first
    producers = _input_names(node, names)
    wiring = {"input": producers[0]} if len(producers) == 1 else {"inputs": producers}
    if values is not None and node not in active:
        fields["_constant"] = True
    return {"name": names[node], "op": fields.pop("op"), **wiring, **fields}


def _two_d(node: Any, root: nn.Module) -> bool:
    """Whether fx, which sees no shapes, can still tell a value is [N, C]: a flatten from axis 1 to the last, or
    a linear, batch norm, dropout or identity module reading such a value (what an nn.Linear is structural on)."""
    while isinstance(node, fx.Node):
        if node.op == "call_module":
            fields = module_fields(root.get_submodule(str(node.target)))
            if fields["op"] == "flatten":
                return fields["start_dim"] == 1 and fields["end_dim"] == -1
            if fields["op"] not in ("linear", "batch_norm", "dropout", "identity") or len(node.args) != 1:
                return False
            node = node.args[0]
            continue
        bound = None
        if node.op == "call_function" and node.target is torch.flatten:
            bound = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
        kw = bound.kwargs if bound is not None else {}
        if node.op == "call_method" and node.target == "flatten":
            kw = {"start_dim": node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0),
                  "end_dim": node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)}
        return kw.get("start_dim") == 1 and kw.get("end_dim", -1) == -1
    return False


def _function_fields(node: fx.Node, active: set[fx.Node]) -> dict[str, Any]:
    """A function call: ``torch.cat`` of layer values and ``F.avg_pool*d`` are structural (their
    arguments read by the function's signature); everything else is opaque."""
    target = node.target
    name = getattr(target, "__name__", type(target).__name__)
    if target in _ADDS:
        return {"op": opaque("add")}
    if target in _CATS or target in _AVG_POOLS:
        bound = normalize_function(target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
        if bound is not None:
            kw = bound.kwargs
            if target in _CATS and _all_active(kw["tensors"], active) and isinstance(kw["dim"], int):
                return {"op": "concat", "dim": kw["dim"]}
            if target in _AVG_POOLS and node.args and node.args[0] in active and _constant(kw, "input"):
                return avg_pool_fields(_AVG_POOLS[target], kw["kernel_size"], kw["stride"], kw["padding"],
                                       kw["ceil_mode"], kw["count_include_pad"], kw.get("divisor_override"))
        return {"op": opaque("cat" if target in _CATS else name)}
    return {"op": opaque(name), **_argument_fields(name, node, active)}


def _argument_fields(op: str, node: fx.Node, active: set[fx.Node]) -> dict[str, Any]:
    """The fields of an argument-carrying op (argument_ops: ``torch.flatten(x, 1)``, ``x.mean((2, 3))``...)
    of a layer value, as the call gives them; none where an argument is computed in the graph."""
    if op not in argument_ops.ARGUMENT_OPS or not node.args or node.args[0] not in active:
        return {}
    kwargs = {k: v for k, v in node.kwargs.items() if k not in ("input", "self")}
    found = argument_ops.fields(op, node.args[1:], kwargs) if len(kwargs) == len(node.kwargs) else None
    return found or {}


_IN_PLACE_OPERATORS = {"__iadd__": operator.iadd, "__isub__": operator.isub, "__imul__": operator.imul,
                       "__itruediv__": operator.itruediv, "__ifloordiv__": operator.ifloordiv,
                       "__imod__": operator.imod, "__ipow__": operator.ipow, "__imatmul__": operator.imatmul,
                       "__iand__": operator.iand, "__ior__": operator.ior, "__ixor__": operator.ixor}


class _Proxy(fx.Proxy):
    """A proxy that records ``a += b`` as the in-place operator it is (fx's own records ``a = a + b``,
    which leaves other names of ``a``'s tensor unchanged: the traced module then computes something else)."""


def _in_place(op: Any) -> Any:
    def method(self: fx.Proxy, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", op, (self, other), {})
    return method


for _name, _op in _IN_PLACE_OPERATORS.items():
    setattr(_Proxy, _name, _in_place(_op))
_Proxy.__name__ = _Proxy.__qualname__ = "Proxy"  # what fx's errors name ("'Proxy' object does not support ...")


def _seen_mutated(graph: fx.Graph, root: nn.Module) -> set[fx.Node]:
    """The nodes around an in-place change that another layer can see: the changed value, whatever may share
    its memory (reached through ops that may return a view or their input itself), and the layers that read
    any of them.  A change nothing else reads (``relu(inplace=True)`` after a batch norm, ``out += x`` then a
    relu in a ResNet block) is seen by no one."""
    seen: set[fx.Node] = set()
    for node in graph.nodes:
        target = node.args[0] if mutates(node, root) and node.args else None
        if not isinstance(target, fx.Node):
            continue
        group, stack = set(), [target]
        while stack:
            value = stack.pop()
            if value in group:
                continue
            group.add(value)
            if mutates(value, root):
                stack.extend(a for a in value.args[:1] if isinstance(a, fx.Node))
            elif not _fresh(value, root):
                stack.extend(value.all_input_nodes)
            stack.extend(u for u in value.users if u is not node and (mutates(u, root) or not _fresh(u, root)))
        readers = {u for v in group for u in v.users} - group - {node}
        if readers:
            seen |= group | readers
    return seen


def mutates(node: fx.Node, root: nn.Module) -> bool:
    """Whether ``node`` changes its first argument in place (``y += x``, ``x.add_(y)``, ``ReLU(inplace=True)``)."""
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return (node.target in _IN_PLACE_OPERATORS.values() or node.target is operator.setitem
                or node.kwargs.get("inplace") is True or (name.endswith("_") and not name.startswith("_")))
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).startswith("_")
    if node.op == "call_module":
        return getattr(root.get_submodule(str(node.target)), "inplace", False) is True
    return False


_NEW_VALUES = {operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, torch.add, torch.sub,
               torch.mul, torch.cat, torch.concat, torch.relu, torch.sigmoid, torch.tanh,
               torch.nn.functional.relu, torch.nn.functional.conv1d, torch.nn.functional.conv2d,
               torch.nn.functional.conv3d, torch.nn.functional.pad, torch.clone}


def _fresh(node: fx.Node, root: nn.Module) -> bool:
    """A value in memory of its own, not possibly a view of (or the same tensor as) an input."""
    if node.op == "call_function":
        return node.target in _NEW_VALUES and not node.kwargs.get("inplace")
    if node.op == "call_method":
        return node.target == "clone"  # ``out = x.clone(); out += y`` leaves x as it was
    if node.op != "call_module":
        return False
    module = root.get_submodule(str(node.target))
    if getattr(module, "inplace", False) is True:
        return False
    return is_plain(module, STRUCTURAL_MODULES) and not isinstance(module, (nn.Identity, nn.Dropout, nn.Dropout2d))


class _Tracer(fx.Tracer):
    """Keeps every structural module whole, ours and users' subclasses included (fx's default only
    keeps modules defined inside ``torch.nn`` whole and traces into the rest), and turns a
    submodule it cannot trace into a leaf: the nodes its partial trace left are erased first."""

    def __init__(self, leaves: Sequence[type | str]) -> None:
        super().__init__()
        self.leaves = tuple(leaves)
        self.opaque: dict[str, str] = {}
        self.forced: set[str] = set()
        self.named: dict[tuple[bool, int], tuple[torch.Tensor, str]] = {}

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        """fx looks a tensor attribute's name up by scanning every parameter (or buffer) of the model at each use:
        MobileOne-S0's 226 batch norms took 2.6 s of a 3.3 s trace.  The names are found once here instead (the
        first name of a shared tensor, as ``named_parameters`` gives it; a tensor not found still takes fx's scan)."""
        if isinstance(root, nn.Module):
            for is_parameter, found in ((True, root.named_parameters()), (False, root.named_buffers())):
                for name, t in found:
                    self.named.setdefault((is_parameter, id(t)), (t, name))
        try:
            return super().trace(root, concrete_args)
        finally:
            self.named = {}

    def _name(self, a: Any) -> Optional[str]:
        entry = self.named.get((isinstance(a, nn.Parameter), id(a)))
        return entry[1] if entry is not None and entry[0] is a else None

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, fx.Proxy]) -> Any:
        name = self._name(attr_val) if isinstance(attr_val, nn.Parameter) or (
            self.proxy_buffer_attributes and isinstance(attr_val, torch.Tensor)) else None
        if name is None or self.param_shapes_constant:
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]

    def create_arg(self, a: Any) -> Any:
        name = self._name(a) if isinstance(a, torch.Tensor) else None
        return self.create_node("get_attr", name, (), {}) if name is not None else super().create_arg(a)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name and is_leaf_class(m, self.leaves):
            self.forced.add(module_qualified_name)
            return True
        return (is_plain(m, STRUCTURAL_MODULES) or module_qualified_name in self.opaque
                or super().is_leaf_module(m, module_qualified_name))

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        qualname = self.path_of_module(m)
        if self.is_leaf_module(m, qualname):
            return super().call_module(m, forward, args, kwargs)
        mark = len(self.graph.nodes)
        stack, calls = dict(self.module_stack), dict(self.num_calls)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            for node in reversed(list(self.graph.nodes)[mark:]):
                self.graph.erase_node(node)
            self.module_stack.clear()
            self.module_stack.update(stack)
            self.num_calls.clear()
            self.num_calls.update(calls)
            self.opaque[qualname] = f"torch.fx: {first_line(exc)}"
            return super().call_module(m, forward, args, kwargs)


def _active(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value depends on a graph input."""
    active: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(n in active for n in node.all_input_nodes):
            active.add(node)
    return active


def _all_active(values: Any, active: set[fx.Node]) -> bool:
    return isinstance(values, (list, tuple)) and len(values) > 0 and all(v in active for v in values)


def _constant(kwargs: dict[str, Any], tensor_arg: str) -> bool:
    """No argument but the tensor is computed in the graph (a pool size from ``x.shape`` is not a field)."""
    found: list[fx.Node] = []
    fx.node.map_arg({k: v for k, v in kwargs.items() if k != tensor_arg}, found.append)
    return not found


def _shared_targets(graph: fx.Graph, root: nn.Module) -> set[str]:
    """Modules with tensors that are called more than once, or whose tensors the graph also reads
    directly (other than their dtype or device): merging them would change the other use."""
    calls = Counter(str(node.target) for node in graph.nodes if node.op == "call_module")
    read = {str(node.target).rpartition(".")[0] for node in graph.nodes if node.op == "get_attr"
            and not all(u.op == "call_function" and u.target is getattr and u.args[1:] in (("dtype",), ("device",))
                        for u in node.users)}  # ``x.to(self.proj.weight.dtype)``: a merge keeps both
    owners = {".".join(parts[:k]) for parts in (r.split(".") for r in read if r) for k in range(1, len(parts) + 1)}
    return {t for t, n in calls.items() if (n > 1 or t in owners) and _has_tensors(root.get_submodule(t))}


def _has_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _input_names(node: fx.Node, names: dict[fx.Node, str]) -> list[str]:
    """The layer names among a node's args and kwargs, flattened, in order."""
    found: list[str] = []

    def collect(producer: fx.Node) -> fx.Node:
        found.append(names[producer])
        return producer

    fx.node.map_arg((node.args, node.kwargs), collect)
    return found
