"""Does merging make CPU inference faster, and does the 'cheaper' policy (spec.cost) choose well?

For seven small nets (each a few blocks with an activation after every block, input [B, C, 56, 56]:
the channels each net takes at the resolution of a ResNet's first stage), times CPU inference
(eval, torch.no_grad, float32, torch.set_num_threads(2)) at batch 1 and 16 of

  original | convmerge.fuse(net, input_size=(56, 56), policy='cheaper') | ... policy='all'
  (and, for the CP net, 'dw pair only': only the two depthwise convs merged, by fusing that slice;
  for nets with batch norms, 'torch.fx fuse (conv-BN)': PyTorch's own conv -> BN folding
  (torch.fx.experimental.optimization.fuse), the reference for what folding alone gives;
  with --channels-last, also the original and 'cheaper' run in channels-last memory format, module
  and input, in the same interleaved run)

interleaved (every repetition runs every variant once, in a rotating order; a sample is the mean
over enough calls to last ~30 ms); the speedup is the median over repetitions of the ratio of
the original's and the variant's samples in the same repetition, so load from other processes
on this shared machine hits both sides of each ratio alike. Next to each speedup it prints
the MAC ratio (whole net, counted with forward hooks: output positions x C_out x C_in/groups x
prod(k) per conv), so the two can be compared, and the ratio under the library's own cost
model (spec.cost, the sum over the variant's convs, per image). Finally it times every distinct conv layer in
isolation and fits  t = t0 + MACs / R_kind + bytes / BW  (kind: dense kxk, pointwise 1x1,
depthwise; bytes: input + output activations + weights, float32) to propose a cost model.

    python benchmarks/model_speed.py [--reps 11] [--batches 1,16] [--channels-last]
                                     [--nets expandnet,tucker,cp,vgg_bn,dwsep,repvgg,mobilenet]
    python benchmarks/model_speed.py --quick        # expandnet and repvgg, batch 16, 3 repetitions
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load, median, table, write_json  # noqa: E402

import convmerge.api as convmerge  # noqa: E402
from convmerge.frontends.modules import spec_of  # noqa: E402
from convmerge.maths.spec import cost as spec_cost  # noqa: E402

SIZE = 56


# --- the nets ------------------------------------------------------------------------------------


def expandnet(c: int = 32, r: int = 4, blocks: int = 2) -> nn.Module:
    """ExpandNets: a 3x3 c->c conv expanded linearly into 1x1 c->rc, 3x3 rc->rc, 1x1 rc->c."""
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Conv2d(c, r * c, 1, bias=False), nn.Conv2d(r * c, r * c, 3, padding=1, bias=False),
                   nn.Conv2d(r * c, c, 1), nn.ReLU()]
    return nn.Sequential(*layers)


def tucker(c: int = 128, rank: int = 32, blocks: int = 3) -> nn.Module:
    """Tucker-2 decomposed 3x3 c->c: 1x1 reduce c->rank, 3x3 core rank->rank, 1x1 restore rank->c."""
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Conv2d(c, rank, 1, bias=False), nn.Conv2d(rank, rank, 3, padding=1, bias=False),
                   nn.Conv2d(rank, c, 1), nn.ReLU()]
    return nn.Sequential(*layers)


def cp(c: int = 64, rank: int = 32, k: int = 3, blocks: int = 3) -> nn.Module:
    """CP decomposed kxk c->c: 1x1 c->R, kx1 depthwise, 1xk depthwise, 1x1 R->c."""
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Sequential(
            nn.Conv2d(c, rank, 1, bias=False),
            nn.Conv2d(rank, rank, (k, 1), padding=(k // 2, 0), groups=rank, bias=False),
            nn.Conv2d(rank, rank, (1, k), padding=(0, k // 2), groups=rank, bias=False),
            nn.Conv2d(rank, c, 1)), nn.ReLU()]
    return nn.Sequential(*layers)


def vgg(c: int = 64, blocks: int = 3) -> nn.Module:
    """VGG-like pairs with a batch norm between: 3x3 pad 1 -> BN -> 3x3 pad 0 -> BN -> ReLU.

    (With pad 1 on the second conv the BN shift leaks at its zero padding: unmergeable; see the
    verdict line printed for `vgg_pad1`.)
    """
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=0),
                   nn.BatchNorm2d(c), nn.ReLU()]
    return nn.Sequential(*layers)


def vgg_pad1(c: int = 64, blocks: int = 1) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers)


def dwsep(c: int = 64, blocks: int = 3) -> nn.Module:
    """Depthwise-separable (linear, as in a MobileNetV2 projection): depthwise 3x3 -> pointwise 1x1."""
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.Conv2d(c, c, 1), nn.ReLU()]
    return nn.Sequential(*layers)


class RepVGGBlock(nn.Module):
    """A RepVGG training-time block: 3x3 conv + BN, 1x1 conv + BN and a BN identity, summed, then ReLU
    (a region with parallel branches: one 3x3 conv once merged)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.point = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.ident = nn.BatchNorm2d(c)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x) + self.point(x) + self.ident(x))


