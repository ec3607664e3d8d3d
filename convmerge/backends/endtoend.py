"""The end-to-end check of a fused PyTorch module: the original and the fused module run on the same
random inputs, at the traced shape and at others where the original runs, in float64 on the CPU.

It is the net under every tracer trick: whatever the trace or the rebuild got wrong (a lost in-place
update, a shape fixed by the export, a merge put at the wrong node), the module is not returned.  The
shapes: the traced one; batch 2 with every spatial size about half the traced one and of the other parity, at
every depth the net downsamples to (`_half`: 97 for 224, whose 14x14 map half of it, 113, makes 8x8)
(another batch, another size, the other parity, which strided and ceil-mode layers treat differently; at half the
size, since a larger one exercises nothing more and cost three times the traced shape's run at 224x224), or one
larger where the original does not run at half, else the traced size; and the smallest size the original runs at near where its
smallest intermediate map becomes 1 (a 32x32 input to a net that downsamples 32 times).  A
module that holds merges exact only at one input size is checked at that size, batch 1 and 2.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..engine.grouped import fast_grouped
from ..frontends.trace_layers import TraceError, first_line, model_dtype

__all__ = ["TOLERANCE", "Cases", "relative_difference"]

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}
"""Largest difference between the original's and the fused module's outputs, relative to the output's
largest magnitude, that the rounding of the merged weights to the model's dtype explains (the same
bounds as the ONNX check's)."""
_SMALL_TRIES = 4
"""Sizes tried upward from the estimate of where the smallest intermediate map becomes 1."""


@dataclass
class _Case:
    label: str
    inputs: tuple[torch.Tensor, ...]
    expected: Any


