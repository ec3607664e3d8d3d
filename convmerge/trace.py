"""Derive the graph description (FORMAT.md section 1) from a `torch.nn.Module` with torch.fx.

A state dict alone does not say how layers connect; a model's Python code does.  We build the
module (on the meta device: no weights needed), trace it symbolically, and write one layer per
fx node.  Convs and batch norms become structural layers named by their qualified module name,
so their tensors are found under the state dict's keys; everything else is an opaque op that
convmerge keeps and never merges across.  When in doubt, a layer is opaque: a wrong structural
layer would silently produce a wrong merged model, a needless opaque one only misses a merge.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from .modules import PaddedConv1d, PaddedConv2d, PaddedConv3d, spec_of
from .spec import SpecError, padding_fields

STRUCTURAL_OPS = frozenset({"conv1d", "conv2d", "conv3d", "batch_norm", "identity", "dropout"})

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PADDED_CONVS = (PaddedConv1d, PaddedConv2d, PaddedConv3d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_STRUCTURAL = _CONVS + _PADDED_CONVS + _BATCH_NORMS + _DROPOUTS + (nn.Identity,)


class TraceError(ValueError):
    """A model that cannot be imported, built or traced; the message names it and what to do."""


def load_callable(ref: str) -> Callable[..., nn.Module]:
    """The callable behind ``--arch``: ``package.module:callable`` or ``path/to/file.py:callable``.

    A file is imported with its directory on ``sys.path`` only while it runs, so it can import
    its sibling files without changing where later imports look; a module is looked for in the
    working directory first, as ``python -m`` does, and that entry is removed again afterwards.
    """
    source, _, attr = ref.rpartition(":")
    if not source or not attr:
        raise TraceError(f"--arch {ref}: expected MODULE:CALLABLE or FILE.py:CALLABLE")
    if source.endswith(".py") or "/" in source or os.sep in source:
        module, where = _import_file(ref, source), source
    else:
        cwd = os.getcwd()
        added = cwd not in sys.path and "" not in sys.path
        if added:
            sys.path.insert(0, cwd)
        try:
            module, where = _import_module(ref, source), f"module {source}"
        finally:
            if added and cwd in sys.path:
                sys.path.remove(cwd)
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise TraceError(f"--arch {ref}: no attribute {attr!r} in {where}")
        target = getattr(target, part)
    if not callable(target):
        raise TraceError(f"--arch {ref}: {attr!r} in {where} is a {type(target).__name__}, not a callable")
    return target


def build_module(ref: str) -> nn.Module:
    """Call ``--arch``'s callable with no arguments and return the module in eval mode.

    It is built on the meta device when the callable allows it (no memory, no random init:
    the weights come from the file), on the CPU otherwise.
    """
    factory = load_callable(ref)
    try:
        with torch.device("meta"):
            built = factory()
    except Exception:
        try:
            built = factory()
        except Exception as exc:
            raise TraceError(f"--arch {ref}: calling it raised {_first_line(exc)}") from exc
    if not isinstance(built, nn.Module):
        raise TraceError(f"--arch {ref}: returned a {type(built).__name__}, not a torch.nn.Module")
    return built.eval()


def describe_module(module: nn.Module, name: str = "model") -> dict[str, Any]:
    """The graph description of ``module``: one layer per fx node, in the graph's (topological) order."""
    return trace_module(module, name)[0]


def trace_module(module: nn.Module, name: str = "model") -> tuple[dict[str, Any], fx.Graph, dict[str, fx.Node]]:
    """The description, the fx graph it came from, and the node computing each layer (and input) name."""
    try:
        graph = _StructuralTracer().trace(module)
    except Exception as exc:
        raise TraceError(
            f"{name}: torch.fx cannot trace it ({_first_line(exc)}); pass --graph FILE instead"
        ) from exc
    names, shared = layer_names(graph), _shared_targets(graph)
    layers = []
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        try:
            layers.append(describe_node(node, module, names, shared))
        except SpecError as exc:
            raise TraceError(f"{name}: layer {names[node]}: {exc}; pass --graph FILE instead") from exc
    output = next(node for node in graph.nodes if node.op == "output")
    doc = {
        "version": 1,
        "inputs": [names[node] for node in graph.nodes if node.op == "placeholder"],
        "layers": layers,
        "outputs": _input_names(output, names),
    }
    return doc, graph, {n: node for node, n in names.items()}


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
        candidate, k = node.name, 1
        while candidate in used or (candidate != node.name and candidate in fx_names):
            candidate, k = f"{node.name}_{k}", k + 1
        names[node] = candidate
        used.add(candidate)
    return names


