"""Conv specs: every padding form, validation messages, and the round trip through torch modules."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from convmerge.engine.algebra import Conv
from convmerge.frontends.modules import PaddedConv2d, spec_of, to_module
from convmerge.maths.spec import SpecError, conv_spec, macs, params, parse_padding, spec_from_fields

from .oracle import run
from .strategies import conv


@pytest.mark.parametrize(
    "padding,want",
    [
        (2, ((2, 2), (2, 2))),
        ([1, 3], ((1, 1), (3, 3))),
        ([[0, 2], [1, 0]], ((0, 2), (1, 0))),
        ("valid", ((0, 0), (0, 0))),
        ("same", ((1, 2), (1, 1))),  # kernel (4, 3): PyTorch puts the odd cell on the high side
    ],
)
def test_padding_forms(padding, want):
    assert parse_padding(padding, (4, 3), (1, 1), (1, 1)) == want


def test_same_with_dilation_matches_pytorch():
    m = nn.Conv1d(1, 1, 4, padding="same", dilation=3)
    assert spec_of(m).padding == ((4, 5),)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(padding="same", stride=2), "padding"),
        (dict(padding=-1), "padding"),
        (dict(padding=[1, 2, 3]), "padding"),
        (dict(padding="full"), "padding"),
        (dict(stride=0), "stride"),
        (dict(dilation=[1, -1]), "dilation"),
        (dict(groups=3), "groups"),
        (dict(padding_mode="mirror"), "padding_mode"),
    ],
)
def test_invalid_specs_name_the_field(kwargs, field):
    with pytest.raises(SpecError, match=f"^{field}:"):
        conv_spec((3, 3), 4, 4, **kwargs)


def test_fields_must_agree_with_the_weight():
    with pytest.raises(SpecError, match="kernel_size"):
        spec_from_fields({"op": "conv2d", "kernel_size": [5, 5]}, (4, 4, 3, 3), False)
    with pytest.raises(SpecError, match="op"):
        spec_from_fields({"op": "conv2d"}, (4, 4, 3), False)
    spec = spec_from_fields({"op": "conv2d", "groups": 2, "padding": [[0, 1], [1, 0]]}, (4, 2, 3, 3), True)
    assert spec.in_channels == 4 and spec.padding == ((0, 1), (1, 0)) and spec.bias


def test_cost_counts():
    spec = conv_spec((3, 3), 8, 16, padding=1, groups=2, bias=True)
    assert macs(spec, (10, 10)) == 100 * 16 * 4 * 9
    assert params(spec) == 16 * 4 * 9 + 16


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_to_module_and_back_is_the_same_conv(data):
    nd = data.draw(st.sampled_from([1, 2, 3]))
    c = data.draw(conv(nd, 2, 4, data.draw(st.sampled_from([1, 2]))))
    module = to_module(c)
    assert spec_of(module) == c.spec
    assert isinstance(module, PaddedConv2d) == (nd == 2 and not c.spec.symmetric)
    size = (9,) * nd
    x = torch.randn(1, 2, *size, dtype=torch.float64)
    try:
        want = run(x, c.weight, c.bias, c.spec)
    except RuntimeError:
        return
    with torch.no_grad():
        assert torch.allclose(module(x), want, atol=1e-12)
    assert set(module.state_dict()) == ({"weight", "bias"} if c.bias is not None else {"weight"})


def test_conv_checks_weight_shape():
    with pytest.raises(ValueError):
        Conv(conv_spec((3,), 2, 2), torch.zeros(2, 2, 4))
