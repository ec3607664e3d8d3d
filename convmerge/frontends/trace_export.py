"""The main tracer: torch.export's ATen graph, mapped back onto the user's modules.

torch.export runs the model's Python on fake tensors, so it sees through what symbolic tracing
cannot (loops over shapes or parameter lists, item assignment, kernels computed from parameters)
and knows every shape, which an exact `add` needs.  Its graph is in ATen ops, functionalized
(in-place writes become explicit `slice_scatter`s).  We map it back:

- a plain torch.nn module (a Conv2d, a BatchNorm, a ReLU...) is one layer named by its qualified
  name, exactly as the fx tracer writes it, found through each node's `nn_module_stack`;
- a functional conv or batch norm is a layer named after its module; parameters it uses as they
  are keep their state-dict names, anything computed from them (`weight + id_tensor`, weight
  norm) is evaluated once into `Traced.tensors` under a name no state-dict key uses;
- `add`, `cat`, average pooling and padding are structural only when they are exactly what the
  description's op means (same shapes, no `alpha`, layer values only, no negative pads), and a
  constant pad whose border is then overwritten by one per-channel constant (DBB's BN-and-pad)
  is one `pad` layer with a `<name>.value` tensor;
- a submodule export cannot trace is replaced by an opaque custom op (its output shapes measured
  by running it once) and the export is tried again.
Everything else is an opaque layer named after its ATen op.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import itertools
import logging
import operator
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import fx, nn
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx.experimental import _config as fx_config
from torch.utils import _pytree as pytree

from ..ops import affine
from . import argument_ops
from ..maths.spec import SpecError, conv_spec, padding_fields
from ..ops.transpose import transpose_fields, transpose_spec
from .trace_layers import (CONV_TRANSPOSES, STRUCTURAL_MODULES, STRUCTURAL_OPS, TraceError, Traced, avg_pool_fields, first_line,
                           is_leaf_class, is_plain, model_dtype,
                           module_fields, opaque, pad_fields)

__all__ = ["describe", "example_input"]

aten = torch.ops.aten
_DEFAULT_SIDE = {0: 1, 1: 224, 2: 224, 3: 32}
"""Spatial size of a guessed example input: 224 fits most image classifiers' fixed heads."""

# --- opaque leaves ----------------------------------------------------------------------------

_OUTPUTS: dict[str, list[tuple[tuple[int, ...], torch.dtype, torch.device, Optional[int]]]] = {}
"""What a leaf call returns (shape, dtype, device per tensor, and the index of the input tensor of the same
shape and dtype, whose shape a symbolic export then gives it), keyed by `session/qualname#call`."""
_STRUCTURES: dict[str, tuple[list[Any], Any]] = {}
"""The same call's output structure (`_Slot` where a tensor goes), for the module's caller."""
_SESSIONS = itertools.count()


@torch.library.custom_op("convmerge::opaque_leaf", mutates_args=())
def _leaf_op(inputs: list[torch.Tensor], key: str) -> list[torch.Tensor]:
    raise RuntimeError("convmerge::opaque_leaf stands for a module in a traced graph; it never runs")


@_leaf_op.register_fake
def _leaf_fake(inputs: list[torch.Tensor], key: str) -> list[torch.Tensor]:
    return [torch.empty_like(inputs[like]) if like is not None else torch.empty(shape, dtype=dtype, device=device)
            for shape, dtype, device, like in _OUTPUTS[key]]


_LEAF = torch.ops.convmerge.opaque_leaf.default


class _Slot:
    """Where a leaf's output structure holds a tensor."""


