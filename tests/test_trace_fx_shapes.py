"""torch.fx first, with shapes from one run at the example: what it reads, when torch.export takes over, and the
end-to-end check as the net under it (a module the fx route builds wrong is traced again by torch.export)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import convmerge
from convmerge.backends import rebuild
from convmerge.frontends.trace import describe_module


class TimmLikeBatchNorm(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a subclass with its own forward, a shape assert and F.batch_norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)


class TimmLikeLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Block(nn.Module):
    """MobileOne's sum of branches started at the number 0, a LayerScale and a residual."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.kxk = nn.ModuleList([nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), TimmLikeBatchNorm(c))
                                  for _ in range(2)])
        self.scale = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), TimmLikeBatchNorm(c))
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = 0
        out += self.scale(x)
        for branch in self.kxk:
            out = out + branch(x)
        return torch.relu(x + out * self.gamma.view(1, -1, 1, 1))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(Block(8), Block(8))
        self.head = TimmLikeLinear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(F.dropout(x.mean((2, 3)), 0.2, self.training))


def _randomised(module: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-1, 1)
    return module.eval()


def _convs(module: nn.Module) -> int:
    return sum(1 for n in module.graph.nodes if n.op == "call_module"
               and isinstance(module.get_submodule(n.target), nn.Conv2d))


def _agrees(fused: nn.Module, module: nn.Module) -> None:
    for shape in [(2, 3, 33, 33), (1, 3, 17, 20), (2, 3, 64, 64)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), module(x), rtol=1e-4, atol=1e-4)


def test_fx_with_shapes_reads_functional_norms_joins_layer_scales_and_linears() -> None:
    module = _randomised(Net())
    traced = describe_module(module, "net", example_size=(32, 32), fx_first=True)
    assert traced.tracer == "torch.fx" and traced.blind_spots == [] and traced.notes[0].startswith("traced with torch.fx")
    ops = [layer["op"] for layer in traced.doc["layers"]]
    assert ops.count("batch_norm") == 6 and ops.count("affine") == 2 and ops.count("linear") == 1
    assert "_assert" not in ops and "getattr" not in ops and "get_attr" not in ops
    assert ops.count("add") == 6 and "identity" not in ops  # out = 0; out += ...; F.dropout outside training: aliases
    [linear] = [layer for layer in traced.doc["layers"] if layer["op"] == "linear"]
    assert traced.doc["layers"][[layer["name"] for layer in traced.doc["layers"]].index(linear["input"])]["op"] == "mean"
    assert traced.doc["traced_input"] == [32, 32] and traced.smallest == (16, 16)


def test_fuse_through_fx_merges_every_block_and_computes_the_original() -> None:
    module = _randomised(Net())
    fused = convmerge.fuse(module, input_size=(32, 32))
    assert _convs(fused) == 3  # the stem, then one conv per block (the residual and LayerScale folded in)
    _agrees(fused, module)


class FunctionalKernel(nn.Module):
    """DBB's identity added to a kernel before a functional conv: fx sees an opaque F.conv2d, export a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(4, 4, 1, 1))
        self.register_buffer("eye", torch.eye(4).reshape(4, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + F.conv2d(x, self.weight + self.eye)


def test_a_blind_spot_sends_the_model_to_torch_export() -> None:
    module = FunctionalKernel().eval()
    traced = describe_module(module, "m", example_size=(16, 16), fx_first=True)
    assert traced.tracer == "torch.export"
    fused = convmerge.fuse(module, input_size=(16, 16))
    assert _convs(fused) == 1
    for shape in [(1, 4, 16, 16), (2, 4, 9, 7)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(fused(x), module(x), rtol=1e-4, atol=1e-4)


class Broadcast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x).mean((2, 3), keepdim=True)  # [N, C, H, W] + [N, C, 1, 1]: no structural add


def test_an_addition_that_broadcasts_stays_opaque() -> None:
    traced = describe_module(Broadcast().eval(), "m", example_size=(8, 8), fx_first=True)
    assert traced.tracer == "torch.fx"
    [add] = [layer for layer in traced.doc["layers"] if "add" in layer["op"]]
    assert add["op"] == "opaque_add"


def test_a_module_the_fx_route_cannot_rebuild_is_traced_again_by_torch_export(monkeypatch) -> None:
    module = _randomised(Net())
    built = rebuild.fused_module
    routes = []

    def refuse_fx_graphs(module, plan, traced, *args, **kwargs):
        routes.append(traced.tracer)
        if traced.tracer == "torch.fx":
            raise rebuild.TraceError("the traced graph has no node for blocks.0.add: cannot rebuild the module")
        return built(module, plan, traced, *args, **kwargs)

    monkeypatch.setattr(rebuild, "fused_module", refuse_fx_graphs)
    fused = convmerge.fuse(module, input_size=(32, 32))
    assert routes == ["torch.fx", "torch.export"]
    _agrees(fused, module)


def test_a_module_the_fx_route_builds_wrong_is_traced_again_by_torch_export(monkeypatch) -> None:
    module = _randomised(Net())
    built = rebuild.fused_module
    routes = []

    def corrupt_fx_modules(module, plan, traced, *args, **kwargs):
        routes.append(traced.tracer)
        fused = built(module, plan, traced, *args, **kwargs)
        if traced.tracer == "torch.fx":
            head = fused.get_submodule("stem")
            with torch.no_grad():
                head.bias.add_(1e-3)  # a planted error: what a tracer trick gone wrong would give
        return fused

    monkeypatch.setattr(rebuild, "fused_module", corrupt_fx_modules)
    fused = convmerge.fuse(module, input_size=(32, 32))
    assert routes[0] == "torch.fx" and routes[-1] == "torch.export"
    _agrees(fused, module)


class RemembersMean(nn.Module):
    """A forward that assigns a traced value to an attribute: fx records no such write."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
        self.last = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        self.last = y.mean()
        return self.b(y)


