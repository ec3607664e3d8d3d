"""How fast the CLI answers: `convmerge --help`, and `convmerge check` on a 200-layer description.

Generates benchmarks/out/startup_200.safetensors: 100 conv pairs (3x3 pad 2 16->16 then 3x3
pad 1 16->16, a ReLU after each pair: 300 layers of which 200 convs, small tensors), then times
as subprocesses, interleaved, medians of --reps:

    python -c pass                                  (interpreter start, for reference)
    python -c "import torch"                        (what any torch command pays)
    convmerge --help
    convmerge check FILE -q
    convmerge check FILE -q --policy all

and, in process, convmerge.model.check_file once per policy with the import already paid,
split into header + parse, graph pairs/chains, verdicts, planning (lazy merges) and verification.

    python benchmarks/startup.py [--reps 10] [--pairs 100]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load, median, out_dir, table, write_json  # noqa: E402

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
    ap.add_argument("--pairs", type=int, default=100)
    args = ap.parse_args()
    path = out_dir() / f"startup_{2 * args.pairs}.safetensors"
    n_layers = generate(path, args.pairs)
    cases = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "convmerge --help": [CONVMERGE, "--help"],
        f"convmerge check ({2 * args.pairs} convs, policy cheaper)": [CONVMERGE, "check", str(path), "-q"],
        f"convmerge check ({2 * args.pairs} convs, policy all)": [CONVMERGE, "check", str(path), "-q", "--policy", "all"],
        f"OMP_NUM_THREADS=1 convmerge check ({2 * args.pairs} convs, policy all)":
            ["env", "OMP_NUM_THREADS=1", CONVMERGE, "check", str(path), "-q", "--policy", "all"],
    }
    check_reps = max(3, args.reps // 2)
    times: dict[str, list[float]] = {k: [] for k in cases}
    for rep in range(args.reps):
        for name, cmd in cases.items():
            if "convmerge check" in name and rep >= check_reps:
                continue
            t = time.perf_counter()
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            times[name].append(time.perf_counter() - t)
            if proc.returncode != 0:
                raise SystemExit(f"{cmd} failed ({proc.returncode}): {proc.stderr[-2000:]}")

    # in process: where check spends its time once torch is imported
    from convmerge import algebra, chain, graph, model

    acc: dict[str, float] = {}
    saved = []

    def wrap(obj, attr, label):
        orig = getattr(obj, attr)
        saved.append((obj, attr, orig))

        def w(*a, **k):
            t = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                acc[label] = acc.get(label, 0.0) + time.perf_counter() - t
        setattr(obj, attr, w)

    wrap(model.io, "read_header", "io.read_header")
    wrap(model, "parse", "graph.parse")
    wrap(graph.Graph, "pairs", "Graph.pairs")
    wrap(graph.Graph, "chains", "Graph.chains")
    wrap(chain, "plan", "chain.plan (longer-chain analyses, lazy merges, verify)")
    wrap(chain, "judge_pairs", "chain.judge_pairs (verdicts, counterexamples)")
    wrap(algebra, "max_errors", "algebra.max_errors (verification + rounding, all calls)")
    wrap(algebra, "merge", "algebra.merge (all calls)")
    runs, merged = {}, {}
    try:
        for policy in ("cheaper", "all"):
            acc.clear()
            t = time.perf_counter()
            rep = model.check_file(str(path), policy=policy)
            runs[policy] = (time.perf_counter() - t, dict(acc))
            merged[policy] = rep.summary()["merged"]
    finally:
        for obj, attr, orig in reversed(saved):
            setattr(obj, attr, orig)
    path.unlink()

    print(f"## startup: CLI wall time (subprocess, median of {args.reps} for the first three rows, "
          f"{check_reps} for check; interleaved; load average {load()})\n")
    print(f"model: {n_layers} layers ({2 * args.pairs} convs 16->16 3x3, {args.pairs} mergeable pairs); "
          f"check reports {rep.summary()['pairs']} pairs; merged: {merged['all']} under 'all', {merged['cheaper']} under "
          "'cheaper' (the 5x5 costs more than the two 3x3 under spec.cost)\n")
    print(table(["command", "median s", "min s", "runs"],
                [[k, median(v), min(v), len(v)] for k, v in times.items()]))
    for policy, (total, steps) in runs.items():
        print(f"\n### in-process check_file --policy {policy} (torch already imported): {total:.2f}s\n")
        print(table(["step", "seconds", "share"], [[k, v, f"{100 * v / total:.0f}%"] for k, v in steps.items()]))
    out = write_json("startup.json", {"reps": args.reps, "pairs": args.pairs, "layers": n_layers,
                                      "times_s": times, "median_s": {k: median(v) for k, v in times.items()},
                                      "in_process": {k: {"total_s": v[0], "steps_s": v[1]} for k, v in runs.items()}})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
