"""Linear layers (issue 20): `linear` chains with batch norms, dropout and identity between them merge into one
linear layer, always exactly; the cheaper policy merges them only where that costs less.  Checked against
torch.nn.functional in float64 (tests/models.evaluate), never against convmerge's own algebra."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from convmerge.engine import plan
from convmerge.graph import GraphError, parse
from convmerge.options import Options

from . import models
from .models import describe, infos


def _bn(name: str, inp: str, c: int, gen: torch.Generator, affine: bool) -> tuple[dict, dict]:
    tensors = {f"{name}.running_mean": torch.randn(c, generator=gen, dtype=torch.float64),
               f"{name}.running_var": torch.rand(c, generator=gen, dtype=torch.float64) + 0.5}
    if affine:
        tensors.update({f"{name}.weight": torch.randn(c, generator=gen, dtype=torch.float64),
                        f"{name}.bias": torch.randn(c, generator=gen, dtype=torch.float64)})
    return {"name": name, "op": "batch_norm", "input": inp, "eps": 1e-5}, tensors


def linear_chain(widths, between, biases, seed=0, dtype=torch.float64) -> tuple[dict, dict]:
    """Linear layers widths[0] -> widths[1] -> ...; between[i] lists the ops after linear i ('bn', 'bn_plain',
    'dropout', 'identity', 'relu')."""
    gen = torch.Generator().manual_seed(seed)
    layers, tensors, prev = [], {}, "x"
    for i, (cin, cout) in enumerate(zip(widths, widths[1:])):
        name = f"fc{i}"
        layers.append({"name": name, "op": "linear", "input": prev})
        tensors[f"{name}.weight"] = torch.randn(cout, cin, generator=gen, dtype=torch.float64) / cin ** 0.5
        if biases[i]:
            tensors[f"{name}.bias"] = torch.randn(cout, generator=gen, dtype=torch.float64)
        prev = name
        for j, op in enumerate(between[i] if i < len(between) else ()):
            mid = f"{op}{i}_{j}"
            if op.startswith("bn"):
                layer, t = _bn(mid, prev, cout, gen, affine=op == "bn")
                layers.append(layer)
                tensors.update(t)
            else:
                layers.append({"name": mid, "op": op, "input": prev, **({"p": 0.5} if op == "dropout" else {})})
            prev = mid
    return describe(layers, [prev]), {k: v.to(dtype) for k, v in tensors.items()}


def build(doc, tensors, policy="cheaper") -> plan.Plan:
    graph = parse(doc, infos(tensors))
    return plan.build(graph, plan.Tensors(infos(tensors), tensors.__getitem__), Options(policy))


def fused(p: plan.Plan, tensors: dict) -> tuple[dict, dict]:
    return p.description(), dict(p.listing(list(tensors), tensors.__getitem__))


def assert_same_function(doc, tensors, p, batch=5, seed=0):
    doc1, t1 = fused(p, tensors)
    cin = tensors[f"{doc['layers'][0]['name']}.weight"].shape[1]
    x = torch.randn(batch, cin, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    want, got = models.evaluate(doc, tensors, x)[0], models.evaluate(doc1, t1, x)[0]
    assert got.shape == want.shape
    scale = max(1.0, float(want.abs().max()))
    assert float((got - want).abs().max()) <= 1e-9 * scale
    return doc1


PASS_OPS = st.sampled_from(["bn", "bn_plain", "dropout", "identity"])


@settings(max_examples=40, deadline=None)
@given(widths=st.lists(st.integers(1, 12), min_size=3, max_size=5), data=st.data())
def test_a_chain_of_linear_layers_with_norms_between_is_one_linear_layer(widths, data):
    n = len(widths) - 1
    between = [data.draw(st.lists(PASS_OPS, max_size=3)) for _ in range(n)]
    biases = [data.draw(st.booleans()) for _ in range(n)]
    doc, tensors = linear_chain(widths, between, biases, seed=data.draw(st.integers(0, 2**16)))
    p = build(doc, tensors, "all")
    doc1 = assert_same_function(doc, tensors, p)
    assert [layer["op"] for layer in doc1["layers"]] == ["linear"]
    (unit,) = p.applied
    assert unit.error <= 1e-12
    assert p.regions[0].verdict == "mergeable"
    # the cheaper policy may keep layers, but whatever it writes computes the same
    assert_same_function(doc, tensors, build(doc, tensors, "cheaper"))


def test_a_batch_norm_after_a_linear_layer_folds_into_it():
    doc, tensors = linear_chain([6, 5], [["bn"]], [False])
    p = build(doc, tensors)
    doc1 = assert_same_function(doc, tensors, p)
    assert [(layer["op"], layer["name"]) for layer in doc1["layers"]] == [("linear", "fc0")]
    assert p.applied[0].layers == ("fc0", "bn0_0")


def test_relu_between_linear_layers_stops_the_merge():
    doc, tensors = linear_chain([8, 16, 4], [["relu"]], [True, True])
    p = build(doc, tensors, "all")
    assert not p.applied
    assert [layer["op"] for layer in fused(p, tensors)[0]["layers"]] == ["linear", "relu", "linear"]


@settings(max_examples=30, deadline=None)
@given(c=st.integers(1, 8), outs=st.lists(st.integers(1, 8), min_size=1, max_size=3), concat=st.booleans(),
       residual=st.booleans(), norm=st.booleans(), seed=st.integers(0, 2**16))
def test_parallel_linear_branches_summed_or_concatenated_are_one_linear_layer(c, outs, concat, residual, norm, seed):
    """x -> [batch norm] -> branches (linear, linear -> batch norm, the value itself) joined by add or concat ->
    linear: the whole is one linear layer (RepVGG-style re-parameterisation of linear layers)."""
    gen = torch.Generator().manual_seed(seed)
    layers, tensors, start = [], {}, "x"
    if norm:
        layer, t = _bn("bn_in", "x", c, gen, affine=True)
        layers.append(layer)
        tensors.update(t)
        start = "bn_in"
    width = outs[0]
    branches = []
    for i, out in enumerate(outs):
        out = out if concat else width
        name = f"br{i}"
        layers.append({"name": name, "op": "linear", "input": start})
        tensors[f"{name}.weight"] = torch.randn(out, c, generator=gen, dtype=torch.float64)
        if i % 2:
            tensors[f"{name}.bias"] = torch.randn(out, generator=gen, dtype=torch.float64)
            layer, t = _bn(f"{name}_bn", name, out, gen, affine=True)
            layers.append(layer)
            tensors.update(t)
            name = f"{name}_bn"
        branches.append((name, out))
    if residual and (concat or width == c):
        branches.append((start, c))
    join = {"name": "join", "op": "concat" if concat else "add", "inputs": [n for n, _ in branches]}
    if len(branches) == 1:
        join = {"name": "join", "op": "identity", "input": branches[0][0]}
    layers.append(join)
    total = sum(w for _, w in branches) if concat else width
    layers.append({"name": "head", "op": "linear", "input": "join"})
    tensors["head.weight"] = torch.randn(3, total, generator=gen, dtype=torch.float64)
    doc = describe(layers, ["head"])
    p = build(doc, tensors, "all")
    doc1, t1 = fused(p, tensors)
    assert [layer["op"] for layer in doc1["layers"]] == ["linear"]
    x = torch.randn(4, c, generator=gen, dtype=torch.float64)
    want, got = models.evaluate(doc, tensors, x)[0], models.evaluate(doc1, t1, x)[0]
    assert float((got - want).abs().max()) <= 1e-9 * max(1.0, float(want.abs().max()))


@settings(max_examples=40, deadline=None)
@given(cin=st.integers(1, 600), mid=st.integers(1, 600), cout=st.integers(1, 600))
def test_the_cheaper_policy_merges_two_linear_layers_when_that_saves_work_and_keeps_them_when_it_adds_much(
        cin, mid, cout):
    """Merged, a pair costs in*out multiply-adds and weights, against in*mid + mid*out: where merging saves both
    (and a layer), it must merge; where it adds 100k or more of each, it must not."""
    before, after = cin * mid + mid * cout, cin * cout
    if before < after < before + 100_000:
        return  # the cost model weighs the saved layer against the added work: no claim here
    doc, tensors = linear_chain([cin, mid, cout], [[]], [True, False], dtype=torch.float32)
    assert bool(build(doc, tensors, "cheaper").applied) is (after <= before)


@pytest.mark.parametrize("widths, merged", [
    ([512, 2048, 10], True),  # ExpandNets' expanded classifier: 1.05M MACs as two layers, 5k as one
    ([512, 32, 512], False),  # an SVD-factorised layer: 33k MACs as two layers, 262k as one
])
def test_the_cheaper_policy_merges_an_expansion_and_keeps_a_factorisation(widths, merged):
    doc, tensors = linear_chain(widths, [[]], [True, True], dtype=torch.float32)
    cheaper = build(doc, tensors, "cheaper")
    assert bool(cheaper.applied) is merged
    assert len(build(doc, tensors, "all").applied) == 1
    (region,) = cheaper.regions
    assert region.verdict == "mergeable"
    assert region.macs_before == widths[0] * widths[1] + widths[1] * widths[2]
    assert region.macs_after == widths[0] * widths[2]


@pytest.mark.parametrize("change, words", [
    (lambda d, t: t.update({"fc0.weight": torch.zeros(4, 3, 1)}),
     "layer 'fc0': field 'op': linear needs a 2-d weight, 'fc0.weight' has shape [4, 3, 1]"),
    (lambda d, t: d["layers"][0].update({"in_features": 5}),
     "layer 'fc0': field 'in_features': 5 contradicts the weight's shape [4, 3]"),
    (lambda d, t: d["layers"][0].update({"out_featurs": 4}),
     "layer 'fc0': field 'out_featurs' is not a field of linear; did you mean 'out_features'?"),
    (lambda d, t: t.update({"fc0.bias": torch.zeros(3)}),
     "layer 'fc0': tensor 'fc0.bias' has shape [3], expected [4]"),
    (lambda d, t: t.update({"fc1.weight": torch.zeros(2, 5)}),
     "layer 'fc1': field 'input': 'fc0' gives 4 channels, but 'fc1.weight' (shape [2, 5], groups 1) takes 5"),
])
def test_a_bad_linear_layer_is_an_error_naming_the_layer_and_field(change, words):
    doc, tensors = linear_chain([3, 4, 2], [[]], [True, False], dtype=torch.float32)
    change(doc, tensors)
    with pytest.raises(GraphError) as e:
        parse(doc, infos(tensors))
    assert words in str(e.value)


# --- the tracers ------------------------------------------------------------------------------------


def _linears(module: torch.nn.Module) -> int:
    """The linear layers' weights a module holds (the only 2-d tensors of these models)."""
    return sum(p.dim() == 2 for p in module.parameters())


