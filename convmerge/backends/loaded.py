"""`convmerge.load`: the module a self-describing safetensors file describes, built from its description
(FORMAT.md, section 1) and its tensors alone.

Each layer with tensors becomes a standard module at its name (a conv an `nn.Conv*d`, or a PaddedConv*d
where the padding is asymmetric; a batch norm a `_BatchNorm`; a pad with per-channel values a `Pad`), so
the module's state dict holds exactly the file's tensors under the file's names.  The forward walks the
layers in graph order; the ops without tensors are the calls reference.py makes.  An opaque layer is
built from the original module when `arch` supplies it, from `FUNCTIONS` when its op alone says what it
computes, from `argument_ops` when the description records its arguments, and refused otherwise.

(This module is not named `load`: importing `convmerge.load` would then shadow the function.)
"""

from __future__ import annotations

import copy
import itertools
import os
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..frontends import argument_ops, trace
from .. import io, model
from ..engine import reference
from ..graph import CONV_OPS, CONV_TRANSPOSE_OPS, POOL_OPS, Graph, GraphError
from ..frontends.modules import conv_module
from ..maths.spec import PadSpec
from ..engine.transpose_tensors import transpose_module
from .rebuild import check_rank

__all__ = ["FUNCTIONS", "BatchNorm", "Loaded", "Pad", "load"]

FUNCTIONS: dict[str, tuple[Any, int]] = {
    "relu": (F.relu, 1), "relu6": (F.relu6, 1), "sigmoid": (torch.sigmoid, 1), "tanh": (torch.tanh, 1),
    "silu": (F.silu, 1), "hardswish": (F.hardswish, 1), "hardsigmoid": (F.hardsigmoid, 1), "mish": (F.mish, 1),
    "mul": (torch.mul, 2),
}
"""Opaque ops whose name alone says what they compute, with how many producers they must have.

Both tracers name these after torch's own modules and functions (`nn.ReLU`, `torch.relu`, aten's relu),
none of which takes an argument the description would lose; a `mul` of two layer values is their product
(`x * 2` names one producer and is refused).  Not here, because the description drops an argument that
changes the result: gelu (approximate), leaky_relu/leakyrelu (slope), hardtanh and clamp (bounds), elu,
softplus, prelu (a weight), and the fx tracer's opaque_add (a constant or `alpha`).
"""


