"""Chains: segmentation, the chain trap, batch-norm folding, cost and numeric verification."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from convmerge import algebra, chain
from convmerge.algebra import BatchNorm, Conv, fold_bn
from convmerge.spec import conv_spec, macs

from .oracle import compare, run_chain
from .strategies import conv


def mk(kernel, cin, cout, seed=0, **kw):
    spec = conv_spec(kernel, cin, cout, **kw)
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(*spec.weight_shape, generator=gen, dtype=torch.float64)
    b = torch.randn(cout, generator=gen, dtype=torch.float64) if spec.bias else None
    return Conv(spec, w, b)


def test_chain_trap_3x3_p0_then_1x1_then_3x3_p1_is_not_one_conv():
    convs = [mk((3, 3), 2, 2, 1, padding=0), mk((1, 1), 2, 2, 2), mk((3, 3), 2, 2, 3, padding=1)]
    pairs = chain.judge_pairs(convs, None)
    assert [p.verdict.verdict for p in pairs] == ["mergeable", "mergeable"]
    segments = chain.plan(convs, None, policy="all")
    assert len(segments) == 2  # never all three
    for seg in segments:
        if seg.merged:
            assert compare(convs[seg.start:seg.stop], seg.conv, (9, 9))
    m01 = algebra.merge(convs[0], convs[1], algebra.analyze(convs[0], convs[1]).candidate)
    assert algebra.analyze(m01, convs[2]).verdict == "unmergeable"


def test_cheaper_policy_keeps_depthwise_separable_and_all_merges_it():
    dw = mk((3, 3), 64, 64, 1, padding=2, groups=64)
    pw = mk((1, 1), 64, 64, 2)
    cheaper = chain.plan([dw, pw], (56, 56), policy="cheaper")
    assert [s.merged for s in cheaper] == [False, False]
    merged = chain.plan([dw, pw], (56, 56), policy="all")
    assert len(merged) == 1 and merged[0].conv.spec.groups == 1
    assert macs(merged[0].conv.spec, (56, 56)) > 5 * (macs(dw.spec, (56, 56)) + macs(pw.spec, (58, 58)))


def test_cheaper_policy_merges_two_depthwise_convs_although_macs_grow():
    """CP-decomposed 3x1 then 1x3 depthwise: 6 -> 9 MACs per pixel, but one pass less (measured faster)."""
    a = mk((3, 1), 64, 64, 1, padding=[[1, 1], [0, 0]], groups=64)
    b = mk((1, 3), 64, 64, 2, padding=[[0, 0], [1, 1]], groups=64)
    (seg,) = chain.plan([a, b], (56, 56), policy="cheaper")
    assert seg.merged and seg.conv.spec.kernel_size == (3, 3) and seg.conv.spec.groups == 64
    assert macs(seg.conv.spec, (56, 56)) > macs(a.spec, (56, 56)) + macs(b.spec, (56, 56))


def test_expandnets_style_1x1_3x3_1x1_collapses_to_one_cheaper_3x3():
    convs = [mk((1, 1), 4, 16, 1), mk((3, 3), 16, 16, 2, padding=1), mk((1, 1), 16, 4, 3)]
    segments = chain.plan(convs, (16, 16))
    assert len(segments) == 1 and segments[0].conv.spec.kernel_size == (3, 3)
    assert compare(convs, segments[0].conv, (16, 16)) and compare(convs, segments[0].conv, (5, 7))


def test_size_dependent_pair_merges_only_at_an_exact_size():
    convs = [mk((3, 3), 2, 4, 1, stride=2, padding=1), mk((3, 3), 4, 2, 2, padding=1)]
    assert [s.merged for s in chain.plan(convs, None, "all")] == [False, False]
    assert [s.merged for s in chain.plan(convs, (32, 32), "all")] == [False, False]  # even: not exact
    segs = chain.plan(convs, (33, 33), "all")
    assert len(segs) == 1 and compare(convs, segs[0].conv, (33, 33)) and compare(convs, segs[0].conv, (225, 225))


def test_size_dependent_pair_gets_a_counterexample_at_a_failing_size():
    convs = [mk((3,), 2, 4, 1, stride=2, padding=1), mk((3,), 4, 2, 2, padding=1)]
    (pair,) = chain.judge_pairs(convs, (32,))
    assert pair.verdict.verdict == "size-dependent" and pair.exact_here is False
    assert pair.counterexample is not None and list(pair.counterexample.input.shape) == [1, 2, 32]
    (pair,) = chain.judge_pairs(convs, (31,))
    assert pair.exact_here is True and pair.counterexample is None


def test_batch_norm_between_convs_folds_exactly():
    c1 = mk((3, 3), 3, 4, 1, padding=2)
    c2 = mk((3, 3), 4, 2, 2, padding=1, bias=True)
    gen = torch.Generator().manual_seed(5)
    bn = BatchNorm(torch.randn(4, generator=gen), torch.rand(4, generator=gen) + 0.5, 1e-5,
                   torch.randn(4, generator=gen), torch.zeros(4))
    bn_mod = torch.nn.BatchNorm2d(4).double().eval()
    with torch.no_grad():
        bn_mod.running_mean.copy_(bn.mean), bn_mod.running_var.copy_(bn.var)
        bn_mod.weight.copy_(bn.weight), bn_mod.bias.copy_(bn.bias)
    folded = fold_bn(c1, bn)
    x = torch.randn(1, 3, 10, 10, dtype=torch.float64)
    want = run_chain(bn_mod(run_chain(x, [c1])), [c2])
    assert torch.allclose(run_chain(x, [folded, c2]), want, atol=1e-10)
    # The batch norm's shift meets conv2's zero padding: the pair cannot be one conv...
    assert algebra.analyze(folded, c2).verdict == "unmergeable"
    # ...unless its shift is zero after folding (mean = 0, beta = 0).
    bn0 = BatchNorm(torch.zeros(4), bn.var, 1e-5, bn.weight, torch.zeros(4))
    assert algebra.analyze(fold_bn(c1, bn0), c2).verdict == "mergeable"


def test_verification_catches_a_wrong_merge(monkeypatch):
    convs = [mk((3,), 2, 2, 1, padding=2), mk((3,), 2, 2, 2, padding=1)]
    real = algebra.merge

    def broken(a, b, cand):
        m = real(a, b, cand)
        return Conv(m.spec, m.weight.flip(-1), m.bias)

    monkeypatch.setattr(algebra, "merge", broken)
    with pytest.raises(chain.VerificationError):
        chain.plan(convs, None, "all")


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_random_chains_plan_equals_running_the_chain(data):
    nd = data.draw(st.sampled_from([1, 2]))
    n_convs = data.draw(st.integers(2, 4))
    convs = [data.draw(conv(nd, 2, 2, 1, mode="zeros")) for _ in range(n_convs)]
    size = data.draw(st.sampled_from([None, (12,) * nd, (13,) * nd]))
    try:
        run_chain(torch.zeros(1, 2, *(size or (40,) * nd), dtype=torch.float64), convs)
    except RuntimeError:
        return
    policy = data.draw(st.sampled_from(chain.POLICIES))
    segments = chain.plan(convs, size, policy)
    assert segments[0].start == 0 and segments[-1].stop == len(convs)
    assert all(a.stop == b.start for a, b in zip(segments, segments[1:]))
    for s in [size] if size else [(n,) * nd for n in (17, 18, 23)]:
        x = torch.randn(1, 2, *s, dtype=torch.float64)
        try:
            want = run_chain(x, convs)
        except RuntimeError:
            continue
        got = run_chain(x, [seg.conv for seg in segments])
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-9), s


@pytest.mark.parametrize("mode,padding,groups", [("zeros", 0, 1), ("zeros", 1, 1), ("reflect", 1, 2),
                                                  ("zeros", 1, 2), ("circular", 2, 1)])
def test_batch_norm_before_a_conv_folds_when_exact(mode, padding, groups):
    gen = torch.Generator().manual_seed(3)
    conv = mk((3, 3), 4, 6, 1, padding=padding, padding_mode=mode, groups=groups, bias=True)
    bn_mod = torch.nn.BatchNorm2d(4).double().eval()
    with torch.no_grad():
        bn_mod.running_mean.copy_(torch.randn(4, generator=gen))
        bn_mod.running_var.copy_(torch.rand(4, generator=gen) + 0.5)
        bn_mod.weight.copy_(torch.randn(4, generator=gen))
        bn_mod.bias.copy_(torch.randn(4, generator=gen))
    bn = BatchNorm(bn_mod.running_mean, bn_mod.running_var, bn_mod.eps, bn_mod.weight, bn_mod.bias)
    folded = algebra.fold_bn_before(bn, conv)
    x = torch.randn(1, 4, 7, 7, dtype=torch.float64)
    want = run_chain(bn_mod(x), [conv])
    assert (folded is not None) == (mode != "zeros" or padding == 0)
    if folded is not None:
        assert torch.allclose(run_chain(x, [folded]), want, atol=1e-9)
    else:  # the naive fold (same weights, conv's zero padding) really differs at the border
        unpadded = Conv(dataclasses.replace(conv.spec, axes=tuple(dataclasses.replace(a, pad=(0, 0))
                                                                  for a in conv.spec.axes)), conv.weight, conv.bias)
        naive = algebra.fold_bn_before(bn, unpadded)
        naive = Conv(dataclasses.replace(naive.spec, axes=conv.spec.axes), naive.weight, naive.bias)
        assert not torch.allclose(run_chain(x, [naive]), want, atol=1e-6)


def test_weights_that_cancel_get_no_fake_counterexample():
    """Equal kernels make W2[0]W1[1] == W2[1]W1[0]: this replicate pair is then exact at size 4 by accident."""
    w = torch.tensor([[[1.5, -0.25]]], dtype=torch.float64)
    a = Conv(conv_spec((2,), 1, 1, dilation=2), w)
    b = Conv(conv_spec((2,), 1, 1, dilation=3, padding=1, padding_mode="replicate"), w)
    (pair,) = chain.judge_pairs([a, b], (4,))
    assert pair.verdict.verdict == "unmergeable" and pair.counterexample is None
    assert "no difference" in pair.verdict.reason
    b2 = Conv(b.spec, torch.tensor([[[0.5, 2.0]]], dtype=torch.float64))
    (pair,) = chain.judge_pairs([a, b2], (4,))
    assert pair.counterexample is not None and "no difference" not in pair.verdict.reason


def test_no_counterexample_says_whether_any_input_was_tried():
    """At length 2 the 5-tap candidate's reflect pad of 2 is refused by PyTorch: no input runs through it."""
    spec = conv_spec((3,), 1, 1, padding=1, padding_mode="reflect")
    a, b = Conv(spec, torch.tensor([[[1.0, 2.0, -1.0]]], dtype=torch.float64)), Conv(
        spec, torch.tensor([[[0.5, -1.0, 3.0]]], dtype=torch.float64))
    (pair,) = chain.judge_pairs([a, b], (2,))
    assert pair.verdict.verdict == "unmergeable" and pair.counterexample is None
    assert "no input could be tried" in pair.verdict.reason and "no difference" not in pair.verdict.reason
    assert chain.find_counterexample(a, b, pair.verdict, (2,)) == (None, False)
    (pair,) = chain.judge_pairs([a, b], (3,))
    assert pair.counterexample is not None and "no input" not in pair.verdict.reason
