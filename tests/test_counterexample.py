"""The counterexample search: lazy, border-first, and at a representative size when the real one is large."""

from __future__ import annotations

from itertools import product

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from convmerge.engine import algebra, plan
from convmerge.engine.algebra import Conv, analyze, merge
from convmerge.reporting.render import counterexample_words
from convmerge.maths.spec import conv_spec

from .oracle import compare, run, run_chain
from .strategies import conv_pairs

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def judge_pairs(convs: list[Conv], size: tuple[int, ...]) -> list:
    """The plan's pair entries for a chain of convs at an input size."""
    from .test_plan import plan_of

    return plan_of(convs, size)[0].pairs


def defined(a: Conv, b: Conv, size: tuple[int, ...]) -> bool:
    return all(plan.chain_runs([a, b], k, n) for k, n in enumerate(size))


def mk(kernel, cin, cout, seed, **kw) -> Conv:
    spec = conv_spec(kernel, cin, cout, **kw)
    gen = torch.Generator().manual_seed(seed)
    return Conv(spec, torch.randn(*spec.weight_shape, generator=gen, dtype=torch.float64))


def seed_pair() -> list[Conv]:
    """The example's unmergeable pair: 3x3 pad 0 -> 3x3 pad 2, 16 channels."""
    return [mk((3, 3), 16, 16, 1), mk((3, 3), 16, 16, 2, padding=2)]


def assert_real(ce: algebra.Counterexample, convs: list[Conv], size: tuple[int, ...]) -> None:
    """The reported input really separates the pair from its candidate (brute force), and the fields agree."""
    v = analyze(*convs)
    cand = merge(*convs, v.candidate)
    pair = run_chain(ce.input, convs)
    single = run(ce.input, cand.weight, cand.bias, cand.spec)
    scale = max(1.0, float(pair.abs().max()), float(single.abs().max()))
    assert abs(float(pair[ce.index]) - float(single[ce.index])) > 1e-9 * scale
    assert ce.pair_value == pytest.approx(float(pair[ce.index]), abs=1e-12 * scale)
    assert ce.candidate_value == pytest.approx(float(single[ce.index]), abs=1e-12 * scale)
    d = ce.as_dict()
    assert d["input_shape"] == list(ce.input.shape) and d["output_index"] == list(ce.index)
    used = tuple(ce.input.shape[2:])
    if used == size:
        assert ce.representative_of is None and d["representative_of"] is None
        return
    assert ce.representative_of == size and d["representative_of"] == list(size)
    an = v.analysis
    for k, (n, m) in enumerate(zip(size, used)):  # a stand-in is congruent and past the border interactions
        assert m <= n and (m == n or (m >= an.start[k] and (n - m) % an.period[k] == 0)), (k, n, m)
    assert v.exact_at(used) == v.exact_at(size) is False


def test_the_search_builds_impulses_only_when_random_inputs_decide_nothing(monkeypatch):
    drawn = []
    real = algebra._impulses

    def counting(*args, **kwargs):
        for x in real(*args, **kwargs):
            drawn.append(1)
            yield x

    monkeypatch.setattr(algebra, "_impulses", counting)
    (pair,) = judge_pairs(seed_pair(), (112, 112))
    assert pair.counterexample is not None
    assert drawn == []  # the random input decided: no impulse was ever built


def test_a_large_size_is_searched_at_a_representative_size():
    convs = seed_pair()
    (pair,) = judge_pairs(convs, (112, 224))
    ce = pair.counterexample
    assert ce is not None and ce.representative_of == (112, 224)
    assert max(ce.input.shape[2:]) < 112
    assert_real(ce, convs, (112, 224))
    v = analyze(*convs)  # and the pair really differs at the size asked
    assert compare(convs, merge(*convs, v.candidate), (112, 224)) is False


def test_a_small_input_is_searched_at_the_size_itself():
    convs = [mk((3, 3), 2, 2, 1), mk((3, 3), 2, 2, 2, padding=2)]
    (pair,) = judge_pairs(convs, (40, 40))
    assert pair.counterexample is not None and pair.counterexample.representative_of is None
    assert_real(pair.counterexample, convs, (40, 40))


@settings(max_examples=60, **SETTINGS)
@given(conv_pairs(nd=1), st.integers(0, 40))
def test_representative_counterexamples_differ_by_brute_force_1d(pair, extra):
    check_representative(list(pair), extra)


@settings(max_examples=25, **SETTINGS)
@given(conv_pairs(nd=2), st.integers(0, 12), st.integers(0, 12))
def test_representative_counterexamples_differ_by_brute_force_2d(pair, extra_h, extra_w):
    check_representative(list(pair), extra_h, extra_w)


