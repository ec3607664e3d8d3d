"""The tensor work: merged kernels and biases, batch-norm folding, evaluation, counterexamples.

Everything is computed in float64 and handed back in the weights' own dtype, so a merge never
loses precision the original pair did not already lose.

All of a merge's tensor work is here, so that maths/ stays free of tensors; that is why it is long.
"""

from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager
from functools import lru_cache
from dataclasses import dataclass, replace
from itertools import product
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy
import torch
import torch.nn.functional as F

from .grouped import fast_grouped
from ..maths.reasons import Outcome, Why
from ..maths.rules import BiasCheck, Support, Verdict, decide, full_support
from ..maths.spec import CONV_MODE_OF_PAD, Axis, ConvSpec, PoolSpec, macs

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_PAD_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}

Size = tuple[int, ...]
Reference = Callable[[torch.Tensor], torch.Tensor]
"""The original layers as one function of a float64 input (for a chain: `lambda x: apply_chain(convs, x)`)."""

SEARCH_ELEMENTS = 1 << 20
"""Most values a search at the size asked may unfold (positions x channels x taps) before it moves
to the caller's smaller stand-in size: 8 MiB of float64. PyTorch's CPU conv has no float64 fast
path; it unfolds its input (im2col), the biggest buffer of a trial, next to a few input-sized
ones. So a search stays within tens of MB and a trial within milliseconds."""
SEARCH_BUDGET = 1 << 22
"""Input elements the impulses of one search may add up to (about 32 MiB of float64 pushed through
the layers): random and all-ones inputs almost always decide, impulses are for weights that cancel."""
IMPULSES = 4096
"""At most this many impulses per search, however small the input."""
SEARCH_SECONDS = 3.0
"""Wall-clock bound of one search (over every size it tries): the budgets above keep a search well inside it
on small layers; it stops a search whose every trial is slow (wide layers), which then reports none found
within the bound."""


class Budget:
    """What one search may still spend, shared by every size it tries: impulses, their input elements, time."""

    def __init__(self) -> None:
        self.impulses, self.elements = IMPULSES, SEARCH_BUDGET
        self.deadline = time.monotonic() + SEARCH_SECONDS
        self.spent = False  # some trial was left out for the bound

    def allows(self, elements: int = 0) -> bool:
        """Whether one more trial fits (an impulse of `elements` input values; 0: a random or all-ones input)."""
        ok = time.monotonic() < self.deadline and (not elements or (self.impulses > 0 and self.elements >= elements))
        if ok and elements:
            self.impulses, self.elements = self.impulses - 1, self.elements - elements
        self.spent = self.spent or not ok
        return ok


@dataclass(frozen=True)
class Conv:
    """A convolution with its weights: what gets merged."""

    spec: ConvSpec
    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if tuple(self.weight.shape) != self.spec.weight_shape:
            raise ValueError(f"weight shape {list(self.weight.shape)} is not {list(self.spec.weight_shape)}")

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype


