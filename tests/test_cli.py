"""The `convmerge` command line: every command, exit code and error path (FORMAT.md contracts).

In-process tests use typer's CliRunner (Click >= 8.2 keeps stdout and stderr apart: `result.stdout`,
`result.stderr`); a few subprocess tests run the installed `convmerge` script itself.  Every model
is a tiny file built in tmp_path (see tests/models.py).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from convmerge import __version__
from convmerge.cli import app

from .models import (
    GRAPH_KEY,
    bn_model,
    branch_model,
    conv,
    depthwise_model,
    describe,
    description_of,
    evaluate,
    read,
    save,
    stack_model,
    stack_parts,
)

runner = CliRunner()
FAST = ("--input-size", "10x10")
"""Where the size does not matter: an --input-size keeps the float64 verification small (faster)."""
ANSI = re.compile(r"\x1b\[")


# --- helpers ----------------------------------------------------------------------------------


def cli(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(directory: Path) -> dict[str, str]:
    """Every file under `directory` (hidden ones too) with its hash: nothing may appear or change."""
    return {str(p.relative_to(directory)): (sha256(p) if p.is_file() else "dir")
            for p in sorted(directory.rglob("*"))}


def assert_one_line_error(result: Any, code: int = 2) -> str:
    """Exit `code`, ONE stderr line starting 'convmerge: error:', nothing on stdout, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("convmerge: error:"), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stdout == ""
    return lines[0]


def assert_no_traceback(result: Any) -> None:
    assert "Traceback" not in result.stdout + result.stderr


def json_out(result: Any) -> dict:
    """stdout holds exactly one JSON document and nothing else."""
    return json.loads(result.stdout)


def pair(report: dict, first: str, second: str) -> dict:
    return next(p for p in report["pairs"] if (p["first"], p["second"]) == (first, second))


@pytest.fixture
def stack(tmp_path: Path) -> Path:
    return stack_model(tmp_path / "stack.safetensors", note="keep me")


def fuse_keeping_input(model: Path, *args: Any) -> Any:
    """Run `fuse` and check the input file is byte for byte unchanged, whatever happened."""
    before = sha256(model)
    result = cli("fuse", model, *args)
    assert sha256(model) == before, "fuse modified its input"
    assert_no_traceback(result)
    return result


def assert_same_function(original: Path, fused: Path, sizes: list[tuple[int, int]], channels: int = 3) -> None:
    """Both files, evaluated in float64 from their own descriptions, agree on random inputs."""
    t0, _ = read(original)
    t1, _ = read(fused)
    d0, d1 = description_of(original), description_of(fused)
    gen = torch.Generator().manual_seed(7)
    for h, w in sizes:
        x = torch.randn(2, channels, h, w, generator=gen, dtype=torch.float64)
        for y0, y1 in zip(evaluate(d0, t0, x), evaluate(d1, t1, x)):
            assert y0.shape == y1.shape, (h, w)
            scale = max(1.0, float(y0.abs().max()))
            assert float((y0 - y1).abs().max()) <= 1e-5 * scale, (h, w)


# --- --version, --help ------------------------------------------------------------------------


def test_version() -> None:
    result = cli("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"convmerge {__version__}"


@pytest.mark.parametrize("command", ["check", "fuse", "annotate", "inspect", "explain"])
def test_help_of_every_command_has_an_example(command: str) -> None:
    result = cli(command, "--help")
    assert result.exit_code == 0, result.stderr
    assert "Example" in result.stdout
    assert f"convmerge {command}" in result.stdout


def test_top_level_help_lists_commands_and_exit_codes() -> None:
    result = cli("--help")
    assert result.exit_code == 0
    for command in ("check", "fuse", "annotate", "inspect", "explain"):
        assert command in result.stdout
    assert "Exit codes" in result.stdout


def test_no_arguments_shows_help_without_traceback() -> None:
    result = cli()
    assert result.exit_code in (0, 2)
    assert "Usage" in result.stdout + result.stderr
    assert_no_traceback(result)


@pytest.mark.parametrize("args", [["check"], ["check", "x.safetensors", "--bogus"], ["frobnicate"],
                                  ["check", "x.safetensors", "--policy", "some"],
                                  ["check", "x.safetensors", "--fail-on", "everything"],
                                  ["explain", "x.safetensors", "c1"], ["annotate", "x.safetensors"]])
def test_click_usage_errors_exit_2(args: list[str]) -> None:
    result = cli(*args)
    assert result.exit_code == 2
    assert_no_traceback(result)
    assert result.stdout == ""


# --- check ------------------------------------------------------------------------------------


def test_check_table_names_every_pair_and_verdict(stack: Path) -> None:
    before = listing(stack.parent)
    result = cli("check", stack)
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    for first, second, verdict in (("c1", "c2", "mergeable"), ("c3", "c4", "size-dependent"),
                                   ("c5", "c6", "unmergeable")):
        row = next(line for line in out.splitlines() if f"{first} -> {second}" in line)
        assert verdict in row
    assert "3 pair(s)" in out and "1 merged" in out
    assert listing(stack.parent) == before, "check wrote something"


def test_check_json_is_the_only_stdout_and_matches_format(stack: Path) -> None:
    before = listing(stack.parent)
    result = cli("check", stack, "--json")
    assert result.exit_code == 0
    rep = json_out(result)
    assert [(p["first"], p["second"], p["verdict"]) for p in rep["pairs"]] == [
        ("c1", "c2", "mergeable"), ("c3", "c4", "size-dependent"), ("c5", "c6", "unmergeable")]
    s = rep["summary"]
    assert {k: s[k] for k in ("pairs", "mergeable", "size_dependent", "unmergeable", "merged")} == {
        "pairs": 3, "mergeable": 1, "size_dependent": 1, "unmergeable": 1, "merged": 1}
    for p in rep["pairs"]:
        assert set(p) >= {"first", "second", "via", "verdict", "reason", "merged", "counterexample"}
        assert isinstance(p["reason"], str) and p["reason"]
    m = pair(rep, "c1", "c2")["merged"]
    assert m == {"kernel_size": [5, 5], "stride": [1, 1], "padding": [[3, 3], [3, 3]], "dilation": [1, 1],
                 "groups": 1, "padding_mode": "zeros"}
    assert pair(rep, "c1", "c2")["counterexample"] is None
    ce = pair(rep, "c5", "c6")["counterexample"]
    assert set(ce) >= {"input_shape", "output_index", "pair_value", "candidate_value"}
    assert ce["pair_value"] != ce["candidate_value"]
    assert pair(rep, "c3", "c4")["sizes"]
    assert "exact_at_input_size" not in pair(rep, "c3", "c4")  # no --input-size: not decided
    # stderr holds the summary line only (the table is for people, who did not ask for JSON)
    assert result.stderr.splitlines() == [line for line in result.stderr.splitlines() if "3 pair(s)" in line]
    assert listing(stack.parent) == before


@pytest.mark.parametrize("size, exact", [("9x9", True), ("9,9", True), ("10x10", False), ("10,9", False),
                                         ("9X9", True)])
def test_input_size_decides_the_size_dependent_pair(stack: Path, size: str, exact: bool) -> None:
    # c1 pads 2 (+2 per axis), c2 keeps: at c3's input the size is n + 2, odd exactly when n is odd
    result = cli("check", stack, "--json", "--input-size", size)
    assert result.exit_code == 0, result.stderr
    rep = json_out(result)
    p = pair(rep, "c3", "c4")
    assert p["verdict"] == "size-dependent"
    assert p["exact_at_input_size"] is exact
    assert rep["input_size"] == [int(n) for n in re.split("[x,X]", size)]
    if exact:
        assert p["merged"] is not None
    assert pair(rep, "c1", "c2")["exact_at_input_size"] is True


def test_short_input_size_option_and_policy_all_merge_at_that_size(stack: Path) -> None:
    rep = json_out(cli("check", stack, "--json", "-s", "9x9", "-p", "all"))
    assert pair(rep, "c3", "c4")["applied"] is True
    assert rep["summary"]["merged"] == 2
    rep = json_out(cli("check", stack, "--json", "-s", "10x10", "-p", "all"))
    assert pair(rep, "c3", "c4")["applied"] is False
    assert pair(rep, "c5", "c6")["applied"] is False


def test_fail_on_unmergeable(stack: Path, tmp_path: Path) -> None:
    result = cli("check", stack, "--fail-on", "unmergeable")
    assert result.exit_code == 1
    assert "c5 -> c6" in result.stderr and "fail-on unmergeable" in result.stderr
    assert "c3 -> c4" not in result.stderr.split("failed")[-1]
    ok = bn_model(tmp_path / "bn.safetensors")
    assert cli("check", ok, "--fail-on", "unmergeable").exit_code == 0


def test_fail_on_with_json_keeps_stdout_pure(stack: Path) -> None:
    result = cli("check", stack, "--json", "--fail-on", "unmergeable", *FAST)
    assert result.exit_code == 1
    assert json_out(result)["summary"]["unmergeable"] == 1


def test_fail_on_quiet_still_fails_silently(stack: Path) -> None:
    result = cli("check", stack, "-q", "--fail-on", "unmergeable", *FAST)
    assert result.exit_code == 1
    assert result.stdout == "" and result.stderr == ""


def _size_dependent_only(tmp_path: Path) -> Path:
    desc, tensors = stack_parts()
    layers = [dict(l, input="x") if l["name"] == "c3" else l for l in desc["layers"] if l["name"] in ("c3", "c4")]
    return save(tmp_path / "sd.safetensors", {k: v for k, v in tensors.items() if k[:2] in ("c3", "c4")},
                describe(layers, ["c4"]))


def test_fail_on_size_dependent(stack: Path, tmp_path: Path) -> None:
    sd = _size_dependent_only(tmp_path)
    assert cli("check", sd, "--fail-on", "unmergeable").exit_code == 0
    result = cli("check", sd, "--fail-on", "size-dependent")
    assert result.exit_code == 1 and "c3 -> c4" in result.stderr
    # unmergeable counts as "size-dependent or worse"
    assert cli("check", stack, "--fail-on", "size-dependent").exit_code == 1
    assert cli("check", bn_model(tmp_path / "bn.safetensors"), "--fail-on", "size-dependent").exit_code == 0


def test_fail_on_unmerged(stack: Path, tmp_path: Path) -> None:
    result = cli("check", stack, "--fail-on", "unmerged")
    assert result.exit_code == 1
    assert "c3 -> c4" in result.stderr and "c5 -> c6" in result.stderr
    assert cli("check", bn_model(tmp_path / "bn.safetensors"), "--fail-on", "unmerged").exit_code == 0
    dw = depthwise_model(tmp_path / "dw.safetensors")
    assert cli("check", dw, "--fail-on", "unmerged").exit_code == 1  # cheaper policy leaves it
    assert cli("check", dw, "--fail-on", "unmerged", "--policy", "all").exit_code == 0


def test_counterexamples_are_real(stack: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "ce"
    before = listing(tmp_path)
    result = cli("check", stack, "--json", "--counterexamples", out_dir)
    assert result.exit_code == 0, result.stderr
    rep = json_out(result)
    after = listing(tmp_path)
    new = sorted(set(after) - set(before))
    assert {k: v for k, v in after.items() if k in before} == before
    files = sorted(out_dir.iterdir())
    unmergeable = [p for p in rep["pairs"] if p["verdict"] == "unmergeable"]
    assert len(files) == len(unmergeable) == 1
    assert new == ["ce", f"ce/{files[0].name}"]
    ce_rep = unmergeable[0]["counterexample"]
    with safe_open(str(files[0]), framework="pt") as f:
        assert set(f.keys()) == {"input", "pair_output", "candidate_output"}
        meta = f.metadata()
        x, y_pair, y_cand = (f.get_tensor(k) for k in ("input", "pair_output", "candidate_output"))
    assert list(x.shape) == ce_rep["input_shape"]
    idx = tuple(json.loads(meta["output_index"]))
    assert list(idx) == ce_rep["output_index"]
    assert float(y_pair[idx]) != float(y_cand[idx])
    assert abs(float(y_pair[idx]) - ce_rep["pair_value"]) <= 1e-9 * max(1.0, abs(ce_rep["pair_value"]))
    assert abs(float(y_cand[idx]) - ce_rep["candidate_value"]) <= 1e-9 * max(1.0, abs(ce_rep["candidate_value"]))
    # and the pair really computes pair_output on that input: c5 then c6, float64
    t, _ = read(stack)
    w5, w6 = t["c5.weight"].double(), t["c6.weight"].double()
    expected = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x.double(), w5), w6, padding=2)
    assert torch.allclose(y_pair.double(), expected, rtol=1e-9, atol=1e-9)


