"""The `convmerge` command: parse arguments, call the library, render. Nothing else lives here.

torch is imported only inside the commands that need it, so `convmerge --help` starts fast.

Long only because each command declares its options with their help text; the work is in the library.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

from . import __version__
from .options import POLICIES, Options

try:
    from typer._click.exceptions import ClickException  # newer typer ships its own copy of click
except ImportError:  # an older typer runs on click itself
    from click.exceptions import ClickException  # type: ignore[no-redef]

EXIT_OK, EXIT_GATE, EXIT_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = (
    "Exit codes: 0 done; 1 the --fail-on gate failed; 2 usage error or bad input (file, description, arguments); "
    "3 a merge failed its numeric check or another internal error (nothing was written); 130 interrupted "
    "(Ctrl-C; nothing was written)."
)


def _flags_without_type(params: list[Any]) -> list[Any]:
    """A flag takes no value, so its help shows no '<bool>' where a value's type would be."""
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
    return params


class _Command(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_type(super().get_params(ctx))


class _Group(TyperGroup):
    """Usage errors as one line and exit 2, as the README promises (click draws a multi-line box)."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_type(super().get_params(ctx))

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except ClickException as e:
            code = e.exit_code
            if type(e).__name__ != "NoArgsIsHelpError":  # that one's message is the help, shown already
                ctx = getattr(e, "ctx", None)
                hint = f" (see '{ctx.command_path if ctx is not None else 'convmerge'} --help')"
                message = " ".join(e.format_message().split()).replace(": Value error, ", ": ")  # typer's enum wording
                typer.echo(f"convmerge: error: {message}{hint}", err=True)
                code = EXIT_INPUT
        if not standalone_mode:
            return code
        sys.exit(code or 0)


app = typer.Typer(
    cls=_Group,
    name="convmerge",
    help="Merge consecutive convolutions into one, exactly, and prove when it cannot.\n\n" + EXIT_CODES,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


Policy = Enum("Policy", [(p, p) for p in POLICIES], type=str)  # type: ignore[misc] # --policy's choices


class FailOn(str, Enum):
    unmergeable = "unmergeable"
    size_dependent = "size-dependent"
    unmerged = "unmerged"


DESC, SIZE, OUT, OUTPUT = "Model description", "Input size and policy", "Output files", "Output and logging"
ModelArg = Annotated[Path, typer.Argument(metavar="MODEL", help="A .safetensors model file (read, never modified).",
                                         show_default=False)]
AnyModelArg = Annotated[Path, typer.Argument(metavar="MODEL", help="A .safetensors or .onnx model file (read, never "
                                             "modified).", show_default=False)]
GraphOpt = Annotated[Optional[Path], typer.Option("--graph", "-g", help="Graph description JSON (sidecar file).",
                                                  rich_help_panel=DESC, show_default=False)]
LeafOpt = Annotated[Optional[list[str]], typer.Option(
    "--leaf", metavar="CLASS", help="With --arch: keep modules of this class (or this qualified name) opaque, "
                                    "untraced; repeatable.", rich_help_panel=DESC, show_default=False)]
ArchOpt = Annotated[Optional[str], typer.Option("--arch", "-a", metavar="MODULE:CALLABLE",
                                                help="Build and trace this nn.Module (also path/to/file.py:CALLABLE) "
                                                     "when the file has no description.", rich_help_panel=DESC)]
SizeOpt = Annotated[Optional[str], typer.Option(
    "--input-size", "-s", metavar="HxW",
    help="Spatial input size, one number per axis (224x224 or 224,224). Decides size-dependent pairs. "
         "Without it they are not merged and costs assume 224 per axis.", rich_help_panel=SIZE)]
PolicyOpt = Annotated[Policy, typer.Option(
    "--policy", "-p", help="cheaper: merge only where the estimated CPU cost does not grow (a model fitted on CPU "
                           "timings: MACs weighted by conv kind, plus memory traffic, plus a cost per layer; "
                           "convmerge.maths.spec.cost); all: every exact merge.", rich_help_panel=SIZE)]
FailOpt = Annotated[Optional[FailOn], typer.Option(
    "--fail-on", help="Exit 1 if any pair is unmergeable / size-dependent or worse / not merged (for CI).",
    rich_help_panel=OUTPUT, show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the JSON report on stdout; stderr then gets one summary "
                                       "line, and warnings and errors.", rich_help_panel=OUTPUT)]
ShowJsonOpt = Annotated[bool, typer.Option("--json", help="Print the data as JSON on stdout; stderr gets only "
                                           "warnings and errors.", rich_help_panel=OUTPUT)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors.", rich_help_panel=OUTPUT)]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Counterexample values, and the time each "
                                          "phase took.", rich_help_panel=OUTPUT)]
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


@app.command(cls=_Command, epilog="Example: convmerge check examples/example.safetensors --input-size 65x65 --fail-on unmergeable")
def check(
    model: AnyModelArg,
    graph: GraphOpt = None,
    arch: ArchOpt = None,
    leaf: LeafOpt = None,
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
    options = Options(policy.value, _parse_size(input_size), tuple(leaf or ()))

    def work() -> int:
        clock = _Clock()
        with clock("import"):
            from . import io
            from . import model as m
            from .engine.algebra import single_threaded
            _settle()

        with single_threaded():  # the whole run on one thread; large kernels open more (algebra.parallel)
            with clock("judge"), _progress(json_out, quiet) as tick:
                rep = m.check_file(str(model), options, graph_file=_s(graph), arch=arch, on_region=tick)
            if counterexamples is not None:
                with clock("counterexamples"):
                    io.write_counterexamples(counterexamples, rep.pairs)
            return _finish(rep, json_out, quiet, verbose, fail_on, clock)

    _run(work, debug)


@app.command(cls=_Command, epilog="Example: convmerge fuse examples/example.safetensors -o example.fused.safetensors "
                    "--input-size 65x65")
def fuse(
    model: AnyModelArg,
    output: Annotated[Optional[str], typer.Option("--output", "-o", metavar="PATH", help="Output file \\[default: "
                                                  "<stem>.fused.safetensors, or <stem>.fused.onnx, beside the "
                                                  "input].", rich_help_panel=OUT, show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite existing output files.",
                                        rich_help_panel=OUT)] = False,
    report: Annotated[Optional[str], typer.Option("--report", metavar="PATH", help="Also write the JSON report, with "
                                                  "the description used, for reproducibility.", rich_help_panel=OUT)] = None,
    export: Annotated[Optional[str], typer.Option("--export", metavar="PATH", help="Also write a torch.export "
                                                  "program (.pt2) of the fused model, checked end to end; its batch and "
                                                  "spatial sizes are symbolic where the model allows (else fixed at "
                                                  "--input-shape); needs --arch and --input-shape.",
                                                  rich_help_panel=OUT)] = None,
    input_shape: Annotated[Optional[str], typer.Option("--input-shape", metavar="N,C,H,W",
                                                       help="Example input shape for --export.",
                                                       rich_help_panel=OUT)] = None,
    graph: GraphOpt = None,
    arch: ArchOpt = None,
    leaf: LeafOpt = None,
    input_size: SizeOpt = None,
    policy: PolicyOpt = Policy.cheaper,
    fail_on: FailOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Merge every exact chain and region into one conv each; write a new, self-describing model file.

    A safetensors model gives a safetensors file (its header holds the rewritten description), an ONNX model an
    ONNX model."""
    options = Options(policy.value, _parse_size(input_size), tuple(leaf or ()))
    shape = _parse_shape(input_shape) if input_shape else None
    if input_shape is not None and export is None:
        _usage("--input-shape is the example input of --export, which was not given; the size to judge and merge "
               "at is --input-size HxW")
    if export is not None and (arch is None or shape is None):
        _usage("--export needs --arch MODULE:CALLABLE and --input-shape N,C,H,W")

    def work() -> int:
        clock = _Clock()
        with clock("import"):
            from . import io
            from . import model as m
            from .engine.algebra import single_threaded
            _settle()

        out = output or m.default_output(str(model))
        with single_threaded():  # the whole run on one thread; large kernels open more (algebra.parallel)
            io.check_outputs([p for p in (out, report, export) if p is not None], [model], force)
            pending: list[tuple[str, str]] = []  # (written temp, final path): published once the model is

            def companions(rep: Any, doc: dict) -> None:
                if report is not None or export is not None:
                    clock.start("companions")
                if report is not None:
                    data = dict(rep.to_dict(), description_used=doc)
                    pending.append(_stage(report, (json.dumps(data, indent=2) + "\n").encode()))
                if export is not None:
                    from . import api

                    fused = api.fuse(api.load_module(arch, str(model)), input_size=options.input_size,  # type: ignore[arg-type]
                                     policy=options.policy)
                    pending.append(_stage(export, api.export_bytes(fused, shape)))  # type: ignore[arg-type]
                clock.start("write")

            clock.start("plan")

            try:
                with _progress(json_out, quiet) as tick:
                    rep = m.fuse_file(str(model), out, options, graph_file=_s(graph), arch=arch, force=force,
                                      on_region=tick, before_write=companions, on_phase=clock.start)
                clock.stop()
                for tmp, final in pending:
                    os.replace(tmp, final)
            finally:
                for tmp, _ in pending:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            return _finish(rep, json_out, quiet, verbose, fail_on, clock)

    _run(work, debug)


@app.command(cls=_Command, epilog="Example: convmerge annotate examples/example.safetensors --arch examples/model.py:build "
                    "-o example.described.safetensors")
def annotate(
    model: ModelArg,
    arch: Annotated[str, typer.Option("--arch", "-a", metavar="MODULE:CALLABLE", help="Module to trace.",
                                      rich_help_panel=DESC)],
    output: Annotated[str, typer.Option("--output", "-o", metavar="PATH", help="Where to write the annotated copy.",
                                        rich_help_panel=OUT)],
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing output.",
                                        rich_help_panel=OUT)] = False,
    leaf: LeafOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write a copy of MODEL with the traced graph description in its header, so CI needs only the file.

    Kernels the trace computed from the weights (a kernel built from parameters) are stored too."""

    def work() -> int:
        from . import io
        from .model import GRAPH_KEY, describe_file

        described = describe_file(str(model), None, arch, Options(leaves=tuple(leaf or ())))
        header, graph = described.header, described.graph
        metadata = dict(header.metadata, **{GRAPH_KEY: json.dumps(graph.doc)})
        listing = [(n, i) for n, i in header.tensors.items()] + [
            (n, t.detach().cpu().contiguous()) for n, t in described.extra.items()]
        io.write_model(output, listing, metadata, src=header, force=force)
        if not quiet:
            from .reporting import render

            console = _console(False)
            console.print(f"wrote {output}: {render.count(len(graph.layers), 'layer')}, "
                          f"{render.count(len(graph.pairs()), 'conv pair')} described", markup=False)
            render.notes(console, described.notes)
        return EXIT_OK

    _run(work, debug)


@app.command(cls=_Command, epilog="Example: convmerge inspect examples/example.safetensors")
def inspect(
    model: AnyModelArg,
    graph: GraphOpt = None,
    arch: ArchOpt = None,
    json_out: ShowJsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """List conv-shaped tensors and, when the file is described, its layer count and conv pairs."""

    def work() -> int:
        from .model import inspect_file

        return _emit(inspect_file(str(model), graph_file=_s(graph), arch=arch), json_out, "inspect")

    _run(work, debug)


@app.command(cls=_Command, epilog="Example: convmerge explain examples/example.safetensors 11 12 --input-size 9x9")
def explain(
    model: AnyModelArg,
    first: Annotated[str, typer.Argument(help="The first conv of a pair, or the output layer of a region.",
                                         show_default=False)],
    second: Annotated[Optional[str], typer.Argument(help="The second conv of the pair (omit it for a region).",
                                                    show_default=False)] = None,
    graph: GraphOpt = None,
    arch: ArchOpt = None,
    leaf: LeafOpt = None,
    input_size: Annotated[Optional[str], typer.Option(
        "--input-size", "-s", metavar="HxW", help="Size at FIRST's input \\[default: the size there of a model "
                                                   "fixed at one size (a static ONNX model), else a small size, one "
                                                   "that fails if any does].", rich_help_panel=SIZE)] = None,
    json_out: ShowJsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """One pair (FIRST SECOND) or one region (its OUTPUT layer) in depth, with a map of where they differ.

    Specs, per-axis conditions, the candidate single conv, a counterexample and a map of the output positions
    where the layers and the candidate differ."""
    size = _parse_size(input_size)

    def work() -> int:
        from .reporting.explain import explain_pair, explain_region
        from .model import read_graph

        g, tensors, _, fixed = read_graph(str(model), _s(graph), arch, leaf or ())
        if second is None:
            data = explain_region(g, tensors, first, size, fixed)
        else:
            data = explain_pair(g, tensors, first, second, size, fixed)
        data.setdefault("notes", list(g.notes))
        return _emit(data, json_out, "explain")

    _run(work, debug)


MMAP_THRESHOLD = 4 << 20
"""Blocks of this many bytes and more are mapped on their own and given back when freed (`_return_large_frees`)."""
TRIM_THRESHOLD = 16 << 20
"""Free bytes the heap keeps at its top for the next blocks (`_return_large_frees`)."""
_owns_process = False
"""Set by `main`, the console script: the process is the CLI's, not a caller's that runs `app` in-process."""


def main() -> None:
    """Console-script entry point."""
    global _owns_process
    _owns_process = True
    _return_large_frees()
    try:
        app()
    finally:
        _settle()


def _settle() -> None:
    """In the CLI's own process, every object alive now lives until exit (after the imports: torch's and onnx's
    modules), so the cyclic collector stops walking them: each full collection during the run, and the one at
    exit, walked some 190,000 of them (0.3-0.5 s of a `fuse`, benchmarks/README.md, goal 4).  Objects freed by
    their reference counts are freed as before.  A caller running `app` in-process keeps its collector as it was."""
    if _owns_process:
        gc.freeze()


def _return_large_frees() -> None:
    """The CLI owns its process: blocks of 4 MiB and more (merged float64 kernels and their temporaries) are
    mapped and given back to the system when freed.  glibc's default threshold grows to 32 MiB and keeps such
    blocks in its heap, so peak memory grew with the number of large merges (benchmarks/README.md, goal 1).
    Smaller blocks stay in the heap, which keeps up to 16 MiB free at its top: mapping every block of 1 MiB and
    more, as before, faulted their pages in again on each of the planner's many 1-4 MiB temporaries.  Measured
    (benchmarks/README.md, goal 4): RepVGG-A0's fuse 470,000 -> 210,000 page faults, 4.8 -> 3.6 s CPU, peak
    +5 MiB; throughput.py's 1 GiB file 4.8 -> 4.0 s CPU, peak 352 -> 357-367 MiB (with --trunk pairs 411 -> 443).
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None)
            libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD (fixed: no longer grows)
            libc.mallopt(-1, TRIM_THRESHOLD)  # M_TRIM_THRESHOLD (fixing the first fixed this one at 128 KiB)
        except (OSError, AttributeError):
            pass


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
        from .reporting import render

        getattr(render, view)(_console(False), data)
    return EXIT_OK


