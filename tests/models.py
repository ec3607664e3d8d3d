"""Tiny model files for CLI tests, and a float64 reference evaluator of a graph description.

Everything here is built in a test's tmp_path; no model file is ever committed.  The evaluator
follows FORMAT.md section 1 independently of the library (only torch.nn.functional), so a test can
check that a fused file computes the same function as the file it came from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

GRAPH_KEY = "convmerge.graph"


def conv(name: str, inp: str, cin: int, cout: int, k: int, *, stride: Any = 1, padding: Any = 0,
         groups: int = 1, bias: bool = False, gen: Optional[torch.Generator] = None,
         dtype: torch.dtype = torch.float32, **fields: Any) -> tuple[dict, dict[str, torch.Tensor]]:
    """A conv2d layer description and its tensors (kernel k x k)."""
    layer = {"name": name, "op": "conv2d", "input": inp, "stride": stride, "padding": padding,
             "dilation": 1, "groups": groups, **fields}
    fan_in = cin // groups * k * k
    tensors = {f"{name}.weight": (torch.randn(cout, cin // groups, k, k, generator=gen) / fan_in ** 0.5).to(dtype)}
    if bias:
        tensors[f"{name}.bias"] = torch.randn(cout, generator=gen).to(dtype)
    return layer, tensors


def describe(layers: Sequence[dict], outputs: Sequence[str], inputs: Sequence[str] = ("x",)) -> dict:
    return {"version": 1, "inputs": list(inputs), "layers": list(layers), "outputs": list(outputs)}


def save(path: Path, tensors: Mapping[str, torch.Tensor], description: Optional[dict] = None,
         extra_metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write `tensors` with the description (if any) in the header."""
    metadata = dict(extra_metadata or {})
    if description is not None:
        metadata[GRAPH_KEY] = json.dumps(description)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or None)
    return path


def stack_parts(seed: int = 0) -> tuple[dict, dict[str, torch.Tensor]]:
    """float32, no biases:

    c1 (3->8, 3x3, pad 2) -> c2 (8->4, 3x3, pad 1)        mergeable (and cheaper merged)
    relu
    c3 (4->4, 3x3, stride 2, pad 1) -> c4 (4->2, 3x3, pad 1)   size-dependent: exact iff the size at c3 is odd
    relu
    c5 (2->2, 3x3, pad 0) -> c6 (2->2, 3x3, pad 2)        unmergeable

    (Few channels keep the float64 verification, and so the tests, fast.)
    """
    gen = torch.Generator().manual_seed(seed)
    layers: list[dict] = []
    tensors: dict[str, torch.Tensor] = {}

    def add(part: tuple[dict, dict]) -> None:
        layers.append(part[0])
        tensors.update(part[1])

    add(conv("c1", "x", 3, 8, 3, padding=2, gen=gen))
    add(conv("c2", "c1", 8, 4, 3, padding=1, gen=gen))
    layers.append({"name": "r1", "op": "relu", "input": "c2"})
    add(conv("c3", "r1", 4, 4, 3, stride=2, padding=1, gen=gen))
    add(conv("c4", "c3", 4, 2, 3, padding=1, gen=gen))
    layers.append({"name": "r2", "op": "relu", "input": "c4"})
    add(conv("c5", "r2", 2, 2, 3, padding=0, gen=gen))
    add(conv("c6", "c5", 2, 2, 3, padding=2, gen=gen))
    return describe(layers, ["c6"]), tensors


def stack_model(path: Path, **metadata: str) -> Path:
    desc, tensors = stack_parts()
    return save(path, tensors, desc, metadata)


def branch_model(path: Path) -> Path:
    """c1's output feeds c2 and c3, whose outputs are added: both pairs are skipped."""
    gen = torch.Generator().manual_seed(1)
    l1, t1 = conv("c1", "x", 3, 4, 3, padding=1, gen=gen)
    l2, t2 = conv("c2", "c1", 4, 4, 3, padding=1, gen=gen)
    l3, t3 = conv("c3", "c1", 4, 4, 1, gen=gen)
    add = {"name": "sum", "op": "add", "inputs": ["c2", "c3"]}
    return save(path, {**t1, **t2, **t3}, describe([l1, l2, l3, add], ["sum"]))


def bn_parts(seed: int = 2) -> tuple[dict, dict[str, torch.Tensor]]:
    """c1 (3->6, 3x3, pad 1, bias) -> bn (affine) -> c2 (6->5, 3x3, pad 0, bias): mergeable via bn."""
    gen = torch.Generator().manual_seed(seed)
    l1, t1 = conv("c1", "x", 3, 6, 3, padding=1, bias=True, gen=gen)
    bn = {"name": "bn", "op": "batch_norm", "input": "c1", "eps": 1e-5}
    tb = {"bn.running_mean": torch.randn(6, generator=gen), "bn.running_var": torch.rand(6, generator=gen) + 0.5,
          "bn.weight": torch.randn(6, generator=gen), "bn.bias": torch.randn(6, generator=gen)}
    l2, t2 = conv("c2", "bn", 6, 5, 3, padding=0, bias=True, gen=gen)
    return describe([l1, bn, l2], ["c2"]), {**t1, **tb, **t2}


