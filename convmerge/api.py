"""The Python API for PyTorch users: check a model, fuse a module, save one self-describing."""

from __future__ import annotations

import copy
import io as _io
import itertools
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Optional, Union

import torch
from torch import nn

from .backends import endtoend, rebuild
from . import io, model, within
from .frontends import trace, trace_export
from .graph import Graph, parse
from .engine.plan import VerificationError
from .options import Options


def _check_args(fn: str, subject: Any, *, input_size: Any = None, policy: Any = "cheaper", leaves: Any = (),
                graph: Any = None, arch: Any = None) -> Options:
    """Python callers' arguments, refused in one line naming the argument; returns the options they give."""
    if fn == "check" and not isinstance(subject, (nn.Module, str, os.PathLike)):
        raise TypeError(f"convmerge.check takes an nn.Module or a path to a .safetensors file, "
                        f"not {type(subject).__name__}")
    if fn != "check" and not isinstance(subject, nn.Module):
        if isinstance(subject, (str, os.PathLike)):
            raise TypeError(f"convmerge.{fn} takes a torch.nn.Module, not a path; for a file, run `convmerge fuse "
                            "FILE` (or build the module with convmerge.api.load_module(arch, path)); "
                            "convmerge.check takes a path")
        raise TypeError(f"convmerge.{fn} takes a torch.nn.Module, not {type(subject).__name__}")
    if isinstance(subject, nn.Module):
        _not_meta(fn, subject)
    for name, value in (("graph", graph), ("arch", arch)):
        if value is not None and not isinstance(value, (str, os.PathLike) if name == "graph" else str):
            kind = "a path (str or os.PathLike)" if name == "graph" else "a 'module:callable' string"
            raise TypeError(f"convmerge.{fn}: {name} must be {kind}, not {type(value).__name__} {value!r}")
    return Options.of(f"convmerge.{fn}", policy=policy, input_size=input_size, leaves=leaves)


def _not_meta(fn: str, module: nn.Module) -> None:
    """A module built on the meta device has shapes but no values: nothing to judge or merge."""
    for name, t in itertools.chain(module.named_parameters(), module.named_buffers()):
        if t.is_meta:
            raise ValueError(f"convmerge.{fn}: tensor {name!r} is on the meta device (no values); "
                             "load the weights first, e.g. module.to_empty(device='cpu') then load_state_dict")


def check(
    model_or_path: Union[nn.Module, str, os.PathLike],
    *,
    graph: Optional[str] = None,
    arch: Optional[str] = None,
    input_size: Optional[Sequence[int]] = None,
    policy: str = "cheaper",
    leaves: Sequence[Union[type, str]] = (),
) -> dict[str, Any]:
    """The report (same content as `convmerge check --json`) for a module or a safetensors file."""
    options = _check_args("check", model_or_path, input_size=input_size, policy=policy, leaves=leaves, graph=graph,
                          arch=arch)
    if isinstance(model_or_path, nn.Module):
        g, tensors, _ = _describe(model_or_path, options.leaves, options.input_size, runnable=False)
        report = model.analyze(g, tensors, options).report()
        report.description = "traced module"
    else:
        names = tuple(c if isinstance(c, str) else c.__name__ for c in options.leaves)
        report = model.check_file(os.fspath(model_or_path), replace(options, leaves=names), graph_file=graph,
                                  arch=arch)
    return report.to_dict()


def fuse(module: nn.Module, *, input_size: Optional[Sequence[int]] = None, policy: str = "cheaper",
         leaves: Sequence[Union[type, str]] = (),
         example_inputs: Optional[Sequence[torch.Tensor]] = None) -> nn.Module:
    """A new module computing the same function with merged convs; `module` is left untouched.

    The result (a `torch.fx.GraphModule`, `rebuild.FusedModule`) runs the traced graph with each merged
    chain or region replaced by one standard `nn.Conv*d` holding the verified merged weights.  It is traced
    on ``example_inputs``, else on a random input of spatial size ``input_size`` (224 per axis when None)
    with the channels of the first conv the module calls.  Before it is returned it is run against the
    original in float64 on random inputs at the traced shape and at others where the original runs
    (`endtoend`): any difference beyond rounding raises `VerificationError` and returns nothing.
    ``leaves``: module classes (or class or qualified names) kept opaque, untraced.
    """
    options = _check_args("fuse", module, input_size=input_size, policy=policy, leaves=leaves)
    g, tensors, traced = _describe(module, options.leaves, options.input_size, example_inputs, enter=True)
    plan = model.analyze(g, tensors, options)
    if traced.tracer == "torch.fx" and traced.example:  # the fast route, checked as every module is: where the
        try:                                             # module cannot be built or fails, torch.export traces it
            return _fused_and_checked(module, plan, traced, options, only_general=True)
        except (VerificationError, trace.TraceError):
            g, tensors, traced = _describe(module, options.leaves, options.input_size, example_inputs, fx_first=False)
            plan = model.analyze(g, tensors, options)
    return _fused_and_checked(module, plan, traced, options)