def check_representative(convs: list[Conv], *extra: int) -> None:
    """Every search uses the stand-in (no element bound): its counterexample must be real at its own size,
    and the pair must really differ at the size it stands in for."""
    v = analyze(*convs)
    assume(v.verdict in ("unmergeable", "size-dependent"))
    an = v.analysis
    size = tuple(an.start[k] + an.period[k] + e for k, e in enumerate(extra))
    assume(not v.exact_at(size) and defined(*convs, size))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(algebra, "SEARCH_ELEMENTS", 0)
        ce, _ = plan.pair_counterexample(*convs, v, size)()
    brute = compare(convs, merge(*convs, v.candidate), size)
    assume(brute is not None)
    assert ce is not None and brute is False
    assert_real(ce, convs, size)


@settings(max_examples=200, **SETTINGS)
@given(st.lists(st.integers(1, 7), min_size=1, max_size=3))
def test_border_first_visits_every_position_once_nearest_a_border_first(size):
    seen = list(algebra._border_first(size))
    assert sorted(seen) == list(product(*[range(n) for n in size]))
    rings = [min(min(p, n - 1 - p) for p, n in zip(pos, size)) for pos in seen]
    assert rings == sorted(rings)


def test_impulses_stop_at_the_search_budget(monkeypatch):
    """Weights that cancel: nothing differs, so the search runs out its impulses, which the budget caps."""
    w = torch.tensor([[[1.5, -0.25]]], dtype=torch.float64)
    a = Conv(conv_spec((2,), 1, 1, dilation=2), w)
    b = Conv(conv_spec((2,), 1, 1, dilation=3, padding=1, padding_mode="replicate"), w)
    v = analyze(a, b)
    calls = []

    def reference(x):
        calls.append(x.shape)
        return algebra.apply_chain([a, b], x)

    monkeypatch.setattr(algebra, "SEARCH_BUDGET", 3 * 4)
    assert algebra.counterexample(reference, merge(a, b, v.candidate), (4,), 1) is None
    assert len(calls) == 2 + 3  # random, all ones, then three impulses of 4 elements


def test_the_text_report_says_when_the_input_stands_in_for_the_size_asked():
    (pair,) = judge_pairs(seed_pair(), (112, 224))
    words = counterexample_words(pair.counterexample.as_dict())
    assert "input [1, 16, " in words and "a stand-in for 112x224" in words
    (pair,) = judge_pairs([mk((3, 3), 2, 2, 1), mk((3, 3), 2, 2, 2, padding=2)], (40, 40))
    assert "stand-in" not in counterexample_words(pair.counterexample.as_dict())


# --- ceil-mode pooling: the layers' output is larger than any conv's (issue 19, item 1) ---------------


def _ceil_nets():
    torch.manual_seed(0)
    return [torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AvgPool2d(2, ceil_mode=True)),
            torch.nn.Sequential(torch.nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False),
                                torch.nn.Conv2d(3, 4, 1, bias=False), torch.nn.BatchNorm2d(4))]


@pytest.mark.parametrize("which", [0, 1])
def test_a_partial_window_the_single_conv_lacks_is_itself_the_counterexample(which):
    """conv -> AvgPool2d(2, ceil_mode=True), and ResNet-D's shortcut: at odd sizes the layers have one more
    output per axis than any conv; the counterexample names a position only the layers compute (checked
    against the module itself), and the text says the single conv has no such output."""
    import convmerge

    net = _ceil_nets()[which].double().eval()
    (region,) = convmerge.check(net)["regions"]
    assert region["verdict"] == "size-dependent"
    ce = region["counterexample"]
    assert ce is not None and ce["candidate_value"] is None
    n, c, *pos = ce["output_index"]
    x = torch.randn(*ce["input_shape"], dtype=torch.float64)
    with torch.no_grad():
        out = net(x)
    assert list(out.shape) == ce["output_shapes"]["pair"]
    conv_out = [(m - 2) // 2 + 1 for m in ce["input_shape"][2:]]  # any conv's output: the floor of the windows
    assert ce["output_shapes"]["candidate"][2:] == conv_out
    assert any(p >= m for p, m in zip(pos, conv_out)) and all(p < m for p, m in zip(pos, out.shape[2:]))
    words = counterexample_words(ce, "layers")
    assert "no such output" in words and "the size itself" in words


def test_explain_shows_the_partial_window_counterexample_and_no_error_map(tmp_path):
    """The same through a description and `convmerge explain`: no broadcast of two different shapes into a map."""
    from typer.testing import CliRunner

    from convmerge.cli import app

    from .models import conv, describe, save

    layer, tensors = conv("c1", "x", 3, 4, 3, padding=1, gen=torch.Generator().manual_seed(0))
    pool = {"name": "p", "op": "avg_pool2d", "input": "c1", "kernel_size": 2, "ceil_mode": True}
    path = save(tmp_path / "m.safetensors", tensors, describe([layer, pool], ["p"]))
    result = CliRunner().invoke(app, ["explain", str(path), "p", "--input-size", "5x5", "--json"])
    assert result.exit_code == 0, result.output
    import json

    data = json.loads(result.stdout)
    ce = data["counterexample"]
    assert ce["output_shapes"] == {"pair": [1, 4, 3, 3], "candidate": [1, 4, 2, 2]} and data["error_map"] is None
    assert ce["candidate_value"] is None and ce["pair_value"] is not None
