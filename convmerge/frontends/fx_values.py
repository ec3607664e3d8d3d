"""What one run of an fx graph at the example input tells the fx tracer: the layers only values can make structural.

fx records Python calls without shapes.  Run once on the example (`run`), each node's shape and dtype is known and
each value computed without the input (a parameter, ``gamma.view(1, -1, 1, 1)``) is at hand, so the tracer reads
what torch.export's mapper reads from its fake tensors (`aten_layers`), with the same conditions:

- ``a + b`` / ``a - b`` of two layer values of one shape and dtype, the result's: an ``add`` / ``sub``;
- ``x + 0`` keeping x's shape (MobileOne starts its sum of branches at the number 0), ``F.dropout`` (or
  ``F.dropout2d``...) outside training, ``x[:, :]`` and ``x.contiguous()`` (``clone``, ``detach``): the identity;
- ``F.batch_norm`` outside training with its statistics from parameters and buffers: a ``batch_norm`` (timm's
  ``BatchNormAct2d`` calls it);
- ``F.linear`` of an [N, C] value by constant tensors: a ``linear``;
- ``x * c``, ``x / c``, ``x + c``, ``x - c``, ``c - x`` with ``c`` a number or one value per channel of ``x``
  computed from parameters (LayerScale's ``x * gamma``): an ``affine`` layer.
Each returns the layer's fields, the one node it reads, and the tensors it needs beyond the state dict; None leaves
the node to the tracer's other readings (opaque, mostly).
"""

from __future__ import annotations

import operator
import types
from typing import Any, Collection, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.operator_schemas import normalize_function

from ..ops import affine
from .trace_layers import TraceError, example_of_call, first_line

__all__ = ["Values", "read", "run"]

_JOINS = {operator.add: "add", operator.iadd: "add", torch.add: "add", operator.sub: "sub", operator.isub: "sub",
          torch.sub: "sub"}
_ARITHMETIC = {operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div", operator.add: "add",
               torch.add: "add", operator.sub: "sub", torch.sub: "sub", "mul": "mul", "div": "div", "add": "add",
               "sub": "sub"}
"""Out-of-place arithmetic by function or by tensor method (the in-place forms write: opaque, or `mutates`)."""
_DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout}
_ALIASES = {"call_method": {"contiguous", "clone", "detach"}, "call_function": {torch.clone, torch.detach}}


class Values:
    """Per node, the (shape, dtype) of its tensor at the example, and the tensor itself where it does not depend on
    the inputs (``constants``)."""

    def __init__(self) -> None:
        self.meta: dict[fx.Node, tuple[tuple[int, ...], torch.dtype]] = {}
        self.constants: dict[fx.Node, torch.Tensor] = {}
        self.passed: set[fx.Node] = set()
        """The calls of Python functions fx kept whole that returned one of their tensor arguments itself
        (torchvision's ``stochastic_depth`` outside training)."""
        self.calls: dict[str, Optional[tuple[torch.Tensor, ...]]] = {}
        """Per submodule asked for (`run`'s ``calls``), copies of the tensors of its first call (None: it took other
        arguments)."""


def run(root: torch.nn.Module, graph: fx.Graph, example: Sequence[torch.Tensor], active: set[fx.Node],
        calls: Collection[str] = ()) -> Values:
    """Run ``graph`` (of ``root``'s modules and tensors) once on copies of ``example`` without gradients, recording
    `Values`, and the first call of each submodule named in ``calls``; TraceError where it fails.  No GraphModule:
    its code generation costs more than the run."""
    values = Values()

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            if n.op == "call_module" and n.target in calls and n.target not in values.calls:
                values.calls[str(n.target)] = example_of_call(*self.fetch_args_kwargs_from_env(n))
            out = super().run_node(n)
            if n.op == "call_function" and isinstance(n.target, types.FunctionType) and isinstance(out, torch.Tensor):
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                if any(a is out for a in (*args, *kwargs.values())):
                    values.passed.add(n)
            if isinstance(out, torch.Tensor):
                values.meta[n] = (tuple(out.shape), out.dtype)
                if n not in active:
                    values.constants[n] = out.detach()
            return out

    try:
        with torch.no_grad():
            _Recorder(root, graph=graph).run(*(t.clone() for t in example))  # a forward may write its input
    except Exception as exc:
        raise TraceError(f"torch.fx: the traced graph does not run on the example input: {first_line(exc)}") from exc
    return values


