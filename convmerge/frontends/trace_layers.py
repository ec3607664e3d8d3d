"""What a traced module becomes: the modules that compute exactly what a description's op means,
their fields, the fields of the linear ops that join branches, and names for everything else.

Both tracers (`trace_export`, the main one, and `trace_fx`, its fallback) share these, so a model
reads the same whichever traced it.  When in doubt a layer is opaque: a wrong structural layer
silently produces a wrong merged model, a needless opaque one only misses a merge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import ops
from ..errors import ConvmergeError, Kind
from .modules import PaddedConv1d, PaddedConv2d, PaddedConv3d, spec_of
from ..maths.spec import padding_fields
from ..ops.transpose import transpose_fields, transpose_spec

__all__ = ["STRUCTURAL_MODULES", "STRUCTURAL_OPS", "TraceError", "Traced", "avg_pool_fields", "first_line",
           "is_leaf_class", "is_plain", "model_dtype", "module_fields", "opaque", "pad_fields", "smallest", "traced_note"]

STRUCTURAL_OPS = frozenset(name for name, row in ops.OPS.items() if row.linear or row.kind is ops.Kind.CONV_TRANSPOSE)
"""Ops a description may give a traced layer: those that mean exactly what the module computes."""
_RESERVED = STRUCTURAL_OPS | {"cat"}
"""Op names an opaque layer must not take ("cat" too: older descriptions wrote it for torch.cat)."""

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_PADDED_CONVS = (PaddedConv1d, PaddedConv2d, PaddedConv3d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)  # Sync: F.batch_norm unless training
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_PAD_MODES = {
    nn.ZeroPad1d: "constant", nn.ZeroPad2d: "constant", nn.ZeroPad3d: "constant",
    nn.ConstantPad1d: "constant", nn.ConstantPad2d: "constant", nn.ConstantPad3d: "constant",
    nn.ReflectionPad1d: "reflect", nn.ReflectionPad2d: "reflect", nn.ReflectionPad3d: "reflect",
    nn.ReplicationPad1d: "replicate", nn.ReplicationPad2d: "replicate", nn.ReplicationPad3d: "replicate",
    nn.CircularPad1d: "circular", nn.CircularPad2d: "circular", nn.CircularPad3d: "circular",
}
_PADS = tuple(_PAD_MODES)
STRUCTURAL_MODULES = (nn.Linear,) + _CONVS + _PADDED_CONVS + CONV_TRANSPOSES + _BATCH_NORMS + _DROPOUTS + _AVG_POOLS + \
    _PADS + (nn.Identity,)


class TraceError(ConvmergeError, ValueError):
    """A model that cannot be imported, built or traced; the message names it and what to do."""

    kind = Kind.BAD_INPUT


@dataclass
class Traced:
    """A traced module: its description and what the description needs beyond the state dict.

    ``tensors`` holds kernels computed from parameters (``F.conv2d(x, w + id)``, weight norm) and
    per-channel pad values, under layer names that no state-dict key uses, so
    ``{**module.state_dict(), **tensors}`` has every tensor the description names.  ``missing``
    lists the ones that could not be computed because the module has no weights (meta device):
    build it on the CPU, load the weights and trace again before using the description.
    ``notes`` says which tracer ran and which modules became opaque, and why.  ``graph_module(dynamic)``
    builds a runnable `fx.GraphModule` of the traced graph (with ``dynamic``, one that runs at any
    size where the model allows), and ``nodes`` names, per layer (and input), the node of that graph
    holding its value: what a fused module is rebuilt from.
    """

    doc: dict
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    graph_module: Optional[Callable[[], Any]] = field(default=None, repr=False)
    nodes: dict[str, str] = field(default_factory=dict, repr=False)
    example: tuple = field(default=(), repr=False)
    """The inputs it was traced on (none: torch.fx without an example)."""
    smallest: tuple = ()
    """Per spatial axis, the smallest size above 1 of a value of the input's rank at the traced shape."""
    tracer: str = "torch.export"
    """Which tracer it came from: "torch.export" or "torch.fx"."""
    blind_spots: list = field(default_factory=list)
    """What this trace left opaque that torch.export may see into (torch.fx's: a functional conv, an in-place
    write...); empty where it sees as much.  Submodules fx could not trace are in ``untraced``."""
    bounded: list = field(default_factory=list, repr=False)
    """torch.export's: why its graph at symbolic sizes holds up to some size only (the model branches on its input's
    size, and the graph follows the example's branch; its guards are left out), filled in when that graph is built:
    the fused module then runs at the traced shape only."""
    untraced: dict = field(default_factory=dict, repr=False)
    """torch.fx's: each submodule it kept whole because it could not trace it (a forward that branches on a size),
    by qualified name, with the tensors of its first call in the example run (None: no such call)."""


