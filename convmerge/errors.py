"""The one base of convmerge's errors: each carries its kind, which the command line maps to an exit code.

Each error also keeps its builtin base (ValueError for bad input, RuntimeError for a failed verification),
so a caller's ``except ValueError`` still catches it."""

from __future__ import annotations

import enum


class Kind(enum.Enum):
    BAD_INPUT = "bad input"  # the caller's file, arguments or model: named in one line, nothing written (exit 2)
    VERIFICATION = "verification"  # a merge the rules called exact failed its numeric check: never written (exit 3)
    INTERNAL = "internal"  # a bug in convmerge (exit 3)


class ConvmergeError(Exception):
    """An expected failure; ``str(e)`` is one line naming what failed and why."""

    kind = Kind.INTERNAL


def kind_of(e: BaseException) -> Kind:
    """An exception's kind: any other exception is internal."""
    return e.kind if isinstance(e, ConvmergeError) else Kind.INTERNAL
