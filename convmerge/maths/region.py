"""Regions: the parts of a model that may become one conv, found on the description alone (no tensors).

A region lies between one input value and one output layer, holds only linear ops (convs, batch
norms, identity/dropout, pad, average pooling, add, concat along channels), and none of its
intermediate values is read outside it (FORMAT.md, section 3).  A chain is the sequential case;
RepVGG, ACNet, DBB and MobileOne blocks are regions with parallel branches.

Regions are grown backwards from the last layers: a value joins the region of its consumers when
it is linear, not a graph output, and every consumer is already inside.  A region that ends up
reading two values (a residual add of a block's input and its body) keeps only what follows the
earliest value every path into its output passes through (the add, for a conv after it); the join and its
inputs start regions of their own.  When a region is series-parallel (every join's
branches meet at one value and share no layer) it is also returned as a sequence of `Step`s and
`Par`s, which is what planning cuts into segments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from ..graph import CONV_OPS, JOIN_OPS, LINEAR_OPS, PASSTHROUGH_OPS, Graph

__all__ = ["Par", "Region", "Step", "find_regions", "unit_name"]


@dataclass(frozen=True)
class Step:
    """A single-input linear op."""

    layer: str


@dataclass(frozen=True)
class Par:
    """Branches from one value (`split`) joined by an add or concat layer (`join`)."""

    join: str
    split: str
    branches: tuple[tuple["Item", ...], ...]  # each runs from `split`; () is the split value itself


Item = Union[Step, Par]


@dataclass(frozen=True)
class Region:
    input: str  # the one value it reads
    output: str  # the layer whose value it computes
    layers: tuple[str, ...]  # in graph order
    items: Optional[tuple[Item, ...]]  # the series-parallel structure; None where there is none


class _NotSeriesParallel(Exception):
    pass


def linear(graph: Graph, name: str) -> bool:
    """Whether a value is a layer that a region may hold."""
    layer = graph.layers.get(name)
    if layer is None or layer.op not in LINEAR_OPS or layer.fields.get("_not_float"):
        return False
    return layer.op != "concat" or layer.fields.get("dim", 1) == 1


def find_regions(graph: Graph) -> list[Region]:
    """Every maximal region holding a conv and at least one other layer, in graph order."""
    taken: set[str] = set()
    found = []
    position = {n: i for i, n in enumerate(graph.layers)}
    for name in reversed(list(graph.layers)):
        if name in taken or not linear(graph, name):
            continue
        members = _grow(graph, name, taken)
        if len(_inputs(graph, members)) != 1:  # reads two values (a residual add): keep what follows the add
            members = _past_meeting(graph, members, name)
        inputs = _inputs(graph, members)
        if len(inputs) != 1:
            continue
        taken |= members
        order = sorted(members, key=position.__getitem__)
        if len(order) < 2 or not any(graph.layers[n].op in CONV_OPS for n in order):
            continue
        (start,) = inputs
        found.append(Region(start, name, tuple(order), _structure(graph, members, start, name)))
    return found[::-1]


def _grow(graph: Graph, output: str, taken: set[str]) -> set[str]:
    """The output and every linear value before it whose consumers all lie inside.

    A value refused because one consumer was still outside is met again when that consumer joins
    (it is one of that consumer's inputs), so one pass over a worklist reaches the fixpoint.
    """
    members = {output}
    stack = [output]
    while stack:
        for src in graph.layers[stack.pop()].inputs:
            if src in members or src in taken or src in graph.outputs or not linear(graph, src):
                continue
            if all(c in members for c in graph.consumers.get(src, [])):
                members.add(src)
                stack.append(src)
    return members


def _inputs(graph: Graph, members: set[str]) -> set[str]:
    return {src for m in members for src in graph.layers[m].inputs if src not in members}


def _past_meeting(graph: Graph, members: set[str], output: str) -> set[str]:
    """The layers after the earliest value that every path into `output` passes through: for a conv -> batch
    norm after a residual add (an inverted-residual net), the conv and the batch norm.  Their values are
    read inside only (every path into them passes through that value too), so they are a region; the
    add and what feeds it are met again as outputs of their own."""
    position = {n: i for i, n in enumerate(graph.layers)}
    for meet in sorted(members - {output}, key=position.__getitem__):
        part = _ancestors(graph, members, meet, output, avoid=meet)
        if part <= members:
            return part
    return set()


def _structure(graph: Graph, members: set[str], start: str, end: str) -> Optional[tuple[Item, ...]]:
    try:
        items = _items(graph, members, start, end)
    except _NotSeriesParallel:
        return None
    seen = _layers_of(items)
    if len(seen) != len(set(seen)) or set(seen) != members:
        return None  # a layer used by two branches: not series-parallel
    return items


def _items(graph: Graph, members: set[str], start: str, end: str) -> tuple[Item, ...]:
    items: list[Item] = []
    cur = end
    while cur != start:
        if cur not in members:
            raise _NotSeriesParallel
        layer = graph.layers[cur]
        if layer.op in JOIN_OPS:
            split = _split(graph, members, start, layer.inputs)
            items.append(Par(cur, split, tuple(_items(graph, members, split, src) for src in layer.inputs)))
            cur = split
        else:
            items.append(Step(cur))
            cur = layer.inputs[0]
    return tuple(reversed(items))


def _split(graph: Graph, members: set[str], start: str, inputs: tuple[str, ...]) -> str:
    """The latest value that every path from every join input back to `start` passes through."""
    ancestors = [_ancestors(graph, members, start, src) for src in inputs]
    common = set.intersection(*ancestors)
    order = {n: i for i, n in enumerate(graph.layers)}
    for cand in sorted(common, key=lambda n: order.get(n, -1), reverse=True):
        if cand == start or all(start not in _ancestors(graph, members, start, src, avoid=cand) for src in inputs):
            return cand
    raise _NotSeriesParallel


def _ancestors(graph: Graph, members: set[str], start: str, src: str, avoid: Optional[str] = None) -> set[str]:
    """`src` and the values before it inside the region, down to `start` (not walking through `avoid`)."""
    seen: set[str] = set()
    stack = [src]
    while stack:
        cur = stack.pop()
        if cur in seen or cur == avoid:
            continue
        seen.add(cur)
        if cur != start and cur in members:
            stack.extend(graph.layers[cur].inputs)
    return seen


def _layers_of(items: tuple[Item, ...]) -> list[str]:
    out: list[str] = []
    for item in items:
        if isinstance(item, Step):
            out.append(item.layer)
        else:
            for branch in item.branches:
                out += _layers_of(branch)
            out.append(item.join)
    return out


def layers_of(items: tuple[Item, ...]) -> list[str]:
    """The layers of a structure, each branch's before its join."""
    return _layers_of(items)


def unit_name(graph: Graph, layers: set[str], end: str) -> str:
    """The name a merged unit takes: its last layer, or the layer before a trailing batch norm/identity
    (so a folded conv -> batch norm keeps the conv's name and its tensors' names)."""
    cur = end
    while graph.layers[cur].op in PASSTHROUGH_OPS and graph.layers[cur].inputs[0] in layers:
        cur = graph.layers[cur].inputs[0]
    return cur