class BatchNorm(nn.modules.batchnorm._BatchNorm):
    """An inference batch norm of any rank (a description does not say which of BatchNorm1d/2d/3d)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input with a channel axis, got {input.dim()}-d")

    def _load_from_state_dict(self, state_dict: Any, prefix: str, local_metadata: Any, *rest: Any) -> None:
        if self.num_batches_tracked is None:  # not in the file: torch would add one for an old (version 1) state dict
            local_metadata = dict(local_metadata, version=self._version)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *rest)


class Affine(nn.Module):
    """An affine layer (affine.py): x * weight + bias per channel, each optional, each [C] or [1]."""

    def __init__(self, weight: Optional[int], bias: Optional[int]) -> None:
        super().__init__()
        self.weight = None if weight is None else nn.Parameter(torch.empty(weight, device="meta"))
        self.bias = None if bias is None else nn.Parameter(torch.empty(bias, device="meta"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.weight is not None:
            x = x * self.weight.view(shape)
        return x if self.bias is None else x + self.bias.view(shape)


class Pad(nn.Module):
    """A pad layer (`reference.pad`); `value`, when the file has `NAME.value`, holds one constant per channel."""

    def __init__(self, spec: PadSpec, channels: Optional[int] = None) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("value", None if channels is None else torch.empty(channels, device="meta"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference.pad(x, self.spec, self.value)

    def extra_repr(self) -> str:
        return f"padding={self.spec.padding!r}, mode={self.spec.mode!r}" + (
            f", value={self.spec.value!r}" if self.value is None and self.spec.mode == "constant" else "")


@dataclass(frozen=True)
class Step:
    """One layer: `kind` is module (call the submodule at `target`), function (FUNCTIONS[target]),
    argument (the argument_ops op `target`, `arg` its fields), add, sub, concat (`arg` the axis), pool (`arg` a PoolSpec) or same (identity, dropout); `inputs` are
    value slots, `free` the slots no later step reads."""

    kind: str
    target: str
    inputs: tuple[int, ...]
    arg: Any = None
    free: tuple[int, ...] = ()


class Loaded(nn.Module):
    """Runs a description's graph: `forward(*inputs)` takes the graph's inputs in order and returns its
    output (a tuple for several)."""

    def __init__(self, inputs: tuple[str, ...], steps: tuple[Step, ...], outputs: tuple[int, ...],
                 rank: Optional[int] = None) -> None:
        super().__init__()
        self._convmerge_inputs = inputs
        self._convmerge_steps = steps
        self._convmerge_outputs = outputs
        self._convmerge_rank = rank  # the inputs' rank the description was traced at (None: not recorded)

    def forward(self, *inputs: torch.Tensor) -> Union[torch.Tensor, tuple[torch.Tensor, ...]]:
        names = self._convmerge_inputs
        if len(inputs) != len(names):
            raise TypeError(f"the model takes {len(names)} input(s) ({', '.join(names)}), not {len(inputs)}")
        if self._convmerge_rank is not None:
            check_rank(inputs, [self._convmerge_rank] * len(inputs), "the description")
        values: list[Any] = [*inputs, *([None] * len(self._convmerge_steps))]
        for k, step in enumerate(self._convmerge_steps):
            values[len(names) + k] = self._run(step, [values[i] for i in step.inputs])
            for i in step.free:
                values[i] = None
        out = tuple(values[i] for i in self._convmerge_outputs)
        return out[0] if len(out) == 1 else out

    def _run(self, step: Step, args: list[torch.Tensor]) -> torch.Tensor:
        kind = step.kind
        if kind == "module":
            return self.get_submodule(step.target)(*args)
        if kind == "function":
            return FUNCTIONS[step.target][0](*args)
        if kind == "argument":
            return argument_ops.run(step.target, args[0], step.arg)
        if kind == "add":
            return sum(args[1:], args[0])
        if kind == "sub":
            return args[0] - args[1]
        if kind == "concat":
            return torch.cat(args, dim=step.arg)
        if kind == "pool":
            return reference.avg_pool(args[0], step.arg)
        return args[0]


def load(path: Union[str, os.PathLike], *, arch: Union[nn.Module, str, None] = None) -> nn.Module:
    """The module a safetensors file with a graph description computes (in eval mode, on the CPU).

    Its state dict holds the file's tensors under the file's names.  An opaque layer (an op the
    description does not define) is taken from `arch` (the original module, or a 'module:callable'
    string building it) when a submodule has its name, copied with the file's tensors loaded into it;
    a few parameter-free ops are known by name (FUNCTIONS), a few others by the arguments the description
    records (argument_ops: flatten, adaptive average pooling, mean); any other is refused (ValueError).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"convmerge.load takes a path to a .safetensors file, not {type(path).__name__}")
    path = os.fspath(path)
    source = _source(arch)
    if model.is_onnx(path):
        raise io.ModelFileError(f"{path}: an ONNX model; convmerge.load reads safetensors files "
                                "(run an ONNX model with onnxruntime)")
    if model.GRAPH_KEY not in io.read_header(path).metadata:
        raise GraphError(f"{path}: no graph description in the header (key '{model.GRAPH_KEY}'); convmerge.load "
                         "reads the files `convmerge fuse`, `convmerge annotate` and convmerge.save write")
    described = model.describe_file(path)
    graph, header = described.graph, described.header
    plan = _plan(graph, header, source)
    if plan.refused:
        shown = ", ".join(f"{name!r} ({op})" for name, op in plan.refused[:5])
        more = f" and {len(plan.refused) - 5} more" if len(plan.refused) > 5 else ""
        advice = ("arch has no submodule of that name" if source is not None else
                  "pass arch= (the original nn.Module, or a 'module:callable' string) to take them from it")
        raise ValueError(f"{path}: {len(plan.refused)} opaque layer(s) the description does not define: "
                         f"{shown}{more}; {advice}")
    clash = sorted(set(plan.modules) & set(plan.copies))
    if clash:
        raise ValueError(f"{path}: layer {clash[0]!r} is described as a layer and taken from arch too")
    traced = graph.doc.get("traced_input")
    rank = 2 + len(traced) if isinstance(traced, list) and len(traced) <= 3 else None
    root = Loaded(graph.inputs, plan.steps, plan.outputs, rank)
    for target, module in sorted({**plan.modules, **plan.copies}.items(), key=lambda item: item[0].count(".")):
        _place(root, target, module, path)
    state = {name: io.read_tensor(header, name) for name in header.tensors}
    for target, module in plan.copies.items():  # what the file does not hold, the original module has
        for key, value in module.state_dict().items():
            state.setdefault(f"{target}.{key}", value)
    for name in sorted(set(state) - set(root.state_dict(keep_vars=True)), key=lambda n: n.count(".")):
        _place_buffer(root, name, state[name], path)  # a tensor no layer reads is kept, so the state dict is the file's
    try:
        root.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: the file's tensors do not fit arch's submodules: "
                         f"{str(e).strip().splitlines()[-1].strip()}") from None
    meta = [n for n, t in itertools.chain(root.named_parameters(), root.named_buffers()) if t.is_meta]
    if meta:
        raise ValueError(f"{path}: tensor(s) {', '.join(meta[:3])} are in neither the file nor arch (arch is on the "
                         "meta device); pass a module with its tensors")
    return root.eval()


