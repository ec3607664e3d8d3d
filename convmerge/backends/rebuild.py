"""A module that runs the fused graph: the user's traced graph with each merged part replaced by one conv.

The plan speaks in layer names; the trace knows which fx node computes each name.  Each applied
merge becomes a standard `nn.Conv1d/2d/3d` (an `nn.Linear` for linear layers) holding exactly the plan's
verified tensors, called on the node its part read (after an explicit `F.pad` where the padding is asymmetric,
which a Conv*d cannot express); every use of the part's output reads the conv instead, and the layers no one
reads any more are removed.  The result is a `torch.fx.GraphModule`, whatever shape the original
forward had (a RepVGG block's add has no module to swap, so swapping submodules cannot do this).
It computes the inference form (batch norms folded with their running statistics), as traced.
"""

from __future__ import annotations

from typing import Any, Container, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..engine import transpose_tensors
from ..frontends.modules import to_module
from ..engine.plan import Plan, Unit
from ..maths.spec import ConvSpec
from ..frontends.trace_fx import mutates
from ..frontends.trace_layers import TraceError, Traced

__all__ = ["fused_module"]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_PAD_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def fused_module(module: nn.Module, plan: Optional[Plan], traced: Traced, dynamic: bool = True,
                 only_shape: Optional[InputShapeCheck] = None) -> FusedModule:
    """`traced` comes from a deep copy of `module` (the graph module it builds may share its submodules);
    without a ``plan``, the traced graph as it is (nothing merged).

    ``dynamic``: from the graph exported at symbolic sizes where there is one (`Traced.graph_module`);
    ``only_shape``: a check the module's inputs must pass first (the shapes a static graph runs at)."""
    if traced.graph_module is None:
        raise TraceError("the trace holds no runnable graph to rebuild the fused module from")
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    applied = plan.applied if plan is not None else []
    wanted = {n for u in applied for n in (u.input, u.output)}
    for general in ((True, False) if dynamic else (False,)):  # the graph exported again keeps the names, or should
        gm, renamed = traced.graph_module(general)
        graph = gm.graph
        by_name = {node.name: node for node in graph.nodes}
        nodes = {layer: by_name[renamed[name]] for layer, name in traced.nodes.items()
                 if renamed.get(name) in by_name}
        placeholders = [node for node in graph.nodes if node.op == "placeholder"]
        nodes.update(zip(traced.doc["inputs"], placeholders))  # inputs may be renamed in the runnable graph
        if wanted <= set(nodes):
            break
    else:
        missing = sorted(wanted - set(nodes))
        raise TraceError(f"the traced graph has no node for {', '.join(missing[:3])}: cannot rebuild the module")
    replaced = {n for u in applied for n in u.layers}
    current = dict(nodes)  # a merged output is read through its new conv by later merges too
    later: list[tuple[str, nn.Module, fx.Node]] = []  # convs that take the place of a replaced layer's module
    for unit in applied:
        source, output = current[unit.input], nodes[unit.output]
        target = _free_name(gm, unit.name, replaced)
        conv = _conv(unit).to(device)
        with graph.inserting_before(output):
            x = source
            if isinstance(unit.spec, ConvSpec) and not unit.spec.symmetric:
                pads = [p for a in reversed(unit.spec.axes) for p in a.pad]
                x = graph.call_function(F.pad, (x, pads), {"mode": _PAD_MODE[unit.spec.padding_mode]})
            first = target in replaced and _has_module(gm, target)  # its old nodes (a BN's running_mean) go first
            if not first:
                _set_module(gm, target, conv)
            new = graph.call_module(target, (x,))
            if first:
                later.append((target, conv, new))
        output.replace_all_uses_with(new)
        current[unit.output] = new
    inside = {nodes[n] for n in replaced if n in nodes}  # an in-place join inside a merged part: no one else sees it
    graph.eliminate_dead_code(lambda node: node.is_impure() or (mutates(node, gm) and node not in inside))  # `y += x`
    read = _attributes_read(graph)
    for target, conv, new in later:
        if _reads_tensors_of(read, target):  # a replaced op still runs: torch.export's size arithmetic
            new.target = target = _suffixed(gm, target)     # reads its output (tf_efficientnet_b0's 'same' pads)
        _set_module(gm, target, conv)
    _activations_in_place(gm)
    sized = sized_merges(plan, len(placeholders)) if plan is not None else None
    checks = [c for c in (sized, only_shape) if c is not None]
    if checks:
        _only_at(gm, checks[0] if len(checks) == 1 else InputShapeCheck(checks[-1].shapes, False, checks[-1].why))
    elif traced.example:
        _only_at(gm, InputRankCheck([t.dim() for t in traced.example]))
    graph.lint()
    gm.delete_all_unused_submodules()
    return FusedModule(gm, graph)