def test_counterexamples_dir_stays_empty_when_nothing_is_unmergeable(tmp_path: Path) -> None:
    model = bn_model(tmp_path / "bn.safetensors")
    result = cli("check", model, "--counterexamples", tmp_path / "ce")
    assert result.exit_code == 0
    assert list((tmp_path / "ce").glob("*")) == []


def test_counterexamples_pointing_to_a_file_is_a_usage_error(stack: Path, tmp_path: Path) -> None:
    target = tmp_path / "not_a_dir"
    target.write_text("x")
    assert_one_line_error(cli("check", stack, "--counterexamples", target))


def test_skipped_pairs_when_the_intermediate_has_two_consumers(tmp_path: Path) -> None:
    model = branch_model(tmp_path / "branch.safetensors")
    result = cli("check", model, "--json")
    assert result.exit_code == 0
    rep = json_out(result)
    assert {(p["first"], p["second"]): p["verdict"] for p in rep["pairs"]} == {
        ("c1", "c2"): "skipped", ("c1", "c3"): "skipped"}
    assert all("consumer" in p["reason"] for p in rep["pairs"])
    assert rep["summary"]["pairs"] == 2 and rep["summary"]["merged"] == 0
    assert rep["summary"]["mergeable"] == rep["summary"]["unmergeable"] == 0
    table = cli("check", model)
    assert table.exit_code == 0 and "skipped" in table.stdout
    assert cli("check", model, "--fail-on", "unmerged").exit_code == 1


def test_batch_norm_between_convs_is_folded(tmp_path: Path) -> None:
    model = bn_model(tmp_path / "bn.safetensors")
    rep = json_out(cli("check", model, "--json"))
    (p,) = rep["pairs"]
    assert (p["first"], p["second"], p["via"], p["verdict"]) == ("c1", "c2", ["bn"], "mergeable")
    assert p["merged"]["kernel_size"] == [5, 5]
    assert "via bn" in cli("check", model).stdout


def test_check_quiet_and_verbose(stack: Path) -> None:
    quiet = cli("check", stack, "-q", *FAST)
    assert quiet.exit_code == 0 and quiet.stdout == "" and quiet.stderr == ""
    verbose = cli("check", stack, "-v", *FAST)
    assert verbose.exit_code == 0 and "counterexample" in verbose.stdout


# --- fuse -------------------------------------------------------------------------------------


def test_fuse_writes_stem_fused_beside_the_input(stack: Path) -> None:
    result = fuse_keeping_input(stack)
    assert result.exit_code == 0, result.stderr
    out = stack.with_name("stack.fused.safetensors")
    assert out.exists()
    assert sorted(p.name for p in stack.parent.iterdir()) == ["stack.fused.safetensors", "stack.safetensors"]
    assert "wrote" in result.stdout and str(out) in "".join(result.stdout.split())  # rich may wrap the path


