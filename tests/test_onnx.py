"""ONNX in and out: `convmerge check/fuse model.onnx` (convmerge.frontends.onnx_read, onnx_write, onnx_model).

Models are exported from the suite's own modules with PyTorch's TorchScript exporter (`dynamo=False`:
the dynamo exporter needs onnxscript, which convmerge does not depend on), with batch norms kept
(`do_constant_folding=False`), or built node by node with onnx.helper.  Three oracles: the PyTorch
module itself, onnxruntime running the original file, and tests/models.py's float64 evaluator running
the description convmerge read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import numpy as np  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import convmerge  # noqa: E402
from convmerge import model as cm_model  # noqa: E402
from convmerge import onnx_model  # noqa: E402
from convmerge.cli import app  # noqa: E402
from convmerge.graph import GraphError  # noqa: E402
from convmerge.io import ModelFileError  # noqa: E402
from convmerge.frontends.onnx_read import read_model  # noqa: E402
from convmerge.engine.plan import VerificationError  # noqa: E402
from convmerge.options import Options  # noqa: E402

from . import nets  # noqa: E402
from .models import evaluate  # noqa: E402

runner = CliRunner()
CURRENT = onnx.defs.onnx_opset_version()
F32_TOL = onnx_model.TOLERANCE["tensor(float)"]


# --- helpers -------------------------------------------------------------------------------------


def export(module: nn.Module, shape: Sequence[int], path: Path, *, opset: int = 17, dynamic: bool = False) -> Path:
    """`module` (eval) as ONNX, batch norms kept as BatchNormalization nodes."""
    axes = {"x": {0: "n", **{k: f"s{k}" for k in range(2, len(shape))}}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.randn(*shape),), str(path), dynamo=False, opset_version=opset,
                          do_constant_folding=False, input_names=["x"], output_names=["y"], dynamic_axes=axes)
    return path


def build(nodes: list, inits: dict[str, np.ndarray], shape: Sequence[Any], *, opset: int = 17,
          elem: int = TensorProto.FLOAT, outputs: Sequence[str] = ("y",)) -> onnx.ModelProto:
    """A one-input model from nodes and numpy initializers."""
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, list(shape))],
                          [helper.make_tensor_value_info(o, elem, [None] * len(shape)) for o in outputs],
                          initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def save(proto: onnx.ModelProto, path: Path) -> Path:
    onnx.save(proto, str(path))
    return path


def weights(*shape: int, seed: int = 0) -> np.ndarray:
    gen = np.random.default_rng(seed)
    return (gen.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)


def run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def fuse(path: Path, **kwargs: Any) -> tuple[Path, dict]:
    out = path.with_name(path.name.removesuffix(".onnx") + ".fused.onnx")
    report = cm_model.fuse_file(str(path), str(out), Options(**kwargs)).to_dict()
    return out, report


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b)) / max(np.max(np.abs(a)), 1e-30))


def assert_round_trip(path: Path, out: Path, shape: Sequence[int], module: Optional[nn.Module] = None) -> None:
    """The fused file passes the full check and computes what the original (and the module) compute."""
    onnx.checker.check_model(str(out), full_check=True)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    want, got = run(path, x), run(out, x)
    for a, b in zip(want, got):
        assert a.shape == b.shape
        assert relative(a, b) <= F32_TOL
    if module is not None:
        with torch.no_grad():
            ref = module.double()(torch.from_numpy(x).double()).numpy()
        module.float()
        assert relative(ref, got[0]) <= F32_TOL


def cli(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args])


# --- round trips of the suite's modules -------------------------------------------------------------

MODULES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    # name: (module, input shape, convs in the fused model)
    "expandnet": (nets.expandnet, (1, 4, 12, 12), 1),
    "tucker": (lambda: nn.Sequential(nn.Conv2d(8, 2, 1, bias=False), nn.Conv2d(2, 2, 3, padding=1),
                                     nn.Conv2d(2, 8, 1)), (1, 8, 10, 10), None),
    "repvgg": (lambda: nets.randomize_bn(nets.TinyRepVGG()), (1, 3, 32, 32), 4),
    "acnet": (lambda: nets.randomize_bn(nets.ACBlock(4)), (1, 4, 9, 9), 1),
    "mobileone": (lambda: nets.randomize_bn(nets.MobileOneBlock(4)), (1, 4, 9, 9), 1),
    "replknet": (lambda: nets.randomize_bn(nets.LargeKernel(4)), (1, 4, 11, 11), 1),
    "pool": (lambda: nets.randomize_bn(nets.PoolBranch(4, True)), (1, 4, 9, 9), 1),
    "inception": (lambda: nets.Inception(3), (1, 3, 9, 9), 1),
    "vgg": (lambda: nets.randomize_bn(nets.vgg_bn()), (1, 3, 12, 12), 2),
    "grouped": (lambda: nets.randomize_bn(nets.grouped_chain()), (1, 4, 13, 13), None),
    "conv1d": (nets.conv1d_chain, (1, 2, 20), None),
    "conv3d": (nets.conv3d_pair, (1, 2, 7, 7, 7), 1),
    "same_reflect": (nets.same_padding_chain, (1, 3, 12, 12), None),
    "residual": (lambda: nets.randomize_bn(nets.Residual()), (1, 8, 9, 9), None),
    "odd_even": (lambda: nets.OddEven(4), (1, 4, 10, 10), 1),
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_round_trip_is_exact_under_onnxruntime(tmp_path: Path, name: str) -> None:
    make, shape, convs = MODULES[name]
    torch.manual_seed(0)
    module = make().eval()
    path = export(module, shape, tmp_path / f"{name}.onnx")
    out, report = fuse(path)
    assert_round_trip(path, out, shape, module)
    assert report["onnxruntime"] is not None and report["onnxruntime"]["relative_difference"] <= F32_TOL
    assert report["merges"], report["regions"]
    if convs is not None:
        assert ops(out).count("Conv") == convs
    assert len(ops(out)) < len(ops(path))


@pytest.mark.parametrize("name,opset", [("repvgg", 11), ("expandnet", 17), ("acnet", 13)])
def test_dynamic_sizes_mean_every_size(tmp_path: Path, name: str, opset: int) -> None:
    make, shape, convs = MODULES[name]
    torch.manual_seed(0)
    module = make().eval()
    path = export(module, shape, tmp_path / f"{name}.onnx", dynamic=True, opset=opset)
    out, report = fuse(path)
    assert report["input_size"] is None
    assert ops(out).count("Conv") == convs
    assert len(report["onnxruntime"]["inputs"]) == 2  # two sizes ran
    for size in (17, 40):
        assert_round_trip(path, out, (2, shape[1], size, size), module)


def test_static_size_acts_as_input_size(tmp_path: Path) -> None:
    """OddEven is one conv only at even sizes: merged at the model's fixed 10x10, not where it is symbolic."""
    module = nets.OddEven(4).eval()
    static = export(module, (1, 4, 10, 10), tmp_path / "static.onnx")
    dynamic = export(module, (1, 4, 10, 10), tmp_path / "dynamic.onnx", dynamic=True)
    assert cm_model.check_file(str(static)).to_dict()["input_size"] == [10, 10]
    assert cm_model.check_file(str(static)).to_dict()["regions"][0]["applied"] is True
    assert cm_model.check_file(str(dynamic)).to_dict()["regions"][0]["applied"] is False
    assert cm_model.check_file(str(dynamic), Options(input_size=(10, 10))).to_dict()["regions"][0]["applied"] is True
    with pytest.raises(GraphError, match="fixes its input size at 10x10"):
        cm_model.check_file(str(static), Options(input_size=(12, 12)))


