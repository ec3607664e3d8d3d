"""Terminal rendering at 60, 80, 100 and 200 columns: names, numbers and verdicts never split, labels never cut.

Every view (check report, fuse report, inspect, explain) is rendered from the library's own data
with rich's `Console(width=...)`, and compared with a render so wide that nothing wraps: every
layer name, every word holding a digit and every verdict must appear as often, whole, at the narrow
width (a table too wide for the terminal becomes a list).
"""

from __future__ import annotations

import io
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from rich.console import Console

from convmerge import model
from convmerge.reporting import render
from convmerge.reporting.explain import explain_pair
from convmerge.graph import parse
from convmerge.reporting.report import VERDICTS
from convmerge.options import Options

from .models import conv, describe, save, stack_model

WIDTHS = [60, 80, 100, 200]
LONG = "features.denseblock1.denselayer12"


def draw(view: Callable[..., None], data: dict, width: int, *args: Any) -> str:
    out = io.StringIO()
    view(Console(file=out, width=width, color_system=None, highlight=False), data, *args)
    return out.getvalue()


def kept(text: str, names: set[str]) -> Counter:
    """Words that must never be split: layer names, any word with a digit (numbers, sizes, shapes) and the
    verdicts (punctuation around them aside: a list layout writes 'error (f64):' where a table head has no
    colon); file paths may fold when there is no room for them."""
    words = [w.strip("(),:;") for w in re.findall(r"\S+", text)]
    return Counter(w for w in words if "/" not in w and (w in names or re.search(r"\d", w) or w in VERDICTS))


def assert_whole(view: Callable[..., None], data: dict, names: set[str], *args: Any) -> None:
    wide = draw(view, data, 1000, *args)
    expected = kept(wide, names)
    assert expected, "nothing to compare"
    for width in WIDTHS:
        text = draw(view, data, width, *args)
        lines = text.splitlines()
        assert all(len(line) <= width for line in lines), (width, max(lines, key=len))
        assert "…" not in text, text
        got = kept(text, names)
        missing = {w: n for w, n in expected.items() if got[w] < n}
        assert not missing, (width, missing, text)
        for line in lines:  # a count stays with its noun, an arrow with what it points to
            assert not re.search(r"(\(\d+|->)\s*$", line), (width, line, text)


def long_model(tmp_path: Path) -> Path:
    """Two pairs with long layer names: mergeable, and unmergeable (with a counterexample)."""
    gen = torch.Generator().manual_seed(0)
    parts = [conv(f"{LONG}.conv1", "x", 3, 4, 3, padding=2, gen=gen),
             conv(f"{LONG}.conv2", f"{LONG}.conv1", 4, 4, 3, padding=1, gen=gen),
             ({"name": "act", "op": "relu", "input": f"{LONG}.conv2"}, {}),
             conv(f"{LONG}.conv3", "act", 4, 2, 3, stride=2, padding=0, gen=gen),
             conv(f"{LONG}.conv4", f"{LONG}.conv3", 2, 2, 3, padding=2, gen=gen)]
    tensors = {k: v for _, t in parts for k, v in t.items()}
    return save(tmp_path / "long.safetensors", tensors, describe([p[0] for p in parts], [f"{LONG}.conv4"]))


def names_of(path: Path) -> set[str]:
    header = model.io.read_header(str(path))
    doc, _ = model.find_description(header)
    return {layer["name"] for layer in doc["layers"]}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("render")
    return {"stack": stack_model(tmp / "stack.safetensors"), "long": long_model(tmp)}


@pytest.mark.parametrize("which", ["stack", "long"])
@pytest.mark.parametrize("verbose", [False, True])
def test_check_report_keeps_numbers_whole(files: dict[str, Path], which: str, verbose: bool) -> None:
    rep = model.check_file(str(files[which]), Options(input_size=(10, 10))).to_dict()
    assert_whole(render.report, rep, names_of(files[which]), verbose)


@pytest.mark.parametrize("which", ["stack", "long"])
def test_fuse_report_keeps_numbers_whole(files: dict[str, Path], which: str, tmp_path: Path) -> None:
    rep = model.fuse_file(str(files[which]), str(tmp_path / "out.safetensors"),
                          Options(policy="all", input_size=(9, 9))).to_dict()
    assert rep["merges"], "no merges table to check"
    assert_whole(render.report, rep, names_of(files[which]))