def test_a_forward_that_assigns_to_an_attribute_goes_to_torch_export_with_the_module_as_it_was() -> None:
    module = RemembersMean().eval()
    traced = describe_module(module, "m", example_size=(8, 8), fx_first=True)
    assert traced.tracer == "torch.export" and not isinstance(module.last, torch.fx.Proxy)
    fused = convmerge.fuse(module, input_size=(8, 8))
    x = torch.randn(2, 3, 5, 7)
    torch.testing.assert_close(fused(x), module(x), rtol=1e-4, atol=1e-4)


class TrainOnly(nn.Module):
    """A forward that branches on ``self.training``: the description is the inference form's."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.b(torch.relu(y) if self.training else y)


def test_a_module_left_in_training_mode_is_traced_in_its_inference_form() -> None:
    module = TrainOnly().train()
    traced = describe_module(copy.deepcopy(module), "m", example_size=(8, 8), fx_first=True)
    graph_module, _ = traced.graph_module()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(graph_module(x), module.eval()(x))
    merges = convmerge.check(module.train(), input_size=(8, 8))["merges"]
    assert traced.tracer == "torch.fx" and [m["layers"] for m in merges] == [["a", "b"]]


class Dropouts(nn.Module):
    """Functional dropouts outside training and a concatenation along a negative axis: what torch.export sees
    through, the fx route too."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.c, self.d = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.a(x), self.b(x)], -3)
        y = F.dropout2d(y, 0.1, self.training)
        y = F.feature_alpha_dropout(self.c(y), 0.1, self.training)
        return self.d(F.alpha_dropout(y, 0.1, self.training))


def test_functional_dropouts_and_a_negative_concat_axis_merge_through_fx() -> None:
    module = Dropouts().eval()
    traced = describe_module(copy.deepcopy(module), "m", example_size=(8, 8), fx_first=True)
    assert traced.tracer == "torch.fx"
    [merge] = convmerge.check(module, input_size=(8, 8))["merges"]
    assert {"a", "b", "c", "d"} <= set(merge["layers"])
    fused = convmerge.fuse(module, input_size=(8, 8))
    assert _convs(fused) == 1
    _agrees(fused, module)


def test_hooks_on_the_module_itself_send_it_to_torch_export() -> None:
    """fx traces the root's forward without its hooks: its graph would not be what the module computes."""
    for register, hook in [("register_forward_hook", lambda m, args, out: out * 2 + 1),
                           ("register_forward_pre_hook", lambda m, args: (args[0] * 2,))]:
        module = TrainOnly().eval()
        getattr(module, register)(hook)
        traced = describe_module(copy.deepcopy(module), "m", example_size=(8, 8), fx_first=True)
        graph_module, _ = traced.graph_module()
        x = torch.randn(2, 3, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(graph_module(x), module(x))


def padded(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, (1, 1, 1, 1))


def skipped(x: torch.Tensor, training: bool) -> torch.Tensor:
    return x * 2 if training else x


torch.fx.wrap("padded")
torch.fx.wrap("skipped")


class Wrapped(nn.Module):
    """Functions fx keeps whole (``torch.fx.wrap``, timm's ``pad_same``): one hides a zero pad torch.export merges,
    one returns its input itself outside training (torchvision's ``stochastic_depth``)."""

    def __init__(self, pad: bool) -> None:
        super().__init__()
        self.a, self.b, self.pad = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3, padding=0 if pad else 1), pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return torch.relu(self.b(padded(y) if self.pad else skipped(y, self.training)))


