"""Verification in proportion (issue 21, goal 3): `convmerge fuse` on an annotated RepVGG-A0 against
`python -c "import torch"`, and the share of fuse that verification takes.

Generates (no timm, no network) a safetensors file annotated with the training-form graph of RepVGG-A0:
stages of 1, 2, 4, 14 and 1 blocks, 48, 48, 96, 192 and 1280 channels, the first block of each stage
3x3/1x1 at stride 2, the others 3x3 + BN, 1x1 + BN and an identity BN, summed, then ReLU (random
weights, randomised BN statistics, float32). Then, as subprocesses, interleaved, medians of --reps:

    python -c "import torch"
    convmerge fuse FILE -o OUT -f -q            (every size: no --input-size)

and in process (imports paid, one warm-up): `model.fuse_file` split into verification (the checks
`plan` runs, `plan.verify_merge`, i.e. `verify.check`) and the rest, with the multiply-adds those checks run (`Checked.macs`, which
`plan.verify_merge` returns).

    python benchmarks/verify_speed.py [--reps 5] [--before DIR]
    python benchmarks/verify_speed.py --quick      # --reps 2

`fuse` runs as `python -m convmerge.cli` from this checkout (its working directory, and PYTHONPATH). `--before
DIR` (a checkout of another revision, e.g. `git worktree add /tmp/before HEAD~2`) adds the same command run from
DIR, interleaved with the others.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # in process too, this checkout's convmerge
from _common import as_installed, load, median, out_dir, table, write_json  # noqa: E402

from convmerge import io as cio  # noqa: E402

STAGES = ((1, 48), (2, 48), (4, 96), (14, 192), (1, 1280))  # RepVGG-A0: blocks and width per stage


def repvgg_a0(path: Path, seed: int = 0) -> int:
    """Write the annotated file; returns its layer count."""
    g = torch.Generator().manual_seed(seed)
    layers: list[dict[str, Any]] = []
    tensors: list[tuple[str, torch.Tensor]] = []

    def conv(name: str, src: str, cin: int, cout: int, k: int, stride: int) -> str:
        layers.append({"name": name, "op": "conv2d", "input": src, "stride": stride, "padding": k // 2,
                       "dilation": 1, "groups": 1})
        tensors.append((f"{name}.weight", torch.randn(cout, cin, k, k, generator=g) * (2.0 / (cin * k * k)) ** 0.5))
        return name

    def bn(name: str, src: str, c: int) -> str:
        layers.append({"name": name, "op": "batch_norm", "input": src, "eps": 1e-5})
        tensors.extend([(f"{name}.weight", 1 + 0.1 * torch.randn(c, generator=g)),
                        (f"{name}.bias", 0.1 * torch.randn(c, generator=g)),
                        (f"{name}.running_mean", 0.1 * torch.randn(c, generator=g)),
                        (f"{name}.running_var", 0.5 + torch.rand(c, generator=g))])
        return name

    x, cin = "x", 3
    for s, (blocks, width) in enumerate(STAGES):
        for b in range(blocks):
            p, stride = f"s{s}.b{b}", 2 if b == 0 else 1
            branches = [bn(f"{p}.dense.bn", conv(f"{p}.dense", x, cin, width, 3, stride), width),
                        bn(f"{p}.point.bn", conv(f"{p}.point", x, cin, width, 1, stride), width)]
            if stride == 1 and cin == width:
                branches.append(bn(f"{p}.skip", x, width))
            layers.append({"name": f"{p}.sum", "op": "add", "inputs": branches})
            layers.append({"name": f"{p}.relu", "op": "relu", "input": f"{p}.sum"})
            x, cin = f"{p}.relu", width
    doc = {"version": 1, "inputs": ["x"], "layers": layers, "outputs": [x]}
    cio.write_model(path, tensors, {"convmerge.graph": json.dumps(doc), "format": "pt"}, force=True)
    return len(layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="2 repetitions")
    ap.add_argument("--before", metavar="DIR", help="a checkout of another revision: its fuse too, interleaved")
    args = ap.parse_args()
    if as_installed():
        print("note: PYTHONDONTWRITEBYTECODE cleared; convmerge's modules compiled, as pip installs them", file=sys.stderr)
    if args.quick:
        args.reps = 2
    src, dst = out_dir() / "repvgg_a0.safetensors", out_dir() / "repvgg_a0.fused.safetensors"
    n_layers = repvgg_a0(src)
    fuse = [sys.executable, "-m", "convmerge.cli"]  # the checkout's convmerge (the installed entry point may be another)
    cases = {"python -c 'import torch'": [sys.executable, "-c", "import torch"],
             "convmerge fuse FILE -q": [*fuse, "fuse", str(src), "-o", str(dst), "-f", "-q"]}
    root = Path(__file__).resolve().parent.parent
    env = {k: dict(os.environ, PYTHONPATH=str(root)) for k in cases}  # `-m` reads the working directory first:
    cwd = {k: root for k in cases}  # each fuse runs from the checkout it times
    if args.before:
        old = f"convmerge fuse FILE -q ({args.before})"
        cases[old] = cases["convmerge fuse FILE -q"]
        cwd[old] = Path(args.before).resolve()
        env[old] = dict(os.environ, PYTHONPATH=str(cwd[old]))
    times: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}  # user + sys: steadier than wall time on a busy machine
    load_before = load()
    for _ in range(args.reps):
        for name, cmd in cases.items():
            t, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env[name],
                                  cwd=cwd[name])
            times[name].append(time.perf_counter() - t)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[name].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
            if proc.returncode != 0:
                raise SystemExit(f"{cmd} failed ({proc.returncode}): {proc.stderr[-2000:]}")

    from convmerge import model
    from convmerge.engine import plan

    real = plan.verify_merge
    spent: list[float] = []
    counted: list[int] = []

    def timed(*a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            checked = real(*a, **k)
        finally:
            spent.append(time.perf_counter() - t)
        counted.append(getattr(checked, "macs", 0))
        return checked

    model.fuse_file(str(src), str(dst), force=True)  # warm-up
    plan.verify_merge = timed  # type: ignore[assignment]
    try:
        totals, verify_s, macs = [], [], []
        for _ in range(args.reps):
            spent.clear()
            counted.clear()
            t = time.perf_counter()
            model.fuse_file(str(src), str(dst), force=True)
            totals.append(time.perf_counter() - t)
            verify_s.append(sum(spent))
            macs.append(sum(counted))
    finally:
        plan.verify_merge = real  # type: ignore[assignment]
    src.unlink()
    dst.unlink(missing_ok=True)

    med = {k: median(v) for k, v in times.items()}
    med_cpu = {k: median(v) for k, v in cpu.items()}
    torch_s, fuse_s = med["python -c 'import torch'"], med["convmerge fuse FILE -q"]
    torch_cpu = med_cpu["python -c 'import torch'"]
    cmd = " ".join(["python benchmarks/verify_speed.py"] + sys.argv[1:])
    print(f"## verify_speed: `{cmd}` (median of {args.reps} interleaved runs; load average before {load_before}, "
          f"after {load()})\n")
    print(f"RepVGG-A0 training form, annotated safetensors, {n_layers} layers, float32\n")
    print(table(["command", "wall s (median)", "min s", "/ import torch", "CPU s (user + sys, median)",
                 "/ import torch"],
                [[k, med[k], min(v), f"{med[k] / torch_s:.2f}", med_cpu[k], f"{med_cpu[k] / torch_cpu:.2f}"]
                 for k, v in times.items()]))
    total, ver = median(totals), median(verify_s)
    print(f"\n**goal 3**: `convmerge fuse` / `python -c 'import torch'` = **{fuse_s / torch_s:.2f}** wall, "
          f"{med_cpu['convmerge fuse FILE -q'] / torch_cpu:.2f} CPU (target 2); "
          f"in process (imports paid) fuse_file {total:.3f} s, of which verification {ver:.3f} s "
          f"({100 * ver / total:.0f}%), {median(macs) / 1e6:.1f} M multiply-adds")
    out = write_json("verify_speed.json", {"reps": args.reps, "layers": n_layers, "times_s": times, "median_s": med, "cpu_s": cpu,
                                           "fuse_file_s": totals, "verify_s": verify_s, "verify_macs": macs})
    print(f"\nwrote {out}\nreproduce: {cmd}")


if __name__ == "__main__":
    main()