def test_a_dynamic_model_fused_at_a_given_size_is_compared_at_that_size(tmp_path: Path) -> None:
    """OddEven merges at 10x10 only: onnxruntime compares there, not at its trial sizes (57 would differ)."""
    torch.manual_seed(0)
    module = nets.OddEven(4).eval()
    dynamic = export(module, (1, 4, 10, 10), tmp_path / "dynamic.onnx", dynamic=True)
    out, report = fuse(dynamic, input_size=(10, 12))
    assert report["regions"][0]["applied"] is True and report["onnxruntime"]["inputs"] == ["1x4x10x12"]
    assert_round_trip(dynamic, out, (2, 4, 10, 12), module)


def test_static_sizes_carry_past_opaque_nodes(tmp_path: Path) -> None:
    """3x3 s2 p1 then 3x3 p1 is exact only at odd sizes: behind a MaxPool (opaque), the size shape inference
    gives for the static input decides; a symbolic input leaves it unmerged."""
    for size, merged in ((18, True), (16, False), ("h", False)):
        nodes = [helper.make_node("MaxPool", ["x"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
                 helper.make_node("Conv", ["p", "w1"], ["a"], name="c1", strides=[2, 2], pads=[1, 1, 1, 1]),
                 helper.make_node("Conv", ["a", "w2"], ["y"], name="c2", pads=[1, 1, 1, 1])]
        proto = build(nodes, {"w1": weights(4, 4, 3, 3), "w2": weights(4, 4, 3, 3, seed=1)}, [1, 4, size, size])
        path = save(proto, tmp_path / f"m{size}.onnx")
        report = cm_model.check_file(str(path), Options(policy="all")).to_dict()
        (pair,) = report["pairs"]
        assert pair["verdict"] == "size-dependent" and pair["applied"] is merged, (size, pair)
        if merged:
            out, _ = fuse(path, policy="all")
            assert ops(out) == ["MaxPool", "Conv"]
            assert_round_trip(path, out, (1, 4, size, size))


def test_same_merged_weights_as_the_pytorch_path(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = nets.randomize_bn(nn.Sequential(nets.TinyRepVGG(), nets.ACBlock(16), nn.Conv2d(16, 4, 1),
                                             nn.Conv2d(4, 4, 3, padding=1)))
    fused = convmerge.fuse(module, input_size=(32, 32))
    torch_weights = [fused.get_submodule(n.target).weight.detach() for n in fused.graph.nodes  # the merged convs
                     if n.op == "call_module" and isinstance(fused.get_submodule(n.target), nn.Conv2d)
                     and n.target != "3"]  # the last 3x3, unmerged: a call of the original module where fx traced
    path = export(module, (1, 3, 32, 32), tmp_path / "m.onnx")
    out, _ = fuse(path)
    proto = onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    onnx_weights = [torch.from_numpy(inits[n.input[1]].copy()) for n in proto.graph.node
                    if n.op_type == "Conv" and n.doc_string.startswith("convmerge: merged")]
    assert len(onnx_weights) == len(torch_weights) == 5  # the last 3x3 is not merged: the other path keeps it
    for a, b in zip(onnx_weights, torch_weights):
        assert a.shape == b.shape
        # the same float64 arithmetic on the same float32 parameters; ONNX stores epsilon as a float32
        torch.testing.assert_close(a, b, rtol=2 * torch.finfo(torch.float32).eps, atol=1e-7)


def test_dbb_branch_with_zero_padding_stays_unmergeable(tmp_path: Path) -> None:
    path = export(nets.randomize_bn(nets.DBBLike(4, bn_pad=False)), (1, 4, 8, 8), tmp_path / "dbb.onnx")
    report = cm_model.check_file(str(path)).to_dict()
    region = next(r for r in report["regions"] if r["kind"] == "branches")
    assert region["verdict"] == "unmergeable" and region["applied"] is False
    assert "zero padding" in region["reason"]
    assert region["counterexample"] is not None and region["counterexample"]["input_shape"] == [1, 4, 8, 8]
    out, report = fuse(path)
    assert_round_trip(path, out, (1, 4, 8, 8))
    # the 3x3 conv still reads the zero-padded output of the batch norm before it (both folded into convs)
    assert not any({"/kxk_first/kxk_first.0/Conv", "/kxk/kxk.0/Conv"} <= set(m["layers"]) for m in report["merges"])
    assert ops(out).count("Conv") == 5


def test_unmergeable_pair_gets_a_counterexample(tmp_path: Path) -> None:
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", pads=[0, 0, 0, 0]),
             helper.make_node("Conv", ["a", "w2"], ["y"], name="c2", pads=[2, 2, 2, 2])]
    path = save(build(nodes, {"w1": weights(2, 2, 3, 3), "w2": weights(2, 2, 3, 3, seed=1)}, [1, 2, 9, 9]),
                tmp_path / "m.onnx")
    report = cm_model.check_file(str(path)).to_dict()
    (pair,) = report["pairs"]
    assert pair["verdict"] == "unmergeable" and pair["counterexample"]["input_shape"] == [1, 2, 9, 9]
    result = cli("check", path, "--counterexamples", tmp_path / "ce", "--json")
    assert result.exit_code == 0, result.stderr
    assert len(os.listdir(tmp_path / "ce")) == 1


# --- models built node by node ---------------------------------------------------------------------


def chain(first: dict, second: dict, *, opset: int = 17, shape: Sequence[Any] = (1, 3, 11, 11),
          seed: int = 0) -> onnx.ModelProto:
    """conv c1 (no bias) then conv c2 (with a bias), 3x3 unless a kernel_shape says otherwise."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", **first),
             helper.make_node("Conv", ["a", "w2", "b2"], ["y"], name="c2", **second)]
    k1, k2 = first.get("kernel_shape", [3, 3]), second.get("kernel_shape", [3, 3])
    g2 = second.get("group", 1)
    inits = {"w1": weights(4, 3, *k1, seed=seed), "w2": weights(4, 4 // g2, *k2, seed=seed + 2),
             "b2": weights(4, seed=seed + 3)}
    return build(nodes, inits, shape, opset=opset)


ONE = {"kernel_shape": [1, 1]}
CHAINS = {  # each exact at every size (or at the model's static 11x11)
    "asymmetric_second": (ONE, {"pads": [0, 1, 1, 0]}),
    "asymmetric_first": ({"pads": [0, 1, 1, 0]}, ONE),
    "same_upper_stride2": ({"auto_pad": "SAME_UPPER", "strides": [2, 2]}, ONE),
    "same_lower": ({"auto_pad": "SAME_LOWER", "kernel_shape": [2, 2]}, ONE),
    "valid_dilated": ({"auto_pad": "VALID", "dilations": [2, 1]}, {"strides": [2, 2], "pads": [0, 0, 0, 0]}),
    "grouped": ({"pads": [1, 1, 1, 1]}, {**ONE, "group": 2}),
}


@pytest.mark.parametrize("opset", [11, CURRENT])
@pytest.mark.parametrize("name", sorted(CHAINS))
def test_helper_chains(tmp_path: Path, name: str, opset: int) -> None:
    first, second = CHAINS[name]
    path = save(chain(first, second, opset=opset), tmp_path / "m.onnx")
    read = read_model(str(path))
    x = np.random.default_rng(0).standard_normal((1, 3, 11, 11)).astype(np.float32)
    tensors = {k: read.tensors.get(k) for k in read.tensors.info}
    (ref,) = evaluate(read.graph.doc, tensors, torch.from_numpy(x))
    assert relative(run(path, x)[0], ref.numpy()) <= F32_TOL  # the description computes what the file does
    out, report = fuse(path, policy="all")
    assert ops(out) == ["Conv"], report["pairs"]
    assert_round_trip(path, out, (1, 3, 11, 11))
    assert onnx.load(str(out)).opset_import[0].version == opset


def test_same_with_stride_needs_a_static_size(tmp_path: Path) -> None:
    path = save(chain(*CHAINS["same_upper_stride2"], shape=["n", 3, "h", "w"]), tmp_path / "m.onnx")
    report = cm_model.check_file(str(path)).to_dict()
    assert report["pairs"] == [] and any("auto_pad SAME" in n and "'c1'" in n for n in report["notes"])
    stride1 = save(chain({"auto_pad": "SAME_UPPER", "kernel_shape": [2, 2]}, ONE, shape=["n", 3, "h", "w"]),
                   tmp_path / "s1.onnx")
    out, report = fuse(stride1, policy="all")
    assert ops(out) == ["Conv"]
    assert_round_trip(stride1, out, (1, 3, 8, 6))


def test_pad_modes_and_values(tmp_path: Path) -> None:
    """Pad nodes (pads as an initializer or a Constant node) become pad layers; a reflect-padded merge is
    written as Pad then Conv, a constant pad with a value other than zero is judged like any other."""
    for mode, value, merged in (("reflect", None, ["Pad", "Conv"]), ("edge", None, ["Pad", "Conv"]),
                                ("constant", 0.0, ["Conv"]), ("constant", 0.5, ["Constant", "Pad", "Conv"])):
        pads = helper.make_node("Constant", [], ["p"], value=numpy_helper.from_array(
            np.array([0, 0, 1, 2, 0, 0, 1, 0], dtype=np.int64), "p"))
        extra = ["v"] if value is not None else []
        nodes = [pads, helper.make_node("Pad", ["x", "p", *extra], ["a"], name="pad", mode=mode),
                 helper.make_node("Conv", ["a", "w1"], ["b"], name="c1"),
                 helper.make_node("Conv", ["b", "w2"], ["y"], name="c2")]
        inits = {"w1": weights(4, 3, 3, 3), "w2": weights(4, 4, 1, 1, seed=1)}
        if value is not None:
            inits["v"] = np.array(value, dtype=np.float32)
        path = save(build(nodes, inits, [1, 3, 9, 9]), tmp_path / f"{mode}{value}.onnx")
        out, report = fuse(path, policy="all")
        assert ops(out) == merged, (mode, value, report["regions"])
        assert_round_trip(path, out, (1, 3, 9, 9))
        assert not {"p", "w1"} & {t.name for t in onnx.load(str(out)).graph.initializer} or value == 0.5


def _wrap_pad_model(tmp_path: Path, opset: int) -> Path:
    """A 'wrap' Pad, then a 3x3 conv and a 1x1 conv, saved as m.onnx."""
    pads = numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64), "p")
    nodes = [helper.make_node("Pad", ["x", "p"], ["a"], name="pad", mode="wrap"),
             helper.make_node("Conv", ["a", "w1"], ["b"], name="c1"),
             helper.make_node("Conv", ["b", "w2"], ["y"], name="c2")]
    proto = build(nodes, {"w1": weights(4, 3, 3, 3), "w2": weights(4, 4, 1, 1, seed=1)}, [1, 3, 8, 8], opset=opset)
    proto.graph.initializer.append(pads)
    path = save(proto, tmp_path / "m.onnx")
    return path


def test_wrap_pad_is_circular(tmp_path: Path) -> None:
    path = _wrap_pad_model(tmp_path, opset=19)
    out, _ = fuse(path, policy="all")
    assert ops(out) == ["Pad", "Conv"]
    assert onnx.load(str(out)).graph.node[0].attribute[0].s == b"wrap"
    assert_round_trip(path, out, (1, 3, 8, 8))


def test_wrap_pad_before_opset_19_is_bad_input(tmp_path: Path) -> None:
    """A 'wrap' Pad in a model whose opset has none (before 19): its merge cannot be written back, which is
    the input's limit, named with the layer and the field (exit 2), not an internal error; nothing written."""
    path = _wrap_pad_model(tmp_path, opset=17)
    before = path.read_bytes()
    result = cli("fuse", path, "--policy", "all", "-o", tmp_path / "out.onnx")
    assert result.exit_code == 2, result.output
    assert "m.onnx" in result.output and "layer 'c2'" in result.output, result.output
    assert "padding_mode circular" in result.output and "opset 17" in result.output, result.output
    assert "internal" not in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"] and path.read_bytes() == before


def test_pool_dropout_identity_concat(tmp_path: Path) -> None:
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Dropout", ["a"], ["b", "mask"], name="drop"),
             helper.make_node("Identity", ["b"], ["c"], name="id"),
             helper.make_node("AveragePool", ["x"], ["d"], name="pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                              count_include_pad=1),
             helper.make_node("Concat", ["c", "d"], ["y"], name="cat", axis=-3)]
    path = save(build(nodes, {"w1": weights(4, 3, 3, 3)}, [1, 3, 9, 9]), tmp_path / "m.onnx")
    out, report = fuse(path, policy="all")
    assert ops(out) == ["Conv"], report["regions"]
    assert_round_trip(path, out, (1, 3, 9, 9))


def test_opaque_nodes_block_merges(tmp_path: Path) -> None:
    """Add of a constant varying along the spatial axes or of a broadcast value, asymmetric pooling, a Split's two outputs, a value read
    inside an If's branch: none may be merged across."""
    w = weights(4, 4, 3, 3)
    cases = {
        "add_constant": [helper.make_node("Conv", ["x", "w"], ["a"], name="c1", pads=[1, 1, 1, 1]),
                         helper.make_node("Add", ["a", "k"], ["b"], name="add"),
                         helper.make_node("Conv", ["b", "w"], ["y"], name="c2")],
        "add_broadcast": [helper.make_node("Conv", ["x", "w"], ["a"], name="c1", pads=[1, 1, 1, 1]),
                          helper.make_node("ReduceMean", ["x"], ["m"], name="mean", axes=[2, 3]),
                          helper.make_node("Add", ["a", "m"], ["b"], name="add"),
                          helper.make_node("Conv", ["b", "w"], ["y"], name="c2")],
        "asymmetric_pool": [helper.make_node("Conv", ["x", "w"], ["a"], name="c1", pads=[1, 1, 1, 1]),
                            helper.make_node("AveragePool", ["a"], ["b"], name="pool", kernel_shape=[2, 2],
                                             pads=[0, 0, 1, 1]),
                            helper.make_node("Conv", ["b", "w"], ["y"], name="c2")],
        "split": [helper.make_node("Split", ["x"], ["s0", "s1"], name="split", axis=1, num_outputs=2),
                  helper.make_node("Conv", ["s0", "w2"], ["a"], name="c1", pads=[1, 1, 1, 1]),
                  helper.make_node("Conv", ["s1", "w2"], ["b"], name="c2", pads=[1, 1, 1, 1]),
                  helper.make_node("Add", ["a", "b"], ["y"], name="add")],
    }
    for name, nodes in cases.items():
        opset = 18 if name == "split" else 17
        inits = {"w": w, "k": weights(1, 4, 8, 8, seed=3), "w2": weights(4, 2, 3, 3)}  # k: one value per position
        used = {v for n in nodes for v in n.input}
        proto = build(nodes, {k: v for k, v in inits.items() if k in used}, [1, 4, 8, 8], opset=opset)
        path = save(proto, tmp_path / f"{name}.onnx")
        out, report = fuse(path, policy="all")
        assert ops(out) == ops(path), (name, report["merges"])
        assert_round_trip(path, out, (1, 4, 8, 8))


def test_value_read_inside_a_subgraph_is_kept(tmp_path: Path) -> None:
    then = helper.make_graph([helper.make_node("Identity", ["a"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "w2"], ["y"], name="c2"),
             helper.make_node("If", ["cond"], ["z"], name="if", then_branch=then, else_branch=other)]
    proto = build(nodes, {"w1": weights(3, 3, 3, 3), "w2": weights(3, 3, 1, 1, seed=1),
                          "cond": np.array(True)}, [1, 3, 8, 8], outputs=("y", "z"))
    path = save(proto, tmp_path / "m.onnx")
    out, report = fuse(path, policy="all")
    assert report["merges"] == [] and ops(out) == ops(path)
    assert "has 2 consumers" in report["pairs"][0]["reason"]


def test_names_shared_weights_and_untouched_parts(tmp_path: Path) -> None:
    """Unnamed and duplicate node names get unique layer names; a weight two convs share stays for the one
    not merged; metadata, doc strings and opset imports survive; value_info of removed values goes."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "p"], ["b"], name="dup"),
             helper.make_node("Relu", ["b"], ["r"], name="dup", doc_string="keep me"),
             helper.make_node("Conv", ["r", "w"], ["y"], name="last", pads=[1, 1, 1, 1])]
    proto = build(nodes, {"w": weights(4, 4, 3, 3), "p": weights(4, 4, 1, 1, seed=1)}, [1, 4, 8, 8])
    proto.doc_string, proto.producer_name = "a model", "tests"
    helper.set_model_props(proto, {"author": "me"})
    proto.graph.value_info.append(helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 4, 8, 8]))
    proto.graph.value_info.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 4, 8, 8]))
    path = save(proto, tmp_path / "m.onnx")
    read = read_model(str(path))
    assert [layer["name"] for layer in read.graph.doc["layers"]] == ["a", "dup", "dup_2", "last"]
    out, report = fuse(path, policy="all")
    new = onnx.load(str(out))
    assert [n.op_type for n in new.graph.node] == ["Conv", "Relu", "Conv"]
    # the merged conv is layer 'dup' (c2's name); in the file the Relu still holds that name
    assert new.graph.node[0].name == "dup_2" and new.graph.node[0].output[0] == "b"
    assert new.graph.node[1].doc_string == "keep me"
    assert {t.name for t in new.graph.initializer} == {"w", "dup.weight"}
    assert [vi.name for vi in new.graph.value_info] == ["r"]
    assert (new.doc_string, new.producer_name, new.metadata_props[0].value) == ("a model", "tests", "me")
    onnx.checker.check_model(new, full_check=True)
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    want, got = (ReferenceEvaluator(str(p)).run(None, {"x": x})[0] for p in (path, out))  # onnxruntime refuses
    assert relative(want, got) <= F32_TOL  # two nodes of one name
    assert any("not run" in n for n in report["notes"])


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_dtypes_are_kept(tmp_path: Path, dtype: Any) -> None:
    """float16 and float64 weights stay so; onnxruntime has no float64 Conv on the CPU, so onnx's reference
    evaluator runs those."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "w2", "b2"], ["y"], name="c2")]
    inits = {"w1": weights(4, 3, 3, 3).astype(dtype), "w2": weights(4, 4, 1, 1, seed=1).astype(dtype),
             "b2": weights(4, seed=2).astype(dtype)}
    path = save(build(nodes, inits, [1, 3, 8, 8], elem=elem), tmp_path / "m.onnx")
    out, report = fuse(path, policy="all")
    new = onnx.load(str(out))
    assert {t.data_type for t in new.graph.initializer} == {elem}
    assert report["merges"][0]["dtype"] == {np.float16: "F16", np.float64: "F64"}[dtype]
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(dtype)
    tolerance = onnx_model.TOLERANCE[{np.float16: "tensor(float16)", np.float64: "tensor(double)"}[dtype]]
    if dtype == np.float64:
        assert report["onnxruntime"] is None and any("onnxruntime cannot" in n for n in report["notes"])
        want, got = (ReferenceEvaluator(str(p)).run(None, {"x": x})[0] for p in (path, out))
    else:
        want, got = run(path, x)[0], run(out, x)[0]
        assert report["onnxruntime"]["relative_difference"] <= tolerance
    assert relative(want, got) <= tolerance


def test_bfloat16_weights_are_read_and_written_as_bfloat16(tmp_path: Path) -> None:
    w1 = torch.randn(4, 3, 3, 3).to(torch.bfloat16)
    w2 = torch.randn(4, 4, 1, 1).to(torch.bfloat16)

    def tensor(name: str, t: torch.Tensor) -> TensorProto:
        return helper.make_tensor(name, TensorProto.BFLOAT16, list(t.shape),
                                  t.view(torch.int16).numpy().tobytes(), raw=True)

    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "w2"], ["y"], name="c2")]
    proto = build(nodes, {}, [1, 3, 8, 8], elem=TensorProto.BFLOAT16)
    proto.graph.initializer.extend([tensor("w1", w1), tensor("w2", w2)])
    path = save(proto, tmp_path / "m.onnx")
    read = read_model(str(path))
    assert read.tensors.get("c1.weight").dtype == torch.bfloat16 and torch.equal(read.tensors.get("c1.weight"), w1)
    out, report = fuse(path, policy="all")
    (t,) = onnx.load(str(out)).graph.initializer
    assert t.data_type == TensorProto.BFLOAT16 and report["merges"][0]["dtype"] == "BF16"


