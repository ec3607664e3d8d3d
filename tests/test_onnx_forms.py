"""ONNX graphs that say the same thing in another form (issue 19, items 6-9): `x + 0` and weights computed
from constants, float16 arithmetic behind float32 inputs, quantise/dequantise units, local functions, subgraphs,
weights fed as graph inputs, old opsets.  onnxruntime running the original file is the oracle throughout."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import numpy as np  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from convmerge import model as cm_model  # noqa: E402

from . import nets  # noqa: E402
from .test_onnx import F32_TOL, assert_round_trip, build, export, fuse, ops, relative, run, save, weights  # noqa: E402


def const(name: str, value: Any) -> Any:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value, np.float32), name))


# --- item 6: adding zero, multiplying by one, weights computed from constants ---------------------------------


def neutral_chain(op: str, value: Any, *, left: bool = False) -> onnx.ModelProto:
    """c1, then `op` with a constant, then c2: one conv exactly when the op is the identity."""
    args = ["k", "a"] if left else ["a", "k"]
    nodes = [const("k", value),
             helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node(op, args, ["b"], name="op"),
             helper.make_node("Conv", ["b", "w2", "b2"], ["y"], name="c2")]
    inits = {"w1": weights(4, 4, 3, 3), "w2": weights(4, 4, 1, 1, seed=1), "b2": weights(4, seed=2)}
    return build(nodes, inits, [1, 4, 8, 8])


IDENTITIES = {  # each is x
    "add_zero": ("Add", 0.0, False), "zero_add": ("Add", np.zeros((1, 4, 1, 1)), True),
    "add_minus_zero": ("Add", -0.0, False), "sub_zero": ("Sub", np.zeros(1), False),
    "mul_one": ("Mul", np.ones((4, 1, 1)), False), "one_mul": ("Mul", 1.0, True), "div_one": ("Div", 1.0, False),
}
AFFINE = {  # each is x * weight + bias per channel (issue 20): the chain is one conv
    "add_half": ("Add", 0.5, False), "mul_two": ("Mul", np.array([1, 1, 2, 1]).reshape(1, 4, 1, 1), False),
    "zero_sub": ("Sub", 0.0, True), "div_per_channel": ("Div", np.array([1, 2, 4, 8]).reshape(4, 1, 1), False),
    "sub_per_channel": ("Sub", np.arange(4.0).reshape(4, 1, 1), False),
    "per_channel_minus_x": ("Sub", np.arange(4.0).reshape(1, 4, 1, 1), True), "mul_rank0": ("Mul", 3.0, True),
}
NOT_IDENTITIES = {  # each is not affine per channel in x (or changes its shape): stays opaque
    "one_div": ("Div", 1.0, True),
    "add_zero_batch": ("Add", np.zeros((2, 1, 1, 1)), False),  # broadcasts x to batch 2
    "mul_one_rank5": ("Mul", np.ones((1, 1, 1, 1, 1)), False),
    "mul_per_column": ("Mul", np.arange(8.0), False),  # [8] lines up with the last axis, not the channels
    "add_per_row": ("Add", np.arange(8.0).reshape(8, 1), False),
}


@pytest.mark.parametrize("name", sorted(IDENTITIES) + sorted(AFFINE) + sorted(NOT_IDENTITIES))
def test_adding_zero_and_multiplying_by_one_are_the_identity(tmp_path: Path, name: str) -> None:
    op, value, left = {**IDENTITIES, **AFFINE, **NOT_IDENTITIES}[name]
    path = save(neutral_chain(op, value, left=left), tmp_path / "m.onnx")
    out, report = fuse(path, policy="all")
    if name in IDENTITIES or name in AFFINE:
        assert ops(out) == ["Conv"], report["regions"]
        assert not onnx.load(str(out)).graph.initializer[0].name.startswith("w")  # only the merged weights
        assert_round_trip(path, out, (1, 4, 8, 8))
    else:
        assert ops(out) == ops(path), report["merges"]


class ScalePlusZero(nn.Module):
    """timm's MobileOneBlock without an identity branch: `scale_out + identity_out` with identity_out = 0."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.scale = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.kxk = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity_out = 0
        out = self.scale(x) + identity_out
        out += self.kxk(x)
        return out