def repvgg(c: int = 64, blocks: int = 3) -> nn.Module:
    return nn.Sequential(*[RepVGGBlock(c) for _ in range(blocks)])


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand + BN + ReLU6, depthwise 3x3 + BN + ReLU6, 1x1 project + BN (linear), and
    the input added where the shapes allow (so a residual add comes right before the next block's conv)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand: int = 6) -> None:
        super().__init__()
        wide = cin * expand
        self.residual = stride == 1 and cin == cout
        self.body = nn.Sequential(
            nn.Conv2d(cin, wide, 1, bias=False), nn.BatchNorm2d(wide), nn.ReLU6(inplace=True),
            nn.Conv2d(wide, wide, 3, stride, 1, groups=wide, bias=False), nn.BatchNorm2d(wide), nn.ReLU6(inplace=True),
            nn.Conv2d(wide, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


def mobilenet(c: int = 24) -> nn.Module:
    return nn.Sequential(InvertedResidual(c, c), InvertedResidual(c, 32, stride=2), InvertedResidual(32, 32),
                         InvertedResidual(32, 32))


NETS: dict[str, tuple[Callable[[], nn.Module], int, str]] = {
    "expandnet": (expandnet, 32, "1x1 32->128, 3x3 128->128, 1x1 128->32; x2"),
    "tucker": (tucker, 128, "1x1 128->32, 3x3 32->32, 1x1 32->128; x3"),
    "cp": (cp, 64, "1x1 64->32, 3x1 dw, 1x3 dw, 1x1 32->64; x3"),
    "vgg_bn": (vgg, 64, "3x3 p1 64->64, BN, 3x3 p0 64->64, BN; x3"),
    "dwsep": (dwsep, 64, "dw 3x3 64, 1x1 64->64; x3"),
    "repvgg": (repvgg, 64, "RepVGG block: 3x3+BN | 1x1+BN | BN, summed, ReLU; 64 channels; x3"),
    "mobilenet": (mobilenet, 24, "MobileNetV2 inverted residuals (expand 6, ReLU6 in place): 24, 24->32 s2, 32, 32"),
}


def init(net: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.1)
                m.bias.normal_(0, 0.1)
    return net.eval()


def fuse_slices(net: nn.Module, path: str, start: int, stop: int) -> nn.Module:
    """A copy of net where, in every nn.Sequential at `path`-like positions, modules[start:stop] are merged."""
    out = copy.deepcopy(net)
    for m in out.modules():
        if isinstance(m, nn.Sequential) and len(m) == 4 and all(isinstance(x, nn.Conv2d) for x in m):
            sub = nn.Sequential(*[m[i] for i in range(start, stop)])
            m[start] = convmerge.fuse(sub, input_size=(SIZE, SIZE), policy="all")
            for i in range(start + 1, stop):
                m[i] = nn.Identity()
    return out.eval()


def picks(report: dict[str, Any], nconv: int, nconv_orig: int) -> str:
    """What a policy merged, in a few words."""
    merges = report["merges"]
    if not merges:
        return "nothing"
    first = "+".join(merges[0]["layers"])
    more = f" and {len(merges) - 1} more like it" if len(merges) > 1 else ""
    return f"{len(merges)} merge(s): {first}{more} ({nconv_orig} -> {nconv} convs)"


# --- counting and timing ---------------------------------------------------------------------------


def conv_layers(net: nn.Module, x: torch.Tensor) -> list[dict[str, Any]]:
    """Each conv run by net(x), as an nn.Conv2d with its weights, input shape and MACs per image.

    Convs are seen where they run (`aten.convolution`), not as modules: in a fused GraphModule the convs
    left alone are calls of the exported graph, and only the merged ones are modules."""
    calls: list[tuple[Any, ...]] = []

    class Seen(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.convolution.default and args[1].dim() == 4 and not args[6]:
                inp, w, b, stride, padding, dilation, _, _, groups = args
                calls.append((tuple(inp.shape), tuple(out.shape), w.detach().clone(),
                              None if b is None else b.detach().clone(), stride, padding, dilation, groups))
            return out

    with torch.no_grad(), Seen():
        net(x)
    found: list[dict[str, Any]] = []
    for in_shape, out_shape, w, b, stride, padding, dilation, groups in calls:
        mod = nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=tuple(stride),
                        padding=tuple(padding), dilation=tuple(dilation), groups=groups, bias=b is not None)
        with torch.no_grad():
            mod.weight.copy_(w)
            if b is not None:
                mod.bias.copy_(b)
        macs = math.prod(out_shape[1:]) * (mod.in_channels // groups) * math.prod(mod.kernel_size)
        found.append({"module": mod, "in_shape": in_shape, "out_shape": out_shape, "macs": macs,
                      "cost": spec_cost(spec_of(mod), in_shape[2:], 4)})
    return found


def per_call(fn: Callable[[], Any], target: float = 0.05) -> int:
    """Calls per sample so that one sample lasts ~target s (calibrated on the fastest of 3 calls).

    Under contention a single slow calibration call would leave a fast variant at 1-2 calls per
    sample, and every sample would then pay the wake-up of torch's idle worker threads.
    """
    dts = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        dts.append(time.perf_counter() - t)
    return max(1, round(target / max(min(dts), 1e-6)))


def interleaved(fns: dict[str, Callable[[], Any]], reps: int, target: float = 0.05) -> dict[str, list[float]]:
    """Seconds per call of each fn: reps samples, each the mean over enough calls to last ~target s."""
    for fn in fns.values():
        fn()
        fn()
    inner = {k: per_call(fn, target) for k, fn in fns.items()}
    out: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for r in range(reps):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:  # rotate the order each repetition
            fn = fns[k]
            t = time.perf_counter()
            for _ in range(inner[k]):
                fn()
            out[k].append((time.perf_counter() - t) / inner[k])
    return out


def kind(mod: nn.Conv2d) -> str:
    if mod.groups == mod.in_channels and mod.groups > 1:
        return "depthwise"
    if math.prod(mod.kernel_size) == 1:
        return "pointwise"
    return "dense"


# --- main ------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nets", default=",".join(NETS))
    ap.add_argument("--channels-last", action="store_true", help="also run original and 'cheaper' channels-last")
    ap.add_argument("--quick", action="store_true", help="--nets expandnet,repvgg --batches 16 --reps 3")
    args = ap.parse_args()
    if args.quick:
        args.nets, args.batches, args.reps = "expandnet,repvgg", "16", 3
    torch.set_num_threads(args.threads)
    load_before = load()
    batches = [int(b) for b in args.batches.split(",")]
    results: list[dict[str, Any]] = []
    layer_samples: list[dict[str, Any]] = []
    seen_layers: set[tuple] = set()
    verdict_lines = []
    choices: list[dict[str, Any]] = []
    for name in args.nets.split(","):
        build, ch, desc = NETS[name]
        net = init(build())
        t = time.perf_counter()
        variants = {"original": net}
        for policy in ("cheaper", "all"):
            variants[policy] = convmerge.fuse(net, input_size=(SIZE, SIZE), policy=policy)  # exported: no .eval()
        if name == "cp":
            variants["dw pair only"] = fuse_slices(net, "", 1, 3)
        if any(isinstance(m, nn.BatchNorm2d) for m in net.modules()):
            from torch.fx.experimental.optimization import fuse as fx_fuse  # its import warns about torch.jit

            variants["torch.fx fuse (conv-BN)"] = fx_fuse(copy.deepcopy(net))  # PyTorch's own conv -> BN folding
        if args.channels_last:
            for k in ("original", "cheaper"):
                variants[f"{k}, channels-last"] = copy.deepcopy(variants[k]).to(memory_format=torch.channels_last)
        fuse_s = time.perf_counter() - t
        rep = convmerge.check(net, input_size=(SIZE, SIZE), policy="cheaper")
        merges_cheaper = len(rep["merges"])  # pairs, regions and batch-norm folds
        merges_all = len(convmerge.check(net, input_size=(SIZE, SIZE), policy="all")["merges"])
        unchanged = {"cheaper": merges_cheaper == 0, "all": merges_all == 0}
        x1 = torch.randn(1, ch, SIZE, SIZE)
        shape = {k: (len(conv_layers(v, x1)), sum(c["macs"] for c in conv_layers(v, x1))) for k, v in variants.items()}
        choices.append({"net": name, "now": picks(rep, shape["cheaper"][0], shape["original"][0])})
        for b in batches:
            x = torch.randn(b, ch, SIZE, SIZE)
            with torch.no_grad():
                ref = net(x)
                for k, v in variants.items():
                    err = float((v(_layout(k, x)) - ref).abs().max() / ref.abs().max())
                    assert err < 1e-4, f"{name}/{k}: fused output differs by {err}"
            macs = {k: sum(c["macs"] for c in conv_layers(v, x[:1])) for k, v in variants.items()}
            lib_cost = {k: sum(c["cost"] for c in conv_layers(v, x[:1])) for k, v in variants.items()}
            feats = {k: [{"kind": kind(c["module"]), "macs": c["macs"] * b, "k": math.prod(c["module"].kernel_size),
                          "bytes": 4 * (math.prod(c["in_shape"]) + math.prod(c["out_shape"]) + c["module"].weight.numel())}
                         for c in conv_layers(v, x)] for k, v in variants.items()}
            nconv = {k: len(conv_layers(v, x[:1])) for k, v in variants.items()}

            def runner(m: nn.Module, xk: torch.Tensor) -> Callable[[], Any]:
                def run() -> Any:
                    with torch.no_grad():
                        return m(xk)
                return run

            times = interleaved({k: runner(v, _layout(k, x)) for k, v in variants.items()}, args.reps, target=0.03)
            med = {k: median(v) for k, v in times.items()}
            # paired: each repetition's original and variant samples ran back to back, under the same load
            paired = {k: median([o / t for o, t in zip(times["original"], times[k])]) for k in variants}
            for k in variants:
                results.append({
                    "net": name, "desc": desc, "batch": b, "variant": k, "median_ms": med[k] * 1e3,
                    "times_s": times[k], "speedup": paired[k], "speedup_of_medians": med["original"] / med[k],
                    "convs": nconv[k],
                    "speedup_min": min(times["original"]) / min(times[k]),
                    "same_as_original": unchanged.get(k, False),
                    "macs_per_image": macs[k], "mac_ratio": macs["original"] / macs[k],
                    "cost_ratio": lib_cost["original"] / lib_cost[k],
                    "merges": {"cheaper": merges_cheaper, "all": merges_all}.get(k), "layer_features": feats[k],
                })
            # isolated layer timings for the cost-model fit
            for v in variants.values():
                for c in conv_layers(v, x):
                    mod = c["module"]
                    key = (repr(mod), c["in_shape"])
                    if key in seen_layers:
                        continue
                    seen_layers.add(key)
                    xi = torch.randn(c["in_shape"])

                    def run_layer(mod: nn.Module = mod, xi: torch.Tensor = xi) -> Any:
                        with torch.no_grad():
                            return mod(xi)

                    lt = min(interleaved({"l": run_layer}, 5, target=0.01)["l"])
                    layer_samples.append({
                        "net": name, "layer": repr(mod), "kind": kind(mod), "batch": b, "in_shape": c["in_shape"],
                        "out_shape": c["out_shape"], "macs": c["macs"] * b, "k": math.prod(mod.kernel_size),
                        "bytes": 4 * (math.prod(c["in_shape"]) + math.prod(c["out_shape"]) + mod.weight.numel()),
                        "seconds": lt})
        print(f"{name}: fused in {fuse_s:.2f}s; merges cheaper={merges_cheaper} all={merges_all}", file=sys.stderr)
    if "vgg_bn" in args.nets:
        r = convmerge.check(init(vgg_pad1()), input_size=(SIZE, SIZE))
        verdict_lines.append("vgg_pad1 (3x3 p1 -> BN -> 3x3 p1): " + ", ".join(
            f"{p['first']}->{p['second']}: {p['verdict']}" for p in r["pairs"]))

    print(f"## model_speed: CPU inference, {args.threads} threads, float32, input [B, C, {SIZE}, {SIZE}], "
          f"{args.reps} interleaved repetitions; load average before {load_before}, after {load()}\n")
    print("speedup = median over repetitions of (original time / variant time) of the same repetition "
          "(>1: faster; the two ran back to back, so a burst of load from other processes hits both); MAC ratio = original MACs / variant MACs; "
          "spec.cost ratio = the same under the library's cost model "
          "(spec.cost per image, what 'cheaper' scores now); fitted-model ratio = the same ratio under the per-layer time "
          "model fitted below (t0 + MACs/R_kind + bytes/BW, summed over the variant's convs); speedup (min) uses the fastest sample of each variant instead of "
          "the median. **bold**: the policy's choice runs >5% slower than the original, or another variant is "
          ">5% faster than the policy's choice (a policy that merged nothing runs the original net again and "
          "counts as exactly 1.00: its measured speedup only shows the noise).\n")
    rows = []

    def eff(r: dict[str, Any]) -> float:
        return 1.0 if r["same_as_original"] else r["speedup"]

    def equivalent(a: dict[str, Any], b: dict[str, Any]) -> bool:
        return a["convs"] == b["convs"] and a["macs_per_image"] == b["macs_per_image"]

    fit = fit_cost_model(layer_samples)
    for r in results:
        orig = next(s for s in results if s["net"] == r["net"] and s["batch"] == r["batch"] and s["variant"] == "original")
        r["model_speedup"] = (sum(fit["predict"](f) for f in orig["layer_features"])
                              / sum(fit["predict"](f) for f in r["layer_features"]))
    for r in results:
        best = max(eff(s) for s in results if s["net"] == r["net"] and s["batch"] == r["batch"]
                   and (s is r or not equivalent(s, r)) and "channels-last" not in s["variant"])
        flag = r["variant"] in ("cheaper", "all") and (eff(r) < 0.95 or best > 1.05 * eff(r))
        r["flagged"] = flag
        sp = f"{r['speedup']:.2f}"
        variant = r["variant"] + (" (nothing merged: noise control)" if r["same_as_original"] else "")
        rows.append([r["net"] if r["variant"] == "original" else "", r["batch"], variant, r["convs"],
                     r["median_ms"], f"**{sp}**" if flag else sp, f"{r['speedup_min']:.2f}", f"{r['mac_ratio']:.2f}",
                     f"{r['cost_ratio']:.2f}", f"{r['model_speedup']:.2f}", f"{r['macs_per_image'] / 1e6:.0f}"])
    print(table(["net", "batch", "variant", "convs", "median ms", "speedup", "speedup (min)", "MAC ratio",
                 "spec.cost ratio", "fitted-model ratio", "MMACs/image"], rows))
    print("\n### what 'cheaper' picks, and whether it chose right (goal 5)\n")
    rows = []
    for c in choices:
        for b in batches:
            got = {r["variant"]: eff(r) for r in results if r["net"] == c["net"] and r["batch"] == b}
            plain = {k: v for k, v in got.items() if "channels-last" not in k}
            best = max(plain, key=plain.__getitem__)
            right = plain["cheaper"] >= 0.95 * plain[best]
            cl = (f"{got['cheaper, channels-last'] / got['cheaper']:.2f}" if "cheaper, channels-last" in got else "")
            rows.append([c["net"], b, c["now"], f"{got['cheaper']:.2f}", f"{best} ({plain[best]:.2f})",
                         "yes" if right else "**no**", cl])
    print(table(["net", "batch", "cheaper picks", "speedup", "fastest variant", "cheaper within 5% of it",
                 "channels-last / contiguous (cheaper)"], rows))
    print("\nnets: " + "; ".join(f"{k}: {v[2]}" for k, v in NETS.items() if k in args.nets))
    for line in verdict_lines:
        print(line)

    print("\n### per-layer cost model fit: t = t0 + MACs/R_kind + bytes/BW (least squares over "
          f"{len(layer_samples)} isolated conv timings)\n")
    print(table(["parameter", "value"], [[k, v] for k, v in fit["params_readable"].items()]))
    print(f"\nrelative error of the fit: median {fit['median_rel_err'] * 100:.0f}%, max {fit['max_rel_err'] * 100:.0f}%")
    rows = []
    for s in layer_samples:
        rows.append([s["net"], s["layer"][:60], s["batch"], s["kind"], f"{s['macs'] / 1e6:.1f}",
                     f"{s['bytes'] / 1e6:.2f}", s["seconds"] * 1e3, f"{s['macs'] / s['seconds'] / 1e9:.1f}",
                     f"{fit['predict'](s) * 1e3:.3g}"])
    print("\n### isolated conv layers\n")
    print(table(["net", "layer", "batch", "kind", "MMACs", "MB moved", "ms", "GMAC/s", "model ms"], rows))
    path = write_json(f"model_speed_t{args.threads}.json", {"reps": args.reps, "threads": args.threads, "size": SIZE,
                                           "results": [{k: v for k, v in r.items() if k != "layer_features"}
                                                       for r in results], "layers": layer_samples,
                                           "fit": {k: v for k, v in fit.items() if k != "predict"},
                                           "verdicts": verdict_lines, "choices": choices})
    print(f"\nwrote {path}\nreproduce: python benchmarks/model_speed.py {' '.join(sys.argv[1:])}")


def _layout(variant: str, x: torch.Tensor) -> torch.Tensor:
    """The input in the variant's memory format."""
    return x.contiguous(memory_format=torch.channels_last) if "channels-last" in variant else x


def fit_cost_model(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Non-negative least squares (by clamping and refitting) of t = t0 + sum_kind MACs/R_kind + bytes/BW."""
    kinds = ["dense", "pointwise", "depthwise"]
    cols = ["t0"] + [f"1/R_{k}" for k in kinds] + ["1/BW"]

    def features(s: dict[str, Any]) -> list[float]:
        return [1.0] + [s["macs"] if s["kind"] == k else 0.0 for k in kinds] + [float(s["bytes"])]

    A = torch.tensor([features(s) for s in samples], dtype=torch.float64)
    y = torch.tensor([s["seconds"] for s in samples], dtype=torch.float64)
    # weight by 1/t so that small layers count as much as big ones (relative error)
    w = 1.0 / y
    active = list(range(len(cols)))
    coef = torch.zeros(len(cols), dtype=torch.float64)
    for _ in range(len(cols)):
        sol = torch.linalg.lstsq(A[:, active] * w[:, None], y * w).solution
        if (sol >= 0).all():
            coef.zero_()
            coef[active] = sol
            break
        active = [a for a, v in zip(active, sol.tolist()) if v > 0]
    pred = A @ coef
    rel = ((pred - y).abs() / y)
    readable = {"t0 (per-layer overhead)": f"{coef[0] * 1e6:.1f} us"}
    for i, k in enumerate(kinds, 1):
        readable[f"R_{k} (MAC rate)"] = f"{1 / coef[i] / 1e9:.1f} GMAC/s" if coef[i] > 0 else "(not resolved)"
    readable["BW (activation+weight bytes)"] = f"{1 / coef[-1] / 1e9:.2f} GB/s" if coef[-1] > 0 else "(not resolved)"
    c = coef.tolist()
    return {
        "coef": dict(zip(cols, c)), "params_readable": readable,
        "median_rel_err": float(rel.median()), "max_rel_err": float(rel.max()),
        "predict": lambda s: sum(a * b for a, b in zip(features(s), c)),
    }


if __name__ == "__main__":
    main()
