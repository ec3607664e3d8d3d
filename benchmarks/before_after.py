"""Before -> after: an earlier revision of the library against the working tree, side by side.

The earlier revision's convmerge/ (default effde5b, the library the first benchmark run measured)
is extracted read-only with `git archive REV convmerge` into benchmarks/out/rev_REV/ and deleted
at the end. Each side runs as a subprocess with PYTHONPATH pointing at its own copy and the
working directory set to benchmarks/out/ (so `python -c` cannot pick up the other copy); the
script checks which convmerge each side imports. The two sides alternate, so load from other
processes on this shared machine hits both alike.

  fuse    `convmerge fuse -q` (policy cheaper) on the throughput.py model (--gb GiB, 6 cycles),
          with `cp && sync` of the same file as the reference; wall time and peak RSS
  check   `convmerge check -q` with policy cheaper and all on the 200-conv model of startup.py
          (--hog N: with N busy-looping Python processes running during this part only, to
          reproduce the loaded machine the first run saw; they are stopped by their pid after it)
  merge   in the child process: algebra.merge and chain.plan (cheaper, all) of the 512->512
          3x3 pad 2 -> 3x3 pad 1 pair of merge_speed.py, 2 torch threads

    python benchmarks/before_after.py [--rev effde5b] [--gb 1] [--reps 3] [--merge-rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load, median, out_dir, table, write_json  # noqa: E402

import startup  # noqa: E402
import throughput  # noqa: E402

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CLI = "from convmerge.cli import main; main()"
MERGE_CHILD = """
import json, sys, time, torch
sys.path.insert(0, {bench!r})
from merge_speed import make_pair
from convmerge import algebra, chain
torch.set_num_threads(2)
c1, c2 = make_pair(512)
cand = algebra.analyze(c1, c2).candidate
w1, w2 = make_pair(64)
algebra.merge(w1, w2, algebra.analyze(w1, w2).candidate)  # warm-up of the kernels, small
out = {{}}
for name, fn, reps in (("algebra.merge", lambda: algebra.merge(c1, c2, cand), 2),
                       ("chain.plan cheaper", lambda: chain.plan([c1, c2], None, "cheaper"), 2),
                       ("chain.plan all", lambda: chain.plan([c1, c2], None, "all"), 1)):
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    out[name] = ts
print(json.dumps(out))
"""


def extract(rev: str) -> Path:
    dest = out_dir() / f"rev_{rev}"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir()
    raw = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "convmerge"], check=True,
                         stdout=subprocess.PIPE).stdout
    with tarfile.open(fileobj=BytesIO(raw)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def env_for(path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(path)
    return env


def check_side(path: Path) -> str:
    got = subprocess.run([sys.executable, "-c", "import convmerge; print(convmerge.__file__)"], env=env_for(path),
                         cwd=out_dir(), check=True, stdout=subprocess.PIPE, text=True).stdout.strip()
    if not got.startswith(str(path)):
        raise SystemExit(f"side {path}: imports {got}, not its own copy")
    return got


def timed(cmd: list[str], path: Path) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one run of cmd, with PYTHONPATH and cwd set for one side."""
    saved = (os.environ.get("PYTHONPATH"), os.getcwd())
    os.environ["PYTHONPATH"] = str(path)
    os.chdir(out_dir())
    try:
        return throughput.run_timed(cmd)
    finally:
        if saved[0] is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved[0]
        os.chdir(saved[1])


