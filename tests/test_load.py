"""convmerge.load: the module a self-describing file describes, against the original modules and the
independent float64 evaluator of tests/models.py (torch.nn.functional on the description)."""

from __future__ import annotations

import io as _io
import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn

import convmerge
from convmerge import model

from . import models, nets
from .strategies import padding

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

BLOCKS = {  # the re-parameterisation blocks of tests/nets.py, with their input channels
    "repvgg": (nets.TinyRepVGG, 3), "acblock": (lambda: nets.ACBlock(4), 4),
    "mobileone": (lambda: nets.MobileOneBlock(4), 4), "largekernel": (lambda: nets.LargeKernel(4), 4),
    "dbb": (lambda: nets.DBBLike(4, bn_pad=False), 4), "pool": (lambda: nets.PoolBranch(4, False), 4),
    "pool_counting": (lambda: nets.PoolBranch(4, True), 4), "modes": (lambda: nets.MixedModes(4), 4),
    "inception": (lambda: nets.Inception(4), 4), "oddeven": (lambda: nets.OddEven(4), 4),
}
NETS = {**{name: (make, nets.CHANNELS[name]) for name, make in nets.ALL.items()}, **BLOCKS}


def _sizes(name: str) -> list[tuple[int, ...]]:
    if name == "oddeven":  # its branches have one length only for even inputs
        return [(8, 8), (6, 12)]
    nd = nets.INPUT_DIMS.get(name, 2)
    return [(n,) * nd for n in (7, 8, 13)] + ([(9, 14)] if nd == 2 else [])


def _saved_and_fused(tmp_path: Path, net: nn.Module) -> tuple[Path, Path]:
    src, out = tmp_path / "m.safetensors", tmp_path / "m.fused.safetensors"
    convmerge.save(net, src)
    model.fuse_file(str(src), str(out), policy="all")
    return src, out


def _same_state(module: nn.Module, path: Path) -> None:
    """The state dict is the file's tensors, by name, value and dtype, and the file loads back strictly."""
    state, tensors = module.state_dict(), load_file(str(path))
    assert sorted(state) == sorted(tensors)
    for key, t in tensors.items():
        assert state[key].dtype == t.dtype and torch.equal(state[key], t), key
    module.load_state_dict(tensors, strict=True)


@pytest.mark.parametrize("name", sorted(NETS))
def test_loaded_file_computes_what_the_original_module_computes(tmp_path, name):
    make, channels = NETS[name]
    torch.manual_seed(3)
    net = nets.randomize_bn(make()).double().eval()
    src, out = _saved_and_fused(tmp_path, net)
    for path in (src, out):
        loaded = convmerge.load(path)
        assert not loaded.training
        _same_state(loaded, path)
        for size in _sizes(name):
            x = torch.randn(2, channels, *size, dtype=torch.float64)
            assert torch.allclose(loaded(x), net(x), rtol=1e-9, atol=1e-9), (path.name, size)


def test_bn_and_pad_with_per_channel_values_loads_fused_and_unfused(tmp_path):
    net = nets.randomize_bn(nets.DBBLike(4, bn_pad=True)).double().eval()
    doc, tensors = nets.dbb_description(net)
    src = models.save(tmp_path / "dbb.safetensors", tensors, doc)
    out = tmp_path / "dbb.fused.safetensors"
    model.fuse_file(str(src), str(out), policy="all")
    unfused, fused = convmerge.load(src), convmerge.load(out)
    assert "kxk_pad.value" in unfused.state_dict() and len(list(fused.parameters())) <= 2
    _same_state(unfused, src)
    for size in [(9, 9), (7, 10)]:
        x = torch.randn(2, 4, *size, dtype=torch.float64)
        want = net(x)
        assert torch.allclose(unfused(x), want, atol=1e-9) and torch.allclose(fused(x), want, atol=1e-9)


# --- random descriptions: every padding form and mode, pads, pools, batch norms, joins ---------------------


