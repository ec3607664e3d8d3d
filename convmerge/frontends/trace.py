"""Derive the graph description (FORMAT.md section 1) from a `torch.nn.Module`.

A state dict alone does not say how layers connect; a model's Python code does.  We trace the
module (on the meta device when it has no weights) with torch.export, which sees shapes and
ATen ops, and fall back to torch.fx, which needs no example input, when export cannot run.  Either
way a submodule that cannot be traced becomes one opaque layer and a note, not a failed model.
Convs and batch norms are named by their qualified module names, so their tensors are found under
the state dict's keys; tensors the description needs beyond those (kernels computed from
parameters, per-channel pad values) come back beside it (`Traced.tensors`).
"""

from __future__ import annotations

import importlib
import itertools
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from torch import nn

from . import trace_export, trace_fx
from .trace_layers import STRUCTURAL_OPS, TraceError, Traced, first_line, is_leaf_class, traced_note

__all__ = ["STRUCTURAL_OPS", "TraceError", "Traced", "build_module", "describe_module", "load_callable"]


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
            raise TraceError(f"--arch {ref}: calling it raised {first_line(exc)}") from exc
    if not isinstance(built, nn.Module):
        kind = type(built).__name__
        raise TraceError(f"--arch {ref}: returned {'an' if kind[:1].lower() in 'aeiou' else 'a'} {kind}, "
                         "not a torch.nn.Module")
    return built.eval()


def describe_module(module: nn.Module, name: str = "model", *, leaves: Sequence[type | str] = (),
                    example_size: Optional[Sequence[int]] = None,
                    example_inputs: Optional[Sequence[torch.Tensor]] = None, runnable: bool = True,
                    fx_first: bool = False, enter: bool = False) -> Traced:
    """The graph description of ``module`` and the tensors it needs beyond the state dict.

    ``fx_first``: torch.fx traces it first, and its graph run once on the example input gives the shapes
    (`trace_fx.describe`); where that trace sees every layer torch.export would (no blind spots: every submodule
    traced, no functional conv, no in-place write another layer sees...), it is the description, at a fraction of an
    export's cost (RepVGG-A0: 0.2 s against 0.8 s).  Otherwise, and without ``fx_first``, torch.export traces it.
    `convmerge.fuse` and `convmerge.check` of a module take it; descriptions that are written down (`save`,
    ``--arch``) come from torch.export, whose layer names and recorded sizes `convmerge.load` was built on.

    ``enter`` (with ``fx_first``): a submodule fx cannot trace does not send the model to torch.export; it stays
    whole (`Traced.untraced`), for `convmerge.fuse` to fuse inside.

    ``runnable``: the trace also serves a module that runs at every size (`Traced.graph_module`, what `fuse`
    rebuilds); without it torch.export traces at the example shape only, which is cheaper for some models.

    ``leaves``: module classes (or class names) to keep as opaque layers without tracing them.
    ``example_inputs``: the inputs torch.export traces with; else ``example_size``, the input's full
    shape or its spatial size (224 per axis when None), with the channels of the first conv or batch
    norm the forward calls (`trace_export.example_input`).  When torch.export fails on the model itself, torch.fx
    traces it instead (``notes`` says so and why).  A module on the meta device is traced without
    its weights: tensors computed from them are then listed in ``missing``, not returned.

    Raises TraceError when a leaf matches none of the modules (a misspelt class), when neither tracer
    gets through the model's own ``forward``, or when a module that should be a conv cannot be one.

    >>> traced = describe_module(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    >>> [layer["op"] for layer in traced.doc["layers"]]
    ['conv2d', 'relu']
    """
    modules = list(module.modules())
    unmatched = [leaf for leaf in leaves if not any(is_leaf_class(m, (leaf,)) for m in modules)]
    if unmatched:
        shown = ", ".join(leaf.__name__ if isinstance(leaf, type) else str(leaf) for leaf in unmatched)
        raise TraceError(f"{name}: --leaf {shown}: no module of that class in it (a class name, plain or "
                         "qualified, or the class itself)")
    if fx_first:
        traced = fx_with_shapes(module, leaves, example_size, example_inputs, enter)
        if traced is not None:
            return traced
    try:
        return trace_export.describe(module, leaves, example_size, example_inputs, symbolic=runnable)
    except Exception as exc:
        export_failed = str(exc) if isinstance(exc, TraceError) else f"torch.export: {first_line(exc)}"
    try:
        traced = trace_fx.describe(module, leaves)
    except TraceError as exc:
        raise TraceError(f"{name}: cannot trace it ({export_failed}; {exc}); pass --graph FILE instead") from exc
    traced.notes.insert(0, f"traced with torch.fx ({export_failed})")
    return traced


