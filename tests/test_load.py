"""convmerge.load: the module a self-describing file describes, against the original modules and the
independent float64 evaluator of tests/models.py (torch.nn.functional on the description)."""

from __future__ import annotations

import io as _io
import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn

import convmerge
from convmerge import model
from convmerge.options import Options

from . import models, nets
from .strategies import padding

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

BLOCKS = {  # the re-parameterisation blocks of tests/nets.py, with their input channels
    "repvgg": (nets.TinyRepVGG, 3), "acblock": (lambda: nets.ACBlock(4), 4),
    "mobileone": (lambda: nets.MobileOneBlock(4), 4), "largekernel": (lambda: nets.LargeKernel(4), 4),
    "dbb": (lambda: nets.DBBLike(4, bn_pad=False), 4), "pool": (lambda: nets.PoolBranch(4, False), 4),
    "pool_counting": (lambda: nets.PoolBranch(4, True), 4), "modes": (lambda: nets.MixedModes(4), 4),
    "inception": (lambda: nets.Inception(4), 4), "oddeven": (lambda: nets.OddEven(4), 4),
}
NETS = {**{name: (make, nets.CHANNELS[name]) for name, make in nets.ALL.items()}, **BLOCKS}


def _sizes(name: str) -> list[tuple[int, ...]]:
    if name == "oddeven":  # its branches have one length only for even inputs
        return [(8, 8), (6, 12)]
    nd = nets.INPUT_DIMS.get(name, 2)
    return [(n,) * nd for n in (7, 8, 13)] + ([(9, 14)] if nd == 2 else [])


def _saved_and_fused(tmp_path: Path, net: nn.Module) -> tuple[Path, Path]:
    src, out = tmp_path / "m.safetensors", tmp_path / "m.fused.safetensors"
    convmerge.save(net, src)
    model.fuse_file(str(src), str(out), Options(policy="all"))
    return src, out


def _same_state(module: nn.Module, path: Path) -> None:
    """The state dict is the file's tensors, by name, value and dtype, and the file loads back strictly."""
    state, tensors = module.state_dict(), load_file(str(path))
    assert sorted(state) == sorted(tensors)
    for key, t in tensors.items():
        assert state[key].dtype == t.dtype and torch.equal(state[key], t), key
    module.load_state_dict(tensors, strict=True)


@pytest.mark.parametrize("name", sorted(NETS))
def test_loaded_file_computes_what_the_original_module_computes(tmp_path, name):
    make, channels = NETS[name]
    torch.manual_seed(3)
    net = nets.randomize_bn(make()).double().eval()
    src, out = _saved_and_fused(tmp_path, net)
    for path in (src, out):
        loaded = convmerge.load(path)
        assert not loaded.training
        _same_state(loaded, path)
        for size in _sizes(name):
            x = torch.randn(2, channels, *size, dtype=torch.float64)
            assert torch.allclose(loaded(x), net(x), rtol=1e-9, atol=1e-9), (path.name, size)


def test_bn_and_pad_with_per_channel_values_loads_fused_and_unfused(tmp_path):
    net = nets.randomize_bn(nets.DBBLike(4, bn_pad=True)).double().eval()
    doc, tensors = nets.dbb_description(net)
    src = models.save(tmp_path / "dbb.safetensors", tensors, doc)
    out = tmp_path / "dbb.fused.safetensors"
    model.fuse_file(str(src), str(out), Options(policy="all"))
    unfused, fused = convmerge.load(src), convmerge.load(out)
    assert "kxk_pad.value" in unfused.state_dict() and len(list(fused.parameters())) <= 2
    _same_state(unfused, src)
    for size in [(9, 9), (7, 10)]:
        x = torch.randn(2, 4, *size, dtype=torch.float64)
        want = net(x)
        assert torch.allclose(unfused(x), want, atol=1e-9) and torch.allclose(fused(x), want, atol=1e-9)


# --- random descriptions: every padding form and mode, pads, pools, batch norms, joins ---------------------