def _fused_and_checked(module: nn.Module, plan: Any, traced: trace.Traced, options: Options,
                       only_general: bool = False) -> nn.Module:
    """The fused module, checked end to end: the graph for every shape where the trace gives one, else
    the traced graph, which then runs only at the traced shape (and says so; not ``only_general``)."""
    example = traced.example or trace_export.example_input(module, plan.input_size)[0]
    cases = endtoend.Cases(module, example, fixed_size=rebuild.sized_merges(plan, len(example)) is not None,
                           smallest=traced.smallest)
    fused = rebuild.fused_module(module, plan, traced)
    within.fuse_within(fused, traced.untraced, replace(options, input_size=None))
    failure = traced.bounded[0] if traced.bounded else cases.compare(fused)
    if failure is None:
        return fused
    if only_general:
        raise VerificationError(f"the fused module does not compute what the module does: {failure}")
    unmerged = rebuild.fused_module(module, None, traced)
    if traced.bounded or cases.compare(unmerged) is not None:  # the traced graph itself, not a merge, fails there
        shapes = [t.shape for t in example]
        only = rebuild.InputShapeCheck(shapes, False, f"the traced graph is fixed at it: {failure}")
        fixed = rebuild.fused_module(module, plan, traced, dynamic=False, only_shape=only)
        if cases.compare(fixed, only_first=True) is None:
            warnings.warn(f"convmerge.fuse: the fused module runs only at input shape "
                          f"{', '.join('x'.join(map(str, s)) for s in shapes)}: {failure}", stacklevel=3)
            return fixed
    raise VerificationError(f"the fused module does not compute what the module does: {failure}; "
                            "no module returned (please report it)")


def save(module: nn.Module, path: Union[str, os.PathLike], *, force: bool = False,
         leaves: Sequence[Union[type, str]] = ()) -> None:
    """Write the module's state dict as safetensors with its graph description in the header (and the
    kernels the trace computed from parameters, which the state dict does not hold)."""
    leaves = Options.of("convmerge.save", leaves=leaves).leaves
    # A copy is traced: finding the example input runs the forward, which may change buffers the module writes.
    traced = trace.describe_module(copy.deepcopy(module), type(module).__name__, leaves=leaves, runnable=False)
    doc = traced.doc
    state = {k: v.detach().cpu().contiguous() for k, v in {**module.state_dict(), **traced.tensors}.items()}
    parse(doc, model.module_tensors(state).info, "traced module")
    io.write_model(path, list(state.items()), {model.GRAPH_KEY: json.dumps(doc), "format": "pt"}, force=force)


def _describe(module: nn.Module, leaves: Sequence[Union[type, str]] = (), input_size: Optional[Sequence[int]] = None,
              example_inputs: Optional[Sequence[torch.Tensor]] = None, runnable: bool = True, fx_first: bool = True,
              enter: bool = False) -> tuple[Graph, model.Tensors, Any]:
    """Trace a copy of `module` (so a fused module can be rebuilt from it without touching the original)."""
    copied = copy.deepcopy(module)
    traced = trace.describe_module(copied, type(module).__name__, leaves=leaves, example_size=input_size,
                                   example_inputs=example_inputs, runnable=runnable, fx_first=fx_first, enter=enter)
    return (*model.traced_graph(copied, traced), traced)


def load_module(arch: str, path: Union[str, os.PathLike]) -> nn.Module:
    """Build `arch` on the CPU and load the weights of a safetensors file into it (strictly)."""
    header = io.read_header(path)
    module = trace.load_callable(arch)()
    if not isinstance(module, nn.Module):
        raise trace.TraceError(f"--arch {arch}: returned {type(module).__name__}, not a torch.nn.Module")
    state = {name: io.read_tensor(header, name) for name in header.tensors}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else "state dict mismatch"
        raise trace.TraceError(f"--arch {arch}: the weights of {os.fspath(path)} do not fit: {first}") from None
    return module.eval()


def export_bytes(module: nn.Module, input_shape: Sequence[int]) -> bytes:
    """A torch.export program of `module` (loadable with torch.export.load without its code), as bytes.

    The batch and spatial sizes are symbolic (`Dim.AUTO`: whatever the module allows; a module that holds only
    at one size keeps it), so the program runs at other batches and sizes where the module does."""
    if not isinstance(module, torch.fx.GraphModule):  # a fused module is already the inference form
        module = module.eval()
    example = (torch.randn(*input_shape),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            batch, dims = trace_export.symbolic_example(example)
            with trace_export.generic_sizes():
                program = torch.export.export(module, batch, dynamic_shapes=dims)
        except Exception:  # noqa: BLE001 - code that needs its sizes fixed: the program holds at the shape given
            program = torch.export.export(module, example)
    buffer = _io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def export(module: nn.Module, input_shape: Sequence[int], path: Union[str, os.PathLike], *, force: bool = False) -> None:
    """Write `export_bytes` atomically."""
    io.write_bytes(path, export_bytes(module, input_shape), force=force)
