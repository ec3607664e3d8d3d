"""How fast the CLI answers (issue 13, goal 4): `convmerge check` on a small model against
`python -c "import torch"`, and `check` on a 1,000-conv description once the imports are paid.

Generates two descriptions in benchmarks/out/: a small one (2 conv pairs) and a large one (--pairs
conv pairs, default 500: 1,000 convs). Each pair is 3x3 pad 2 16->16 then 3x3 pad 1 16->16, a ReLU
after it (small tensors). Times as subprocesses, interleaved, medians of --reps:

    python -c pass                                  (interpreter start, for reference)
    python -c "import torch"                        (what any torch command pays)
    convmerge --help
    convmerge check SMALL -q
    convmerge check LARGE -q

and, in process (imports paid, one warm-up call), convmerge.model.check_file on LARGE per policy,
split into header + parse, graph pairs, regions (reduce, choose, verify), pair verdicts and
verification. Prints the ratios of goal 4.

    python benchmarks/startup.py [--reps 10] [--pairs 500]
    python benchmarks/startup.py --quick            # --reps 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import as_installed, load, median, out_dir, table, write_json  # noqa: E402

from convmerge import io as cio  # noqa: E402

CONVMERGE = shutil.which("convmerge") or "convmerge"


def generate(path: Path, pairs: int, ch: int = 16) -> int:
    g = torch.Generator().manual_seed(0)
    layers, tensors, x = [], [], "x"
    for i in range(pairs):
        for j, pad in ((0, 2), (1, 1)):
            name = f"p{i}.{j}"
            layers.append({"name": name, "op": "conv2d", "input": x, "stride": 1, "padding": pad,
                           "dilation": 1, "groups": 1})
            tensors.append((f"{name}.weight", torch.randn(ch, ch, 3, 3, generator=g) * 0.1))
            if j == 1:
                tensors.append((f"{name}.bias", torch.randn(ch, generator=g) * 0.1))
            x = name
        layers.append({"name": f"p{i}.relu", "op": "relu", "input": x})
        x = f"p{i}.relu"
    doc = {"version": 1, "inputs": ["x"], "layers": layers, "outputs": [x]}
    cio.write_model(path, tensors, {"convmerge.graph": json.dumps(doc), "format": "pt"}, force=True)
    return len(layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--pairs", type=int, default=500)
    ap.add_argument("--quick", action="store_true", help="3 repetitions")
    args = ap.parse_args()
    if as_installed():
        print("note: PYTHONDONTWRITEBYTECODE cleared; convmerge's modules compiled, as pip installs them", file=sys.stderr)
    if args.quick:
        args.reps = 3
    small, large = out_dir() / "startup_small.safetensors", out_dir() / f"startup_{2 * args.pairs}.safetensors"
    generate(small, 2)
    n_layers = generate(large, args.pairs)
    convs = 2 * args.pairs
    cases = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "convmerge --help": [CONVMERGE, "--help"],
        "convmerge check SMALL -q (4 convs)": [CONVMERGE, "check", str(small), "-q"],
        f"convmerge check LARGE -q ({convs} convs)": [CONVMERGE, "check", str(large), "-q"],
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    load_before = load()
    for _ in range(args.reps):
        for name, cmd in cases.items():
            t = time.perf_counter()
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            times[name].append(time.perf_counter() - t)
            if proc.returncode not in (0, 1):
                raise SystemExit(f"{cmd} failed ({proc.returncode}): {proc.stderr[-2000:]}")

    # in process: where check spends its time once torch and convmerge are imported
    from convmerge.engine import algebra, plan
    from convmerge import graph, model
    from convmerge.options import Options

    acc: dict[str, float] = {}
    saved = []

    def wrap(obj: Any, attr: str, label: str) -> None:
        orig = getattr(obj, attr)
        saved.append((obj, attr, orig))

        def w(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                acc[label] = acc.get(label, 0.0) + time.perf_counter() - t
        setattr(obj, attr, w)

    model.check_file(str(large))  # warm-up: first calls, lazy imports
    wrap(model.io, "read_header", "io.read_header")
    wrap(model, "parse", "graph.parse")
    wrap(graph.Graph, "pairs", "Graph.pairs")
    wrap(plan._Planner, "run", "plan._Planner.run (regions: reduce, choose, verify)")
    wrap(plan, "_judge_pair", "plan._judge_pair (pair verdicts, outside and inside regions)")
    wrap(algebra, "max_errors", "algebra.max_errors (verification + rounding, all calls)")
    runs, merged = {}, {}
    try:
        for policy in ("cheaper", "all"):
            totals = []
            for _ in range(max(1, args.reps // 2)):
                acc.clear()
                t = time.perf_counter()
                rep = model.check_file(str(large), Options(policy=policy))
                totals.append(time.perf_counter() - t)
            runs[policy] = (median(totals), dict(acc))
            merged[policy] = rep.summary()["merged"]
    finally:
        for obj, attr, orig in reversed(saved):
            setattr(obj, attr, orig)
    small.unlink()
    large.unlink()

    med = {k: median(v) for k, v in times.items()}
    torch_s = med["python -c 'import torch'"]
    cmd = " ".join(["python benchmarks/startup.py"] + sys.argv[1:])
    print(f"## startup: `{cmd}` (subprocess wall time, median of {args.reps} interleaved runs; load average "
          f"before {load_before}, after {load()})\n")
    print(f"LARGE: {n_layers} layers ({convs} convs 16->16 3x3, {args.pairs} mergeable pairs); merged: "
          f"{merged['all']} under 'all', {merged['cheaper']} under 'cheaper' (the 5x5 costs more than the two 3x3)\n")
    print(table(["command", "median s", "min s", "/ import torch"],
                [[k, med[k], min(v), f"{med[k] / torch_s:.2f}"] for k, v in times.items()]))
    print(f"\n**goal 4**: `convmerge check` on a small model / `python -c 'import torch'` = "
          f"**{med['convmerge check SMALL -q (4 convs)'] / torch_s:.2f}** (target 1.3); check_file on {convs} convs "
          f"after imports: **{runs['cheaper'][0]:.3f} s** under 'cheaper' (target 0.5 s), {runs['all'][0]:.3f} s under "
          "'all'")
    for policy, (total, steps) in runs.items():
        print(f"\n### in-process check_file --policy {policy} (imports paid; median of {max(1, args.reps // 2)}): "
              f"{total:.3f}s\n")
        print(table(["step (last run)", "seconds", "share"],
                    [[k, v, f"{100 * v / total:.0f}%"] for k, v in steps.items()]))
    out = write_json("startup.json", {"reps": args.reps, "pairs": args.pairs, "layers": n_layers,
                                      "times_s": times, "median_s": med,
                                      "in_process": {k: {"total_s": v[0], "steps_s": v[1]} for k, v in runs.items()}})
    print(f"\nwrote {out}\nreproduce: {cmd}")


if __name__ == "__main__":
    main()