@pytest.mark.parametrize("which", ["stack", "long"])
def test_inspect_keeps_numbers_whole(files: dict[str, Path], which: str) -> None:
    info = model.inspect_file(str(files[which]))
    assert_whole(render.inspect, info, names_of(files[which]))


@pytest.mark.parametrize("which, first, second, size", [("stack", "c5", "c6", None), ("stack", "c3", "c4", (12, 12)),
                                                       ("long", f"{LONG}.conv3", f"{LONG}.conv4", (30, 30))])
def test_explain_keeps_numbers_and_labels_whole(files: dict[str, Path], which: str, first: str, second: str,
                                                size: Any) -> None:
    data = _explain(files[which], first, second, size)
    assert_whole(render.explain, data, names_of(files[which]))
    for width in WIDTHS:
        words = re.findall(r"\S+", draw(render.explain, data, width))
        assert {"conv1", "conv2", "candidate"} <= set(words), width


def _explain(path: Path, first: str, second: str, size: Any) -> dict:
    header = model.io.read_header(str(path))
    doc, where = model.find_description(header)
    return explain_pair(parse(doc, header.tensors, where), model.file_tensors(header), first, second, size)


@pytest.mark.parametrize("width", WIDTHS)
def test_wrapped_reasons_are_indented(files: dict[str, Path], width: int) -> None:
    rep = model.check_file(str(files["long"]), Options(input_size=(10, 10))).to_dict()
    lines = draw(render.report, rep, width, True).splitlines()
    first = next(i for i, line in enumerate(lines) if re.match(r"\s*1\. ", line))
    block = lines[first:]
    starts = [i for i, line in enumerate(block) if re.match(r"\s*\d+\. ", line)]
    assert len(starts) == len(rep["pairs"])
    end = next(i for i, line in enumerate(block) if not line.strip())
    for line in block[:end]:
        assert re.match(r"\s*\d+\. ", line) or line.startswith("    "), (width, line)


def _grid_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and set(line) <= set(render.SHADES + render.EQUAL)]


@pytest.mark.parametrize("width", WIDTHS)
def test_large_error_map_is_downsampled_to_fit(files: dict[str, Path], width: int) -> None:
    data = _explain(files["stack"], "c5", "c6", (130, 130))
    full = len(data["error_map"][0])
    assert full >= 130
    text = draw(render.explain, data, width)
    rows = _grid_rows(text)
    assert rows and all(len(row) <= width for row in rows)
    assert len({len(row) for row in rows}) == 1, "a row of the map wrapped"
    assert ("downsampled" in text) is (full > width)
    # the border ring still shows: the first and last rows and columns hold error marks
    assert set(rows[0]) - {render.EQUAL} and set(rows[-1]) - {render.EQUAL}


def test_small_error_map_is_one_character_per_position(files: dict[str, Path]) -> None:
    data = _explain(files["stack"], "c5", "c6", (9, 9))
    text = draw(render.explain, data, 100)
    rows = _grid_rows(text)
    assert len(rows) == len(data["error_map"]) and len(rows[0]) == len(data["error_map"][0])
    assert "downsampled" not in text


def test_error_map_legend_names_each_symbol_once() -> None:
    legend = render.map_legend()
    assert render.EQUAL not in render.SHADES
    assert "." not in render.SHADES + render.EQUAL, "'.' and '·' look alike"
    for symbol in (render.EQUAL, render.SHADES[0], render.SHADES[-1]):
        assert legend.count(f"'{symbol}'") == 1, legend


def test_names_are_shown_literally_never_as_markup(tmp_path: Path) -> None:
    """Layer names come from the file: '[/]' or '[red]' in one is text, not a rich markup tag."""
    gen = torch.Generator().manual_seed(0)
    a, b = "[red]a[/]", "b[/]"
    parts = [conv(a, "x", 2, 2, 3, gen=gen), conv(b, a, 2, 2, 3, padding=2, gen=gen)]
    path = save(tmp_path / "m.safetensors", {k: v for _, t in parts for k, v in t.items()},
                describe([p[0] for p in parts], [b]))
    text = draw(render.report, model.check_file(str(path), Options(input_size=(9, 9))).to_dict(), 200)
    assert f"{a} -> {b}" in text
    assert a in draw(render.inspect, model.inspect_file(str(path)), 200)
    assert f"{a} -> {b}" in draw(render.explain, _explain(path, a, b, (9, 9)), 200)
