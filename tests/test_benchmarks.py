"""Every benchmark script imports against the current library (a renamed or deleted module fails here,
not months later when someone runs the benchmark). Nothing is timed or run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
NEEDS = {"onnx_speed": ("onnx", "onnxruntime")}


@pytest.mark.parametrize("path", sorted(p for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_")),
                         ids=lambda p: p.stem)
def test_benchmark_imports(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for module in NEEDS.get(path.stem, ()):
        pytest.importorskip(module)
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"benchmark_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    assert callable(module.main)