def _head(widths, between=lambda c: []):
    layers = []
    for cin, cout in zip(widths, widths[1:]):
        layers += [torch.nn.Linear(cin, cout), *between(cout)]
    return torch.nn.Sequential(*layers[:len(layers) - len(between(widths[-1]))])


def _random_norms(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen))
    return module.eval()


@pytest.mark.parametrize("net, merged, kept", [
    (lambda: _head([512, 2048, 10]), True, 1),  # ExpandNets' expanded classifier head
    (lambda: _head([512, 32, 512]), False, 2),  # an SVD-factorised layer: cheaper as it is
    (lambda: _head([16, 32, 4], lambda c: [torch.nn.ReLU()]), False, 2),  # an MLP: the ReLU is not linear
    (lambda: _head([16, 32, 24, 4], lambda c: [torch.nn.BatchNorm1d(c), torch.nn.Dropout(), torch.nn.Identity()]),
     True, 1),
])
def test_fuse_merges_traced_linear_layers_where_cheaper_and_computes_the_same(net, merged, kept):
    import convmerge

    torch.manual_seed(0)
    module = _random_norms(net()).double().requires_grad_(False)
    fused = convmerge.fuse(module)
    assert _linears(fused) == kept
    x = torch.randn(5, module[0].in_features, dtype=torch.float64)
    want = module(x)
    assert float((fused(x).detach() - want).abs().max()) <= 1e-10 * float(want.abs().max())
    assert bool(convmerge.check(module)["merges"]) is merged