def test_exported_plus_zero_merges(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = nets.randomize_bn(ScalePlusZero()).eval()
    path = export(module, (1, 4, 9, 9), tmp_path / "m.onnx")
    assert ops(path).count("Add") == 2 and "Constant" in ops(path)  # the exporter keeps `+ 0`
    out, report = fuse(path)
    assert ops(out) == ["Conv"], report["regions"]
    assert_round_trip(path, out, (1, 4, 9, 9), module)


class ScaledWeight(nn.Module):
    """A weight computed in forward (weight-norm style): `v * g` is a Mul node feeding the conv's weight."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.randn(c, c, 3, 3) / 6)
        self.g = nn.Parameter(torch.rand(c, 1, 1, 1) + 0.5)
        self.after = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.after(F.conv2d(x, self.v * self.g, padding=1))


def test_a_weight_computed_from_constants_is_a_constant(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = ScaledWeight().eval()
    path = export(module, (1, 4, 8, 8), tmp_path / "m.onnx")
    assert "Mul" in ops(path)
    out, report = fuse(path)
    assert ops(out) == ["Conv"], report["regions"]  # the Mul that only fed the merged weight is gone
    assert_round_trip(path, out, (1, 4, 8, 8), module)


def test_a_cast_weight_is_a_constant(tmp_path: Path) -> None:
    """float16 weights cast to float32 where they are used (a mixed-precision conversion), and a BN whose
    scale is computed by a Reshape and a Sqrt."""
    nodes = [helper.make_node("Cast", ["w1h"], ["w1"], to=TensorProto.FLOAT),
             helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Sqrt", ["sq"], ["s"]), helper.make_node("Reshape", ["s", "shape"], ["scale"]),
             helper.make_node("BatchNormalization", ["a", "scale", "beta", "mean", "var"], ["b"], name="bn"),
             helper.make_node("Conv", ["b", "w2"], ["y"], name="c2")]
    gen = np.random.default_rng(3)
    inits = {"w1h": weights(4, 3, 3, 3).astype(np.float16), "w2": weights(4, 4, 1, 1, seed=1),
             "sq": gen.uniform(0.5, 2, (2, 2)).astype(np.float32), "shape": np.array([4], np.int64),
             "beta": gen.standard_normal(4).astype(np.float32), "mean": gen.standard_normal(4).astype(np.float32),
             "var": gen.uniform(0.5, 2, 4).astype(np.float32)}
    path = save(build(nodes, inits, [1, 3, 8, 8]), tmp_path / "m.onnx")
    out, report = fuse(path, policy="all")
    assert ops(out) == ["Conv"], report["regions"]
    assert_round_trip(path, out, (1, 3, 8, 8))


# --- item 7: float16 arithmetic behind float32 inputs and outputs -----------------------------------------------


def test_float16_arithmetic_is_compared_at_float16_rounding(tmp_path: Path) -> None:
    """keep_io_types: the graph casts its float32 input to float16 and its output back.  The outputs are
    float32, the rounding is float16's: a difference within that is no error."""
    c = 16
    nodes = [helper.make_node("Cast", ["x"], ["xh"], to=TensorProto.FLOAT16),
             helper.make_node("Conv", ["xh", "w1"], ["a"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "w2"], ["b"], name="c2"),
             helper.make_node("Conv", ["b", "w3"], ["yh"], name="c3"),
             helper.make_node("Cast", ["yh"], ["y"], to=TensorProto.FLOAT)]
    inits = {"w1": weights(c, c, 3, 3).astype(np.float16), "w2": weights(c, c, 1, 1, seed=1).astype(np.float16),
             "w3": weights(c, c, 1, 1, seed=2).astype(np.float16)}
    path = save(build(nodes, inits, [1, c, 24, 24]), tmp_path / "m.onnx")
    out, report = fuse(path, policy="all")
    assert ops(out) == ["Cast", "Conv", "Cast"]
    measured = report["onnxruntime"]
    assert measured["tolerance"] == cm_model_tolerance("tensor(float16)")
    assert F32_TOL < measured["relative_difference"] <= measured["tolerance"]  # float16 rounding, beyond float32's
    x = np.random.default_rng(1).standard_normal((1, c, 24, 24)).astype(np.float32)
    assert relative(run(path, x)[0], run(out, x)[0]) <= measured["tolerance"]


def cm_model_tolerance(kind: str) -> float:
    from convmerge import onnx_model
    return onnx_model.TOLERANCE[kind]


# --- item 8: quantise / dequantise units ----------------------------------------------------------------------


def qdq_model(middle: list, inits: dict[str, np.ndarray], c: int = 8) -> onnx.ModelProto:
    """x -> Q -> DQ -> `middle` (reading 'xd', writing 'b') -> Q -> DQ -> y, uint8 steps of 0.05 and 0.02."""
    scales = {"s": np.array(0.05, np.float32), "z": np.array(128, np.uint8), "s2": np.array(0.02, np.float32)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]), *middle,
             helper.make_node("QuantizeLinear", ["b", "s2", "z"], ["bq"]),
             helper.make_node("DequantizeLinear", ["bq", "s2", "z"], ["y"])]
    return build(nodes, {**scales, **inits}, [1, c, 16, 16])


