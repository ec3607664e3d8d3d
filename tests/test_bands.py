"""Band-by-band evaluation gives what evaluating the whole input gives (against the brute-force oracle)."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from convmerge.engine import bands
from convmerge.reporting import explain
from convmerge.engine.algebra import Conv, analyze, merge
from convmerge.maths.spec import conv_spec

from .oracle import run, run_chain
from .strategies import conv_pairs

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=80, **SETTINGS)
@given(conv_pairs(), st.data())
def test_bands_of_a_pair_and_its_candidate_match_the_whole_evaluation(pair, data):
    a, b = pair
    nd = a.spec.ndim
    size = tuple(data.draw(st.integers(1, 14 if nd < 3 else 6)) for _ in range(nd))
    x_rows = bands.random_rows(a.spec.in_channels, size[1:], seed=3)
    x = x_rows(torch.arange(size[0]))
    try:
        want = run_chain(x, [a, b])
    except RuntimeError:
        assume(False)
    assume(want.numel() > 0)
    lengths = [size[0], a.spec.out_size(size)[0], b.spec.out_size(a.spec.out_size(size))[0]]
    got_rows = bands.conv_rows(b, bands.conv_rows(a, x_rows, lengths[0]), lengths[1])
    step = data.draw(st.integers(1, 4))
    got = torch.cat([got_rows(i) for i in torch.arange(want.shape[2]).split(step)], dim=2)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    cand = merge(a, b, analyze(a, b).candidate)
    try:
        single = run(x, cand.weight, cand.bias, cand.spec)
    except RuntimeError:
        return
    if single.numel() == 0:
        return
    picked = torch.tensor(sorted(set(data.draw(st.lists(st.integers(0, single.shape[2] - 1), min_size=1)))))
    got = bands.conv_rows(cand, x_rows, size[0])(picked)
    assert torch.allclose(got, single[:, :, picked], rtol=1e-12, atol=1e-12)



def test_the_error_map_at_a_large_size_is_computed_band_by_band(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    mk = lambda spec: Conv(spec, torch.randn(*spec.weight_shape, generator=gen, dtype=torch.float64))  # noqa: E731
    a, b = mk(conv_spec((3, 3), 1, 2)), mk(conv_spec((3, 3), 2, 1, padding=2))
    cand = merge(a, b, analyze(a, b).candidate)
    seen = []
    real = bands.apply
    monkeypatch.setattr(bands, "apply", lambda conv, x: seen.append(x.shape[2]) or real(conv, x))
    monkeypatch.setattr(bands, "BAND_ELEMENTS", 25 * 300 * 16)  # 16 rows of the 5x5 candidate
    grid = explain._pair_map(a, b, cand, (300, 300))
    assert seen and max(seen) < 300 // 4  # never the whole input at once
    x = bands.random_rows(1, (300,))(torch.arange(300))
    whole = (run_chain(x, [a, b]) - run(x, cand.weight, cand.bias, cand.spec)).abs().amax(dim=(0, 1))
    assert torch.allclose(torch.tensor(grid, dtype=torch.float64), whole, rtol=0, atol=1e-12)
    assert whole[0, 0] > 1e-6 and whole[150, 150] < 1e-12  # the border differs, the inside does not
