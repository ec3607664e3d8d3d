"""Between specs/weights and `torch.nn` modules: read a Conv*d's spec, build a Conv*d back.

PyTorch convs pad symmetrically; a merged conv is often asymmetric.  We represent that as a
Conv*d subclass (`PaddedConv1d/2d/3d`) that pads explicitly (`F.pad` with the conv's mode) and
then convolves with padding 0.  Being a subclass, it keeps the parameter names `weight` and
`bias`, so state dicts, optimisers and `torch.export` see an ordinary conv.
"""

from __future__ import annotations

from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.algebra import Conv
from ..maths.spec import ConvSpec, conv_spec

ConvModule = Union[nn.Conv1d, nn.Conv2d, nn.Conv3d]
_CONV_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_PAD_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


class _ExplicitPad:
    """Pads each side by its own amount before an unpadded convolution."""

    side_pads: tuple[int, ...]
    pad_mode: str

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.side_pads, mode=_PAD_MODE[self.pad_mode]))  # type: ignore[misc]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", side_pads={self.side_pads}, pad_mode={self.pad_mode!r}"  # type: ignore[misc]


class PaddedConv1d(_ExplicitPad, nn.Conv1d):
    pass


class PaddedConv2d(_ExplicitPad, nn.Conv2d):
    pass


class PaddedConv3d(_ExplicitPad, nn.Conv3d):
    pass


_PADDED_TYPES = {1: PaddedConv1d, 2: PaddedConv2d, 3: PaddedConv3d}


def spec_of(module: ConvModule) -> ConvSpec:
    """The spec of a Conv1d/2d/3d (or one of ours), whatever form its padding was given in."""
    if isinstance(module, _ExplicitPad):
        pads = module.side_pads
        nd = len(module.kernel_size)
        pairs = [[pads[2 * (nd - 1 - k)], pads[2 * (nd - 1 - k) + 1]] for k in range(nd)]
        return conv_spec(module.kernel_size, module.in_channels, module.out_channels, stride=module.stride,
                         padding=pairs, dilation=module.dilation, groups=module.groups,
                         padding_mode=module.pad_mode, bias=module.bias is not None)
    return conv_spec(module.kernel_size, module.in_channels, module.out_channels, stride=module.stride,
                     padding=module.padding, dilation=module.dilation, groups=module.groups,
                     padding_mode=module.padding_mode, bias=module.bias is not None)


def conv_module(spec: ConvSpec, **factory: Any) -> nn.Module:
    """An empty Conv*d for `spec` (a PaddedConv*d when the padding is asymmetric; an nn.Linear for a spec with no
    spatial axes); `factory`: dtype, device."""
    if spec.ndim == 0:
        return nn.Linear(spec.in_channels, spec.out_channels, bias=spec.bias, **factory)
    kwargs = dict(stride=spec.stride, dilation=spec.dilation, groups=spec.groups, bias=spec.bias, **factory)
    if spec.symmetric:
        return _CONV_TYPES[spec.ndim](spec.in_channels, spec.out_channels, spec.kernel_size,
                                      padding=tuple(a.pad[0] for a in spec.axes), padding_mode=spec.padding_mode,
                                      **kwargs)
    module = _PADDED_TYPES[spec.ndim](spec.in_channels, spec.out_channels, spec.kernel_size, padding=0, **kwargs)
    module.side_pads = tuple(p for a in reversed(spec.axes) for p in a.pad)
    module.pad_mode = spec.padding_mode
    return module


def to_module(conv: Conv) -> nn.Module:
    """A Conv*d holding these weights; a PaddedConv*d when the padding is asymmetric."""
    module = conv_module(conv.spec.with_bias(conv.bias is not None), dtype=conv.weight.dtype)
    with torch.no_grad():
        module.weight.copy_(conv.weight)
        if conv.bias is not None:
            module.bias.copy_(conv.bias)
    return module


_CONV_CALLS = (torch.ops.aten.convolution.default, torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default,
               torch.ops.aten.conv3d.default)


def conv_calls(module: nn.Module) -> int:
    """Convolutions a module runs: its conv modules, or, for a fused graph module (where a conv that no merge
    touched stays an ATen call, not a module), the conv calls in its graph too."""
    graph = getattr(module, "graph", None)
    if not isinstance(graph, torch.fx.Graph):
        return sum(isinstance(m, tuple(_CONV_TYPES.values())) for m in module.modules())
    count = 0
    for node in graph.nodes:
        if node.op == "call_module":
            count += isinstance(module.get_submodule(node.target), tuple(_CONV_TYPES.values()))
        elif node.op == "call_function":
            count += node.target in _CONV_CALLS
    return count
