"""The `convmerge` command: parse arguments, call the library, render. Nothing else lives here.

torch is imported only inside the commands that need it, so `convmerge --help` starts fast.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Optional

import typer
from rich.console import Console

from . import __version__

EXIT_OK, EXIT_GATE, EXIT_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_CODES = (
    "Exit codes: 0 done; 1 the --fail-on gate failed; 2 usage error or bad input (file, description, arguments); "
    "3 a merge failed its numeric check or another internal error (nothing was written)."
)

app = typer.Typer(
    name="convmerge",
    help="Merge consecutive convolutions into one, exactly, and prove when it cannot.\n\n" + EXIT_CODES,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


class Policy(str, Enum):
    cheaper = "cheaper"
    all = "all"


class FailOn(str, Enum):
    unmergeable = "unmergeable"
    size_dependent = "size-dependent"
    unmerged = "unmerged"


DESC, SIZE, OUT, OUTPUT = "Model description", "Input size and policy", "Output files", "Output and logging"
ModelArg = Annotated[Path, typer.Argument(help="A .safetensors model file (read, never modified).", show_default=False)]
GraphOpt = Annotated[Optional[Path], typer.Option("--graph", "-g", help="Graph description JSON (sidecar file).",
                                                  rich_help_panel=DESC, show_default=False)]
ArchOpt = Annotated[Optional[str], typer.Option("--arch", "-a", metavar="MODULE:CALLABLE",
                                                help="Build and trace this nn.Module (also path/to/file.py:CALLABLE) "
                                                     "when the file has no description.", rich_help_panel=DESC)]
SizeOpt = Annotated[Optional[str], typer.Option(
    "--input-size", "-s", metavar="HxW",
    help="Spatial input size, one number per axis (224x224 or 224,224). Decides size-dependent pairs. "
         "Without it they are not merged and costs assume 224 per axis.", rich_help_panel=SIZE)]
PolicyOpt = Annotated[Policy, typer.Option("--policy", "-p", help="cheaper: merge only where MACs do not grow; "
                                                                   "all: every exact merge.", rich_help_panel=SIZE)]
FailOpt = Annotated[Optional[FailOn], typer.Option(
    "--fail-on", help="Exit 1 if any pair is unmergeable / size-dependent or worse / not merged (for CI).",
    rich_help_panel=OUTPUT, show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the JSON report on stdout (human output goes to stderr).",
                                       rich_help_panel=OUTPUT)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors.", rich_help_panel=OUTPUT)]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Counterexample values and timings.",
                                          rich_help_panel=OUTPUT)]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.", rich_help_panel=OUTPUT)]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"convmerge {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    pass


@app.command(epilog="Example: convmerge check model.safetensors --input-size 224x224 --fail-on unmergeable")
def check(
    model: ModelArg,
    graph: GraphOpt = None,
    arch: ArchOpt = None,
    input_size: SizeOpt = None,
    policy: PolicyOpt = Policy.cheaper,
    counterexamples: Annotated[Optional[Path], typer.Option(
        "--counterexamples", metavar="DIR", help="Write input/pair_output/candidate_output per unmergeable pair.",
        rich_help_panel=OUT)] = None,
    fail_on: FailOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Dry run: judge every conv pair (verdict, reason, merged conv, cost); write nothing."""
    size = _parse_size(input_size)

    def work() -> int:
        from . import model as m

        with _progress(json_out, quiet) as tick:
            rep = m.check_file(str(model), graph_file=_s(graph), arch=arch, input_size=size,
                               policy=policy.value, on_chain=tick)
        if counterexamples is not None:
            _write_counterexamples(rep, counterexamples)
        return _finish(rep.to_dict(), json_out, quiet, verbose, fail_on)

    _run(work, debug)


