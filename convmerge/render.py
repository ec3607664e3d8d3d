"""Terminal rendering of reports, listings and explanations (rich), from the same dicts as --json."""

from __future__ import annotations

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


def _macs(m: Optional[dict[str, Any]]) -> str:
    """'before -> after'; no 'after' where the merge cannot happen (a saving that would never be real)."""
    if not m or m.get("before") is None:
        return "-"
    after = "-" if m.get("after") is None else _si(m["after"])
    return f"{_si(m['before'])} -> {after}"


def _si(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def report(console: Console, rep: dict[str, Any], verbose: bool = False) -> None:
    """The regions and pairs tables, each reason below its table (reasons are sentences), the merges, a summary."""
    if rep.get("regions"):
        r = _table("Regions (linear parts between one input and one output)")
        for col in ("#", "region", "verdict", "merged conv", "MACs before -> after"):
            r.add_column(col, overflow="fold")
        for i, g in enumerate(rep["regions"], 1):
            name = f"{g['input']} -> {g['output']} ({len(g['layers'])} layers{', branches' if g['kind'] == 'branches' else ''})"
            verdict = Text(g["verdict"], style=VERDICT_STYLE.get(g["verdict"], ""))
            if g.get("applied"):
                verdict.append(" (merged)", style="bold")
            r.add_row(f"R{i}", name, verdict, conv_words(g.get("merged")), _macs(g.get("macs")))
        console.print(r)
        for i, g in enumerate(rep["regions"], 1):
            line = Text(f" R{i}. ", style="bold").append(g["reason"])
            ce = g.get("counterexample")
            if ce and verbose:
                line.append(f"\n    counterexample: input {ce['input_shape']}, output {ce['output_index']}: layers "
                            f"{ce['pair_value']:.6g}, single conv {ce['candidate_value']:.6g}", style="dim")
            console.print(line)
    if not rep["pairs"]:
        _merges_and_summary(console, rep)
        return
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
            line.append(f"\n    counterexample: input {ce['input_shape']}, output {ce['output_index']}: pair "
                        f"{ce['pair_value']:.6g}, single conv {ce['candidate_value']:.6g}", style="dim")
        console.print(line)
    _merges_and_summary(console, rep)


def _merges_and_summary(console: Console, rep: dict[str, Any]) -> None:
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
            f"{s['unmergeable']} unmergeable, {s['skipped']} skipped; {s['merged']} merged; "
            f"{s['regions']} region(s), {s['regions_merged']} merged whole; "
            f"convs {s['convs_before']} -> {s['convs_after']}"
            + (f" ({s['bn_folded']} conv-BN fold(s))" if s.get("bn_folded") else ""))
    if rep.get("output"):
        unchanged = not rep.get("merges")
        line += f" -> wrote {rep['output']}" + (" (an unchanged copy: nothing merged)" if unchanged else "")
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
    if e.get("kind") == "region":
        explain_region(console, e)
        return
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
        lines.append(Text(f"counterexample: input {ce['input_shape']}, output {ce['output_index']}: "
                          f"pair {ce['pair_value']:.6g}, single conv {ce['candidate_value']:.6g}"))
    console.print(specs, conds, Group(*lines))
    if e.get("error_map") is not None:
        console.print(Text(f"\n|pair - single conv| per output position (one slice, max over channels; "
                           f"'{SHADES[1]}' small ... '{SHADES[-1]}' largest, '·' equal):"))
        console.print(error_grid(e["error_map"]))


def explain_region(console: Console, e: dict[str, Any]) -> None:
    """A region: its branches as single convs, the steps that decide it, the candidate, and where it differs."""
    title = f"region {e['input']} -> {e['output']} ({len(e['layers'])} layers)"
    if e["branches"]:
        t = _table(title + ": branches")
        for col in ("branch output", "layers", "as one conv", "verdict"):
            t.add_column(col, overflow="fold")
        for b in e["branches"]:
            t.add_row(b["output"], str(len(b["layers"])), conv_words(b["conv"]) + (" +bias" if b["conv"] and
                                                                                   b["conv"]["bias"] else ""),
                      Text(b["verdict"], style=VERDICT_STYLE.get(b["verdict"], "")))
        console.print(t)
    else:
        console.print(Text(title, style="bold"))
    if e["steps"]:
        s = _table("Steps (each move of the reduction, in order)")
        for col in ("from", "to", "verdict", "why"):
            s.add_column(col, overflow="fold")
        for step in e["steps"]:
            s.add_row(step["from"], step["to"], Text(step["verdict"], style=VERDICT_STYLE.get(step["verdict"], "")),
                      step["reason"])
        console.print(s)
    size = "x".join(map(str, e["size"]))
    verdict = Text(e["verdict"], style=VERDICT_STYLE.get(e["verdict"], ""))
    lines = [Text.assemble("verdict: ", verdict, f" - {e['reason']}"),
             Text(f"candidate: {conv_words(e['candidate'])}"),
             Text(f"at input size {size}: {'exact' if e['exact_at_size'] else 'differs'}; MACs {_macs(e['macs'])}")]
    if e["counterexample"]:
        ce = e["counterexample"]
        lines.append(Text(f"counterexample: input {ce['input_shape']}, output {ce['output_index']}: "
                          f"layers {ce['pair_value']:.6g}, single conv {ce['candidate_value']:.6g}"))
    console.print(Group(*lines))
    if e.get("error_map") is not None:
        console.print(Text(f"\n|layers - single conv| per output position (one slice, max over channels; "
                           f"'{SHADES[1]}' small ... '{SHADES[-1]}' largest, '·' equal):"))
        console.print(error_grid(e["error_map"]))


def error_grid(grid: list[list[float]]) -> Text:
    """The border ring at a glance: one character per output position, shaded by error."""
    top = max((v for row in grid for v in row), default=0.0)
    out = Text()
    for row in grid:
        for v in row:
            if top <= 0 or v <= 1e-12 * max(top, 1.0):
                out.append("·", style="dim")
            else:
                level = 1 + min(len(SHADES) - 2, int((v / top) * (len(SHADES) - 2)))
                out.append(SHADES[level], style="red")
        out.append("\n")
    return out