def run_default(path: Path, x: np.ndarray) -> np.ndarray:
    """onnxruntime as users run it: its default graph optimisations (which quantise a DQ -> Conv -> Q unit)."""
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_convs_between_dequantize_and_quantize_are_left_alone(tmp_path: Path) -> None:
    c = 8
    middle = [helper.make_node("Conv", ["xd", "w1"], ["a"], name="c1", pads=[1, 1, 1, 1]),
              helper.make_node("Conv", ["a", "w2"], ["b"], name="c2")]
    path = save(qdq_model(middle, {"w1": weights(c, c, 3, 3), "w2": weights(c, c, 1, 1, seed=1)}), tmp_path / "q.onnx")
    out, report = fuse(path, policy="all")
    assert report["merges"] == [] and ops(out) == ops(path)
    assert any("QuantizeLinear" in n and "onnxruntime" in n for n in report["notes"]), report["notes"]
    x = np.random.default_rng(0).standard_normal((1, c, 16, 16)).astype(np.float32)
    assert np.array_equal(run_default(path, x), run_default(out, x))


def test_convs_away_from_a_quantise_unit_still_merge(tmp_path: Path) -> None:
    """DQ -> c0 -> Relu -> c1 -> c2 -> Relu -> Q: c1 and c2 neither read a DequantizeLinear nor feed a
    QuantizeLinear, so onnxruntime quantises neither them nor their merge."""
    c = 8
    middle = [helper.make_node("Conv", ["xd", "w0"], ["r0"], name="c0", pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["r0"], ["a0"]),
              helper.make_node("Conv", ["a0", "w1"], ["a"], name="c1", pads=[1, 1, 1, 1]),
              helper.make_node("Conv", ["a", "w2"], ["r"], name="c2"),
              helper.make_node("Relu", ["r"], ["b"])]
    inits = {"w0": weights(c, c, 3, 3, seed=4), "w1": weights(c, c, 3, 3), "w2": weights(c, c, 1, 1, seed=1)}
    path = save(qdq_model(middle, inits), tmp_path / "q.onnx")
    out, report = fuse(path, policy="all")
    assert [m["layers"] for m in report["merges"]] == [["c1", "c2"]]
    x = np.random.default_rng(0).standard_normal((1, c, 16, 16)).astype(np.float32)
    step = 0.02
    assert np.max(np.abs(run_default(path, x) - run_default(out, x))) <= step * 1.001  # at most a rounding flip


# --- item 9: local functions, subgraphs, weights as inputs, old opsets ---------------------------------------


