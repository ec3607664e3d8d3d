"""Graph descriptions: the new linear ops, misspelled fields, and sizes through the graph."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from convmerge.graph import GraphError, parse

from . import models
from .models import infos


def two_convs(**fields) -> tuple[dict, dict]:
    l1, t1 = models.conv("a", "x", 2, 3, 3, padding=1)
    l2, t2 = models.conv("b", "a", 3, 2, 1)
    l2.update(fields)
    return models.describe([l1, l2], ["b"]), {**t1, **t2}


@pytest.mark.parametrize("key, resembles", [
    ("strid", "stride"), ("Stride", "stride"), ("pading", "padding"), ("dilaton", "dilation"),
    ("padding-mode", "padding_mode"), ("PaddingMode", "padding_mode"), ("group", "groups"), ("kernel", "kernel_size"),
])
def test_a_misspelled_conv_field_is_an_error_naming_the_field_it_resembles(key, resembles):
    doc, tensors = two_convs(**{key: 2})
    with pytest.raises(GraphError) as e:
        parse(doc, infos(tensors))
    assert "layer 'b'" in str(e.value) and f"'{key}'" in str(e.value) and f"'{resembles}'" in str(e.value)


def test_a_misspelled_batch_norm_field_is_an_error():
    doc, tensors = two_convs()
    doc["layers"].insert(1, {"name": "bn", "op": "batch_norm", "input": "a", "epsilon": 1e-3})
    doc["layers"][2]["input"] = "bn"
    tensors.update({"bn.running_mean": torch.zeros(3), "bn.running_var": torch.ones(3)})
    with pytest.raises(GraphError, match="'epsilon'.*'eps'"):
        parse(doc, infos(tensors))


def test_other_unknown_fields_are_kept_with_one_note():
    doc, tensors = two_convs(note="kept", author="me")
    graph = parse(doc, infos(tensors))
    assert len(graph.notes) == 1 and "b.note" in graph.notes[0] and "b.author" in graph.notes[0]
    assert graph.layers["b"].fields["note"] == "kept"


def test_opaque_ops_take_any_field():
    doc, tensors = two_convs()
    doc["layers"].append({"name": "act", "op": "swish_custom", "input": "b", "strid": 3})
    doc["outputs"] = ["act"]
    assert not parse(doc, infos(tensors)).notes


@pytest.mark.parametrize("layer, words", [
    ({"op": "add", "inputs": ["a"]}, "two or more"),
    ({"op": "avg_pool2d", "input": "a"}, "kernel_size"),
    ({"op": "avg_pool2d", "input": "a", "kernel_size": 3, "padding": 2}, "half the kernel"),
    ({"op": "avg_pool2d", "input": "a", "kernel_size": 3, "ceil_mode": 1}, "ceil_mode"),
    ({"op": "avg_pool2d", "input": "a", "kernel_size": [3, 3, 3]}, "kernel_size"),
    ({"op": "pad", "input": "a"}, "padding"),
    ({"op": "pad", "input": "a", "padding": 1, "mode": "mirror"}, "mode"),
    ({"op": "pad", "input": "a", "padding": 1, "mode": "reflect", "value": 2}, "value"),
    ({"op": "pad", "input": "a", "padding": [[1, -1]]}, "padding"),
    ({"op": "pad", "input": "a", "padding": "same"}, "padding"),
    ({"op": "concat", "inputs": ["a", "x"], "dim": "1"}, "dim"),
])
def test_bad_fields_of_the_new_ops_name_the_layer_and_field(layer, words):
    doc, tensors = two_convs()
    doc["layers"].append({"name": "new", **layer})
    with pytest.raises(GraphError) as e:
        parse(doc, infos(tensors))
    assert "layer 'new'" in str(e.value) and words in str(e.value)


def test_add_of_different_channel_counts_is_an_error():
    doc, tensors = two_convs()
    doc["layers"].append({"name": "s", "op": "add", "inputs": ["a", "b"]})
    with pytest.raises(GraphError, match="layer 's'.*channel counts differ"):
        parse(doc, infos(tensors))


def test_a_per_channel_pad_value_must_fit_the_channels():
    doc, tensors = two_convs()
    doc["layers"].append({"name": "p", "op": "pad", "input": "a", "padding": 1})
    tensors["p.value"] = torch.zeros(5)
    with pytest.raises(GraphError, match="layer 'p'.*'p.value' has 5 values"):
        parse(doc, infos(tensors))
    doc["layers"][-1]["value"] = 1.0
    tensors["p.value"] = torch.zeros(3)
    with pytest.raises(GraphError, match="field 'value' given and tensor"):
        parse(doc, infos(tensors))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(8, 40), k=st.integers(1, 4), s=st.integers(1, 3), p=st.integers(0, 2), ceil=st.booleans(),
       lo=st.integers(0, 3), hi=st.integers(0, 3))
def test_sizes_follow_pooling_pad_and_broadcasting_as_pytorch_runs_them(n, k, s, p, ceil, lo, hi):
    p = min(p, k // 2)
    l1, t1 = models.conv("a", "x", 2, 3, 3, padding=1)
    layers = [l1,
              {"name": "pool", "op": "avg_pool2d", "input": "a", "kernel_size": k, "stride": s, "padding": p,
               "ceil_mode": ceil},
              {"name": "pad", "op": "pad", "input": "pool", "padding": [[lo, hi], [hi, lo]]},
              {"name": "gap", "op": "adaptive_avg_pool2d", "input": "pad"},
              {"name": "gate", "op": "sigmoid", "input": "gap"},
              {"name": "se", "op": "mul", "inputs": ["pad", "gate"]},
              {"name": "cat", "op": "concat", "inputs": ["se", "pad"]}]
    graph = parse(models.describe(layers, ["cat"]), infos(t1))
    x = torch.zeros(1, 2, n, n + 1, dtype=torch.float64)
    want = models.evaluate(models.describe(layers[:3], ["pad"]), t1, x)[0].shape[2:]
    sizes = graph.sizes((n, n + 1))
    assert sizes["pad"] == tuple(want) and sizes["se"] == tuple(want) and sizes["cat"] == tuple(want)
    assert sizes["gap"] is None


def test_sizes_the_trace_saw_fill_in_behind_ops_the_description_cannot_follow():
    """Issue: sizes stopped at an upsampling (or any opaque op).  The export tracer records the output size it saw
    on opaque layers; they hold exactly at the traced input size, and only there."""
    import torch.nn.functional as F
    from torch import nn

    from convmerge import model
    from convmerge.frontends import trace

    class Up(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, stride=2, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(F.interpolate(self.a(x), scale_factor=2.0, mode="nearest"))

    net = Up()
    traced = trace.describe_module(net, example_size=(32, 30))
    assert traced.doc["traced_input"] == [32, 30]
    graph = parse(traced.doc, model.module_tensors(net.state_dict()).info)
    assert graph.sizes((32, 30))["b"] == (32, 30)
    assert graph.sizes((64, 64))["b"] is None


def test_a_graph_inputs_channels_are_read_from_the_layers_reading_it():
    """The description does not state the input's channels: its readers (through pads and poolings) do, and a
    concat of it with a conv's output has their sum (issue 19, item 2)."""
    l1, t1 = models.conv("c1", "p0", 3, 4, 3, padding=1)
    doc = models.describe([{"name": "p0", "op": "pad", "input": "x", "padding": 1}, l1,
                           {"name": "cat", "op": "concat", "inputs": ["x", "c1"]},
                           {"name": "p", "op": "avg_pool2d", "input": "cat", "kernel_size": 2}], ["p"])
    graph = parse(doc, infos(t1))
    assert graph.channels["x"] == 3 and graph.channels["cat"] == 7 and graph.channels["p"] == 7


