"""The Python API for PyTorch users: check a model, fuse a module, save one self-describing."""

from __future__ import annotations

import copy
import io as _io
import json
import os
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from . import io, model, trace
from .graph import Graph, parse
from .modules import to_module


def check(
    model_or_path: Union[nn.Module, str, os.PathLike],
    *,
    graph: Optional[str] = None,
    arch: Optional[str] = None,
    input_size: Optional[Sequence[int]] = None,
    policy: str = "cheaper",
) -> dict[str, Any]:
    """The report (same content as `convmerge check --json`) for a module or a safetensors file."""
    if isinstance(model_or_path, nn.Module):
        g, tensors = _describe(model_or_path)
        report, _ = model.analyze(g, tensors, input_size, policy)
        report.description = "traced module"
    else:
        report = model.check_file(os.fspath(model_or_path), graph_file=graph, arch=arch, input_size=input_size,
                                  policy=policy)
    return report.to_dict()


def fuse(module: nn.Module, *, input_size: Optional[Sequence[int]] = None, policy: str = "cheaper") -> nn.Module:
    """A new module computing the same function with merged convs; `module` is left untouched.

    The last conv of each merged chain becomes the merged conv; the layers before it become
    nn.Identity, so the module's own forward (and any code holding its submodules) still works.
    """
    g, tensors = _describe(module)
    _, plans = model.analyze(g, tensors, input_size, policy)
    fused = copy.deepcopy(module)
    for plan in plans:
        old = fused.get_submodule(plan.convs[-1])
        new = to_module(model.merged_conv(g, tensors, plan)).to(device=old.weight.device)
        new.train(old.training)
        _set_submodule(fused, plan.convs[-1], new)
        for name in plan.layers:
            if name == plan.convs[-1]:
                continue
            _set_submodule(fused, name, nn.Identity())
    return fused


def save(module: nn.Module, path: Union[str, os.PathLike], *, force: bool = False) -> None:
    """Write the module's state dict as safetensors with its graph description in the header."""
    doc = trace.describe_module(module, type(module).__name__).doc
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    parse(doc, model.module_tensors(state).info, "traced module")
    io.write_model(path, list(state.items()), {model.GRAPH_KEY: json.dumps(doc), "format": "pt"}, force=force)


def _describe(module: nn.Module) -> tuple[Graph, model.Tensors]:
    doc = trace.describe_module(module, type(module).__name__).doc
    tensors = model.module_tensors(module.state_dict())
    return parse(doc, tensors.info, "traced module"), tensors


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


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
    """A torch.export program of `module` (loadable with torch.export.load without its code), as bytes."""
    program = torch.export.export(module.eval(), (torch.randn(*input_shape),))
    buffer = _io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def export(module: nn.Module, input_shape: Sequence[int], path: Union[str, os.PathLike], *, force: bool = False) -> None:
    """Write `export_bytes` atomically."""
    io.write_bytes(path, export_bytes(module, input_shape), force=force)
