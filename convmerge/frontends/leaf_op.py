"""The custom op that stands for an opaque leaf module in an exported graph, and what each leaf call
returns (read by its fake implementation while torch.export traces)."""

from __future__ import annotations

import itertools
from typing import Any, Optional

import torch

__all__ = ["LEAF", "OUTPUTS", "SESSIONS", "STRUCTURES", "Slot"]

# --- opaque leaves ----------------------------------------------------------------------------

OUTPUTS: dict[str, list[tuple[tuple[int, ...], torch.dtype, torch.device, Optional[int]]]] = {}
"""What a leaf call returns (shape, dtype, device per tensor, and the index of the input tensor of the same
shape and dtype, whose shape a symbolic export then gives it), keyed by `session/qualname#call`."""
STRUCTURES: dict[str, tuple[list[Any], Any]] = {}
"""The same call's output structure (`Slot` where a tensor goes), for the module's caller."""
SESSIONS = itertools.count()


@torch.library.custom_op("convmerge::opaque_leaf", mutates_args=())
def _leaf_op(inputs: list[torch.Tensor], key: str) -> list[torch.Tensor]:
    raise RuntimeError("convmerge::opaque_leaf stands for a module in a traced graph; it never runs")


@_leaf_op.register_fake
def _leaf_fake(inputs: list[torch.Tensor], key: str) -> list[torch.Tensor]:
    return [torch.empty_like(inputs[like]) if like is not None else torch.empty(shape, dtype=dtype, device=device)
            for shape, dtype, device, like in OUTPUTS[key]]


LEAF = torch.ops.convmerge.opaque_leaf.default


class Slot:
    """Where a leaf's output structure holds a tensor."""