@st.composite
def descriptions(draw):
    """A chain of random layers (with their tensors) on `nd` spatial axes, sometimes joined with a copy of itself."""
    nd = draw(st.sampled_from([1, 2, 2, 3]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    c = channels = draw(st.integers(1, 3))
    layers: list[dict] = []
    tensors: dict[str, torch.Tensor] = {}
    src = "x"
    for k in range(draw(st.integers(1, 4))):
        name, kind = f"l{k}", draw(st.sampled_from(["conv", "conv", "pad", "pool", "bn", "relu"]))
        if kind == "conv":
            cout = draw(st.integers(1, 3))
            groups = math.gcd(c, cout) if draw(st.booleans()) else 1
            kernel = [draw(st.integers(1, 3)) for _ in range(nd)]
            stride = [draw(st.integers(1, 2)) for _ in range(nd)]
            layers.append({"name": name, "op": f"conv{nd}d", "input": src, "stride": stride,
                           "padding": draw(padding(nd, tuple(stride))),
                           "dilation": [draw(st.integers(1, 2)) for _ in range(nd)], "groups": groups,
                           "padding_mode": draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))})
            tensors[f"{name}.weight"] = torch.randn(cout, c // groups, *kernel, generator=gen, dtype=torch.float64)
            if draw(st.booleans()):
                tensors[f"{name}.bias"] = torch.randn(cout, generator=gen, dtype=torch.float64)
            c = cout
        elif kind == "pad":
            mode = draw(st.sampled_from(["constant", "reflect", "replicate", "circular"]))
            layer = {"name": name, "op": "pad", "input": src, "mode": mode,
                     "padding": draw(padding(nd, (2,) * nd).filter(lambda p: not isinstance(p, str)))}
            if mode == "constant" and draw(st.booleans()):
                tensors[f"{name}.value"] = torch.randn(c, generator=gen, dtype=torch.float64)
            elif mode == "constant":
                layer["value"] = draw(st.floats(-2, 2))
            layers.append(layer)
        elif kind == "pool":
            kernel = [draw(st.integers(1, 3)) for _ in range(nd)]
            layer = {"name": name, "op": f"avg_pool{nd}d", "input": src, "kernel_size": kernel,
                     "stride": [draw(st.integers(1, 2)) for _ in range(nd)],
                     "padding": [draw(st.integers(0, k // 2)) for k in kernel],
                     "count_include_pad": draw(st.booleans()), "ceil_mode": draw(st.booleans())}
            if nd > 1 and draw(st.booleans()):  # F.avg_pool1d has none
                layer["divisor_override"] = draw(st.integers(1, 5))
            layers.append(layer)
        elif kind == "bn":
            layers.append({"name": name, "op": "batch_norm", "input": src, "eps": 1e-3})
            tensors[f"{name}.running_mean"] = torch.randn(c, generator=gen, dtype=torch.float64)
            tensors[f"{name}.running_var"] = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
            if draw(st.booleans()):
                tensors[f"{name}.weight"] = torch.randn(c, generator=gen, dtype=torch.float64)
                tensors[f"{name}.bias"] = torch.randn(c, generator=gen, dtype=torch.float64)
        else:
            layers.append({"name": name, "op": "relu", "input": src})
        src = name
    outputs = [src]
    join = draw(st.sampled_from([None, "add", "concat"]))
    if join:
        layers.append({"name": "same", "op": "identity", "input": src})
        layers.append({"name": "joined", "op": join, "inputs": [src, "same"], **({"dim": draw(st.sampled_from([1, 2]))} if join == "concat" else {})})
        outputs = ["joined", src] if draw(st.booleans()) else ["joined"]
    return channels, nd, models.describe(layers, outputs), tensors, draw(st.integers(5, 12))


@settings(max_examples=60, **SETTINGS)
@given(descriptions(), st.integers(1, 3))
def test_random_descriptions_load_to_what_they_describe(described, batch):
    channels, nd, doc, tensors, n = described
    with tempfile.TemporaryDirectory() as folder:
        path = models.save(Path(folder) / "r.safetensors", tensors, doc)
        loaded = convmerge.load(path)
        _same_state(loaded, path)
    x = torch.randn(batch, channels, *[n + k for k in range(nd)], dtype=torch.float64)
    try:
        want = models.evaluate(doc, tensors, x)
    except RuntimeError:  # too small for these layers (or a reflect pad wider than the input): so must it be
        event("the input is too small for these layers")
        with pytest.raises(RuntimeError):
            loaded(x)
        return
    got = loaded(x)
    got = list(got) if isinstance(got, tuple) else [got]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and torch.allclose(g, w, rtol=1e-9, atol=1e-9)


# --- opaque layers: refused, or taken from arch ------------------------------------------------------------


class Head(nn.Module):
    """Convs, then layers a description cannot define: arguments it drops (GELU's approximation, a leaky slope,
    softplus's beta), a pooling to a size and a PReLU called twice (shared); and an nn.Flatten and an nn.Linear on
    its [N, C] output, which the description does define (its start_dim and end_dim; its weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.conv = nn.Conv2d(8, 8, 1)
        self.act = nn.GELU(approximate="tanh")
        self.leaky = nn.LeakyReLU(0.3)
        self.soft = nn.Softplus(beta=2.0)
        self.prelu = nn.PReLU(8, init=0.1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.prelu(self.soft(self.leaky(self.act(self.conv(self.stem(x))))))
        return self.fc(self.flat(self.pool(self.prelu(y))))


def _head_file(tmp_path: Path) -> tuple[nn.Module, Path]:
    torch.manual_seed(5)
    net = nets.randomize_bn(Head()).double().eval()
    with torch.no_grad():
        net.prelu.weight.uniform_(-0.5, 0.5)
    src, out = _saved_and_fused(tmp_path, net)
    return net, out


def test_opaque_layers_are_refused_by_name_with_the_file(tmp_path):
    _, out = _head_file(tmp_path)
    with pytest.raises(ValueError) as e:
        convmerge.load(out)
    message = str(e.value)
    assert str(out) in message and "6 opaque layer(s)" in message and "and 1 more" in message
    for shown in ("'act' (gelu)", "'leaky' (leakyrelu)", "'soft' (softplus)"):
        assert shown in message
    assert "arch=" in message and "\n" not in message


def _meta_head() -> nn.Module:
    with torch.device("meta"):
        return Head()


@pytest.mark.parametrize("how", ["module", "fresh module", "meta module", "string"])
def test_arch_supplies_the_opaque_layers(tmp_path, how):
    net, out = _head_file(tmp_path)
    arch = {"module": lambda: net, "fresh module": Head, "meta module": _meta_head,  # fresh: random weights
            "string": lambda: "tests.test_load:Head"}[how]()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    loaded = convmerge.load(out, arch=arch)
    _same_state(loaded, out)
    assert loaded.prelu is not net.prelu and isinstance(loaded.prelu, nn.PReLU)  # one copy for both calls
    for size in [(5, 5), (8, 11)]:
        x = torch.randn(2, 3, *size, dtype=torch.float64)
        assert torch.allclose(loaded(x), net(x), rtol=1e-9, atol=1e-9), size
    with torch.no_grad():
        loaded.fc.weight.zero_()
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # arch is copied, never touched


def test_arch_without_a_submodule_of_that_name_still_refuses(tmp_path):
    _, out = _head_file(tmp_path)
    with pytest.raises(ValueError, match=r"6 opaque layer\(s\).*arch has no submodule"):
        convmerge.load(out, arch=nn.Sequential(nn.ReLU()))


class Activations(nn.Module):
    """Every op FUNCTIONS knows, as modules and as functions, and a product of two layer values."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 6, 1)
        self.acts = nn.Sequential(nn.ReLU(), nn.ReLU6(), nn.Sigmoid(), nn.Tanh(), nn.SiLU(), nn.Hardswish(),
                                  nn.Hardsigmoid(), nn.Mish())
        self.c = nn.Conv2d(6, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.acts(self.a(x)) * self.b(x)
        fs = (torch.relu, torch.nn.functional.relu6, torch.sigmoid, torch.tanh, torch.nn.functional.silu,
              torch.nn.functional.hardswish, torch.nn.functional.hardsigmoid, torch.nn.functional.mish)
        return self.c(sum(f(y) for f in fs))


def test_parameter_free_activations_load_by_name(tmp_path):
    torch.manual_seed(6)
    net = Activations().double().eval()
    with torch.no_grad():  # values beyond the activations' bends (hardswish's +-3)
        net.a.weight.mul_(4)
        net.b.weight.mul_(4)
    src, out = _saved_and_fused(tmp_path, net)
    ops = {layer["op"] for layer in models.description_of(src)["layers"]}
    assert {"relu", "relu6", "sigmoid", "tanh", "silu", "hardswish", "hardsigmoid", "mish", "mul"} <= ops
    for path in (src, out):
        loaded = convmerge.load(path)
        x = torch.randn(2, 3, 9, 7, dtype=torch.float64)
        assert torch.allclose(loaded(x), net(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("body, op", [
    (lambda y: torch.nn.functional.gelu(y, approximate="tanh"), "gelu"),
    (lambda y: torch.nn.functional.hardtanh(y, -0.5, 2.0), "hardtanh"),
    (lambda y: torch.nn.functional.leaky_relu(y, 0.2), "leaky_relu"),
    (lambda y: y.clamp(0, 1), "clamp"),
    (lambda y: y ** 3, "pow"),
])
def test_an_op_whose_arguments_the_description_drops_is_refused(tmp_path, body, op):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return body(self.conv(x))

    path = tmp_path / "m.safetensors"
    convmerge.save(Net(), path)
    assert op in {layer["op"] for layer in models.description_of(path)["layers"]}
    with pytest.raises(ValueError, match=rf"1 opaque layer\(s\).*\({op}\)"):
        convmerge.load(path)


# --- what the module is: inputs and outputs, state, dtypes, pickling, export ---------------------------------


def _mixed_file(tmp_path: Path) -> Path:
    """Two inputs, two outputs; an asymmetric reflect-padded conv, a batch norm without num_batches_tracked, a
    pad with per-channel values, a pooling, a concat, and a tensor no layer reads."""
    gen = torch.Generator().manual_seed(7)
    t = {"ca.weight": torch.randn(4, 2, 3, 2, generator=gen), "ca.bias": torch.randn(4, generator=gen),
         "n.running_mean": torch.randn(4, generator=gen), "n.running_var": torch.rand(4, generator=gen) + 0.5,
         "n.weight": torch.randn(4, generator=gen), "n.bias": torch.randn(4, generator=gen),
         "p.value": torch.randn(4, generator=gen), "cb.weight": torch.randn(4, 3, 1, 1, generator=gen),
         "unused.table": torch.arange(6.0)}
    layers = [
        {"name": "ca", "op": "conv2d", "input": "a", "padding": [[0, 2], [1, 0]], "padding_mode": "reflect"},
        {"name": "n", "op": "batch_norm", "input": "ca", "eps": 1e-3},
        {"name": "p", "op": "pad", "input": "n", "padding": [[1, 0], [0, 1]]},
        {"name": "pool", "op": "avg_pool2d", "input": "p", "kernel_size": 2, "stride": 1, "count_include_pad": False},
        {"name": "cb", "op": "conv2d", "input": "b"},
        {"name": "both", "op": "concat", "inputs": ["pool", "cb"]},
    ]
    return models.save(tmp_path / "mixed.safetensors", t, models.describe(layers, ["both", "n"], inputs=["a", "b"]))


def _mixed_oracle(path: Path, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The description of _mixed_file computed by hand with torch.nn.functional in float64."""
    t = {k: v.double() for k, v in load_file(str(path)).items()}
    F = torch.nn.functional
    ca = F.conv2d(F.pad(a, [1, 0, 0, 2], mode="reflect"), t["ca.weight"], t["ca.bias"])
    n = (ca - t["n.running_mean"].view(1, -1, 1, 1)) / torch.sqrt(t["n.running_var"].view(1, -1, 1, 1) + 1e-3)
    n = n * t["n.weight"].view(1, -1, 1, 1) + t["n.bias"].view(1, -1, 1, 1)
    p = t["p.value"].view(1, -1, 1, 1).expand(n.shape[0], -1, n.shape[2] + 1, n.shape[3] + 1).clone()
    p[:, :, 1:, :-1] = n
    pool = F.avg_pool2d(p, 2, 1, count_include_pad=False)
    return torch.cat([pool, F.conv2d(b, t["cb.weight"])], dim=1), n


def test_several_inputs_and_outputs(tmp_path):
    path = _mixed_file(tmp_path)
    loaded = convmerge.load(path).double()
    for h, w in [(6, 5), (9, 12)]:
        a = torch.randn(3, 2, h, w, dtype=torch.float64)
        b = torch.randn(3, 3, h, w, dtype=torch.float64)
        got, want = loaded(a, b), _mixed_oracle(path, a, b)
        assert isinstance(got, tuple) and len(got) == 2
        for g, x in zip(got, want):
            assert g.shape == x.shape and torch.allclose(g, x, rtol=1e-9, atol=1e-9)
    with pytest.raises(TypeError, match=r"2 input\(s\) \(a, b\), not 1"):
        loaded(a)


def test_state_dict_is_the_files_tensors_and_dtypes_follow_the_module(tmp_path):
    path = _mixed_file(tmp_path)
    loaded = convmerge.load(path)
    _same_state(loaded, path)  # float32, as stored; the unread tensor too
    assert type(loaded.ca).__name__ == "PaddedConv2d" and isinstance(loaded.ca, nn.Conv2d)
    a, b = torch.randn(2, 2, 7, 8, dtype=torch.float64), torch.randn(2, 3, 7, 8, dtype=torch.float64)
    want = _mixed_oracle(path, a, b)
    got32 = loaded(a.float(), b.float())
    assert all(g.dtype == torch.float32 and torch.allclose(g.double(), w, atol=1e-5) for g, w in zip(got32, want))
    got64 = loaded.double()(a, b)
    assert all(g.dtype == torch.float64 and torch.allclose(g, w, rtol=1e-12, atol=1e-12) for g, w in zip(got64, want))


def test_pickles_and_exports(tmp_path):
    loaded = convmerge.load(_mixed_file(tmp_path))
    buffer = _io.BytesIO()
    torch.save(loaded, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    a, b = torch.randn(2, 2, 7, 8), torch.randn(2, 3, 7, 8)
    assert all(torch.equal(x, y) for x, y in zip(again(a, b), loaded(a, b)))
    assert all(torch.equal(again.state_dict()[k], v) for k, v in loaded.state_dict().items())
    program = torch.export.export(loaded, (a, b))
    assert all(torch.equal(x, y) for x, y in zip(program.module()(a, b), loaded(a, b)))


def test_exports_and_compiles_a_fused_net(tmp_path):
    torch.manual_seed(8)
    net = nets.randomize_bn(nets.Residual()).eval()
    _, out = _saved_and_fused(tmp_path, net)
    loaded = convmerge.load(out)
    x = torch.randn(2, 8, 9, 11)
    want = net(x)
    assert torch.allclose(torch.export.export(loaded, (x,)).module()(x), want, atol=1e-5)
    assert torch.allclose(torch.compile(loaded)(x), want, atol=1e-5)


def test_a_file_without_a_description_is_refused_with_advice(tmp_path):
    path = models.save(tmp_path / "plain.safetensors", {"c.weight": torch.randn(2, 2, 3, 3)})
    with pytest.raises(ValueError, match=r"plain\.safetensors: no graph description.*convmerge\.save"):
        convmerge.load(path)
    with pytest.raises(TypeError, match="path"):
        convmerge.load(nn.Conv2d(1, 1, 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_loaded_module_runs_on_a_gpu(tmp_path):
    path = _mixed_file(tmp_path)
    loaded = convmerge.load(path).double()
    a, b = torch.randn(2, 2, 7, 8, dtype=torch.float64), torch.randn(2, 3, 7, 8, dtype=torch.float64)
    want = _mixed_oracle(path, a, b)
    got = loaded.cuda()(a.cuda(), b.cuda())
    assert all(g.is_cuda and torch.allclose(g.cpu(), w, rtol=1e-9, atol=1e-9) for g, w in zip(got, want))


class AffineAndSub(nn.Module):
    """x * 2 + 1, a per-channel scale, a scalar one, and a difference of two convs: affine and sub layers."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.gamma = nn.Parameter(torch.randn(4, 1, 1))
        self.s = nn.Parameter(torch.randn(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x) * 2 + 1) - self.b(x)
        return torch.relu(y * self.gamma) * self.s


def test_affine_and_sub_layers_load_from_the_file_and_its_fused_form(tmp_path):
    net = AffineAndSub().double().eval()
    src, out = tmp_path / "m.safetensors", tmp_path / "o.safetensors"
    convmerge.save(net, src)
    ops = [layer["op"] for layer in models.description_of(src)["layers"]]
    assert ops.count("affine") == 4 and ops.count("sub") == 1
    model.fuse_file(str(src), str(out))
    assert [layer["op"] for layer in models.description_of(out)["layers"]].count("affine") < 4
    for path in (src, out):
        loaded = convmerge.load(path)
        x = torch.randn(2, 3, 9, 7, dtype=torch.float64)
        assert torch.allclose(loaded(x), net(x), rtol=1e-9, atol=1e-9)