def describe_node(node: fx.Node, root: nn.Module, names: dict[fx.Node, str], shared: set[str]) -> dict[str, Any]:
    """One layer of the description; ``shared`` holds the modules whose tensors are used elsewhere too."""
    fields: dict[str, Any]
    if node.op == "call_module":
        module = root.get_submodule(str(node.target))
        if node.target in shared:
            fields = {"op": "shared_" + type(module).__name__.lower()}
        else:
            fields = module_fields(module)
    elif node.op == "get_attr":
        fields = {"op": "get_attr"}
    elif node.op == "call_method":
        fields = {"op": _opaque(str(node.target))}
    else:
        fields = {"op": _opaque(getattr(node.target, "__name__", type(node.target).__name__))}
    producers = _input_names(node, names)
    wiring = {"input": producers[0]} if len(producers) == 1 else {"inputs": producers}
    return {"name": names[node], "op": fields.pop("op"), **wiring, **fields}


def module_fields(module: nn.Module) -> dict[str, Any]:
    """``op`` and the hyperparameters of a module called once.

    Only modules that compute what their op means are structural: a conv or norm subclass that
    overrides ``forward`` (weight standardisation, fake quantisation...) is opaque.
    """
    if _is_plain(module, _CONVS + _PADDED_CONVS):
        return {"op": f"conv{len(module.kernel_size)}d", **padding_fields(spec_of(module))}
    if _is_plain(module, _BATCH_NORMS):
        if module.track_running_stats and module.running_mean is not None:
            return {"op": "batch_norm", "eps": float(module.eps), "affine": bool(module.affine)}
        return {"op": "batch_norm_train"}
    if _is_plain(module, (nn.Identity,)):
        return {"op": "identity"}
    if _is_plain(module, _DROPOUTS):
        return {"op": "dropout"}
    return {"op": _opaque(type(module).__name__.lower())}


class _StructuralTracer(fx.Tracer):
    """Keeps every structural module whole, ours and users' subclasses included (fx's default
    only keeps modules defined inside ``torch.nn`` whole and traces into the rest)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _is_plain(m, _STRUCTURAL) or super().is_leaf_module(m, module_qualified_name)


def _is_plain(module: nn.Module, classes: tuple[type, ...]) -> bool:
    """An instance of one of ``classes`` that computes what that class computes."""
    if not isinstance(module, classes):
        return False
    cls = type(module)
    if cls.forward not in {c.forward for c in classes}:
        return False
    if isinstance(module, _CONVS):
        return cls._conv_forward in {c._conv_forward for c in _CONVS}
    return True


def _shared_targets(graph: fx.Graph) -> set[str]:
    """Modules called more than once, or whose tensors the graph also reads directly: merging them
    would change the other use."""
    calls = Counter(str(node.target) for node in graph.nodes if node.op == "call_module")
    read = [str(node.target) for node in graph.nodes if node.op == "get_attr"]
    return {t for t, n in calls.items() if n > 1 or any(r.startswith(t + ".") for r in read)}


def _input_names(node: fx.Node, names: dict[fx.Node, str]) -> list[str]:
    """The layer names among a node's args and kwargs, flattened, in order."""
    found: list[str] = []

    def collect(producer: fx.Node) -> fx.Node:
        found.append(names[producer])
        return producer

    fx.node.map_arg((node.args, node.kwargs), collect)
    return found


def _opaque(op: str) -> str:
    """An opaque op name that cannot be mistaken for a structural one (``F.conv2d`` is not a
    layer with tensors ``NAME.weight``)."""
    return "opaque_" + op if op in STRUCTURAL_OPS else op


def _import_module(ref: str, dotted: str) -> Any:
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError as exc:
        if exc.name and (dotted == exc.name or dotted.startswith(exc.name + ".")):
            raise TraceError(f"--arch {ref}: no module named {exc.name!r}") from exc
        raise TraceError(f"--arch {ref}: importing {dotted} raised {_first_line(exc)}") from exc
    except (Exception, SystemExit) as exc:
        raise TraceError(f"--arch {ref}: importing {dotted} raised {_first_line(exc)}") from exc


def _import_file(ref: str, path: str) -> Any:
    if not os.path.isfile(path):
        raise TraceError(f"--arch {ref}: no file {path}")
    stem = os.path.splitext(os.path.basename(path))[0]
    module_name = f"_convmerge_arch_{stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise TraceError(f"--arch {ref}: {path} is not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    directory = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, directory)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        sys.modules.pop(module_name, None)
        raise TraceError(f"--arch {ref}: importing {path} raised {_first_line(exc)}") from exc
    finally:
        if directory in sys.path:
            sys.path.remove(directory)
    return module


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
