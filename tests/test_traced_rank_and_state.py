"""What a trace fixes and what it must not (found by review, each failed before its fix):

- the inputs' rank: a model whose first layer is a Linear is traced on a guessed [1, C] input, where a per-channel
  op maps axis 1 and a BatchNorm1d folds into the Linear; on [N, T, C] the original's layers mean other things
  (the Linear maps the last axis), so the fused module and `convmerge.load` refuse another rank instead of computing
  something else;
- a buffer the forward writes (a counter, a scale updated per call) is no constant: it is not folded into a merge,
  and `convmerge.save` leaves the caller's module as it was.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import convmerge
from convmerge import model
from convmerge.options import Options


class _TokenHead(nn.Module):
    """Linear then BatchNorm1d: on [N, C] the BN normalises the Linear's outputs; on [N, T, C] it normalises T."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(8, 8), nn.BatchNorm1d(8)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


def test_a_module_traced_at_rank_2_refuses_rank_3_rather_than_compute_something_else(tmp_path):
    torch.manual_seed(0)
    net = _TokenHead().eval()
    fused = convmerge.fuse(net)  # no example: the input is guessed as [1, 8]
    x2, x3 = torch.randn(2, 8), torch.randn(2, 8, 8)
    with torch.no_grad():
        assert torch.allclose(fused(x2), net(x2), rtol=1e-4, atol=1e-5)
        net(x3)  # the original runs at rank 3, with another meaning
        with pytest.raises(ValueError, match="rank 2"):
            fused(x3)
    src, out = tmp_path / "m.safetensors", tmp_path / "m.fused.safetensors"
    convmerge.save(net, src)
    model.fuse_file(str(src), str(out), Options(policy="all"))
    for path in (src, out):
        loaded = convmerge.load(path)
        with torch.no_grad():
            assert torch.allclose(loaded(x2), net(x2), rtol=1e-4, atol=1e-5)
            with pytest.raises(ValueError, match="rank 2"):
                loaded(x3)


class _Counter(nn.Module):
    """A scale the forward doubles on every call: c2(c1(x) * k) is no fixed conv."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
        self.register_buffer("k", torch.ones(4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.k.mul_(2.0)
        return self.c2(self.c1(x) * self.k)


def test_a_buffer_the_forward_writes_is_not_folded_and_save_leaves_the_module_alone(tmp_path):
    net = _Counter().eval()
    convmerge.save(net, tmp_path / "m.safetensors")
    assert torch.equal(net.k, torch.ones(4, 1, 1))  # the trace ran on a copy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = convmerge.check(_Counter().eval(), input_size=(6, 6), policy="all")
    assert rep["merges"] == [], rep["merges"]  # the multiply by k is opaque: c1 and c2 stay apart
