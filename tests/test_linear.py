"""Linear layers (issue 20): `linear` chains with batch norms, dropout and identity between them merge into one
linear layer, always exactly; the cheaper policy merges them only where that costs less.  Checked against
torch.nn.functional in float64 (tests/models.evaluate), never against convmerge's own algebra."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from convmerge import plan
from convmerge.graph import GraphError, parse

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
    return plan.build(graph, plan.Tensors(infos(tensors), tensors.__getitem__), None, policy)


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
    assert isinstance(fused.get_submodule(str(len(module) - 1)), torch.nn.Linear) is merged
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
    from convmerge import trace_export, trace_fx

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
