"""Terminal rendering of reports, listings and explanations (rich), from the same dicts as --json."""

from __future__ import annotations

from itertools import groupby
from typing import Any, Optional

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

VERDICT_STYLE = {"mergeable": "green", "size-dependent": "yellow", "unmergeable": "red", "skipped": "dim"}
SHADES = " .:-=+*#%@"


def _table(title: Optional[str] = None) -> Table:
    return Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", title_style="bold")


def conv_words(fields: Optional[dict[str, Any]]) -> str:
    """'4x4 s2 p[1,1][1,1]' style summary of a conv's fields."""
    if not fields:
        return "-"
    k = "x".join(map(str, fields["kernel_size"]))
    s = _axes(fields["stride"])
    pads = fields["padding"]
    p = str(pads[0][0]) if all(lo == hi == pads[0][0] for lo, hi in pads) else "".join(f"[{lo},{hi}]" for lo, hi in pads)
    extra = ""
    if fields.get("groups", 1) != 1:
        extra += f" g{fields['groups']}"
    if fields.get("padding_mode", "zeros") != "zeros":
        extra += f" {fields['padding_mode']}"
    if any(d != 1 for d in fields.get("dilation", [1])):
        extra += " d" + _axes(fields["dilation"])
    return f"{k} s{s} p{p}{extra}"


def _axes(values: list[int]) -> str:
    return str(values[0]) if len(set(values)) == 1 else "x".join(map(str, values))


def _macs(m: Optional[dict[str, int]]) -> str:
    if not m:
        return "-"
    return f"{_si(m['before'])} -> {_si(m['after'])}"