class FusedModule(fx.GraphModule):
    """The fused graph: a `torch.fx.GraphModule` computing the inference form of the traced model (batch
    norms folded with their running statistics, dropout removed).  `eval()` returns it, `train()` says why
    it cannot; it pickles (`torch.save` / `torch.load(..., weights_only=False)`, convmerge installed)."""

    def __init__(self, root: nn.Module, graph: fx.Graph, class_name: str = "FusedModule") -> None:
        super().__init__(root, graph, class_name)
        self._tracer_cls = None  # the exporter's tracer cannot be built again on unpickling; fx's own can
        self._tracer_extras = {}

    def __reduce__(self) -> tuple[Any, ...]:
        _, (body, import_block) = super().__reduce__()
        return (_unpickle, (body, import_block))

    def train(self, mode: bool = True) -> FusedModule:
        if mode:
            raise RuntimeError("a fused module computes the inference form (batch norms folded with their running "
                               "statistics, dropout removed); it cannot be put in training mode: train the original")
        return super().train(False)


def _unpickle(body: dict[str, Any], import_block: str) -> FusedModule:
    from torch.fx.graph_module import _deserialize_graph_module, _forward_from_src

    forward = _forward_from_src(import_block + body["_code"], {})
    return _deserialize_graph_module(forward, body, graph_module_cls=FusedModule)  # type: ignore[return-value]


_aten = torch.ops.aten
_IN_PLACE = {_aten.relu.default: _aten.relu_.default, _aten.hardtanh.default: _aten.hardtanh_.default,
             _aten.leaky_relu.default: _aten.leaky_relu_.default, _aten.hardswish.default: _aten.hardswish_.default,
             _aten.silu.default: _aten.silu_.default}
"""Activations torchvision's own nets run in place, in training too (autograd supports them so)."""
_FRESH = {_aten.convolution.default, _aten.conv1d.default, _aten.conv2d.default, _aten.conv3d.default,
          _aten.add.Tensor}
"""Ops whose result is a new tensor that aliases nothing."""


def _activations_in_place(gm: fx.GraphModule) -> None:
    """An exported graph runs `nn.ReLU6(inplace=True)` as an out-of-place hardtanh, which allocates and
    writes a second tensor: MobileNetV2's 35 of them took 17 ms per 10 runs against 8 ms in place.  Where an
    activation is the only reader of a conv's or an add's fresh result, it runs in place again."""
    for node in gm.graph.nodes:
        src = node.args[0] if node.op == "call_function" and node.target in _IN_PLACE and node.args else None
        if isinstance(src, fx.Node) and len(src.users) == 1 and _differentiable_in_place(node) and (
                (src.op == "call_module" and isinstance(gm.get_submodule(src.target), nn.modules.conv._ConvNd))
                or (src.op == "call_function" and src.target in _FRESH)):
            node.target = _IN_PLACE[node.target]


def _differentiable_in_place(node: fx.Node) -> bool:
    """Autograd refuses an in-place leaky relu of negative slope (its gradient needs the input it overwrote)."""
    if node.target is not _aten.leaky_relu.default:
        return True
    slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
    return isinstance(slope, (int, float)) and slope > 0


def _only_at(gm: fx.GraphModule, check: nn.Module) -> None:
    """Call ``check`` on the inputs first."""
    graph = gm.graph
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    name = "input_shape_check" if isinstance(check, InputShapeCheck) else "input_rank_check"
    gm.add_module(name, check)
    with graph.inserting_after(inputs[-1]):
        graph.call_module(name, tuple(inputs))


class InputRankCheck(nn.Module):
    """Raises ValueError unless every tensor input has the rank the module was traced at: at another rank the
    original's layers may mean other things (a Linear maps the last axis, a BatchNorm1d axis 1), which a module
    traced at [N, C] does not compute."""

    _is_impure = True  # no output, still run

    def __init__(self, ranks: Sequence[int]) -> None:
        super().__init__()
        self.ranks = list(ranks)

    def forward(self, *inputs: Any) -> None:
        check_rank(inputs, self.ranks, "this fused module")


def check_rank(inputs: Sequence[Any], ranks: Sequence[int], what: str) -> None:
    """Raise ValueError where a tensor input's rank is not the one `what` was traced at (the fused module's check
    and `convmerge.load`'s)."""
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    for x, want in zip(tensors, ranks):
        if x.dim() != want:
            raise ValueError(f"{what} was traced on inputs of rank {want} and runs only at that rank (at another the "
                             "original's layers may mean other things: a Linear maps the last axis, a per-channel "
                             f"op axis 1); it got rank {x.dim()}: trace again on inputs of that rank")


