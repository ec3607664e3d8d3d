"""Graph descriptions derived with torch.fx: exact layers, names that match state dict keys, errors."""

from __future__ import annotations

import json
import sys
import textwrap
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from convmerge.frontends import trace_fx
from convmerge.frontends.modules import PaddedConv2d, spec_of, to_module
from convmerge.maths.spec import spec_from_fields
from convmerge.frontends.trace import TraceError, build_module, load_callable
from convmerge.frontends.trace import describe_module as trace_module

from .strategies import conv


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.bn(self.conv1(x))) + x


class Branch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.left = nn.Conv2d(4, 4, 1)
        self.right = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return torch.cat([self.left(y), self.right(y)], dim=1)


class SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(F.relu(self.conv(x))))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.conv(x)
        return x


class StdConv2d(nn.Conv2d):
    """Weight-standardised conv: not what a `conv2d` layer of the file computes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class MyConv2d(nn.Conv2d):
    pass


def describe_module(module: nn.Module, name: str = "model", **options) -> dict:
    """torch.export's description, as these tests were written for (torch.fx with shapes: test_trace_fx_shapes)."""
    return trace_module(module, name, **{"fx_first": False, **options}).doc


def layer(description: dict, name: str) -> dict:
    return next(item for item in description["layers"] if item["name"] == name)


def ops(description: dict) -> dict[str, str]:
    return {item["name"]: item["op"] for item in description["layers"]}


def test_residual_block_exact_description() -> None:
    assert describe_module(Residual()) == {
        "version": 1,
        "inputs": ["x"],
        "layers": [
            {"name": "conv1", "op": "conv2d", "input": "x", "kernel_size": [3, 3], "stride": [1, 1],
             "padding": [[1, 1], [1, 1]], "dilation": [1, 1], "groups": 1, "padding_mode": "zeros"},
            {"name": "bn", "op": "batch_norm", "input": "conv1", "eps": 1e-05, "affine": True},
            {"name": "conv2", "op": "conv2d", "input": "bn", "kernel_size": [1, 1], "stride": [1, 1],
             "padding": [[0, 0], [0, 0]], "dilation": [1, 1], "groups": 1, "padding_mode": "zeros"},
            {"name": "add", "op": "add", "inputs": ["conv2", "x"]},
        ],
        "outputs": ["add"],
        "traced_input": [224, 224],
    }


def test_sequential_names_are_state_dict_keys() -> None:
    model = nn.Sequential(
        OrderedDict(
            stem=nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
            head=nn.Conv2d(8, 8, 3, stride=2, padding_mode="reflect", padding=1),
        )
    )
    description = describe_module(model)
    assert ops(description) == {"stem.0": "conv2d", "stem.1": "batch_norm", "stem.2": "relu", "head": "conv2d"}
    assert [item.get("input") for item in description["layers"]] == ["input", "stem.0", "stem.1", "stem.2"]
    assert description["inputs"] == ["input"] and description["outputs"] == ["head"]
    keys = set(model.state_dict())
    for item in description["layers"]:
        if item["op"] == "conv2d":
            assert {f"{item['name']}.weight", f"{item['name']}.bias"} <= keys
        if item["op"] == "batch_norm":
            assert {f"{item['name']}.{t}" for t in ("running_mean", "running_var", "weight", "bias")} <= keys
    head = layer(description, "head")
    assert head["stride"] == [2, 2] and head["padding"] == [[1, 1], [1, 1]] and head["padding_mode"] == "reflect"


def test_description_round_trips_through_json() -> None:
    for model in (Residual(), Branch(), SharedConv()):
        description = describe_module(model)
        assert json.loads(json.dumps(description)) == description


def test_one_conv_feeding_two_consumers() -> None:
    description = describe_module(Branch())
    assert layer(description, "left")["input"] == "stem"
    assert layer(description, "right")["input"] == "stem"
    assert layer(description, "concat") == {"name": "concat", "op": "concat", "inputs": ["left", "right"], "dim": 1}
    assert description["outputs"] == ["concat"]