def _source(arch: Union[nn.Module, str, None]) -> Optional[nn.Module]:
    if arch is None or isinstance(arch, nn.Module):
        return arch
    if not isinstance(arch, str):
        raise TypeError(f"convmerge.load: arch must be an nn.Module or a 'module:callable' string, "
                        f"not {type(arch).__name__}")
    built = trace.load_callable(arch)()
    if not isinstance(built, nn.Module):
        raise trace.TraceError(f"arch {arch}: returned a {type(built).__name__}, not a torch.nn.Module")
    return built


@dataclass
class _Plan:
    steps: tuple[Step, ...]
    outputs: tuple[int, ...]
    modules: dict[str, nn.Module]  # by path: the modules built from the description (on the meta device)
    copies: dict[str, nn.Module]  # by path: arch's submodules
    refused: list[tuple[str, str]]  # the opaque layers nothing builds (name, op)


def _plan(graph: Graph, header: io.Header, source: Optional[nn.Module]) -> _Plan:
    slots = {name: i for i, name in enumerate(graph.inputs)}
    steps: list[Step] = []
    modules: dict[str, nn.Module] = {}
    copies: dict[str, nn.Module] = {}
    refused: list[tuple[str, str]] = []
    for name, layer in graph.layers.items():
        inputs = tuple(slots[src] for src in layer.inputs)
        slots[name] = len(slots)
        op = layer.op
        step = Step("module", name, inputs)
        if layer.fields.get("_not_float") and op in (*CONV_OPS, *CONV_TRANSPOSE_OPS, "batch_norm", "pad", "affine"):
            raise ValueError(f"{header.path}: layer {name!r}: its tensors are not floating point; "
                             "convmerge.load builds float modules")
        if op in CONV_OPS:
            modules[name] = conv_module(graph.specs[name], device="meta")
        elif op in CONV_TRANSPOSE_OPS:
            modules[name] = transpose_module(graph.transposes[name], device="meta")
        elif op == "batch_norm":
            modules[name] = _batch_norm(name, layer.fields, header)
        elif op == "pad":
            value = header.tensors.get(f"{name}.value")
            modules[name] = Pad(graph.pads[name], None if value is None else value.shape[0])
        elif op == "affine":
            sizes = [header.tensors[f"{name}.{s}"].shape[0] if f"{name}.{s}" in header.tensors else None
                     for s in ("weight", "bias")]
            modules[name] = Affine(*sizes)
        elif op in ("identity", "dropout"):
            step = Step("same", name, inputs)
        elif op in ("add", "sub", "concat"):
            step = Step(op, name, inputs, layer.fields.get("dim", 1) if op == "concat" else None)
        elif op in POOL_OPS:
            step = Step("pool", name, inputs, graph.pools[name])
        else:
            target = _submodule(source, name)
            if target is not None:
                if target not in copies:
                    copies[target] = copy.deepcopy(source.get_submodule(target))  # type: ignore[union-attr]
                step = Step("module", target, inputs)
            elif op in FUNCTIONS and FUNCTIONS[op][1] == len(inputs):
                step = Step("function", op, inputs)
            elif op in argument_ops.ARGUMENT_OPS and len(inputs) == 1 and (
                    fields := _argument_fields(name, layer, header)) is not None:
                step = Step("argument", op, inputs, fields)
            else:
                refused.append((name, op))
        steps.append(step)
    outputs = tuple(slots[name] for name in graph.outputs)
    return _Plan(_with_frees(steps, outputs), outputs, modules, copies, refused)


