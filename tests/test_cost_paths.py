"""The shortcuts that keep fixed costs down (issue 13) change no result: merged weights dropped after
verification are written byte for byte as verified, verification narrowed to a few channels at large
sizes still catches a wrong merge, counterexamples are searched only for a view that shows them, and
a run on one thread gives the caller its thread count back."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from convmerge.engine import algebra, plan, verify
from convmerge import io
from convmerge.engine.algebra import BatchNorm, Conv
from convmerge.cli import app

from .models import stack_model
from .test_plan import fused, mk, plan_of

runner = CliRunner()


def _wide_chain() -> list[Conv]:
    """Dense convs wide enough to be checked on mixtures (more than verify.MIXES inputs and outputs)."""
    return [mk((3, 3), 6, 12, 1, padding=2), mk((3, 3), 12, 10, 2, padding=1)]


def test_dropped_weights_are_written_exactly_as_verified(monkeypatch: pytest.MonkeyPatch) -> None:
    kept, doc, tensors = plan_of(_wide_chain(), None, "all")
    monkeypatch.setattr(plan, "KEEP_BYTES", 0)
    dropped, _, _ = plan_of(_wide_chain(), None, "all")
    assert [u.dropped for u in kept.applied] == [False] and [u.dropped for u in dropped.applied] == [True]
    want, got = fused(kept, tensors)[1], fused(dropped, tensors)[1]
    assert want.keys() == got.keys()
    for name in want:
        value = got[name].make() if isinstance(got[name], io.LazyTensor) else got[name]
        assert torch.equal(want[name], value), name


def test_a_recomputed_weight_that_differs_from_the_verified_one_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plan, "KEEP_BYTES", 0)
    p, _, _ = plan_of(_wide_chain(), None, "all")
    (unit,) = p.applied
    right = unit.recipe
    assert right is not None

    def off() -> Conv:
        c = right()
        return Conv(c.spec, c.weight * (1 + 1e-6), c.bias)

    unit.recipe = off
    with pytest.raises(plan.VerificationError, match="differ from those verified"):
        unit.stored


@pytest.mark.parametrize("with_bn", [False, True])
def test_narrowed_verification_passes_a_right_merge_and_catches_a_wrong_one(monkeypatch: pytest.MonkeyPatch,
                                                                             with_bn: bool) -> None:
    monkeypatch.setattr(verify, "FULL_VERIFY_MACS", 0)  # every size but the covering one narrowed
    convs = _wide_chain()
    gen = torch.Generator().manual_seed(3)
    bns = {1: BatchNorm(torch.randn(10, generator=gen, dtype=torch.float64),
                        torch.rand(10, generator=gen, dtype=torch.float64) + 0.5, 1e-5,
                        torch.randn(10, generator=gen, dtype=torch.float64),
                        torch.randn(10, generator=gen, dtype=torch.float64))} if with_bn else None
    p, _, _ = plan_of(convs, None, "all", bns)
    assert len(p.applied) == 1
    real = algebra.merge

    def broken(a: Conv, b: Conv, cand: object) -> Conv:
        m = real(a, b, cand)
        return Conv(m.spec, m.weight.flip(-1), m.bias)

    monkeypatch.setattr(algebra, "merge", broken)
    with pytest.raises(plan.VerificationError):
        plan_of(convs, None, "all", bns)


def test_check_without_a_view_of_counterexamples_searches_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = stack_model(tmp_path / "stack.safetensors")
    calls: list[int] = []
    real = plan._search

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(plan, "_search", counted)
    for args in (["-q"], [], ["--fail-on", "unmergeable"]):
        result = runner.invoke(app, ["check", str(model), *args])
        assert result.exit_code in (0, 1), result.output
    assert calls == []
    assert runner.invoke(app, ["check", str(model), "--json"]).exit_code == 0
    assert calls, "the stack model has an unmergeable pair: the JSON report searches its counterexample"


@pytest.fixture
def three_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


def _threads_in_a_new_thread() -> int:
    seen: list[int] = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    return seen[0]


def test_the_api_leaves_the_callers_thread_count(tmp_path: Path, three_threads: None) -> None:
    import convmerge

    from . import nets

    module = nets.expandnet().eval()
    convmerge.check(module, input_size=(9, 9))
    assert torch.get_num_threads() == 3
    convmerge.fuse(module, input_size=(9, 9))
    assert torch.get_num_threads() == 3
    convmerge.save(module, tmp_path / "m.safetensors")
    convmerge.load(tmp_path / "m.safetensors")
    assert torch.get_num_threads() == 3
    unpadded = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Conv2d(3, 3, 3)).eval()
    with pytest.raises(ValueError, match="cannot run there"):  # raised inside the run (the plan's size check)
        convmerge.check(unpadded, input_size=(3, 3))
    assert torch.get_num_threads() == 3
    with pytest.raises(RuntimeError, match="inside"):
        with algebra.single_threaded(), algebra.single_threaded(), algebra.parallel(algebra.PARALLEL_MACS):
            raise RuntimeError("inside")
    assert torch.get_num_threads() == 3 == _threads_in_a_new_thread()


def test_concurrent_runs_leave_the_callers_thread_count(tmp_path: Path, three_threads: None) -> None:
    """torch's thread count is the process's: Python threads each checking a model (a server, a data
    loader) give back the count the process had, to themselves and to threads started afterwards.
    (A file: torch's tracers are not thread-safe.)"""
    import convmerge

    model = stack_model(tmp_path / "m.safetensors")
    counts: list[int] = []

    def work() -> None:
        for _ in range(2):
            convmerge.check(model, input_size=(9, 9))
        counts.append(torch.get_num_threads())

    for _ in range(3):
        workers = [threading.Thread(target=work) for _ in range(4)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
    assert counts == [3] * 12
    assert torch.get_num_threads() == 3 == _threads_in_a_new_thread()


def test_one_thread_runs_give_back_the_callers_thread_count() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with algebra.single_threaded():
            assert torch.get_num_threads() == 1
            with algebra.parallel(algebra.PARALLEL_MACS):
                assert torch.get_num_threads() == 2
            with algebra.parallel(1):
                assert torch.get_num_threads() == 1
            with algebra.single_threaded():
                assert algebra.run_threads() == 2
        assert torch.get_num_threads() == 2
        plan_of(_wide_chain(), None, "all")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