def example_of_call(args: Sequence[Any], kwargs: dict) -> Optional[tuple[torch.Tensor, ...]]:
    """Copies of a call's inputs, an example to trace the callee on, where they are tensors passed by position
    alone; else None."""
    if kwargs or not all(isinstance(a, torch.Tensor) for a in args):
        return None
    return tuple(a.clone() for a in args)


def smallest(shapes: Iterable[Sequence[int]], rank: int) -> tuple[int, ...]:
    """Per spatial axis, the smallest size above 1 among ``shapes`` of that rank (values of a traced graph)."""
    sizes = [[int(n) for n in s[2:]] for s in shapes if len(s) == rank >= 3]
    return tuple(min((s[k] for s in sizes if s[k] > 1), default=1) for k in range(rank - 2)) if sizes else ()


def traced_note(tracer: str, example: Sequence[torch.Tensor], origin: str) -> str:
    """The note that says which tracer ran, on inputs of which shape and where that shape came from."""
    shapes = ", ".join(str(list(t.shape)) for t in example)
    return f"traced with {tracer} on {'inputs' if len(example) > 1 else 'an input'} of shape {shapes}{origin}"


def model_dtype(module: nn.Module) -> torch.dtype:
    """A module's dtype: its first floating-point parameter's or buffer's (float32 where it has none)."""
    tensor = next((t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()), None)
    return tensor.dtype if tensor is not None else torch.float32


def opaque(op: str) -> str:
    """An opaque op name that cannot be mistaken for a structural one (``F.conv2d`` is not a
    layer with tensors ``NAME.weight``; ``x + 1`` is not an ``add`` of layers)."""
    return "opaque_" + op if op in _RESERVED else op


def is_plain(module: nn.Module, classes: tuple[type, ...]) -> bool:
    """An instance of one of ``classes`` that computes what that class computes: no overridden
    ``forward`` or ``_conv_forward``, no hooks, no parametrized tensors."""
    if not isinstance(module, classes):
        return False
    cls = type(module)
    if cls.forward not in {c.forward for c in classes}:
        return False
    if module._forward_hooks or module._forward_pre_hooks or parametrize.is_parametrized(module):
        return False
    if isinstance(module, _CONVS):
        return cls._conv_forward in {c._conv_forward for c in _CONVS}
    return True


def is_leaf_class(module: nn.Module, leaves: Sequence[type | str]) -> bool:
    """Whether ``module`` is one of the classes (or class names, plain or qualified) the caller marked
    as leaves."""
    cls = type(module)
    names = {cls.__name__, cls.__qualname__, f"{cls.__module__}.{cls.__qualname__}"}
    return any(isinstance(module, leaf) if isinstance(leaf, type) else leaf in names for leaf in leaves)


