"""The real-model path (issue 21): `convmerge.fuse` / `convmerge.check` on timm's re-parameterisable nets,
side by side with one `torch.export.export` of the same net (at the example's fixed shape, and `sym_export`: at
symbolic batch and spatial sizes, the export `fuse` itself runs so that its module runs at any size) and timm's
own `reparameterize_model`.

Random weights, randomised batch-norm statistics, eval mode. The cases are interleaved (each rep runs
every measure once, in turn, after one round that warms up and is not kept) and each net's numbers are
medians of the reps; the ratios (fuse / export, fuse / timm) come from the same run. `fuse` includes its end-to-end check of the returned
module. Wall and CPU time (this process's user + system, which a shared machine's load inflates less; with
`--threads 1` it is the work done) are both reported. `--profile NET` runs `fuse` once under cProfile instead and
prints where the time goes.

    pip install -r benchmarks/requirements.txt
    python benchmarks/timm_speed.py --size 64 --reps 3 [--nets repvgg_a0,mobileone_s0] [--check]
    python benchmarks/timm_speed.py --profile repvgg_a0 --size 64

timm (and torchvision, which it imports) are benchmark-only: convmerge never imports them.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import pstats
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, median, table, write_json  # noqa: E402

import convmerge  # noqa: E402

NETS = ["repvgg_a0", "mobileone_s0", "fastvit_t8", "repvit_m0_9", "repghostnet_050", "efficientvit_m0"]


def timm() -> Any:
    """timm, imported without torchvision's meta registrations (they fail with some torch builds)."""
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import timm as found

    return found


def randomize_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    """Batch norms with trained-looking statistics (fresh ones are the identity, which hides bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.randn(m.num_features, generator=gen))
                    m.bias.copy_(torch.randn(m.num_features, generator=gen))
    return module.eval()


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(timm().create_model(name, pretrained=False))


def measures(net: nn.Module, size: int, check: bool) -> dict[str, Callable[[], Any]]:
    reparameterize = timm().utils.model.reparameterize_model
    example = (torch.randn(1, 3, size, size),)

    def export() -> Any:
        return torch.export.export(net, example, strict=False)

    def symbolic() -> Any:  # at symbolic batch and spatial sizes, as fuse exports (its module runs at any size)
        from convmerge.frontends.trace_export import generic_sizes, symbolic_example

        batch, dims = symbolic_example(example)
        with generic_sizes():
            return torch.export.export(net, batch, dynamic_shapes=dims, strict=False)

    found = {
        "fuse": lambda: convmerge.fuse(net, input_size=(size, size)),
        "export": export,
        "sym_export": symbolic,
        "timm": lambda: reparameterize(copy.deepcopy(net)),
    }
    if check:
        found["check"] = lambda: convmerge.check(net, input_size=(size, size))
    return found


def run(names: list[str], size: int, reps: int, check: bool) -> list[dict[str, Any]]:
    results = []
    for name in names:
        net = build(name)
        cases = measures(net, size, check)
        times: dict[str, list[float]] = {k: [] for k in cases}
        cpu: dict[str, list[float]] = {k: [] for k in cases}
        for rep in range(reps + 1):  # the first round warms up (lazy imports, torch's first export) and is not kept
            for key, fn in cases.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fn()
                if rep:
                    times[key].append(time.perf_counter() - start)
                    cpu[key].append(time.process_time() - start_cpu)
        row = {"net": name, "size": size, **{k: median(v) for k, v in times.items()},
               **{f"{k}_cpu": median(v) for k, v in cpu.items()}, "all": times, "all_cpu": cpu}
        print(f"{name} @{size}: " + ", ".join(f"{k} {median(v):.2f} s" for k, v in times.items()) + " (CPU: "
              + ", ".join(f"{k} {median(v):.2f} s" for k, v in cpu.items()) + ")", flush=True)
        results.append(row)
    return results


def profile(name: str, size: int, top: int) -> None:
    net = build(name)
    profiler = cProfile.Profile()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        profiler.enable()
        convmerge.fuse(net, input_size=(size, size))
        profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).sort_stats("cumulative")
    stats.print_stats(r"convmerge|torch/export/__init__|_trace\.py.*\(_export|exported_program.*run_decomp", top)
    print(out.getvalue())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default=",".join(NETS))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--check", action="store_true", help="also time convmerge.check")
    parser.add_argument("--profile", metavar="NET", help="profile one fuse of NET instead")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.profile:
        profile(args.profile, args.size, args.top)
        return
    rows = run(args.nets.split(","), args.size, args.reps, args.check)
    keys = [k for k in ("fuse", "check", "export", "sym_export", "timm") if k in rows[0]]
    print(f"\n{args.size}x{args.size}, median of {args.reps}, load {machine()['loadavg']}\n")
    ratios = [("fuse/export", "fuse", "export"), ("fuse/sym_export", "fuse", "sym_export"), ("fuse/timm", "fuse", "timm")]
    if args.check:
        ratios += [("check/export", "check", "export")]
    print(table(["net", *(f"{k} s" for k in keys), *(r[0] for r in ratios)],
                [[r["net"], *(r[k] for k in keys), *(r[a] / r[b] for _, a, b in ratios)] for r in rows]))
    for label, a, b in ratios:
        print(f"median {label}: {median([r[a] / r[b] for r in rows]):.1f}")
    print("\nCPU time (user + system of this process: the load inflates it less; with --threads 1 it is the work)\n")
    print(table(["net", *(f"{k} CPU s" for k in keys), *(r[0] for r in ratios)],
                [[r["net"], *(r[f"{k}_cpu"] for k in keys), *(r[f"{a}_cpu"] / r[f"{b}_cpu"] for _, a, b in ratios)]
                 for r in rows]))
    for label, a, b in ratios:
        print(f"median {label} (CPU): {median([r[f'{a}_cpu'] / r[f'{b}_cpu'] for r in rows]):.1f}")
    print(f"\ncommand: python benchmarks/timm_speed.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    write_json(f"timm_speed_{args.size}.json", {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