def describe(module: nn.Module, leaves: Sequence[type | str] = (),
             example_size: Optional[Sequence[int]] = None,
             example_inputs: Optional[Sequence[torch.Tensor]] = None, symbolic: bool = True) -> Traced:
    """The description of ``module`` from torch.export; raises TraceError when the model cannot be
    exported even with its failing submodules as opaque leaves (the caller falls back to fx)."""
    example, origin = example_input(module, example_size, example_inputs)
    opaque_modules = {q: "marked as a leaf" for q, m in module.named_modules() if q and is_leaf_class(m, leaves)}
    session = f"{id(module):x}.{next(_SESSIONS)}"
    calls: dict[str, Any] = {}
    raised: list[bool] = []  # whether the symbolic export itself failed (then the fallback need not try it again)
    once = None if opaque_modules else _export_once(module, example, symbolic=symbolic, raised=raised)
    if once is not None:
        try:
            program, mapper = once, _Mapper(module, once)
            with _hinted(program.graph):
                traced = mapper.describe()
            traced.graph_module = _from(program, module)
        except Exception:  # noqa: BLE001 - a symbolic size where the mapper reads a number: the earlier route
            once = None
    if once is None:
        try:
            program = _export_with_leaves(module, example, opaque_modules, session, calls)
            mapper = _Mapper(module, program)
            traced = mapper.describe()
            kept = {k: (_OUTPUTS[k], _STRUCTURES[k]) for k in _OUTPUTS if k.startswith(session + "/")}
            traced.graph_module = runnable(module, example, program, kept, calls, tried=bool(raised) and symbolic)
        finally:
            for key in [k for k in _OUTPUTS if k.startswith(session + "/")]:
                del _OUTPUTS[key], _STRUCTURES[key]
    shapes = ", ".join(str(list(t.shape)) for t in example)
    traced.notes[:0] = [f"traced with torch.export on {'inputs' if len(example) > 1 else 'an input'} of shape {shapes}"
                        f"{origin}"] + [
        f"module {q!r} ({type(module.get_submodule(q)).__name__}) is opaque: {why}"
        for q, why in opaque_modules.items() if q in mapper.leaves_seen]
    with _hinted(program.graph):
        traced.example, traced.smallest = example, _smallest(program.graph, example[0].dim())
    return traced


def _export_once(module: nn.Module, example: tuple[torch.Tensor, ...], symbolic: bool = True,
                 raised: Optional[list[bool]] = None) -> Optional[torch.export.ExportedProgram]:
    """One export at symbolic batch and spatial sizes that serves both the description (read at the sizes
    it was traced at, `_hinted`) and the fused module (which then runs at any size the model allows), with
    no `run_decompositions`: the export's own graph, its in-place ops made out of place (`_out_of_place`).
    None where that does not hold (an export that needs fixed sizes, an in-place write into a view or an
    input, a batch norm in training mode): the caller then exports at the traced shape, decomposes and
    exports again at symbolic sizes for the module, as before.  Not ``symbolic`` (a description only, for
    `check`): at the example shape, which some models export much faster (EfficientViT-M0: 3 s against 24 s).
    ``raised`` gets True where the export itself failed."""
    if not all(t.dim() >= 3 for t in example):
        return None
    batch, dims = symbolic_example(example)
    try:
        with _quiet(), _eval(module):
            if symbolic:
                with generic_sizes():
                    program = torch.export.export(module, batch, dynamic_shapes=dims, strict=False)
            else:
                program = torch.export.export(module, example, strict=False)
    except Exception:  # noqa: BLE001 - the static export says why, or falls back to fx
        if raised is not None:
            raised.append(True)
        return None
    if not _out_of_place(program.graph_module):
        return None
    return program


_DROPOUTS = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
             aten.feature_alpha_dropout.default}
_SIZES = (int, float, torch.SymInt, torch.SymBool, torch.SymFloat)
"""The values of shape arithmetic (a symbolic export's), which the description leaves out."""


