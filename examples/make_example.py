"""Build examples/model.py with seeded weights and save it self-describing: examples/example.safetensors.

    python examples/make_example.py && convmerge fuse examples/example.safetensors --input-size 65x65
"""

import sys
from pathlib import Path

import torch

import convmerge

sys.path.insert(0, str(Path(__file__).parent))
from model import build  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    net = build().eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    out = Path(__file__).parent / "example.safetensors"
    convmerge.save(net, out, force=True)
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