def pair_nodes(src: str, dst: str, prefix: str = "") -> list:
    return [helper.make_node("Conv", [src, "w1"], [f"{prefix}a"], name=f"{prefix}c1", pads=[1, 1, 1, 1]),
            helper.make_node("Conv", [f"{prefix}a", "w2"], [dst], name=f"{prefix}c2")]


def test_convs_in_local_functions_are_inlined_and_merged(tmp_path: Path) -> None:
    body = [helper.make_node("Conv", ["i", "w1"], ["a"], pads=[1, 1, 1, 1]), helper.make_node("Conv", ["a", "w2"], ["o"])]
    function = helper.make_function("local", "Block", ["i", "w1", "w2"], ["o"], body,
                                    [helper.make_opsetid("", 17)])
    nodes = [helper.make_node("Block", ["x", "w1", "w2"], ["m"], name="block1", domain="local"),
             helper.make_node("Relu", ["m"], ["r"], name="relu"),
             helper.make_node("Block", ["r", "w1", "w2"], ["y"], name="block2", domain="local")]
    proto = build(nodes, {"w1": weights(4, 4, 3, 3), "w2": weights(4, 4, 1, 1, seed=1)}, [1, 4, 8, 8])
    proto.opset_import.append(helper.make_opsetid("local", 1))
    proto.functions.append(function)
    path = save(proto, tmp_path / "f.onnx")
    out, report = fuse(path, policy="all")
    assert ops(out) == ["Conv", "Relu", "Conv"], report["notes"]
    assert any("2 call(s) of local functions" in n and "inlined" in n for n in report["notes"]), report["notes"]
    assert_round_trip(path, out, (1, 4, 8, 8))


def test_convs_inside_subgraphs_are_reported_as_not_analysed(tmp_path: Path) -> None:
    def branch(name: str) -> onnx.GraphProto:
        return helper.make_graph(pair_nodes("x", f"{name}_y", f"{name}_"), name, [],
                                 [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)])

    nodes = [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch("then"), else_branch=branch("else"))]
    proto = build(nodes, {"w1": weights(4, 4, 3, 3), "w2": weights(4, 4, 1, 1, seed=1), "cond": np.array(True)},
                  [1, 4, 8, 8])
    path = save(proto, tmp_path / "if.onnx")
    report = cm_model.check_file(str(path)).to_dict()
    assert any("4 Conv node(s)" in n and "not analysed" in n and "'if'" in n for n in report["notes"]), report["notes"]


def test_a_weight_fed_as_a_graph_input_is_not_an_image(tmp_path: Path) -> None:
    """The second graph input is a conv's weight: the model's static size is the image's."""
    nodes = [helper.make_node("Conv", ["x", "wfed"], ["h"], name="c0", pads=[1, 1, 1, 1]), *pair_nodes("h", "y")]
    proto = build(nodes, {"w1": weights(4, 4, 3, 3), "w2": weights(4, 4, 1, 1, seed=1)}, [1, 4, 10, 10])
    proto.graph.input.append(helper.make_tensor_value_info("wfed", TensorProto.FLOAT, [4, 4, 3, 3]))
    path = save(proto, tmp_path / "w.onnx")
    report = cm_model.check_file(str(path)).to_dict()
    assert report["input_size"] == [10, 10], report["notes"]
    assert not any("different spatial sizes" in n for n in report["notes"])


@pytest.mark.parametrize("opset", [9, 10])
def test_old_opsets_are_converted(tmp_path: Path, opset: int) -> None:
    torch.manual_seed(0)
    module = nets.randomize_bn(nets.TinyRepVGG()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export(module, (1, 3, 32, 32), tmp_path / "old.onnx", opset=opset)
    assert onnx.load(str(path)).opset_import[0].version == opset
    out, report = fuse(path)
    assert ops(out).count("Conv") == 4
    assert any(f"opset {opset} converted to opset 11" in n for n in report["notes"]), report["notes"]
    assert onnx.load(str(out)).opset_import[0].version == 11
    assert_round_trip(path, out, (1, 3, 32, 32), module)


# --- issue 20: Mul/Add/Sub/Div by per-channel constants, Sub of two values --------------------------------------


CONSTANT_SHAPES = [(), (1,), (4, 1, 1), (1, 4, 1, 1), (1, 1, 1), (1, 4, 1, 1)]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["Mul", "Add", "Sub", "Div"]), st.sampled_from(CONSTANT_SHAPES),
                          st.booleans()), min_size=1, max_size=3),
       st.booleans(), st.integers(0, 2**16))