def _out_of_place(gm: fx.GraphModule) -> bool:
    """Rewrite each in-place op (``x += y``, ``relu_``) of ``gm`` as its out-of-place form, the later
    readers of its target reading the result, as functionalization would; False (``gm`` then unusable)
    where a write is not that simple: its target an input, a parameter or a view, or read through a view."""
    graph = gm.graph
    order = {n: k for k, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        schema = node.target._schema
        written = [a for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        if node.target is aten.batch_norm.default and _bind(node)["training"]:
            return False
        if node.target in _DROPOUTS and not _bind(node)["train"]:  # seeded, so never dead code: the identity
            node.target, node.args, node.kwargs = aten.clone.default, (node.args[0],), {}
            continue
        if not written:
            continue
        if schema.arguments[0] not in written or len(written) != 1 or not node.args:
            return False
        base = node.target.overloadpacket.__name__
        functional = getattr(getattr(aten, base[:-1], None), node.target._overloadname, None) if base.endswith(
            "_") else None
        target = node.args[0]
        if functional is None or not isinstance(target, fx.Node) or target.op != "call_function" or _aliases(target):
            return False
        if any(_aliases(u) and not _writes(u) and u.args and u.args[0] is target for u in target.users):
            return False
        node.target = functional
        for user in list(target.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(target, node)
    gm.recompile()
    return True


def _aliases(node: fx.Node) -> bool:
    """Whether ``node``'s value is a view of one of its inputs (or written in place)."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return target is operator.getitem and isinstance(node.args[0], fx.Node) and _aliases(node.args[0])
    return any(r.alias_info is not None for r in target._schema.returns)


def _writes(node: fx.Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and any(
        a.alias_info is not None and a.alias_info.is_write for a in node.target._schema.arguments)


@contextlib.contextmanager
def _hinted(graph: fx.Graph) -> Iterator[None]:
    """Each node's value as traced: a symbolic size is the size it had in the export (its hint), so the
    mapper reads the graph of an export at symbolic sizes as it reads a static one."""
    saved = {}
    for node in graph.nodes:
        val = node.meta.get("val")
        concrete = _concrete(val)
        if concrete is not val:
            saved[node] = val
            node.meta["val"] = concrete
    try:
        yield
    finally:
        for node, val in saved.items():
            node.meta["val"] = val


def _concrete(val: Any) -> Any:
    if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return val.node.hint
    if isinstance(val, torch.Tensor) and any(isinstance(n, torch.SymInt) for n in val.shape):
        return torch.empty([int(_concrete(n)) for n in val.shape], dtype=val.dtype, device="meta")
    if isinstance(val, (list, tuple)) and any(_concrete(v) is not v for v in val):
        return type(val)(_concrete(v) for v in val)
    return val


def _from(program: torch.export.ExportedProgram, module: nn.Module
          ) -> Callable[[bool], tuple[fx.GraphModule, dict[str, str]]]:
    """The builder of `runnable` for an export that serves both: its graph is the described one."""
    names = {n.name: n.name for n in program.graph.nodes}

    def build(dynamic: bool = True) -> tuple[fx.GraphModule, dict[str, str]]:
        with _quiet():
            gm = program.module()
        _general(gm, module, {})
        return gm, names

    return build


def _smallest(graph: fx.Graph, rank: int) -> tuple[int, ...]:
    """Per spatial axis, the smallest size above 1 a value of that rank has in the traced graph."""
    sizes = [[int(n) for n in v.shape[2:]] for node in graph.nodes
             if isinstance(v := node.meta.get("val"), torch.Tensor) and v.dim() == rank and rank >= 3]
    return tuple(min((s[k] for s in sizes if s[k] > 1), default=1) for k in range(rank - 2)) if sizes else ()


def example_input(module: nn.Module, example_size: Optional[Sequence[int]] = None,
                  given: Optional[Sequence[torch.Tensor]] = None) -> tuple[tuple[torch.Tensor, ...], str]:
    """Inputs for ``module`` (on its device, in its dtype) and a note on where their shape came from.

    ``given`` are used as they are.  Else ``example_size`` is a full shape (batch, channels, *spatial)
    or only the spatial size (224 per axis when None); the channels (and spatial rank) are those of the
    first conv, batch norm or linear layer (a [N, C] input) the module's forward calls, found by calling it (and
    stopping there).
    A forward with several required positional inputs gets one such tensor for each.
    """
    if given is not None:
        return tuple(given), " (as given)"
    dtype = model_dtype(module)
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    device = tensor.device if tensor is not None else torch.device("cpu")
    count = _positional_inputs(module)
    layers = [m for m in module.modules()
              if isinstance(m, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.Linear))
              and _channels(m) > 0]
    if not layers:
        if example_size is None:
            raise TraceError("torch.export needs an example input size (no conv, batch norm or linear layer to guess "
                             "one from)")
        return _inputs(tuple(example_size), count, dtype, device), " (as given)"
    first, where = layers[0], "registered (the forward did not get that far)"
    for _ in range(3):  # the guess, then the layer the forward really calls first (and once more if that moves)
        shape = _shape_for(first, example_size)
        called = _first_called(module, _inputs(shape, count, dtype, device), layers)
        if called is None:
            break
        where = "called"
        if called is first:
            break
        first = called
    shape = _shape_for(first, example_size)
    size = "as given" if example_size is not None else "the default"
    origin = (f" (spatial size {size}; channels of {type(first).__name__} {_qualname(module, first)!r}, the first "
              f"conv, batch norm or linear layer {where}; give input_size or example inputs if it is wrong)")
    return _inputs(shape, count, dtype, device), origin


def _shape_for(first: nn.Module, example_size: Optional[Sequence[int]]) -> tuple[int, ...]:
    nd = len(first.kernel_size) if isinstance(first, nn.modules.conv._ConvNd) else \
        0 if isinstance(first, nn.Linear) else _bn_rank(first)
    if example_size is None:
        return (1, _channels(first), *([_DEFAULT_SIDE[nd]] * nd))
    if len(example_size) == nd + 2:
        return tuple(example_size)
    if len(example_size) == nd:
        return (1, _channels(first), *example_size)
    if len(example_size) == 1:
        return (1, _channels(first), *(list(example_size) * nd))
    raise TraceError(f"input size {list(example_size)} is neither {nd} spatial sizes nor a full input shape")


def _inputs(shape: tuple[int, ...], count: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    if device.type == "meta":
        return tuple(torch.empty(shape, dtype=dtype, device=device) for _ in range(count))
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(shape, generator=generator, dtype=dtype).to(device) for _ in range(count))


def _positional_inputs(module: nn.Module) -> int:
    """How many positional arguments ``forward`` requires (at least one)."""
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return 1
    required = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                and p.default is p.empty]
    return max(1, len(required))


class _Called(Exception):
    """Stops a forward at its first conv, batch norm or linear layer."""


def _first_called(module: nn.Module, inputs: tuple[torch.Tensor, ...], layers: list[nn.Module]) -> Optional[nn.Module]:
    """The first of ``layers`` the module's forward calls on ``inputs`` (the forward stops there)."""
    found: list[nn.Module] = []

    def stop(m: nn.Module, args: Any) -> None:
        found.append(m)
        raise _Called

    handles = [m.register_forward_pre_hook(stop) for m in layers]
    try:
        with torch.no_grad(), _quiet(), _eval(module):
            module(*inputs)
    except Exception:  # noqa: BLE001 - _Called, or code that needs other inputs: the guess stays
        pass
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def _channels(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return int(m.in_features)
    return int(m.in_channels if isinstance(m, nn.modules.conv._ConvNd) else m.num_features)


def _bn_rank(m: nn.Module) -> int:
    return {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}.get(type(m), 2)


def _qualname(root: nn.Module, target: nn.Module) -> str:
    return next(q for q, m in root.named_modules() if m is target)


def _export_with_leaves(module: nn.Module, example: tuple[torch.Tensor, ...], leaves: dict[str, str],
                        session: str, calls: dict[str, Any]) -> torch.export.ExportedProgram:
    """Export, turning the submodule that made it fail into an opaque leaf and trying again."""
    for _ in range(sum(1 for _ in module.modules()) + 1):
        try:
            with _quiet(), _eval(module):
                if leaves:
                    _measure_leaves(module, example, list(leaves), session)
                with _patched(module, {q: _exporting(q, session, calls) for q in leaves}):
                    program = torch.export.export(module, example, strict=False)
                return program.run_decompositions({})
        except Exception as exc:
            culprit = _failing_module(exc, module)
            if culprit is None or culprit in leaves:
                raise TraceError(f"torch.export: {first_line(exc)}") from exc
            leaves.update(_same_class(module, culprit, f"torch.export: {first_line(exc)}", leaves))
    raise TraceError("torch.export: every submodule failed")


_GUARDS = {aten._assert_scalar.default, aten.sym_constrain_range_for_size.default,
           aten._assert_tensor_metadata.default}
"""Checks an exported graph makes of the sizes it was traced at; the fused module is checked end to end
instead, at sizes where they would have failed."""


@contextlib.contextmanager
def generic_sizes() -> Iterator[None]:
    """An export at symbolic sizes keeps a size that is 1 at the traced shape symbolic (`backed_size_oblivious`;
    torch.export otherwise fixes it, and every size computed from it: EfficientViT-M0 traced at 64x64, whose last
    stage is 1x1, padded its windows by a constant 3 and ran at no other size).  Sizes of 1 are then treated as
    generic: the module's own branches on a size of 1 are what the end-to-end check is for.  torch's config is
    process-wide: set only for the export's duration (tracing is single-threaded anyway)."""
    with fx_config.patch(backed_size_oblivious=True):
        yield


def symbolic_example(example: Sequence[torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], tuple[dict, ...]]:
    """Inputs and `dynamic_shapes` for an export at symbolic batch and spatial sizes: a batch of 2 (a batch of
    1 would be fixed), every axis but the channels `Dim.AUTO`."""
    batch = tuple(t.expand(2, *t.shape[1:]).contiguous() for t in example)
    return batch, tuple({k: torch.export.Dim.AUTO for k in range(t.dim()) if k != 1} for t in example)


def runnable(module: nn.Module, example: tuple[torch.Tensor, ...], program: torch.export.ExportedProgram,
             leaves: dict[str, Any], calls: dict[str, Any],
             tried: bool = False) -> Callable[[bool], tuple[fx.GraphModule, dict[str, str]]]:
    """A builder of a runnable module of the traced graph, and the names its nodes have there.

    With ``dynamic``, the model is exported again with symbolic batch and spatial sizes, so the module
    runs at any size; its tensor ops pair with the traced graph's one to one, in order (it only adds
    shape arithmetic, which shifts the nodes' names).  Else (or where that export fails or does not
    pair up) it is the traced graph.  Either way the shape guards are left out (the fused module is
    checked end to end instead) and each opaque leaf calls its module again.  ``leaves`` are the leaf
    calls' recorded outputs, ``calls`` their arguments (`_Slot` where a tensor goes).  ``tried``: the same
    export at symbolic sizes already failed (without leaves): it is not tried again.
    """

    again: list[Any] = [None] if tried and not leaves else []  # the export at symbolic sizes and its names

    def general() -> Optional[tuple[torch.export.ExportedProgram, dict[str, str]]]:
        if again or not all(t.dim() >= 3 for t in example):
            return again[0] if again else None
        again.append(None)
        batch, dims = symbolic_example(example)
        qualnames = {key.split("/", 1)[1].rpartition("#")[0] for key in leaves}
        session = next(iter(leaves)).split("/", 1)[0] if leaves else ""
        for key, (outputs, structure) in leaves.items():
            _OUTPUTS[key], _STRUCTURES[key] = outputs, structure
        try:
            with _quiet(), _eval(module), _patched(module, {q: _exporting(q, session, {}) for q in qualnames}):
                with generic_sizes():
                    program_again = torch.export.export(module, batch, dynamic_shapes=dims, strict=False)
                program_again = program_again.run_decompositions({})  # torch warns about its own pytree code here
            names = _pair_nodes(program.graph, program_again.graph)
            if names is not None:
                again[0] = (program_again, names)
        except Exception:  # noqa: BLE001 - code that needs fixed sizes: the traced graph it is
            pass
        finally:
            for key in leaves:
                _OUTPUTS.pop(key, None), _STRUCTURES.pop(key, None)
        return again[0]

    def build(dynamic: bool = True) -> tuple[fx.GraphModule, dict[str, str]]:
        found = general() if dynamic else None
        with _quiet():
            gm, names = (found[0].module(), found[1]) if found is not None else (
                program.module(), {n.name: n.name for n in program.graph.nodes})
        moved = _general(gm, module, calls)
        return gm, {k: moved.get(v, v) for k, v in names.items()}

    return build


def _general(gm: fx.GraphModule, root: nn.Module, calls: dict[str, Any]) -> dict[str, str]:
    """Make ``gm`` general: no shape guards, each opaque leaf a call of its module again.  Returns the new
    names of the nodes that held a leaf's outputs."""
    graph = gm.graph
    moved: dict[str, str] = {}
    for node in list(graph.nodes):
        if (node.op == "call_module" and node.target == "_guards_fn") or (
                node.op == "call_function" and node.target in _GUARDS and not node.users):
            graph.erase_node(node)
        elif node.op == "call_function" and node.target is _LEAF:
            moved.update(_call_leaf_module(gm, root, node, calls[str(node.args[1])]))
    graph.eliminate_dead_code()
    gm.recompile()
    return moved


def _call_leaf_module(gm: fx.GraphModule, root: nn.Module, node: fx.Node, call: tuple[Any, Any, list]
                      ) -> dict[str, str]:
    """Replace an opaque leaf op by a call of the leaf module (from ``root``, in eval mode) on the same
    arguments; each output the op listed is read from the module's output at the same place.  Returns the
    replaced nodes' names -> the names of the nodes that now hold their values."""
    qualname = str(node.args[1]).split("/", 1)[1].rpartition("#")[0]
    (args, kwargs), paths = call
    tensors = iter(node.args[0])
    fill = lambda v: next(tensors) if isinstance(v, _Slot) else v  # noqa: E731
    args, kwargs = pytree.tree_map(fill, (args, kwargs), is_leaf=lambda v: isinstance(v, _Slot))
    _install(gm, qualname, root.get_submodule(qualname))
    moved = {}
    with gm.graph.inserting_before(node):
        result = gm.graph.call_module(qualname, tuple(args), dict(kwargs))
        moved[node.name] = result.name
        for user in list(node.users):
            value = result
            for step in paths[user.args[1]]:
                value = gm.graph.call_function(operator.getitem, (value, step))
            user.replace_all_uses_with(value)
            moved[user.name] = value.name
            gm.graph.erase_node(user)
    gm.graph.erase_node(node)
    return moved


def _install(gm: nn.Module, qualname: str, module: nn.Module) -> None:
    """Put ``module`` at ``qualname`` in ``gm``, making empty parents where there are none; what the export left
    there (a holder of some of its tensors, which are the module's own) is replaced by the module itself."""
    owner = gm
    *parents, leaf = qualname.split(".")
    for part in parents:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    if leaf in owner._modules or not hasattr(owner, leaf):
        owner.add_module(leaf, module.eval())


_PLUMBING = {getattr(aten, n).default for n in ("view", "_unsafe_view", "expand", "clone", "alias", "copy",
                                               "unsqueeze", "squeeze", "slice_scatter")} | {aten.slice.Tensor}
"""Ops that only move or re-view data, which an export at symbolic sizes adds where the static one needs
none (a whole-axis slice, a border write broadcast to a symbolic shape): left out of the pairing."""


def _pair_nodes(traced: fx.Graph, again: fx.Graph) -> Optional[dict[str, str]]:
    """Traced node name -> the same op's node name in the graph exported again (None if they differ).

    Ops are paired in order, leaving out shape arithmetic and `_PLUMBING`; a plumbing node (DBB's padded
    border, the last write of its pad) then pairs with what the paired consumer of its value reads in the
    same place.  A node with no partner makes a rebuild that needs it fall back to the traced graph."""
    def ops(graph: fx.Graph) -> list[fx.Node]:
        return [n for n in graph.nodes if n.op == "call_function" and n.target not in _PLUMBING and not isinstance(
            n.meta.get("val"), (int, torch.SymInt, torch.SymBool, torch.SymFloat))]

    a, b = ops(traced), ops(again)
    if len(a) != len(b) or any(x.target != y.target for x, y in zip(a, b)):
        return None
    names = {x.name: y.name for x, y in zip(a, b)}
    names.update({x.name: y.name for x, y in zip([n for n in traced.nodes if n.op == "placeholder"],
                                                [n for n in again.nodes if n.op == "placeholder"])})
    by_name = {n.name: n for n in again.nodes}
    for node in traced.nodes:
        for user in node.users if node.name not in names else ():
            partner = by_name.get(names.get(user.name, ""))
            mine, theirs = _flat_args(user), _flat_args(partner) if partner is not None else []
            if node in mine and len(theirs) == len(mine):
                read = theirs[mine.index(node)]
                if isinstance(read, fx.Node):
                    names[node.name] = read.name
                    break
    return names


def _flat_args(node: fx.Node) -> list[Any]:
    return [b for a in node.args for b in (a if isinstance(a, (list, tuple)) else (a,))]


def _same_class(root: nn.Module, culprit: str, why: str, leaves: dict[str, str]) -> dict[str, str]:
    """The failing module and every other instance of its class: they run the same code, and each
    failure costs one more export of the whole model."""
    cls = type(root.get_submodule(culprit))
    found = {culprit: why}
    for qualname, m in root.named_modules():
        inside = any(qualname.startswith(q + ".") for q in [*leaves, *found])
        if type(m) is cls and qualname not in found and qualname not in leaves and not inside:
            found[qualname] = f"{why} (in {culprit!r}, of the same class)"
    return found


def _failing_module(exc: BaseException, root: nn.Module) -> Optional[str]:
    """The innermost module of the user's (not torch.nn's, not the root) that was running when
    ``exc`` (or its cause) was raised; None when there is none."""
    names = {id(m): q for q, m in root.named_modules()}
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for error in reversed(chain):
        calls = [frame.f_locals.get("self") for frame, _ in traceback.walk_tb(error.__traceback__)
                 if frame.f_code.co_name == "_call_impl"]
        users = [names[id(m)] for m in calls
                 if id(m) in names and not type(m).__module__.startswith("torch.")]
        if users:
            return users[-1] or None
    return None


def _measure_leaves(module: nn.Module, example: tuple[torch.Tensor, ...], leaves: list[str], session: str) -> None:
    """Run the model once, eagerly, recording what each leaf call returns (the fake op's shapes: an
    output of an input's shape and dtype keeps that input's shape when exported at symbolic sizes)."""
    device = example[0].device
    counts: Counter[str] = Counter()

    def measuring(qualname: str, leaf: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            key = f"{session}/{qualname}#{counts[qualname]}"
            counts[qualname] += 1
            out = _run_leaf(leaf, forward, args, kwargs)
            flat, spec = pytree.tree_flatten(out)
            tensors = [t for t in flat if isinstance(t, torch.Tensor)]
            inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            like = [next((i for i, x in enumerate(inputs) if x.shape == t.shape and x.dtype == t.dtype), None)
                    for t in tensors]
            _OUTPUTS[key] = [(tuple(t.shape), t.dtype, device, k) for t, k in zip(tensors, like)]
            _STRUCTURES[key] = ([_Slot() if isinstance(t, torch.Tensor) else t for t in flat], spec)
            return pytree.tree_unflatten([t.to(device) if isinstance(t, torch.Tensor) else t for t in flat], spec)
        return run

    targets = {q: module.get_submodule(q) for q in leaves}
    with _patched(module, {q: measuring(q, m, m.forward) for q, m in targets.items()}), torch.no_grad():
        module(*example)


def _run_leaf(leaf: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """The leaf's output; on the meta device, code that needs values (``if x.sum() > 0``) runs on
    a CPU stand-in with made-up weights: only the output's shapes are kept."""
    try:
        return forward(*args, **kwargs)
    except Exception:
        if not any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in pytree.tree_leaves((args, kwargs))):
            raise
    stand_in = copy.deepcopy(leaf)
    for sub in stand_in.modules():
        sub.__dict__.pop("forward", None)
    stand_in = stand_in.to_empty(device="cpu")
    with torch.no_grad():
        for t in itertools.chain(stand_in.parameters(), stand_in.buffers()):
            if t.is_floating_point():
                t.uniform_(0.5, 1.5)
            else:
                t.zero_()
    generator = torch.Generator().manual_seed(0)
    args, kwargs = pytree.tree_map_only(
        torch.Tensor, lambda t: torch.rand(t.shape, generator=generator).to(t.dtype), (args, kwargs))
    return stand_in(*args, **kwargs)


def _exporting(qualname: str, session: str, calls: dict[str, Any]) -> Callable[..., Any]:
    """A leaf's forward while exporting: one opaque op whose outputs have the measured shapes.  ``calls``
    gets each call's arguments (`_Slot` for each tensor) and where its output holds each tensor."""
    counts: Counter[str] = Counter()

    def forward(*args: Any, **kwargs: Any) -> Any:
        key = f"{session}/{qualname}#{counts[qualname]}"
        counts[qualname] += 1
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = iter(_LEAF(inputs, key))
        flat, spec = _STRUCTURES[key]
        out = pytree.tree_unflatten([next(outputs) if isinstance(t, _Slot) else t for t in flat], spec)
        template = pytree.tree_map_only(torch.Tensor, lambda t: _Slot(), (args, kwargs))
        paths = [tuple(getattr(k, "idx", getattr(k, "key", None)) for k in path)
                 for path, leaf in pytree.tree_flatten_with_path(out)[0] if isinstance(leaf, torch.Tensor)]
        calls[key] = (template, paths)
        return out

    return forward


@contextlib.contextmanager
def _patched(module: nn.Module, forwards: dict[str, Callable[..., Any]]) -> Iterator[None]:
    """Replace some submodules' ``forward`` (an instance attribute, so hooks still run around it)."""
    saved = {}
    try:
        for qualname, fn in forwards.items():
            leaf = module.get_submodule(qualname)
            saved[qualname] = leaf.__dict__.get("forward")
            leaf.forward = fn
        yield
    finally:
        for qualname, old in saved.items():
            leaf = module.get_submodule(qualname)
            leaf.__dict__.pop("forward", None)
            if old is not None:
                leaf.forward = old


@contextlib.contextmanager
def _eval(module: nn.Module) -> Iterator[None]:
    """Trace the inference form (the description's): batch norms use their running statistics."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.export logs, warns and prints the partial graph (on stderr) about code it cannot trace;
    we say it in one note."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


# --- from the ATen graph to the description ---------------------------------------------------

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


class _Mapper:
    """Walks the exported graph once, in order, and writes one layer per value the model computes."""

    def __init__(self, root: nn.Module, program: torch.export.ExportedProgram) -> None:
        self.root = root
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
        self.leaf_calls = Counter(self._leaf_of(n)[0] for n in self.graph.nodes if n.target is _LEAF)
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
                    or isinstance(node.meta.get("val"), _SIZES)):  # shape arithmetic of a symbolic export
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
        if isinstance(first, torch.Tensor) and first.dim() >= 3:
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
        """Nodes computed from parameters, buffers and constants only (never from the input)."""
        const: set[fx.Node] = set(self.keys)
        for node in self.graph.nodes:
            if node.op != "call_function" or node.target is _LEAF:
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
            if node.op == "call_function" and node not in self.const and not isinstance(node.meta.get("val"), _SIZES):
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
                                        if i not in members and not isinstance(i.meta.get("val"), _SIZES)))
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
        elif (target in _ALIASES or (target is aten.dropout.default and not _bind(node)["train"])
              or self._plus_zero(node)):
            self.names[node] = self._name(node.args[0])
        elif target is _LEAF:
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
        a = _bind(node)
        x, other, out = a["self"], a["other"], node.meta["val"]
        return (self._active(x) and type(other) in (int, float) and other == 0
                and x.meta["val"].shape == out.shape and x.meta["val"].dtype == out.dtype)

    def _conv(self, node: fx.Node) -> bool:
        """A convolution of the input by a kernel that is a parameter or computed from parameters."""
        a = _bind(node)
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
        a = _bind(node)
        x, weight, bias = a["input"], a["weight"], a["bias"]
        if not self._active(x) or self._active(weight) or self._active(bias):
            return False
        if x.meta["val"].dim() != 2 or weight.meta["val"].dim() != 2:
            return False
        name = self._tensor_layer(node, "linear", {"weight": weight, "bias": bias})
        self._emit(node, name, {"op": "linear"}, [x])
        return True

    def _conv_transpose(self, node: fx.Node) -> bool:
        """A transposed convolution (aten.conv_transpose*, or aten.convolution with transposed=True)."""
        a = _bind(node)
        x, weight, bias = a["input"], a["weight"], a["bias"]
        if not self._active(x) or self._active(weight) or self._active(bias):
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
        a = _bind(node)
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
        a = _bind(node)
        left, right, alpha = a["self"], a["other"], a["alpha"]
        if type(alpha) not in (int, float) or alpha != 1 or not (self._active(left) and self._active(right)):
            return False
        out, l, r = node.meta["val"], left.meta["val"], right.meta["val"]
        if not (l.shape == r.shape == out.shape and l.dtype == r.dtype == out.dtype):
            return False
        self._emit(node, self._fresh(node, "add"), {"op": "add"}, [left, right])
        return True

    def _sub(self, node: fx.Node) -> bool:
        """``a - b`` of two layer values of one shape and dtype (as ``_add``)."""
        a = _bind(node)
        left, right, alpha = a["self"], a["other"], a["alpha"]
        if type(alpha) not in (int, float) or alpha != 1 or not (self._active(left) and self._active(right)):
            return False
        out, l, r = node.meta["val"], left.meta["val"], right.meta["val"]
        if not (l.shape == r.shape == out.shape and l.dtype == r.dtype == out.dtype):
            return False
        self._emit(node, self._fresh(node, "sub"), {"op": "sub"}, [left, right])
        return True

    def _affine(self, node: fx.Node) -> bool:
        """``x * c``, ``x / c``, ``x + c``, ``x - c``, ``c - x`` (either order where it commutes) of a layer value
        x and a constant c (a number, or a tensor from parameters, buffers and constants) holding one number per
        channel of x or one for all (LayerScale's ``x * gamma``), keeping x's shape and dtype: an affine layer,
        its weight and bias (affine.arithmetic) stored beside the description."""
        a = _bind(node)
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
        a = _bind(node)
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
        a = _bind(node)
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
        a = _bind(node)
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
            s = _bind(scatter)
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
        inputs = [n for n in inputs if not isinstance(n.meta.get("val"), _SIZES)]  # a symbolic size is no layer
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


def _bind(node: fx.Node) -> dict[str, Any]:
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
