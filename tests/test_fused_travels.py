"""A fused module that travels (issue 22.3): `torch.save` / `torch.load` round-trip on every net of the suite,
the loaded module computes what the original does at shapes other than the traced one, `torch.export` and
`torch.compile` take it, and its state dict loads into the module `convmerge.load` builds from the fused file
of the same net (both routes name a merged conv after its unit, `plan.Unit.name`).

The oracle is always the original module run eagerly in float64."""

from __future__ import annotations

import io
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import convmerge
from convmerge import model
from convmerge.backends import rebuild

from . import nets

NAMES = sorted(nets.ALL)


def prepared(name: str) -> nn.Module:
    torch.manual_seed(0)
    return nets.randomize_bn(nets.ALL[name]().double(), 0).eval()


def x(name: str, batch: int, n: int) -> torch.Tensor:
    nd = nets.INPUT_DIMS.get(name, 2)
    shape = (n,) * nd if nd != 2 else (n, n + 5)
    return torch.randn(batch, nets.CHANNELS[name], *shape, dtype=torch.float64)


def fused_of(name: str, net: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convmerge.fuse(net, example_inputs=(x(name, 1, 12),))


def same(original: nn.Module, other: nn.Module, *inputs: torch.Tensor) -> None:
    with torch.no_grad():
        want, got = original(*inputs), other(*inputs)
    assert want.shape == got.shape
    assert torch.allclose(want, got, rtol=1e-9, atol=1e-9), (want - got).abs().max()


def round_trip(module: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("name", NAMES)
def test_torch_save_and_load_round_trip_and_compute_the_original(name: str) -> None:
    net = prepared(name)
    fused = fused_of(name, net)
    loaded = round_trip(fused)
    assert isinstance(loaded, rebuild.FusedModule)
    with pytest.raises(RuntimeError, match="cannot be put in training mode"):
        loaded.train()
    assert loaded.state_dict().keys() == fused.state_dict().keys()
    assert all(torch.equal(v, fused.state_dict()[k]) for k, v in loaded.state_dict().items())
    for batch, n in ((2, 12), (2, 13), (1, 7), (3, 9)):  # the traced size at batch 2, odd sizes
        same(net, loaded, x(name, batch, n))
    again = round_trip(loaded)  # a loaded module pickles again
    same(net, again, x(name, 2, 11))


@pytest.mark.parametrize("name", NAMES)
def test_torch_export_takes_the_fused_module(name: str) -> None:
    net = prepared(name)
    fused = round_trip(fused_of(name, net))
    example = x(name, 1, 12)
    program = torch.export.export(fused, (example,))
    same(net, program.module(), x(name, 1, 12))
    dims = {0: torch.export.Dim.AUTO, **{k: torch.export.Dim.AUTO for k in range(2, example.dim())}}
    program = torch.export.export(fused, (x(name, 2, 12),), dynamic_shapes=(dims,))  # batch 1 would specialize
    same(net, program.module(), x(name, 3, 13))


def test_torch_compile_takes_the_fused_module() -> None:
    net = prepared("residual")
    fused = round_trip(fused_of("residual", net))
    start = time.perf_counter()
    compiled = torch.compile(fused)
    same(net, compiled, x("residual", 2, 12))
    assert time.perf_counter() - start < 60  # it compiled, not hung (about 5 s here)


@pytest.mark.parametrize("name", NAMES)
def test_fused_state_dict_loads_into_the_module_load_builds_from_the_fused_file(tmp_path: Path, name: str) -> None:
    """Two routes to one fused net: `fuse(net)` in Python, and save -> fuse_file -> load.  Both name each merged
    conv after its unit, so the keys agree and one route's weights run in the other's module."""
    net = prepared(name)
    fused = fused_of(name, net)
    src, out = tmp_path / "m.safetensors", tmp_path / "m.fused.safetensors"
    convmerge.save(net, src)
    model.fuse_file(str(src), str(out))
    built = convmerge.load(out)
    assert sorted(built.state_dict()) == sorted(fused.state_dict())
    with torch.no_grad():  # scramble, so that only what load_state_dict copies can make it right
        for t in built.state_dict().values():
            t.copy_(torch.randn_like(t) if t.is_floating_point() else t)
    built.load_state_dict(fused.state_dict(), strict=True)
    for batch, n in ((1, 12), (2, 13)):
        same(net, built, x(name, batch, n))
