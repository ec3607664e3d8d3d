"""`convmerge check/fuse model.onnx`: the ONNX file read as a description (onnx_read), planned by the one
planner, written back (onnx_write) into a hidden folder beside the output, and run under onnxruntime
beside the original before it is moved into place.

The plan checks every merge in float64 against the layers it replaces, as for safetensors.  The
end-to-end run adds what that check cannot see: that the rewritten graph is wired right.  It feeds the
original and the fused model the same random inputs at the model's static size (or a few sizes where
the size is symbolic), one model loaded at a time; a difference beyond the dtype's rounding is a
VerificationError (exit 3) and no output appears.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto

from .backends import endtoend
from . import io
from .engine import plan as planning
from .frontends.onnx_read import OnnxGraph, read_model
from .backends.onnx_write import fused_model, write
from .engine.algebra import run_threads
from .engine.plan import VerificationError
from .options import Options
from .reporting.report import Report

__all__ = ["OnnxReport", "TOLERANCE", "check_file", "fuse_file"]

TOLERANCE = {name: endtoend.TOLERANCE[dtype] for name, dtype in (
    ("tensor(double)", torch.float64), ("tensor(float)", torch.float32), ("tensor(float16)", torch.float16),
    ("tensor(bfloat16)", torch.bfloat16))}
"""Largest difference between the original's and the fused model's outputs, relative to the output's
largest magnitude, that rounding explains (the PyTorch module's end-to-end check's bounds, by ONNX type name):
summing a merged kernel in another order moves each output by a few ulps per layer, and a deep network adds
those up (float32: ~840 ulps).  An output is allowed the
rounding of the least precise float type the graph computes in (`_arithmetic`): a float16 model with float32
inputs and outputs (keep_io_types) rounds as float16."""
_TYPE_NAMES = {TensorProto.DOUBLE: "tensor(double)", TensorProto.FLOAT: "tensor(float)",
               TensorProto.FLOAT16: "tensor(float16)", TensorProto.BFLOAT16: "tensor(bfloat16)"}
DYNAMIC_SIZES = (32, 57, 64, 97, 224)
"""Spatial sizes tried for symbolic axes, in order, until two run: a multiple of 32 and an odd one."""


@dataclass
class OnnxReport(Report):
    """The report (FORMAT.md section 3), plus what onnxruntime measured."""

    onnxruntime: Optional[dict[str, Any]] = field(default=None)

    def to_dict(self, search: bool = True) -> dict[str, Any]:
        out = super().to_dict(search)
        out["onnxruntime"] = self.onnxruntime
        return out


def check_file(path: str, options: Options = Options(), *,
               on_region: Optional[Callable[[], None]] = None) -> OnnxReport:
    """The dry run for an ONNX file: the report `fuse_file` gives, nothing written, nothing run."""
    model = read_model(path, options.input_size)
    return _report(model, planning.build(model.graph, model.tensors, _at_model_size(options, model), on_region), path)


def fuse_file(path: str, out: str, options: Options = Options(), *, force: bool = False,
              on_region: Optional[Callable[[], None]] = None,
              before_write: Optional[Callable[[Report, dict], None]] = None) -> OnnxReport:
    """Read, plan, rewrite, check (onnx.checker, onnxruntime) and write `out` atomically (and `<out>.data`
    where the weights are external); the input is never modified."""
    model = read_model(path, options.input_size)
    inputs = [path, *model.data_files()]
    io.check_outputs([out], inputs, force)
    plan = planning.build(model.graph, model.tensors, _at_model_size(options, model), on_region,
                          keep_bytes=_keep_bytes(inputs))
    report = _report(model, plan, path)
    report.output = os.fspath(out)
    fused = fused_model(model, plan)
    external = fused.external(model)
    if external:
        io.check_outputs([_data_path(out)], inputs, force)
    with io.staging_folder(out) as folder:  # beside the output: publishing is a rename, not a second copy
        staged = os.path.join(folder, os.path.basename(out))
        write(fused, staged, external, model)
        del fused  # on disk now: the checks below read it from there
        report.notes += _checked(staged, path, bool(plan.applied))
        only = model.input_size if any(not u.every_size for u in plan.applied) else None
        report.onnxruntime = _compare(path, staged, report.notes, only, _arithmetic(model)) if plan.applied else None
        if before_write is not None:
            before_write(report, plan.description())
        _publish(staged, out, external, force)
    return report


def _keep_bytes(inputs: Sequence[str]) -> int:
    """The budget of merged weights held from planning to writing (plan.KEEP_BYTES): up to the input files' own
    size, which an ONNX tool holds anyway (onnxslim the whole model), so none is computed twice: RepVGG-B1's
    dropped merges, recomputed while writing, were 0.6-0.9 s of its fuse (benchmarks/README.md, goal 4)."""
    return max(planning.KEEP_BYTES, sum(os.path.getsize(f) for f in inputs))


def _at_model_size(options: Options, model: OnnxGraph) -> Options:
    """The options at the size the model fixes, where it does (read_model checked that a given one agrees)."""
    return replace(options, input_size=model.input_size)


def _report(model: OnnxGraph, plan: planning.Plan, path: str) -> OnnxReport:
    base = plan.report()
    report = OnnxReport(**{k: getattr(base, k) for k in base.__dataclass_fields__})
    report.source, report.description = os.fspath(path), model.where
    return report


def _data_path(out: str) -> str:
    return out + ".data"  # the name onnx_write.write gives the model's external data


def _publish(staged: str, out: str, external: bool, force: bool) -> None:
    """The data file first, then the model that names it: a crash in between leaves no model at all."""
    if not external:
        io.publish(staged, out, force=force)
        return
    io.publish(_data_path(staged), _data_path(out), force=force)
    try:
        io.publish(staged, out, force=force)
    except BaseException:
        os.unlink(_data_path(out))
        raise


def _checked(staged: str, original: str, changed: bool) -> list[str]:
    """onnx.checker's full check on the output; an input that fails it itself gets the plain check."""
    try:
        onnx.checker.check_model(staged, full_check=True)
        return []
    except Exception as e:  # noqa: BLE001 - ValidationError or InferenceError
        problem = _line(e)
    try:
        onnx.checker.check_model(original, full_check=True)
    except Exception as e:  # noqa: BLE001
        onnx.checker.check_model(staged)
        return [f"the input model fails onnx.checker's full check ({_line(e)}); the output passes its plain check"]
    raise VerificationError(f"the fused model fails onnx.checker's full check, the input passes it: {problem}"
                            + ("" if changed else " (nothing was merged)"))