def _argument_fields(name: str, layer: Any, header: io.Header) -> Optional[dict[str, Any]]:
    """The fields of an argument-carrying op (argument_ops); None where the description has none of them
    (an older file: refused as opaque); a ValueError where they are not what the op takes."""
    names = [n for n, _ in argument_ops.ARGUMENT_OPS[layer.op].params]
    found = argument_ops.described(layer.op, layer.fields)
    if found is None and any(n in layer.fields for n in names):
        given = ", ".join(f"{n}={layer.fields[n]!r}" for n in names if n in layer.fields)
        raise ValueError(f"{header.path}: layer {name!r}: fields {given} are not arguments {layer.op} takes")
    return found


def _batch_norm(name: str, fields: Any, header: io.Header) -> BatchNorm:
    mean = header.tensors[f"{name}.running_mean"]
    bn = BatchNorm(mean.shape[0], eps=float(fields.get("eps", 1e-5)), device="meta")
    for key in ("weight", "bias"):
        if f"{name}.{key}" not in header.tensors:
            bn.register_parameter(key, None)
    if f"{name}.num_batches_tracked" not in header.tensors:
        bn.register_buffer("num_batches_tracked", None)
    return bn


def _submodule(source: Optional[nn.Module], name: str) -> Optional[str]:
    """The qualified name of `source`'s submodule that layer `name` calls (`Q@k`: the k-th call of Q)."""
    if source is None:
        return None
    base, at, k = name.rpartition("@")
    target = base if at and k.isdigit() else name
    try:
        source.get_submodule(target)
    except AttributeError:
        return None
    return target or None


def _with_frees(steps: list[Step], outputs: tuple[int, ...]) -> tuple[Step, ...]:
    """The steps, each freeing the values it reads last (so a forward holds only the live values)."""
    last = {i: k for k, step in enumerate(steps) for i in step.inputs}
    frees: dict[int, list[int]] = {}
    for i, k in last.items():
        if i not in outputs:
            frees.setdefault(k, []).append(i)
    return tuple(Step(s.kind, s.target, s.inputs, s.arg, tuple(sorted(frees.get(k, ()))))
                 for k, s in enumerate(steps))


def _place(root: nn.Module, target: str, module: nn.Module, path: str) -> None:
    """`module` at the dotted `target`, plain containers created on the way."""
    *parents, leaf = target.split(".")
    _add(_parent(root, parents, target, path), leaf, module, target, path)


def _place_buffer(root: nn.Module, name: str, tensor: torch.Tensor, path: str) -> None:
    *parents, leaf = name.split(".")
    owner = _parent(root, parents, name, path)
    try:
        owner.register_buffer(leaf, tensor)
    except (KeyError, AttributeError) as e:
        raise ValueError(f"{path}: tensor {name!r} cannot be a module's buffer ({e})") from None


def _parent(root: nn.Module, parents: list[str], target: str, path: str) -> nn.Module:
    owner = root
    for k, part in enumerate(parents):
        child = owner._modules.get(part)
        if child is None:
            child = nn.Module()
            _add(owner, part, child, ".".join(parents[: k + 1]), path)
        owner = child
    return owner


def _add(owner: nn.Module, name: str, module: nn.Module, target: str, path: str) -> None:
    if name in owner._modules:
        raise ValueError(f"{path}: layer {target!r}: two layers would be the one module {target!r}")
    try:
        owner.add_module(name, module)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: layer {target!r}: cannot be a submodule under that name ({e})") from None
