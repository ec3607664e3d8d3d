"""Structural re-parameterisation: convmerge against each repository's own `switch_to_deploy`.

For RepVGG, MobileOne, ACNet, RepLKNet and Diverse Branch Block, built from a local clone of the
repository (their code is not part of convmerge and is never copied into it), with random BN
statistics in float64:

- conv counts: the training form, the repository's deploy form, `convmerge.fuse` with `--policy all`
  and with `cheaper`;
- exactness: the largest error of the deploy form and of convmerge's fused module against the
  training form, relative to the output, float64, at two input sizes;
- time to fuse;
- float32 CPU inference at batch 1 and 16, one thread, side by side and interleaved: the training
  form, the deploy form and convmerge's (`cheaper`), in NCHW and channels-last, as ratios to the
  training form in NCHW.

    git clone https://github.com/DingXiaoH/RepVGG            repos/RepVGG
    git clone https://github.com/apple/ml-mobileone          repos/ml-mobileone
    git clone https://github.com/DingXiaoH/ACNet             repos/ACNet
    git clone https://github.com/DingXiaoH/RepLKNet-pytorch  repos/RepLKNet-pytorch
    git clone https://github.com/DingXiaoH/DiverseBranchBlock repos/DiverseBranchBlock
    python benchmarks/reparam.py --repos repos [--only RepVGG,MobileOne] [--batch 1,16 --size 224 --reps 5 --threads 1]

A repository missing from --repos is skipped with a note.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import importlib
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, median, table, write_json  # noqa: E402

import convmerge  # noqa: E402
from convmerge.frontends.modules import conv_calls  # noqa: E402

Built = tuple[nn.Module, nn.Module, int, int]  # training form, deploy form, input channels, native size


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking BN statistics and affine parameters (fresh ones are the identity, which hides bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.5)
    return model.eval()


def _on_path(repo: Path) -> None:
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))


def _deploy_each(model: nn.Module, method: str) -> nn.Module:
    deploy = copy.deepcopy(model)
    for m in list(deploy.modules()):
        if hasattr(m, method):
            getattr(m, method)()
    return deploy


def repvgg(repo: Path) -> Built:
    _on_path(repo)
    from repvgg import create_RepVGG_A0, repvgg_model_convert

    model = randomize(create_RepVGG_A0()).double()
    return model, repvgg_model_convert(copy.deepcopy(model)), 3, 224


def mobileone(repo: Path) -> Built:
    _on_path(repo)
    from mobileone import mobileone as build, reparameterize_model

    model = randomize(build(variant="s0")).double()
    return model, reparameterize_model(model), 3, 224


def acnet(repo: Path) -> Built:
    """ACNet ships blocks, not an ImageNet net: a small VGG-like stack of ACBlocks (3x3 + 1x3 + 3x1, each with BN)."""
    _on_path(repo)
    from acnet.acb import ACBlock

    layers: list[nn.Module] = []
    for cin, cout, stride in ((3, 32, 2), (32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2)):
        layers += [ACBlock(cin, cout, 3, stride=stride, padding=1), nn.ReLU()]
    model = randomize(nn.Sequential(*layers)).double()
    return model, _deploy_each(model, "switch_to_deploy"), 3, 224


def replknet(repo: Path) -> Built:
    """A small RepLKNet (kernels 31, 29, 27, 13 with 5x5 companions; channels 16..128)."""
    _on_path(repo)
    try:
        importlib.import_module("timm.models.layers")
    except ImportError:  # RepLKNet imports timm only for DropPath, the identity at inference
        timm, models, layers = (types.ModuleType(n) for n in ("timm", "timm.models", "timm.models.layers"))
        layers.DropPath = lambda p=0.0: nn.Identity()  # type: ignore[attr-defined]
        sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers})
    import replknet as lk

    model = lk.RepLKNet(large_kernel_sizes=[31, 29, 27, 13], layers=[1, 1, 2, 1], channels=[16, 32, 64, 128],
                        drop_path_rate=0.0, small_kernel=5, num_classes=10, use_sync_bn=False)
    model = randomize(model).double()
    deploy = copy.deepcopy(model)
    deploy.structural_reparam()
    return model, deploy, 3, 224


def dbb(repo: Path) -> Built:
    """DBB's ResNet-18 (every k x k conv a Diverse Branch Block), its identity-init 1x1 perturbed."""
    _on_path(repo)
    import convnet_utils

    convnet_utils.switch_conv_bn_impl("DBB")
    convnet_utils.switch_deploy_flag(False)
    model = randomize(convnet_utils.build_model("ResNet-18")).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "idconv1" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model, _deploy_each(model, "switch_to_deploy"), 3, 224


