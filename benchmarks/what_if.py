"""What the library's planning would cost with candidate fixes, measured by monkeypatching in process.

Nothing in convmerge/ is changed: each variant patches module attributes for the duration of one
run, and the script checks that every variant produces the same report (and, for fuse, the same
output bytes) as the unpatched library.

  baseline          the library as it is: small ops (supports, verification, counterexamples,
                    analyze) already run under algebra.one_thread(); merges and everything else
                    use torch's default intra-op threads (2 on this machine)
  1-thread (whole)  torch.set_num_threads(1) around the whole run: what is left of the thread
                    effect once the library runs its small ops on one thread
  axis_view cache   convmerge.rules.axis_view wrapped in functools.lru_cache (a fresh cache for
                    every run, as a new process would have): its arguments (frozen Axis
                    dataclasses, padding modes, tap tuples, a length) are hashable and its result
                    (AxisView) is frozen, and every pair of equal shape enumerates the same views;
                    rules.decide spends ~2.6 ms per pair there, in pure Python

Two earlier candidates are now in the library and were dropped from this script:
'one-chain-pass' (verification and the rounding check share one float64 chain run:
algebra.max_errors) and '1-thread' for the small ops (algebra.one_thread).

Workloads: `check` (policy cheaper and all) on the 200-conv model of startup.py, and `fuse_file` on the
throughput.py model (6 cycles of blocks, 0.05 GiB). Interleaved, median of --reps.

    python benchmarks/what_if.py [--reps 3]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, out_dir, table, write_json  # noqa: E402

import startup  # noqa: E402
import throughput  # noqa: E402
from _common import load  # noqa: E402
from convmerge import model, rules  # noqa: E402


@contextmanager
def patched(one_thread: bool, cache_views: bool) -> Iterator[None]:
    threads = torch.get_num_threads()
    orig = rules.axis_view
    if one_thread:
        torch.set_num_threads(1)
    if cache_views:
        rules.axis_view = functools.lru_cache(maxsize=65536)(orig)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        rules.axis_view = orig


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=100, help="pairs in the check workloads (as startup.py)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    od = out_dir()
    small = od / "what_if_200.safetensors"
    startup.generate(small, args.pairs)
    big = od / "what_if_tp.safetensors"
    throughput.generate(big, 0.05, 6, 64, 4)
    fused = od / "what_if_tp.out.safetensors"
    variants = {"baseline": (False, False), "1-thread (whole run)": (True, False),
                "axis_view cache": (False, True)}

    def run_check(policy: str) -> tuple[dict, str]:
        rep = model.check_file(str(small), policy=policy).to_dict()
        return rep, ""

    def run_fuse() -> tuple[dict, str]:
        rep = model.fuse_file(str(big), str(fused), policy="cheaper", force=True).to_dict()
        return rep, digest(fused)

    workloads = {f"check --policy cheaper, {2 * args.pairs} convs ({args.pairs} pairs 16ch)": lambda: run_check("cheaper"),
                 f"check --policy all, {2 * args.pairs} convs ({args.pairs} pairs 16ch)": lambda: run_check("all"),
                 "fuse_file, throughput model 6 cycles (0.05 GiB)": run_fuse}
    times: dict[tuple[str, str], list[float]] = {}
    same: dict[tuple[str, str], bool] = {}
    reference: dict[str, Any] = {}
    for rep in range(args.reps):
        for wname, fn in workloads.items():
            for vname, (one_thread, cache_views) in variants.items():
                with patched(one_thread, cache_views):
                    t = time.perf_counter()
                    out = fn()
                    times.setdefault((wname, vname), []).append(time.perf_counter() - t)
                canon = json.dumps(out[0], sort_keys=True, default=str), out[1]
                reference.setdefault(wname, canon)
                same[(wname, vname)] = same.get((wname, vname), True) and canon == reference[wname]
    for p in (small, big, fused):
        if p.exists():
            p.unlink()
    rows = []
    for wname in workloads:
        base = median(times[(wname, "baseline")])
        for vname in variants:
            med = median(times[(wname, vname)])
            rows.append([wname if vname == "baseline" else "", vname, med, f"{base / med:.2f}x",
                         "yes" if same[(wname, vname)] else "NO"])
    print(f"## what_if: planning cost with candidate fixes (in process, median of {args.reps} interleaved runs, "
          f"load average {load()})\n")
    print(table(["workload", "variant", "seconds", "speedup", "same report/bytes"], rows))
    path = write_json("what_if.json", {"reps": args.reps, "times_s": {f"{w} | {v}": t for (w, v), t in times.items()},
                                       "same": {f"{w} | {v}": s for (w, v), s in same.items()}})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
