"""Peak memory of `convmerge check --json` and `convmerge explain` as the input size grows.

The requirement: with any --input-size up to 1024, peak RSS stays within 1.5x of the same
command without one. Each command runs as its own child process; its peak RSS is that child's
ru_maxrss (os.wait4), so no other process is counted. Commands, on the example model
(examples/example.safetensors, built by examples/make_example.py when missing; layers 11 and 12
are its unmergeable 3x3 pad 0 -> 3x3 pad 2 pair, 16 channels):

    convmerge check examples/example.safetensors --json [--input-size S]
    convmerge explain examples/example.safetensors 11 12 [--json] [--input-size S]

for no size and S = 224x224, 512x512, 1024x1024, the sizes interleaved within each repetition.

    python benchmarks/memory.py [--reps 1] [--sizes 224,512,1024]
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load, median, table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "example.safetensors"
CONVMERGE = shutil.which("convmerge") or "convmerge"
LIMIT = 1.5


def commands(model: str) -> dict[str, list[str]]:
    return {
        "check --json": ["check", model, "--json"],
        "explain 11 12": ["explain", model, "11", "12"],
        "explain 11 12 --json": ["explain", model, "11", "12", "--json"],
    }


def peak(argv: list[str]) -> tuple[float, float]:
    """Peak RSS (MiB) and wall seconds of one child process; its output is discarded."""
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: nothing to drain while waiting
        t = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        code = proc.returncode = os.waitstatus_to_exitcode(status)
        if code != 0:
            err.seek(0)
            raise RuntimeError(f"{shlex.join(argv)} failed ({code}): {err.read().decode(errors='replace')[-2000:]}")
    return usage.ru_maxrss / 1024, wall  # ru_maxrss is in KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--sizes", default="224,512,1024", help="square input sizes, comma-separated")
    args = ap.parse_args()
    if not EXAMPLE.exists():
        subprocess.run([sys.executable, str(ROOT / "examples" / "make_example.py")], check=True)
    model = str(EXAMPLE.relative_to(ROOT))
    sizes: list[str | None] = [None] + [f"{n}x{n}" for n in args.sizes.split(",")]
    runs: dict[tuple[str, str | None], list[tuple[float, float]]] = {}
    before = load()
    for _ in range(args.reps):
        for name, argv in commands(model).items():
            for size in sizes:
                full = [CONVMERGE, *argv] + (["--input-size", size] if size else [])
                runs.setdefault((name, size), []).append(peak(full))
    after = load()
    rows, records = [], []
    for name, argv in commands(model).items():
        base = median([r[0] for r in runs[(name, None)]])
        for size in sizes:
            rss = median([r[0] for r in runs[(name, size)]])
            wall = median([r[1] for r in runs[(name, size)]])
            ratio = rss / base
            cmd = shlex.join(["convmerge", *argv] + (["--input-size", size] if size else []))
            rows.append([f"`{cmd}`", size or "none", rss, f"{ratio:.2f}x", "yes" if ratio <= LIMIT else "**no**", wall])
            records.append({"command": cmd, "size": size, "peak_rss_mib": rss, "ratio": ratio, "wall_s": wall})
    print(f"peak RSS per child process, median of {args.reps}; load average before {before}, after {after}\n")
    print(table(["command", "input size", "peak RSS MiB", "vs no size", f"<= {LIMIT}x", "wall s"], rows))
    path = write_json("memory.json", {"runs": records, "reps": args.reps, "load_before": before, "load_after": after})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
