"""Modules on a GPU: the float64 work runs on the CPU, the fused module's convs go back to the module's device."""

from __future__ import annotations

import pytest
import torch

import convmerge
from convmerge.graph import parse

from . import nets

CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("make, channels", [(nets.expandnet, 4), (lambda: nets.RepVGGBlock(8), 8),
                                            (lambda: nets.DBBLike(4, bn_pad=False), 4)])
def test_a_cuda_module_is_checked_and_fused_on_its_device(make, channels):
    net = nets.randomize_bn(make()).double().eval().cuda()
    rep = convmerge.check(net)
    assert rep["merges"] and rep["summary"]["layers_removed"] > 0
    fused = convmerge.fuse(net, policy="all")
    assert {p.device.type for p in fused.parameters()} == {"cuda"}
    x = torch.randn(2, channels, 11, 13, dtype=torch.float64, device="cuda")
    with torch.no_grad():
        assert torch.allclose(fused(x), net(x), atol=1e-9)


def test_the_plan_loads_tensors_to_the_cpu_in_float64():
    """What makes the GPU case work (and runs everywhere): tensors of any device and dtype are loaded as float64
    CPU copies, so the merge arithmetic never mixes devices."""
    from convmerge.engine import plan

    class Meta:
        shape, dtype, is_float = (2, 2, 1, 1), "F16", True

    seen = []

    def get(name):
        t = torch.ones(2, 2, 1, 1, dtype=torch.float16)
        seen.append(name)
        return t

    graph = parse({"version": 1, "inputs": ["x"], "layers": [
        {"name": "a", "op": "conv2d", "input": "x"}], "outputs": ["a"]}, {"a.weight": Meta()})
    conv = plan.Loader(graph, plan.Tensors({"a.weight": Meta()}, get)).conv("a")
    assert conv.weight.dtype == torch.float64 and conv.weight.device.type == "cpu" and seen == ["a.weight"]