def read(node: fx.Node, name: str, active: set[fx.Node], values: Values
         ) -> Optional[tuple[dict[str, Any], fx.Node, dict[str, torch.Tensor]]]:
    """The layer ``node`` is (its fields, the node it reads, its tensors as ``NAME.field``), or None."""
    if node.op not in ("call_function", "call_method"):
        return None
    return (_join(node, active, values) or _identity(node, active, values) or _batch_norm(node, name, active, values)
            or _linear(node, name, active, values) or _affine(node, name, active, values))


def _join(node: fx.Node, active: set[fx.Node], values: Values) -> Optional[tuple[dict[str, Any], Any, dict]]:
    op = _JOINS.get(node.target) if node.op == "call_function" else None
    if op is None or node.kwargs or len(node.args) != 2 or not all(a in active for a in node.args):
        return None
    left, right = (values.meta.get(a) for a in node.args)
    if left is None or not left == right == values.meta.get(node):
        return None
    return {"op": op}, list(node.args), {}


def _identity(node: fx.Node, active: set[fx.Node], values: Values) -> Optional[tuple[dict[str, Any], Any, dict]]:
    """``x + 0`` / ``0 + x`` (``out = 0; out += x``) keeping x's shape and dtype, ``F.dropout(x, training=False)``
    (or another of the dropouts, ``F.dropout2d``...), ``x[:, :]`` (`_whole`), and the copies and aliases torch.export's
    mapper drops (``x.contiguous()``, ``x.clone()``, ``x.detach()``: ShuffleNet's channel shuffle)."""
    if node.target in _ALIASES.get(node.op, ()) and node.args and node.args[0] in active:
        kept = values.meta.get(node.args[0]) == values.meta.get(node) and set(node.kwargs) <= {"memory_format"}
        return ({"op": "identity"}, [node.args[0]], {}) if kept else None
    if node.op != "call_function":
        return None
    if node.target in _DROPOUTS:
        a = _arguments(node, node.target) or {}
        x = a.get("input")
        return ({"op": "identity"}, [x], {}) if a.get("training") is False and x in active else None
    if node.target is operator.getitem and node.args[0] in active and node.args[0] in values.meta and _whole(
            node.args[1]):
        return {"op": "identity"}, [node.args[0]], {}
    if node.target not in (operator.add, operator.iadd, torch.add) or node.kwargs or len(node.args) != 2:
        return None
    zero = [a for a in node.args if type(a) in (int, float) and a == 0]
    x = [a for a in node.args if a in active]
    if zero and x and values.meta.get(x[0]) == values.meta.get(node):
        return {"op": "identity"}, x, {}
    return None


def _arguments(node: fx.Node, function: Any) -> Optional[dict[str, Any]]:
    """The arguments of a call of ``function`` by name (None: another node, or arguments that do not bind)."""
    if node.op != "call_function" or node.target is not function:
        return None
    bound = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    return None if bound is None else bound.kwargs


def _whole(index: Any) -> bool:
    """Whether ``x[index]`` is all of ``x`` at every size: ``x[...]``, ``x[:, :]``.  (Not ``x[:, :C]`` with C the
    channels at the example: one run cannot tell they are the same at every size, as after a flatten.)"""
    index = index if isinstance(index, tuple) else (index,)
    return all(k is Ellipsis or k == slice(None) for k in index) and sum(k is Ellipsis for k in index) <= 1


