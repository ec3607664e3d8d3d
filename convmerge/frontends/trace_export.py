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

The ATen-node mapper is aten_layers.py and the opaque-leaf op leaf_op.py; this module drives the export (example
inputs, the symbolic export, opaque leaves, the runnable graph), long because opaque leaves need their own
export route.
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
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import fx, nn
from torch.export._unlift import _get_codegen
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx.experimental import _config as fx_config
from torch.utils import _pytree as pytree
from torch.utils._sympy.numbers import int_oo

from .aten_layers import Mapper, bind
from .leaf_op import LEAF, OUTPUTS, SESSIONS, STRUCTURES, Slot
from .trace_layers import TraceError, Traced, first_line, is_leaf_class, model_dtype, smallest, traced_note

__all__ = ["describe", "example_input"]

aten = torch.ops.aten
_DEFAULT_SIDE = {0: 1, 1: 224, 2: 224, 3: 32}
"""Spatial size of a guessed example input: 224 fits most image classifiers' fixed heads."""

def describe(module: nn.Module, leaves: Sequence[type | str] = (),
             example_size: Optional[Sequence[int]] = None,
             example_inputs: Optional[Sequence[torch.Tensor]] = None, symbolic: bool = True) -> Traced:
    """The description of ``module`` from torch.export; raises TraceError when the model cannot be
    exported even with its failing submodules as opaque leaves (the caller falls back to fx)."""
    example, origin = example_input(module, example_size, example_inputs)
    opaque_modules = {q: "marked as a leaf" for q, m in module.named_modules() if q and is_leaf_class(m, leaves)}
    session = f"{id(module):x}.{next(SESSIONS)}"
    calls: dict[str, Any] = {}
    raised: list[bool] = []  # whether the symbolic export itself failed (then the fallback need not try it again)
    bounded: list[str] = []  # Traced.bounded
    with _given_output_size(module) as sized:
        once = None if opaque_modules else _export_once(module, example, symbolic=symbolic, raised=raised,
                                                        bounded=bounded)
    if once is not None:
        try:
            program, mapper = once, Mapper(module, once, sized)
            with _hinted(program.graph):
                traced = mapper.describe()
            traced.graph_module = _from(program, module)
        except Exception:  # noqa: BLE001 - a symbolic size where the mapper reads a number: the earlier route
            once = None
    if once is None:
        try:
            with _given_output_size(module) as sized:
                program = _export_with_leaves(module, example, opaque_modules, session, calls)
            mapper = Mapper(module, program, sized)
            traced = mapper.describe()
            kept = {k: (OUTPUTS[k], STRUCTURES[k]) for k in OUTPUTS if k.startswith(session + "/")}
            traced.graph_module = runnable(module, example, program, kept, calls,
                                           tried=bool(raised or bounded) and symbolic, bounded=bounded)
        finally:
            for key in [k for k in OUTPUTS if k.startswith(session + "/")]:
                del OUTPUTS[key], STRUCTURES[key]
    traced.bounded = bounded
    traced.notes[:0] = [traced_note("torch.export", example, origin)] + [
        f"module {q!r} ({type(module.get_submodule(q)).__name__}) is opaque: {why}"
        for q, why in opaque_modules.items() if q in mapper.leaves_seen]
    with _hinted(program.graph):
        traced.example, traced.smallest = example, _smallest(program.graph, example[0].dim())
    return traced