def run_checks(t: dict, model: Path, sides: dict[str, Path], reps: int) -> None:
    for _ in range(reps):
        for policy in ("cheaper", "all"):
            for side, path in sides.items():
                wall, _ = timed([sys.executable, "-c", CLI, "check", str(model), "-q", "--policy", policy], path)
                t.setdefault((policy, side), []).append(wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", default="effde5b")
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--merge-rounds", type=int, default=2, help="child processes per side for the 512 merge")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: fuse,check,merge")
    ap.add_argument("--hog", type=int, default=0, help="busy processes during the check part (simulated load)")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    od = out_dir()
    before = extract(args.rev)
    sides = {f"before ({args.rev})": before, "after (working tree)": ROOT}
    imported = {k: check_side(v) for k, v in sides.items()}
    load_before = load()
    results: dict[str, Any] = {"rev": args.rev, "imported": imported}
    rows: list[list[Any]] = []
    files: list[Path] = []
    try:
        if "fuse" not in skip:
            src, dst = od / "before_after.safetensors", od / "before_after.out.safetensors"
            files += [src, dst]
            info = throughput.generate(src, args.gb, 6, 64, 4)
            subprocess.run(["cat", str(src)], stdout=subprocess.DEVNULL, check=True)
            cases = {"cp + sync": (f"cp '{src}' '{dst}' && sync '{dst}'", None)}
            for side, path in sides.items():
                cases[f"fuse, {side}"] = ([sys.executable, "-c", CLI, "fuse", str(src), "-o", str(dst), "--force",
                                           "-q"], path)
            t: dict[str, list[float]] = {k: [] for k in cases}
            rss: dict[str, list[int]] = {k: [] for k in cases}
            for _ in range(args.reps):
                for name, (cmd, path) in cases.items():
                    if path is None:
                        wall, peak = throughput.run_timed(cmd, shell=True)
                    else:
                        wall, peak = timed(cmd, path)
                    t[name].append(wall)
                    rss[name].append(peak or 0)
                    dst.unlink()
            gib = info["bytes"] / 2**30
            for name in cases:
                rows.append([f"fuse {gib:.2f} GiB (6 cycles)", name, median(t[name]), min(t[name]),
                             f"{max(rss[name]) / 1024:.0f}", len(t[name])])
            src.unlink()
            results["fuse"] = {"times_s": t, "rss_kib": rss, "model": info}
        if "check" not in skip:
            model = od / "before_after_200.safetensors"
            files.append(model)
            startup.generate(model, 100)
            t = {}
            hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hog)]
            if hogs:
                time.sleep(2)
            try:
                run_checks(t, model, sides, args.reps)
                check_load = load()
            finally:
                for h in hogs:
                    h.terminate()
                    h.wait()
            label = f" (+{args.hog} busy processes; load at the end {check_load})" if hogs else ""
            for (policy, side), v in t.items():
                rows.append([f"check 200 convs, policy {policy}{label}", side, median(v), min(v), "", len(v)])
            model.unlink()
            results["check"] = {f"{p} | {s}": v for (p, s), v in t.items()}
            results["check_hog"] = args.hog
        if "merge" not in skip:
            m: dict[tuple[str, str], list[float]] = {}
            for _ in range(args.merge_rounds):
                for side, path in sides.items():
                    out = subprocess.run([sys.executable, "-c", MERGE_CHILD.format(bench=str(BENCH))],
                                         env=env_for(path), cwd=od, check=True, stdout=subprocess.PIPE,
                                         text=True).stdout
                    for step, ts in json.loads(out.strip().splitlines()[-1]).items():
                        m.setdefault((step, side), []).extend(ts)
            for (step, side), v in sorted(m.items(), key=lambda kv: (kv[0][0], kv[0][1])):
                rows.append([f"512-channel 3x3 pair: {step}", side, median(v), min(v), "", len(v)])
            results["merge"] = {f"{s} | {d}": v for (s, d), v in m.items()}
    finally:
        for f in files:
            if f.exists():
                f.unlink()
        shutil.rmtree(before, ignore_errors=True)
    print(f"## before_after: {args.rev} vs the working tree (interleaved; load average before {load_before}, "
          f"after {load()})\n")
    print(table(["workload", "side", "median s", "min s", "peak RSS MiB", "runs"], rows))
    path = write_json(f"before_after{f'_hog{args.hog}' if args.hog else ''}.json", results)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