def test_conv1d_same_padding_is_asymmetric_for_even_kernels() -> None:
    model = nn.Sequential(
        nn.Conv1d(2, 2, 4, padding="same"),
        nn.Conv1d(2, 2, 2, padding="same"),
        nn.Conv1d(2, 2, 4, padding="same", dilation=2),
        nn.Conv1d(2, 2, 3, padding="valid"),
    )
    description = describe_module(model)
    assert [item["op"] for item in description["layers"]] == ["conv1d"] * 4
    assert [item["padding"] for item in description["layers"]] == [[[1, 2]], [[0, 1]], [[3, 3]], [[0, 0]]]
    assert layer(description, "2")["dilation"] == [2]


def test_conv3d_and_depthwise_fields() -> None:
    model = nn.Sequential(
        nn.Conv3d(2, 4, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), bias=False),
        nn.BatchNorm3d(4, affine=False),
    )
    description = describe_module(model)
    assert layer(description, "0") == {
        "name": "0", "op": "conv3d", "input": "input", "kernel_size": [1, 3, 3], "stride": [1, 2, 2],
        "padding": [[0, 0], [1, 1], [1, 1]], "dilation": [1, 1, 1], "groups": 1, "padding_mode": "zeros",
    }
    assert layer(description, "1") == {"name": "1", "op": "batch_norm", "input": "0", "eps": 1e-05, "affine": False}
    depthwise = describe_module(nn.Sequential(nn.Conv2d(8, 8, 3, groups=8, padding=2, dilation=2)))
    assert layer(depthwise, "0")["groups"] == 8
    assert layer(depthwise, "0")["dilation"] == [2, 2]


def test_padded_conv_is_one_layer_with_its_pairs() -> None:
    conv = PaddedConv2d(2, 3, (2, 3), padding=0)
    conv.side_pads, conv.pad_mode = (0, 2, 1, 0), "replicate"
    description = describe_module(nn.Sequential(conv))
    assert len(description["layers"]) == 1
    assert layer(description, "0")["op"] == "conv2d"
    assert layer(description, "0")["padding"] == [[1, 0], [0, 2]]
    assert layer(description, "0")["padding_mode"] == "replicate"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_description_fields_give_back_the_module_spec(data: st.DataObject) -> None:
    nd = data.draw(st.sampled_from([1, 2, 3]))
    groups = data.draw(st.sampled_from([1, 2]))
    module = to_module(data.draw(conv(nd, 2 * groups, 2 * groups, groups)))
    item = describe_module(nn.Sequential(module))["layers"][0]
    assert spec_from_fields(item, module.weight.shape, module.bias is not None) == spec_of(module)


def test_module_called_twice_is_opaque_and_uniquely_named() -> None:
    description = describe_module(SharedConv())
    assert ops(description) == {"conv@0": "shared_conv2d", "relu": "relu", "conv@1": "shared_conv2d",
                                "bn": "batch_norm"}
    assert layer(description, "conv@1")["input"] == "relu"
    assert layer(description, "bn")["input"] == "conv@1"