class Cases:
    """The original's outputs at each shape checked, computed once; `compare` runs a fused module on them."""

    def __init__(self, original: nn.Module, example: Sequence[torch.Tensor], *, fixed_size: bool,
                 smallest: Sequence[int] = ()) -> None:
        self.dtype = model_dtype(original)
        self.tolerance = TOLERANCE.get(self.dtype, 1e-4)
        shapes = [tuple(t.shape) for t in example]
        self.cases: list[_Case] = []
        self.failure = ""  # why the original does not run at the traced shape, where it does not
        for run in dict.fromkeys((torch.float64, self.dtype)):  # float64, unless the model runs only in its dtype
            self.run = run
            reference = _on_cpu(original, run)
            self.cases = self._cases(reference, shapes, fixed_size, smallest)
            if self.cases:
                break
        if not self.cases:
            raise TraceError(f"the model does not run on the CPU on inputs of shape {_shapes(shapes)} "
                             f"({self.failure}): give input_size or example_inputs it runs at")

    def _cases(self, reference: nn.Module, shapes: list[tuple[int, ...]], fixed_size: bool,
               smallest: Sequence[int]) -> list[_Case]:
        found: list[_Case] = []
        if self._case(reference, "the traced shape", shapes, found) is None:
            return []
        batch = [(2, *s[1:]) for s in shapes]
        if fixed_size:
            more = [("batch 2", batch)]
        else:
            factors = [[n // m for n, m in zip(s[2:], smallest)] if len(smallest) == len(s) - 2 else [1] * (len(s) - 2)
                       for s in batch]
            more = [("batch 2, every spatial size about half and of the other parity",
                     [(2, *s[1:2], *(_half(n, f) for n, f in zip(s[2:], fs))) for s, fs in zip(batch, factors)]),
                    ("batch 2, every spatial size one larger", [(2, *s[1:2], *(n + 1 for n in s[2:])) for s in batch]),
                    ("batch 2", batch)]
            if smallest and all(len(s) == len(shapes[0]) for s in shapes):
                start = [[max(1, n // m) for n, m in zip(s[2:], smallest)] for s in shapes]
                more += [("a size where an intermediate map is 1", [(1, s[1], *(n + k for n in size))
                                                                   for s, size in zip(shapes, start)])
                         for k in range(_SMALL_TRIES)]
        done: set[str] = set()  # the kinds of case found: "batch 2" (either size), "a size where" (the first that runs)
        for label, candidate in more:
            kind = label.split(",")[0]
            if kind not in done and self._case(reference, label, candidate, found) is not None:
                done.add(kind)
        return found

    def _case(self, reference: nn.Module, label: str, shapes: list[tuple[int, ...]],
              found: list[_Case]) -> Optional[_Case]:
        """The case at ``shapes``, added to ``found``; None where the original does not run (or found has it)."""
        if any([tuple(t.shape) for t in c.inputs] == [tuple(s) for s in shapes] for c in found):
            return None
        generator = torch.Generator().manual_seed(len(label))
        inputs = tuple(torch.randn(s, generator=generator, dtype=self.run) for s in shapes)
        try:
            with torch.no_grad(), fast_grouped():
                expected = reference(*(t.clone() for t in inputs))  # a forward may write its input
        except Exception as exc:  # noqa: BLE001 - a shape the original does not run at is not one to check
            self.failure = self.failure or first_line(exc)
            return None
        found.append(_Case(f"{label} ({_shapes(shapes)})", inputs, expected))
        return found[-1]

    def compare(self, fused: nn.Module, only_first: bool = False) -> Optional[str]:
        """None when ``fused`` (a module of ours, not yet handed out) computes what the original does at every
        shape; else what differs, where.  It runs with its tensors swapped for CPU copies in the check's dtype and
        put back after (`_swapped`): a deep copy of a fused graph module generates and compiles its code again."""
        with _swapped(fused, self.run):
            for case in self.cases[:1] if only_first else self.cases:
                try:
                    with torch.no_grad(), fast_grouped():
                        got = fused(*(t.clone() for t in case.inputs))
                except Exception as exc:  # noqa: BLE001 - any failure where the original runs is a difference
                    return f"at {case.label} the original runs and the fused module raises {first_line(exc)}"
                wrong = _difference(case.expected, got, self.tolerance)
                if wrong is not None:
                    return f"{wrong} at {case.label}"
        return None

    @property
    def labels(self) -> list[str]:
        return [c.label for c in self.cases]


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Largest |a - b|, and the same relative to the largest finite |a| (absolute where a is all zero); NaN or
    Inf where the other is not, or another shape, counts as infinite."""
    if a.shape != b.shape:
        return float("inf"), float("inf")
    a64, b64 = a.double(), b.double()
    same = (a64 == b64) | (a64.isnan() & b64.isnan())
    if not bool((same | (a64.isfinite() & b64.isfinite())).all()):
        return float("inf"), float("inf")
    if a64.numel() == 0:
        return 0.0, 0.0
    worst = float((a64 - b64).abs().masked_fill(same, 0).max())
    scale = float(a64.abs().masked_fill(~a64.isfinite(), 0).max())
    return worst, worst / scale if scale > 0 else worst


def _difference(expected: Any, got: Any, tolerance: float) -> Optional[str]:
    want, spec = pytree.tree_flatten(expected)
    have, other = pytree.tree_flatten(got)
    if spec != other:
        return "the fused module's outputs have another structure"
    for k, (a, b) in enumerate(zip(want, have)):
        name = f"output {k}" if len(want) > 1 else "the output"
        if not isinstance(a, torch.Tensor):
            if a != b:
                return f"{name} is {b!r}, not {a!r}"
            continue
        if not isinstance(b, torch.Tensor) or a.shape != b.shape:
            return f"{name} has shape {tuple(getattr(b, 'shape', ()))}, not {tuple(a.shape)}"
        if not a.is_floating_point():
            if not torch.equal(a, b.to(a.dtype)):
                return f"{name} differs in {int((a != b).sum())} element(s)"
            continue
        diff, relative = relative_difference(a, b)
        if not relative <= tolerance:
            return (f"{name} differs from the original's by {diff:.3g} ({relative:.3g} relative, more than the "
                    f"{tolerance:g} rounding explains)")
    return None


@contextlib.contextmanager
def _swapped(module: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """While it lasts, each parameter and buffer of ``module`` is a CPU copy, floating point ones in ``dtype`` (what
    ``.to("cpu").to(dtype)`` of a copy gives), and ``module`` is in eval mode; the original tensors, and modes,
    are put back after, whatever the run did to the copies."""
    saved, modes = [], {m: m.training for m in module.modules()}
    try:
        for m in module.modules():
            for store in (m._parameters, m._buffers):
                for key, t in list(store.items()):
                    if t is None:
                        continue
                    saved.append((store, key, t))
                    new = t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype, copy=True)
                    store[key] = nn.Parameter(new, t.requires_grad) if isinstance(t, nn.Parameter) else new
            m.training = False
        yield
    finally:
        for store, key, t in reversed(saved):
            store[key] = t
        for m, mode in modes.items():
            m.training = mode


def _on_cpu(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    with warnings.catch_warnings():  # torch's pytree warns about its own deprecated names when copied
        warnings.simplefilter("ignore", FutureWarning)
        copied = copy.deepcopy(module).to("cpu")
    if dtype != model_dtype(module):
        copied = copied.to(dtype)
    return copied.eval()


def _half(traced: int, factor: int) -> int:
    """The size nearest half ``traced`` (the larger on a tie, at least 1) that is ``traced + 1`` modulo twice the
    largest power of two in ``factor`` (how many times the traced graph downsamples): each map a chain of stride-2
    layers makes from it then has the other parity than at the traced size, at every depth (half of 224, 113,
    gives a 14x14 map 8x8; 97 gives it 7x7), as one larger gives it."""
    period = 2 << max(0, factor.bit_length() - 1)
    target, r = traced // 2, (traced + 1) % period
    low = r + period * ((target - r) // period)
    return low + period if low < 1 or target - low >= low + period - target else low


def _shapes(shapes: Sequence[Sequence[int]]) -> str:
    return ", ".join("x".join(map(str, s)) for s in shapes)