def module_fields(module: nn.Module) -> dict[str, Any]:
    """``op`` and the hyperparameters of a module called once.

    Only modules that compute what their op means are structural: a conv or norm subclass that
    overrides ``forward`` (weight standardisation, fake quantisation...) is opaque.
    """
    if is_plain(module, _CONVS + _PADDED_CONVS):
        return {"op": f"conv{len(module.kernel_size)}d", **padding_fields(spec_of(module))}
    if is_plain(module, (nn.Linear,)):
        return {"op": "linear"}  # structural on a [N, C] input only: the tracers check the input's rank
    if is_plain(module, CONV_TRANSPOSES) and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        spec = transpose_spec(module.kernel_size, module.in_channels, module.out_channels, stride=module.stride,
                              padding=module.padding, output_padding=module.output_padding,
                              dilation=module.dilation, groups=module.groups, bias=module.bias is not None)
        return {"op": f"conv_transpose{len(module.kernel_size)}d", **transpose_fields(spec)}
    if is_plain(module, _BATCH_NORMS):
        if module.track_running_stats and module.running_mean is not None:
            return {"op": "batch_norm", "eps": float(module.eps), "affine": bool(module.affine)}
        return {"op": "batch_norm_train"}
    if is_plain(module, (nn.Identity,)):
        return {"op": "identity"}
    if is_plain(module, _DROPOUTS):
        return {"op": "dropout"}
    if is_plain(module, (nn.Flatten,)):  # opaque, with the arguments convmerge.load runs it from (argument_ops)
        return {"op": "flatten", "start_dim": int(module.start_dim), "end_dim": int(module.end_dim)}
    if is_plain(module, _AVG_POOLS):
        return avg_pool_fields(_nd_of(module, _AVG_POOLS), module.kernel_size, module.stride, module.padding,
                               module.ceil_mode, module.count_include_pad, getattr(module, "divisor_override", None))
    if is_plain(module, _PADS):
        cls = next(c for c in _PADS if isinstance(module, c))
        nd = int(cls.__name__[-2])
        fields = pad_fields(list(module.padding), nd, _PAD_MODES[cls], getattr(module, "value", 0.0))
        if fields is not None:
            return fields
    return {"op": opaque(type(module).__name__.lower())}


def avg_pool_fields(nd: int, kernel_size: Any, stride: Any, padding: Any, ceil_mode: bool,
                    count_include_pad: bool, divisor_override: Optional[int]) -> dict[str, Any]:
    """An ``avg_pool{nd}d`` layer; ``stride`` None or empty means the kernel size, as in PyTorch."""
    kernel = _per_axis(kernel_size, nd)
    fields: dict[str, Any] = {
        "op": f"avg_pool{nd}d", "kernel_size": kernel,
        "stride": kernel if stride is None or stride == [] or stride == () else _per_axis(stride, nd),
        "padding": _per_axis(padding, nd), "ceil_mode": bool(ceil_mode), "count_include_pad": bool(count_include_pad),
    }
    if divisor_override is not None:
        fields["divisor_override"] = int(divisor_override)
    return fields


def pad_fields(flat: Sequence[int], nd: int, mode: str, value: Optional[float]) -> Optional[dict[str, Any]]:
    """A ``pad`` layer from ``F.pad``'s arguments for a tensor with ``nd`` spatial axes, or None when
    it is not one (negative amounts crop, more pairs than spatial axes pad channels, a value JSON
    cannot hold).  ``F.pad`` lists the last axis first; the description lists the first first.
    """
    flat = [int(p) for p in flat]
    if len(flat) % 2 or len(flat) // 2 > nd or any(p < 0 for p in flat):
        return None
    pairs = [[0, 0] for _ in range(nd)]
    for k in range(len(flat) // 2):
        pairs[nd - 1 - k] = [flat[2 * k], flat[2 * k + 1]]
    if mode not in ("constant", "reflect", "replicate", "circular"):
        return None
    fields: dict[str, Any] = {"op": "pad", "padding": pairs, "mode": mode}
    if mode == "constant":
        fill = 0.0 if value is None else float(value)
        if fill != fill or abs(fill) == float("inf"):
            return None
        fields["value"] = fill
    return fields


def _nd_of(module: nn.Module, classes: tuple[type, ...]) -> int:
    return next(k + 1 for k, c in enumerate(classes) if isinstance(module, c))


def _per_axis(value: Any, nd: int) -> list[int]:
    if isinstance(value, int):
        return [value] * nd
    values = [int(v) for v in value]
    return values * nd if len(values) == 1 else values


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
