"""The ops `affine` (x * weight + bias, per channel) and `sub` (a - b): their checks and their maths.

An `affine` layer `N` owns `N.weight` (the scale) and `N.bias` (the shift), each optional and each of
shape [C] (one value per channel) or [1] (one for every channel): LayerScale's `x * gamma`, `x * 2 + 1`,
ONNX's Mul/Add/Sub/Div by a constant.  The engine treats it as what it is, a batch norm with mean 0,
variance 1 and eps 0 (`batch_norm`), so pairs, regions and the float64 reference take it as they take
a batch norm.  `sub` is a join of two branches whose second is negated (`negated`).

The readers ask `per_channel` whether a constant operand of an element-wise op is one value per
channel of the other (as shapes: no tensors), and `channel_values` for those values as [C] or [1].
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

if TYPE_CHECKING:  # the description's checks (graph.py) run without torch
    import torch

    from ..engine.algebra import BatchNorm, Conv

__all__ = ["arithmetic", "batch_norm", "channel_values", "check", "count", "negated", "per_channel"]

TENSORS = ("weight", "bias")


def count(name: str, tensors: Mapping[str, Any]) -> Optional[int]:
    """The channel count an affine layer's tensors fix (None: only [1] tensors, which fit any count)."""
    sizes = {int(t.shape[0]) for t in (tensors.get(f"{name}.{s}") for s in TENSORS)
             if t is not None and len(t.shape) == 1}
    sizes.discard(1)
    return sizes.pop() if len(sizes) == 1 else None


def check(name: str, tensors: Mapping[str, Any], at: str, _q: Callable[[str], str]) -> Optional[str]:
    """What is wrong with an affine layer's tensors (None: nothing); `at` starts the message, `_q` quotes."""
    sizes = []
    for suffix in TENSORS:
        t = tensors.get(f"{name}.{suffix}")
        if t is None:
            continue
        if len(t.shape) != 1 or t.shape[0] < 1:
            return (f"{at}: tensor {_q(f'{name}.{suffix}')} has shape {list(t.shape)}, expected [C] (one value per "
                    "channel) or [1] (one value for every channel)")
        sizes.append((suffix, int(t.shape[0])))
    if len({n for _, n in sizes if n != 1}) > 1:
        shown = ", ".join(f"{suffix} [{n}]" for suffix, n in sizes)
        return f"{at}: its tensors disagree on the channel count ({shown})"
    return None


def batch_norm(weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], channels: Optional[int]) -> BatchNorm:
    """The batch norm computing x * weight + bias on `channels` channels (a [1] tensor broadcast to them):
    (x - 0) / sqrt(1 + 0) * weight + bias, which F.batch_norm computes as one fused multiply-add."""
    import torch

    from ..engine.algebra import BatchNorm

    c = channels or max([t.numel() for t in (weight, bias) if t is not None] + [1])
    stretch = lambda t: None if t is None else t.double().reshape(-1).expand(c).clone()  # noqa: E731
    return BatchNorm(torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64), 0.0,
                     stretch(weight), stretch(bias))


def negated(conv: Conv) -> Conv:
    """A branch subtracted: its conv with weight and bias negated (exact in any float)."""
    return replace(conv, weight=-conv.weight, bias=None if conv.bias is None else -conv.bias)


def per_channel(value: Sequence[int], constant: Sequence[int]) -> bool:
    """Whether a constant of shape `constant` combined element-wise with a value of shape `value` (batch,
    channels, spatial axes) gives one number per channel (or one for all), leaving the value's shape as it is:
    aligned from the last axis, the constant is 1 everywhere but on the channel axis, where it is 1 or C."""
    if len(value) < 2 or len(constant) > len(value):
        return False
    aligned = [1] * (len(value) - len(constant)) + list(constant)
    return all(n == 1 for k, n in enumerate(aligned) if k != 1) and aligned[1] in (1, value[1])


def channel_values(t: torch.Tensor) -> torch.Tensor:
    """A per-channel constant (`per_channel`) as the [C] or [1] tensor an affine layer holds."""
    return t.detach().reshape(-1).clone() if t.numel() > 1 else t.detach().reshape(1).clone()


def arithmetic(op: str, c: Any, alpha: float = 1, constant_first: bool = False) -> Optional[tuple[Any, Any]]:
    """`x op c` (`c op x` with `constant_first`; `alpha` scales the second operand as in torch.add/sub) as the
    (weight, bias) of x * weight + bias, None for an absent one; None where it is not affine in x (c / x)."""
    if op == "mul":
        return c, None
    if op == "div":
        return None if constant_first else (1 / c, None)
    if op == "add":
        return (None if alpha == 1 else alpha, c) if constant_first else (None, c * alpha)
    if op == "sub":
        return (-alpha, c) if constant_first else (None, c * -alpha)
    return None

