"""JSON as strictly as two different readers must agree on it: used for headers and descriptions.

Refused: nesting deeper than a limit (checked before the recursive parser sees the text),
duplicate keys (two readers could see two different values under one name) and NaN/Infinity
(not JSON at all).
"""

from __future__ import annotations

import json
import re
from typing import Any

from .errors import ConvmergeError, Kind

_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


class TooDeep(ConvmergeError, ValueError):
    kind = Kind.BAD_INPUT

    def __init__(self, depth: int, limit: int) -> None:
        super().__init__(f"nested {depth} levels deep; at most {limit} are allowed")
        self.depth = depth


def depth(text: str) -> int:
    """Bracket nesting outside strings, without recursion (regexes do the scanning)."""
    level = deepest = 0
    for ch in _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)):
        level += 1 if ch in "[{" else -1
        deepest = max(deepest, level)
    return deepest


def loads(text: str, max_depth: int) -> Any:
    """json.loads, strict: TooDeep, or ValueError with a one-line reason."""
    found = depth(text)
    if found > max_depth:
        raise TooDeep(found, max_depth)
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except RecursionError:
        raise TooDeep(found, max_depth) from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{e.msg} at character {e.pos}") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            shown = repr(key) if len(repr(key)) <= 80 else repr(key)[:77] + "..."
            raise ValueError(f"duplicate key {shown}")
        result[key] = value
    return result


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")