def _finish(report: Any, json_out: bool, quiet: bool, verbose: bool, fail_on: Optional[FailOn],
            clock: _Clock) -> int:
    """Print the report and apply the CI gate.

    With --json, stderr gets one summary line (as linters' JSON modes do), then warnings and errors.
    Counterexamples are searched only for what shows them: the JSON and the table with -v.
    """
    from .reporting import render

    search = json_out or (verbose and not quiet)
    with clock("counterexamples") if search else nullcontext():
        rep = report.to_dict(search)
    timings = clock.line() if verbose else ""
    if json_out:
        sys.stdout.write(json.dumps(rep, indent=2) + "\n")
        if not quiet:
            line = render.summary_line(rep) + (f" ({timings})" if timings else "")
            _console(True).print(line, soft_wrap=True, markup=False)
    elif not quiet:
        console = _console(False)
        render.report(console, rep, verbose)
        if timings:
            console.print(timings, markup=False)
    failing = _gate(rep, fail_on)
    if failing:
        if not quiet:
            _console(True).print(Text.assemble((f"gate --fail-on {fail_on.value} failed", "red"),  # type: ignore[union-attr]
                                               f": {failing}"), soft_wrap=True)
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


def _stage(final: str, data: bytes) -> tuple[str, str]:
    """Write a companion file under a hidden name beside `final`; renaming it later cannot run out of space."""
    from . import io

    folder, name = os.path.split(final)
    tmp = os.path.join(folder, f".{name}.pending-{os.getpid()}")
    io.write_bytes(tmp, data, force=True)
    return tmp, final


