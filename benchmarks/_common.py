"""Shared helpers for the benchmark scripts (timing, medians, Markdown tables, JSON output)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Sequence

OUT = Path(__file__).resolve().parent / "out"


def out_dir() -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    return OUT


def as_installed() -> bool:
    """Time convmerge as `pip install` leaves it: its modules compiled to bytecode (pip compiles a package's
    .py files when it installs them, torch's included). Where PYTHONDONTWRITEBYTECODE is set, every
    subprocess would compile convmerge's sources again (~0.1 s) while torch loads its compiled files.
    Returns whether the variable was set (it is cleared for this process and its subprocesses)."""
    import compileall

    import convmerge

    was_set = os.environ.pop("PYTHONDONTWRITEBYTECODE", None) is not None
    compileall.compile_dir(str(Path(convmerge.__file__).parent), quiet=1)
    return was_set


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def timeit(fn: Callable[[], Any], reps: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of `reps` calls of fn after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
                            "loadavg": load(), "commit": commit()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def commit() -> str:
    """The library's git commit (read-only `git rev-parse`), plus '+dirty' if convmerge/ has local changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "--no-optional-locks", "-C", str(root), "status", "--porcelain", "--", "convmerge"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load() -> str:
    """The 1/5/15-minute load averages: this machine is shared, so every result records them."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            if v == 0:
                return "0"
            if abs(v) >= 100:
                return f"{v:.0f}"
            if abs(v) >= 1:
                return f"{v:.2f}"
            return f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(name: str, data: dict[str, Any]) -> Path:
    path = out_dir() / name
    data = dict(data, machine=machine(), when=time.strftime("%Y-%m-%d %H:%M:%S"))
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path