class InputShapeCheck(nn.Module):
    """Raises ValueError unless every tensor input has the shape (``spatial``: the spatial size) the module
    was built for (a module, so that the check stays one call when a pickled fused module is traced again)."""

    _is_impure = True  # no output, still run

    def __init__(self, shapes: Sequence[Sequence[int]], spatial: bool, why: str) -> None:
        super().__init__()
        self.shapes, self.spatial, self.why = [tuple(s) for s in shapes], spatial, why

    def forward(self, *inputs: Any) -> None:
        tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
        for x, want in zip(tensors, self.shapes):
            got = tuple(x.shape[2:]) if self.spatial else tuple(x.shape)
            if got != want:
                kind = "input size" if self.spatial else "input shape"
                raise ValueError(f"this fused module runs only at {kind} {'x'.join(map(str, want))} ({self.why}); "
                                 f"it got {'x'.join(map(str, got))}")


def sized_merges(plan: Plan, inputs: int) -> Optional[InputShapeCheck]:
    """The check of a plan with merges exact only at the input size they were chosen for: elsewhere
    they would compute something else, silently."""
    sized = [u.name for u in plan.applied if not u.every_size]
    if not (sized and plan.input_size):
        return None
    shown = ", ".join(sized[:3]) + (", ..." if len(sized) > 3 else "")
    return InputShapeCheck([plan.input_size] * inputs, True, f"it holds merges exact only at that size: {shown}; "
                           "fuse again at another size, or without input_size for merges exact at every size")


def _conv(unit: Unit) -> nn.Module:
    spec, stored = unit.spec, unit.stored
    if not isinstance(spec, ConvSpec):
        return transpose_tensors.to_module(stored)  # a conv_transpose with a batch norm folded in
    if spec.ndim == 0:
        return to_module(stored)  # an nn.Linear
    symmetric = spec.symmetric
    conv = _CONV[spec.ndim](spec.in_channels, spec.out_channels, spec.kernel_size, stride=spec.stride,
                            padding=tuple(a.pad[0] for a in spec.axes) if symmetric else 0,
                            dilation=spec.dilation, groups=spec.groups, bias=stored.bias is not None,
                            padding_mode=spec.padding_mode if symmetric else "zeros",
                            dtype=stored.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(stored.weight)
        if stored.bias is not None:
            conv.bias.copy_(stored.bias)
    return conv


def _free_name(gm: fx.GraphModule, name: str, replaced: set[str]) -> str:
    """The merged conv's attribute path: its layer name where that is a module being replaced or a free
    attribute of an existing module; otherwise a flat, suffixed form of it."""
    parent, _, leaf = name.rpartition(".")
    try:
        owner = gm.get_submodule(parent) if parent else gm
    except AttributeError:
        owner = None
    if owner is not None and ((name in replaced and hasattr(owner, leaf)) or
                              (leaf.isidentifier() and not hasattr(owner, leaf))):
        return name
    return _suffixed(gm, "".join(c if c.isalnum() or c == "_" else "_" for c in name) or "merged")


def away_from(gm: fx.GraphModule, old: Mapping[str, nn.Module]) -> None:
    """Move each module the graph calls at a path where the traced module (`old`: its modules by path) had another
    one (a merged conv in its first layer's place) to a path it never had, so that code outside the graph reading
    the old path (``self.block.conv.weight``) fails instead of reading the merged weights; where the graph reads a
    tensor of the old module (its dtype), the old module stays there."""
    moved: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in old and gm.get_submodule(node.target) is not old[node.target]:
            target = str(node.target)
            if target not in moved:
                new = _suffixed(gm, target + "_merged", avoid=old)
                gm.add_submodule(new, gm.get_submodule(target))
                moved[target] = new
            node.target = moved[target]
    read = _attributes_read(gm.graph)  # ``self.proj.weight.dtype``
    for target in moved:
        if _reads_tensors_of(read, target):
            _set_module(gm, target, old[target])  # its own tensors, as they were
        else:
            gm.delete_submodule(target)
    if moved:
        gm.recompile()


def _suffixed(gm: fx.GraphModule, base: str, avoid: Container[str] = ()) -> str:
    base = base.replace(".", "_")
    cand, k = base, 1
    while hasattr(gm, cand) or cand in avoid:
        cand, k = f"{base}_{k}", k + 1
    return cand


def _attributes_read(graph: fx.Graph) -> set[str]:
    return {str(n.target) for n in graph.nodes if n.op == "get_attr"}


def _reads_tensors_of(read: set[str], target: str) -> bool:
    """Whether the graph (`_attributes_read`) still reads a tensor of the module at `target`."""
    return any(r.startswith(target + ".") for r in read)


def _has_module(gm: fx.GraphModule, target: str) -> bool:
    try:
        gm.get_submodule(target)
    except AttributeError:
        return False
    return True


def _set_module(gm: fx.GraphModule, target: str, conv: nn.Module) -> None:
    parent, _, leaf = target.rpartition(".")
    owner = gm.get_submodule(parent) if parent else gm
    setattr(owner, leaf, conv)