NETS: dict[str, tuple[str, Callable[[Path], Built]]] = {
    "RepVGG": ("RepVGG", repvgg), "MobileOne": ("ml-mobileone", mobileone), "ACNet": ("ACNet", acnet),
    "RepLKNet": ("RepLKNet-pytorch", replknet), "DBB": ("DiverseBranchBlock", dbb),
}


def error(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        want = a(x)
        return float((b(x) - want).abs().max() / want.abs().max())


def speeds(models: dict[str, nn.Module], x: torch.Tensor, reps: int) -> dict[str, float]:
    """Median seconds per forward, every model and layout timed in turn within each repetition."""
    runs: dict[str, tuple[nn.Module, torch.Tensor]] = {}
    for name, model in models.items():
        model = copy.deepcopy(model).float().eval()
        runs[f"{name} NCHW"] = (model, x)
        runs[f"{name} channels-last"] = (model.to(memory_format=torch.channels_last),
                                         x.contiguous(memory_format=torch.channels_last))
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.no_grad():
        for model, inp in runs.values():
            model(inp)  # warm-up
        for _ in range(reps):
            for key, (model, inp) in runs.items():
                t = time.perf_counter()
                model(inp)
                times[key].append(time.perf_counter() - t)
    return {k: median(v) for k, v in times.items()}


def measure(name: str, built: Built, batches: list[int], size: int, reps: int) -> dict[str, Any]:
    model, deploy, channels, _ = built
    t = time.perf_counter()
    fused = convmerge.fuse(model, policy="all", input_size=(size, size))
    fuse_s = time.perf_counter() - t
    cheaper = convmerge.fuse(model, policy="cheaper", input_size=(size, size))
    torch.manual_seed(1)
    xs = [torch.randn(2, channels, s, s, dtype=torch.float64) for s in (size, size - 31)]
    row: dict[str, Any] = {
        "net": name, "convs": conv_calls(model), "deploy": conv_calls(deploy), "all": conv_calls(fused), "cheaper": conv_calls(cheaper),
        "deploy_error": max(error(model, deploy, x) for x in xs),
        "convmerge_error": max(max(error(model, fused, x), error(model, cheaper, x)) for x in xs),
        "fuse_s": fuse_s,
    }
    row["speed"] = {b: speeds({"original": model, "deploy": deploy, "convmerge": cheaper},
                              torch.randn(b, channels, size, size), reps) for b in batches}
    return row


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repos", type=Path, required=True, help="folder holding clones of the repositories")
    parser.add_argument("--only", default=",".join(NETS), help="comma-separated: " + ",".join(NETS))
    parser.add_argument("--batch", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for inference")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's own, on copying a GraphModule
    batches = [int(b) for b in args.batch.split(",")]
    rows = []
    for name in args.only.split(","):
        folder, build = NETS[name]
        repo = args.repos / folder
        if not repo.is_dir():
            print(f"skipped {name}: no clone at {repo}")
            continue
        torch.set_num_threads(args.threads)
        with contextlib.redirect_stdout(io.StringIO()):  # the repositories print every block they build
            built = build(repo)
        rows.append(measure(name, built, batches, args.size, args.reps))
        print(f"{name}: done", file=sys.stderr)
    info = machine()
    print(f"\nconv counts and exactness (float64; error relative to the output, max over sizes {args.size} and "
          f"{args.size - 31}); load {info['loadavg']}\n")
    print(table(["net", "convs (train)", "repo deploy", "convmerge all", "convmerge cheaper", "repo deploy error",
                 "convmerge error", "fuse (s)"],
                [[r["net"], r["convs"], r["deploy"], r["all"], r["cheaper"], f"{r['deploy_error']:.1e}",
                  f"{r['convmerge_error']:.1e}", f"{r['fuse_s']:.1f}"] for r in rows]))
    print(f"\nfloat32 inference at {args.size}x{args.size}, {args.threads} thread(s), median of {args.reps}: "
          "time of the training form in NCHW / time of each (higher is faster)\n")
    keys = ["original channels-last", "deploy NCHW", "deploy channels-last", "convmerge NCHW", "convmerge channels-last"]
    print(table(["net", "batch", "original NCHW (ms)", *keys],
                [[r["net"], b, f"{r['speed'][b]['original NCHW'] * 1e3:.0f}",
                  *(f"{r['speed'][b]['original NCHW'] / r['speed'][b][k]:.2f}x" for k in keys)]
                 for r in rows for b in batches]))
    print(f"\nreproduce: python benchmarks/reparam.py --repos {args.repos} --only {args.only} "
          f"--batch {args.batch} --size {args.size} --reps {args.reps} --threads {args.threads}")
    write_json("reparam.json", {"args": vars(args) | {"repos": str(args.repos)}, "rows": rows})


if __name__ == "__main__":
    main()
