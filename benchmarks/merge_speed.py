"""How long one merge takes: a dense 512->512 3x3 (pad 2) followed by a dense 512->512 3x3 (pad 1).

Times, as medians of several runs in one process (2 torch threads unless --threads):
  * convmerge.engine.algebra.analyze (the verdict: supports, rules, bias check)
  * convmerge.engine.algebra.merge (the kernel: one batched float64 GEMM + index_add tap scatter,
    algebra.compose_kernels) and its GFLOP/s
  * convmerge.engine.algebra.chain_errors (the numeric check at three border sizes)
  * convmerge.api.fuse on the two convs as an nn.Sequential (float32) with policy 'all' (trace,
    analyze, merge, verify in float64 with the rounding of the stored float32 weights, rebuild),
    and convmerge.api.check with policy 'cheaper' (the 5x5 costs more under spec.cost: no merge,
    and since planning is lazy no merged weight is built)
and, as references, the bare float64 GEMM of the contraction alone ([O*9, M] @ [M, I*9]: the
floor for an exact float64 merge on this machine), the same kernel as one GEMM plus 81 shifted
tap additions (the earlier proposal), and as 81 per-tap GEMMs, checked against the library's
kernel.

    python benchmarks/merge_speed.py [--channels 512] [--reps 3] [--per-tap]
    python benchmarks/merge_speed.py --quick          # 256 channels, 2 reps
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load, median, table, write_json  # noqa: E402

import convmerge.api as api  # noqa: E402
from convmerge.engine import algebra  # noqa: E402
from convmerge.engine.algebra import Conv  # noqa: E402
from convmerge.maths.spec import conv_spec  # noqa: E402


def make_pair(c: int, seed: int = 0) -> tuple[Conv, Conv]:
    g = torch.Generator().manual_seed(seed)
    s1 = conv_spec((3, 3), c, c, padding=2, bias=False)  # a bias b1 would leak at conv2's zero padding
    s2 = conv_spec((3, 3), c, c, padding=1, bias=True)
    w1 = torch.randn(c, c, 3, 3, generator=g) / (3 * c**0.5)
    w2 = torch.randn(c, c, 3, 3, generator=g) / (3 * c**0.5)
    return Conv(s1, w1.double()), Conv(s2, w2.double(), torch.randn(c, generator=g).double())


def gemm_kernel(c1: Conv, c2: Conv) -> torch.Tensor:
    """Reference: K[o,i,a+b] = sum_m W2[o,m,b] W1[m,i,a] as ONE GEMM plus tap additions (stride/dilation 1)."""
    w1, w2 = c1.weight.double(), c2.weight.double()
    o, m, kb, kb2 = w2.shape
    _, i, ka, ka2 = w1.shape
    a = w2.permute(0, 2, 3, 1).reshape(o * kb * kb2, m)  # [O*9, M]
    b = w1.reshape(m, i * ka * ka2)  # [M, I*9]
    p = (a @ b).view(o, kb, kb2, i, ka, ka2)  # [O, b0, b1, I, a0, a1]
    out = torch.zeros(o, i, ka + kb - 1, ka2 + kb2 - 1, dtype=torch.float64)
    for y in range(kb):
        for x in range(kb2):
            out[:, :, y:y + ka, x:x + ka2] += p[:, y, x]
    return out


def tap_kernel(c1: Conv, c2: Conv) -> torch.Tensor:
    """Reference: 81 GEMMs W2[:,:,b] @ W1[:,:,a], one per tap pair."""
    w1, w2 = c1.weight.double(), c2.weight.double()
    o, i = w2.shape[0], w1.shape[1]
    ka, kb = w1.shape[2], w2.shape[2]
    out = torch.zeros(o, i, ka + kb - 1, ka + kb - 1, dtype=torch.float64)
    for by in range(kb):
        for bx in range(kb):
            w2b = w2[:, :, by, bx].contiguous()
            for ay in range(ka):
                for ax in range(ka):
                    out[:, :, ay + by, ax + bx] += w2b @ w1[:, :, ay, ax]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--channels", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--per-tap", action="store_true", help="also time the 81-GEMM reference (slow)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="256 channels, 2 repetitions")
    args = ap.parse_args()
    if args.quick:
        args.channels, args.reps = 256, 2
    torch.set_num_threads(args.threads)
    load_before = load()
    c = args.channels
    c1, c2 = make_pair(c)
    v = algebra.analyze(c1, c2)
    cand = v.candidate
    merged = algebra.merge(c1, c2, cand)
    flops = 2 * c**3 * 81  # multiply-adds of the channel contraction, counted as 2 flops
    sizes = [(5, 5), (6, 6), (12, 12)]  # the borders of the 5x5 and one size past them
    net = torch.nn.Sequential(torch.nn.Conv2d(c, c, 3, padding=2, bias=False), torch.nn.Conv2d(c, c, 3, padding=1))
    with torch.no_grad():
        net[0].weight.copy_(c1.weight)
        net[1].weight.copy_(c2.weight)
        net[1].bias.copy_(c2.bias)

    # correctness of the references (same float64 kernel up to summation order)
    ref = gemm_kernel(c1, c2)
    full = ref  # merged kernel of 3x3 pad2 -> 3x3 pad1 is the full 5x5 (no crop)
    diff_gemm = float((merged.weight - full).abs().max() / merged.weight.abs().max())
    diff_tap = float((merged.weight - tap_kernel(c1, c2)).abs().max() / merged.weight.abs().max()) if args.per_tap else None

    ga = c2.weight.permute(0, 2, 3, 1).reshape(-1, c).contiguous()
    gb = c1.weight.reshape(c, -1).contiguous()
    cases = [
        ("algebra.analyze", lambda: algebra.analyze(c1, c2), None),
        ("algebra.merge (batched float64 GEMM + index_add)", lambda: algebra.merge(c1, c2, cand), flops),
        ("floor: the bare float64 GEMM [O*9,M]@[M,I*9]", lambda: ga @ gb, flops),
        ("reference: one float64 GEMM + 81 slice adds", lambda: gemm_kernel(c1, c2), flops),
        ("reference: float32 conv_transpose (not exact)", lambda: torch.nn.functional.conv_transpose2d(
            c1.weight.float().transpose(0, 1), c2.weight.float().transpose(0, 1)).transpose(0, 1), flops),
        (f"algebra.chain_errors ({len(sizes)} sizes, narrowed)", lambda: algebra.chain_errors([c1, c2], [merged], sizes), None),
        ("api.fuse policy=all, float32 (trace+analyze+merge+verify+rebuild)",
         lambda: api.fuse(net, policy="all"), None),
        ("api.check policy=cheaper (trace+analyze: lazy, no merge built)", lambda: api.check(net, policy="cheaper"),
         None),
    ]
    if args.per_tap:
        cases.insert(3, ("reference: 81 float64 per-tap GEMMs", lambda: tap_kernel(c1, c2), flops))
    # interleave the cases rep by rep so machine noise hits all of them alike
    times: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    for _, fn, _ in cases:
        fn()  # warm-up
    for _ in range(args.reps):
        for name, fn, _ in cases:
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    rows, results = [], []
    for name, _, fl in cases:
        med = median(times[name])
        gfs = fl / med / 1e9 if fl else None
        rows.append([name, med * 1e3, min(times[name]) * 1e3, f"{gfs:.1f}" if gfs else ""])
        results.append({"case": name, "median_s": med, "min_s": min(times[name]), "times_s": times[name],
                        "gflops": gfs})
    kept = api.check(net, policy="cheaper")["summary"]["merged"]
    print(f"## merge_speed: {c}->{c} 3x3 pad 2 then {c}->{c} 3x3 pad 1 (float64, {args.threads} threads, "
          f"median of {args.reps}; load average before {load_before}, after {load()})\n")
    print(f"verdict: {v.verdict}; merged: {list(merged.spec.kernel_size)} kernel, padding {merged.spec.padding}; "
          f"contraction {c}^3*81 = {c**3 * 81 / 1e9:.2f} G MACs = {flops / 1e9:.1f} GFLOP; "
          f"verification sizes {sizes}; policy 'cheaper' keeps {kept} merge(s)\n")
    print(table(["step", "median ms", "min ms", "GFLOP/s"], rows))
    print(f"\nreference kernels vs algebra.merge: max relative difference one-GEMM {diff_gemm:.2g}, "
          f"per-tap {diff_tap if diff_tap is None else f'{diff_tap:.2g}'}")
    path = write_json(f"merge_speed_t{args.threads}.json", {"channels": c, "threads": args.threads, "reps": args.reps,
                                           "flop": flops, "verification_sizes": sizes, "results": results,
                                           "ref_diff_gemm": diff_gemm, "ref_diff_tap": diff_tap})
    print(f"\nwrote {path}\nreproduce: python benchmarks/merge_speed.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