def _si(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def report(console: Console, rep: dict[str, Any], verbose: bool = False) -> None:
    """The pairs table, each pair's reason below it (reasons are sentences), the merges, a summary."""
    t = _table("Conv pairs")
    for col in ("#", "pair", "verdict", "merged conv", "MACs before -> after"):
        t.add_column(col, overflow="fold")
    for i, p in enumerate(rep["pairs"], 1):
        name = f"{p['first']} -> {p['second']}" + (f" (via {', '.join(p['via'])})" if p["via"] else "")
        verdict = Text(p["verdict"], style=VERDICT_STYLE.get(p["verdict"], ""))
        if p.get("applied"):
            verdict.append(" (merged)", style="bold")
        t.add_row(str(i), name, verdict, conv_words(p.get("merged")), _macs(p.get("macs")))
    console.print(t)
    for i, p in enumerate(rep["pairs"], 1):
        line = Text(f" {i}. ", style="bold").append(p["reason"])
        ce = p.get("counterexample")
        if ce and verbose:
            line.append(f"\n    {counterexample_words(ce)}", style="dim")
        console.print(line)
    if rep.get("merges"):
        m = _table("\nMerges")
        for col in ("layers", "into", "conv", "dtype", "max error (f64)", "rounding", "MACs before -> after"):
            m.add_column(col, overflow="fold")
        for e in rep["merges"]:
            m.add_row(" + ".join(e["layers"]), e["into"], conv_words(e["conv"]), e["dtype"],
                      f"{e['verified_max_error']:.1e}", f"{e['rounding_error']:.1e}", _macs(e["macs"]))
        console.print(m)
    console.print(summary_line(rep))


def summary_line(rep: dict[str, Any]) -> str:
    s = rep["summary"]
    size = rep.get("input_size")
    cost = rep.get("cost_size")
    at = (f"at input size {'x'.join(map(str, size))}" if size else
          "for every input size (no --input-size" + (f"; costs at {'x'.join(map(str, cost))})" if cost else ")"))
    line = (f"{s['pairs']} pair(s) {at}: {s['mergeable']} mergeable, {s['size_dependent']} size-dependent, "
            f"{s['unmergeable']} unmergeable, {s['skipped']} skipped; {s['merged']} merged")
    if rep.get("output"):
        line += f" -> wrote {rep['output']}"
    return line


def inspect(console: Console, info: dict[str, Any]) -> None:
    t = _table(f"Conv-shaped tensors in {info['file']}")
    for col in ("tensor", "dtype", "shape", "kernel"):
        t.add_column(col)
    for c in info["conv_tensors"]:
        t.add_row(c["name"], c["dtype"], str(c["shape"]), "x".join(map(str, c["shape"][2:])))
    console.print(t)
    console.print(f"{info['tensor_count']} tensor(s), {len(info['conv_tensors'])} conv-shaped")
    if info.get("description") is None:
        console.print(f"[yellow]no graph description:[/] {info['missing']}")
        return
    console.print(f"description: {info['description']} ({info['layer_count']} layers, {len(info['pairs'])} conv pairs)")
    if info["pairs"]:
        p = _table("Conv pairs")
        for col in ("first", "second", "via", "status"):
            p.add_column(col)
        for row in info["pairs"]:
            p.add_row(row["first"], row["second"], ", ".join(row["via"]) or "-", row["blocked"] or "candidate")
        console.print(p)


def explain(console: Console, e: dict[str, Any]) -> None:
    specs = _table(f"{e['first']} -> {e['second']}" + (f" (via {', '.join(e['via'])})" if e["via"] else ""))
    for col in ("", "kernel", "stride", "padding [lo,hi]", "dilation", "groups", "mode", "bias"):
        specs.add_column(col)
    for label, f in (("conv1", e["specs"][0]), ("conv2", e["specs"][1]), ("candidate", e["candidate"])):
        specs.add_row(label, str(f["kernel_size"]), str(f["stride"]), str(f["padding"]), str(f["dilation"]),
                      str(f["groups"]), f["padding_mode"], "yes" if f["bias"] else "no")
    conds = _table("Border conditions (per axis and side)")
    for col in ("axis", "side", "conv2 pad", "conv2 reads padding", "conv1 pad", "conv1 pad needed", "holds"):
        conds.add_column(col)
    for r in e["conditions"]:
        need = "-" if r["conv1_pad_needed"] is None else f">= {r['conv1_pad_needed']}"
        conds.add_row(r["axis"], r["side"], str(r["conv2_pad"]), "yes" if r["conv2_reads_padding"] else "no",
                      str(r["conv1_pad"]), need, Text("yes" if r["holds"] else "no", style="green" if r["holds"] else "red"))
    size = "x".join(map(str, e["size"]))
    verdict = Text(e["verdict"], style=VERDICT_STYLE.get(e["verdict"], ""))
    lines = [Text.assemble("verdict: ", verdict, f" - {e['reason']}")]
    lines.append(Text(f"at input size {size}: {'exact' if e['exact_at_size'] else 'differs'}; "
                      f"MACs {_macs(e['macs'])}"))
    if e["counterexample"]:
        ce = e["counterexample"]
        lines.append(Text(counterexample_words(ce)))
    console.print(specs, conds, Group(*lines))
    if e.get("error_map") is not None:
        console.print(Text(f"\n|pair - single conv| per output position (one slice, max over channels; "
                           f"'{SHADES[1]}' small ... '{SHADES[-1]}' largest, '·' equal):"))
        console.print(error_grid(e["error_map"]))


def counterexample_words(ce: dict[str, Any]) -> str:
    """One line; says when the input is a smaller stand-in for the size asked (same border behaviour)."""
    stand_in = ce.get("representative_of")
    where = f" (a stand-in for {'x'.join(map(str, stand_in))}: the borders behave the same)" if stand_in else ""
    return (f"counterexample: input {ce['input_shape']}{where}, output {ce['output_index']}: "
            f"pair {ce['pair_value']:.6g}, single conv {ce['candidate_value']:.6g}")


def error_grid(grid: list[list[float]]) -> Text:
    """The border ring at a glance: one character per output position, shaded by error.

    Cells are appended a run of one style at a time: a span per cell would take hundreds of MB
    at 1024x1024.
    """
    top = max((v for row in grid for v in row), default=0.0)
    out = Text()
    for row in grid:
        cells = []
        for v in row:
            if top <= 0 or v <= 1e-12 * max(top, 1.0):
                cells.append("·")
            else:
                cells.append(SHADES[1 + min(len(SHADES) - 2, int((v / top) * (len(SHADES) - 2)))])
        for equal, run in groupby(cells, key=lambda c: c == "·"):
            out.append("".join(run), style="dim" if equal else "red")
        out.append("\n")
    return out