class _Clock:
    """Wall time of each phase of a command, measured around the library calls, for -v."""

    def __init__(self) -> None:
        self.phases: list[tuple[str, float]] = []
        self._open: Optional[tuple[str, float]] = None

    def start(self, name: str) -> None:
        """End the running phase, if any, and start `name`."""
        self.stop()
        self._open = (name, time.perf_counter())

    def stop(self) -> None:
        if self._open is not None:
            name, began = self._open
            self.phases.append((name, time.perf_counter() - began))
            self._open = None

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.start(name)
        try:
            yield
        finally:
            self.stop()

    def line(self) -> str:
        """Each phase once, with the time of all its parts (check's counterexamples are searched and written in
        one part, and any left shown in another)."""
        total: dict[str, float] = {}
        for name, seconds in self.phases:
            total[name] = total.get(name, 0.0) + seconds
        return "timings: " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in total.items())


@contextmanager
def _progress(json_out: bool, quiet: bool) -> Iterator[Callable[[], None]]:
    """A transient spinner on stderr, shown only on a terminal and only once work passes a second.

    Not under NO_COLOR: a transient spinner moves the cursor with escape codes, and NO_COLOR means none.
    """
    console = _console(True)
    if quiet or not console.is_terminal or os.environ.get("NO_COLOR"):
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
                state["bar"].update(state["task"], description=f"judged {state['done']} region(s)")

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
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Exception as e:  # noqa: BLE001 - sorted into expected and internal below
        if debug:
            raise
        from .io import OutputExists

        code = _exit_code(e)
        text = f"{e.shown}: exists; pass --force to overwrite" if isinstance(e, OutputExists) else str(e)
        text = " ".join(text.split()) or type(e).__name__
        if code == EXIT_INTERNAL:
            text = f"internal error: {type(e).__name__}: {text} (rerun with --debug for the traceback)"
        typer.echo(f"convmerge: error: {text}", err=True)
    raise typer.Exit(code)


def _exit_code(e: Exception) -> int:
    from .errors import Kind, kind_of

    return {Kind.BAD_INPUT: EXIT_INPUT}.get(kind_of(e), EXIT_INTERNAL)


if __name__ == "__main__":  # python -m convmerge.cli, as tests/test_readme.py runs the README's commands
    main()