def test_a_function_fx_keeps_whole_is_a_blind_spot_unless_it_returned_its_input() -> None:
    module = Wrapped(pad=True).eval()
    assert describe_module(copy.deepcopy(module), "m", example_size=(8, 8), fx_first=True).tracer == "torch.export"
    [merge] = convmerge.check(module, input_size=(8, 8))["merges"]
    assert merge["layers"][-1] == "b" and merge["conv"]["padding"] == [[1, 1], [1, 1]]
    fused = convmerge.fuse(module, input_size=(8, 8))
    assert _convs(fused) == 1
    _agrees(fused, module)
    assert describe_module(Wrapped(pad=False).eval(), "m", example_size=(8, 8), fx_first=True).tracer == "torch.fx"


class WholeSlices(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [self.a(x), self.b(x)][:]  # a slice of a list is no slice of a tensor
        y = torch.cat(parts, 1)[:, :][...]
        return torch.relu(self.c(y[:, :, :]))


def test_slices_taking_all_of_a_value_are_the_identity_in_the_fx_route() -> None:
    module = WholeSlices().eval()
    assert describe_module(copy.deepcopy(module), "m", example_size=(8, 8), fx_first=True).tracer == "torch.fx"
    [merge] = convmerge.check(module, input_size=(8, 8))["merges"]
    assert {"a", "b", "c"} <= set(merge["layers"])
    fused = convmerge.fuse(module, input_size=(8, 8))
    assert _convs(fused) == 1
    _agrees(fused, module)


class SharedPass(nn.Module):
    """A value read through an identity (a module, F.dropout outside training, ``x + 0``, ``x[:, :]``) by several
    layers: each residual still merges into its conv, as torch.export (which drops such ops) finds."""

    def __init__(self, make) -> None:
        super().__init__()
        self.stem, self.a, self.b = (nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1),
                                     nn.Conv2d(4, 4, 3, padding=1))
        self.make = make
        self.identity = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        p = self.make(self, x)
        return torch.relu(self.a(x) + p) * torch.relu(self.b(p) + p)


def test_an_identity_read_by_several_layers_is_an_alias_of_its_input() -> None:
    for make in [lambda m, x: m.identity(x), lambda m, x: F.dropout(x, 0.1, m.training), lambda m, x: x + 0,
                 lambda m, x: x[:, :]]:
        module = SharedPass(make).eval()
        traced = describe_module(copy.deepcopy(module), "m", example_size=(8, 8), fx_first=True)
        assert traced.tracer == "torch.fx"
        merges = convmerge.check(module, input_size=(8, 8))["merges"]
        assert sorted(m["layers"][0] for m in merges) == ["a", "b"]  # each conv with its residual
        fused = convmerge.fuse(module, input_size=(8, 8))
        assert _convs(fused) == 3
        _agrees(fused, module)


class ChannelsLast(nn.Module):
    """ConvNeXt's block: linears over the last axis of [N, H, W, C], which torch.export leaves opaque too."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.fc, self.head = nn.Linear(4, 4), TimmLikeLinear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x).permute(0, 2, 3, 1)
        y = F.linear(torch.relu(self.fc(y)), self.head.weight, self.head.bias)
        return self.b(y.permute(0, 3, 1, 2))


def test_a_linear_over_the_last_axis_of_a_4d_value_is_no_blind_spot() -> None:
    module = ChannelsLast().eval()
    traced = describe_module(copy.deepcopy(module), "m", example_size=(8, 8), fx_first=True)
    assert traced.tracer == "torch.fx"
    assert [layer["op"] for layer in traced.doc["layers"] if "linear" in layer["op"]] == ["opaque_linear"] * 2
    fused = convmerge.fuse(module, input_size=(8, 8))
    _agrees(fused, module)


class ScalesItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return self.b(self.a(x)) + x.mean()


def test_a_forward_that_writes_its_input_is_checked_on_inputs_of_its_own() -> None:
    """The end-to-end check gives the original and the fused module each a copy of an input (the original's write
    to it is no difference)."""
    module = ScalesItsInput().eval()
    fused = convmerge.fuse(module, input_size=(8, 8))
    assert _convs(fused) == 1
    for shape in [(2, 3, 8, 8), (1, 3, 9, 7)]:
        x = torch.randn(*shape)
        mine, theirs = x.clone(), x.clone()
        with torch.no_grad():
            torch.testing.assert_close(fused(mine), module(theirs), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mine, theirs)


class Shuffle(nn.Module):
    """ShuffleNet's channel shuffle ends in ``.contiguous()``; a ``clone`` written in place, another not."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(self.a(x).contiguous().clone())
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        z = y.clone()
        z += self.c(y)
        return torch.relu(z.detach())


