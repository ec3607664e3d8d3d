"""Terminal rendering of reports, listings and explanations (rich), from the same dicts as --json.

Tables are data: a tuple of `Column`s per table, and `grid` lays any of them out. `grid` picks
the column widths itself, because rich shrinks the widest column first and so folds numbers
mid-token on a narrow terminal (`1.3e-15` over two lines): every column is at least as wide as
its longest unit, and cells wrap only between units. A unit is a word, or words glued with
GLUE ('(2 layers)', '-> c2'); names and numbers are never split. Where the columns do not fit
with every unit whole, the rows are shown as a list instead ('header: value' lines under each).

One module for all terminal output, so that every table shares `grid` and its wrapping rules; that is why it is
long.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import groupby
from typing import Any, Callable, Optional, Union

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

VERDICT_STYLE = {"mergeable": "green", "size-dependent": "yellow", "unmergeable": "red", "skipped": "dim"}
SHADES = ":-=+*#%@"
"""Error-map marks from the smallest difference to the largest."""
EQUAL = "·"
"""Error-map mark of an output position where the pair and the single conv agree."""
GLUE = "\u00a0"
"""Joins words that must stay on one line (shown as a space): rich would break at it, so `_wrap` breaks lines."""

Cell = Union[str, Text]


@dataclass(frozen=True)
class Column:
    """One table column: its header, how a row fills it, and how it may wrap.

    Cells wrap between units (words, or words glued with GLUE); `whole` cells never wrap (short values
    such as '>= 2' or a shape).
    """

    header: str
    cell: Callable[[dict[str, Any]], Cell]
    whole: bool = False


def grid(console: Console, title: Optional[str], columns: tuple[Column, ...],
         rows: list[dict[str, Any]]) -> RenderableType:
    """A table of `rows` whose names, numbers and verdicts stay whole at the console's width, or, where no
    table fits, the same rows as a list."""
    cells = [[_text(c.cell(row)) for c in columns] for row in rows]
    heads = [Text(c.header) for c in columns]
    longest = [max([_longest_line(heads[j])] + [_longest_line(r[j]) for r in cells]) for j in range(len(columns))]
    shortest = [max([_longest_word(heads[j])] + [_least(r[j], col) for r in cells]) for j, col in enumerate(columns)]
    for pad in (1, 0):  # a gap of three between columns, or of one where that is what fits
        widths = _fit(console.width - (2 * pad + 1) * (len(columns) - 1), shortest, longest)
        if widths is not None:
            break
    else:
        return _listing(console.width, title, heads, cells)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, pad), header_style="bold")
    for head, width in zip(heads, widths):
        table.add_column(head, width=width, overflow="fold")
    for row in cells:
        table.add_row(*(_wrap(cell, width) for cell, width in zip(row, widths)))
    return Group(_wrap(Text(title, style="bold"), console.width), table) if title else table


def _listing(width: int, title: Optional[str], heads: list[Text], cells: list[list[Text]]) -> Group:
    """Rows as a list: each row's first cell, then 'header: value' for the others, indented; wrapped lines
    of a value line up under its start."""
    out: list[RenderableType] = [_wrap(Text(title, style="bold"), width)] if title else []
    for row in cells:
        out.append(_wrap(row[0], width))
        for head, cell in zip(heads[1:], row[1:]):
            label = f"    {head.plain}: " if head.plain else "    "
            body = _wrap(cell, max(width - len(label), 1))
            lines = body.split("\n")
            joined = Text()
            for k, line in enumerate(lines):
                joined.append(label if k == 0 else " " * len(label), style="dim" if k == 0 else "")
                joined.append_text(line)
                if k < len(lines) - 1:
                    joined.append("\n")
            out.append(joined)
    return Group(*out)


def _wrap(t: Text, width: int) -> Text:
    """`t` with line breaks at spaces only (never at GLUE, never inside a word), each line within `width`
    where its units allow; GLUE then shows as a space."""
    plain = t.plain
    breaks, line_start, last_space = [], 0, -1
    for k, ch in enumerate(plain):
        if ch == "\n":
            line_start, last_space = k + 1, -1
        elif ch == " ":
            last_space = k
        if k - line_start >= width and last_space > line_start and ch not in " \n":
            breaks.append(last_space)
            line_start, last_space = last_space + 1, -1
    out = t.copy()
    if breaks:
        chars = list(plain)
        for k in breaks:
            chars[k] = "\n"
        out = Text("".join(chars), style=t.style, spans=list(t.spans), end=t.end)
    if GLUE in out.plain:
        out = Text(out.plain.replace(GLUE, " "), style=out.style, spans=list(out.spans), end=out.end)
    return out


def _fit(room: int, shortest: list[int], longest: list[int]) -> Optional[list[int]]:
    """Widths within `room`: each column at least its longest unit, the rest shared out; None if none fit."""
    widths = list(shortest)
    if sum(widths) > room:
        return None
    spare = room - sum(widths)
    while spare > 0:
        growing = [j for j in range(len(widths)) if widths[j] < longest[j]]
        if not growing:
            break
        for j in growing[:spare]:
            widths[j] += 1
        spare = room - sum(widths)
    return widths


def _text(cell: Cell) -> Text:
    return cell if isinstance(cell, Text) else Text(cell)


def _longest_line(t: Text) -> int:
    return max((len(line) for line in t.plain.splitlines()), default=0)


def _longest_word(t: Text) -> int:
    """The longest unit: words glued with GLUE count as one."""
    return max((len(word) for word in t.plain.replace("\n", " ").split(" ")), default=0)


def _least(t: Text, col: Column) -> int:
    return _longest_line(t) if col.whole else _longest_word(t)


def conv_words(fields: Optional[dict[str, Any]]) -> str:
    """'4x4 s2 p[1,1][1,1]' style summary of a conv's fields."""
    if not fields:
        return "-"
    if not fields["kernel_size"]:
        return "linear"  # no spatial axes
    k = "x".join(map(str, fields["kernel_size"]))
    s = _axes(fields["stride"])
    pads = [[p, p] if isinstance(p, int) else p for p in fields["padding"]]  # a conv_transpose's: one per axis
    p = str(pads[0][0]) if all(lo == hi == pads[0][0] for lo, hi in pads) else "".join(f"[{lo},{hi}]" for lo, hi in pads)
    extra = ""
    if fields.get("groups", 1) != 1:
        extra += f" g{fields['groups']}"
    if fields.get("padding_mode", "zeros") != "zeros":
        extra += f" {fields['padding_mode']}"
    if any(d != 1 for d in fields.get("dilation", [1])):
        extra += " d" + _axes(fields["dilation"])
    if fields.get("transposed"):
        extra += " transposed" + (" op" + _axes(fields["output_padding"]) if any(fields["output_padding"]) else "")
    return f"{k} s{s} p{p}{extra}"