def test_conv_whose_weight_is_read_elsewhere_is_opaque() -> None:
    class ReadsWeight(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.conv = nn.Conv2d(channels, channels, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) * self.conv.weight  # [2, 2, 1, 1]: broadcasts the batch axis

    description = describe_module(ReadsWeight(2))
    assert ops(description) == {"conv": "shared_conv2d", "conv_weight": "get_attr", "mul": "mul"}
    assert layer(description, "conv_weight")["inputs"] == []
    # One value for all channels is an affine layer holding its own copy: the conv may merge away.
    model = ReadsWeight(1)
    traced = trace_module(model)
    assert ops(traced.doc) == {"conv": "conv2d", "mul": "affine"}
    assert torch.equal(traced.tensors["mul.weight"], model.conv.weight.detach().reshape(1))


def test_norm_identity_dropout_and_opaque_modules() -> None:
    model = nn.Sequential(
        nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2, track_running_stats=False), nn.Identity(), nn.Dropout(),
        nn.Dropout2d(), nn.AlphaDropout(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2, 2),
    )
    assert [item["op"] for item in describe_module(model)["layers"]] == [
        "conv2d", "batch_norm_train", "identity", "dropout", "dropout", "dropout", "maxpool2d", "flatten", "linear",
    ]


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU()
        self.weight = nn.Parameter(torch.ones(1, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> dict:
        a = torch.relu(x)
        b = self.relu(F.relu(a))
        c = torch.add(a, b).add(x) + b
        d = F.conv2d(c, self.weight)
        return {"flat": d.flatten(1), "pair": (F.dropout(c), a)}


def test_functions_and_methods_without_an_input_size_are_traced_by_fx() -> None:
    traced = trace_module(Functional())
    assert traced.notes[0] == ("traced with torch.fx (torch.export needs an example input size (no conv, batch "
                               "norm or linear layer to guess one from))")
    description = traced.doc
    assert ops(description) == {
        "relu_1": "relu", "relu_2": "relu", "relu": "relu", "add": "opaque_add", "add_1": "opaque_add",
        "add_2": "opaque_add", "weight": "get_attr", "conv2d": "opaque_conv2d", "flatten": "flatten",
        "dropout": "opaque_dropout",
    }
    # fx named torch.relu's node "relu"; that is the module's name, so the function takes a free one
    assert layer(description, "relu_2")["input"] == "x"
    assert layer(description, "relu")["input"] == "relu_1"
    assert layer(description, "add")["inputs"] == ["relu_2", "relu"]
    assert layer(description, "add_2")["inputs"] == ["add_1", "relu"]
    assert layer(description, "conv2d")["inputs"] == ["add_2", "weight"]
    assert description["outputs"] == ["flatten", "dropout", "relu_2"]
    names = [item["name"] for item in description["layers"]]
    assert len(names) == len(set(names))
    assert "torch.fx sees no shapes, so additions (which may broadcast) are opaque" in traced.notes


def test_functions_and_methods_with_an_input_size_are_traced_by_export() -> None:
    model = Functional().double()
    traced = trace_module(model, example_size=(1, 1, 3, 3))
    assert traced.notes[0] == "traced with torch.export on an input of shape [1, 1, 3, 3] (as given)"
    assert ops(traced.doc) == {
        "relu_1": "relu", "relu_2": "relu", "relu": "relu", "add": "add", "add_1": "add", "add_2": "add",
        "conv2d": "conv2d", "flatten": "flatten", "dropout": "opaque_dropout"}  # the export's own ops, undecomposed
    assert layer(traced.doc, "add")["inputs"] == ["relu_1", "relu"]
    assert (layer(traced.doc, "flatten")["start_dim"], layer(traced.doc, "flatten")["end_dim"]) == (1, -1)
    assert traced.doc["outputs"] == ["flatten", "dropout", "relu_1"]
    assert set(traced.tensors) == {"conv2d.weight"}, "a root parameter named weight is no layer's .weight"


def test_conv_subclasses() -> None:
    model = nn.Sequential(MyConv2d(2, 2, 3), StdConv2d(2, 2, 1)).double()
    traced = trace_module(model)
    assert ops(traced.doc) == {"0": "conv2d", "1.computed": "conv2d"}
    standardised = model[1].weight - model[1].weight.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.equal(traced.tensors["1.computed.weight"], standardised)
    assert torch.equal(traced.tensors["1.computed.bias"], model[1].bias)


def test_conv_subclasses_without_shapes_are_opaque() -> None:
    model = nn.Sequential(MyConv2d(2, 2, 3), StdConv2d(2, 2, 1))
    description = trace_fx.describe(model).doc
    assert layer(description, "0")["op"] == "conv2d"
    assert "conv2d" not in [item["op"] for item in description["layers"][1:]]
    assert "opaque_conv2d" in ops(description).values()


def test_untraceable_module_says_to_pass_a_graph() -> None:
    with pytest.raises(TraceError, match=r"^resnet: cannot trace it \(torch.export: GuardOnDataDependentSymNode: .*; "
                                         r"torch.fx: .*\); pass --graph FILE instead$") as info:
        describe_module(DataDependent(), name="resnet")
    assert "\n" not in str(info.value)


def test_lazy_conv_is_opaque_until_it_has_weights() -> None:
    assert ops(describe_module(nn.Sequential(nn.LazyConv2d(4, 3)))) == {"0": "lazyconv2d"}


MODEL_FILE = """
    import torch
    from torch import nn
    from helper import width

    not_callable = 3

    def build():
        return nn.Sequential(nn.Conv2d(3, width(), 3), nn.ReLU())

    def needs_cpu():
        torch.zeros(1).item()
        return build()

    def fails():
        raise RuntimeError("no weights here\\nsecond line")
"""


@pytest.fixture
def model_file(tmp_path):
    (tmp_path / "helper.py").write_text("def width():\n    return 5\n")
    path = tmp_path / "model.py"
    path.write_text(textwrap.dedent(MODEL_FILE))
    return path


def test_load_callable_from_a_file(model_file) -> None:
    before = list(sys.path)
    build = load_callable(f"{model_file}:build")
    assert sys.path == before
    assert isinstance(build(), nn.Sequential)


def test_load_callable_from_a_module() -> None:
    assert load_callable("collections:OrderedDict") is OrderedDict
    assert load_callable("collections:OrderedDict.fromkeys") == OrderedDict.fromkeys


def test_build_module_on_meta_in_eval_mode(model_file) -> None:
    module = build_module(f"{model_file}:build")
    assert not module.training
    assert all(p.device.type == "meta" for p in module.parameters())
    assert ops(describe_module(module)) == {"0": "conv2d", "1": "relu"}


def test_build_module_falls_back_to_cpu(model_file) -> None:
    module = build_module(f"{model_file}:needs_cpu")
    assert all(p.device.type == "cpu" for p in module.parameters())


@pytest.mark.parametrize(
    "ref, message",
    [
        ("collections", r"--arch collections: expected MODULE:CALLABLE or FILE.py:CALLABLE"),
        ("no_such_pkg_xyz.sub:build", r"--arch no_such_pkg_xyz.sub:build: no module named 'no_such_pkg_xyz'"),
        ("collections:nothing", r"--arch collections:nothing: no attribute 'nothing' in module collections"),
        ("missing/model.py:build", r"--arch missing/model.py:build: no file missing/model.py"),
    ],
)
def test_load_callable_errors(ref: str, message: str) -> None:
    with pytest.raises(TraceError, match=f"^{message}$"):
        load_callable(ref)


def test_load_callable_file_errors(model_file, tmp_path) -> None:
    with pytest.raises(TraceError, match=f"^--arch {model_file}:build2: no attribute 'build2' in {model_file}$"):
        load_callable(f"{model_file}:build2")
    with pytest.raises(TraceError, match="'not_callable' in .* is a int, not a callable"):
        load_callable(f"{model_file}:not_callable")
    broken = tmp_path / "broken.py"
    broken.write_text("import does_not_exist_xyz\n")
    with pytest.raises(TraceError, match="importing .*broken.py raised ModuleNotFoundError: No module named") as info:
        load_callable(f"{broken}:build")
    assert "\n" not in str(info.value)


def test_build_module_errors(model_file) -> None:
    with pytest.raises(TraceError, match=r"^--arch collections:OrderedDict: returned an OrderedDict, not a torch.nn"):
        build_module("collections:OrderedDict")
    with pytest.raises(TraceError, match=r"calling it raised RuntimeError: no weights here$"):
        build_module(f"{model_file}:fails")