@dataclass(frozen=True)
class BatchNorm:
    """Inference-form batch norm: y = (x - mean) / sqrt(var + eps) * weight + bias."""

    mean: torch.Tensor
    var: torch.Tensor
    eps: float = 1e-5
    weight: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = 1.0 / torch.sqrt(self.var.double() + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.double()
        shift = -self.mean.double() * scale
        if self.bias is not None:
            shift = shift + self.bias.double()
        return scale, shift


@dataclass(frozen=True)
class Counterexample:
    """A concrete input on which the pair and the candidate conv differ (float64)."""

    input: torch.Tensor
    pair_output: torch.Tensor
    candidate_output: torch.Tensor
    index: tuple[int, ...]
    representative_of: Optional[Size] = None  # the input size asked for, where `input` has a smaller stand-in size

    @property
    def pair_value(self) -> Optional[float]:
        """The layers' value at `index` (None where their output has no such position)."""
        return _at(self.pair_output, self.index)

    @property
    def candidate_value(self) -> Optional[float]:
        """The single conv's value at `index` (None where its output has no such position: the layers compute
        a window no conv has, such as ceil mode's partial one, so the size itself is the counterexample)."""
        return _at(self.candidate_output, self.index)

    @property
    def shapes_differ(self) -> bool:
        return self.pair_output.shape != self.candidate_output.shape

    def as_dict(self) -> dict:
        out = {
            "input_shape": list(self.input.shape),
            "output_index": list(self.index),
            "pair_value": self.pair_value,
            "candidate_value": self.candidate_value,
            "representative_of": None if self.representative_of is None else list(self.representative_of),
        }
        if self.shapes_differ:
            out["output_shapes"] = {"pair": list(self.pair_output.shape), "candidate": list(self.candidate_output.shape)}
        return out


def _at(t: torch.Tensor, index: tuple[int, ...]) -> Optional[float]:
    return float(t[index]) if all(i < n for i, n in zip(index, t.shape)) else None


class _Memo(threading.local):
    table: Optional[dict] = None


_memo = _Memo()  # per Python thread: concurrent runs do not share (or replace) each other's table


@contextmanager
def memo() -> Iterator[None]:
    """Within, `analyze` and `fold_bn` answer again for the same tensor objects without recomputing them:
    planning meets each adjacent pair once in its region's reduction and once more as the pair."""
    saved = _memo.table
    _memo.table = {}
    try:
        yield
    finally:
        _memo.table = saved


def _remembered(objects: tuple, extra: tuple, compute: Callable[[], object]) -> object:
    table = _memo.table
    if table is None:
        return compute()
    key = (tuple(id(o) for o in objects), extra)
    hit = table.get(key)
    if hit is None:
        hit = table[key] = (objects, compute())  # the objects are held, so their ids stay theirs
    return hit[1]


def fold_bn(conv: Conv, bn: BatchNorm) -> Conv:
    """conv followed by batch norm is one conv: scale the output channels, shift the bias (float64)."""
    return _remembered((conv.weight, conv.bias, bn.mean, bn.var, bn.weight, bn.bias), (conv.spec, bn.eps),
                       lambda: _fold_bn(conv, bn))  # type: ignore[return-value]


def _fold_bn(conv: Conv, bn: BatchNorm) -> Conv:
    scale, shift = bn.scale_shift()
    if scale.numel() != conv.spec.out_channels:
        raise ValueError(f"batch norm has {scale.numel()} channels, the conv outputs {conv.spec.out_channels}")
    w = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
    b = shift if conv.bias is None else conv.bias.double() * scale + shift
    return Conv(conv.spec.with_bias(True), w, b)


@contextmanager
def one_thread() -> Iterator[None]:
    """Small ops (supports, checks on narrow inputs) run faster on one thread than waiting for a second."""
    with _threads(1):
        yield


PARALLEL_MACS = 1 << 30
"""Multiply-adds from which one float64 kernel runs on the caller's threads inside `single_threaded`.

On a busy machine every parallel region waits for its second thread to be scheduled (10-60 ms per
op measured at load 4 on 2 cores), so below this (about 50 ms on one core) one thread is never
slower; above it two threads halve a quiet machine's time and cost at most ~15% under load
(benchmarks/README.md, goal 2)."""


class _Run(threading.local):
    depth = 0  # `single_threaded` scopes open in this Python thread
    wide = 1  # the thread count `parallel` opens: the caller's, when the run began
    scopes = 0  # `_threads` scopes open in this Python thread


_run = _Run()
_lock = threading.Lock()
_open = 0  # `_threads` scopes open in the whole process (torch's thread count is the process's)
_caller = 1  # torch's thread count when the first of them opened


@contextmanager
def _threads(n: int) -> Iterator[int]:
    """torch's thread count set to `n` inside; on exit, the count before (yielded).  A Python thread's
    outermost scope restores the count the process had when the first scope of any thread opened: a thread
    started meanwhile reads torch's count as another thread's scope set it, which is not the caller's."""
    global _open, _caller
    with _lock:
        if _open == 0:
            _caller = torch.get_num_threads()
        before = torch.get_num_threads() if _run.scopes else _caller
        _open += 1
        _run.scopes += 1
        torch.set_num_threads(n)
    try:
        yield before
    finally:
        with _lock:
            _open -= 1
            _run.scopes -= 1
            torch.set_num_threads(before)


@contextmanager
def single_threaded(wide: Optional[int] = None) -> Iterator[None]:
    """A whole run on one thread, set once; `parallel` reopens `wide` threads (default: the caller's
    count) around kernels large enough to gain from them. Nests; restores the caller's count, exceptions
    included, and from several Python threads at once (the library changes no setting of its caller)."""
    saved = _run.wide
    with _threads(1) as before:
        if _run.depth == 0 or wide is not None:
            _run.wide = wide if wide is not None else before
        _run.depth += 1
        try:
            yield
        finally:
            _run.depth -= 1
            _run.wide = saved


def run_threads() -> int:
    """The thread count `parallel` opens in the current run (recomputations must use the same: results
    of a threaded GEMM may depend on it)."""
    return _run.wide if _run.depth else torch.get_num_threads()


@contextmanager
def parallel(work: int) -> Iterator[None]:
    """Inside `single_threaded`, the run's threads for a kernel of `work` multiply-adds if that is large."""
    if _run.depth == 0 or work < PARALLEL_MACS or _run.wide <= 1:
        yield
        return
    with _threads(_run.wide):
        yield


def support(weight: torch.Tensor) -> Support:
    """Per spatial axis, the tap indices whose slice holds a nonzero."""
    taps = (weight != 0).flatten(0, 1).any(0)  # reduce the channel axes first: they are the big ones
    out = []
    for axis in range(taps.dim()):
        other = tuple(d for d in range(taps.dim()) if d != axis)
        nz = taps.any(dim=other) if other else taps
        out.append(tuple(int(i) for i in torch.nonzero(nz).flatten()))
    return tuple(out)


def analyze(conv1: Conv, conv2: Conv, weight_dependence: bool = True) -> Verdict:
    """The verdict for conv2(conv1(x)), using the weights for supports and the bias check.

    With `weight_dependence`, a verdict that holds only because of these weights (a zero bias or
    batch-norm shift, zero border taps, a cancelling bias) says so: a CI gate that passes on a fresh
    checkpoint must not fail silently after training.
    """
    return _remembered((conv1.weight, conv1.bias, conv2.weight, conv2.bias), (conv1.spec, conv2.spec, weight_dependence),
                       lambda: _analyze(conv1, conv2, weight_dependence))  # type: ignore[return-value]


def _analyze(conv1: Conv, conv2: Conv, weight_dependence: bool) -> Verdict:
    with one_thread():
        sup1, sup2 = support(conv1.weight), support(conv2.weight)
        v = decide(conv1.spec, conv2.spec, sup1, sup2, bias_check(conv1, conv2))
        if not weight_dependence or v.verdict in (Outcome.UNMERGEABLE, Outcome.UNDECIDED):
            return v
        full1, full2 = full_support(conv1.spec), full_support(conv2.spec)
        trimmed = (sup1, sup2) != (full1, full2)
        if not (trimmed or conv1.spec.bias):
            return v
        generic = decide(conv1.spec, conv2.spec, full1, full2, (lambda sets: False) if conv1.spec.bias else None)
        if generic.verdict == v.verdict:
            return v
        detail = "zero border taps in the kernels" if trimmed else "the bias or batch-norm shift before conv2 " \
            "vanishes where conv2 pads"
        note = Why.of("weights-decide", detail=detail, generic=f"'{generic.verdict.value}'")
        return replace(v, weight_dependent=True, notes=v.notes + (note,))


def bias_check(conv1: Conv, conv2: Conv) -> Optional[BiasCheck]:
    """Where conv2 zero-pads, the pair misses conv1's bias by beta(o) = -sum(W2[c] b1) over padded taps c."""
    if conv1.bias is None or conv2.spec.ndim == 0 or not bool(torch.any(conv1.bias != 0)):
        return None  # no bias, or no padding for it to meet (linear layers)
    g2 = conv2.spec.groups
    w2 = conv2.weight.double()
    b1 = conv1.bias.double().view(g2, 1, -1, *([1] * conv2.spec.ndim))
    v = (w2.view(g2, -1, *w2.shape[1:]) * b1).sum(2).reshape(w2.shape[0], *w2.shape[2:])
    total = v.flatten(1).sum(1)
    tol = 1e-10 * (v.abs().flatten(1).sum(1) + 1e-300)

    def vanishes(inside: tuple[tuple[int, ...], ...]) -> bool:
        if any(len(t) == 0 for t in inside):
            part = torch.zeros_like(total)
        else:
            part = v[(slice(None), *torch.meshgrid(*[torch.tensor(t) for t in inside], indexing="ij"))]
            part = part.flatten(1).sum(1)
        return bool(torch.all((total - part).abs() <= tol))

    return vanishes


DEFER_ELEMENTS = 1 << 20
"""A merged kernel of at least this many elements (8 MB in float64) is composed when first read (`Deferred`)."""


class Deferred(Conv):
    """A merged conv whose kernel is composed when something first reads ``weight``: planning judges a merge and
    its cost from the spec, and FastViT's 7x7 depthwise before a 1x1 expansion composed 170 MB float64 kernels that
    the cost model then turned down.  ``surely_finite()`` answers planning's NaN/Inf question from the parts."""

    def __init__(self, spec: ConvSpec, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                 compose: Optional[Callable[[], torch.Tensor]] = None,
                 parts: tuple[Conv, ...] = ()) -> None:
        object.__setattr__(self, "spec", spec)
        object.__setattr__(self, "bias", bias)
        object.__setattr__(self, "_compose", compose)
        object.__setattr__(self, "_parts", parts)
        if weight is not None:  # dataclasses.replace builds it again with every field given
            object.__setattr__(self, "weight", weight)
            self.__post_init__()

    def __getattr__(self, name: str) -> Any:
        if name != "weight" or self._compose is None:
            raise AttributeError(name)
        object.__setattr__(self, "weight", self._compose())
        object.__setattr__(self, "_compose", None)
        object.__setattr__(self, "_parts", ())
        self.__post_init__()
        return self.weight

    @property
    def composed(self) -> bool:
        return "weight" in vars(self)

    def surely_finite(self) -> bool:
        """True where no kernel entry can be NaN or Inf: both parts finite, and each entry's sum of products
        bounded (terms x largest |w1| x largest |w2|) far below float64's largest value.  False: unknown."""
        if self.composed or len(self._parts) != 2 or (self.bias is not None and not all_finite(self.bias)):
            return False
        first, second = self._parts
        bounds = []
        for part in (first, second):
            w = part.weight.double()
            if not all_finite(w):
                return False
            bounds.append(float(w.abs().max()) if w.numel() else 0.0)
        terms = second.spec.in_channels // second.spec.groups * math.prod(second.spec.kernel_size) * math.prod(
            first.spec.kernel_size)
        return terms * bounds[0] * bounds[1] < 1e300


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in a CPU tensor (numpy: a fifth of torch's cost per call on the small ones)."""
    return bool(numpy.isfinite(t.detach().numpy()).all())


def merge(conv1: Conv, conv2: Conv, cand: ConvSpec) -> Conv:
    """The single conv `cand` (from the rules) with its kernel and bias, in float64 (a large kernel composed when
    first read: `Deferred`).

    Callers verify this float64 result, then store it with `cast` in the weights' dtype.
    """
    s1, s2 = conv1.spec, conv2.spec

    def kernel() -> torch.Tensor:
        full = compose_kernels(conv1, conv2, cand.groups)
        crop = []
        for a1, a2, am in zip(s1.axes, s2.axes, cand.axes):
            cut = a1.pad[0] + a1.stride * a2.pad[0] - am.pad[0]
            crop.append(slice(cut, cut + am.kernel))
        return full[(slice(None), slice(None), *crop)].contiguous()

    bias = merged_bias(conv1, conv2)
    spec = replace(cand, bias=bias is not None)
    if math.prod(spec.weight_shape) >= DEFER_ELEMENTS:
        return Deferred(spec, bias=bias, compose=kernel, parts=(conv1, conv2))
    return Conv(spec, kernel(), bias)


def compose_kernels(conv1: Conv, conv2: Conv, groups: int) -> torch.Tensor:
    """The full (untrimmed) kernel of conv2 after conv1: K[c] = sum over d1*a + s1*d2*b = c of W2[b] W1[a].

    One batched float64 GEMM over the middle channels for every pair of taps (a, b), then each
    product is added at its merged tap: GEMM speed, where a float64 conv_transpose is ~5x slower.  A depthwise
    conv next to a dense one (FastViT's 7x7 depthwise before its 1x1 expansion) takes the products directly: its
    GEMM over a block-diagonal weight multiplied zeros, c1 times the work, for the same sums (one term each).
    """
    s1, s2 = conv1.spec, conv2.spec
    g = groups
    w1 = _regroup(conv1.weight.double(), s1.groups, g)  # [C1, C0/g, *k1]
    w2 = _regroup(conv2.weight.double(), s2.groups, g)  # [C2, C1/g, *k2]
    c0, c1, c2 = s1.in_channels, s1.out_channels, s2.out_channels
    k1, k2 = math.prod(s1.kernel_size), math.prod(s2.kernel_size)
    if s1.groups == c0 == c1 and g == 1 and c1 > 1:  # depthwise, then dense: middle channel m reads input m only
        w2d = conv2.weight.double().reshape(c2, c1, k2).permute(0, 2, 1)  # [o, b, m]
        products = (w2d.unsqueeze(3) * conv1.weight.double().reshape(1, 1, c1, k1)).unsqueeze(0)
    elif s2.groups == c1 == c2 and g == 1 and c1 > 1:  # dense, then depthwise: output o reads middle channel o only
        w2d = conv2.weight.double().reshape(c2, k2)  # [o, b]
        products = (w2d.view(c2, k2, 1, 1) * conv1.weight.double().reshape(c1, 1, c0, k1)).unsqueeze(0)
    else:
        left = w2.reshape(g, c2 // g, c1 // g, k2).permute(0, 1, 3, 2).reshape(g, (c2 // g) * k2, c1 // g)
        right = w1.reshape(g, c1 // g, (c0 // g) * k1)
        with parallel(g * left.shape[1] * left.shape[2] * right.shape[2]):
            products = torch.bmm(left, right).view(g, c2 // g, k2, c0 // g, k1)  # [g, o, b, i, a]
    extent = [a1.extent + a1.stride * (a2.extent - 1) for a1, a2 in zip(s1.axes, s2.axes)]
    index = _tap_index(s1.axes, s2.axes, tuple(extent))
    terms = products.permute(0, 1, 3, 2, 4).reshape(g, c2 // g, c0 // g, k2 * k1)
    if index is None:  # one term per merged tap, in order (a 1x1 conv on either side): the terms are the kernel
        return terms.reshape(c2, c0 // g, *extent)
    kernel = torch.zeros(g, c2 // g, c0 // g, math.prod(extent), dtype=torch.float64)
    kernel.index_add_(3, index, terms)
    return kernel.reshape(c2, c0 // g, *extent)


@lru_cache(maxsize=256)
def _tap_index(axes1: tuple[Axis, ...], axes2: tuple[Axis, ...], extent: tuple[int, ...]) -> Optional[torch.Tensor]:
    """For each (b, a) in row-major order of (conv2 taps, conv1 taps): the merged tap, flattened (cached:
    networks repeat their shapes; only ever read).  None where that is each merged tap once, in order (the
    products need no summing: FastViT's 7x7 depthwise before a 1x1 expansion to 1152 channels, whose float64
    kernel is 170 MB, written once instead of four times)."""
    if not axes1:
        return None  # linear layers: one tap each
    grids_b = torch.meshgrid(*[torch.arange(a.kernel) for a in axes2], indexing="ij")
    grids_a = torch.meshgrid(*[torch.arange(a.kernel) for a in axes1], indexing="ij")
    index = torch.zeros(math.prod(a.kernel for a in axes2), math.prod(a.kernel for a in axes1), dtype=torch.long)
    for k in range(len(axes1)):
        a1, a2 = axes1[k], axes2[k]
        pos = (grids_b[k].reshape(-1, 1) * (a1.stride * a2.dilation) + grids_a[k].reshape(1, -1) * a1.dilation)
        index = index * extent[k] + pos
    index = index.reshape(-1)
    return None if torch.equal(index, torch.arange(math.prod(extent))) else index


def cast(conv: Conv, dtype: torch.dtype) -> Conv:
    return Conv(conv.spec, conv.weight.to(dtype), None if conv.bias is None else conv.bias.to(dtype))


def merged_bias(conv1: Conv, conv2: Conv) -> Optional[torch.Tensor]:
    """B = b2 + sum over conv2's taps of W2 * b1 (channel-wise); None when neither has a bias."""
    if conv1.bias is None and conv2.bias is None:
        return None
    b = torch.zeros(conv2.spec.out_channels, dtype=torch.float64)
    if conv2.bias is not None:
        b = b + conv2.bias.double()
    if conv1.bias is not None:
        g2 = conv2.spec.groups
        w2 = conv2.weight.double()
        w2sum = w2.reshape(*w2.shape[:2], -1).sum(2)  # [C2, C1/g2] (a linear weight has no taps axis)
        b1 = conv1.bias.double().view(g2, 1, -1)
        b = b + (w2sum.view(g2, -1, w2sum.shape[1]) * b1).sum(2).flatten()
    return b


def apply(conv: Conv, x: torch.Tensor) -> torch.Tensor:
    """Run one conv exactly as PyTorch would (any padding mode, asymmetric padding; no spatial axes: F.linear)."""
    spec = conv.spec
    if spec.ndim == 0:
        return F.linear(x, conv.weight.to(x.dtype), None if conv.bias is None else conv.bias.to(x.dtype))
    pads = [p for a in reversed(spec.axes) for p in a.pad]
    if any(pads):
        x = F.pad(x, pads, mode=_PAD_MODE[spec.padding_mode])
    w = conv.weight.to(x.dtype)
    b = None if conv.bias is None else conv.bias.to(x.dtype)
    return _CONV[spec.ndim](x, w, b, stride=spec.stride, dilation=spec.dilation, groups=spec.groups)


def apply_chain(convs: Sequence[Conv], x: torch.Tensor) -> torch.Tensor:
    for conv in convs:
        x = apply(conv, x)
    return x


def max_errors(reference: Reference, merged: Sequence[Conv], sizes: Sequence[Sequence[int]], in_channels: int,
               seed: int = 0, magnitude: Optional[Reference] = None) -> list[float]:
    """Largest |reference - merged| relative to the scale of the layers, per version of one merge, on random inputs.

    `reference` runs the original layers in float64; it runs once per size for all versions
    (typically the float64 merge and the same weights rounded to their stored dtype).  `magnitude` runs
    them with every term made positive (`reference.magnitudes`): on |x| it bounds what each output sums, and
    the errors are relative to its largest value, so the rounding of terms that cancel (a batch-norm shift
    that is zero up to float32 rounding, leaving an output of 1e-8) is measured against the terms, not against
    their near-zero sum.  Without it, against the output's largest value.
    """
    gen = torch.Generator().manual_seed(seed)
    worst = [0.0] * len(merged)
    with one_thread(), fast_grouped():
        for size in sizes:
            x = torch.randn(1, in_channels, *size, generator=gen, dtype=torch.float64)
            with parallel(2 * len(merged) * macs(merged[0].spec, size)):  # the layers cost about what the merge does
                worst = _errors(reference, merged, x, worst, magnitude)
    return worst


def _errors(reference: Reference, merged: Sequence[Conv], x: torch.Tensor, worst: list[float],
            magnitude: Optional[Reference] = None) -> list[float]:
    """`worst` updated with one input's relative errors."""
    worst = list(worst)
    want = reference(x)
    top = float(want.abs().max()) if want.numel() else 0.0
    if magnitude is not None and want.numel():
        top = max(top, float(magnitude(x.abs()).max()))
    scale = top if top > 0 else 1.0  # the layers' own scale: max(top, 1) would hide tiny weights
    for k, m in enumerate(merged):
        got = apply(_as_double(m), x)
        if want.shape != got.shape:
            worst[k] = math.inf
        elif want.numel():
            err = float((want - got).abs().max()) / scale
            worst[k] = max(worst[k], err if err == err else math.inf)  # NaN (inf weights) counts as inf
    return worst


def chain_errors(convs: Sequence[Conv], merged: Sequence[Conv], sizes: Sequence[Sequence[int]],
                 seed: int = 0) -> list[float]:
    """`max_errors` against a chain of convs, on a random few channels of wide dense convs.

    Slicing a weight is exact, and it keeps the check at milliseconds where the full layers
    would take seconds.
    """
    convs, merged = _narrow(list(convs), list(merged), torch.Generator().manual_seed(seed))
    positive = [Conv(c.spec, c.weight.abs(), None if c.bias is None else c.bias.abs()) for c in convs]
    return max_errors(lambda x: apply_chain(convs, x), merged, sizes, convs[0].spec.in_channels, seed,
                      lambda x: apply_chain(positive, x))


def counterexample(reference: Reference, cand: Conv, size: Sequence[int], in_channels: int, seed: int = 0,
                   stand_in: Optional[Sequence[int]] = None, unfolds: int = 0,
                   budget: Optional[Budget] = None) -> Optional[Counterexample]:
    """A deterministic input where `reference` (the original layers, float64) and `cand` differ; None if none found.

    Tries a random input, an all-ones input, then impulses nearest the borders first (where a
    candidate differs from its pair), within `budget` (a fresh one by default; a caller trying several
    sizes shares one, and reads its `spent` to say the search was cut short). `stand_in` is a smaller size at which
    exactness is the same as at `size` (periodic past the borders; the caller knows the period):
    where a trial at `size` would unfold more than SEARCH_ELEMENTS values (the candidate's, or
    `unfolds` per input position for the reference: channels x taps of its widest conv), the
    search runs there and the counterexample says which size it represents. Raises RuntimeError
    where PyTorch refuses to run `cand` (or the reference) at the size searched.
    """
    size = tuple(size)
    used = size
    unfolded = math.prod(size) * max(in_channels * math.prod(cand.spec.kernel_size), unfolds)
    if stand_in is not None and unfolded > SEARCH_ELEMENTS and math.prod(stand_in) < math.prod(size):
        used = tuple(stand_in)
    with one_thread():
        ce = _search(reference, _as_double(cand), used, in_channels, seed, budget or Budget())
    return ce if ce is None or used == size else replace(ce, representative_of=size)


def _search(reference: Reference, cand: Conv, size: Size, in_channels: int, seed: int,
            budget: Budget) -> Optional[Counterexample]:
    for x in _inputs(in_channels, size, seed, budget):
        want = reference(x)
        got = apply(cand, x)
        if want.shape != got.shape:  # a position one side computes and the other lacks: any input shows it
            return Counterexample(x, want, got, _first_unshared(want.shape, got.shape))
        diff = (want - got).abs()
        scale = max(float(want.abs().max()), float(got.abs().max()), 1.0)
        if diff.numel() and float(diff.max()) > 1e-9 * scale:
            index = tuple(int(i) for i in torch.unravel_index(torch.argmax(diff), diff.shape))
            return Counterexample(x, want, got, index)
    return None


def _first_unshared(a: Sequence[int], b: Sequence[int]) -> tuple[int, ...]:
    """The first index of the larger of two shapes that the other lacks (on the first axis where they differ)."""
    k = next(k for k, (m, n) in enumerate(zip(a, b)) if m != n)
    return tuple(min(m, n) if i == k else 0 for i, (m, n) in enumerate(zip(a, b)))


def _inputs(channels: int, size: Size, seed: int, budget: Budget) -> Iterator[torch.Tensor]:
    """Random, all ones, then impulses border-first, while the budget allows: one tensor alive at a time, built
    only when asked for."""
    gen = torch.Generator().manual_seed(seed)
    yield torch.randn(1, channels, *size, generator=gen, dtype=torch.float64)
    if budget.allows():
        yield torch.ones(1, channels, *size, dtype=torch.float64)
    yield from _impulses(channels, size, budget)


def _impulses(channels: int, size: Size, budget: Budget) -> Iterator[torch.Tensor]:
    elements = channels * math.prod(size)
    for pos in _border_first(size):
        for c in range(channels):
            if not budget.allows(elements):
                return
            x = torch.zeros(1, channels, *size, dtype=torch.float64)
            x[(0, c, *pos)] = 1.0
            yield x


def _border_first(size: Sequence[int]) -> Iterator[tuple[int, ...]]:
    """Every position of a grid once, nearest a border first (ring by ring), without listing them.

    A position's ring is d = min over axes of its distance to that axis' nearer end; within a
    ring, the first axis at distance d names it once: axes before it are further in, axes after
    it are at least d in.
    """
    for d in range((min(size) + 1) // 2):
        for k, n in enumerate(size):
            before = [range(d + 1, m - 1 - d) for m in size[:k]]
            after = [range(d, m - d) for m in size[k + 1:]]
            yield from product(*before, sorted({d, n - 1 - d}), *after)


def _narrow(convs: list[Conv], merged: list[Conv], gen: torch.Generator, keep_in: int = 4, keep_out: int = 8):
    first, last = convs[0], convs[-1]
    if any(m.spec.groups != 1 for m in merged):
        return convs, merged
    if first.spec.groups == 1 and first.spec.in_channels > keep_in:
        idx = torch.randperm(first.spec.in_channels, generator=gen)[:keep_in]
        convs[0] = first = Conv(replace(first.spec, in_channels=keep_in), first.weight[:, idx], first.bias)
        merged = [Conv(replace(m.spec, in_channels=keep_in), m.weight[:, idx], m.bias) for m in merged]
    if last.spec.groups == 1 and last.spec.out_channels > keep_out and len(convs) > 1:
        idx = torch.randperm(last.spec.out_channels, generator=gen)[:keep_out]
        pick = lambda b: None if b is None else b[idx]  # noqa: E731
        convs[-1] = Conv(replace(last.spec, out_channels=keep_out), last.weight[idx], pick(last.bias))
        merged = [Conv(replace(m.spec, out_channels=keep_out), m.weight[idx], pick(m.bias)) for m in merged]
    return convs, merged


def _as_double(conv: Conv) -> Conv:
    return cast(conv, torch.float64)


def _regroup(w: torch.Tensor, groups: int, to: int) -> torch.Tensor:
    """A grouped weight [out, in/groups, *k] rewritten with fewer groups `to` (zeros off the blocks)."""
    if groups == to:
        return w
    r = groups // to
    out, in_g = w.shape[:2]
    k = w.shape[2:]
    blocks = w.reshape(to, r, out // groups, in_g, -1)
    eye = torch.eye(r, dtype=w.dtype).view(1, r, 1, r, 1, 1)
    dense = blocks.unsqueeze(3) * eye  # [to, r, og, r, in_g, K]
    return dense.reshape(out, r * in_g, *k)


# --- linear ops as convs, and branches joined -------------------------------------------------


def identity(channels: int, ndim: int) -> Conv:
    """A value as a conv of itself: a depthwise delta kernel (so it never lowers the merged groups)."""
    spec = ConvSpec((Axis(1),) * ndim, channels, channels, channels)
    return Conv(spec, torch.ones(channels, 1, *(1,) * ndim, dtype=torch.float64))


def bn_conv(bn: BatchNorm, ndim: int) -> Conv:
    """An inference batch norm as a depthwise 1x1 conv with a bias (the scale and the shift)."""
    scale, shift = bn.scale_shift()
    c = scale.numel()
    spec = ConvSpec((Axis(1),) * ndim, c, c, c, bias=True)
    return Conv(spec, scale.view(c, 1, *(1,) * ndim).clone(), shift)


def pool_conv(pool: PoolSpec, channels: int) -> Conv:
    """Average pooling as a depthwise conv with taps 1/prod(kernel) (or 1/divisor_override), zero padding.

    That is the pooling exactly where every window's divisor is the same: the caller decides where
    (count_include_pad=False with padding, and ceil mode's partial windows, break it).
    """
    divisor = pool.divisor_override or math.prod(pool.kernel)
    axes = tuple(Axis(k, s, 1, (p, p)) for k, s, p in zip(pool.kernel, pool.stride, pool.padding))
    spec = ConvSpec(axes, channels, channels, channels)
    return Conv(spec, torch.full((channels, 1, *pool.kernel), 1.0 / divisor, dtype=torch.float64))


def pad_conv(pairs: Sequence[tuple[int, int]], mode: str, channels: int) -> Conv:
    """A pad layer as a depthwise delta conv that pads (constant mode: zeros; the value is handled apart)."""
    axes = tuple(Axis(1, 1, 1, tuple(p)) for p in pairs)  # type: ignore[misc]
    spec = ConvSpec(axes, channels, channels, channels, CONV_MODE_OF_PAD[mode])
    return Conv(spec, torch.ones(channels, 1, *(1,) * len(pairs), dtype=torch.float64))


def shift_bias(conv: Conv, delta: torch.Tensor) -> Conv:
    """The same conv with `delta` (per channel) added to its bias."""
    bias = delta.double().expand(conv.spec.out_channels).clone()
    if conv.bias is not None:
        bias = conv.bias.double() + bias
    return Conv(conv.spec.with_bias(True), conv.weight, bias)


def join(convs: Sequence[Conv], cand: ConvSpec, offsets: Sequence[Sequence[int]], concat: bool = False) -> Conv:
    """Branches of one input summed (or stacked along channels) as the single conv `cand` (float64).

    Each kernel is regrouped to the candidate's groups and embedded at its offset in the candidate's
    window; a dilated branch lands on every d-th tap; biases add (or stack).
    """
    g = cand.groups
    parts = []
    # a sum is taken branch by branch in one kernel (no kernel-sized copy per branch): the same additions
    total = None if concat else torch.zeros(cand.out_channels, cand.in_channels // g, *cand.kernel_size,
                                            dtype=torch.float64)
    for conv, offset in zip(convs, offsets):
        w = _regroup(conv.weight.double(), conv.spec.groups, g)
        index: list[slice] = [slice(None), slice(None)]
        for a, am, off in zip(conv.spec.axes, cand.axes, offset):
            step = a.dilation // am.dilation if a.kernel > 1 else 1
            start = off // am.dilation
            index.append(slice(start, start + step * (a.kernel - 1) + 1, step))
        if total is not None:
            total[tuple(index)] += w
            continue
        out = torch.zeros(conv.spec.out_channels, cand.in_channels // g, *cand.kernel_size, dtype=torch.float64)
        out[tuple(index)] = w
        parts.append(out)
    biases = [c.bias.double() if c.bias is not None else torch.zeros(c.spec.out_channels, dtype=torch.float64)
              for c in convs]
    if total is None:
        weight, bias = torch.cat(parts), torch.cat(biases)
    else:
        weight, bias = total, sum(biases[1:], biases[0])
    return Conv(cand.with_bias(any(c.bias is not None for c in convs)), weight,
                bias if any(c.bias is not None for c in convs) else None)