def _batch_norm(node: fx.Node, name: str, active: set[fx.Node], values: Values
                ) -> Optional[tuple[dict[str, Any], Any, dict]]:
    """``F.batch_norm`` of a layer value outside training, its statistics and affine tensors constants."""
    a = _arguments(node, F.batch_norm)
    if a is None:
        return None
    x = a["input"]
    meta = values.meta.get(x)
    if x not in active or meta is None or len(meta[0]) < 2 or a.get("training") is not False:
        return None
    if (a.get("weight") is None) != (a.get("bias") is None) or not isinstance(a.get("eps"), (int, float)):
        return None
    tensors = {}
    for field in ("weight", "bias", "running_mean", "running_var"):
        value = a.get(field)
        if value is None:
            continue
        t = values.constants.get(value) if isinstance(value, fx.Node) else None
        if t is None or t.shape != (meta[0][1],) or not t.dtype.is_floating_point:
            return None
        tensors[f"{name}.{field}"] = t.clone()
    if f"{name}.running_mean" not in tensors or f"{name}.running_var" not in tensors:
        return None
    return {"op": "batch_norm", "eps": float(a["eps"]), "affine": a.get("weight") is not None}, [x], tensors


def _linear(node: fx.Node, name: str, active: set[fx.Node], values: Values
            ) -> Optional[tuple[dict[str, Any], Any, dict]]:
    """``F.linear`` of an [N, C] layer value by constant tensors (timm's ``Linear``, a subclass with its own forward)."""
    a = _arguments(node, F.linear)
    if a is None:
        return None
    x, weight, bias = a["input"], a["weight"], a.get("bias")
    meta = values.meta.get(x)
    w = values.constants.get(weight) if isinstance(weight, fx.Node) else None
    b = values.constants.get(bias) if isinstance(bias, fx.Node) else None
    if x not in active or meta is None or len(meta[0]) != 2 or w is None or w.dim() != 2 or w.shape[1] != meta[0][1]:
        return None
    if (bias is not None and (b is None or b.shape != (w.shape[0],))) or w.dtype != meta[1]:
        return None
    tensors = {f"{name}.weight": w.clone(), **({f"{name}.bias": b.clone()} if b is not None else {})}
    return {"op": "linear"}, [x], tensors


def _affine(node: fx.Node, name: str, active: set[fx.Node], values: Values
            ) -> Optional[tuple[dict[str, Any], Any, dict]]:
    """An element-wise op of a layer value and a constant holding one number per channel (or one for all), keeping
    the value's shape and dtype (as `aten_layers.Mapper._affine`)."""
    op = _ARITHMETIC.get(node.target) if node.op in ("call_function", "call_method") else None
    alpha = node.kwargs.get("alpha", 1) if op in ("add", "sub") else 1
    if op is None or set(node.kwargs) - {"alpha"} or type(alpha) not in (int, float) or len(node.args) != 2:
        return None
    if node.op == "call_method" and node.args[0] not in active:
        return None
    left, right = node.args
    x, c = (left, right) if left in active else (right, left)
    meta, out = values.meta.get(x), values.meta.get(node)
    if x not in active or c in active or meta is None or meta != out or not meta[1].is_floating_point:
        return None
    if isinstance(c, fx.Node):
        t = values.constants.get(c)
        if t is None or t.dtype.is_complex or not affine.per_channel(meta[0], tuple(t.shape)):
            return None
        constant = t.to(torch.float64)
    elif type(c) in (int, float):
        constant = torch.tensor(c, dtype=torch.float64)
    else:
        return None
    terms = affine.arithmetic(op, constant, alpha, constant_first=c is left)
    if terms is None:
        return None
    tensors = {f"{name}.{suffix}": affine.channel_values(torch.as_tensor(term, dtype=torch.float64)).to(meta[1])
               for suffix, term in zip(affine.TENSORS, terms) if term is not None}
    return {"op": "affine"}, [x], tensors