@st.composite
def descriptions(draw):
    """A chain of random layers (with their tensors) on `nd` spatial axes, sometimes joined with a copy of itself."""
    nd = draw(st.sampled_from([1, 2, 2, 3]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    c = channels = draw(st.integers(1, 3))
    layers: list[dict] = []
    tensors: dict[str, torch.Tensor] = {}
    src = "x"
    for k in range(draw(st.integers(1, 4))):
        name, kind = f"l{k}", draw(st.sampled_from(["conv", "conv", "pad", "pool", "bn", "relu"]))
        if kind == "conv":
            cout = draw(st.integers(1, 3))
            groups = math.gcd(c, cout) if draw(st.booleans()) else 1
            kernel = [draw(st.integers(1, 3)) for _ in range(nd)]
            stride = [draw(st.integers(1, 2)) for _ in range(nd)]
            layers.append({"name": name, "op": f"conv{nd}d", "input": src, "stride": stride,
                           "padding": draw(padding(nd, tuple(stride))),
                           "dilation": [draw(st.integers(1, 2)) for _ in range(nd)], "groups": groups,
                           "padding_mode": draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))})
            tensors[f"{name}.weight"] = torch.randn(cout, c // groups, *kernel, generator=gen, dtype=torch.float64)
            if draw(st.booleans()):
                tensors[f"{name}.bias"] = torch.randn(cout, generator=gen, dtype=torch.float64)
            c = cout
        elif kind == "pad":
            mode = draw(st.sampled_from(["constant", "reflect", "replicate", "circular"]))
            layer = {"name": name, "op": "pad", "input": src, "mode": mode,
                     "padding": draw(padding(nd, (2,) * nd).filter(lambda p: not isinstance(p, str)))}
            if mode == "constant" and draw(st.booleans()):
                tensors[f"{name}.value"] = torch.randn(c, generator=gen, dtype=torch.float64)
            elif mode == "constant":
                layer["value"] = draw(st.floats(-2, 2))
            layers.append(layer)
        elif kind == "pool":
            kernel = [draw(st.integers(1, 3)) for _ in range(nd)]
            layer = {"name": name, "op": f"avg_pool{nd}d", "input": src, "kernel_size": kernel,
                     "stride": [draw(st.integers(1, 2)) for _ in range(nd)],
                     "padding": [draw(st.integers(0, k // 2)) for k in kernel],
                     "count_include_pad": draw(st.booleans()), "ceil_mode": draw(st.booleans())}
            if nd > 1 and draw(st.booleans()):  # F.avg_pool1d has none
                layer["divisor_override"] = draw(st.integers(1, 5))
            layers.append(layer)
        elif kind == "bn":
            layers.append({"name": name, "op": "batch_norm", "input": src, "eps": 1e-3})
            tensors[f"{name}.running_mean"] = torch.randn(c, generator=gen, dtype=torch.float64)
            tensors[f"{name}.running_var"] = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
            if draw(st.booleans()):
                tensors[f"{name}.weight"] = torch.randn(c, generator=gen, dtype=torch.float64)
                tensors[f"{name}.bias"] = torch.randn(c, generator=gen, dtype=torch.float64)
        else:
            layers.append({"name": name, "op": "relu", "input": src})
        src = name
    outputs = [src]
    join = draw(st.sampled_from([None, "add", "concat"]))
    if join:
        layers.append({"name": "same", "op": "identity", "input": src})
        layers.append({"name": "joined", "op": join, "inputs": [src, "same"], **({"dim": 1} if join == "concat" else {})})
        outputs = ["joined", src] if draw(st.booleans()) else ["joined"]
    return channels, nd, models.describe(layers, outputs), tensors, draw(st.integers(5, 12))


@settings(max_examples=60, **SETTINGS)
@given(descriptions(), st.integers(1, 3))
def test_random_descriptions_load_to_what_they_describe(described, batch):
    channels, nd, doc, tensors, n = described
    with tempfile.TemporaryDirectory() as folder:
        path = models.save(Path(folder) / "r.safetensors", tensors, doc)
        loaded = convmerge.load(path)
        _same_state(loaded, path)
    x = torch.randn(batch, channels, *[n + k for k in range(nd)], dtype=torch.float64)
    try:
        want = models.evaluate(doc, tensors, x)
    except RuntimeError:  # too small for these layers (or a reflect pad wider than the input): so must it be
        event("the input is too small for these layers")
        with pytest.raises(RuntimeError):
            loaded(x)
        return
    got = loaded(x)
    got = list(got) if isinstance(got, tuple) else [got]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and torch.allclose(g, w, rtol=1e-9, atol=1e-9)
