"""Is `convmerge fuse` as fast as copying the file, and does its memory stay flat?

Generates a self-describing conv-heavy fp32 safetensors model of about --gb GiB in
benchmarks/out/ (streamed with convmerge.io.write_model and LazyTensor: the generator never
holds the model either), then times, interleaved, --reps repetitions each of

    cp SRC DST                      (page cache only: cp does not fsync)
    cp SRC DST && sync DST          (cp plus fsync of the output, as fuse does)
    convmerge fuse SRC -o DST --force -q
    OMP_NUM_THREADS=1 convmerge fuse SRC -o DST --force -q

each under /usr/bin/time (peak RSS), deleting DST after every run. Then it runs
convmerge.model.fuse_file once in-process with wrappers around the library's steps to show
where fuse spends its time (merges while planning and again while writing, verification,
counterexample search, verdicts, reads, the write itself, fsync).

The model: --cycles repetitions (default 6) of four conv blocks of width c=--width and
expansion E=--expand*c (the merge work; a fixed number of layers whatever --gb), then wide
512->512 3x3 'trunk' convs each followed by a ReLU (no pairs: streamed, --trunk-share of the
bytes, default 40%), and the rest in 'embedding.weight' (60%) and 'fc.weight' (opaque layers,
copied byte for byte). The blocks, each followed by a ReLU:
  A  3x3 pad 2 c->E (no bias), 3x3 pad 1 E->c      mergeable; 5x5 c->c is cheaper (25c^2 < 18cE)
  B  3x3 pad 1 c->c, 3x3 pad 1 c->c                unmergeable (counterexample search)
  C  3x3 pad 1 c->E, batch norm, 1x1 E->c          mergeable through the BN; 3x3 c->c is cheaper
  D  3x3 pad 2 c->c (no bias), 3x3 pad 1 c->c      mergeable but 5x5 costs more: 'cheaper' skips it
(A, C and D get the same decisions from the MAC count and from spec.cost, the cost model.)
Fuse time is roughly (bytes streamed) + (cycles x per-chain planning cost); --cycles scales the
second term alone, --gb the first.

    python benchmarks/throughput.py                 # --gb 1.0 --reps 5
    python benchmarks/throughput.py --gb 0.25
    python benchmarks/throughput.py --gb 0.25,1     # both sizes in one table
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import as_installed, load, median, out_dir, table, write_json  # noqa: E402

from convmerge import io as cio  # noqa: E402

TIME = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
CONVMERGE = shutil.which("convmerge") or "convmerge"
FLOOR = "python -c 'import torch'; cp; sync"
"""The floor for a tool that imports torch and writes a durable copy (goal 1 of issue 13)."""


# --- the model ---------------------------------------------------------------------------------


def generate(path: Path, gb: float, cycles: int, width: int, expand: int, trunk_share: float = 0.4,
             seed: int = 0, trunk: str = "single") -> dict[str, Any]:
    """Write the model; return counts. Tensors are made one at a time (LazyTensor)."""
    total = int(gb * 2**30)
    c, e = width, width * expand
    gen = torch.Generator().manual_seed(seed)

    def rand(shape: tuple[int, ...], scale: float = 1.0, positive: bool = False):
        def make() -> torch.Tensor:
            t = torch.randn(shape, generator=gen, dtype=torch.float32) * scale
            return t.abs() + 0.5 if positive else t
        return cio.LazyTensor("F32", shape, make)

    tensors: list[tuple[str, Any]] = []
    layers: list[dict[str, Any]] = []

    def conv(name: str, inp: str, cin: int, cout: int, k: int, pad: int, bias: bool) -> str:
        layers.append({"name": name, "op": "conv2d", "input": inp, "stride": 1, "padding": pad,
                       "dilation": 1, "groups": 1, "padding_mode": "zeros"})
        tensors.append((f"{name}.weight", rand((cout, cin, k, k), 1.0 / math.sqrt(cin * k * k))))
        if bias:
            tensors.append((f"{name}.bias", rand((cout,), 0.1)))
        return name

    def bn(name: str, inp: str, ch: int) -> str:
        layers.append({"name": name, "op": "batch_norm", "input": inp, "eps": 1e-5})
        tensors.extend([(f"{name}.running_mean", rand((ch,), 0.1)), (f"{name}.running_var", rand((ch,), 0.2, True)),
                    (f"{name}.weight", rand((ch,), 0.2, True)), (f"{name}.bias", rand((ch,), 0.1))])
        return name

    def relu(name: str, inp: str) -> str:
        layers.append({"name": name, "op": "relu", "input": inp})
        return name

    x, kinds = "x", defaultdict(int)
    for i in range(cycles):
        p = f"blocks.{i}"
        x = relu(f"{p}.a.relu", conv(f"{p}.a.1", conv(f"{p}.a.0", x, c, e, 3, 2, False), e, c, 3, 1, True))
        x = relu(f"{p}.b.relu", conv(f"{p}.b.1", conv(f"{p}.b.0", x, c, c, 3, 1, True), c, c, 3, 1, True))
        x = relu(f"{p}.c.relu", conv(f"{p}.c.2", bn(f"{p}.c.1", conv(f"{p}.c.0", x, c, e, 3, 1, True), e), e, c, 1, 0, True))
        x = relu(f"{p}.d.relu", conv(f"{p}.d.1", conv(f"{p}.d.0", x, c, c, 3, 2, False), c, c, 3, 1, True))
        for k in "ABCD":
            kinds[k] += 1
    used = sum(4 * math.prod(s.shape) for _, s in tensors)
    # trunk: wide 3x3 convs separated by ReLUs (no pairs), filling `trunk_share` of the file
    # ('pairs': each a 3x3 then a 1x1, which 'cheaper' merges into one 3x3: many large merges)
    tw = 512
    per_trunk = 4 * (tw * tw * 9 + tw) + (4 * (tw * tw + tw) if trunk == "pairs" else 0)
    n_trunk = max(0, int((trunk_share * total) // per_trunk))
    x = conv("trunk.in", x, c, tw, 1, 0, True)
    for i in range(n_trunk):
        x = conv(f"trunk.{i}", x, tw, tw, 3, 1, True)
        if trunk == "pairs":
            x = conv(f"trunk.{i}.p", x, tw, tw, 1, 0, True)
        x = relu(f"trunk.{i}.relu", x)
    used = sum(4 * math.prod(s.shape) for _, s in tensors)
    emb_dim = 1024
    emb_rows = max(1, int(max(0, 0.6 * (total - used)) / 4 / emb_dim))
    layers.append({"name": "embedding", "op": "embedding", "input": "tokens"})
    tensors.insert(0, ("embedding.weight", rand((emb_rows, emb_dim), 0.02)))
    used = sum(4 * math.prod(s.shape) for _, s in tensors)
    fc_in = max(1, int((total - used) / 4 / 1000))
    layers.append({"name": "pool", "op": "flatten", "input": x})
    layers.append({"name": "fc", "op": "linear", "input": "pool"})
    tensors += [("fc.weight", rand((1000, fc_in), 0.01)), ("fc.bias", rand((1000,), 0.01))]
    doc = {"version": 1, "inputs": ["x", "tokens"], "layers": layers, "outputs": ["fc", "embedding"]}
    cio.write_model(path, tensors, {"convmerge.graph": json.dumps(doc), "format": "pt"}, force=True)
    convs = sum(1 for layer in layers if layer["op"] == "conv2d")
    conv_bytes = sum(4 * math.prod(t.shape) for n, t in tensors if n.split(".")[0] in ("blocks", "trunk"))
    return {"bytes": path.stat().st_size, "conv_bytes": conv_bytes, "layers": len(layers), "convs": convs,
            "trunk_convs": n_trunk, "trunk": trunk, "tensors": len(tensors), "blocks": dict(kinds), "width": c, "expand": expand}


# --- timing ------------------------------------------------------------------------------------


def run_timed(cmd: list[str] | str, shell: bool = False) -> tuple[float, int | None]:
    """Wall seconds and peak RSS (KiB, from /usr/bin/time %M, or getrusage as a fallback)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time", dir=out_dir()) as tf:
        if TIME:
            full = [TIME, "-f", "%M", "-o", tf.name] + (["sh", "-c", cmd] if shell else list(cmd))
        else:
            full = ["sh", "-c", cmd] if shell else list(cmd)
        t = time.perf_counter()
        proc = subprocess.run(full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        rss = None
        if TIME:
            lines = [ln for ln in Path(tf.name).read_text().split() if ln.strip().isdigit()]
            rss = int(lines[-1]) if lines else None
    if rss is None:
        import resource

        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # max over all children so far
    return wall, rss


def bench_size(gb: float, args: argparse.Namespace) -> dict[str, Any]:
    od = out_dir()
    src, dst = od / f"throughput_{gb:g}gb.safetensors", od / f"throughput_{gb:g}gb.out.safetensors"
    t = time.perf_counter()
    info = generate(src, gb, args.cycles, args.width, args.expand, args.trunk_share, trunk=args.trunk)
    info["generate_s"] = time.perf_counter() - t
    print(f"generated {src.name}: {info['bytes'] / 2**30:.3f} GiB, {info['layers']} layers, {info['convs']} convs, "
          f"blocks {info['blocks']} in {info['generate_s']:.1f}s", file=sys.stderr)
    subprocess.run(["cat", str(src)], stdout=subprocess.DEVNULL, check=True)  # SRC is in the page cache from here on
    fuse_cmd = [CONVMERGE, "fuse", str(src), "-o", str(dst), "--force", "-q", "--policy", args.policy]
    cases = {
        "cp": lambda: run_timed(["cp", str(src), str(dst)]),
        "cp + sync": lambda: run_timed(f"cp '{src}' '{dst}' && sync '{dst}'", shell=True),
        FLOOR: lambda: run_timed(f"'{sys.executable}' -c 'import torch' && cp '{src}' '{dst}' && sync '{dst}'",
                                 shell=True),
        "convmerge fuse": lambda: run_timed(fuse_cmd),
    }
    if args.one_thread:
        cases["convmerge fuse, OMP_NUM_THREADS=1"] = lambda: run_timed(["env", "OMP_NUM_THREADS=1"] + fuse_cmd)
    if args.load:
        busy = 2 * (os.cpu_count() or 1)
        check_cmd = [CONVMERGE, "check", str(src), "-q", "--policy", args.policy]
        torch_cmd = [sys.executable, "-c", "import torch"]
        cases["import torch"] = lambda: run_timed(torch_cmd)
        cases[f"import torch, {busy} busy"] = lambda: loaded(busy, lambda: run_timed(torch_cmd))
        cases["convmerge check"] = lambda: run_timed(check_cmd)
        cases[f"convmerge check, {busy} busy"] = lambda: loaded(busy, lambda: run_timed(check_cmd))
        cases[f"convmerge check OMP_NUM_THREADS=1, {busy} busy"] = lambda: loaded(
            busy, lambda: run_timed(["env", "OMP_NUM_THREADS=1"] + check_cmd))
        cases[f"convmerge fuse, {busy} busy"] = lambda: loaded(busy, lambda: run_timed(fuse_cmd))
    times: dict[str, list[float]] = {k: [] for k in cases}
    rss: dict[str, list[int]] = {k: [] for k in cases}
    load_before = load()
    with hogs(args.hog):
        for rep in range(args.reps):
            for name, fn in cases.items():
                wall, peak = fn()
                times[name].append(wall)
                rss[name].append(peak or 0)
                if name == "convmerge fuse" and rep == 0:
                    fused_bytes = dst.stat().st_size
                    fused_layers = len(json.loads(cio.read_header(dst).metadata["convmerge.graph"])["layers"])
                if dst.exists():
                    dst.unlink()
                print(f"  rep {rep + 1}/{args.reps} {name}: {wall:.2f}s", file=sys.stderr)
        load_after = load()
    imports = [run_timed([sys.executable, "-c", "import torch, convmerge.model, convmerge.cli"]) for _ in range(3)]
    baseline_rss = max(r for _, r in imports if r)
    import_s = median([w for w, _ in imports])
    breakdown = profile_in_process(src, dst, args.policy) if args.profile else None
    overlap = overlap_in_process(src, dst, args.policy, max(3, args.reps)) if args.profile else None
    if dst.exists():
        dst.unlink()
    if not args.keep:
        src.unlink()
    med = {k: median(v) for k, v in times.items()}
    return {
        "gb": gb, "model": info, "fused_bytes": fused_bytes, "fused_layers": fused_layers, "hog": args.hog,
        "times_s": times, "median_s": med, "peak_rss_kib": rss, "baseline_rss_kib": baseline_rss,
        "import_s": import_s,
        "ratio_fuse_cp": med["convmerge fuse"] / med["cp"], "ratio_fuse_cp_sync": med["convmerge fuse"] / med["cp + sync"],
        "ratio_fuse_floor": med["convmerge fuse"] / med[FLOOR],
        "load_before": load_before, "load_after": load_after,
        "breakdown": breakdown, "overlap": overlap,
    }


def loaded(n: int, fn: Any) -> Any:
    """fn() while n busy processes run (goal 2 of issue 13: fuse and check under a load of 2x the cores)."""
    with hogs(n):
        return fn()


@contextmanager
def hogs(n: int) -> Iterator[None]:
    """n busy Python processes for the duration (simulated load), stopped by their pid afterwards."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        if procs:
            time.sleep(2)
        yield
    finally:
        for p in procs:
            p.terminate()
            p.wait()


# --- where fuse spends its time (in process) ------------------------------------------------------


def overlap_in_process(src: Path, dst: Path, policy: str, reps: int) -> dict[str, Any]:
    """`model.fuse_file` in this process (imports paid), interleaved: as shipped (merges verified while the
    untouched tensors are copied) against every merge verified while planning, before the write starts."""
    from convmerge import model
    from convmerge.engine import plan
    from convmerge.options import Options

    shipped = plan.build
    before = lambda *a, **k: shipped(*a, **dict(k, verify_later=False))  # noqa: E731
    times: dict[str, list[float]] = {"verified beside the copy": [], "verified before the write": []}
    for _ in range(reps):
        for name, build in (("verified beside the copy", shipped), ("verified before the write", before)):
            plan.build = build
            try:
                t = time.perf_counter()
                model.fuse_file(str(src), str(dst), Options(policy=policy), force=True)
                times[name].append(time.perf_counter() - t)
            finally:
                plan.build = shipped
            dst.unlink()
    med = {k: median(v) for k, v in times.items()}
    return {"times_s": times, "median_s": med,
            "ratio": med["verified beside the copy"] / med["verified before the write"]}


def profile_in_process(src: Path, dst: Path, policy: str) -> dict[str, Any]:
    """`convmerge fuse -q` once in this process, with timing wrappers around the library's steps."""
    from convmerge.engine import algebra, plan
    from convmerge import cli, graph, model

    acc: dict[str, float] = defaultdict(float)
    cnt: dict[str, int] = defaultdict(int)
    state = {"phase": "other"}
    saved: list[tuple[Any, str, Any]] = []

    def wrap(obj: Any, attr: str, label: Any, phase: str = "") -> None:
        orig = getattr(obj, attr)
        saved.append((obj, attr, orig))

        def wrapper(*a: Any, **k: Any) -> Any:
            name = label() if callable(label) else label
            before = state["phase"]
            if phase:
                state["phase"] = phase
            t = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                acc[name] += time.perf_counter() - t
                cnt[name] += 1
                state["phase"] = before
        setattr(obj, attr, wrapper)

    during = lambda what: lambda: f"{what} during {state['phase']}"  # noqa: E731
    wrap(model, "analyze", "phase: plan (model.analyze -> plan.build)", "plan")
    wrap(cio, "write_model", "phase: write (io.write_model)", "write")
    wrap(plan._Planner, "run", "plan: regions (reduce, choose, verify)")
    wrap(plan._Planner, "_unit", "plan: each chosen merge built (plan._Planner._unit; verified there unless left for the copy)")
    wrap(plan.Plan, "verify", "write: verification beside the copy (plan.Plan.verify)")
    wrap(algebra, "max_errors", "algebra.max_errors (float64 + stored dtype, one run of the layers)")
    wrap(plan, "_judge_pair", "plan: pair verdicts (plan._judge_pair)")
    wrap(plan, "_search", "counterexample searches (plan._search)")
    wrap(algebra, "compose_kernels", during("algebra.compose_kernels (batched GEMM)"))
    wrap(algebra, "analyze", during("algebra.analyze (pair rules)"))
    wrap(plan.Loader, "finite", "plan.Loader.finite (NaN/Inf checks)")
    if hasattr(cio, "_copy_in_kernel"):
        wrap(cio, "_copy_in_kernel", "io._copy_in_kernel (os.copy_file_range of untouched tensors)")
    wrap(cio, "read_tensor", during("io.read_tensor"))
    wrap(cio, "read_header", "io.read_header")
    wrap(model, "parse", "graph.parse")
    wrap(graph.Graph, "pairs", "Graph.pairs")
    wrap(os, "fsync", "os.fsync")
    argv = ["fuse", str(src), "-o", str(dst), "--force", "-q", "--policy", policy]
    try:
        t = time.perf_counter()
        code = cli.app(argv, standalone_mode=False)  # the command itself, in this process (imports paid)
        total = time.perf_counter() - t
        if code:
            raise RuntimeError(f"convmerge {' '.join(argv)} exited {code}")
    finally:
        for obj, attr, orig in reversed(saved):
            setattr(obj, attr, orig)
    steps = {k: {"s": v, "calls": cnt.get(k, 0), "share": v / total} for k, v in sorted(acc.items())}
    return {"total_s": total, "steps": steps, "argv": argv}


# --- main ------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", default="1.0", help="model size in GiB; a comma-separated list runs each")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cycles", type=int, default=6, help="repetitions of the A B C D blocks (merge work)")
    ap.add_argument("--width", type=int, default=64, help="block width c")
    ap.add_argument("--trunk-share", type=float, default=0.4, help="share of the file in wide 3x3 convs")
    ap.add_argument("--trunk", default="single", choices=["single", "pairs"],
                    help="single: unpaired 3x3 convs; pairs: each 3x3 followed by a 1x1 (merged: many large merges)")
    ap.add_argument("--expand", type=int, default=4, help="expansion E = expand * c")
    ap.add_argument("--policy", default="cheaper", choices=["cheaper", "all"])
    ap.add_argument("--hog", type=int, default=0, help="busy processes during the timed runs (simulated load)")
    ap.add_argument("--one-thread", action="store_true", help="also time fuse with OMP_NUM_THREADS=1")
    ap.add_argument("--load", action="store_true",
                    help="also time check, and check and fuse each under 2x nproc busy processes (started per run)")
    ap.add_argument("--quick", action="store_true", help="--gb 0.25 --reps 2")
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="skip the in-process breakdown")
    ap.add_argument("--keep", action="store_true", help="keep the generated model in benchmarks/out/")
    args = ap.parse_args()
    if as_installed():
        print("note: PYTHONDONTWRITEBYTECODE cleared; convmerge's modules compiled, as pip installs them", file=sys.stderr)
    if args.quick:
        args.gb, args.reps = "0.25", 2
    sizes = [float(s) for s in args.gb.split(",")]
    if TIME is None:
        print("note: /usr/bin/time not found (apt-get install time); peak RSS from getrusage", file=sys.stderr)
    results = [bench_size(gb, args) for gb in sizes]

    cmd = " ".join(["python benchmarks/throughput.py"] + sys.argv[1:])
    print(f"## throughput: `{cmd}` (median of {args.reps} interleaved runs, policy {args.policy}, trunk "
          f"{args.trunk}{f', {args.hog} busy processes' if args.hog else ''})\n")
    print("SRC is read once with `cat` before timing, so every run reads it from the page cache; cp alone "
          "leaves its output in the page cache (no fsync) while fuse fsyncs it, hence the `cp + sync` column; "
          f"the floor `{FLOOR}` adds what any tool that imports torch pays.\n")
    rows = []
    extra = [k for k in results[0]["median_s"] if "OMP" in k and not k.endswith(" busy")]
    for r in results:
        m, info = r["median_s"], r["model"]
        rows.append([f"{info['bytes'] / 2**30:.3f}", info["convs"], r["fused_layers"],
                     m["cp"], m["cp + sync"], m[FLOOR], m["convmerge fuse"], *[m[k] for k in extra],
                     f"**{r['ratio_fuse_floor']:.2f}**", r["ratio_fuse_cp_sync"],
                     f"{max(r['peak_rss_kib']['convmerge fuse']) / 1024:.0f}", f"{r['baseline_rss_kib'] / 1024:.0f}",
                     r["import_s"], f"{r['load_before']} / {r['load_after']}"])
    print(table(["GiB", "convs", "layers after", "cp s", "cp+sync s", "floor s", "fuse s", *extra,
                 "fuse/floor", "fuse/(cp+sync)", "fuse peak RSS MiB", "import-only RSS MiB", "import-only s",
                 "load avg before / after"], rows))
    print("\nspread over the runs (min-max seconds):\n")
    print(table(["GiB"] + list(results[0]["times_s"]),
                [[f"{r['model']['bytes'] / 2**30:.3f}"] + [f"{min(v):.3g}-{max(v):.3g}" for v in r["times_s"].values()]
                 for r in results]))
    for r in results:
        b = r["breakdown"]
        if b is None:
            continue
        print(f"\n### where `convmerge {' '.join(b['argv'][:1])} ... -q` spends its time, in process, "
              f"{r['model']['bytes'] / 2**30:.3f} GiB (total {b['total_s']:.2f}s after the imports; nested rows "
              "overlap)\n")
        print(table(["step", "calls", "seconds", "share of total"],
                    [[k, v["calls"] or "", v["s"], f"{100 * v['share']:.1f}%"] for k, v in b["steps"].items()]))
    overlaps = [r for r in results if r.get("overlap")]
    if overlaps:
        print("\n### goal 3: verification beside the copy, in process (`model.fuse_file`, imports paid), interleaved\n")
        print(table(["GiB", "verified beside the copy s", "verified before the write s", "ratio", "runs"],
                    [[f"{r['model']['bytes'] / 2**30:.3f}", r["overlap"]["median_s"]["verified beside the copy"],
                      r["overlap"]["median_s"]["verified before the write"], f"**{r['overlap']['ratio']:.2f}**",
                      len(r["overlap"]["times_s"]["verified beside the copy"])] for r in overlaps]))
    name = f"throughput_{args.gb.replace(',', '_')}gb_{args.trunk}{f'_hog{args.hog}' if args.hog else ''}.json"
    path = write_json(name, {"policy": args.policy, "reps": args.reps, "argv": sys.argv[1:], "results": results})
    busy_rows = []
    for r in results:
        m = r["median_s"]
        tag = next((k.rsplit(", ", 1)[1] for k in m if k.endswith(" busy")), None)
        if tag:
            ratio = lambda what: m[f"{what}, {tag}"] / m[what]  # noqa: E731
            busy_rows.append([f"{r['model']['bytes'] / 2**30:.3f}", tag, f"{ratio('import torch'):.2f}",
                              m["convmerge check"], m[f"convmerge check, {tag}"], f"**{ratio('convmerge check'):.2f}**",
                              f"{m[f'convmerge check, {tag}'] / m[f'convmerge check OMP_NUM_THREADS=1, {tag}']:.2f}",
                              m["convmerge fuse"], m[f"convmerge fuse, {tag}"], f"**{ratio('convmerge fuse'):.2f}**"])
    if busy_rows:
        print("\n### under load (goal 2: at most 1.2x slower than quiet), same run, interleaved\n")
        print("A CPU-bound process sharing the cores fairly slows down by about (busy + 1) / cores whatever it "
              "does; `import torch` busy/quiet shows that floor on this run.\n")
        print(table(["GiB", "load", "import torch busy/quiet", "check quiet s", "check busy s", "check busy/quiet",
                     "check busy / check OMP=1 busy", "fuse quiet s", "fuse busy s", "fuse busy/quiet"], busy_rows))
    print(f"\nwrote {path}\nreproduce: {cmd}")


if __name__ == "__main__":
    main()
