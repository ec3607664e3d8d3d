"""Verdicts, size predicates and counterexamples against brute-force float64 evaluation."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings

from convmerge.engine.algebra import Conv, analyze, counterexample, merge
from convmerge.maths.rules import decide, describe_sizes, full_support
from convmerge.maths.spec import conv_spec

from .oracle import compare, run, run_chain
from .strategies import conv_pairs

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def sizes_to_try(nd: int, seed: int) -> list[tuple[int, ...]]:
    """Every size 1..16 on the diagonal, plus random mixed sizes for 2-d and 3-d."""
    rng = random.Random(seed)
    if nd == 1:
        return [(n,) for n in range(1, 17)]
    top = 16 if nd == 2 else 9
    diag = [(n,) * nd for n in range(1, top + 1)]
    return diag + [tuple(rng.randint(1, top) for _ in range(nd)) for _ in range(12 if nd == 2 else 6)]


def runs(conv: Conv, size) -> bool:
    try:
        run(torch.zeros(1, conv.spec.in_channels, *size, dtype=torch.float64), conv.weight, conv.bias, conv.spec)
    except RuntimeError:
        return False
    return True


def check_against_brute_force(c1: Conv, c2: Conv) -> None:
    v = analyze(c1, c2)
    merged = merge(c1, c2, v.candidate)
    seen = {}
    for size in sizes_to_try(c1.spec.ndim, seed=hash((c1.spec, c2.spec)) & 0xFFFF):
        brute = compare([c1, c2], merged, size)
        if brute is None:
            continue
        seen[size] = brute
        assert v.exact_at(size) == brute, (size, v.verdict, v.reason)
    event(f"{c1.spec.ndim}-d {v.verdict}, {sum(seen.values())}/{len(seen)} sizes exact")
    if v.verdict == "mergeable":
        # Exact wherever PyTorch runs the merged conv; sizes where it refuses only the merged reflect or
        # circular padding are named by a note, never hidden.
        assert all(ok for s, ok in seen.items() if runs(merged, s)), v.reason
        refused = [s for s in seen if not runs(merged, s)]
        limits = {n["axis"]: n["least"] for n in v.notes if n.kind == "pytorch-pad-limit"}
        assert all(any(n < limits.get(ax, 0) for ax, n in zip(c1.spec.axis_names, s)) for s in refused), v.reason
    if v.verdict == "unmergeable":
        assert not any(seen.values()), v.reason
    failing = [s for s, ok in seen.items() if not ok and runs(merged, s)]
    if failing:
        ce = counterexample(lambda x: run_chain(x, [c1, c2]), merged, failing[0], c1.spec.in_channels)
        assert ce is not None
        pair = run_chain(ce.input, [c1, c2])
        single = run(ce.input, merged.weight, merged.bias, merged.spec)
        assert abs(float(pair[ce.index]) - float(single[ce.index])) > 1e-9
        assert ce.pair_value == pytest.approx(float(pair[ce.index]))


@settings(max_examples=1500, **SETTINGS)
@given(conv_pairs(nd=1))
def test_conv1d_pairs_match_brute_force(pair):
    check_against_brute_force(*pair)


@settings(max_examples=500, **SETTINGS)
@given(conv_pairs(nd=1, mode="zeros"))
def test_zero_padded_conv1d_pairs_match_brute_force(pair):
    check_against_brute_force(*pair)


@settings(max_examples=400, **SETTINGS)
@given(conv_pairs(nd=2))
def test_conv2d_pairs_match_brute_force(pair):
    check_against_brute_force(*pair)


@settings(max_examples=120, **SETTINGS)
@given(conv_pairs(nd=3))
def test_conv3d_pairs_match_brute_force(pair):
    check_against_brute_force(*pair)


def _pair(k1, s1, p1, k2, s2, p2, nd=2, bias=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = conv_spec((k1,) * nd, 2, 3, stride=s1, padding=p1, bias=bias)
    b = conv_spec((k2,) * nd, 3, 2, stride=s2, padding=p2, bias=bias)
    mk = lambda s: Conv(s, torch.randn(*s.weight_shape, generator=gen, dtype=torch.float64),
                        torch.randn(s.out_channels, generator=gen, dtype=torch.float64) if bias else None)
    return mk(a), mk(b)


@pytest.mark.parametrize("p2", [0, 1, 2])
@pytest.mark.parametrize("s2", [1, 2])
def test_seed_image_two_3x3_kernels_merge_when_conv1_pads_k_minus_1(p2, s2):
    k1 = torch.randn(1, 1, 3, 3, dtype=torch.float64)
    k2 = torch.randn(1, 1, 3, 3, dtype=torch.float64)
    c1 = Conv(conv_spec((3, 3), 1, 1, padding=2), k1)
    c2 = Conv(conv_spec((3, 3), 1, 1, stride=s2, padding=p2), k2)
    v = analyze(c1, c2)
    assert v.verdict == "mergeable"
    assert v.candidate.kernel_size == (5, 5)
    assert v.candidate.padding == ((2 + p2, 2 + p2),) * 2 and v.candidate.stride == (s2, s2)
    assert compare([c1, c2], merge(c1, c2, v.candidate), (20, 20))


def test_seed_image_unpadded_kernels_give_one_5x5():
    c1 = Conv(conv_spec((3, 3), 1, 1), torch.randn(1, 1, 3, 3, dtype=torch.float64))
    c2 = Conv(conv_spec((3, 3), 1, 1), torch.randn(1, 1, 3, 3, dtype=torch.float64))
    v = analyze(c1, c2)
    assert v.verdict == "mergeable" and v.candidate.kernel_size == (5, 5) and v.candidate.padding == ((0, 0),) * 2
    merged = merge(c1, c2, v.candidate)
    x = torch.randn(1, 1, 20, 20, dtype=torch.float64)
    assert run(x, merged.weight, None, merged.spec).shape == (1, 1, 16, 16)
    assert compare([c1, c2], merged, (20, 20))


def test_seed_counterexample_on_a_3x3_image():
    k1 = torch.tensor([[1.0, 0.0, -1.0]] * 3, dtype=torch.float64).view(1, 1, 3, 3)
    c1 = Conv(conv_spec((3, 3), 1, 1, padding=0), k1)
    c2 = Conv(conv_spec((3, 3), 1, 1, padding=2), torch.ones(1, 1, 3, 3, dtype=torch.float64))
    v = analyze(c1, c2)
    assert v.verdict == "unmergeable"
    assert "pads 0 on the left of H but needs >= 2" in v.reason and "conv2 pads 2" in v.reason
    merged = merge(c1, c2, v.candidate)
    ce = counterexample(lambda x: run_chain(x, [c1, c2]), merged, (3, 3), 1)
    assert ce is not None and list(ce.input.shape) == [1, 1, 3, 3]
    pair = run_chain(ce.input, [c1, c2])
    # The pair applies kernel1 once and copies that value over a 3x3 output.
    assert torch.allclose(pair, pair[0, 0, 0, 0].expand_as(pair))
    assert ce.pair_value != pytest.approx(ce.candidate_value)


@pytest.mark.parametrize(
    "k1,s1,p1,odd_even",
    [(3, 2, 1, "L is odd"), (2, 2, 0, "L is even"), (4, 4, 0, "L is a multiple of 4")],
)
def test_strided_conv1_right_side_is_size_dependent(k1, s1, p1, odd_even):
    c1, c2 = _pair(k1, s1, p1, 3, 1, 1, nd=1)
    v = analyze(c1, c2)
    assert v.verdict == "size-dependent" and v.sizes == odd_even
    merged = merge(c1, c2, v.candidate)
    for n in range(4, 40):
        assert v.exact_at((n,)) == compare([c1, c2], merged, (n,))


def test_strided_7x7_stem_then_3x3_is_never_exact():
    c1, c2 = _pair(7, 2, 3, 3, 1, 1)
    assert analyze(c1, c2).verdict == "unmergeable"


def test_zero_border_taps_count_as_smaller_kernel():
    c1, c2 = _pair(3, 1, 1, 3, 1, 1, nd=1)
    w = torch.zeros_like(c1.weight)
    w[..., 1] = c1.weight[..., 1]  # a 3-tap kernel that is really 1x1 with padding 1
    c1 = Conv(c1.spec, w)
    v = analyze(c1, c2)
    assert v.verdict == "mergeable" and v.candidate.kernel_size == (3,)
    assert decide(c1.spec, c2.spec, full_support(c1.spec), full_support(c2.spec)).verdict == "unmergeable"


def test_bias_meeting_zero_padding_breaks_the_merge_unless_it_cancels():
    c1, c2 = _pair(3, 1, 2, 3, 1, 1, nd=1, bias=True)
    assert analyze(c1, c2).verdict == "unmergeable"
    # conv2's taps on conv1's two channels cancel conv1's (equal) bias: beta = 0 everywhere.
    w2 = c2.weight.clone()
    w2[:, 1] = -w2[:, 0]
    w2[:, 2] = 0
    b1 = torch.tensor([1.5, 1.5, -4.0], dtype=torch.float64)
    c1 = Conv(c1.spec, c1.weight, b1)
    c2 = Conv(c2.spec, w2, c2.bias)
    v = analyze(c1, c2)
    assert v.verdict == "mergeable"
    assert compare([c1, c2], merge(c1, c2, v.candidate), (9,))


def test_depthwise_then_depthwise_stays_depthwise_and_dense_becomes_dense():
    dw = conv_spec((3, 3), 4, 4, padding=2, groups=4)
    pw = conv_spec((1, 1), 4, 8)
    a = Conv(dw, torch.randn(*dw.weight_shape, dtype=torch.float64))
    b = Conv(dw, torch.randn(*dw.weight_shape, dtype=torch.float64))
    c = Conv(pw, torch.randn(*pw.weight_shape, dtype=torch.float64))
    v = analyze(a, b)
    assert v.candidate.groups == 4 and compare([a, b], merge(a, b, v.candidate), (7, 7))
    v = analyze(a, c)
    assert v.candidate.groups == 1 and compare([a, c], merge(a, c, v.candidate), (7, 7))


def test_pointwise_conv1_commutes_with_any_padding_mode():
    for mode in ("reflect", "replicate", "circular"):
        pw = conv_spec((1, 1), 2, 3, bias=True)
        k = conv_spec((3, 3), 3, 2, padding=1, padding_mode=mode, bias=True)
        a = Conv(pw, torch.randn(3, 2, 1, 1, dtype=torch.float64), torch.randn(3, dtype=torch.float64))
        b = Conv(k, torch.randn(2, 3, 3, 3, dtype=torch.float64), torch.randn(2, dtype=torch.float64))
        v = analyze(a, b)
        assert v.verdict == "mergeable" and v.candidate.padding_mode == mode, v.reason


def test_circular_same_convs_merge_but_need_room_for_the_merged_pad():
    k = conv_spec((3,), 2, 2, padding=1, padding_mode="circular")
    a = Conv(k, torch.randn(2, 2, 3, dtype=torch.float64))
    b = Conv(k, torch.randn(2, 2, 3, dtype=torch.float64))
    v = analyze(a, b)
    # The only size condition is PyTorch's own limit on the merged circular pad (2 <= L): mergeable, and said.
    assert v.verdict == "mergeable" and v.sizes is None
    (note,) = v.notes
    assert note.kind == "pytorch-pad-limit" and note["least"] == 2 and note["smallest"] == 1
    assert "L >= 2" in v.reason and "circular padding may not exceed the input" in v.reason
    merged = merge(a, b, v.candidate)
    assert all(compare([a, b], merged, (n,)) for n in range(2, 12))
    assert not v.exact_at((1,))


def test_describe_sizes_words():
    ok = {n: n % 3 == 1 for n in range(1, 20)}
    assert describe_sizes("H", ok, 10, 3) == "H mod 3 is 1"
    ok = {n: n >= 3 for n in range(1, 20)}
    assert describe_sizes("W", ok, 10, 2) == "W is any size and W >= 3"
    ok = {n: n in (1, 2) for n in range(1, 20)}
    assert describe_sizes("H", ok, 10, 1) == "H is 1 or 2"


def test_closed_forms_of_design_rules_2_and_3_agree_with_the_enumeration():
    """DESIGN.md rules 2-3 (zero padding, stride-s1 conv1, dense kernels), over an exhaustive sweep."""
    import itertools

    for k1, s1, l1, r1, k2, l2, r2 in itertools.product(range(1, 5), range(1, 4), range(5), range(5), (1, 3),
                                                        range(3), range(3)):
        a = conv_spec((k1,), 1, 1, stride=s1, padding=[[l1, r1]])
        b = conv_spec((k2,), 1, 1, padding=[[l2, r2]])
        left = l2 == 0 or l1 >= k1 - s1
        right_always = r2 == 0 or r1 >= k1 - 1
        right_never = r2 > 0 and r1 < k1 - s1
        want = ("mergeable" if left and right_always else
                "unmergeable" if not left or right_never else "size-dependent")
        assert decide(a, b, full_support(a), full_support(b)).verdict == want, (k1, s1, l1, r1, k2, l2, r2)


def test_circular_rule_6_and_replicate_rule_7():
    """circular o circular: exact iff n divides s1*m1 (or no padding read); replicate needs e1-1 each side."""
    for k1, s1, p1 in [(3, 1, 1), (3, 2, 1), (2, 2, 0), (5, 1, 2), (3, 1, 0)]:
        a = conv_spec((k1,), 1, 1, stride=s1, padding=p1, padding_mode="circular")
        b = conv_spec((3,), 1, 1, padding=1, padding_mode="circular")
        v = decide(a, b, full_support(a), full_support(b))
        for n in range(max(3, k1), 30):
            m1 = a.axes[0].out_len(n)
            if m1 < 1 or v.candidate.axes[0].pad[0] > n:
                continue
            assert v.exact_at((n,)) == ((s1 * m1) % n == 0), (k1, s1, p1, n)
    for k1, l1, r1 in [(3, 2, 2), (3, 1, 2), (3, 2, 1), (2, 1, 1)]:
        a = conv_spec((k1,), 1, 1, padding=[[l1, r1]], padding_mode="replicate")
        b = conv_spec((3,), 1, 1, padding=1, padding_mode="replicate")
        v = decide(a, b, full_support(a), full_support(b))
        assert (v.verdict == "mergeable") == (l1 >= k1 - 1 and r1 >= k1 - 1), (k1, l1, r1, v.verdict)