def _axes(values: list[int]) -> str:
    return str(values[0]) if len(set(values)) == 1 else "x".join(map(str, values))


def _macs(m: Optional[dict[str, Any]]) -> str:
    """'before -> after' (one unit); no 'after' where the merge cannot happen (a saving that would never be real)."""
    if not m or m.get("before") is None:
        return "-"
    after = "-" if m.get("after") is None else _si(m["after"])
    return f"{_si(m['before'])}{GLUE}->{GLUE}{after}"


def _si(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def _verdict(p: dict[str, Any]) -> Text:
    t = Text(p["verdict"], style=VERDICT_STYLE.get(p["verdict"], ""))
    if p.get("applied"):
        t.append(" (merged)", style="bold")
    return t


def _pair_name(p: dict[str, Any]) -> str:
    return f"{p['first']} ->{GLUE}{p['second']}" + (f" (via{GLUE}{', '.join(p['via'])})" if p["via"] else "")


def _region_name(r: dict[str, Any]) -> str:
    what = count(len(r["layers"]), "layer", GLUE) + (f",{GLUE}branches" if r["kind"] == "branches" else "")
    return f"{r['input']} ->{GLUE}{r['output']} ({what})"


REGION_COLUMNS = (
    Column("#", lambda r: str(r["number"]), whole=True),
    Column("region", _region_name),
    Column("verdict", _verdict),
    Column("one conv", lambda r: conv_words(r.get("merged"))),
    Column("MACs", lambda r: _macs(r.get("macs"))),
)
PAIR_COLUMNS = (
    Column("#", lambda p: str(p["number"]), whole=True),
    Column("pair", _pair_name),
    Column("verdict", _verdict),
    Column("merged conv", lambda p: conv_words(p.get("merged"))),
    Column("MACs", lambda p: _macs(p.get("macs"))),
)
MERGE_COLUMNS = (
    Column("layers", lambda m: " + ".join(m["layers"])),
    Column("into", lambda m: m["into"]),
    Column("conv", lambda m: conv_words(m["conv"])),
    Column("dtype", lambda m: m["dtype"], whole=True),
    Column("error (f64)", lambda m: f"{m['verified_max_error']:.1e}", whole=True),
    Column("rounding", lambda m: f"{m['rounding_error']:.1e}", whole=True),
    Column("MACs", lambda m: _macs(m["macs"])),
)


@dataclass(frozen=True)
class Section:
    """A table of the report: the key of its rows, its title, its columns, and whether each row's
    'reason' is listed below it (numbered like the table's '#')."""

    key: str
    title: str
    columns: tuple[Column, ...]
    reasons: bool = False
    prefix: str = ""  # before each row's number ('R1'), so two numbered sections stay apart


REPORT_SECTIONS = (
    Section("regions", "Regions (linear layers between one input and one output)", REGION_COLUMNS, reasons=True,
            prefix="R"),
    Section("pairs", "Conv pairs", PAIR_COLUMNS, reasons=True),
    Section("merges", "Merges", MERGE_COLUMNS),
)


def report(console: Console, rep: dict[str, Any], verbose: bool = False) -> None:
    """Each non-empty section's table (pairs with their reasons below, merges), then a summary line."""
    for section in REPORT_SECTIONS:
        rows = [dict(row, number=f"{section.prefix}{i}") for i, row in enumerate(rep.get(section.key) or [], 1)]
        if not rows:
            continue
        console.print(grid(console, section.title, section.columns, rows))
        if section.reasons:
            console.print(_reasons(rows, verbose))
        console.print()
    notes(console, rep.get("notes"))
    console.print(_wrap(Text(summary_line(rep, GLUE)), console.width))


def count(n: int, noun: str, glue: str = " ") -> str:
    """'1 conv pair', '2 conv pairs'; with GLUE, one unit."""
    return f"{n} {noun}{'' if n == 1 else 's'}".replace(" ", glue)


def notes(console: Console, lines: Optional[list[str]]) -> None:
    for note in lines or []:
        console.print(Text.assemble(("note: ", "yellow"), note))


def _reasons(rows: list[dict[str, Any]], verbose: bool) -> Table:
    """'n. reason', wrapped lines indented under the reason; -v adds the counterexample's values."""
    t = Table.grid(padding=(0, 1, 0, 0))
    t.add_column(justify="right", no_wrap=True)
    t.add_column(overflow="fold")
    for p in rows:
        text = Text(p["reason"])
        ce = p.get("counterexample")
        if ce and verbose:
            text.append(f"\n{counterexample_words(ce, 'layers')}", style="dim")
        t.add_row(Text(f" {p['number']}.", style="bold"), text)
    return t


def summary_line(rep: dict[str, Any], glue: str = " ") -> str:
    """One line; `glue` joins the words of each phrase (GLUE keeps a count with its noun, an arrow with its
    operands, when the terminal wraps the line)."""
    s = rep["summary"]
    size = rep.get("input_size")
    cost = rep.get("cost_size")
    g = glue
    at = (f"at input{g}size{g}{'x'.join(map(str, size))}" if size else
          f"for every input{g}size (no{g}--input-size" + (f"; costs{g}at{g}{'x'.join(map(str, cost))})" if cost else ")"))
    line = (f"{s['regions']}{g}region(s) {at}: {s['regions_merged']}{g}merged{g}whole, {s['regions_unmergeable']}{g}"
            f"unmergeable; {s['pairs']}{g}pair(s): {s['mergeable']}{g}mergeable, {s['size_dependent']}{g}size-dependent, "
            f"{s['unmergeable']}{g}unmergeable, {s['skipped']}{g}skipped; {s['merged']}{g}merged; "
            f"convs{g}{s['convs_before']}{g}->{g}{s['convs_after']}"
            + (f" ({s['bn_folded']}{g}conv-BN{g}fold(s))" if s.get("bn_folded") else ""))
    if rep.get("output"):
        line += (f" ->{g}wrote{g}{rep['output']}" +
                 ("" if rep.get("merges") else f" (an{g}unchanged{g}copy: nothing{g}merged)"))
    return line


TENSOR_COLUMNS = (
    Column("tensor", lambda c: c["name"]),
    Column("dtype", lambda c: c["dtype"], whole=True),
    Column("shape", lambda c: str(c["shape"]), whole=True),
    Column("kernel", lambda c: "x".join(map(str, c["shape"][2:])), whole=True),
)
LISTED_PAIR_COLUMNS = (
    Column("first", lambda p: p["first"]),
    Column("second", lambda p: p["second"]),
    Column("via", lambda p: ", ".join(p["via"]) or "-"),
    Column("status", lambda p: p["blocked"] or "candidate"),
)


def inspect(console: Console, info: dict[str, Any]) -> None:
    console.print(grid(console, f"Conv-shaped tensors in {info['file']}", TENSOR_COLUMNS, info["conv_tensors"]))
    console.print(Text(f"{count(info['tensor_count'], 'tensor')}, {len(info['conv_tensors'])} conv-shaped"))
    if info.get("description") is None:
        console.print(Text.assemble(("no graph description: ", "yellow"), info["missing"]))
        return
    console.print(_wrap(Text(f"description: {info['description']} ({count(info['layer_count'], 'layer', GLUE)},"
                             f"{GLUE}{count(len(info['pairs']), 'conv pair', GLUE)})"), console.width))
    if info["pairs"]:
        console.print(grid(console, "Conv pairs", LISTED_PAIR_COLUMNS, info["pairs"]))
    notes(console, info.get("notes"))


SPEC_ROWS = (
    ("kernel", lambda f: "x".join(map(str, f["kernel_size"]))),
    ("stride", lambda f: "x".join(map(str, f["stride"]))),
    ("padding", lambda f: " ".join(f"[{lo},{hi}]" for lo, hi in f["padding"])),
    ("dilation", lambda f: "x".join(map(str, f["dilation"]))),
    ("groups", lambda f: str(f["groups"])),
    ("mode", lambda f: f["padding_mode"]),
    ("bias", lambda f: (f"from {f['bias_from']}" if f.get("bias_from") else "yes") if f["bias"] else "no"),
)
"""The rows of explain's spec table: one conv per column, so it stays narrow."""
CONDITION_COLUMNS = (
    Column("axis", lambda r: r["axis"], whole=True),
    Column("side", lambda r: r["side"], whole=True),
    Column("conv2 pad", lambda r: str(r["conv2_pad"]), whole=True),
    Column("conv2 reads padding", lambda r: "yes" if r["conv2_reads_padding"] else "no", whole=True),
    Column("conv1 pad", lambda r: str(r["conv1_pad"]), whole=True),
    Column("conv1 pad needed", lambda r: "-" if r["conv1_pad_needed"] is None else f">= {r['conv1_pad_needed']}",
           whole=True),
    Column("holds", lambda r: Text("yes", style="green") if r["holds"] else Text("no", style="red"), whole=True),
)


def explain(console: Console, e: dict[str, Any]) -> None:
    if e.get("kind") == "region":
        explain_region(console, e)
        return
    convs = (("conv1", e["specs"][0]), ("conv2", e["specs"][1]), ("candidate", e["candidate"]))
    spec_columns = (Column("", lambda r: r["label"], whole=True),) + tuple(
        Column(name, lambda r, name=name: r[name]) for name, _ in convs)
    spec_rows = [dict(label=label, **{name: show(f) for name, f in convs}) for label, show in SPEC_ROWS]
    title = f"{e['first']} ->{GLUE}{e['second']}" + (f" (via{GLUE}{', '.join(e['via'])})" if e["via"] else "")
    size = "x".join(map(str, e["size"])) or "[N, C] (no spatial axes)"
    verdict = Text(e["verdict"], style=VERDICT_STYLE.get(e["verdict"], ""))
    lines = [Text.assemble("verdict: ", verdict, f" - {e['reason']}"),
             Text(f"at input size {size}: {'exact' if e['exact_at_size'] else 'differs'}; MACs {_macs(e['macs'])}")]
    if e["counterexample"]:
        ce = e["counterexample"]
        lines.append(Text(counterexample_words(ce, "pair")))
    borders = [grid(console, "Border conditions (per axis and side)", CONDITION_COLUMNS, e["conditions"])] \
        if e["conditions"] else []  # linear layers have no border
    console.print(grid(console, title, spec_columns, spec_rows), *borders, Group(*lines))
    _error_map(console, e, "pair")
    notes(console, e.get("notes"))


BRANCH_COLUMNS = (
    Column("branch output", lambda b: b["output"]),
    Column("layers", lambda b: str(len(b["layers"])), whole=True),
    Column("as one conv", lambda b: conv_words(b["conv"]) + (" +bias" if b["conv"] and b["conv"]["bias"] else "")),
    Column("verdict", _verdict),
)
STEP_COLUMNS = (
    Column("from", lambda r: r["from"]),
    Column("to", lambda r: r["to"]),
    Column("verdict", _verdict),
    Column("why", lambda r: r["reason"]),
)


def explain_region(console: Console, e: dict[str, Any]) -> None:
    """A region: its branches as single convs, the moves that decide it, the candidate, and where it differs."""
    title = f"region {e['input']} ->{GLUE}{e['output']} ({count(len(e['layers']), 'layer', GLUE)})"
    if e["branches"]:
        console.print(grid(console, title + ": branches", BRANCH_COLUMNS, e["branches"]))
    else:
        console.print(_wrap(Text(title, style="bold"), console.width))
    if e["steps"]:
        console.print(grid(console, "Steps (each move of the reduction, in order)", STEP_COLUMNS, e["steps"]))
    size = "x".join(map(str, e["size"])) or "[N, C] (no spatial axes)"
    verdict = Text(e["verdict"], style=VERDICT_STYLE.get(e["verdict"], ""))
    lines = [Text.assemble("verdict: ", verdict, f" - {e['reason']}"),
             Text(f"candidate: {conv_words(e['candidate'])}"),
             Text(f"at input size {size}: {'exact' if e['exact_at_size'] else 'differs'}; MACs {_macs(e['macs'])}")]
    if e["counterexample"]:
        ce = e["counterexample"]
        lines.append(Text(counterexample_words(ce, "layers")))
    console.print(Group(*lines))
    _error_map(console, e, "layers")
    notes(console, e.get("notes"))


def _error_map(console: Console, e: dict[str, Any], what: str) -> None:
    if e.get("error_map") is None:
        return
    shown, step = downsample(e["error_map"], console.width)
    note = (f"; downsampled to fit: one character per {step}x{step} block of positions, its largest"
            if step > 1 else "")
    console.print(Text(f"\n|{what} - single conv| per output position (one slice, max over channels{note}; "
                       f"{map_legend()}):"))
    console.print(error_grid(shown), no_wrap=True, crop=True)


def map_legend() -> str:
    return f"'{EQUAL}' equal, '{SHADES[0]}' smallest difference ... '{SHADES[-1]}' largest"


def downsample(grid_: list[list[float]], width: int) -> tuple[list[list[float]], int]:
    """The map with f x f blocks merged into their largest value, f the least that fits `width` columns."""
    cols = max((len(row) for row in grid_), default=0)
    step = max(1, math.ceil(cols / max(width, 1)))
    if step == 1:
        return grid_, 1
    out = []
    for i in range(0, len(grid_), step):
        block = grid_[i:i + step]
        out.append([max(v for row in block for v in row[j:j + step]) for j in range(0, cols, step)])
    return out, step


def counterexample_words(ce: dict[str, Any], what: str = "pair") -> str:
    """One line; says when the input is a smaller stand-in for the size asked (same border behaviour)."""
    stand_in = ce.get("representative_of")
    where = f" (a stand-in for {'x'.join(map(str, stand_in))}: the borders behave the same)" if stand_in else ""
    head = f"counterexample: input {ce['input_shape']}{where}, output {ce['output_index']}: "
    shapes = ce.get("output_shapes")
    if shapes:  # one side has a position the other lacks (ceil mode's partial window)
        value = lambda v: "no such output" if v is None else f"{v:.6g}"  # noqa: E731
        return (head + f"{what} {value(ce['pair_value'])}, single conv {value(ce['candidate_value'])} (outputs "
                f"{shapes['pair']} and {shapes['candidate']}: the size itself is the counterexample)")
    return head + f"{what} {ce['pair_value']:.6g}, single conv {ce['candidate_value']:.6g}"


def error_grid(grid_: list[list[float]]) -> Text:
    """The border ring at a glance: one character per output position, shaded by error.

    Cells are appended a run of one style at a time: a span per cell would take hundreds of MB
    at 1024x1024.
    """
    top = max((v for row in grid_ for v in row), default=0.0)
    out = Text()
    for row in grid_:
        cells = [EQUAL if top <= 0 or v <= 1e-12 * max(top, 1.0) else
                 SHADES[min(len(SHADES) - 1, int((v / top) * len(SHADES)))] for v in row]
        for equal, run in groupby(cells, key=lambda c: c == EQUAL):
            out.append("".join(run), style="dim" if equal else "red")
        out.append("\n")
    return out