def _arithmetic(model: OnnxGraph) -> Optional[str]:
    """The least precise float type the graph computes in (a key of TOLERANCE), from its constants, the
    types its Casts produce and the types its inputs, outputs and value_info declare; None without floats."""
    g = model.proto.graph
    kinds = {t.data_type for t in model.constants.values()}
    kinds |= {a.i for n in g.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"}
    kinds |= {vi.type.tensor_type.elem_type for vi in (*g.input, *g.output, *g.value_info)
              if vi.type.HasField("tensor_type")}
    names = [_TYPE_NAMES[k] for k in kinds if k in _TYPE_NAMES]
    return max(names, key=TOLERANCE.__getitem__, default=None)


# --- onnxruntime ---------------------------------------------------------------------------------------


def _compare(original: str, fused: str, notes: list[str], only: Optional[Sequence[int]] = None,
             computed_in: Optional[str] = None) -> Optional[dict[str, Any]]:
    """Run both models on the same random inputs; the largest difference of any output, or None if
    onnxruntime is missing or cannot run the original (then the float64 check of each merge stands alone).
    `only`: the input size that size-dependent merges were chosen for, the one size where the fused model
    must agree.  `computed_in`: the float type of the arithmetic (`_arithmetic`), whose rounding a float
    output is allowed where it is coarser than the output's own."""
    try:
        import onnxruntime as ort
    except ImportError:
        notes.append("onnxruntime is not installed: each merge was checked in float64, the fused graph was not run "
                     "(pip install onnxruntime)")
        return None
    options = _session_options(ort)
    try:
        before = ort.InferenceSession(original, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - the original is not ours to fix
        notes.append(f"onnxruntime cannot load the original model ({_line(e)}); the fused graph was not run")
        return None
    runs: list[tuple[dict[str, np.ndarray], list[Any]]] = []  # the original's inputs and outputs, two sizes at most
    failures: list[str] = []
    for size in _sizes(before, only):
        if len(runs) == 2:
            break
        feeds = _inputs(before, size)
        try:
            runs.append((feeds, before.run(None, feeds)))
        except Exception as e:  # noqa: BLE001
            failures.append(_line(e))
    metas = [(m.name, m.type) for m in before.get_outputs()]
    del before  # one model in onnxruntime's memory at a time
    try:
        after = ort.InferenceSession(fused, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise VerificationError(f"onnxruntime loads the original model but not the fused one: {_line(e)}") from None
    worst = absolute = tolerance = 0.0
    shapes: list[str] = []
    for feeds, want in runs:
        try:
            got = after.run(None, feeds)
        except Exception as e:  # noqa: BLE001
            raise VerificationError(f"onnxruntime runs the original model but not the fused one at "
                                    f"{_shape_text(feeds)}: {_line(e)}") from None
        shapes.append(_shape_text(feeds))
        for (name, declared), a, b in zip(metas, want, got):
            a, b = np.asarray(a), np.asarray(b)
            if a.shape == b.shape and not np.issubdtype(a.dtype, np.floating):
                if not np.array_equal(a, b):  # argmax and the like flip on rounding: worth a word, not a failure
                    notes.append(f"onnxruntime: output {name!r} ({declared}) differs in "
                                 f"{int(np.sum(a != b))} element(s) at {_shape_text(feeds)} (rounding of the "
                                 "float values it is computed from)")
                continue
            diff, rel = endtoend.relative_difference(torch.from_numpy(a), torch.from_numpy(b))
            kind = max((k for k in (declared, computed_in) if k in TOLERANCE), key=TOLERANCE.__getitem__,
                       default=declared)
            allowed = TOLERANCE.get(kind, 0.0)
            tolerance = max(tolerance, allowed)
            if not rel <= allowed:
                raise VerificationError(f"output {name!r} of the fused model differs from the original by "
                                        f"{rel:.3g} (relative; {diff:.3g} absolute) at {_shape_text(feeds)} under "
                                        f"onnxruntime, more than {kind} rounding ({allowed:g})")
            worst, absolute = max(worst, rel), max(absolute, diff)
    if not shapes:
        notes.append(f"onnxruntime cannot run the original model ({failures[0] if failures else 'no input size'}); "
                     "the fused graph was not run")
        return None
    notes.append(f"onnxruntime: the fused model's outputs differ from the original's by at most {absolute:.3g} "
                 f"({worst:.3g} relative) on random inputs of shape {', '.join(shapes)}")
    return {"max_difference": absolute, "relative_difference": worst, "tolerance": tolerance, "inputs": shapes}


def _session_options(ort: Any) -> Any:
    """Options of both sessions (set on the session, no process-wide setting): the graph as written, no
    rewrite by onnxruntime; the run's thread count (`algebra.run_threads`, the caller's); and threads that
    sleep rather than spin while waiting for work.  onnxruntime's default pool spins, which on a shared
    2-core machine made each run wait for, and burn, the other core: RepVGG-B1's two runs at 224x224 0.88-0.97
    -> 0.67-0.75 s (one thread: 0.57 s), RepVGG-A0's 0.22-0.30 -> 0.12 s (benchmarks/README.md, goal 4)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = run_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def _sizes(session: Any, only: Optional[Sequence[int]] = None) -> list[Optional[Sequence[int]]]:
    """One run where every spatial axis is static or the size is given; else the dynamic sizes, of which the
    first two that run count."""
    symbolic = any(not isinstance(d, int) for i in session.get_inputs() for d in list(i.shape)[2:])
    if not symbolic:
        return [None]
    return [tuple(only)] if only else [(n,) for n in DYNAMIC_SIZES]


def _inputs(session: Any, size: Optional[Sequence[int]]) -> dict[str, np.ndarray]:
    """Random normal floats (zeros for other types); a symbolic axis is 1 for batch and channels, else `size`,
    and one symbol gets one value."""
    rng = np.random.default_rng(0)
    chosen: dict[str, int] = {}
    feeds = {}
    for meta in session.get_inputs():
        shape = []
        for k, d in enumerate(meta.shape):
            if isinstance(d, int) and d >= 0:
                shape.append(d)
            elif isinstance(d, str) and d in chosen:
                shape.append(chosen[d])
            else:
                n = 1 if k < 2 or size is None else size[min(k - 2, len(size) - 1)]
                if isinstance(d, str):
                    chosen[d] = n
                shape.append(n)
        kind = meta.type.removeprefix("tensor(").removesuffix(")")
        dtype = {"float": np.float32, "double": np.float64, "float16": np.float16}.get(kind)
        if dtype is not None:
            feeds[meta.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[meta.name] = np.zeros(shape, dtype={"int64": np.int64, "int32": np.int32, "bool": np.bool_}
                                        .get(kind, np.float32))
    return feeds


def _shape_text(feeds: dict[str, np.ndarray]) -> str:
    return " and ".join("x".join(map(str, v.shape)) for v in feeds.values())


def _line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."
