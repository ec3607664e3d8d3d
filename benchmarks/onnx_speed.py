"""ONNX in, ONNX out: node count and onnxruntime CPU latency before and after `convmerge fuse model.onnx`.

Two nets, exported with PyTorch's TorchScript exporter (`dynamo=False`, default constant folding, so
each conv's batch norm is already folded into it, as a deployment export has it; batch axis
symbolic, spatial size static):

  repvgg_a0   RepVGG-A0's training form (stage depths 1, 2, 4, 14, 1; widths 48, 48, 96, 192, 1280;
              3x3+BN, 1x1+BN and, where shapes allow, a BN skip per block, summed, ReLU), then global
              pooling and a 1000-way linear layer; input 3x224x224
  expandnet   ExpandNets (CL): a stem 3x3 s2, then per stage one 3x3 expanded linearly into
              1x1 c->4c, 3x3 4c->4c, 1x1 4c->c' (no nonlinearity inside), ReLU; input 3x128x128

Variants: the export as it is, onnxslim's output (where `onnxslim` is installed), convmerge's output
(`convmerge.model.fuse_file`, policy cheaper), and onnxslim then convmerge.  Latency: onnxruntime's
CPUExecutionProvider with its default graph optimisations (ORT_ENABLE_ALL, which already folds
conv+BN and conv+add+activation patterns) and one intra-op thread, at batch 1 and 16, interleaved
(each repetition runs every variant once, in a rotating order), median over repetitions; the largest
output difference from the original is printed beside each variant.

    python benchmarks/onnx_speed.py [--reps 7] [--nets repvgg_a0,expandnet] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load, median, out_dir, table, write_json  # noqa: E402

from convmerge import model as cm_model  # noqa: E402


# --- the nets ------------------------------------------------------------------------------------


class RepVGGBlock(nn.Module):
    """3x3+BN, 1x1+BN and (stride 1, same width) a BN of the input, summed, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))
        self.point = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, bias=False), nn.BatchNorm2d(cout))
        self.skip = nn.BatchNorm2d(cin) if stride == 1 and cin == cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dense(x) + self.point(x)
        if self.skip is not None:
            y = y + self.skip(x)
        return torch.relu(y)


def repvgg_a0() -> nn.Module:
    widths, depths = (48, 48, 96, 192, 1280), (1, 2, 4, 14, 1)
    blocks: list[nn.Module] = []
    cin = 3
    for width, depth in zip(widths, depths):
        for i in range(depth):
            blocks.append(RepVGGBlock(cin, width, 2 if i == 0 else 1))
            cin = width
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000))


def expandnet(widths: tuple[int, ...] = (32, 64, 128), r: int = 4) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, 2, 1), nn.ReLU()]
    cin = widths[0]
    for width in widths:
        layers += [nn.Conv2d(cin, r * cin, 1, bias=False), nn.Conv2d(r * cin, r * cin, 3, 2, 1, bias=False),
                   nn.Conv2d(r * cin, width, 1), nn.ReLU()]
        cin = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10))


NETS: dict[str, tuple[Callable[[], nn.Module], tuple[int, int, int]]] = {
    "repvgg_a0": (repvgg_a0, (3, 224, 224)),
    "expandnet": (expandnet, (3, 128, 128)),
}


def randomized(module: nn.Module) -> nn.Module:
    """Batch norms with non-trivial statistics (a freshly built one is the identity)."""
    gen = torch.Generator().manual_seed(0)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return module.eval()