def bn_model(path: Path) -> Path:
    desc, tensors = bn_parts()
    return save(path, tensors, desc)


def depthwise_model(path: Path, channels: int = 32) -> Path:
    """depthwise 3x3 (groups=C, pad 2) -> pointwise 1x1: exact, but the merged dense 3x3 costs more
    (at 32 channels; with very few channels the per-layer overhead makes merging cheaper)."""
    gen = torch.Generator().manual_seed(3)
    l1, t1 = conv("dw", "x", channels, channels, 3, padding=2, groups=channels, gen=gen)
    l2, t2 = conv("pw", "dw", channels, channels, 1, gen=gen)
    return save(path, {**t1, **t2}, describe([l1, l2], ["pw"]))


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the header metadata of a safetensors file."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def description_of(path: Path) -> dict:
    return json.loads(read(path)[1][GRAPH_KEY])


def described(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The description and the tensors of a self-describing file."""
    tensors, metadata = read(path)
    return json.loads(metadata[GRAPH_KEY]), tensors


class Info:
    """Tensor metadata as graph.parse reads it."""

    def __init__(self, t: torch.Tensor) -> None:
        self.shape, self.dtype, self.is_float = tuple(t.shape), _dtype_name(t.dtype), t.is_floating_point()


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}.get(dtype, "I64")


def infos(tensors: Mapping[str, torch.Tensor]) -> dict[str, Info]:
    return {k: Info(v) for k, v in tensors.items()}


def chain_of(convs: Sequence[Any], bns: Optional[Mapping[int, Any]] = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """A description of convs (convmerge.engine.algebra.Conv) one after the other; `bns[i]` (a BatchNorm) after conv i."""
    layers: list[dict] = []
    tensors: dict[str, torch.Tensor] = {}
    prev = "x"
    for i, c in enumerate(convs):
        name = f"c{i}"
        spec = c.spec
        layers.append({"name": name, "op": f"conv{spec.ndim}d", "input": prev, "stride": list(spec.stride),
                       "padding": [list(a.pad) for a in spec.axes], "dilation": list(spec.dilation),
                       "groups": spec.groups, "padding_mode": spec.padding_mode})
        tensors[f"{name}.weight"] = c.weight
        if c.bias is not None:
            tensors[f"{name}.bias"] = c.bias
        prev = name
        if bns and i in bns:
            bn = bns[i]
            layers.append({"name": f"bn{i}", "op": "batch_norm", "input": prev, "eps": bn.eps})
            tensors.update({f"bn{i}.running_mean": bn.mean, f"bn{i}.running_var": bn.var})
            if bn.weight is not None:
                tensors[f"bn{i}.weight"] = bn.weight
            if bn.bias is not None:
                tensors[f"bn{i}.bias"] = bn.bias
            prev = f"bn{i}"
    return describe(layers, [prev]), tensors


# --- reference evaluator ----------------------------------------------------------------------


def _per_axis(value: Any, nd: int) -> list[int]:
    return [value] * nd if isinstance(value, int) else list(value)


def _pads(layer: dict, kernel: Sequence[int]) -> list[tuple[int, int]]:
    nd = len(kernel)
    padding = layer.get("padding", 0)
    dilation = _per_axis(layer.get("dilation", 1), nd)
    if padding == "valid":
        return [(0, 0)] * nd
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return [(t // 2, t - t // 2) for t in totals]
    if isinstance(padding, int):
        return [(padding, padding)] * nd
    return [(p, p) if isinstance(p, int) else (p[0], p[1]) for p in padding]


def _conv(layer: dict, x: torch.Tensor, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    name = layer["name"]
    weight = tensors[f"{name}.weight"].double()
    bias = tensors.get(f"{name}.bias")
    nd = weight.dim() - 2
    pads = _pads(layer, weight.shape[2:])
    flat: list[int] = []
    for lo, hi in reversed(pads):  # F.pad takes the last axis first
        flat += [lo, hi]
    mode = layer.get("padding_mode", "zeros")
    x = F.pad(x, flat) if mode == "zeros" else F.pad(x, flat, mode=mode)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    return fn(x, weight, None if bias is None else bias.double(), stride=_per_axis(layer.get("stride", 1), nd),
              dilation=_per_axis(layer.get("dilation", 1), nd), groups=layer.get("groups", 1))


def evaluate(description: dict, tensors: Mapping[str, torch.Tensor], x: torch.Tensor,
             opaque: Optional[Mapping[str, Callable[..., torch.Tensor]]] = None) -> list[torch.Tensor]:
    """The description's outputs on input x, in float64; `opaque` computes the layers named in it
    (an opaque leaf's module, say), so a test can check the wiring around them."""
    values: dict[str, torch.Tensor] = {description["inputs"][0]: x.double()}
    for layer in description["layers"]:
        srcs = [layer["input"]] if "input" in layer else list(layer["inputs"])
        args = [values[s] for s in srcs]
        op, name = layer["op"], layer["name"]
        if opaque and name in opaque:
            out = opaque[name](*args)
        elif op in ("conv1d", "conv2d", "conv3d"):
            out = _conv(layer, args[0], tensors)
        elif op == "linear":  # FORMAT.md: nn.Linear on a [N, C] value
            bias = tensors.get(f"{name}.bias")
            out = F.linear(args[0], tensors[f"{name}.weight"].double(), None if bias is None else bias.double())
        elif op in ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"):
            out = _conv_transpose(layer, args[0], tensors)
        elif op == "relu":
            out = F.relu(args[0])
        elif op == "relu6":
            out = F.relu6(args[0])
        elif op in ("identity", "dropout"):
            out = args[0]
        elif op == "add":  # FORMAT.md: inputs of one shape (PyTorch would broadcast a length-1 axis)
            if len({a.shape for a in args}) > 1:
                raise RuntimeError(f"add {name}: shapes differ: {[list(a.shape) for a in args]}")
            out = sum(args[1:], args[0])
        elif op == "concat":
            out = torch.cat(args, dim=layer.get("dim", 1))
        elif op in ("avg_pool1d", "avg_pool2d", "avg_pool3d"):
            out = _avg_pool(layer, args[0])
        elif op == "pad":
            out = _pad(layer, args[0], tensors.get(f"{name}.value"))
        elif op == "mul":
            out = args[0] * args[1]
        elif op == "sub":  # FORMAT.md: two inputs of one shape
            if args[0].shape != args[1].shape:
                raise RuntimeError(f"sub {name}: shapes differ: {[list(a.shape) for a in args]}")
            out = args[0] - args[1]
        elif op == "affine":  # x * weight + bias, each [C] or [1] along the channel axis
            view = (1, -1) + (1,) * (args[0].dim() - 2)
            out = args[0]
            if f"{name}.weight" in tensors:
                out = out * tensors[f"{name}.weight"].double().view(view)
            if f"{name}.bias" in tensors:
                out = out + tensors[f"{name}.bias"].double().view(view)
        elif op == "batch_norm":
            get = lambda s: tensors[f"{name}.{s}"].double() if f"{name}.{s}" in tensors else None  # noqa: E731
            out = F.batch_norm(args[0], get("running_mean"), get("running_var"), get("weight"), get("bias"),
                               training=False, eps=float(layer.get("eps", 1e-5)))
        else:
            raise NotImplementedError(op)
        values[name] = out
    return [values[o] for o in description["outputs"]]


def _conv_transpose(layer: dict, x: torch.Tensor, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    nd = x.dim() - 2
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[nd]
    bias = tensors.get(f"{layer['name']}.bias")
    return fn(x, tensors[f"{layer['name']}.weight"].double(), None if bias is None else bias.double(),
              stride=_per_axis(layer.get("stride", 1), nd), padding=_per_axis(layer.get("padding", 0), nd),
              output_padding=_per_axis(layer.get("output_padding", 0), nd), groups=layer.get("groups", 1),
              dilation=_per_axis(layer.get("dilation", 1), nd))


def _avg_pool(layer: dict, x: torch.Tensor) -> torch.Tensor:
    nd = x.dim() - 2
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
    kernel = _per_axis(layer["kernel_size"], nd)
    stride = layer.get("stride")
    kwargs: dict[str, Any] = {}
    if layer.get("divisor_override") is not None:
        kwargs["divisor_override"] = layer["divisor_override"]
    return fn(x, kernel, kernel if stride is None else _per_axis(stride, nd), _per_axis(layer.get("padding", 0), nd),
              ceil_mode=layer.get("ceil_mode", False), count_include_pad=layer.get("count_include_pad", True),
              **kwargs)


def _pad(layer: dict, x: torch.Tensor, value: Optional[torch.Tensor]) -> torch.Tensor:
    """A pad layer; a `<name>.value` tensor holds one constant per channel (DBB's BN-and-pad)."""
    nd = x.dim() - 2
    flat: list[int] = []
    for lo, hi in reversed(_pads(layer, [1] * nd)):
        flat += [lo, hi]
    mode = layer.get("mode", "constant")
    if mode != "constant":
        return F.pad(x, flat, mode=mode)
    if value is None:
        return F.pad(x, flat, value=float(layer.get("value", 0.0)))
    out = F.pad(x, flat)
    inside = F.pad(torch.ones_like(x), flat)
    return out + (1 - inside) * value.double().view(1, -1, *([1] * nd))


def right_or_refused(fused: Callable[..., torch.Tensor], module: Callable[..., torch.Tensor],
                     shapes: Sequence[Sequence[int]], refusal: type, tolerance: float,
                     dtype: torch.dtype = torch.float32) -> None:
    """At each shape where the module runs, the fused module computes what it does or raises `refusal`: never a
    different result."""
    for shape in shapes:
        x = torch.randn(*shape, dtype=dtype)
        with torch.no_grad():
            want = module(x)
            try:
                got = fused(x)
            except refusal:
                continue
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)

