"""The options of a check or a fuse, validated once where they enter and passed down as one value.

The command line builds `Options` from its parsed flags, the Python API with `Options.of` from what its
caller gave; the planner, the file readers and the tracer read it and validate nothing again.  Only
fitting the size to the model's spatial axes (`maths.spec.fit_size`) waits for the graph.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from .errors import ConvmergeError, Kind

__all__ = ["POLICIES", "Options", "OptionsError", "OptionsTypeError"]

POLICIES = ("cheaper", "all")
"""cheaper: merge only where the cost model's estimate does not grow; all: every exact merge."""


class OptionsError(ConvmergeError, ValueError):
    """An option's value is refused: one line naming the option."""

    kind = Kind.BAD_INPUT


class OptionsTypeError(OptionsError, TypeError):
    """An option's value has the wrong type (a TypeError too, as Python callers expect)."""


@dataclass(frozen=True)
class Options:
    """What to plan for: the policy, the input's spatial size (1 to 3 positive ints: one per axis, or one for
    all; None where not given) and the module classes or names kept opaque when tracing."""

    policy: str = "cheaper"
    input_size: Optional[tuple[int, ...]] = None
    leaves: tuple = ()

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise OptionsError(f"policy must be one of {', '.join(map(repr, POLICIES))}, not {self.policy!r}")
        size = self.input_size
        if size is not None:
            if not isinstance(size, tuple):
                raise OptionsTypeError(f"input_size must be a tuple of ints like (224, 224), not "
                                       f"{type(size).__name__} {size!r}")
            for n in size:
                if isinstance(n, bool) or not isinstance(n, int):
                    raise OptionsTypeError(f"input_size must hold ints, not {type(n).__name__} {n!r} (in {size!r})")
            if not 1 <= len(size) <= 3:
                raise OptionsError(f"input_size must hold 1 to 3 sizes (one per spatial axis), not {len(size)}")
            if any(n < 1 for n in size):
                raise OptionsError(f"input_size must be positive, not {size!r}")
        if not isinstance(self.leaves, tuple):
            raise OptionsTypeError(f"leaves must be a tuple of classes or class names, not "
                                   f"{type(self.leaves).__name__} {self.leaves!r}")
        for leaf in self.leaves:
            if not isinstance(leaf, (type, str)):
                raise OptionsTypeError(f"leaves must hold classes or class names, not {type(leaf).__name__} "
                                       f"{leaf!r}")

    @classmethod
    def of(cls, where: str, *, policy: Any = "cheaper", input_size: Any = None, leaves: Any = ()) -> Options:
        """The options a Python caller gave (any sequence of ints for the size, any iterable for the leaves),
        converted, then validated here; every message starts with ``where`` (e.g. ``convmerge.check``)."""
        try:
            if input_size is not None:
                input_size = tuple(int(n) if _integer(n) else n
                                   for n in _sequence("input_size", input_size, "a sequence of ints like (224, 224)"))
            leaves = tuple(_sequence("leaves", leaves or (), "a sequence of classes or class names", Iterable))
            return cls(policy, input_size, leaves)
        except OptionsError as e:
            raise type(e)(f"{where}: {e}") from None


def _sequence(name: str, value: Any, what: str, kind: type = Sequence) -> Any:
    """`value`, where it is a `kind` but not a string."""
    if isinstance(value, (str, bytes)) or not isinstance(value, kind):
        raise OptionsTypeError(f"{name} must be {what}, not {type(value).__name__} {value!r}")
    return value


def _integer(n: Any) -> bool:
    """An int of any kind (numpy's too), but not a bool."""
    return isinstance(n, numbers.Integral) and not isinstance(n, bool)
