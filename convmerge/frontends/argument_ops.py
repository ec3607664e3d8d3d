"""Opaque ops that carry their arguments as fields: `flatten`, `adaptive_avg_pool1d/2d/3d` and `mean`.

The tracers write the fields (`trace_export` from the ATen call, `trace_fx` from the Python call, both
through `fields`) and `convmerge.load` runs the op from them (`run`).  For the planner these layers stay
opaque like any other (none is in STRUCTURAL_OPS): the fields only let a loaded module compute them.
Each op's arguments are those of the torch function after the tensor, in order, with their defaults;
an argument that is not a plain value (a size computed from the input) means no fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["ARGUMENT_OPS", "ArgumentOp", "described", "fields", "flatten_dims", "run"]

_REQUIRED = object()


def _int(value: Any) -> bool:
    return type(value) is int


def _flatten(bound: dict[str, Any]) -> Optional[dict[str, Any]]:
    start, end = bound["start_dim"], bound["end_dim"]
    return {"start_dim": start, "end_dim": end} if _int(start) and _int(end) else None


def _adaptive(nd: int) -> Callable[[dict[str, Any]], Optional[dict[str, Any]]]:
    def check(bound: dict[str, Any]) -> Optional[dict[str, Any]]:
        size = bound["output_size"]
        size = [size] * nd if _int(size) else list(size) if isinstance(size, (list, tuple)) else None
        if size is None or len(size) != nd or not all(n is None or (_int(n) and n > 0) for n in size):
            return None
        return {"output_size": size}
    return check


def _mean(bound: dict[str, Any]) -> Optional[dict[str, Any]]:
    dim, keepdim = bound["dim"], bound["keepdim"]
    dim = [dim] if _int(dim) else list(dim) if isinstance(dim, (list, tuple)) else None
    if not dim or not all(_int(d) for d in dim) or type(keepdim) is not bool or bound.get("dtype") is not None:
        return None
    return {"dim": dim, "keepdim": keepdim}


@dataclass(frozen=True)
class ArgumentOp:
    params: tuple[tuple[str, Any], ...]
    """The torch function's arguments after the tensor, in order, with their defaults."""
    check: Callable[[dict[str, Any]], Optional[dict[str, Any]]]
    """The fields from the bound arguments, or None where they are not plain values the op takes."""
    call: Callable[..., torch.Tensor]
    """The op from the tensor and the fields as keyword arguments."""


ARGUMENT_OPS: dict[str, ArgumentOp] = {
    "flatten": ArgumentOp((("start_dim", 0), ("end_dim", -1)), _flatten, torch.flatten),
    **{f"adaptive_avg_pool{nd}d": ArgumentOp((("output_size", _REQUIRED),), _adaptive(nd),
                                             getattr(F, f"adaptive_avg_pool{nd}d")) for nd in (1, 2, 3)},
    "mean": ArgumentOp((("dim", _REQUIRED), ("keepdim", False), ("dtype", None)), _mean, torch.mean),
}
"""The ops, by the name both tracers give them (torch.flatten and Tensor.flatten, aten's flatten and a view
that is one; F.adaptive_avg_pool*d; torch.mean and Tensor.mean over given axes)."""


def fields(op: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """The fields of a call of `op` with these arguments after the tensor, or None where it has none."""
    spec = ARGUMENT_OPS.get(op)
    if spec is None or len(args) > len(spec.params) or set(kwargs) - {name for name, _ in spec.params}:
        return None
    bound: dict[str, Any] = {}
    for k, (name, default) in enumerate(spec.params):
        value = args[k] if k < len(args) else kwargs.get(name, default)
        if value is _REQUIRED:
            return None
        bound[name] = value
    return spec.check(bound)


def described(op: str, layer_fields: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """The fields of a described layer of `op` (as `fields` writes them), or None where they are missing
    or not what the op takes."""
    spec = ARGUMENT_OPS.get(op)
    names = [name for name, _ in spec.params] if spec is not None else []
    if spec is None or not all(name in layer_fields for name in names if name != "dtype"):
        return None
    return spec.check({name: layer_fields.get(name) for name in names})


def run(op: str, x: torch.Tensor, layer_fields: Mapping[str, Any]) -> torch.Tensor:
    return ARGUMENT_OPS[op].call(x, **layer_fields)


def flatten_dims(before: Sequence[int], after: Sequence[int]) -> Optional[tuple[int, int]]:
    """`(start_dim, end_dim)` when `after` is `before` with exactly one run of two or more axes collapsed
    into their product, and no other run gives it (end_dim -1 when it is the last axis); else None."""
    before, after = [int(n) for n in before], [int(n) for n in after]
    span = len(before) - len(after)
    found = []
    for start in range(len(after)):
        end = start + span
        product = 1
        for n in before[start:end + 1]:
            product *= n
        if span > 0 and before[:start] + [product] + before[end + 1:] == after:
            found.append((start, -1 if end == len(before) - 1 else end))
    return found[0] if len(found) == 1 else None