@app.command(epilog="Example: convmerge fuse model.safetensors -o model.fused.safetensors --input-size 224x224")
def fuse(
    model: ModelArg,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output file [default: <stem>.fused.safetensors "
                                                                          "beside the input].", rich_help_panel=OUT,
                                                   show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite existing output files.",
                                        rich_help_panel=OUT)] = False,
    report: Annotated[Optional[Path], typer.Option("--report", metavar="PATH", help="Also write the JSON report, with "
                                                   "the description used, for reproducibility.", rich_help_panel=OUT)] = None,
    export: Annotated[Optional[Path], typer.Option("--export", metavar="PATH", help="Also write a torch.export "
                                                   "program (.pt2) of the fused model; needs --arch and --input-shape.",
                                                   rich_help_panel=OUT)] = None,
    input_shape: Annotated[Optional[str], typer.Option("--input-shape", metavar="N,C,H,W",
                                                       help="Example input shape for --export.",
                                                       rich_help_panel=OUT)] = None,
    graph: GraphOpt = None,
    arch: ArchOpt = None,
    input_size: SizeOpt = None,
    policy: PolicyOpt = Policy.cheaper,
    fail_on: FailOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Merge every exact conv chain and write a new, self-describing safetensors file."""
    size = _parse_size(input_size)
    out = output or model.with_name(model.name.removesuffix(".safetensors") + ".fused.safetensors")
    shape = _parse_shape(input_shape) if input_shape else None
    if export is not None and (arch is None or shape is None):
        _usage("--export needs --arch MODULE:CALLABLE and --input-shape N,C,H,W")

    def work() -> int:
        from . import io
        from . import model as m

        io.check_outputs([p for p in (out, report, export) if p is not None], [model], force)
        pending: list[tuple[Path, Path]] = []  # (written temp, final path): published once the model is

        def companions(rep: Any, doc: dict) -> None:
            if report is not None:
                data = dict(rep.to_dict(), description_used=doc)
                pending.append(_stage(report, (json.dumps(data, indent=2) + "\n").encode()))
            if export is not None:
                from . import api

                fused = api.fuse(api.load_module(arch, str(model)), input_size=size, policy=policy.value)  # type: ignore[arg-type]
                pending.append(_stage(export, api.export_bytes(fused, shape)))  # type: ignore[arg-type]

        try:
            with _progress(json_out, quiet) as tick:
                rep = m.fuse_file(str(model), str(out), graph_file=_s(graph), arch=arch, input_size=size,
                                  policy=policy.value, force=force, on_chain=tick, before_write=companions)
            for tmp, final in pending:
                os.replace(tmp, final)
        finally:
            for tmp, _ in pending:
                if tmp.exists():
                    tmp.unlink()
        data = rep.to_dict()
        return _finish(data, json_out, quiet, verbose, fail_on)

    _run(work, debug)


@app.command(epilog="Example: convmerge annotate model.safetensors --arch mypkg.models:build -o model.described.safetensors")
def annotate(
    model: ModelArg,
    arch: Annotated[str, typer.Option("--arch", "-a", metavar="MODULE:CALLABLE", help="Module to trace.",
                                      rich_help_panel=DESC)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the annotated copy.",
                                         rich_help_panel=OUT)],
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing output.",
                                        rich_help_panel=OUT)] = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write a copy of MODEL with the traced graph description in its header, so CI needs only the file."""

    def work() -> int:
        from . import io, trace
        from .graph import parse
        from .model import GRAPH_KEY

        header = io.read_header(str(model))
        doc = trace.describe_module(trace.build_module(arch), arch)
        graph = parse(doc, header.tensors, f"--arch {arch}")
        metadata = dict(header.metadata, **{GRAPH_KEY: json.dumps(doc)})
        io.write_model(str(output), [(n, i) for n, i in header.tensors.items()], metadata, src=header, force=force)
        if not quiet:
            _console(False).print(f"wrote {output}: {len(graph.layers)} layers, {len(graph.pairs())} conv pairs described")
        return EXIT_OK

    _run(work, debug)