class _Mixed(torch.nn.Module):
    """A conv stem, a flattened classifier head with a BatchNorm1d, a functional linear by a parameter, and a
    linear over the last axis of a 3-d value (tokens), which is no conv of channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.flat = torch.nn.Flatten()
        self.fc1 = torch.nn.Linear(4 * 4 * 4, 32)
        self.bn = torch.nn.BatchNorm1d(32)
        self.fc2 = torch.nn.Linear(32, 10)
        self.w = torch.nn.Parameter(torch.randn(6, 10))
        self.tokens = torch.nn.Linear(16, 16)
        self.tokens2 = torch.nn.Linear(16, 16)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        head = torch.nn.functional.linear(self.fc2(self.bn(self.fc1(self.flat(y)))), self.w)
        return head, self.tokens2(self.tokens(y.flatten(2)))


@pytest.mark.parametrize("tracer", ["export", "fx"])
def test_both_tracers_read_linear_layers_on_two_axes_only(tracer):
    from convmerge.frontends import trace_export, trace_fx

    module = _random_norms(_Mixed())
    traced = trace_export.describe(module, example_size=(6, 6)) if tracer == "export" else trace_fx.describe(module)
    ops = {layer["name"]: layer["op"] for layer in traced.doc["layers"]}
    assert [ops["fc1"], ops["bn"], ops["fc2"]] == ["linear", "batch_norm", "linear"]
    assert ops["tokens"] == ops["tokens2"] == "opaque_linear"
    assert (ops.get("linear") == "linear") is (tracer == "export")  # fx sees F.linear as a function call


def test_a_fused_mixed_model_merges_its_head_and_leaves_token_linears():
    import convmerge

    torch.manual_seed(1)
    module = _random_norms(_Mixed()).double()
    fused = convmerge.fuse(module, input_size=(6, 6))
    rep = convmerge.check(module, input_size=(6, 6), policy="all")
    assert [m["layers"] for m in rep["merges"]] == [["fc1", "bn", "fc2", "linear"]]
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    for got, want in zip(fused(x), module(x)):
        assert float((got - want).abs().max()) <= 1e-10 * float(want.abs().max())


# --- ONNX ---------------------------------------------------------------------------------------------


def test_onnx_gemm_chains_merge_into_one_gemm_and_run_the_same_under_onnxruntime(tmp_path):
    import warnings

    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from convmerge import model as cm_model

    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 32), torch.nn.BatchNorm1d(32), torch.nn.Dropout(),
                              torch.nn.Linear(32, 10), torch.nn.ReLU(), torch.nn.Linear(10, 3))
    net = _random_norms(net)
    src, out = tmp_path / "m.onnx", tmp_path / "m.fused.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(2, 3, 8, 8),), str(src), dynamo=False, opset_version=17,
                          do_constant_folding=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}})
    report = cm_model.fuse_file(str(src), str(out), Options(policy="all")).to_dict()
    assert [len(m["layers"]) for m in report["merges"]] == [3]  # Gemm, BatchNormalization, Gemm
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops == ["Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm", "Relu", "Gemm"]
    onnx.checker.check_model(str(out), full_check=True)
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(3)).numpy()
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa
    want, got = run(src), run(out)
    with torch.no_grad():
        exact = net.double()(torch.from_numpy(x).double()).numpy()
    for ours in (want, got):
        assert abs(ours - exact).max() <= 1e-5 * abs(exact).max()


def test_onnx_matmul_by_a_transposed_weight_is_a_bias_less_linear_layer(tmp_path):
    import warnings

    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from convmerge import model as cm_model

    torch.manual_seed(4)
    net = _random_norms(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 32, bias=False),
                                            torch.nn.BatchNorm1d(32), torch.nn.Linear(32, 10, bias=False),
                                            torch.nn.Linear(10, 5)))
    src, out = tmp_path / "m.onnx", tmp_path / "m.fused.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(2, 3, 4),), str(src), dynamo=False, opset_version=17,
                          do_constant_folding=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}})
    assert [n.op_type for n in onnx.load(str(src)).graph.node].count("MatMul") == 2
    cm_model.fuse_file(str(src), str(out), Options(policy="all"))
    fused = onnx.load(str(out)).graph
    assert [n.op_type for n in fused.node] == ["Flatten", "Gemm"]
    assert len(fused.initializer) == 2  # the merged weight and bias: the transposed weights are gone
    x = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(5)).numpy()
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        exact = net.double()(torch.from_numpy(x).double()).numpy()
    assert abs(got - exact).max() <= 1e-5 * abs(exact).max()


@pytest.mark.parametrize("attrs, mapped", [
    ({"transB": 1}, True),
    ({"transB": 1, "alpha": 1.0, "beta": 1.0}, True),
    ({}, False),  # B is [in, out]: not a weight read as it stands
    ({"transB": 1, "alpha": 2.0}, False),
    ({"transB": 1, "beta": 0.5}, False),
    ({"transA": 1, "transB": 1}, False),
])
def test_only_gemms_that_are_linear_layers_read_as_linear(tmp_path, attrs, mapped):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from convmerge.frontends.onnx_read import read_model

    gen = torch.Generator().manual_seed(0)
    w1, b1 = torch.randn(6, 4, generator=gen), torch.randn(6, generator=gen)
    w2 = torch.randn(3, 6, generator=gen)
    w1 = w1 if attrs.get("transB") else w1.T.contiguous()
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], "g1", **attrs),
             helper.make_node("Gemm", ["h", "w2"], ["y"], "g2", transB=1)]
    inits = [numpy_helper.from_array(t.numpy(), n) for n, t in (("w1", w1), ("b1", b1), ("w2", w2))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], initializer=inits)
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    graph = read_model(str(path)).graph
    assert (graph.layers["g1"].op == "linear") is mapped
    assert graph.layers["g2"].op == "linear" or "transA" in attrs  # (that model's shapes are not [N, C])


# --- convmerge.load -------------------------------------------------------------------------------------


def test_load_builds_a_fused_file_s_linear_layers(tmp_path):
    import convmerge
    from convmerge import model as cm_model

    torch.manual_seed(6)
    net = _random_norms(torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.Dropout(),
                                            torch.nn.Linear(32, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3)))
    src, out = tmp_path / "m.safetensors", tmp_path / "m.fused.safetensors"
    convmerge.save(net, src)
    cm_model.fuse_file(str(src), str(out))
    doc, tensors = models.described(out)
    assert [layer["op"] for layer in doc["layers"]] == ["linear", "relu", "linear"]
    assert tensors["3.weight"].shape == (4, 16)
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = net.double()(x.double())
        for path in (src, out):
            got = convmerge.load(path)(x)
            assert float((got.double() - want).abs().max()) <= 1e-5 * float(want.abs().max())


# --- the command line -----------------------------------------------------------------------------------


def test_the_cli_checks_explains_and_refuses_a_spatial_size_for_linear_layers(tmp_path):
    import json

    from typer.testing import CliRunner

    import convmerge
    from convmerge.cli import app

    torch.manual_seed(8)
    net = _random_norms(torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.Linear(32, 4),
                                            torch.nn.ReLU(), torch.nn.Linear(4, 64), torch.nn.Linear(64, 8)))
    path = tmp_path / "mlp.safetensors"
    convmerge.save(net, path)
    run = lambda *args: CliRunner().invoke(app, [str(a) for a in args])  # noqa: E731
    report = json.loads(run("check", path, "--json").stdout)
    assert [m["layers"] for m in report["merges"]] == [["0", "1", "2"], ["4", "5"]]
    for args in (("0", "2"), ("2",)):
        shown = run("explain", path, *args)
        assert shown.exit_code == 0, shown.output
        assert "linear layers have no spatial axes" in shown.stdout and "exact" in shown.stdout
    before = path.read_bytes()
    refused = run("check", path, "--input-size", "8")
    assert refused.exit_code == 2
    assert refused.output.strip().splitlines() == [
        "convmerge: error: --input-size 8: layer '0' cannot run there: a linear layer reads a [N, C] value, with no "
        "spatial axes, not one of size 8"]
    assert path.read_bytes() == before


def test_a_linear_head_behind_a_global_pool_is_no_conv_whose_size_was_lost() -> None:
    """A linear layer has no spatial size to lose: the note about sizes lost behind an op names convs only."""
    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.fc1, self.fc2 = torch.nn.Linear(8, 64), torch.nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(self.fc1(self.conv(x).mean((2, 3))))

    import convmerge

    rep = convmerge.check(Head().eval(), input_size=(16, 16))
    assert not [n for n in rep["notes"] if n.startswith("input sizes unknown")], rep["notes"]
    assert [["fc1", "fc2"]] == [m["layers"] for m in rep["merges"]]
