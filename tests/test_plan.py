"""The plan on chains: segmentation, the chain trap, batch norms, cost, verification, and that the
tensors written are the tensors verified."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import convmerge
from convmerge.engine import algebra, plan
from convmerge import io, model
from convmerge.engine.algebra import BatchNorm, Conv, fold_bn
from convmerge.graph import parse
from convmerge.maths.reasons import Why
from convmerge.maths.spec import conv_spec, macs
from convmerge.options import Options

from . import models
from .models import chain_of, infos
from .oracle import compare, run_chain
from .strategies import conv


def mk(kernel, cin, cout, seed=0, **kw):
    spec = conv_spec(kernel, cin, cout, **kw)
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(*spec.weight_shape, generator=gen, dtype=torch.float64)
    b = torch.randn(cout, generator=gen, dtype=torch.float64) if spec.bias else None
    return Conv(spec, w, b)


def plan_of(convs, size=None, policy="all", bns=None) -> tuple[plan.Plan, dict, dict]:
    doc, tensors = chain_of(convs, bns)
    graph = parse(doc, infos(tensors))
    return plan.build(graph, plan.Tensors(infos(tensors), tensors.__getitem__), Options(policy, size)), doc, tensors


def fused(p: plan.Plan, tensors: dict) -> tuple[dict, dict]:
    """The fused description and tensors, exactly as `fuse` would write them."""
    out = dict(p.listing(list(tensors), tensors.__getitem__))
    return p.description(), out


def same_function(doc, tensors, p, sizes, channels=None) -> bool:
    """The fused description and tensors compute what the original does (independent evaluator)."""
    doc1, t1 = fused(p, tensors)
    if channels is None:
        first = doc["layers"][0]
        channels = tensors[f"{first['name']}.weight"].shape[1] * first.get("groups", 1)
    for s in sizes:
        x = torch.randn(1, channels, *s, dtype=torch.float64)
        try:
            want = models.evaluate(doc, tensors, x)[0]
        except RuntimeError:
            continue
        if not torch.allclose(models.evaluate(doc1, t1, x)[0], want, rtol=1e-9, atol=1e-9):
            return False
    return True


def test_chain_trap_3x3_p0_then_1x1_then_3x3_p1_is_not_one_conv():
    convs = [mk((3, 3), 2, 2, 1, padding=0), mk((1, 1), 2, 2, 2), mk((3, 3), 2, 2, 3, padding=1)]
    p, doc, tensors = plan_of(convs, policy="all")
    assert [e.verdict for e in p.pairs] == ["mergeable", "mergeable"]
    (region,) = p.regions
    assert region.verdict == "unmergeable" and region.counterexample is not None
    assert len(p.units) == 1 and len(p.units[0].layers) == 2  # never all three
    assert same_function(doc, tensors, p, [(9, 9), (6, 11)])
    m01 = algebra.merge(convs[0], convs[1], algebra.analyze(convs[0], convs[1]).candidate)
    assert algebra.analyze(m01, convs[2]).verdict == "unmergeable"


def test_cheaper_policy_keeps_depthwise_separable_and_all_merges_it():
    dw = mk((3, 3), 64, 64, 1, padding=2, groups=64)
    pw = mk((1, 1), 64, 64, 2)
    assert not plan_of([dw, pw], (56, 56), "cheaper")[0].units
    (unit,) = plan_of([dw, pw], (56, 56), "all")[0].units
    assert unit.spec.groups == 1
    assert macs(unit.spec, (56, 56)) > 5 * (macs(dw.spec, (56, 56)) + macs(pw.spec, (58, 58)))


def test_cheaper_policy_merges_two_depthwise_convs_although_macs_grow():
    """CP-decomposed 3x1 then 1x3 depthwise: 6 -> 9 MACs per pixel, but one pass less (measured faster)."""
    a = mk((3, 1), 64, 64, 1, padding=[[1, 1], [0, 0]], groups=64)
    b = mk((1, 3), 64, 64, 2, padding=[[0, 0], [1, 1]], groups=64)
    (unit,) = plan_of([a, b], (56, 56), "cheaper")[0].units
    assert unit.spec.kernel_size == (3, 3) and unit.spec.groups == 64
    assert macs(unit.spec, (56, 56)) > macs(a.spec, (56, 56)) + macs(b.spec, (56, 56))


def test_expandnets_style_1x1_3x3_1x1_collapses_to_one_cheaper_3x3():
    convs = [mk((1, 1), 4, 16, 1), mk((3, 3), 16, 16, 2, padding=1), mk((1, 1), 16, 4, 3)]
    p, doc, tensors = plan_of(convs, (16, 16), "cheaper")
    (unit,) = p.units
    assert unit.spec.kernel_size == (3, 3) and unit.name == "c2" and unit.layers == ("c0", "c1", "c2")
    assert same_function(doc, tensors, p, [(16, 16), (5, 7)])


def test_size_dependent_pair_merges_only_at_an_exact_size():
    convs = [mk((3, 3), 2, 4, 1, stride=2, padding=1), mk((3, 3), 4, 2, 2, padding=1)]
    assert not plan_of(convs, None, "all")[0].units
    assert not plan_of(convs, (32, 32), "all")[0].units  # even: not exact
    p, doc, tensors = plan_of(convs, (33, 33), "all")
    assert len(p.units) == 1 and same_function(doc, tensors, p, [(33, 33), (225, 225)])


def test_size_dependent_pair_gets_a_counterexample_at_a_failing_size():
    convs = [mk((3,), 2, 4, 1, stride=2, padding=1), mk((3,), 4, 2, 2, padding=1)]
    (pair,) = plan_of(convs, (32,))[0].pairs
    assert pair.verdict == "size-dependent" and pair.exact_here is False
    assert pair.counterexample is not None and list(pair.counterexample.input.shape) == [1, 2, 32]
    (pair,) = plan_of(convs, (31,))[0].pairs
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
    # ...unless its shift is zero after folding (mean = 0, beta = 0), which holds only for these weights.
    bn0 = BatchNorm(torch.zeros(4), bn.var, 1e-5, bn.weight, torch.zeros(4))
    v = algebra.analyze(fold_bn(c1, bn0), c2)
    assert v.verdict == "mergeable" and v.weight_dependent and "only because of these weights" in v.reason


def break_merges(monkeypatch) -> None:
    """Every merged kernel comes out flipped: wrong unless symmetric, which random weights are not."""
    real = algebra.merge

    def broken(a, b, cand):
        m = real(a, b, cand)
        return Conv(m.spec, m.weight.flip(-1), m.bias)

    monkeypatch.setattr(algebra, "merge", broken)


def test_verification_catches_a_wrong_merge(monkeypatch):
    convs = [mk((3,), 2, 2, 1, padding=2), mk((3,), 2, 2, 2, padding=1)]
    break_merges(monkeypatch)
    with pytest.raises(plan.VerificationError):
        plan_of(convs, None, "all")


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_random_chains_plan_equals_running_the_chain(data):
    nd = data.draw(st.sampled_from([1, 2]))
    n_convs = data.draw(st.integers(2, 4))
    convs = [data.draw(conv(nd, 2, 2, 1, mode="zeros", salt=i)) for i in range(n_convs)]
    size = data.draw(st.sampled_from([None, (12,) * nd, (13,) * nd]))
    try:
        run_chain(torch.zeros(1, 2, *(size or (40,) * nd), dtype=torch.float64), convs)
    except RuntimeError:
        return
    policy = data.draw(st.sampled_from(plan.POLICIES))
    p, doc, tensors = plan_of(convs, size, policy)
    assert same_function(doc, tensors, p, [size] if size else [(n,) * nd for n in (17, 18, 23)])


def _bn(gen: torch.Generator, c: int, fresh: bool) -> BatchNorm:
    if fresh:
        return BatchNorm(torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64), 1e-5)
    return BatchNorm(torch.randn(c, generator=gen, dtype=torch.float64),
                     torch.rand(c, generator=gen, dtype=torch.float64) + 0.5, 1e-5,
                     torch.randn(c, generator=gen, dtype=torch.float64),
                     torch.randn(c, generator=gen, dtype=torch.float64))


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_written_tensors_are_the_verified_tensors_with_batch_norms_anywhere(tmp_path_factory, data):
    """Issue: a batch norm between convs was folded into the verified conv but not into the written one.
    Random chains with batch norms and affine layers at random places (fresh or trained), both policies: the fused file
    computes what the original does, at two sizes, and its merged tensors are the plan's, bit for bit."""
    n = data.draw(st.integers(2, 5))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000)))
    chans = [data.draw(st.sampled_from([2, 4])) for _ in range(n + 1)]
    convs = []
    for i in range(n):
        k = data.draw(st.sampled_from([1, 3]))
        pad = data.draw(st.sampled_from([0, k // 2, k - 1]))
        groups = 2 if data.draw(st.booleans()) and chans[i] % 2 == 0 and chans[i + 1] % 2 == 0 else 1
        convs.append(mk((k, k), chans[i], chans[i + 1], int(torch.randint(0, 999, (1,), generator=gen)),
                        padding=pad, groups=groups, bias=data.draw(st.booleans())))
    bns = {i: _bn(gen, chans[i + 1], data.draw(st.booleans())) for i in range(n) if data.draw(st.booleans())}
    doc, tensors = _with_affines(*chain_of(convs, bns), chans, data, gen)
    policy = data.draw(st.sampled_from(plan.POLICIES))
    path = tmp_path_factory.mktemp("bn") / "m.safetensors"
    models.save(path, {k: v.float() for k, v in tensors.items()}, doc)
    out = path.with_name("o.safetensors")
    rep = model.fuse_file(str(path), str(out), Options(policy=policy), force=True)
    doc0, t0 = models.described(path)
    doc1, t1 = models.described(out)
    for size in [(12, 12), (15, 11)]:  # five 3x3 convs without padding need 11 per axis
        x = torch.randn(1, chans[0], *size, dtype=torch.float64)
        want = models.evaluate(doc0, t0, x)[0]
        assert torch.allclose(models.evaluate(doc1, t1, x)[0], want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    header = io.read_header(path)
    graph = parse(doc0, header.tensors)
    again = plan.build(graph, model.file_tensors(header), Options(policy))
    for u in again.applied:
        assert torch.equal(t1[f"{u.name}.weight"], u.stored.weight)
    assert len(rep.merges) == len(again.applied)
    # fuse verified its merges beside the copy (Plan.verify): the same errors as verifying inline, bit for bit
    assert [(m.max_error, m.rounding_error) for m in rep.merges] == [(u.error, u.rounding) for u in again.applied]


def _with_affines(doc: dict, tensors: dict, chans: list[int], data: Any, gen: torch.Generator) -> tuple[dict, dict]:
    """The chain with affine layers (x * weight + bias: per channel, one value, or absent) after random layers."""
    layers = []
    for layer in doc["layers"]:
        if layers and layers[-1]["op"] == "affine":
            layer = {**layer, "input": layers[-1]["name"]}
        layers.append(layer)
        if data.draw(st.integers(0, 2)) == 0:
            name, c = f"s{len(layers)}", chans[int(layer["name"].lstrip("cbn")) + 1]
            layers.append({"name": name, "op": "affine", "input": layer["name"]})
            for suffix in ("weight", "bias"):
                size = data.draw(st.sampled_from([c, 1, 0]))
                if size:
                    tensors[f"{name}.{suffix}"] = torch.randn(size, generator=gen, dtype=torch.float64)
    return {**doc, "layers": layers, "outputs": [layers[-1]["name"]]}, tensors


@pytest.mark.parametrize("mode,padding,groups", [("zeros", 0, 1), ("zeros", 1, 1), ("reflect", 1, 2),
                                                  ("zeros", 1, 2), ("circular", 2, 1)])
def test_batch_norm_before_a_conv_folds_when_exact(mode, padding, groups):
    """A batch norm on the region's input folds into the conv after it exactly where its shift never
    meets the conv's zero padding; reflect and circular padding copy the shift, so they always fold."""
    gen = torch.Generator().manual_seed(3)
    c = mk((3, 3), 4, 6, 1, padding=padding, padding_mode=mode, groups=groups, bias=True)
    bn = _bn(gen, 4, fresh=False)
    doc, tensors = chain_of([c])
    doc["layers"].insert(0, {"name": "bn", "op": "batch_norm", "input": "x", "eps": bn.eps})
    doc["layers"][1]["input"] = "bn"
    tensors.update({"bn.running_mean": bn.mean, "bn.running_var": bn.var, "bn.weight": bn.weight,
                    "bn.bias": bn.bias})
    graph = parse(doc, infos(tensors))
    p = plan.build(graph, plan.Tensors(infos(tensors), tensors.__getitem__), Options("all"))
    exact = mode != "zeros" or padding == 0
    assert bool(p.units) == exact
    assert p.regions[0].verdict == ("mergeable" if exact else "unmergeable")
    if not exact:
        assert "shift" in p.regions[0].reason and p.regions[0].counterexample is not None
    assert same_function(doc, tensors, p, [(7, 7), (8, 5)], channels=4)


def test_weights_that_cancel_get_no_fake_counterexample():
    """Equal kernels make W2[0]W1[1] == W2[1]W1[0]: this replicate pair is then exact at size 4 by accident."""
    w = torch.tensor([[[1.5, -0.25]]], dtype=torch.float64)
    a = Conv(conv_spec((2,), 1, 1, dilation=2), w)
    b = Conv(conv_spec((2,), 1, 1, dilation=3, padding=1, padding_mode="replicate"), w)
    (pair,) = plan_of([a, b], (4,))[0].pairs
    assert pair.verdict == "unmergeable" and pair.counterexample is None
    assert "no difference on the inputs tried" in pair.reason
    b2 = Conv(b.spec, torch.tensor([[[0.5, 2.0]]], dtype=torch.float64))
    (pair,) = plan_of([a, b2], (4,))[0].pairs
    assert pair.counterexample is not None


def test_a_zero_conv_with_a_bias_gets_a_verdict_not_an_internal_error():
    """Issue: Sequential(Conv2d(2,3,1), Conv2d(3,2,3,padding=1)) with the first weight zeroed crashed `check`
    with a VerificationError.  Its bias alone meets conv2's zero padding: not one conv, and a real
    counterexample shows it; with no bias, the pair is a zero map and merges."""
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.Conv2d(3, 2, 3, padding=1)).double()
    with torch.no_grad():
        net[0].weight.zero_()
    rep = convmerge.check(net)
    (pair,) = rep["pairs"]
    assert pair["verdict"] == "unmergeable" and "bias" in pair["reason"]
    ce = pair["counterexample"]
    assert ce is not None and abs(ce["pair_value"] - ce["candidate_value"]) > 1e-6
    with torch.no_grad():
        net[0].bias.zero_()
    fused = convmerge.fuse(net)
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    assert torch.allclose(fused(x), net(x))


def test_no_counterexample_says_whether_any_input_was_tried():
    """At length 2 the 5-tap candidate's reflect pad of 2 is refused by PyTorch: no input runs through it."""
    spec = conv_spec((3,), 1, 1, padding=1, padding_mode="reflect")
    a, b = Conv(spec, torch.tensor([[[1.0, 2.0, -1.0]]], dtype=torch.float64)), Conv(
        spec, torch.tensor([[[0.5, -1.0, 3.0]]], dtype=torch.float64))
    (pair,) = plan_of([a, b], (2,))[0].pairs
    assert pair.verdict == "unmergeable" and pair.counterexample is None
    assert "no counterexample could be computed" in pair.reason and "no difference" not in pair.reason
    (pair,) = plan_of([a, b], (3,))[0].pairs
    assert pair.counterexample is not None and "could be computed" not in pair.reason


def test_a_model_with_nothing_to_merge_says_what_was_found(tmp_path):
    """Issue: ResNet-like models gave an empty table and '0 pair(s)'.  The notes count the convs, those in regions
    (with branches or not) and those alone between non-linear ops; fuse still writes, and says it is a copy."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1),
                              torch.nn.ReLU())
    rep = convmerge.check(net)
    (note,) = [n for n in rep["notes"] if n.startswith("nothing merged")]
    assert "2 conv(s); 0 in 0 region(s)" in note and "2 conv(s) between non-linear" in note
    src = tmp_path / "m.safetensors"
    convmerge.save(net, src)
    from convmerge.reporting import render

    report = model.fuse_file(str(src), str(tmp_path / "o.safetensors")).to_dict()
    assert (tmp_path / "o.safetensors").exists()
    assert render.summary_line(report).endswith("(an unchanged copy: nothing merged)")


def test_a_fused_module_with_size_dependent_merges_runs_only_at_that_size() -> None:
    """3x3 s2 p1 -> 3x3 p1 is exact only at odd sizes: merged for 33x33, the module refuses 32x32 rather
    than compute something else there."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1, bias=False), torch.nn.Conv2d(8, 8, 3, 1, 1)).double().eval()
    fused = convmerge.fuse(net, input_size=(33, 33), policy="all")
    x = torch.randn(2, 3, 33, 33, dtype=torch.float64)
    assert torch.allclose(fused(x), net(x), atol=1e-12)
    with pytest.raises(ValueError, match="runs only at input size 33x33 .it holds merges exact only at that size"):
        fused(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    anywhere = convmerge.fuse(net, policy="all")  # without a size: only merges exact everywhere (none here)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    assert torch.allclose(anywhere(x), net(x), atol=1e-12)


def _overflowing_f16_model(path) -> None:
    """c0 -> c1 (1x1 weights of 300: the merged weight, 90,000, overflows float16) -> relu -> c2 -> c3."""
    big = torch.full((2, 2, 1, 1), 300.0)
    gen = torch.Generator().manual_seed(3)
    small = [torch.randn(2, 2, 3, 3, generator=gen) for _ in range(2)]
    conv = lambda name, src, pad: {"name": name, "op": "conv2d", "input": src, "padding": pad}  # noqa: E731
    doc = models.describe([conv("c0", "x", 0), conv("c1", "c0", 0), {"name": "r", "op": "relu", "input": "c1"},
                           conv("c2", "r", 2), conv("c3", "c2", 1)], ["c3"])
    models.save(path, {"c0.weight": big.half(), "c1.weight": big.half(), "c2.weight": small[0].half(),
                       "c3.weight": small[1].half()}, doc)


def test_a_merge_refused_while_verifying_beside_the_copy_is_planned_again(tmp_path):
    """fuse decides the output's layout before it verifies (the verification runs while the untouched tensors
    are copied); a merge refused there for its dtype changes that layout, so the file is planned again with
    inline verification: the refused layers stay, the other merge is written, and nothing of the first try."""
    src, out = tmp_path / "m.safetensors", tmp_path / "o.safetensors"
    _overflowing_f16_model(src)
    header = io.read_header(src)
    graph = parse(models.described(src)[0], header.tensors)
    later = plan.build(graph, model.file_tensors(header), Options("all"), verify_later=True)
    assert len(later.pending) == 2 and {u.name for u in later.applied} == {"c1", "c3"}
    assert later.verify() is False and [u.name for u in later.applied] == ["c3"]
    assert later.units[0].refused.kind == "storage-rounding" and "overflow" in later.units[0].refused.text()
    rep = model.fuse_file(str(src), str(out), Options(policy="all"))
    assert [m.into for m in rep.merges] == ["c3"]
    doc1, t1 = models.described(out)
    assert {"c0.weight", "c1.weight", "c3.weight"} <= set(t1) and "c2.weight" not in t1
    x = torch.randn(1, 2, 9, 9, dtype=torch.float64) / 100
    doc0, t0 = models.described(src)
    want = models.evaluate(doc0, t0, x)[0]
    assert torch.allclose(models.evaluate(doc1, t1, x)[0], want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "o.safetensors"]


def test_a_wrong_merge_found_beside_the_copy_leaves_no_file(tmp_path, monkeypatch):
    """The verification that runs while the untouched tensors are copied stops the write: no output, no temp."""
    convs = [mk((3, 3), 2, 2, 1, padding=2), mk((3, 3), 2, 2, 2, padding=1)]
    doc, tensors = chain_of(convs)
    src = tmp_path / "m.safetensors"
    models.save(src, dict(tensors, untouched=torch.randn(1 << 16)), doc)
    break_merges(monkeypatch)
    with pytest.raises(plan.VerificationError):
        model.fuse_file(str(src), str(tmp_path / "o.safetensors"), Options(policy="all"))
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


# --- issue 19, item 4: a shift that is zero up to float32 rounding ----------------------------------------


def _cancelling_shift(path) -> tuple[dict, dict]:
    """1x1 pad 2 -> batch norm with bias = mean * weight / sqrt(var + eps) rounded to float32 -> 5x5 p0 reading only
    its corners: at sizes 1-2 every output reads only conv1's padding, so it is the shift's rounding residue, ~1e-8."""
    gen = torch.Generator().manual_seed(0)
    w2 = torch.zeros(2, 3, 5, 5)
    for i, j in ((0, 0), (0, 4), (4, 0), (4, 4)):
        w2[:, :, i, j] = torch.randn(2, 3, generator=gen)
    mean, var, gamma = torch.randn(3, generator=gen), torch.rand(3, generator=gen) + 0.5, torch.randn(3, generator=gen)
    beta = (mean.double() * gamma.double() / torch.sqrt(var.double() + 1e-5)).float()
    layers = [{"name": "c1", "op": "conv2d", "input": "x", "padding": 2},
              {"name": "bn", "op": "batch_norm", "input": "c1", "eps": 1e-5},
              {"name": "c2", "op": "conv2d", "input": "bn", "padding": 0}]
    tensors = {"c1.weight": torch.randn(3, 2, 1, 1, generator=gen), "c2.weight": w2, "bn.running_mean": mean,
               "bn.running_var": var, "bn.weight": gamma, "bn.bias": beta}
    doc = models.describe(layers, ["c2"])
    models.save(path, tensors, doc)
    return doc, tensors


def test_an_exact_merge_whose_output_is_a_rounding_residue_is_verified_against_the_terms(tmp_path):
    doc, tensors = _cancelling_shift(tmp_path / "m.safetensors")
    x = torch.randn(1, 2, 2, 2, dtype=torch.float64)
    tiny = models.evaluate(doc, tensors, x)[0]
    assert 0 < float(tiny.abs().max()) < 1e-6  # the premise: a near-zero output made of O(1) terms
    rep = model.fuse_file(str(tmp_path / "m.safetensors"), str(tmp_path / "o.safetensors"))
    (merge,) = rep.merges
    assert merge.layers == ["c1", "bn", "c2"] and merge.max_error < 1e-14
    doc1, t1 = models.described(tmp_path / "o.safetensors")
    for size in [(1, 1), (2, 2), (9, 7)]:
        x = torch.randn(1, 2, *size, dtype=torch.float64)
        assert torch.allclose(models.evaluate(doc1, t1, x)[0], models.evaluate(doc, tensors, x)[0], rtol=0, atol=1e-6)


def test_a_merge_off_by_a_millionth_of_its_terms_is_still_refused(tmp_path, monkeypatch):
    """The scale is the terms', not max(output, 1): a bias off by 1e-6 of them still fails verification."""
    _cancelling_shift(tmp_path / "m.safetensors")
    real = algebra.merge
    monkeypatch.setattr(algebra, "merge", lambda a, b, cand: algebra.shift_bias(real(a, b, cand),
                                                                                 torch.tensor(1e-6)))
    with pytest.raises(plan.VerificationError):
        model.fuse_file(str(tmp_path / "m.safetensors"), str(tmp_path / "o.safetensors"))


# --- issue 19, item 5: zero taps trimmed before a pad is judged; every search bounded -------------------------


@pytest.mark.parametrize("pad, zero", [([[1, 0], [0, 0]], "top row"), (1, "border ring"), ([[0, 2], [1, 1]], "bottom rows")])
def test_a_pad_whose_border_the_next_conv_never_reads_is_no_border(tmp_path, pad, zero):
    """conv 3x3 p0 -> pad -> conv 3x3 p0 whose taps facing the pad are zero: the pad's border is never read, so
    the layers are one conv at every size (brute force on the description); the verdict says the weights decide."""
    gen = torch.Generator().manual_seed(0)
    wa, wb = torch.randn(2, 2, 3, 3, generator=gen), torch.randn(2, 2, 3, 3, generator=gen)
    if zero == "top row":
        wb[:, :, 0] = 0
    elif zero == "border ring":
        wb[:, :, [0, 2]] = 0
        wb[:, :, :, [0, 2]] = 0
    else:
        wb[:, :, 1:] = 0
        wb[:, :, :, [0, 2]] = 0
    layers = [{"name": "a", "op": "conv2d", "input": "x", "padding": 0},
              {"name": "p", "op": "pad", "input": "a", "padding": pad},
              {"name": "b", "op": "conv2d", "input": "p", "padding": 0}]
    doc = models.describe(layers, ["b"])
    tensors = {"a.weight": wa, "b.weight": wb}
    src = models.save(tmp_path / "m.safetensors", tensors, doc)
    rep = model.fuse_file(str(src), str(tmp_path / "o.safetensors"), Options(policy="all"))
    (region,) = rep.regions
    assert region.verdict == "mergeable" and region.weight_dependent and region.applied, region.reason
    doc1, t1 = models.described(tmp_path / "o.safetensors")
    assert [layer["op"] for layer in doc1["layers"]] == ["conv2d"]
    for size in [(5, 5), (5, 8), (9, 6)]:
        x = torch.randn(1, 2, *size, dtype=torch.float64)
        assert torch.allclose(models.evaluate(doc1, t1, x)[0], models.evaluate(doc, tensors, x)[0], atol=1e-5)
    wb[:, :, 0, 1] = 1.0  # a nonzero tap now reads the pad's top row: no single conv (conv a would need padding)
    if zero != "bottom rows":
        models.save(tmp_path / "m2.safetensors", tensors, doc)
        (region,) = model.check_file(str(tmp_path / "m2.safetensors")).regions
        assert region.verdict == "unmergeable" and region.counterexample is not None


def _search_finding_nothing(monkeypatch=None) -> tuple[plan.Found, list]:
    """plan._search over every size 1..64 of a 3x3 p1 conv against itself: no input can differ, so only the bound
    stops it (before, each size had its own impulse budget: ~250k runs here, minutes)."""
    cand = mk((3, 3), 1, 1, 3, padding=1)
    calls: list = []
    found = plan._search(lambda x: calls.append(1) or algebra.apply(cand, x), cand, None, lambda s: False,
                         lambda s: True, lambda s: None)
    return found, calls


def test_a_search_that_finds_nothing_stops_at_its_bound():
    (ce, kind), calls = _search_finding_nothing()
    assert ce is None and kind == "search-bounded" and len(calls) <= algebra.IMPULSES + 2 * 64
    assert "none found within the bound" in Why.of(kind).text()


def test_the_search_also_stops_at_its_time_bound(monkeypatch):
    monkeypatch.setattr(algebra, "SEARCH_SECONDS", 0.0)
    (ce, kind), calls = _search_finding_nothing()
    assert ce is None and kind == "search-bounded" and len(calls) <= 1


class LeftoverNorms(torch.nn.Module):
    """Batch norms a deploy conversion may fold but convmerge cannot (yet): after a squeeze-excitation multiply and
    after a conv whose output another layer also reads; those it folds: one after a conv, a BatchNorm1d after a
    Linear, and a layer-scale multiply (an affine layer) folds into the conv before it (issue 20)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.scale = torch.nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.norm = torch.nn.BatchNorm2d(8)
        self.shared = torch.nn.Conv2d(8, 8, 1)
        self.shared_bn = torch.nn.BatchNorm2d(8)
        self.last = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.last_bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 4)
        self.head_bn = torch.nn.BatchNorm1d(4)

    def forward(self, x):
        y = self.conv(x) * self.scale
        y = torch.relu(self.norm(y * torch.sigmoid(y.mean((2, 3), keepdim=True))))  # (a conv after it would take it in)
        s = self.shared(y)
        y = torch.relu(self.shared_bn(s)) + s
        y = self.last_bn(self.last(y))
        return self.head_bn(self.fc(y.mean((2, 3))))


def test_check_names_each_batch_norm_left_unfolded_and_what_stops_it(tmp_path):
    net = LeftoverNorms().eval()
    rep = convmerge.check(net, input_size=(12, 12))
    left = {n.split("'")[1]: n for n in rep["notes"] if n.startswith("batch norm '")}
    assert set(left) == {"norm", "shared_bn"}, rep["notes"]
    assert left["norm"].endswith("it reads 'mul_1' (mul), which convmerge treats as opaque (not linear here)")
    assert ["fc", "head_bn"] in [m["layers"] for m in rep["merges"]]
    assert "its input 'shared' is also read by 'add'" in left["shared_bn"], left["shared_bn"]
    # the notes say what the fused file holds: exactly these batch norms are left in it
    src, out = tmp_path / "m.safetensors", tmp_path / "m.fused.safetensors"
    convmerge.save(net, src)
    model.fuse_file(str(src), str(out), Options(input_size=(12, 12)))
    kept = {k.rsplit(".", 1)[0] for k in io.read_header(out).tensors if k.endswith(".running_var")}
    assert kept == set(left), kept