@contextlib.contextmanager
def _given_output_size(module: nn.Module) -> Iterator[set[str]]:
    """The transposed-conv modules called with an `output_size` while it lasts: the output_padding an export at
    fixed sizes records for them holds at the traced size only (at another, `output_size` picks another), so the
    mapper leaves them opaque."""
    found: set[str] = set()
    handles = []
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.conv._ConvTransposeNd):
            def hook(m: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
                if (len(args) > 1 and args[1] is not None) or kwargs.get("output_size") is not None:
                    found.add(name)
            handles.append(sub.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


def _export_once(module: nn.Module, example: tuple[torch.Tensor, ...], symbolic: bool = True,
                 raised: Optional[list[bool]] = None, bounded: Optional[list[str]] = None
                 ) -> Optional[torch.export.ExportedProgram]:
    """One export at symbolic batch and spatial sizes that serves both the description (read at the sizes
    it was traced at, `_hinted`) and the fused module (which then runs at any size the model allows), with
    no `run_decompositions`: the export's own graph, its in-place ops made out of place (`_out_of_place`).
    None where that does not hold (an export that needs fixed sizes, an in-place write into a view or an
    input, a batch norm in training mode): the caller then exports at the traced shape, decomposes and
    exports again at symbolic sizes for the module, as before.  Not ``symbolic`` (a description only, for
    `check`): at the example shape, which some models export much faster (EfficientViT-M0: 3 s against 24 s).
    ``raised`` gets True where the export itself failed, ``bounded`` why where it holds up to some size only."""
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
    if symbolic and _bounded(program, bounded):
        return None
    if not _out_of_place(program.graph_module):
        return None
    return program


_DROPOUTS = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
             aten.feature_alpha_dropout.default}


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
        if node.target is aten.batch_norm.default and bind(node)["training"]:
            return False
        if node.target in _DROPOUTS and not bind(node)["train"]:  # seeded, so never dead code: the identity
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
        gm = _module(program)
        _general(gm, module, {})
        return gm, names

    return build


def _smallest(graph: fx.Graph, rank: int) -> tuple[int, ...]:
    """Per spatial axis, the smallest size above 1 a value of that rank has in the traced graph."""
    return smallest([v.shape for node in graph.nodes if isinstance(v := node.meta.get("val"), torch.Tensor)], rank)


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
             leaves: dict[str, Any], calls: dict[str, Any], tried: bool = False,
             bounded: Optional[list[str]] = None) -> Callable[[bool], tuple[fx.GraphModule, dict[str, str]]]:
    """A builder of a runnable module of the traced graph, and the names its nodes have there.

    With ``dynamic``, the model is exported again with symbolic batch and spatial sizes, so the module
    runs at any size; its tensor ops pair with the traced graph's one to one, in order (it only adds
    shape arithmetic, which shifts the nodes' names).  Else (or where that export fails or does not
    pair up) it is the traced graph.  Either way the shape guards are left out (the fused module is
    checked end to end instead) and each opaque leaf calls its module again.  ``leaves`` are the leaf
    calls' recorded outputs, ``calls`` their arguments (`Slot` where a tensor goes).  ``tried``: the same
    export at symbolic sizes already failed (without leaves): it is not tried again.  ``bounded`` gets why
    where that export holds up to some size only (`Traced.bounded`).
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
            OUTPUTS[key], STRUCTURES[key] = outputs, structure
        try:
            with _quiet(), _eval(module), _patched(module, {q: _exporting(q, session, {}) for q in qualnames}):
                with generic_sizes():
                    program_again = torch.export.export(module, batch, dynamic_shapes=dims, strict=False)
                program_again = program_again.run_decompositions({})  # torch warns about its own pytree code here
            names = _pair_nodes(program.graph, program_again.graph)
            if names is not None and not _bounded(program_again, bounded):
                again[0] = (program_again, names)
        except Exception:  # noqa: BLE001 - code that needs fixed sizes: the traced graph it is
            pass
        finally:
            for key in leaves:
                OUTPUTS.pop(key, None), STRUCTURES.pop(key, None)
        return again[0]

    def build(dynamic: bool = True) -> tuple[fx.GraphModule, dict[str, str]]:
        found = general() if dynamic else None
        gm, names = (_module(found[0]), found[1]) if found is not None else (
            _module(program), {n.name: n.name for n in program.graph.nodes})
        moved = _general(gm, module, calls)
        return gm, {k: moved.get(v, v) for k, v in names.items()}

    return build


def _bounded(program: torch.export.ExportedProgram, why: Optional[list[str]]) -> bool:
    """Whether the export at symbolic sizes holds up to some size only (adding why to ``why``): the model branched
    on a size (``if x.shape[-1] > 8``) and the graph follows the example's branch.  Its guards go (`_general`), so
    at a larger size it would compute the example's branch where the model takes the other, unseen by the
    end-to-end check (its sizes are the example's and smaller ones)."""
    upper = [vr.upper for vr in program.range_constraints.values() if vr.upper != int_oo]
    if upper and why is not None and not why:
        why.append(f"the model branches on its input's size (its graph holds up to size {min(upper)} only)")
    return bool(upper)


_LIFTED = {InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR}


def _module(program: torch.export.ExportedProgram) -> fx.GraphModule:
    """The program's graph as a module holding its own tensors (the model's, shared), as `program.module()` builds
    it, without what that adds for a user of the export alone: the input guards `_general` removes anyway, a
    second copy of the module hierarchy, the graph copied twice (mobileone_s0: 0.5-0.7 s of CPU against 0.15).
    `program.module()` itself where the program is more than parameters, buffers and constants in, outputs out
    (a mutated buffer, an effect token, a script object)."""
    sig = program.graph_signature
    if not all(s.kind in _LIFTED or s.kind is InputKind.USER_INPUT for s in sig.input_specs) or any(
            s.kind is not OutputKind.USER_OUTPUT for s in sig.output_specs):
        with _quiet():
            return program.module()
    graph = copy.deepcopy(program.graph)
    tensors: dict[str, Any] = {}
    for node, spec in zip(graph.find_nodes(op="placeholder"), sig.input_specs):
        if spec.kind is InputKind.USER_INPUT:
            continue
        stored = program.constants if spec.kind is InputKind.CONSTANT_TENSOR or spec.persistent is False else (
            program.state_dict)
        tensors[spec.target] = stored[spec.target]
        with graph.inserting_after(node):
            attr = graph.get_attr(spec.target)
        node.replace_all_uses_with(attr)
        attr.meta = node.meta
        graph.erase_node(node)
    for node in graph.find_nodes(op="get_attr"):  # a higher-order op's subgraph (`torch.no_grad()` in forward)
        if node.target not in tensors:
            tensors[node.target] = operator.attrgetter(node.target)(program.graph_module)
    signature = program.module_call_graph[0].signature
    graph._codegen = _get_codegen(program.call_spec.in_spec, program.call_spec.out_spec,
                                  signature.forward_arg_names if signature else None)
    return fx.GraphModule(tensors, graph)


def _general(gm: fx.GraphModule, root: nn.Module, calls: dict[str, Any]) -> dict[str, str]:
    """Make ``gm`` general: no shape guards, each opaque leaf a call of its module again.  Returns the new
    names of the nodes that held a leaf's outputs."""
    graph = gm.graph
    moved: dict[str, str] = {}
    for node in list(graph.nodes):
        if (node.op == "call_module" and node.target == "_guards_fn") or (
                node.op == "call_function" and node.target in _GUARDS and not node.users):
            graph.erase_node(node)
        elif node.op == "call_function" and node.target is LEAF:
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
    fill = lambda v: next(tensors) if isinstance(v, Slot) else v  # noqa: E731
    args, kwargs = pytree.tree_map(fill, (args, kwargs), is_leaf=lambda v: isinstance(v, Slot))
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
            OUTPUTS[key] = [(tuple(t.shape), t.dtype, device, k) for t, k in zip(tensors, like)]
            STRUCTURES[key] = ([Slot() if isinstance(t, torch.Tensor) else t for t in flat], spec)
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
    gets each call's arguments (`Slot` for each tensor) and where its output holds each tensor."""
    counts: Counter[str] = Counter()

    def forward(*args: Any, **kwargs: Any) -> Any:
        key = f"{session}/{qualname}#{counts[qualname]}"
        counts[qualname] += 1
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = iter(LEAF(inputs, key))
        flat, spec = STRUCTURES[key]
        out = pytree.tree_unflatten([next(outputs) if isinstance(t, Slot) else t for t in flat], spec)
        template = pytree.tree_map_only(torch.Tensor, lambda t: Slot(), (args, kwargs))
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
