"""Fusing inside a submodule torch.fx keeps whole (`Traced.untraced`: a forward that branches on its input's size,
EfficientViT's window attention): it runs its own forward in the fused module, and the modules it calls are fused in
place, each traced by fx on the input of its first call (design.md, "torch.fx with shapes, first")."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn

from . import model
from .backends import rebuild
from .errors import ConvmergeError
from .frontends import trace
from .frontends.trace_layers import example_of_call
from .options import Options

__all__ = ["fuse_within"]


def fuse_within(root: nn.Module, untraced: dict[str, Optional[tuple]], options: Options) -> None:
    """Fuse inside each submodule of `root` that torch.fx kept whole (`Traced.untraced`: a forward that branches on
    a size, say): the outermost submodules it calls are traced by fx on the inputs they had, and replaced by their
    fused modules, with merges exact at every size only (``options`` has no input size: they may be called at
    others); one that fx cannot trace either is entered in turn.  Nothing merges across the kept forward's own
    code.  A part that cannot be traced or planned stays as it is; the caller's end-to-end check covers it all."""
    for name, inputs in untraced.items():
        if inputs is not None:
            _fuse_calls(root.get_submodule(name), inputs, options)


def _fuse_calls(module: nn.Module, inputs: tuple, options: Options) -> None:
    for name, args in _first_calls(module, inputs).items():
        child = module.get_submodule(name)
        before = dict(child.named_modules(remove_duplicate=False))
        traced = trace.fx_with_shapes(child, options.leaves, None, args, enter=True)
        if traced is None:
            _fuse_calls(child, args, options)
            continue
        try:
            plan = model.analyze(*model.traced_graph(child, traced), options)
            if not plan.applied and not traced.untraced:
                continue  # nothing merges: the child stays itself
            fused = rebuild.fused_module(child, plan, traced)
        except ConvmergeError:
            continue
        rebuild.away_from(fused, before)  # the kept forward may read the child's modules: not the merged ones
        fuse_within(fused, traced.untraced, options)
        for key, value in vars(child).items():  # what its caller may read of it: ``self.attn.resolution``
            if not key.startswith("_") and key not in vars(fused) and isinstance(value, _PLAIN):
                setattr(fused, key, value)
        parent, _, last = name.rpartition(".")
        setattr(module.get_submodule(parent), last, fused)


_PLAIN = (bool, int, float, str, tuple, type(None))


def _first_calls(module: nn.Module, inputs: tuple) -> dict[str, tuple]:
    """The outermost submodules with submodules of their own that `module` calls on `inputs`, each with copies of the
    tensors of its first call (one called with other arguments, or later with tensors of other ranks, or one whose
    submodules are called beside its own call (``self.block[0](x)``), is not traced: those it calls are, in its
    place); none where the run fails."""
    calls: dict[str, Optional[tuple]] = {}
    running: list[str] = []
    parents = {n for n, m in module.named_modules(remove_duplicate=False) if n and next(m.children(), None) is not None}

    def enter(name: str) -> Any:
        def record(_: nn.Module, args: tuple, kwargs: dict) -> None:
            for p in (name[:i] for i, c in enumerate(name) if c == "."):
                if p in parents and p not in running:
                    calls[p] = None  # fused whole, it would no longer hold the module called here
            running.append(name)
            if name not in parents:
                return
            if name not in calls:
                calls[name] = example_of_call(args, kwargs)
            elif calls[name] is not None and _ranks(args, kwargs) != _ranks(calls[name], {}):
                calls[name] = None  # fused, it would check its inputs' ranks against its first call's
        return record

    def leave(name: str) -> Any:
        def record(*_: Any) -> None:
            if name in running:
                del running[len(running) - 1 - running[::-1].index(name)]
        return record

    modules = [(n, m) for n, m in module.named_modules(remove_duplicate=False) if n]
    handles = [m.register_forward_pre_hook(enter(n), with_kwargs=True) for n, m in modules]
    handles += [m.register_forward_hook(leave(n), always_call=True) for n, m in modules]
    try:
        with torch.no_grad():
            module(*(t.clone() for t in inputs))
    except Exception:  # noqa: BLE001 - it ran inside the model on these inputs; if not alone, it stays as it is
        return {}
    finally:
        for handle in handles:
            handle.remove()
    called = {n for n, args in calls.items() if args is not None}
    return {n: calls[n] for n in sorted(called)  # type: ignore[misc]
            if not any(n.startswith(p + ".") for p in called)}


def _ranks(args: Sequence[Any], kwargs: dict) -> Optional[tuple[int, ...]]:
    return None if kwargs else tuple(a.dim() if isinstance(a, torch.Tensor) else -1 for a in args)
