"""Models end to end: module -> fused module, module -> file -> fused file, against the originals."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import convmerge
from convmerge import io, model
from convmerge.frontends.modules import conv_calls
from convmerge.options import Options

from . import models, nets


def sizes_for(name: str) -> list[tuple[int, ...]]:
    nd = nets.INPUT_DIMS.get(name, 2)
    return [(n,) * nd for n in (7, 8, 13)] + ([(9, 14)] if nd == 2 else [])


@pytest.mark.parametrize("name", sorted(nets.ALL))
@pytest.mark.parametrize("policy", ["cheaper", "all"])
def test_fused_module_computes_the_same_function(name, policy):
    torch.manual_seed(0)
    net = nets.ALL[name]().double().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fused = convmerge.fuse(net, policy=policy)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), "the original module must stay untouched"
    for size in sizes_for(name):
        x = torch.randn(2, nets.CHANNELS[name], *size, dtype=torch.float64)
        assert torch.allclose(fused(x), net(x), rtol=1e-9, atol=1e-9), size


@pytest.mark.parametrize("name", sorted(nets.ALL))
def test_fused_file_computes_the_same_function(tmp_path, name):
    torch.manual_seed(1)
    net = nets.ALL[name]().double().eval()
    src = tmp_path / "m.safetensors"
    convmerge.save(net, src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    out = tmp_path / "m.fused.safetensors"
    rep = model.fuse_file(str(src), str(out), Options(policy="all"))
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest
    doc0, state0 = models.described(src)
    doc1, state1 = models.described(out)
    for size in sizes_for(name):
        x = torch.randn(1, nets.CHANNELS[name], *size, dtype=torch.float64)
        assert torch.allclose(models.evaluate(doc1, state1, x)[0], net(x), rtol=1e-9, atol=1e-9)
        assert torch.allclose(models.evaluate(doc0, state0, x)[0], net(x), rtol=1e-9, atol=1e-9)
    assert rep.summary()["merged"] == sum(p.applied for p in rep.pairs)
    # Self-describing: a second fuse finds nothing more.
    again = model.fuse_file(str(out), str(tmp_path / "again.safetensors"), Options(policy="all"))
    assert again.summary()["merged"] == 0
    # Untouched tensors are copied bit for bit; the header says format pt.
    kept = set(state0) & set(state1)
    merged_into = {m.into for m in rep.merges}
    for k in kept:
        if k.rsplit(".", 1)[0] not in merged_into:
            assert torch.equal(state0[k], state1[k]), k
    assert io.read_header(out).metadata["format"] == "pt"
    assert oct(os.stat(out).st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_conv_feeding_two_consumers_is_never_merged_away():
    net = nets.Branches().double()
    rep = convmerge.check(net)
    verdicts = {(p["first"], p["second"]): p["verdict"] for p in rep["pairs"]}
    assert verdicts[("stem", "left")] == "skipped" and verdicts[("stem", "right")] == "skipped"
    fused = convmerge.fuse(net, policy="all")
    assert conv_calls(fused) == 4
    x = torch.randn(1, 3, 9, 9, dtype=torch.float64)
    assert torch.allclose(fused(x), net(x), atol=1e-9)


def test_expandnet_collapses_and_costs_less():
    net = nets.expandnet().double()
    fused = convmerge.fuse(net)
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and convs[0].kernel_size == (3, 3)
    rep = convmerge.check(net, input_size=(32, 32))
    (merge,) = rep["merges"]
    assert merge["macs"]["after"] < merge["macs"]["before"]
    assert merge["params"] == {"before": 4 * 16 + 16 * 16 * 9 + 16 * 4 + 4, "after": 4 * 4 * 9 + 4}


def test_a_linear_residual_block_with_a_batch_norm_becomes_one_conv():
    """relu(conv3(conv2(bn(conv1(x)))) + x): the chain and the identity branch both read x, so the block
    up to the add is one region, and one 5x5 conv (the ReLU stays)."""
    net = nets.randomize_bn(nets.Residual()).double()
    fused = convmerge.fuse(net, policy="all")
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and convs[0].kernel_size == (5, 5)
    assert not [m for m in fused.modules() if isinstance(m, nn.BatchNorm2d)]
    x = torch.randn(1, 8, 10, 10, dtype=torch.float64)
    assert torch.allclose(fused(x), net(x), atol=1e-9)


def test_batch_norm_after_a_merged_chain_is_absorbed(tmp_path):
    net = nets.randomize_bn(nets.vgg_bn()).double()
    fused = convmerge.fuse(net, policy="all")
    assert not [m for m in fused.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len([m for m in fused.modules() if isinstance(m, nn.Conv2d)]) == 2
    x = torch.randn(1, 3, 9, 9, dtype=torch.float64)
    assert torch.allclose(fused(x), net(x), atol=1e-9)
    src = tmp_path / "v.safetensors"
    convmerge.save(net, src)
    model.fuse_file(str(src), str(tmp_path / "o.safetensors"), Options(policy="all"))
    doc, state = models.described(tmp_path / "o.safetensors")
    assert [layer["op"] for layer in doc["layers"]] == ["conv2d", "relu", "conv2d", "relu"]
    assert doc["layers"][3]["input"] == "7" and not any(k.startswith(("1.", "3.", "6.", "8.")) for k in state)
    assert torch.allclose(models.evaluate(doc, state, x)[0], net(x), atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_weights_merge_in_float64_and_keep_their_dtype(tmp_path, dtype):
    net = nets.expandnet().to(dtype)
    src = tmp_path / "m.safetensors"
    convmerge.save(net, src)
    rep = model.fuse_file(str(src), str(tmp_path / "o.safetensors"))
    (merge,) = rep.merges
    assert merge.dtype == io.dtype_name(dtype)
    assert merge.max_error < 1e-12
    eps = torch.finfo(dtype).eps
    assert merge.rounding_error < 50 * eps
    h = io.read_header(tmp_path / "o.safetensors")
    assert {t.dtype for t in h.tensors.values()} == {io.dtype_name(dtype)}


def test_nan_weights_refuse_that_merge_only(tmp_path):
    net = nn.Sequential(nn.Conv2d(2, 2, 1, bias=False), nn.Conv2d(2, 2, 1, bias=False), nn.ReLU(),
                        nn.Conv2d(2, 2, 1, bias=False), nn.Conv2d(2, 2, 1, bias=False))
    with torch.no_grad():
        net[0].weight[0, 0, 0, 0] = float("nan")
    rep = convmerge.check(net, policy="all")
    by = {(p["first"], p["second"]): p for p in rep["pairs"]}
    assert by[("0", "1")]["verdict"] == "skipped" and "NaN" in by[("0", "1")]["reason"]
    assert by[("3", "4")]["applied"]


def test_integer_weights_are_never_merged_and_copied_untouched(tmp_path):
    doc = {"version": 1, "inputs": ["x"], "layers": [
        {"name": "a", "op": "conv2d", "input": "x"}, {"name": "b", "op": "conv2d", "input": "a"}], "outputs": ["b"]}
    state = {"a.weight": torch.randint(-5, 5, (2, 2, 1, 1), dtype=torch.int8), "b.weight": torch.randn(2, 2, 1, 1)}
    src = tmp_path / "q.safetensors"
    save_file(state, src, metadata={"convmerge.graph": json.dumps(doc)})
    rep = model.fuse_file(str(src), str(tmp_path / "o.safetensors"), Options(policy="all"))
    assert rep.pairs[0].verdict == "skipped" and not rep.merges
    h = io.read_header(tmp_path / "o.safetensors")
    assert torch.equal(io.read_tensor(h, "a.weight"), state["a.weight"])


def test_size_dependent_pair_merges_only_with_a_fitting_input_size():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False), nn.Conv2d(4, 3, 3, padding=1, bias=False))
    assert convmerge.check(net)["pairs"][0]["verdict"] == "size-dependent"
    assert not convmerge.check(net, input_size=(32, 32), policy="all")["merges"]
    fused = convmerge.fuse(net.double(), input_size=(33, 33), policy="all")
    x = torch.randn(1, 3, 33, 33, dtype=torch.float64)
    assert len([m for m in fused.modules() if isinstance(m, nn.Conv2d)]) == 1
    assert torch.allclose(fused(x), net.double()(x), atol=1e-9)


def test_export_program_runs_without_the_original_code(tmp_path):
    from convmerge import api

    net = nets.expandnet().eval()
    fused = convmerge.fuse(net)
    path = tmp_path / "fused.pt2"
    api.export(fused, (1, 4, 16, 16), path)
    program = torch.export.load(str(path))
    x = torch.randn(1, 4, 16, 16)
    assert torch.allclose(program.module()(x), net(x), atol=1e-5)


def test_fuse_without_description_refuses_with_advice(tmp_path):
    src = tmp_path / "bare.safetensors"
    save_file({"w.weight": torch.randn(2, 2, 3, 3)}, src)
    with pytest.raises(model.GraphError, match="no graph description"):
        model.fuse_file(str(src), str(tmp_path / "o.safetensors"))
    assert not (tmp_path / "o.safetensors").exists()