def test_external_data_in_and_out(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = nets.randomize_bn(nets.TinyRepVGG())
    inline = export(module, (1, 3, 32, 32), tmp_path / "inline.onnx")
    folder = tmp_path / "ext"
    folder.mkdir()
    onnx.save(onnx.load(str(inline)), str(folder / "m.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="m.weights", size_threshold=0)
    path = folder / "m.onnx"
    out, report = fuse(path)
    assert (folder / "m.fused.onnx.data").is_file()
    assert_round_trip(path, out, (1, 3, 32, 32), module)
    new = onnx.load(str(out), load_external_data=False)
    assert {e.value for t in new.graph.initializer for e in t.external_data if e.key == "location"} == {
        "m.fused.onnx.data"}
    # the output never replaces the input's data file, and --force is needed to replace its own
    with pytest.raises(ModelFileError, match="exists"):
        cm_model.fuse_file(str(path), str(out))


def _initializers(path: Path) -> dict[str, bytes]:
    """Each initializer's bytes as onnx reads them (from the external data file where it is there)."""
    return {t.name: numpy_helper.to_array(t).tobytes() for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("keep_bytes", [None, 0])
def test_external_data_is_written_tensor_by_tensor(tmp_path: Path, keep_bytes: Optional[int],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The data file holds every large tensor at an aligned offset inside it; untouched tensors are the input's
    bytes, merged ones the bytes an inline output gets; with a memory budget of 0 (plan.KEEP_BYTES) every
    merged weight is dropped after verification and computed again when written, to the same bytes."""
    from convmerge.engine import plan as planning

    torch.manual_seed(0)
    module = nn.Sequential(nets.randomize_bn(nets.TinyRepVGG()), nn.Sigmoid(), nn.Conv2d(16, 4, 3))  # left alone
    inline = export(module, (1, 3, 32, 32), tmp_path / "inline.onnx")
    inline_out, _ = fuse(inline)
    folder = tmp_path / "ext"
    folder.mkdir()
    onnx.save(onnx.load(str(inline)), str(folder / "m.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="m.weights", size_threshold=0)
    if keep_bytes is not None:
        monkeypatch.setattr(planning, "KEEP_BYTES", keep_bytes)
        monkeypatch.setattr(onnx_model, "_keep_bytes", lambda inputs: keep_bytes)
    out, report = fuse(folder / "m.onnx")
    assert report["summary"]["regions_merged"] == 4
    assert sorted(os.listdir(folder)) == ["m.fused.onnx", "m.fused.onnx.data", "m.onnx", "m.weights"]
    size = (folder / "m.fused.onnx.data").stat().st_size
    spans = []
    for t in onnx.load(str(out), load_external_data=False).graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            where = {e.key: e.value for e in t.external_data}
            offset, length = int(where["offset"]), int(where["length"])
            assert where["location"] == "m.fused.onnx.data" and offset % 64 == 0 and offset + length <= size
            spans.append((offset, offset + length))
        else:
            assert len(t.raw_data) < 1024
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # no two tensors share bytes
    written, original, merged = _initializers(out), _initializers(folder / "m.onnx"), _initializers(inline_out)
    assert written == merged
    untouched = set(written) & set(original)
    assert untouched and all(written[k] == original[k] for k in untouched)
    assert set(written) - untouched  # the merged weights


def test_merged_weights_are_held_up_to_the_input_s_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the PyTorch path's budget (plan.KEEP_BYTES, 0 here), the ONNX path still holds its merged weights up to
    the input file's size: none is computed again when written."""
    from convmerge.engine import plan as planning

    monkeypatch.setattr(planning, "KEEP_BYTES", 0)
    built: list[Any] = []
    build = planning.build
    monkeypatch.setattr(planning, "build", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
    torch.manual_seed(0)
    path = export(nets.randomize_bn(nets.TinyRepVGG()), (1, 3, 32, 32), tmp_path / "m.onnx")
    fuse(path)
    (plan,) = built
    assert plan.applied and not any(u.dropped for u in plan.applied)
    assert plan.keep_bytes == path.stat().st_size


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.fc = nets.randomize_bn(nets.TinyRepVGG()), nn.Linear(16 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).reshape(1, -1)).reshape(2, 5)  # Reshapes to constant shapes: data propagation


def test_shapes_are_inferred_without_the_weights(tmp_path: Path) -> None:
    """Shape inference reads the weights as typed inputs, not their data: every value gets the shape onnx gives
    it with the weights (the oracle), data propagation through constant shapes included."""
    from convmerge.frontends import onnx_read

    torch.manual_seed(0)
    proto = onnx.load(str(export(_Head(), (1, 3, 32, 32), tmp_path / "head.onnx")))
    full = onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True).graph
    want = {vi.name: tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)
            for vi in (*full.value_info, *full.output)}
    got, notes = onnx_read._shapes(proto)
    assert not notes and want and {k: got.get(k) for k in want} == want
    assert want["y"] == (2, 5)


def test_onnxruntime_holds_one_model_at_a_time(repvgg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The original's outputs are taken and its session let go before the fused model is loaded."""
    import gc
    import weakref

    live: list[Any] = []
    most = [0]
    real = ort.InferenceSession

    def session(*args: Any, **kwargs: Any) -> Any:
        gc.collect()
        live[:] = [r for r in live if r() is not None]
        made = real(*args, **kwargs)
        live.append(weakref.ref(made))
        most[0] = max(most[0], len(live))
        return made

    monkeypatch.setattr(ort, "InferenceSession", session)
    _, report = fuse(repvgg)
    assert report["onnxruntime"]["relative_difference"] <= F32_TOL and most[0] == 1


def test_onnxruntime_sessions_sleep_and_use_the_runs_threads(repvgg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both sessions run the graph as written, on the run's thread count, with threads that do not spin (a
    spinning pool burnt the other core of a shared machine); the options are the session's, not the process's."""
    from convmerge.engine import algebra

    seen: list[tuple[int, int, str, str, Any]] = []
    real = ort.InferenceSession

    def entry(options: Any, key: str) -> str:
        try:
            return options.get_session_config_entry(key)
        except Exception:  # noqa: BLE001 - onnxruntime raises for a key never set
            return "unset"

    def session(path: Any, options: Any = None, *args: Any, **kwargs: Any) -> Any:
        seen.append((options.intra_op_num_threads, options.inter_op_num_threads,
                     entry(options, "session.intra_op.allow_spinning"),
                     entry(options, "session.inter_op.allow_spinning"), options.graph_optimization_level))
        return real(path, options, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", session)
    threads = torch.get_num_threads()
    with algebra.single_threaded(wide=3):
        _, report = fuse(repvgg)
    assert report["onnxruntime"]["relative_difference"] <= F32_TOL
    assert seen == [(3, 1, "0", "0", ort.GraphOptimizationLevel.ORT_DISABLE_ALL)] * 2
    assert torch.get_num_threads() == threads


# --- the command line -------------------------------------------------------------------------------


@pytest.fixture()
def repvgg(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return export(nets.randomize_bn(nets.TinyRepVGG()), (1, 3, 32, 32), tmp_path / "rep.onnx")


def test_cli_fuse_and_check(repvgg: Path) -> None:
    result = cli("fuse", repvgg, "--json")
    assert result.exit_code == 0, result.stderr
    rep = json.loads(result.stdout)
    out = repvgg.with_name("rep.fused.onnx")
    assert rep["output"] == str(out) and out.is_file()
    assert rep["summary"]["regions_merged"] == 4 and rep["input_size"] == [32, 32]
    assert rep["onnxruntime"]["relative_difference"] <= F32_TOL
    assert rep["description"].endswith("ONNX graph (opset 17)")
    check = cli("check", repvgg, "--json", "--fail-on", "unmergeable")
    assert check.exit_code == 0 and json.loads(check.stdout)["summary"]["regions_merged"] == 4
    again = cli("fuse", repvgg)
    assert again.exit_code == 2 and "exists; pass --force" in again.stderr
    assert cli("fuse", out, "-o", out.with_name("twice.onnx")).exit_code == 0
    assert ops(out.with_name("twice.onnx")) == ops(out)  # nothing more to merge


def test_cli_refuses_description_options(repvgg: Path) -> None:
    result = cli("check", repvgg, "--graph", repvgg)
    assert result.exit_code == 2 and "carries its own graph" in result.stderr
    for command in (["inspect", repvgg, "--graph", repvgg], ["explain", repvgg, "/blocks/blocks.0/Add", "--graph", repvgg],
                    ["annotate", repvgg, "--arch", "x:y", "-o", repvgg.with_name("x.safetensors")]):
        result = cli(*command)
        assert result.exit_code == 2 and "carries its own graph" in result.stderr, result.stderr


def test_the_output_is_named_for_the_format_written(repvgg: Path, tmp_path: Path) -> None:
    result = cli("fuse", repvgg, "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 2 and "name the output *.onnx" in result.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_inspect_and_explain_read_the_onnx_graph(repvgg: Path) -> None:
    listed = cli("inspect", repvgg)
    assert listed.exit_code == 0, listed.stderr
    assert "ONNX" in listed.stdout and "conv-shaped" in listed.stdout
    info = cm_model.inspect_file(str(repvgg))
    assert info["description"].endswith("ONNX graph (opset 17)") and info["layer_count"] == 28
    assert len(info["conv_tensors"]) == 8
    region = cli("explain", repvgg, "/blocks/blocks.0/Add", "--json")
    assert region.exit_code == 0, region.stderr
    data = json.loads(region.stdout)
    assert data["kind"] == "region" and data["output"] == "/blocks/blocks.0/Add" and data["verdict"] == "mergeable"


def test_verification_failure_writes_nothing(repvgg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(onnx_model.TOLERANCE, "tensor(float)", -1.0)
    result = cli("fuse", repvgg, "-o", repvgg.with_name("out.onnx"))
    assert result.exit_code == 3 and "VerificationError" in result.stderr
    assert not repvgg.with_name("out.onnx").exists()
    assert sorted(os.listdir(repvgg.parent)) == ["rep.onnx"]


def test_check_runs_nothing_and_writes_nothing(repvgg: Path) -> None:
    report = convmerge.check(repvgg)
    assert report["onnxruntime"] is None and report["output"] is None
    assert sorted(os.listdir(repvgg.parent)) == ["rep.onnx"]


def test_without_onnxruntime_the_float64_check_stands_alone(repvgg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    out, report = fuse(repvgg)
    assert report["onnxruntime"] is None and report["summary"]["regions_merged"] == 4
    assert any("onnxruntime is not installed" in n and "pip install onnxruntime" in n for n in report["notes"])
    assert_round_trip(repvgg, out, (1, 3, 32, 32))


def test_onnx_found_by_content(repvgg: Path) -> None:
    plain = repvgg.with_name("model.bin")
    plain.write_bytes(repvgg.read_bytes())
    assert cm_model.is_onnx(str(plain)) and cm_model.default_output(str(plain)).endswith("/model.fused.onnx")
    assert cli("check", plain).exit_code == 0


# --- hostile files --------------------------------------------------------------------------------


def _hostile(tmp_path: Path, repvgg: Path) -> dict[str, Callable[[], onnx.ModelProto | bytes]]:
    good = onnx.load(str(repvgg))

    def edit(change: Callable[[onnx.ModelProto], None]) -> Callable[[], onnx.ModelProto]:
        def make() -> onnx.ModelProto:
            m = onnx.ModelProto()
            m.CopyFrom(good)
            change(m)
            return m
        return make

    def attr(node: int, name: str, value: Any) -> Callable[[onnx.ModelProto], None]:
        def change(m: onnx.ModelProto) -> None:
            n = m.graph.node[node]
            kept = [a for a in n.attribute if a.name != name]
            del n.attribute[:]
            n.attribute.extend([*kept, helper.make_attribute(name, value)])
        return change

    def cycle(m: onnx.ModelProto) -> None:
        m.graph.node[0].input[0] = m.graph.node[-1].output[0]

    def missing(m: onnx.ModelProto) -> None:
        del m.graph.initializer[0]

    def inputs(m: onnx.ModelProto) -> None:
        del m.graph.node[0].input[1:]

    def bn_inputs(m: onnx.ModelProto) -> None:
        bn = next(n for n in m.graph.node if n.op_type == "BatchNormalization")
        del bn.input[3:]

    def opset(m: onnx.ModelProto) -> None:
        m.opset_import[0].version = 7

    def short_data(m: onnx.ModelProto) -> None:
        w = next(t for t in m.graph.initializer if len(t.dims) == 4)
        w.raw_data = w.raw_data[:-4]

    raw = repvgg.read_bytes()
    return {
        "truncated_half": lambda: raw[: len(raw) // 2],
        "truncated_end": lambda: raw[:-3],
        "empty": lambda: b"",
        "garbage": lambda: bytes(range(256)) * 8,
        "missing_initializer": edit(missing),
        "cycle": edit(cycle),
        "conv_one_input": edit(inputs),
        "bn_three_inputs": edit(bn_inputs),
        "zero_stride": edit(attr(0, "strides", [0, 0])),
        "negative_pads": edit(attr(0, "pads", [-1, 1, 1, 1])),
        "three_strides": edit(attr(0, "strides", [1, 1, 1])),
        "huge_dilation": edit(attr(0, "dilations", [2**62, 2**62])),
        "kernel_shape": edit(attr(0, "kernel_shape", [5, 5])),
        "group_zero": edit(attr(0, "group", 0)),
        "group_not_dividing": edit(attr(0, "group", 2)),
        "auto_pad": edit(attr(0, "auto_pad", "SIDEWAYS")),
        "strides_as_float": edit(attr(0, "strides", 1.5)),
        "old_opset": edit(opset),
        "short_tensor_data": edit(short_data),
    }


def test_hostile_files_end_in_one_line(tmp_path: Path, repvgg: Path) -> None:
    for name, make in _hostile(tmp_path, repvgg).items():
        made = make()
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(made if isinstance(made, bytes) else made.SerializeToString())
        out = tmp_path / f"{name}.out.onnx"
        result = cli("fuse", path, "-o", out)
        assert result.exit_code == 2, (name, result.exit_code, result.stderr, result.exception)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("convmerge: error: "), (name, result.stderr)
        assert str(path) in lines[0] or "--input-size" in lines[0], (name, lines[0])
        assert not out.exists(), name


def test_hostile_external_data(tmp_path: Path, repvgg: Path) -> None:
    folder = tmp_path / "ext"
    folder.mkdir()
    onnx.save(onnx.load(str(repvgg)), str(folder / "m.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="m.weights", size_threshold=0)
    proto = onnx.load(str(folder / "m.onnx"), load_external_data=False)
    for name, key, value in (("escape", "location", "../rep.onnx"), ("long", "length", str(10**9)),
                             ("absolute", "location", str(repvgg))):
        m = onnx.ModelProto()
        m.CopyFrom(proto)
        t = next(t for t in m.graph.initializer if len(t.dims) == 4)
        next(e for e in t.external_data if e.key == key).value = value
        path = folder / f"{name}.onnx"
        path.write_bytes(m.SerializeToString())
        result = cli("check", path)
        assert result.exit_code == 2, (name, result.stderr, result.exception)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_without_onnx_the_core_imports_and_onnx_files_get_one_line(tmp_path: Path, repvgg: Path) -> None:
    code = ("import sys; sys.modules['onnx'] = None\n"
            "import convmerge, convmerge.cli, convmerge.api, convmerge.model\n"
            "from typer.testing import CliRunner\n"
            f"r = CliRunner().invoke(convmerge.cli.app, ['check', {str(repvgg)!r}])\n"
            "print(r.exit_code); print(r.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    code, line = proc.stdout.strip().splitlines()[:2]
    assert code == "2" and "pip install onnx onnxruntime" in line


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_explain_shows_a_static_model_at_its_own_size(tmp_path: Path, dynamic: bool) -> None:
    """A static ONNX model runs at one size: `explain` without --input-size shows the pair (and a region) at the
    size its input has there, as `check` judges it; a dynamic one at the small default size."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=2),
                        nn.Conv2d(4, 4, 3, padding=1))
    path = export(net, (1, 3, 30, 30), tmp_path / "m.onnx", dynamic=dynamic)
    (pair,) = cm_model.inspect_file(str(path))["pairs"]
    shown = cli("explain", path, pair["first"], pair["second"], "--json")
    assert shown.exit_code == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["size"] == ([12, 12] if dynamic else [15, 15])
    region = json.loads(cli("explain", path, pair["second"], "--json").stdout)
    assert region["kind"] == "region" and region["size"] == data["size"]
    given = json.loads(cli("explain", path, pair["first"], pair["second"], "-s", "9x9", "--json").stdout)
    assert given["size"] == [9, 9]