def export(module: nn.Module, shape: tuple[int, int, int], path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(1, *shape),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    return path


# --- variants --------------------------------------------------------------------------------------


def slim(src: Path, dst: Path) -> bool:
    try:
        import onnxslim
    except ImportError:
        return False
    onnx.save(onnxslim.slim(onnx.load(str(src))), str(dst))
    return True


def fuse(src: Path, dst: Path) -> tuple[float, dict[str, Any]]:
    start = time.perf_counter()
    report = cm_model.fuse_file(str(src), str(dst), force=True).to_dict()
    return time.perf_counter() - start, report


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def latency(sessions: dict[str, ort.InferenceSession], x: np.ndarray, reps: int) -> dict[str, float]:
    """Median seconds per run, interleaved; each sample the mean of enough runs to last ~50 ms."""
    calls = {}
    for name, s in sessions.items():
        s.run(None, {"x": x})  # warm-up
        start = time.perf_counter()
        s.run(None, {"x": x})
        calls[name] = max(1, int(0.05 / max(time.perf_counter() - start, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    names = list(sessions)
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            start = time.perf_counter()
            for _ in range(calls[name]):
                sessions[name].run(None, {"x": x})
            samples[name].append((time.perf_counter() - start) / calls[name])
    return {name: median(v) for name, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--nets", default=",".join(NETS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", default="1,16")
    args = parser.parse_args()
    folder = out_dir() / "onnx_speed"
    folder.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]
    results: dict[str, Any] = {"reps": args.reps, "threads": args.threads, "ort": ort.__version__,
                               "onnx": onnx.__version__, "nets": {}}
    slim_ok = True
    try:
        for net in args.nets.split(","):
            make, shape = NETS[net]
            torch.manual_seed(0)
            original = export(randomized(make()), shape, folder / f"{net}.onnx")
            paths = {"original": original}
            if slim(original, folder / f"{net}.slim.onnx"):
                paths["onnxslim"] = folder / f"{net}.slim.onnx"
            else:
                slim_ok = False
            seconds, report = fuse(original, folder / f"{net}.fused.onnx")
            paths["convmerge"] = folder / f"{net}.fused.onnx"
            fuse_times = {"convmerge": seconds}
            if "onnxslim" in paths:
                fuse_times["onnxslim+convmerge"], _ = fuse(paths["onnxslim"], folder / f"{net}.slim.fused.onnx")
                paths["onnxslim+convmerge"] = folder / f"{net}.slim.fused.onnx"
            sessions = {name: session(p, args.threads) for name, p in paths.items()}
            x1 = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
            want = sessions["original"].run(None, {"x": x1})[0]
            rows, data = [], {}
            timings = {b: latency(sessions, np.random.default_rng(b).standard_normal((b, *shape)).astype(np.float32),
                                  args.reps) for b in batches}
            for name, p in paths.items():
                got = sessions[name].run(None, {"x": x1})[0]
                diff = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
                nodes = onnx.load(str(p), load_external_data=False).graph.node
                convs = sum(n.op_type == "Conv" for n in nodes)
                lat = {b: timings[b][name] for b in batches}
                base = {b: timings[b]["original"] for b in batches}
                rows.append([name, len(nodes), convs] + [f"{lat[b] * 1e3:.2f} ({base[b] / lat[b]:.2f}x)" for b in batches]
                            + [f"{diff:.1e}", f"{fuse_times[name]:.1f}" if name in fuse_times else ""])
                data[name] = {"nodes": len(nodes), "convs": convs, "latency_s": lat, "relative_difference": diff,
                              "fuse_s": fuse_times.get(name)}
            print(f"\n### {net} (input {'x'.join(map(str, shape))}, {args.threads} thread(s), load {load()})\n")
            print(table(["variant", "nodes", "Conv nodes"] + [f"batch {b}: ms (speedup)" for b in batches]
                        + ["max rel. diff", "fuse s"], rows))
            print(f"\nconvmerge: {report['summary']['regions_merged']} region(s) merged, convs "
                  f"{report['summary']['convs_before']} -> {report['summary']['convs_after']}; "
                  f"{report['notes'][-1] if report['notes'] else ''}")
            results["nets"][net] = data
        if not slim_ok:
            print("\nonnxslim is not installed (pip install onnxslim): its columns are left out")
        print(f"\nwrote {write_json('onnx_speed.json', results)}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
