"""`convmerge fuse model.onnx` against `onnxslim model.onnx out.onnx`: wall time and peak memory, side by side.

Issue 21, goal 4: fuse within 2x of onnxslim's time on the same file, peak memory no more than onnxslim's.
The nets are timm's RepVGG-A0 and RepVGG-B1 in their training form (3x3, 1x1 and identity branches; random
weights, randomised BN statistics), exported with PyTorch's TorchScript exporter (`dynamo=False`, opset 17,
input 1x3x224x224, default constant folding, so each branch's BN is folded into its conv and the identity
branch stays a BatchNormalization); B1 is saved with its weights as external data (about 230 MB), A0 inline.

Both tools run as subprocesses, as a user runs them (imports included), alternated: each repetition runs
convmerge then onnxslim on one net, then the next net.  Wall time is measured around the subprocess; CPU
time (user + system, which a shared machine's load inflates less) and peak memory (the child's own maximum
resident set) come from os.wait4's rusage, so one child's peak never hides another's (Linux starts a
child's count at its parent's peak when it execs, so the nets are built in a separate process and this one
never imports torch).  The ratios are convmerge / onnxslim of the medians.
onnxslim's output is its default (inline weights); convmerge's keeps B1's weights external, as its input has them.

    python benchmarks/onnx_fuse_speed.py [--reps 3] [--nets repvgg_a0,repvgg_b1]

Needs timm and onnxslim (benchmarks/requirements.txt; benchmark-only, convmerge imports neither).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load, machine, median, out_dir, table, write_json  # noqa: E402

NETS = {"repvgg_a0": False, "repvgg_b1": True}
"""timm name: saved with external data."""
ROOT = Path(__file__).resolve().parent.parent


def build(net: str, path: Path, external: bool) -> Path:
    """The training-form net exported to ONNX (external data: `<name>.data` beside it)."""
    import onnx
    import torch

    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import timm

    torch.manual_seed(0)
    module = timm.create_model(net, pretrained=False).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(1, 3, 224, 224),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"])
    if external:
        proto = onnx.load(str(path))
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data")
    return path


def run(command: list[str]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + system) and peak RSS in bytes of one child."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    err = child.stderr.read().decode(errors="replace") if child.stderr else ""
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({child.returncode}):\n{err[-2000:]}")
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * scale


def commands(src: Path, folder: Path) -> dict[str, list[str]]:
    slim = shutil.which("onnxslim")
    return {
        "convmerge": [sys.executable, "-m", "convmerge.cli", "fuse", str(src), "-o",
                      str(folder / (src.stem + ".fused.onnx")), "--force", "--quiet"],
        "onnxslim": [slim, str(src), str(folder / (src.stem + ".slim.onnx"))] if slim else
                    [sys.executable, "-m", "onnxslim", str(src), str(folder / (src.stem + ".slim.onnx"))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--nets", default=",".join(NETS))
    parser.add_argument("--keep", action="store_true", help="keep the exported models in benchmarks/out/onnx_fuse")
    parser.add_argument("--build", nargs=2, metavar=("NET", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        build(args.build[0], Path(args.build[1]), NETS[args.build[0]])
        return
    nets = args.nets.split(",")
    folder = out_dir() / "onnx_fuse"
    folder.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"reps": args.reps, "nets": {}}
    loads = [load()]
    try:
        sources = {}
        for net in nets:  # in a child: a forked child's ru_maxrss starts at its parent's peak, so this one stays small
            sources[net] = folder / f"{net}.onnx"
            subprocess.run([sys.executable, __file__, "--build", net, str(sources[net])], check=True)
        samples: dict[str, dict[str, list[tuple[float, float, int]]]] = {n: {"convmerge": [], "onnxslim": []}
                                                                          for n in nets}
        for _ in range(args.reps):
            for net in nets:
                for tool, command in commands(sources[net], folder).items():
                    samples[net][tool].append(run(command))
            loads.append(load())
        rows = []
        for net in nets:
            got = {tool: (median([s for s, _, _ in v]), median([c for _, c, _ in v]), max(p for _, _, p in v))
                   for tool, v in samples[net].items()}
            (cm_s, cm_c, cm_m), (sl_s, sl_c, sl_m) = got["convmerge"], got["onnxslim"]
            size = sum(p.stat().st_size for p in folder.glob(f"{net}.onnx*"))
            rows.append([net, f"{size / 1e6:.0f} MB" + (" (external)" if NETS[net] else ""), f"{cm_s:.2f}",
                         f"{sl_s:.2f}", f"{cm_s / sl_s:.2f}x", f"{cm_c:.2f} / {sl_c:.2f} = {cm_c / sl_c:.2f}x",
                         f"{cm_m / 2**20:.0f}", f"{sl_m / 2**20:.0f}",
                         f"{cm_m / sl_m:.2f}x"])
            results["nets"][net] = {"samples": samples[net], "ratio_time": cm_s / sl_s, "ratio_cpu": cm_c / sl_c,
                                    "ratio_peak": cm_m / sl_m}
        print(f"\n### convmerge fuse vs onnxslim (median of {args.reps}; peak RSS: the largest of the runs; "
              f"load {', '.join(loads)})\n")
        print(table(["net", "input", "convmerge s", "onnxslim s", "time ratio", "CPU s: convmerge / onnxslim",
                     "convmerge MiB", "onnxslim MiB",
                     "peak ratio"], rows))
        results["loads"] = loads
        print(f"\n{machine()}\ncommand: python benchmarks/onnx_fuse_speed.py --reps {args.reps} --nets {args.nets}")
        print(f"wrote {write_json('onnx_fuse_speed.json', results)}")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