def fx_with_shapes(module: nn.Module, leaves: Sequence[type | str], example_size: Optional[Sequence[int]],
                   example_inputs: Optional[Sequence[torch.Tensor]], enter: bool = False) -> Optional[Traced]:
    """torch.fx's description with shapes from one run at the example, where it has no blind spots (and, unless
    ``enter``, no submodule it could not trace); else None, the module as it was."""
    if any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers())):
        return None  # no values to run on: torch.export traces it on fake tensors
    kept = [(m, dict(vars(m)), dict(m._parameters), dict(m._buffers), dict(m._modules)) for m in module.modules()]
    contents = [(d, dict(d)) for m in module.modules() for d in vars(m).values() if type(d) is dict]  # a cache
    tensors = list(itertools.chain(module.parameters(), module.buffers()))
    versions = [t._version for t in tensors]
    stored = [(b, b.clone()) for b in module.buffers()]
    try:
        example, origin = trace_export.example_input(module, example_size, example_inputs)
        traced = trace_fx.describe(module, leaves, example)
        if (traced.blind_spots or (traced.untraced and not enter) or _assigned_proxies(module)
                or any(t._version != v for t, v in zip(tensors, versions))):  # fx ran a write to a buffer for real
            raise TraceError("torch.fx: blind spots")
    except Exception:  # noqa: BLE001 - torch.export, the main tracer, says why where it fails too
        for m, attributes, parameters, buffers, modules in kept:  # what the trace assigned (a Proxy) is undone
            m.__dict__.clear()
            m.__dict__.update(attributes)
            m._parameters.clear(), m._buffers.clear(), m._modules.clear()
            m._parameters.update(parameters), m._buffers.update(buffers), m._modules.update(modules)
        with torch.no_grad():
            for b, value in stored:
                b.copy_(value)
        return None
    finally:  # either way, what fx wrote into a dict (a cache: on success, of values the graph computes) is taken out
        for d, items in contents:
            d.clear()
            d.update(items)
    traced.notes.insert(0, traced_note("torch.fx", example, origin))
    return traced


def _assigned_proxies(module: nn.Module) -> bool:
    """Whether tracing assigned a traced value to a module attribute (``self.state = x.mean()``), or one that
    depends on the inputs into a dict it holds (``self.seen[key] = x.amax()``): fx records no such write, so its graph
    would not compute what the forward does on a later call.  A dict entry computed from the module's tensors alone
    (LeViT's and EfficientViT's ``attention_bias_cache``) is a value the graph computes at every call instead."""
    return any(isinstance(v, torch.fx.Proxy) or (type(v) is dict and any(
        isinstance(u, torch.fx.Proxy) and _reads_inputs(u.node) for u in v.values()))
               for m in module.modules()
               for v in itertools.chain(vars(m).values(), m._parameters.values(), m._buffers.values()))


def _reads_inputs(node: torch.fx.Node) -> bool:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n.op == "placeholder":
            return True
        for m in n.all_input_nodes:
            if m not in seen:
                seen.add(m)
                stack.append(m)
    return False


def _import_module(ref: str, dotted: str) -> Any:
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError as exc:
        if exc.name and (dotted == exc.name or dotted.startswith(exc.name + ".")):
            raise TraceError(f"--arch {ref}: no module named {exc.name!r}") from exc
        raise TraceError(f"--arch {ref}: importing {dotted} raised {first_line(exc)}") from exc
    except (Exception, SystemExit) as exc:
        raise TraceError(f"--arch {ref}: importing {dotted} raised {first_line(exc)}") from exc


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
        raise TraceError(f"--arch {ref}: importing {path} raised {first_line(exc)}") from exc
    finally:
        if directory in sys.path:
            sys.path.remove(directory)
    return module
