"""Micro-benchmarks behind the library findings in README.md (interleaved, medians).

  copy      copying --gb GiB (with fsync) as convmerge.io._stream's fallback does (readinto a
            16 MiB buffer + os.write) vs os.copy_file_range (what _stream uses where the
            filesystem can) vs os.sendfile vs `cp && sync`
  threads   one tiny float64 conv (what verification runs: 4->16 and 16->8 channels, 3x3,
            63x63) with torch.set_num_threads(1) vs (2): on a busy machine every 2-thread op
            waits for the second core
  support   convmerge.engine.algebra.support on a 512x512x3x3 float64 weight (it now reduces the
            channel axes first) vs its earlier form (any() over the full 4-D mask per axis) and
            an abs().amax() variant (same result)

    python benchmarks/micro.py [--gb 1] [--reps 5]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load, median, out_dir, table, write_json  # noqa: E402

from convmerge.engine import algebra  # noqa: E402

CHUNK = 16 * 1024 * 1024


def _open_out(dst: Path) -> int:
    return os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)


def copy_loop(src: Path, dst: Path) -> None:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(src, "rb", buffering=0) as f:
        fd = _open_out(dst)
        try:
            while True:
                n = f.readinto(view)
                if not n:
                    break
                chunk = view[:n]
                while chunk:
                    chunk = chunk[os.write(fd, chunk):]
            os.fsync(fd)
        finally:
            os.close(fd)


def copy_range(src: Path, dst: Path) -> None:
    with open(src, "rb", buffering=0) as f:
        fd = _open_out(dst)
        try:
            size, off = os.fstat(f.fileno()).st_size, 0
            while off < size:
                n = os.copy_file_range(f.fileno(), fd, size - off, off)
                if n <= 0:
                    raise OSError("short copy")
                off += n
            os.fsync(fd)
        finally:
            os.close(fd)


def copy_sendfile(src: Path, dst: Path) -> None:
    with open(src, "rb", buffering=0) as f:
        fd = _open_out(dst)
        try:
            size, off = os.fstat(f.fileno()).st_size, 0
            while off < size:
                n = os.sendfile(fd, f.fileno(), off, size - off)
                if n <= 0:
                    raise OSError("short copy")
                off += n
            os.fsync(fd)
        finally:
            os.close(fd)


def copy_cp(src: Path, dst: Path) -> None:
    subprocess.run(f"cp '{src}' '{dst}' && sync '{dst}'", shell=True, check=True)


def interleave(cases: dict[str, Callable[[], Any]], reps: int, after: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(reps):
        for k, fn in cases.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
            after()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    results: dict[str, Any] = {"load_before": load()}

    od = out_dir()
    src, dst = od / "micro_copy.bin", od / "micro_copy.out"
    block = os.urandom(CHUNK)
    with open(src, "wb") as f:
        for _ in range(max(1, int(args.gb * 2**30) // CHUNK)):
            f.write(block)
    subprocess.run(["cat", str(src)], stdout=subprocess.DEVNULL, check=True)
    cases = {"readinto + os.write (io._stream's fallback)": lambda: copy_loop(src, dst),
             "os.copy_file_range (io._stream)": lambda: copy_range(src, dst),
             "os.sendfile": lambda: copy_sendfile(src, dst),
             "cp && sync": lambda: copy_cp(src, dst)}
    copy_t = interleave(cases, args.reps, after=lambda: dst.unlink())
    src.unlink()
    results["copy_s"] = copy_t

    convs = {"4->16 3x3 @63x63": (torch.randn(1, 4, 63, 63, dtype=torch.float64), torch.randn(16, 4, 3, 3, dtype=torch.float64)),
             "16->8 3x3 @61x61": (torch.randn(1, 16, 61, 61, dtype=torch.float64), torch.randn(8, 16, 3, 3, dtype=torch.float64))}
    thread_t: dict[str, list[float]] = {}
    threads0 = torch.get_num_threads()
    for rep in range(max(3, args.reps)):
        for name, (x, w) in convs.items():
            for th in (1, 2):
                torch.set_num_threads(th)
                F.conv2d(x, w)
                t = time.perf_counter()
                for _ in range(10):
                    F.conv2d(x, w)
                thread_t.setdefault(f"{name}, {th} thread(s)", []).append((time.perf_counter() - t) / 10)
    torch.set_num_threads(threads0)
    results["threads_s"] = thread_t

    w = torch.randn(512, 512, 3, 3, dtype=torch.float64)

    def alt(weight: torch.Tensor, amax: bool) -> tuple:
        m = weight.abs().flatten(0, 1).amax(0) != 0 if amax else (weight != 0).flatten(0, 1).any(0)
        out = []
        for ax in range(m.dim()):
            other = tuple(d for d in range(m.dim()) if d != ax)
            v = m.any(dim=other) if other else m
            out.append(tuple(int(i) for i in torch.nonzero(v).flatten()))
        return tuple(out)

    def earlier(weight: torch.Tensor) -> tuple:
        nz = weight != 0
        out = []
        for axis in range(2, weight.dim()):
            other = [d for d in range(weight.dim()) if d != axis]
            out.append(tuple(int(i) for i in torch.nonzero(nz.any(dim=tuple(other))).flatten()))
        return tuple(out)

    assert alt(w, False) == alt(w, True) == algebra.support(w) == earlier(w)
    sup_t = interleave({"algebra.support (channel axes first)": lambda: algebra.support(w),
                        "earlier algebra.support (full 4-D any per axis)": lambda: earlier(w),
                        "flatten(0,1).any(0) first": lambda: alt(w, False),
                        "abs().flatten(0,1).amax(0) first": lambda: alt(w, True)}, max(5, args.reps))
    results["support_s"] = sup_t
    results["load_after"] = load()

    print(f"## micro (median of {args.reps}+; load average before {results['load_before']}, after {results['load_after']})\n")
    print(f"### copy {args.gb:g} GiB, page-cached source, fsync included\n")
    print(table(["method", "median s", "min s"], [[k, median(v), min(v)] for k, v in copy_t.items()]))
    print("\n### one float64 conv, 1 vs 2 torch threads\n")
    print(table(["conv", "median ms", "min ms"], [[k, median(v) * 1e3, min(v) * 1e3] for k, v in thread_t.items()]))
    print("\n### support() of a 512x512x3x3 float64 weight (same result)\n")
    print(table(["variant", "median ms", "min ms"], [[k, median(v) * 1e3, min(v) * 1e3] for k, v in sup_t.items()]))
    path = write_json("micro.json", results)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