def test_arithmetic_with_constants_between_convs_is_one_conv_at_every_size(tmp_path_factory, steps, subtract,
                                                                           seed) -> None:
    """Conv, then Mul/Add/Sub/Div by random per-channel or scalar constants (on either side where that stays
    affine), then a Conv minus a 1x1 Conv of the input where `subtract`: one Conv, equal under onnxruntime at
    every spatial size 1 to 14 (the model's sizes are symbolic)."""
    gen = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["v0"], name="c1", pads=[1, 1, 1, 1])]
    inits = {"w1": weights(4, 4, 3, 3, seed=seed)}
    for i, (op, shape, left) in enumerate(steps):
        left = left and op != "Div"
        value = (gen.uniform(0.5, 2.0, shape) * gen.choice([-1, 1], shape)).astype(np.float32)
        inits[f"k{i}"] = value
        args = [f"k{i}", f"v{i}"] if left else [f"v{i}", f"k{i}"]
        nodes.append(helper.make_node(op, args, [f"v{i + 1}"], name=f"op{i}"))
    last = f"v{len(steps)}"
    nodes.append(helper.make_node("Conv", [last, "w2", "b2"], ["y" if not subtract else "c"], name="c2"))
    inits.update({"w2": weights(4, 4, 1, 1, seed=seed + 1), "b2": weights(4, seed=seed + 2)})
    if subtract:
        nodes += [helper.make_node("Conv", ["x", "w3"], ["d"], name="c3"),
                  helper.make_node("Sub", ["c", "d"], ["y"], name="minus")]
        inits["w3"] = weights(4, 4, 1, 1, seed=seed + 3)
    path = save(build(nodes, inits, ["n", 4, "h", "w"]), tmp_path_factory.mktemp("a") / "m.onnx")
    out, report = fuse(path, policy="all")
    assert ops(out) == ["Conv"], report["regions"]
    for n in range(1, 15):
        x = gen.standard_normal((2, 4, n, 15 - n)).astype(np.float32)
        want, got = run(path, x)[0], run(out, x)[0]
        assert want.shape == got.shape and relative(want, got) <= F32_TOL, n


def test_sub_of_values_of_different_shapes_stays_opaque(tmp_path: Path) -> None:
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("ReduceMean", ["a"], ["m"], name="mean", axes=[2, 3], keepdims=1),
             helper.make_node("Sub", ["a", "m"], ["b"], name="centre"),
             helper.make_node("Conv", ["b", "w2"], ["y"], name="c2")]
    path = save(build(nodes, {"w1": weights(4, 4, 3, 3), "w2": weights(4, 4, 1, 1, seed=1)}, [1, 4, 8, 8]),
                tmp_path / "m.onnx")
    out, _ = fuse(path, policy="all")
    assert ops(out) == ops(path)
    assert_round_trip(path, out, (1, 4, 8, 8))


def test_an_exported_repmixer_block_is_one_depthwise_conv(tmp_path: Path) -> None:
    module = nets.randomize_bn(nets.RepMixer(4)).eval()
    path = export(module, (1, 4, 8, 8), tmp_path / "m.onnx", dynamic=True)
    assert ops(path).count("BatchNormalization") == 3
    out, report = fuse(path)
    assert ops(out) == ["Conv"], report["regions"]
    (conv,) = onnx.load(str(out)).graph.node
    assert next(a.i for a in conv.attribute if a.name == "group") == 4
    for shape in [(1, 4, 8, 8), (2, 4, 5, 11), (1, 4, 1, 1)]:
        assert_round_trip(path, out, shape, module)
