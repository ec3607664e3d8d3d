"""convmerge: merge consecutive convolutions into one, exactly, and prove when it cannot.

`check`, `fuse` and `save` are the Python API (see convmerge.api), with `load` (convmerge.backends.loaded); they are
imported on first use so that `import convmerge` (and `convmerge --help`) does not pay for importing torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["ConvmergeError", "VerificationError", "check", "fuse", "load", "save", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("check", "fuse", "save"):
        from . import api

        return getattr(api, name)
    if name == "ConvmergeError":
        from .errors import ConvmergeError

        return ConvmergeError
    if name == "VerificationError":
        from .engine.plan import VerificationError

        return VerificationError
    if name == "load":
        from .backends.loaded import load

        return load
    raise AttributeError(f"module 'convmerge' has no attribute {name!r}")