def test_readers_of_one_input_that_take_different_channel_counts_are_an_error():
    l1, t1 = models.conv("a", "x", 3, 4, 3)
    l2, t2 = models.conv("b", "x", 5, 4, 3)
    with pytest.raises(GraphError, match="layer 'b'.*'x' gives 3 channels.*takes 5"):
        parse(models.describe([l1, l2], ["a", "b"]), infos({**t1, **t2}))


# --- affine and sub (issue 20) ------------------------------------------------------------------------


def _with_affine(**shapes) -> tuple[dict, dict]:
    doc, tensors = two_convs()
    doc["layers"].insert(1, {"name": "s", "op": "affine", "input": "a"})
    doc["layers"][2]["input"] = "s"
    tensors.update({f"s.{k}": torch.ones(shape) for k, shape in shapes.items()})
    return doc, tensors


@pytest.mark.parametrize("shapes, words", [
    ({"weight": (3, 1, 1)}, "tensor 's.weight' has shape [3, 1, 1], expected [C]"),
    ({"bias": ()}, "tensor 's.bias' has shape [], expected [C]"),
    ({"weight": (0,)}, "tensor 's.weight' has shape [0]"),
    ({"weight": (3,), "bias": (2,)}, "disagree on the channel count (weight [3], bias [2])"),
    ({"weight": (4,)}, "field 'input': 'a' gives 3 channels, but the tensors of 's' hold 4 values"),
    ({"bias": (5,), "weight": (1,)}, "'a' gives 3 channels"),
])
def test_an_affine_layer_with_tensors_of_the_wrong_shape_is_an_error_naming_layer_and_tensor(shapes, words):
    doc, tensors = _with_affine(**shapes)
    with pytest.raises(GraphError) as e:
        parse(doc, infos(tensors))
    assert "layer 's'" in str(e.value) and words in str(e.value), str(e.value)


