"""The README's "On your own model" runs as written: its code blocks are taken from README.md and run line for
line (python blocks with exec, shell lines through `python -m convmerge.cli` in a subprocess) in a temporary
folder holding `mynet.py`, a small RepVGG-like net with a classifier head, under the names the README uses
(`net`, `mynet.py:build`).  Each route's outputs are then compared with the original net, run eagerly."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SECTION = "On your own model"

MYNET = '''
import torch
from torch import nn


def conv_bn(cin, cout, k, stride, padding):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, bias=False), nn.BatchNorm2d(cout))


class Block(nn.Module):
    """RepVGG's training form: 3x3 + BN, 1x1 + BN and (stride 1) a BN of the input, summed, then ReLU."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.dense = conv_bn(cin, cout, 3, stride, 1)
        self.point = conv_bn(cin, cout, 1, stride, 0)
        self.skip = nn.BatchNorm2d(cin) if stride == 1 and cin == cout else None

    def forward(self, x):
        y = self.dense(x) + self.point(x)
        return torch.relu(y + self.skip(x) if self.skip is not None else y)


class MyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(Block(3, 8, 2), Block(8, 8), Block(8, 16, 2), Block(16, 16))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.blocks(x))))


def build():
    return MyNet()
'''


# --- the README's blocks ----------------------------------------------------------------------------------


def routes() -> dict[str, list[tuple[str, str]]]:
    """The section's code blocks, (language, code), grouped by the bold lead-in of the paragraph before them."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"\n## {SECTION}\n" in readme, f"the README has no '## {SECTION}' section"
    section = readme.split(f"\n## {SECTION}\n", 1)[1].split("\n## ", 1)[0]
    out: dict[str, list[tuple[str, str]]] = {}
    route = None
    for part in re.split(r"(^```\w*\n.*?^```)", section, flags=re.S | re.M):
        fence = re.match(r"```(\w*)\n(.*)```", part, re.S)
        if fence:
            assert route is not None, "a code block before the first route"
            out[route].append((fence.group(1), fence.group(2)))
            continue
        for lead in re.findall(r"^\*\*(.+?)\*\*", part, re.M):
            route = lead
            out.setdefault(route, [])
    return {k: v for k, v in out.items() if v}


def route(start: str) -> list[tuple[str, str]]:
    found = [blocks for name, blocks in routes().items() if name.startswith(start)]
    assert len(found) == 1, f"no single README route starting {start!r}: {sorted(routes())}"
    return found[0]


def shell_lines(code: str) -> list[list[str]]:
    """Each command of a bash block as argv, its trailing comment dropped."""
    return [shlex.split(line, comments=True) for line in code.splitlines() if line.split("#", 1)[0].strip()]


def run_blocks(blocks: list[tuple[str, str]], folder: Path, namespace: dict) -> None:
    """Run the blocks in order, in `folder`: exactly their lines."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cwd = os.getcwd()
    os.chdir(folder)
    sys.path.insert(0, str(folder))
    try:
        for language, code in blocks:
            if language == "python":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    exec(compile(code, "README.md", "exec"), namespace)
                continue
            assert language == "bash", f"a {language!r} block: the test runs python and bash blocks only"
            for argv in shell_lines(code):
                assert argv[0] == "convmerge", f"a README command that is not convmerge's: {argv}"
                done = subprocess.run([sys.executable, "-m", "convmerge.cli", *argv[1:]], cwd=folder, env=env,
                                      capture_output=True, text=True, timeout=600)
                assert done.returncode == 0, f"{shlex.join(argv)}: exit {done.returncode}\n{done.stderr}"
    finally:
        sys.path.remove(str(folder))
        os.chdir(cwd)


# --- the model the README's names stand for ---------------------------------------------------------------


def mynet(folder: Path) -> tuple[torch.nn.Module, object]:
    """`mynet.py` in `folder`, and `net`: its build() with trained-looking batch norms, in eval mode."""
    (folder / "mynet.py").write_text(MYNET)
    spec = importlib.util.spec_from_file_location(f"mynet_{folder.name}", folder / "mynet.py")
    code = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(code)
    torch.manual_seed(0)
    net = code.build()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-1, 1)
    return net.eval(), code


def inputs(*shapes: tuple[int, ...]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(*s, generator=gen) for s in shapes]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max()))


def convs(module: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.modules.conv._ConvNd) for m in module.modules())


# --- each route ---------------------------------------------------------------------------------------------


def test_the_readme_has_the_three_routes() -> None:
    names = sorted(routes())
    assert len(names) >= 3 and all(routes()[n] for n in names), names


def test_a_module_becomes_a_fused_module(tmp_path: Path) -> None:
    net, _ = mynet(tmp_path)
    namespace = {"net": net}
    run_blocks(route("A PyTorch module"), tmp_path, namespace)
    fused = namespace["fused"]
    assert convs(fused) == 4 < convs(net) == 8  # one 3x3 conv per block, as RepVGG's own deploy form
    saved = torch.load(tmp_path / "net.fused.pt", weights_only=False)
    with torch.no_grad():
        for x in inputs((1, 3, 224, 224), (2, 3, 65, 47)):
            want = net(x)
            assert close(want, fused(x)) and close(want, saved(x))


def test_a_safetensors_file_becomes_a_fused_file_a_module_and_a_program(tmp_path: Path) -> None:
    net, _ = mynet(tmp_path)
    namespace = {"net": net}
    run_blocks(route("A safetensors file"), tmp_path, namespace)
    from safetensors.torch import load_file

    kernels = [k for k, t in load_file(str(tmp_path / "model.fused.safetensors")).items() if t.dim() == 4]
    assert len(kernels) == 4, kernels  # from 8
    loaded, program = namespace["fused"], namespace["program"].module()
    with torch.no_grad():
        for x in inputs((1, 3, 224, 224), (2, 3, 33, 50)):
            assert close(net(x), loaded(x))
        x = inputs((1, 3, 224, 224))[0]  # the program's traced shape
        assert close(net(x), program(x))


def test_an_onnx_model_becomes_a_fused_onnx_model(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    net, _ = mynet(tmp_path)
    run_blocks(route("An ONNX model"), tmp_path, {"net": net})
    fused = tmp_path / "model.fused.onnx"
    nodes = [n.op_type for n in onnx.load(str(fused)).graph.node]
    assert nodes.count("Conv") == 4, nodes
    x = inputs((1, 3, 224, 224))[0]
    session = ort.InferenceSession(str(fused), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert close(net(x), torch.from_numpy(got))


def test_shell_lines_are_split_as_a_shell_would() -> None:
    code = "convmerge fuse a.safetensors --arch 'my net.py:build'   # a comment\n\n# only a comment\nconvmerge check b\n"
    assert shell_lines(code) == [["convmerge", "fuse", "a.safetensors", "--arch", "my net.py:build"],
                                 ["convmerge", "check", "b"]]