@app.command(epilog="Example: convmerge inspect model.safetensors")
def inspect(
    model: ModelArg,
    graph: GraphOpt = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """List conv-shaped tensors and, when the file is described, its layers and conv pairs."""

    def work() -> int:
        from . import io
        from .graph import GraphError, parse
        from .model import find_description

        header = io.read_header(str(model))
        info: dict[str, Any] = {
            "file": str(model), "tensor_count": len(header.tensors), "metadata_keys": sorted(header.metadata),
            "conv_tensors": [{"name": n, "dtype": t.dtype, "shape": list(t.shape)} for n, t in header.tensors.items()
                             if n.endswith(".weight") and 3 <= len(t.shape) <= 5],
            "description": None,
        }
        try:
            doc, where = find_description(header, _s(graph))
        except GraphError as e:
            if "no graph description" not in str(e):
                raise
            info["missing"] = ("pass --graph FILE, or store one with `convmerge annotate MODEL --arch MODULE:CALLABLE "
                               "-o OUT`; `check`/`fuse` refuse to guess how layers connect")
        else:
            g = parse(doc, header.tensors, where)
            info.update(description=where, layer_count=len(g.layers),
                        pairs=[{"first": p.first, "second": p.second, "via": list(p.via), "blocked": p.blocked}
                               for p in g.pairs()])
        return _emit(info, json_out, "inspect")

    _run(work, debug)


@app.command(epilog="Example: convmerge explain model.safetensors stem.0 stem.2 --input-size 9x9")
def explain(
    model: ModelArg,
    first: Annotated[str, typer.Argument(help="Name of the first conv layer.", show_default=False)],
    second: Annotated[str, typer.Argument(help="Name of the second conv layer.", show_default=False)],
    graph: GraphOpt = None,
    arch: ArchOpt = None,
    input_size: Annotated[Optional[str], typer.Option(
        "--input-size", "-s", metavar="HxW", help="Size at FIRST's input [default: a small size, one that fails "
                                                   "if any does].", rich_help_panel=SIZE)] = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """One pair in depth: specs, per-side conditions, candidate, counterexample and a map of where they differ."""
    size = _parse_size(input_size)

    def work() -> int:
        from . import io
        from .explain import explain_pair
        from .graph import parse
        from .model import file_tensors, find_description

        header = io.read_header(str(model))
        doc, where = find_description(header, _s(graph), arch)
        data = explain_pair(parse(doc, header.tensors, where), file_tensors(header), first, second, size)
        return _emit(data, json_out, "explain")

    _run(work, debug)


def main() -> None:
    """Console-script entry point."""
    app()


# --- helpers ---------------------------------------------------------------------------------


def _s(path: Optional[Path]) -> Optional[str]:
    return None if path is None else str(path)


def _console(to_stderr: bool) -> Console:
    """NO_COLOR means no escape codes at all here, not only no colours (rich keeps bold and dim)."""
    return Console(stderr=to_stderr, highlight=False, color_system=None if os.environ.get("NO_COLOR") else "auto")


def _usage(message: str) -> None:
    typer.echo(f"convmerge: error: {message}", err=True)
    raise typer.Exit(EXIT_INPUT)


def _parse_size(text: Optional[str]) -> Optional[tuple[int, ...]]:
    if text is None:
        return None
    parts = text.replace("x", ",").replace("X", ",").split(",")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if not size or any(n < 1 for n in size) or len(size) > 3:
        _usage(f"--input-size: {text!r} is not 1 to 3 positive integers like 224x224 or 224,224")
    return size


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) < 3 or any(n < 1 for n in shape):
        _usage(f"--input-shape: {text!r} is not a shape like 1,3,224,224")
    return shape


def _emit(data: dict[str, Any], json_out: bool, view: str) -> int:
    """JSON on stdout, or the named rich view of the same data."""
    if json_out:
        json.dump(data, sys.stdout, indent=2)  # streamed: explain's error map at 1024x1024 is a million numbers
        sys.stdout.write("\n")
    else:
        from . import render

        getattr(render, view)(_console(False), data)
    return EXIT_OK


def _finish(rep: dict[str, Any], json_out: bool, quiet: bool, verbose: bool, fail_on: Optional[FailOn]) -> int:
    """Print the report and apply the CI gate."""
    if json_out:
        sys.stdout.write(json.dumps(rep, indent=2) + "\n")
    if not quiet:
        from . import render

        console = _console(json_out)
        render.report(console, rep, verbose)
    failing = _gate(rep, fail_on)
    if failing:
        if not quiet:
            _console(True).print(f"[red]gate --fail-on {fail_on.value} failed[/]: {failing}")  # type: ignore[union-attr]
        return EXIT_GATE
    return EXIT_OK


def _gate(rep: dict[str, Any], fail_on: Optional[FailOn]) -> str:
    if fail_on is None:
        return ""
    bad = {
        FailOn.unmergeable: lambda p: p["verdict"] == "unmergeable",
        FailOn.size_dependent: lambda p: p["verdict"] in ("unmergeable", "size-dependent"),
        FailOn.unmerged: lambda p: not p["applied"],
    }[fail_on]
    hits = [f"{p['first']} -> {p['second']}" for p in rep["pairs"] if bad(p)]
    return f"{len(hits)} pair(s): {', '.join(hits[:5])}{' ...' if len(hits) > 5 else ''}" if hits else ""


def _stage(final: Path, data: bytes) -> tuple[Path, Path]:
    """Write a companion file under a hidden name beside `final`; renaming it later cannot run out of space."""
    from . import io

    tmp = final.with_name(f".{final.name}.pending-{os.getpid()}")
    io.write_bytes(tmp, data, force=True)
    return tmp, final


def _write_counterexamples(rep: Any, directory: Path) -> None:
    from . import io

    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise io.ModelFileError(f"{directory}: cannot create the counterexample folder: {e.strerror or e}") from None
    for p in rep.pairs:
        ce = p.counterexample
        if ce is None:
            continue
        tensors = [("input", ce.input.contiguous()), ("pair_output", ce.pair_output.contiguous()),
                   ("candidate_output", ce.candidate_output.contiguous())]
        meta = {"first": p.first, "second": p.second, "output_index": json.dumps(list(ce.index))}
        io.write_model(directory / f"{p.first}__{p.second}.safetensors", tensors, meta, force=True)


@contextmanager
def _progress(json_out: bool, quiet: bool) -> Iterator[Callable[[], None]]:
    """A transient spinner on stderr, shown only on a terminal and only once work passes a second."""
    console = _console(True)
    if quiet or not console.is_terminal:
        yield lambda: None
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn

    start = time.monotonic()
    state: dict[str, Any] = {"done": 0, "bar": None}
    try:

        def tick() -> None:
            state["done"] += 1
            if state["bar"] is None and time.monotonic() - start > 1.0:
                state["bar"] = Progress(SpinnerColumn(), TextColumn("{task.description}"), console=console,
                                        transient=True)
                state["bar"].start()
                state["task"] = state["bar"].add_task("")
            if state["bar"] is not None:
                state["bar"].update(state["task"], description=f"judged {state['done']} conv chain(s)")

        yield tick
    finally:
        if state["bar"] is not None:
            state["bar"].stop()


def _run(work: Callable[[], int], debug: bool) -> None:
    """Run a command: expected failures become one line on stderr and an exit code, never a traceback."""
    try:
        code = work()
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        typer.echo("convmerge: interrupted; nothing was written", err=True)
        raise typer.Exit(130) from None
    except Exception as e:  # noqa: BLE001 - sorted into expected and internal below
        if debug:
            raise
        code = _exit_code(e)
        text = " ".join(str(e).split()) or type(e).__name__
        if code == EXIT_INTERNAL:
            text = f"internal error: {type(e).__name__}: {text} (rerun with --debug for the traceback)"
        typer.echo(f"convmerge: error: {text}", err=True)
    raise typer.Exit(code)


def _exit_code(e: Exception) -> int:
    from .graph import GraphError
    from .io import ModelFileError
    from .spec import SpecError
    from .trace import TraceError

    if isinstance(e, (ModelFileError, GraphError, SpecError, TraceError)):
        return EXIT_INPUT
    return EXIT_INTERNAL