def test_copies_and_aliases_are_identities_in_the_fx_route() -> None:
    module = Shuffle().eval()
    traced = describe_module(copy.deepcopy(module), "m", example_size=(8, 8), fx_first=True)
    assert traced.tracer == "torch.fx"
    merges = convmerge.check(module, input_size=(8, 8))["merges"]
    assert [m["layers"][:2] for m in merges] == [["a", "b"], ["c", "iadd"]]  # y + c(y): the identity in c's kernel
    fused = convmerge.fuse(module, input_size=(8, 8))
    assert _convs(fused) == 2
    _agrees(fused, module)


class Pooled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.pool = nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(3, 2, 1)
        self.dw, self.pw = nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pw(self.dw(F.interpolate(self.pool(torch.relu(self.stem(x))), scale_factor=3))))


def test_opaque_layers_record_their_output_size_at_the_example() -> None:
    """As torch.export's description does: the sizes (and costs) past a max pool or an upsampling are known."""
    module = Pooled().eval()
    traced = describe_module(copy.deepcopy(module), "m", example_size=(8, 9), fx_first=True)
    assert traced.tracer == "torch.fx"
    x = torch.randn(1, 3, 8, 9)
    with torch.no_grad():
        pooled = module.pool(torch.relu(module.stem(x)))
        sizes = {"pool": list(pooled.shape[2:]), "interpolate": list(F.interpolate(pooled, scale_factor=3).shape[2:])}
    assert {layer["name"]: layer["traced_size"] for layer in traced.doc["layers"] if layer["name"] in sizes} == sizes
    report = convmerge.check(module, input_size=(8, 9))
    assert not [note for note in report["notes"] if "input sizes unknown" in note]


class CastToWeightDtype(nn.Module):
    """EdgeNeXt's positional encoding: a value made in float32 cast to a conv's weight dtype before that conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.proj = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).float()
        return self.bn(self.proj(y.to(self.proj.weight.dtype)))


def test_reading_a_weights_dtype_beside_its_call_is_no_blind_spot() -> None:
    """Only the values of a module's tensors read beside its call block its merges; its dtype or device does not.
    torch.export bakes ``weight.dtype`` into its graph as float32, so the end-to-end check (in float64) refused its
    module: EdgeNeXt could not be fused at all."""
    module = _randomised(CastToWeightDtype())
    assert describe_module(module, "m", example_size=(8, 8), fx_first=True).tracer == "torch.fx"
    fused = convmerge.fuse(module, input_size=(8, 8))
    assert not [m for m in fused.modules() if isinstance(m, nn.BatchNorm2d)]
    _agrees(fused, module)


def test_a_merge_keeps_the_dtype_and_device_read_of_its_weight() -> None:
    """The dtype and device reads a merged module's weight gives stay as they were: here a float32 conv casts its
    output to the float64 weight of the conv its batch norm folds into, and to its device for a scale.  The merged
    conv is stored in its convs' dtype (float64), so what the graph reads, and the output's dtype, do not change
    (torch.export baked float64 into its graph and its fused module raised)."""

    class Mixed(CastToWeightDtype):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            w = self.proj.weight
            scale = torch.full((1,), 2.0, dtype=w.dtype, device=w.device)
            return self.bn(self.proj(y.to(w.dtype))) * scale

    module = _randomised(Mixed())
    module.proj.double(), module.bn.double()
    fused = convmerge.fuse(module, input_size=(8, 8))
    assert not [m for m in fused.modules() if isinstance(m, nn.BatchNorm2d)]
    reads = {str(n.target): n for n in fused.graph.nodes if n.op == "get_attr"}
    assert {t: fused.get_parameter(t).dtype for t in reads} == {"proj.weight": torch.float64}
    for shape in [(2, 3, 9, 9), (1, 3, 17, 20)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            want, got = module(x), fused(x)
        assert got.dtype == want.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