def test_fuse_output_option_header_and_function(stack: Path, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "merged.safetensors"
    out.parent.mkdir()
    result = fuse_keeping_input(stack, "-o", out)
    assert result.exit_code == 0, result.stderr
    tensors, meta = read(out)
    assert meta["format"] == "pt"
    assert meta["note"] == "keep me"
    desc = json.loads(meta[GRAPH_KEY])
    names = [l["name"] for l in desc["layers"]]
    assert "c1" not in names and "c2" in names
    c2 = next(l for l in desc["layers"] if l["name"] == "c2")
    assert c2["input"] == "x" and c2["padding"] == [[3, 3], [3, 3]] and c2["stride"] == [1, 1]
    assert "c1.weight" not in tensors and tuple(tensors["c2.weight"].shape) == (4, 3, 5, 5)
    assert tensors["c2.weight"].dtype == torch.float32
    original, _ = read(stack)
    for name in ("c3.weight", "c4.weight", "c5.weight", "c6.weight"):
        assert torch.equal(tensors[name], original[name])  # copied bit for bit
    assert_same_function(stack, out, [(9, 9), (12, 12), (7, 10)])
    assert not (tmp_path / "stack.fused.safetensors").exists()


def test_fuse_is_idempotent(stack: Path, tmp_path: Path) -> None:
    once, twice = tmp_path / "once.safetensors", tmp_path / "twice.safetensors"
    assert fuse_keeping_input(stack, "-o", once).exit_code == 0
    result = fuse_keeping_input(once, "-o", twice, "--json")
    assert result.exit_code == 0, result.stderr
    rep = json_out(result)
    assert rep["summary"]["merged"] == 0
    assert rep["summary"]["pairs"] == 2
    assert_same_function(stack, twice, [(9, 9), (10, 10)])


def test_fuse_at_input_size_with_policy_all(stack: Path, tmp_path: Path) -> None:
    out, again = tmp_path / "f9.safetensors", tmp_path / "f9b.safetensors"
    result = fuse_keeping_input(stack, "-o", out, "-s", "9x9", "-p", "all", "--json")
    assert result.exit_code == 0, result.stderr
    rep = json_out(result)
    assert rep["summary"]["merged"] == 2 and rep["output"] == str(out)
    assert_same_function(stack, out, [(9, 9), (13, 13), (9, 11)])
    # the size-dependent merge really depends on the size: at an even size it is not the same function
    t0, _ = read(stack)
    t1, _ = read(out)
    x = torch.randn(1, 3, 10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(evaluate(description_of(stack), t0, x)[0], evaluate(description_of(out), t1, x)[0])
    second = fuse_keeping_input(out, "-o", again, "-s", "9x9", "-p", "all", "--json")
    assert second.exit_code == 0
    assert json_out(second)["summary"]["merged"] == 0


def test_fuse_refuses_to_overwrite_without_force(stack: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old contents")
    result = fuse_keeping_input(stack, "-o", out, *FAST)
    line = assert_one_line_error(result)
    assert "--force" in line
    assert out.read_bytes() == b"old contents"
    forced = fuse_keeping_input(stack, "-o", out, "--force", *FAST)
    assert forced.exit_code == 0, forced.stderr
    assert read(out)[1]["format"] == "pt"
    # the default output too
    default = stack.with_name("stack.fused.safetensors")
    default.write_bytes(b"old")
    assert_one_line_error(fuse_keeping_input(stack, *FAST))
    assert default.read_bytes() == b"old"
    assert fuse_keeping_input(stack, "-f", *FAST).exit_code == 0


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_fuse_refuses_to_write_over_its_input(stack: Path, force: list[str]) -> None:
    before = listing(stack.parent)
    line = assert_one_line_error(fuse_keeping_input(stack, "-o", stack, *force, *FAST))
    assert "input" in line
    link = stack.with_name("link.safetensors")
    link.symlink_to(stack)
    assert_one_line_error(fuse_keeping_input(stack, "-o", link, *force, *FAST))
    link.unlink()
    assert listing(stack.parent) == before


def test_fuse_report_has_the_description_used(stack: Path, tmp_path: Path) -> None:
    out, report = tmp_path / "o.safetensors", tmp_path / "r.json"
    result = fuse_keeping_input(stack, "-o", out, "--report", report, "-q", *FAST)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    data = json.loads(report.read_text())
    assert data["description_used"] == description_of(out)
    assert data["summary"]["merged"] == 1
    assert [p["verdict"] for p in data["pairs"]] == ["mergeable", "size-dependent", "unmergeable"]
    # an existing report is not replaced without --force, and nothing else is written then
    os.unlink(out)
    line = assert_one_line_error(fuse_keeping_input(stack, "-o", out, "--report", report, *FAST))
    assert "--force" in line and not out.exists()


def test_fuse_report_never_replaces_the_input(stack: Path, tmp_path: Path) -> None:
    before = sha256(stack)
    result = cli("fuse", stack, "-o", tmp_path / "o.safetensors", "--report", stack, "--force", *FAST)
    assert sha256(stack) == before
    assert_one_line_error(result)


def test_fuse_export_never_replaces_the_input(arch_model: tuple[Path, Path], tmp_path: Path) -> None:
    bare, code = arch_model
    before = sha256(bare)
    result = cli("fuse", bare, "--arch", f"{code}:build", "-o", tmp_path / "o.safetensors", "--export", bare,
                 "--input-shape", "1,3,9,9", "--force", "-q")
    assert sha256(bare) == before
    assert_one_line_error(result)


def test_fuse_report_never_replaces_the_output(stack: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    result = cli("fuse", stack, "-o", out, "--report", out, "--force", *FAST)
    assert result.exit_code == 2 or read(out)[1].get("format") == "pt"


def test_fuse_unwritable_report_leaves_no_output(stack: Path, tmp_path: Path) -> None:
    before = listing(tmp_path)
    result = cli("fuse", stack, "-o", tmp_path / "o.safetensors", "--report", tmp_path / "missing" / "r.json",
                 *FAST)
    assert result.exit_code == 2
    assert listing(tmp_path) == before


def test_fuse_policy_cheaper_vs_all_on_depthwise_pointwise(tmp_path: Path) -> None:
    model = depthwise_model(tmp_path / "dw.safetensors")
    cheap, every = tmp_path / "cheap.safetensors", tmp_path / "all.safetensors"
    r1 = fuse_keeping_input(model, "-o", cheap, "--policy", "cheaper", "--json")
    assert r1.exit_code == 0, r1.stderr
    rep = json_out(r1)
    assert rep["pairs"][0]["verdict"] == "mergeable" and rep["pairs"][0]["applied"] is False
    assert rep["summary"]["merged"] == 0
    assert set(read(cheap)[0]) == {"dw.weight", "pw.weight"}
    r2 = fuse_keeping_input(model, "-o", every, "--policy", "all", "--json")
    assert r2.exit_code == 0, r2.stderr
    rep = json_out(r2)
    assert rep["pairs"][0]["applied"] is True and rep["summary"]["merged"] == 1
    tensors = read(every)[0]
    assert set(tensors) == {"pw.weight"} and tuple(tensors["pw.weight"].shape) == (32, 32, 3, 3)
    merged = rep["pairs"][0]["merged"]
    assert merged["groups"] == 1 and merged["padding"] == [[2, 2], [2, 2]]
    # the default policy is cheaper
    assert json_out(cli("check", model, "--json"))["summary"]["merged"] == 0
    for out in (cheap, every):
        assert_same_function(model, out, [(6, 6), (9, 5)], channels=32)


def test_fuse_with_batch_norm_and_biases(tmp_path: Path) -> None:
    model = bn_model(tmp_path / "bn.safetensors")
    out = tmp_path / "o.safetensors"
    assert fuse_keeping_input(model, "-o", out).exit_code == 0
    tensors, _ = read(out)
    assert set(tensors) == {"c2.weight", "c2.bias"}
    assert [l["op"] for l in description_of(out)["layers"]] == ["conv2d"]
    assert_same_function(model, out, [(8, 8), (5, 11)])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_fuse_keeps_the_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    desc, tensors = stack_parts()
    model = save(tmp_path / "m.safetensors", {k: v.to(dtype) for k, v in tensors.items()}, desc)
    out = tmp_path / "o.safetensors"
    result = fuse_keeping_input(model, "-o", out, *FAST, "--json")
    assert result.exit_code == 0, result.stderr
    assert json_out(result)["merges"][0]["dtype"] == {torch.float16: "F16", torch.bfloat16: "BF16",
                                                      torch.float64: "F64"}[dtype]
    fused, _ = read(out)
    assert all(t.dtype == dtype for t in fused.values())
    original, _ = read(model)
    assert all(torch.equal(fused[k], original[k]) for k in ("c3.weight", "c6.weight"))


def test_nan_weights_and_integer_weights_are_skipped(tmp_path: Path) -> None:
    desc, tensors = stack_parts()
    tensors["c2.weight"][0, 0, 0, 0] = float("nan")
    tensors["c4.weight"] = tensors["c4.weight"].round().to(torch.int32)
    model = save(tmp_path / "m.safetensors", tensors, desc)
    out = tmp_path / "o.safetensors"
    result = fuse_keeping_input(model, "-o", out, *FAST, "--json")
    assert result.exit_code == 0, result.stderr
    rep = json_out(result)
    assert pair(rep, "c1", "c2")["verdict"] == "skipped" and "NaN" in pair(rep, "c1", "c2")["reason"]
    assert pair(rep, "c3", "c4")["verdict"] == "skipped"
    assert rep["summary"]["merged"] == 0
    fused, _ = read(out)
    assert fused.keys() == tensors.keys()


def test_fuse_merges_branches_whose_pairs_are_skipped(tmp_path: Path) -> None:
    """c1 feeds c2 and c3, which are added: each pair is skipped (c1 has two consumers).  The region
    c1 -> (c2 + c3) is not one conv (c1's padding 1 does not cover c2's), but the block c2 + c3 is."""
    model = branch_model(tmp_path / "branch.safetensors")
    out = tmp_path / "o.safetensors"
    result = fuse_keeping_input(model, "-o", out, "--json", "--policy", "all")
    assert result.exit_code == 0
    rep = json_out(result)
    assert rep["summary"]["merged"] == 0 and {p["verdict"] for p in rep["pairs"]} == {"skipped"}
    (region,) = rep["regions"]
    assert region["verdict"] == "unmergeable" and not region["applied"] and region["kind"] == "branches"
    assert "c1 -> c2" in region["reason"] and region["counterexample"] is not None
    (merge,) = rep["merges"]
    assert merge["layers"] == ["c2", "c3", "sum"] and merge["into"] == "sum" and merge["input"] == "c1"
    assert set(read(out)[0]) == {"c1.weight", "sum.weight"}
    assert_same_function(model, out, [(6, 6), (9, 7)])


def test_fuse_json_is_valid_and_gate_applies(stack: Path, tmp_path: Path) -> None:
    result = fuse_keeping_input(stack, "-o", tmp_path / "o.safetensors", "--json", "--fail-on", "unmergeable")
    assert result.exit_code == 1
    rep = json_out(result)
    assert rep["summary"]["merged"] == 1 and rep["output"] == str(tmp_path / "o.safetensors")
    assert rep["merges"][0]["layers"] == ["c1", "c2"] and rep["merges"][0]["into"] == "c2"


def test_fuse_with_sidecar_graph(stack: Path, tmp_path: Path) -> None:
    desc, tensors = stack_parts()
    bare = save(tmp_path / "bare.safetensors", tensors)
    sidecar = tmp_path / "graph.json"
    sidecar.write_text(json.dumps(desc))
    out = tmp_path / "o.safetensors"
    result = fuse_keeping_input(bare, "-o", out, "--graph", sidecar)
    assert result.exit_code == 0, result.stderr
    assert_same_function(stack, out, [(9, 9)])


def test_verification_failure_exits_3_and_writes_nothing(stack: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from convmerge.engine import plan

    monkeypatch.setattr(plan, "VERIFY_TOLERANCE", -1.0)
    before = listing(tmp_path)
    result = fuse_keeping_input(stack, "-o", tmp_path / "o.safetensors", *FAST)
    line = assert_one_line_error(result, code=3)
    assert "internal error" in line and "--debug" in line
    assert listing(tmp_path) == before


def test_errors_have_one_base_whose_kind_gives_the_exit_code(stack: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every error convmerge raises is a `convmerge.ConvmergeError` that keeps its builtin base (callers'
    `except ValueError` still work); the command line's exit code comes from its kind alone."""
    import convmerge
    from convmerge import io, model, strictjson
    from convmerge.engine import plan
    from convmerge.maths import spec
    from convmerge.frontends import trace_layers
    from convmerge.errors import Kind
    from convmerge.graph import GraphError

    bad_input = [GraphError, io.ModelFileError, io.OutputExists, spec.SpecError, strictjson.TooDeep,
                 trace_layers.TraceError]
    for cls in bad_input:
        assert issubclass(cls, convmerge.ConvmergeError) and issubclass(cls, ValueError), cls
        assert cls.kind is Kind.BAD_INPUT, cls
    assert convmerge.VerificationError is plan.VerificationError
    assert issubclass(plan.VerificationError, RuntimeError) and plan.VerificationError.kind is Kind.VERIFICATION

    class Unknown(convmerge.ConvmergeError):  # no class list: a new error with a kind needs no CLI change
        kind = Kind.BAD_INPUT

    def raising(error: Exception) -> Any:
        def raise_it(*args: Any, **kwargs: Any) -> None:
            raise error
        return raise_it

    for error, code in ((Unknown("x.safetensors: field 'y': bad"), 2), (plan.VerificationError("wrong"), 3),
                        (convmerge.ConvmergeError("a bug"), 3)):
        monkeypatch.setattr(model, "check_file", raising(error))
        line = assert_one_line_error(cli("check", stack), code=code)
        assert str(error) in line and ("internal error" in line) == (code == 3), line


def test_unexpected_exception_exits_3(stack: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from convmerge import model

    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(model, "check_file", boom)
    line = assert_one_line_error(cli("check", stack), code=3)
    assert "RuntimeError" in line and "boom second line" in line
    debug = cli("check", stack, "--debug")
    assert debug.exit_code != 0 and isinstance(debug.exception, RuntimeError)


# --- inspect ----------------------------------------------------------------------------------


def test_inspect_without_description(tmp_path: Path) -> None:
    _, tensors = stack_parts()
    bare = save(tmp_path / "bare.safetensors", tensors)
    result = cli("inspect", bare)
    assert result.exit_code == 0, result.stderr
    for n in range(1, 7):
        assert f"c{n}.weight" in result.stdout
    assert "no graph description" in result.stdout
    assert "--graph" in result.stdout and "annotate" in result.stdout
    data = json_out(cli("inspect", bare, "--json"))
    assert data["description"] is None and "annotate" in data["missing"]
    assert [c["name"] for c in data["conv_tensors"]] == [f"c{n}.weight" for n in range(1, 7)]


def test_inspect_lists_only_conv_shaped_tensors(tmp_path: Path) -> None:
    model = bn_model(tmp_path / "bn.safetensors")
    data = json_out(cli("inspect", model, "--json"))
    assert [c["name"] for c in data["conv_tensors"]] == ["c1.weight", "c2.weight"]
    assert data["tensor_count"] == 8
    assert data["pairs"] == [{"first": "c1", "second": "c2", "via": ["bn"], "blocked": None}]


def test_inspect_with_description_lists_pairs(stack: Path, tmp_path: Path) -> None:
    result = cli("inspect", stack)
    assert result.exit_code == 0
    assert "description" in result.stdout
    for first, second in (("c1", "c2"), ("c3", "c4"), ("c5", "c6")):
        assert re.search(rf"{first}\s+{second}", result.stdout)
    data = json_out(cli("inspect", stack, "--json"))
    assert data["layer_count"] == 8
    assert [(p["first"], p["second"]) for p in data["pairs"]] == [("c1", "c2"), ("c3", "c4"), ("c5", "c6")]
    assert data["metadata_keys"] == [GRAPH_KEY, "note"]
    branch = json_out(cli("inspect", branch_model(tmp_path / "b.safetensors"), "--json"))
    assert all(p["blocked"] for p in branch["pairs"])


# --- explain ----------------------------------------------------------------------------------


GRID_CHARS = set(" .:-=+*#%@·")


def test_explain_unmergeable_pair_shows_conditions_and_error_map(stack: Path) -> None:
    result = cli("explain", stack, "c5", "c6")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "unmergeable" in out and "conditions" in out.lower() and "counterexample" in out
    data = json_out(cli("explain", stack, "c5", "c6", "--json"))
    grid = data["error_map"]
    assert data["verdict"] == "unmergeable" and data["exact_at_size"] is False
    assert data["counterexample"] is not None and data["conditions"]
    assert not all(c["holds"] for c in data["conditions"])
    # the grid: one line per row of the error map, one character per output position
    lines = out.splitlines()
    rows = [line for line in lines if len(line) == len(grid[0]) and set(line) <= GRID_CHARS and line.strip()]
    assert len(rows) == len(grid)
    # interior positions (more than 2 cells from any border) are exact: the error lives on the border ring
    h, w = len(grid), len(grid[0])
    assert all(grid[i][j] <= 1e-9 for i in range(2, h - 2) for j in range(2, w - 2))
    assert max(max(r) for r in grid) > 0
    assert all(rows[i][j] == "·" for i in range(2, h - 2) for j in range(2, w - 2))


def test_explain_size_dependent_pair_at_sizes(stack: Path) -> None:
    odd = json_out(cli("explain", stack, "c3", "c4", "--json", "--input-size", "11x11"))
    assert odd["verdict"] == "size-dependent" and odd["exact_at_size"] is True and odd["counterexample"] is None
    assert max(max(r) for r in odd["error_map"]) <= 1e-9
    even = json_out(cli("explain", stack, "c3", "c4", "--json", "-s", "12,12"))
    assert even["exact_at_size"] is False and even["counterexample"] is not None
    assert even["size"] == [12, 12]


def test_explain_mergeable_pair(stack: Path, tmp_path: Path) -> None:
    result = cli("explain", stack, "c1", "c2")
    assert result.exit_code == 0 and "mergeable" in result.stdout
    data = json_out(cli("explain", bn_model(tmp_path / "bn.safetensors"), "c1", "c2", "--json"))
    assert data["via"] == ["bn"] and data["verdict"] == "mergeable" and data["exact_at_size"] is True


def test_explain_unknown_pair_names_the_known_ones(stack: Path) -> None:
    line = assert_one_line_error(cli("explain", stack, "c1", "c6"))
    for known in ("c1 -> c2", "c3 -> c4", "c5 -> c6"):
        assert known in line
    assert_one_line_error(cli("explain", stack, "nope", "c2"))


# --- annotate and --arch ----------------------------------------------------------------------


ARCH = textwrap.dedent("""
    from torch import nn

    def build():
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=2, bias=False),
            nn.Conv2d(8, 4, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(4, 2, 3, padding=0, bias=False),
            nn.Conv2d(2, 2, 3, padding=2, bias=False),
        )

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
                return self.a(x)
            return x

    def untraceable():
        return Branchy()
""")


@pytest.fixture
def arch_model(tmp_path: Path) -> tuple[Path, Path]:
    """An undescribed file whose weights fit `build()` in model.py."""
    code = tmp_path / "model.py"
    code.write_text(ARCH)
    torch.manual_seed(0)
    from torch import nn

    module = nn.Sequential(nn.Conv2d(3, 8, 3, padding=2, bias=False), nn.Conv2d(8, 4, 3, padding=1, bias=False),
                           nn.ReLU(), nn.Conv2d(4, 2, 3, padding=0, bias=False),
                           nn.Conv2d(2, 2, 3, padding=2, bias=False))
    path = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path), metadata={"who": "me"})
    return path, code


def test_annotate_writes_a_described_copy(arch_model: tuple[Path, Path], tmp_path: Path) -> None:
    bare, code = arch_model
    before = sha256(bare)
    out = tmp_path / "described.safetensors"
    result = cli("annotate", bare, "--arch", f"{code}:build", "-o", out)
    assert result.exit_code == 0, result.stderr
    assert sha256(bare) == before
    assert "wrote" in result.stdout and "2 conv pairs" in result.stdout
    tensors, meta = read(out)
    assert meta["who"] == "me"
    desc = json.loads(meta[GRAPH_KEY])
    assert [l["op"] for l in desc["layers"]] == ["conv2d", "conv2d", "relu", "conv2d", "conv2d"]
    original, _ = read(bare)
    assert tensors.keys() == original.keys() and all(torch.equal(tensors[k], original[k]) for k in tensors)
    # check on the copy needs neither --graph nor --arch
    rep = json_out(cli("check", out, "--json"))
    assert [(p["first"], p["second"], p["verdict"]) for p in rep["pairs"]] == [
        ("0", "1", "mergeable"), ("3", "4", "unmergeable")]
    assert "header" in rep["description"]
    # an existing output is kept without --force, replaced with it
    assert_one_line_error(cli("annotate", bare, "--arch", f"{code}:build", "-o", out))
    assert cli("annotate", bare, "--arch", f"{code}:build", "-o", out, "--force", "-q").exit_code == 0
    # and it never writes over its input
    assert_one_line_error(cli("annotate", bare, "--arch", f"{code}:build", "-o", bare, "--force"))
    assert sha256(bare) == before


def test_check_and_fuse_with_arch(arch_model: tuple[Path, Path], tmp_path: Path) -> None:
    bare, code = arch_model
    rep = json_out(cli("check", bare, "--arch", f"{code}:build", "--json"))
    assert rep["summary"]["pairs"] == 2 and rep["description"].startswith("--arch")
    out = tmp_path / "f.safetensors"
    assert fuse_keeping_input(bare, "--arch", f"{code}:build", "-o", out).exit_code == 0
    assert "0.weight" not in read(out)[0]
    assert json_out(cli("fuse", out, "-o", tmp_path / "g.safetensors", "--json"))["summary"]["merged"] == 0


@pytest.mark.parametrize("ref, words", [("untraceable", "trace"), ("nothing_here", "nothing_here")])
def test_annotate_bad_arch_is_one_line(arch_model: tuple[Path, Path], tmp_path: Path, ref: str, words: str) -> None:
    bare, code = arch_model
    before = listing(tmp_path)
    line = assert_one_line_error(cli("annotate", bare, "--arch", f"{code}:{ref}", "-o", tmp_path / "o.safetensors"))
    assert words in line
    assert listing(tmp_path) == before


@pytest.mark.parametrize("arch", ["no_such_module_xyz:build", "missing_file.py:build", "no-colon"])
def test_bad_arch_reference(arch_model: tuple[Path, Path], tmp_path: Path, arch: str) -> None:
    bare, _ = arch_model
    before = listing(tmp_path)
    assert_one_line_error(cli("check", bare, "--arch", arch))
    assert_one_line_error(cli("fuse", bare, "--arch", arch))
    assert listing(tmp_path) == before


def test_arch_whose_weights_do_not_fit(stack: Path, arch_model: tuple[Path, Path], tmp_path: Path) -> None:
    _, code = arch_model
    _, tensors = stack_parts()
    bare = save(tmp_path / "other.safetensors", tensors)
    before = listing(tmp_path)
    assert_one_line_error(cli("annotate", bare, "--arch", f"{code}:build", "-o", tmp_path / "o.safetensors"))
    assert_one_line_error(cli("check", bare, "--arch", f"{code}:build"))
    assert listing(tmp_path) == before


def test_fuse_export_writes_a_program(arch_model: tuple[Path, Path], tmp_path: Path) -> None:
    bare, code = arch_model
    out, program = tmp_path / "f.safetensors", tmp_path / "f.pt2"
    result = fuse_keeping_input(bare, "--arch", f"{code}:build", "-o", out, "--export", program,
                                "--input-shape", "1,3,9,9", "-q")
    assert result.exit_code == 0, result.stderr
    loaded = torch.export.load(str(program)).module()
    x = torch.randn(1, 3, 9, 9)
    ns: dict[str, Any] = {}
    exec(compile(ARCH, "model.py", "exec"), ns)
    reference = ns["build"]()
    reference.load_state_dict(read(bare)[0])
    assert torch.allclose(loaded(x), reference.eval()(x), rtol=1e-4, atol=1e-4)
    for shape in [(2, 3, 9, 9), (3, 3, 12, 7)]:  # the program's batch and spatial sizes are symbolic
        x = torch.randn(*shape)
        assert torch.allclose(loaded(x), reference(x), rtol=1e-4, atol=1e-4), shape


def test_arch_is_traced_at_the_input_size(arch_model: tuple[Path, Path]) -> None:
    bare, code = arch_model
    result = cli("check", bare, "--arch", f"{code}:build", "--input-size", "17x19", "--json")
    assert result.exit_code == 0, result.stderr
    notes = json.loads(result.stdout)["notes"]
    assert notes[0].startswith("traced with torch.export on an input of shape [1, 3, 17, 19] (spatial size as "
                               "given;"), notes[0]


# --- bad input: one line on stderr, exit 2, nothing written -----------------------------------


def _bad_description(mutate: Callable[[dict, dict], None]) -> Callable[[Path], Path]:
    def build(tmp_path: Path) -> Path:
        desc, tensors = stack_parts()
        mutate(desc, tensors)
        return save(tmp_path / "bad.safetensors", tensors, desc)
    return build


def _layer(desc: dict, name: str) -> dict:
    return next(l for l in desc["layers"] if l["name"] == name)


def _random_bytes(tmp_path: Path) -> Path:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(os.urandom(1000))
    return path


def _truncated(tmp_path: Path) -> Path:
    good = stack_model(tmp_path / "good.safetensors")
    data = good.read_bytes()
    good.unlink()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data[:-100])
    return path


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"")
    return path


def _bad_groups(desc: dict, tensors: dict) -> None:
    _layer(desc, "c2")["groups"] = 3  # c2.weight is [4, 8, 3, 3]: 4 out channels, not divisible by 3


def _missing_weight(desc: dict, tensors: dict) -> None:
    del tensors["c4.weight"]


def _affine_after(desc: dict, tensors: dict, shapes: dict) -> None:
    """An affine layer `s` after c1 (which c2 then reads), its tensors of the given shapes."""
    desc["layers"].insert(1, {"name": "s", "op": "affine", "input": "c1"})
    _layer(desc, "c2")["input"] = "s"
    tensors.update({f"s.{k}": torch.ones(shape) for k, shape in shapes.items()})


def _duplicate(desc: dict, tensors: dict) -> None:
    _layer(desc, "c3")["name"] = "c2"


def _cycle(desc: dict, tensors: dict) -> None:
    _layer(desc, "c1")["input"] = "c2"


BAD_FILES: dict[str, tuple[Callable[[Path], Path], list[str]]] = {
    "random bytes": (_random_bytes, []),
    "truncated": (_truncated, []),
    "empty": (_empty, []),
    "dangling input": (_bad_description(lambda d, t: _layer(d, "c4").update(input="nowhere")),
                       ["c4", "input", "nowhere"]),
    "dangling output": (_bad_description(lambda d, t: d.update(outputs=["ghost"])), ["outputs", "ghost"]),
    "duplicate names": (_bad_description(_duplicate), ["c2", "name", "duplicate"]),
    "missing weight": (_bad_description(_missing_weight), ["c4", "c4.weight"]),
    "kernel_size contradicts weight": (_bad_description(lambda d, t: _layer(d, "c3").update(kernel_size=[5, 5])),
                                       ["c3", "kernel_size"]),
    "groups do not divide": (_bad_description(_bad_groups), ["c2", "groups"]),
    "zero stride": (_bad_description(lambda d, t: _layer(d, "c3").update(stride=0)), ["c3", "stride"]),
    "negative padding": (_bad_description(lambda d, t: _layer(d, "c1").update(padding=-1)), ["c1", "padding"]),
    "bad padding mode": (_bad_description(lambda d, t: _layer(d, "c1").update(padding_mode="mirror")),
                         ["c1", "padding_mode"]),
    "same with stride 2": (_bad_description(lambda d, t: _layer(d, "c3").update(padding="same")),
                           ["c3", "padding"]),
    "unknown version": (_bad_description(lambda d, t: d.update(version=2)), ["version"]),
    "cycle": (_bad_description(_cycle), ["cycle"]),
    "layers not a list": (_bad_description(lambda d, t: d.update(layers={})), ["layers"]),
    "conv with two inputs": (_bad_description(lambda d, t: (_layer(d, "c2").pop("input"),
                                                            _layer(d, "c2").update(inputs=["c1", "x"]))),
                             ["c2", "input"]),
    "conv1d op on a 2-d weight": (_bad_description(lambda d, t: _layer(d, "c2").update(op="conv1d")), ["c2", "op"]),
    "bias of the wrong shape": (_bad_description(lambda d, t: t.update({"c2.bias": torch.zeros(3)})),
                                ["c2", "c2.bias"]),
    "affine scale of the wrong shape": (_bad_description(lambda d, t: _affine_after(d, t, {"weight": (2, 3)})),
                                        ["'s'", "s.weight", "[2, 3]"]),
    "affine scale as a field": (_bad_description(lambda d, t: (_affine_after(d, t, {}),
                                                               _layer(d, "s").update(weight=2.0))),
                                ["'s'", "field 'weight'", "s.weight"]),
    "sub of three": (_bad_description(lambda d, t: d["layers"].append({"name": "d", "op": "sub",
                                                                       "inputs": ["c1", "c2", "c3"]})),
                     ["'d'", "inputs", "exactly 2"]),
    "description not JSON": (lambda p: save(p / "bad.safetensors", stack_parts()[1], None,
                                            {GRAPH_KEY: "{not json"}), ["JSON"]),
    "description is a list": (lambda p: save(p / "bad.safetensors", stack_parts()[1], None,
                                             {GRAPH_KEY: "[1, 2]"}), ["object"]),
}


@pytest.mark.parametrize("command", ["check", "fuse", "explain"])
@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_are_one_line_errors(tmp_path: Path, case: str, command: str) -> None:
    build, words = BAD_FILES[case]
    model = build(tmp_path)
    before = listing(tmp_path)
    extra = ["c3", "c4"] if command == "explain" else []
    result = cli(command, model, *extra)
    line = assert_one_line_error(result)
    for word in words:
        assert word in line, (word, line)
    assert listing(tmp_path) == before, "a failed command left a file behind"


@pytest.mark.parametrize("case", ["random bytes", "truncated", "missing weight", "dangling input",
                                  "description not JSON"])
def test_inspect_bad_files(tmp_path: Path, case: str) -> None:
    model = BAD_FILES[case][0](tmp_path)
    assert_one_line_error(cli("inspect", model))
    assert_one_line_error(cli("inspect", model, "--json"))


@pytest.mark.parametrize("case", ["random bytes", "truncated", "empty"])
def test_annotate_bad_files(arch_model: tuple[Path, Path], tmp_path: Path, case: str) -> None:
    _, code = arch_model
    model = BAD_FILES[case][0](tmp_path)
    before = listing(tmp_path)
    assert_one_line_error(cli("annotate", model, "--arch", f"{code}:build", "-o", tmp_path / "o.safetensors"))
    assert listing(tmp_path) == before


@pytest.mark.parametrize("command", [["check"], ["fuse"], ["inspect"], ["explain", "a", "b"],
                                     ["annotate", "--arch", "x:y", "-o", "o.safetensors"]])
def test_missing_file(tmp_path: Path, command: list[str]) -> None:
    missing = tmp_path / "missing.safetensors"
    line = assert_one_line_error(cli(command[0], missing, *command[1:]))
    assert "missing.safetensors" in line
    assert list(tmp_path.iterdir()) == []


def test_directory_instead_of_file(tmp_path: Path) -> None:
    assert_one_line_error(cli("check", tmp_path))
    assert_one_line_error(cli("inspect", tmp_path))


@pytest.mark.parametrize("command", ["check", "fuse"])
def test_file_without_description_is_refused(tmp_path: Path, command: str) -> None:
    _, tensors = stack_parts()
    bare = save(tmp_path / "bare.safetensors", tensors)
    before = listing(tmp_path)
    line = assert_one_line_error(cli(command, bare))
    assert "no graph description" in line and "--graph" in line and "--arch" in line
    assert listing(tmp_path) == before
    assert_one_line_error(cli("explain", bare, "c1", "c2"))


@pytest.mark.parametrize("content, words", [("{not json", "not valid JSON"), ("[]", "object"),
                                            ('{"version": 1}', "inputs"), (None, "cannot read")])
@pytest.mark.parametrize("command", ["check", "fuse", "inspect"])
def test_graph_option_errors(stack: Path, tmp_path: Path, content: Optional[str], words: str, command: str) -> None:
    sidecar = tmp_path / "graph.json"
    if content is not None:
        sidecar.write_text(content)
    before = listing(tmp_path)
    line = assert_one_line_error(cli(command, stack, "--graph", sidecar))
    assert words in line and "graph.json" in line
    assert listing(tmp_path) == before


def test_graph_option_overrides_the_header(stack: Path, tmp_path: Path) -> None:
    desc, _ = stack_parts()
    desc["layers"].insert(1, {"name": "act", "op": "relu", "input": "c1"})
    _layer(desc, "c2")["input"] = "act"
    sidecar = tmp_path / "graph.json"
    sidecar.write_text(json.dumps(desc))
    rep = json_out(cli("check", stack, "--graph", sidecar, "--json"))
    assert [(p["first"], p["second"]) for p in rep["pairs"]] == [("c3", "c4"), ("c5", "c6")]
    assert rep["description"] == str(sidecar)


@pytest.mark.parametrize("size", ["0x3", "abc", "", "1x2x3x4", "9x", "-1x3", "3.5x3", "x"])
@pytest.mark.parametrize("command", [["check"], ["fuse"], ["explain", "c1", "c2"]])
def test_bad_input_size(stack: Path, tmp_path: Path, size: str, command: list[str]) -> None:
    before = listing(tmp_path)
    line = assert_one_line_error(cli(command[0], stack, *command[1:], "--input-size", size))
    assert "--input-size" in line
    assert listing(tmp_path) == before


@pytest.mark.parametrize("size", ["9x9x9", "9,9,9"])
@pytest.mark.parametrize("command", [["check"], ["fuse"], ["explain", "c1", "c2"]])
def test_input_size_with_the_wrong_number_of_axes(stack: Path, tmp_path: Path, command: list[str], size: str) -> None:
    before = listing(tmp_path)
    line = assert_one_line_error(cli(command[0], stack, *command[1:], "--input-size", size))
    assert "axes" in line
    assert listing(tmp_path) == before


def test_one_number_applies_to_every_axis(stack: Path) -> None:
    rep = json_out(cli("check", stack, "--json", "-s", "9"))
    assert rep["input_size"] == [9, 9]
    assert pair(rep, "c3", "c4")["exact_at_input_size"] is True
    assert json_out(cli("explain", stack, "c3", "c4", "--json", "-s", "11"))["size"] == [11, 11]


@pytest.mark.parametrize("extra", [[], ["--input-shape", "1,3,9,9"], ["--arch", "m.py:build"]])
def test_export_needs_arch_and_input_shape(stack: Path, tmp_path: Path, extra: list[str]) -> None:
    before = listing(tmp_path)
    line = assert_one_line_error(fuse_keeping_input(stack, "--export", tmp_path / "m.pt2", *extra))
    assert "--export" in line
    assert listing(tmp_path) == before


@pytest.mark.parametrize("shape", ["1,3", "a,b,c", "0,3,9,9"])
def test_bad_input_shape(stack: Path, shape: str) -> None:
    line = assert_one_line_error(fuse_keeping_input(stack, "--input-shape", shape))
    assert "--input-shape" in line


def test_debug_shows_the_exception(tmp_path: Path) -> None:
    from convmerge.graph import GraphError

    _, tensors = stack_parts()
    bare = save(tmp_path / "bare.safetensors", tensors)
    result = cli("check", bare, "--debug")
    assert result.exit_code != 0
    assert isinstance(result.exception, GraphError)
    assert "convmerge: error:" not in result.stderr
    missing = cli("inspect", tmp_path / "nope.safetensors", "--debug")
    assert missing.exit_code != 0 and missing.exception is not None and not isinstance(missing.exception, SystemExit)


# --- the installed script ---------------------------------------------------------------------


def script(*args: Any, env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess:
    exe = shutil.which("convmerge")
    assert exe is not None, "the console script `convmerge` is not installed"
    full_env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE")}
    full_env.update(env or {})
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, env=full_env, timeout=120)


def test_script_check_json_is_pure_and_no_color(stack: Path) -> None:
    proc = script("check", stack, "--json", "--input-size", "9x9", "--fail-on", "unmergeable", env={"NO_COLOR": "1"})
    assert proc.returncode == 1, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["summary"]["pairs"] == 3
    assert pair(rep, "c3", "c4")["exact_at_input_size"] is True
    # the human report and the gate message went to stderr, without colour codes
    assert "c5 -> c6" in proc.stderr and "fail-on" in proc.stderr
    assert not ANSI.search(proc.stdout + proc.stderr)
    assert "Traceback" not in proc.stderr


def test_script_bad_input_is_one_line(tmp_path: Path) -> None:
    bad = _random_bytes(tmp_path)
    proc = script("fuse", bad)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("convmerge: error:")
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


def test_script_version() -> None:
    proc = script("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"convmerge {__version__}"
    assert proc.stderr == ""


def test_script_debug_shows_a_traceback(tmp_path: Path) -> None:
    proc = script("check", _random_bytes(tmp_path), "--debug")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr + proc.stdout or "ModelFileError" in proc.stderr + proc.stdout


def test_no_color_on_a_terminal_leaves_no_ansi(stack: Path) -> None:
    # TTY_COMPATIBLE=1 makes rich treat the pipe as a terminal, as it does on a real one
    proc = script("check", stack, *FAST, env={"NO_COLOR": "1", "TTY_COMPATIBLE": "1"})
    assert proc.returncode == 0
    assert not ANSI.search(proc.stdout + proc.stderr), proc.stdout[:200]


# --- counterexample files stay in their folder (issue 9.5) ------------------------------------


def _unmergeable(first: str, second: str, gen: torch.Generator) -> list[tuple[dict, dict]]:
    """first (2->2, 3x3, pad 0) -> second (3x3, pad 2): unmergeable, like c5 -> c6."""
    return [conv(first, "x", 2, 2, 3, padding=0, gen=gen), conv(second, first, 2, 2, 3, padding=2, gen=gen)]


def test_counterexample_files_stay_in_their_folder(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(5)
    # '../../escaped' once climbed out of the folder; 'u/' -> 'v' and 'u' -> '_v' both sanitise to 'u___v'
    pairs = [("../../escaped", "b"), ("u/", "v"), ("u", "_v"), ("..", ".")]
    parts = [p for first, second in pairs for p in _unmergeable(first, second, gen)]
    tensors = {k: v for _, t in parts for k, v in t.items()}
    model = save(tmp_path / "m.safetensors", tensors, describe([p[0] for p in parts], [s for _, s in pairs]))
    folder = tmp_path / "a" / "b" / "ce"
    before = listing(tmp_path)
    result = cli("check", model, "--json", "--counterexamples", folder, *FAST)
    assert result.exit_code == 0, result.stderr
    assert [p["verdict"] for p in json_out(result)["pairs"]] == ["unmergeable"] * len(pairs)
    new = sorted(set(listing(tmp_path)) - set(before))
    assert new == ["a", "a/b", "a/b/ce"] + sorted(f"a/b/ce/{p.name}" for p in folder.iterdir())
    files = sorted(folder.iterdir())
    assert len(files) == len(pairs), [f.name for f in files]
    assert len({f.name.lower() for f in files}) == len(files)
    assert all(not f.name.startswith(".") and f.name.endswith(".safetensors") for f in files)
    named = set()
    for f in files:
        _, meta = read(f)
        named.add((meta["first"], meta["second"]))
    assert named == set(pairs)


# --- usage errors, output paths (issue 9.7) ---------------------------------------------------


@pytest.mark.parametrize("args, words", [
    (["check"], "model"), (["check", "x.safetensors", "--bogus"], "--bogus"), (["frobnicate"], "frobnicate"),
    (["check", "x.safetensors", "--policy", "fast"], "fast"), (["check", "x.safetensors", "--input-size"], "--input-size"),
    (["check", "x.safetensors", "--fail-on", "everything"], "everything"), (["explain", "x.safetensors"], "first"),
    (["annotate", "x.safetensors"], "--arch")])
def test_usage_errors_are_one_line(args: list[str], words: str) -> None:
    line = assert_one_line_error(cli(*args))
    assert words.lower() in line.lower()
    assert "help" in line


def test_help_still_works_after_the_one_line_errors() -> None:
    for args in (["--help"], ["check", "--help"], ["-h"]):
        result = cli(*args)
        assert result.exit_code == 0 and "Usage" in result.stdout, args
    bare = cli()
    assert bare.exit_code in (0, 2) and "Usage" in bare.stdout + bare.stderr and "check" in bare.stdout + bare.stderr


@pytest.mark.parametrize("option", ["-o", "--report"])
def test_output_naming_a_missing_folder_is_refused(stack: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     option: str) -> None:
    monkeypatch.chdir(tmp_path)
    before = listing(tmp_path)
    args = ["-o", "nodir/"] if option == "-o" else ["-o", "out.safetensors", "--report", "nodir/"]
    line = assert_one_line_error(fuse_keeping_input(stack, *args))
    assert "nodir" in line
    assert listing(tmp_path) == before


def test_a_safetensors_model_is_not_written_under_an_onnx_name(stack: Path, tmp_path: Path) -> None:
    result = cli("fuse", stack, "-o", tmp_path / "out.onnx", *FAST)
    assert result.exit_code == 2 and "name the output *.safetensors" in result.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_output_into_an_existing_folder_is_refused(stack: Path, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    before = listing(tmp_path)
    assert_one_line_error(fuse_keeping_input(stack, "-o", f"{tmp_path / 'd'}/"))
    assert listing(tmp_path) == before


def test_existing_output_error_names_the_flag(stack: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep")
    line = assert_one_line_error(fuse_keeping_input(stack, "-o", out))
    assert "--force" in line and "force=True" not in line


# --- help and README say what the code does (issue 10.3) ---------------------------------------


def test_policy_help_names_the_cost_model() -> None:
    out = " ".join(cli("check", "--help").stdout.split())
    assert "MACs do not grow" not in out
    assert "cost" in out and "memory" in out


@pytest.mark.parametrize("command, words", [("fuse", "[default: <stem>.fused.safetensors"),
                                             ("explain", "[default: the size there of a model")])
def test_help_keeps_bracketed_defaults(command: str, words: str) -> None:
    """Rich reads `[default: ...]` as a markup tag and drops it unless escaped."""
    assert words in " ".join(re.sub("[│╭╮╰╯─]", " ", cli(command, "--help").stdout).split())


def test_verbose_prints_timings(stack: Path) -> None:
    result = cli("check", stack, "-v", *FAST)
    assert result.exit_code == 0
    assert re.search(r"timings?:.*\d+(\.\d+)? ?s", result.stdout + result.stderr)
    assert "timing" not in cli("check", stack, *FAST).stdout


def test_verbose_fuse_names_its_phases(stack: Path, tmp_path: Path) -> None:
    """The checks left for the copy are their own phase: `plan` ends where they begin, `write` after them."""
    result = cli("fuse", stack, "-o", tmp_path / "o.safetensors", "-v", "--policy", "all")
    assert result.exit_code == 0, result.stderr
    line = " ".join((result.stdout + result.stderr).split())
    assert re.search(r"timings: import [\d.]+ s, plan [\d.]+ s, verify [\d.]+ s, write [\d.]+ s", line), line


@pytest.fixture
def example_dir(tmp_path: Path) -> Path:
    """examples/ as `python examples/make_example.py` leaves it: model.py and example.safetensors."""
    import convmerge

    root = Path(__file__).resolve().parents[1] / "examples"
    folder = tmp_path / "examples"
    folder.mkdir()
    shutil.copy(root / "model.py", folder / "model.py")
    ns: dict[str, Any] = {}
    exec(compile((root / "model.py").read_text(), "model.py", "exec"), ns)
    torch.manual_seed(0)
    convmerge.save(ns["build"]().eval(), folder / "example.safetensors")
    return folder


@pytest.mark.parametrize("command", ["check", "fuse", "annotate", "inspect", "explain"])
def test_help_examples_run_on_the_shipped_example(example_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                   command: str) -> None:
    import shlex

    monkeypatch.chdir(example_dir.parent)
    text = " ".join(cli(command, "--help").stdout.split())
    examples = re.findall(r"Example: (convmerge .*?)(?=\s*(?:Example:|╰|│|$))", text)
    assert examples, text
    for example in examples:
        args = shlex.split(example)[1:]
        assert "examples/example.safetensors" in args or "example.safetensors" in args, example
        result = cli(*args)
        assert result.exit_code in (0, 1), (example, result.stderr)
        assert_no_traceback(result)


def test_arch_module_is_found_in_the_working_directory(arch_model: tuple[Path, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import uuid

    bare, code = arch_model
    name = f"arch_{uuid.uuid4().hex[:8]}"
    code.rename(tmp_path / f"{name}.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        result = cli("annotate", bare, "--arch", f"{name}:build", "-o", "out.safetensors")
        assert result.exit_code == 0, result.stderr
        assert str(tmp_path) not in sys.path, "the working directory stays off sys.path afterwards"
    finally:
        sys.modules.pop(name, None)


def _natural_model(tmp_path: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    parts = [conv("0", "x", 3, 4, 3, gen=gen)] + [conv(str(i), str(j), 4, 4, 1, gen=gen)
                                                 for j, i in zip([0, 1, 3, 11, 12, 2], [1, 3, 11, 12, 2, 20])]
    tensors = {k: v for _, t in parts for k, v in t.items()}
    return save(tmp_path / "n.safetensors", tensors, describe([p[0] for p in parts], ["20"]))


def test_inspect_sorts_tensors_naturally_and_takes_arch(arch_model: tuple[Path, Path], tmp_path: Path) -> None:
    data = json_out(cli("inspect", _natural_model(tmp_path), "--json"))
    assert [c["name"] for c in data["conv_tensors"]] == [f"{n}.weight" for n in (0, 1, 2, 3, 11, 12, 20)]
    bare, code = arch_model
    plain = json_out(cli("inspect", bare, "--json"))
    assert plain["description"] is None and "--arch" in plain["missing"]
    traced = json_out(cli("inspect", bare, "--arch", f"{code}:build", "--json"))
    assert traced["description"] == f"--arch {code}:build" and len(traced["pairs"]) == 2


def test_inspect_data_comes_from_the_library(stack: Path) -> None:
    from convmerge.model import inspect_file

    assert inspect_file(str(stack)) == json_out(cli("inspect", stack, "--json"))


# --- --json keeps stderr short (issue 10.5) ---------------------------------------------------


@pytest.mark.parametrize("command", ["check", "fuse"])
def test_json_stderr_holds_at_most_one_summary_line(stack: Path, tmp_path: Path, command: str) -> None:
    extra = ["-o", tmp_path / "o.safetensors", "--force"] if command == "fuse" else []
    result = cli(command, stack, "--json", *extra, *FAST)
    assert result.exit_code == 0
    assert json_out(result)["summary"]["pairs"] == 3
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "3 pair(s)" in lines[0], result.stderr
    gated = cli(command, stack, "--json", "--fail-on", "unmergeable", *extra, *FAST)
    assert gated.exit_code == 1
    lines = gated.stderr.splitlines()
    assert len(lines) == 2 and "fail-on unmergeable" in lines[1] and "c5 -> c6" in lines[1], gated.stderr
    assert cli(command, stack, "--json", "-q", *extra, *FAST).stderr == ""


def _torch_checkpoint(tmp_path: Path, kind: str) -> Path:
    """What a PyTorch user passes first: torch.save's zip, its legacy pickle, a plain pickle, a plain zip."""
    import pickle
    import zipfile

    path = tmp_path / "model.pt"
    state = stack_parts()[1]
    if kind == "zip":
        torch.save(state, path)
    elif kind == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}, protocol=4))
    else:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("readme.txt", "not a model")
    return path


@pytest.mark.parametrize("command", [["check"], ["fuse"], ["inspect"], ["explain", "c1", "c2"]])
@pytest.mark.parametrize("kind, words", [("zip", "a PyTorch checkpoint (torch.save)"),
                                         ("legacy", "torch.save's legacy (pickle) format"),
                                         ("pickle", "a Python pickle"), ("plain zip", "a zip archive")])
def test_torch_checkpoint_says_what_it_is_and_what_to_do(tmp_path: Path, command: list[str], kind: str,
                                                         words: str) -> None:
    model = _torch_checkpoint(tmp_path, kind)
    before = listing(tmp_path)
    line = assert_one_line_error(cli(command[0], model, *command[1:]))
    assert "model.pt: not a safetensors file but " in line and words in line, line
    assert "header length" not in line, line
    assert "convmerge.save(net, " in line and "--arch MODULE:CALLABLE" in line, line
    assert listing(tmp_path) == before


def test_arch_and_leaf_without_effect_are_notes(arch_model: tuple[Path, Path], tmp_path: Path) -> None:
    """A described file's header comes before --arch: the trace is not made, and every view says so."""
    bare, code = arch_model
    described = tmp_path / "described.safetensors"
    assert cli("annotate", bare, "--arch", f"{code}:build", "-o", described, "-q").exit_code == 0
    arch = f"{code}:build"
    rep = json_out(cli("check", described, "--arch", arch, "--leaf", "ReLU", "--json"))
    assert any(n.startswith(f"--arch {arch} was not traced") and "header" in n for n in rep["notes"]), rep["notes"]
    assert any(n.startswith("--leaf ReLU had no effect") for n in rep["notes"]), rep["notes"]
    for args in (["check", described, "--arch", arch], ["fuse", described, "--arch", arch, "-o", tmp_path / "f.safetensors"],
                 ["inspect", described, "--arch", arch], ["explain", described, "0", "1", "--arch", arch]):
        result = cli(*args)
        assert result.exit_code == 0, (args, result.stderr)
        assert f"note: --arch {arch} was not traced" in " ".join(result.stdout.split()), (args, result.stdout)
    # with --graph, the sidecar comes first
    sidecar = tmp_path / "graph.json"
    sidecar.write_text(json.dumps(description_of(described)))
    rep = json_out(cli("check", described, "--graph", sidecar, "--leaf", "ReLU", "--json"))
    assert any(n.startswith("--leaf ReLU had no effect") for n in rep["notes"]), rep["notes"]
    # and where the trace is made, no such note
    rep = json_out(cli("check", bare, "--arch", arch, "--leaf", "ReLU", "--json"))
    assert not any("--arch" in n or "--leaf" in n for n in rep["notes"]), rep["notes"]


@pytest.mark.parametrize("command", [["check"], ["fuse"], ["explain", "0", "1"]])
def test_leaf_naming_no_module_is_an_error(arch_model: tuple[Path, Path], tmp_path: Path, command: list[str]) -> None:
    bare, code = arch_model
    before = listing(tmp_path)
    line = assert_one_line_error(cli(command[0], bare, *command[1:], "--arch", f"{code}:build", "--leaf", "ReLU",
                                     "--leaf", "NoSuchClass"))
    assert "--leaf NoSuchClass: no module of that class" in line and "ReLU" not in line.split("--leaf")[1], line
    assert listing(tmp_path) == before


def test_input_shape_without_export_is_an_error(stack: Path) -> None:
    before = listing(stack.parent)
    line = assert_one_line_error(cli("fuse", stack, "--input-shape", "1,3,10,10"))
    assert "--input-shape" in line and "--export" in line and "--input-size" in line, line
    assert listing(stack.parent) == before


# --- help and wording (issue 19, item 14) -----------------------------------------------------


def _help(*command: str) -> str:
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("command", [[], ["check"], ["fuse"], ["annotate"], ["inspect"], ["explain"]])
def test_flags_show_no_value_type(command: list[str]) -> None:
    text = _help(*command)
    assert "--help" in text
    assert "<bool>" not in text, text


def test_commands_panel_has_one_line_per_command() -> None:
    """The commands panel shows each command's first paragraph; a line break inside it would show mid-sentence."""
    text = _help()
    panel = text[text.index("Commands"):]
    rows = [line.strip("│ ").rstrip() for line in panel.splitlines()[1:] if line.startswith("│")]
    commands = ["check", "fuse", "annotate", "inspect", "explain"]
    assert [row.split()[0] for row in rows] == commands, rows
    for row in rows:
        assert row.rstrip().endswith("."), row


@pytest.mark.parametrize("command", ["inspect", "explain"])
def test_json_help_promises_only_what_comes(command: str, stack: Path) -> None:
    assert "summary line" not in " ".join(_help(command).split())
    assert "summary line" in " ".join(_help("check").split())
    args = ["c1", "c2"] if command == "explain" else []
    result = cli(command, stack, *args, "--json")
    assert result.exit_code == 0 and result.stderr == "", result.stderr


def test_inspect_counts_in_words(tmp_path: Path) -> None:
    result = cli("inspect", bn_model(tmp_path / "bn.safetensors"))
    assert result.exit_code == 0, result.stderr
    assert "(3 layers, 1 conv pair)" in result.stdout, result.stdout


def test_default_output_replaces_the_extension(tmp_path: Path) -> None:
    from convmerge.model import default_output

    onnx_bytes = tmp_path / "model.bin"  # an ONNX protobuf under another name: ir_version first, then more fields
    onnx_bytes.write_bytes(b"\x08\x08\x12\x07pytorch:\x00")
    assert default_output(str(onnx_bytes)) == str(tmp_path / "model.fused.onnx")
    assert default_output(str(tmp_path / "model.onnx")) == str(tmp_path / "model.fused.onnx")
    assert default_output(str(tmp_path / "m.safetensors")) == str(tmp_path / "m.fused.safetensors")
    assert default_output(str(tmp_path / "m")) == str(tmp_path / "m.fused.safetensors")


def test_interrupted_exits_130_as_documented(stack: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from convmerge import model

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "check_file", interrupted)
    result = cli("check", stack)
    assert result.exit_code == 130 and result.stdout == ""
    assert result.stderr == "convmerge: interrupted; nothing was written\n", result.stderr
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("### Exit codes"):]
    codes = re.findall(r"^\| (\d+) \|", table[:table.index("\n\n", table.index("| code"))], re.M)
    assert codes == ["0", "1", "2", "3", "130"], codes
    assert "130 interrupted" in " ".join(_help().split())


def test_arch_returning_no_module_says_so_in_english(tmp_path: Path) -> None:
    code = tmp_path / "numbers.py"
    code.write_text("def three():\n    return 3\n\ndef many():\n    return [1]\n")
    _, tensors = stack_parts()
    bare = save(tmp_path / "bare.safetensors", tensors)
    assert "returned an int, not a torch.nn.Module" in assert_one_line_error(cli("check", bare, "--arch",
                                                                                f"{code}:three"))
    assert "returned a list, not a torch.nn.Module" in assert_one_line_error(cli("check", bare, "--arch",
                                                                                f"{code}:many"))


def test_bad_choice_has_no_value_error_prefix() -> None:
    line = assert_one_line_error(cli("check", "x.safetensors", "--policy", "some"))
    assert "Value error" not in line and "'some' is not one of 'cheaper', 'all'" in line, line


def test_verbose_timings_name_each_phase_once(stack: Path, tmp_path: Path) -> None:
    result = cli("check", stack, "-v", "--counterexamples", tmp_path / "ce", *FAST)
    assert result.exit_code == 0, result.stderr
    line = " ".join(result.stdout[result.stdout.index("timings: "):].split())  # the last line, however wrapped
    names = [re.sub(r" [\d.]+ s$", "", part) for part in line[len("timings: "):].split(", ")]
    assert "counterexamples" in names and len(names) == len(set(names)), line


# --- the console script's own process (benchmarks/README.md, goal 4) ----------------------------


def _freeze_count_after(args: list[str]) -> tuple[int, subprocess.CompletedProcess]:
    """The collector's frozen-object count at exit of a process that runs `cli.main` (the console script)."""
    code = textwrap.dedent(f"""
        import atexit, gc, os, sys
        atexit.register(lambda: os.write(2, f"frozen={{gc.get_freeze_count()}}\\n".encode()))
        from convmerge import cli
        sys.argv = ["convmerge", *{[str(a) for a in args]!r}]
        cli.main()
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parent.parent)
    found = re.findall(r"frozen=(\d+)", proc.stderr)
    assert found, proc.stderr
    return int(found[-1]), proc


def test_the_script_stops_collecting_what_lives_until_exit(stack: Path, tmp_path: Path) -> None:
    # its imports' objects (torch's: ~190,000) are frozen, so no full collection walks them again
    for args in (["check", stack, *FAST, "--quiet"], ["fuse", stack, "-o", tmp_path / "f.safetensors", *FAST, "-q"]):
        frozen, proc = _freeze_count_after(args)
        assert proc.returncode == 0, proc.stderr
        assert frozen > 10_000, (args, frozen)


def test_in_process_callers_keep_their_collector(stack: Path) -> None:
    before = gc.get_freeze_count()
    assert cli("check", stack, *FAST).exit_code == 0
    assert gc.get_freeze_count() == before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_the_script_reuses_small_blocks_and_gives_back_large_ones() -> None:
    # a freed 2 MiB temporary is reused without faulting its pages in again (mapping every block of 1 MiB and
    # more faulted ~512 pages each time); a freed 16 MiB block still goes back to the system
    code = textwrap.dedent("""
        import ctypes, resource
        from convmerge import cli
        cli._return_large_frees()
        libc = ctypes.CDLL(None)
        libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
        faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        resident = lambda: int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()

        def touched(n):
            p = libc.malloc(n)
            ctypes.memset(p, 1, n)
            return p

        libc.free(touched(2 << 20))
        start = faults()
        libc.free(touched(2 << 20))
        small = faults() - start
        large = touched(16 << 20)
        held = resident()
        libc.free(large)
        print(small, held - resident())
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr
    small, returned = map(int, proc.stdout.split())
    assert small < 64, small  # a page or two of bookkeeping at most, not the block's 512 pages
    assert returned >= 15 << 20, returned