@pytest.mark.parametrize("shapes", [{}, {"weight": (1,)}, {"bias": (3,)}, {"weight": (3,), "bias": (1,)}])
def test_an_affine_layer_takes_per_channel_or_single_values(shapes):
    doc, tensors = _with_affine(**shapes)
    graph = parse(doc, infos(tensors))
    assert graph.channels["s"] == 3
    assert [p.via for p in graph.pairs()] == [("s",)]  # a pair through it, as through a batch norm


@pytest.mark.parametrize("key", ["weight", "bias"])
def test_an_affine_scale_given_as_a_field_is_an_error_not_an_identity(key):
    doc, tensors = _with_affine()
    doc["layers"][1][key] = 2.0
    with pytest.raises(GraphError, match=f"layer 's': field '{key}': .* the tensor 's.{key}'"):
        parse(doc, infos(tensors))


@pytest.mark.parametrize("inputs, words", [
    (["a"], "sub takes exactly 2 inputs, got 1"), (["a", "a", "a"], "sub takes exactly 2 inputs, got 3"),
    (["a", "b"], "sub needs equal shapes, but the channel counts differ ('a' gives 3, 'b' gives 2)")])
def test_a_sub_takes_two_inputs_of_one_shape(inputs, words):
    doc, tensors = two_convs()
    doc["layers"].append({"name": "d", "op": "sub", "inputs": inputs})
    with pytest.raises(GraphError) as e:
        parse(doc, infos(tensors))
    assert "layer 'd'" in str(e.value) and words in str(e.value), str(e.value)


def test_a_skipped_pair_says_why_as_data() -> None:
    """Pair.blocked is a reason with a kind (maths/reasons.py), rendered from the one table."""
    c1, t1 = models.conv("c1", "x", 3, 4, 3, padding=1)
    c2, t2 = models.conv("c2", "c1", 4, 4, 3, padding=1)
    c3, t3 = models.conv("c3", "c1", 4, 2, 1)
    graph = parse(models.describe([c1, c2, c3], ["c2", "c3"]), models.infos({**t1, **t2, **t3}))
    kinds = {(p.first, p.second): p.blocked for p in graph.pairs()}
    why = kinds[("c1", "c2")]
    assert why is not None and why.kind == "other-consumers" and why.as_dict() == {
        "kind": "other-consumers", "layer": "c1", "count": 2}
    assert why.text() == "c1 has 2 consumers"
