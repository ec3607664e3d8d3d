"""convmerge/options.py: the one validator of a check's or a fuse's options, and the edges that build them
(the Python API with Options.of, the command line from its flags) refusing bad values before reading anything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

import convmerge
from convmerge import io as cmio
from convmerge.cli import app
from convmerge.engine import plan
from convmerge.errors import Kind, kind_of
from convmerge.frontends import trace
from convmerge.options import POLICIES, Options, OptionsError

from .models import stack_model

WHERE = "convmerge.check"

BAD = [  # (field, value given to Options.of, error type, words the message holds)
    ("policy", "fast", ValueError, "policy must be one of 'cheaper', 'all', not 'fast'"),
    ("policy", None, ValueError, "policy must be one of"),
    ("input_size", 65, TypeError, "input_size must be a sequence of ints like (224, 224), not int 65"),
    ("input_size", "65x65", TypeError, "input_size must be a sequence of ints"),
    ("input_size", b"AA", TypeError, "input_size must be a sequence of ints"),
    ("input_size", (65.5, 65), TypeError, "input_size must hold ints, not float 65.5"),
    ("input_size", (True, 5), TypeError, "input_size must hold ints, not bool True"),
    ("input_size", (), ValueError, "input_size must hold 1 to 3 sizes (one per spatial axis), not 0"),
    ("input_size", (1, 2, 3, 4), ValueError, "input_size must hold 1 to 3 sizes (one per spatial axis), not 4"),
    ("input_size", (0, 5), ValueError, "input_size must be positive, not (0, 5)"),
    ("input_size", [-5, 5], ValueError, "input_size must be positive, not (-5, 5)"),
    ("leaves", "Hardswish", TypeError, "leaves must be a sequence of classes or class names, not str"),
    ("leaves", [3], TypeError, "leaves must hold classes or class names, not int 3"),
]


@pytest.mark.parametrize("field, value, error, words", BAD)
def test_options_of_refuses_each_bad_value_naming_the_field(field: str, value: Any, error: type, words: str) -> None:
    with pytest.raises(error) as info:
        Options.of(WHERE, **{field: value})
    assert str(info.value).startswith(f"{WHERE}: {words}")
    assert "\n" not in str(info.value)
    assert isinstance(info.value, OptionsError) and kind_of(info.value) is Kind.BAD_INPUT


@pytest.mark.parametrize("field, value, error, words", BAD)
def test_options_refuses_the_same_values_given_directly(field: str, value: Any, error: type, words: str) -> None:
    """Options(...) itself validates (the same words, without a caller's prefix): a value given as a list, or
    a string, is refused too, since an Options holds tuples."""
    if field == "input_size" and isinstance(value, list):
        value = tuple(value)  # Options takes a tuple; Options.of converts a list (refused below)
    with pytest.raises(OptionsError) as info:
        Options(**{field: value})
    assert field in str(info.value) and "\n" not in str(info.value)
    assert not str(info.value).startswith(WHERE)
    assert isinstance(info.value, error)


@pytest.mark.parametrize("field, value", [("input_size", [9, 9]), ("input_size", torch.Size([9, 9])),
                                          ("input_size", (np.int64(9), 9)), ("leaves", [torch.nn.ReLU])])
def test_options_of_converts_what_a_caller_gives_to_tuples_of_ints(field: str, value: Any) -> None:
    """Only Options.of converts: an Options is frozen, hashable, and holds tuples of Python ints."""
    if not isinstance(value, torch.Size):  # a tuple already
        with pytest.raises(TypeError, match=field):
            Options(**{field: value})
    options = Options.of(WHERE, **{field: value})
    converted = getattr(options, field)
    assert type(converted) is tuple and converted == tuple(value)
    assert all(type(n) is int for n in converted) if field == "input_size" else True
    assert hash(options) == hash(Options.of(WHERE, **{field: tuple(value)}))


@given(st.lists(st.integers(-3, 400), max_size=5), st.sampled_from(POLICIES))
def test_an_input_size_is_accepted_exactly_when_it_is_1_to_3_positive_ints(size: list[int], policy: str) -> None:
    valid = 1 <= len(size) <= 3 and all(n >= 1 for n in size)
    for make in (lambda: Options(policy, tuple(size)), lambda: Options.of(WHERE, policy=policy, input_size=size)):
        try:
            options = make()
        except OptionsError as e:
            assert not valid and "input_size" in str(e)
        else:
            assert valid and options.input_size == tuple(size) and options.policy == policy


@given(st.lists(st.one_of(st.integers(1, 9), st.floats(allow_nan=False), st.booleans(), st.text(max_size=2)),
                min_size=1, max_size=3))
def test_an_input_size_of_anything_but_ints_is_a_type_error(size: list[Any]) -> None:
    ints = all(type(n) is int for n in size)
    try:
        Options.of(WHERE, input_size=size)
    except TypeError as e:
        assert not ints and str(e).startswith(f"{WHERE}: input_size must hold ints")
    else:
        assert ints


def test_plan_policies_is_the_options_one() -> None:
    assert plan.POLICIES is POLICIES


@pytest.fixture
def nothing_read(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fails any read of a model file or trace of a module: options are refused before either."""
    calls: list[str] = []

    def refuse(name: str) -> Any:
        def called(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            raise AssertionError(f"{name} ran before the options were refused")
        return called

    monkeypatch.setattr(cmio, "read_header", refuse("read_header"))
    monkeypatch.setattr(trace, "describe_module", refuse("describe_module"))
    return calls


@pytest.mark.parametrize("options", [{"policy": "fast"}, {"input_size": (0, 9)}, {"leaves": "ReLU"}])
def test_the_api_refuses_bad_options_before_reading_the_file_or_tracing_the_module(
        tmp_path: Path, nothing_read: list[str], options: dict[str, Any]) -> None:
    path = stack_model(tmp_path / "m.safetensors")
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3), torch.nn.Conv2d(2, 2, 3))
    for call, subject in ((convmerge.check, path), (convmerge.check, net), (convmerge.fuse, net)):
        with pytest.raises(OptionsError) as info:
            call(subject, **options)
        field = next(iter(options))
        assert str(info.value).startswith(f"convmerge.{call.__name__}: {field} must")
    assert nothing_read == []


def test_save_refuses_a_string_as_leaves_before_tracing(tmp_path: Path, nothing_read: list[str]) -> None:
    """A string is not a sequence of class names (it was split into one-letter names before)."""
    with pytest.raises(TypeError, match="^convmerge.save: leaves must be a sequence"):
        convmerge.save(torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3)), tmp_path / "m.safetensors", leaves="ReLU")
    assert nothing_read == [] and not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("command", ["check", "fuse"])
@pytest.mark.parametrize("flags, words", [(["--policy", "fast"], "--policy"), (["-p", "ALL"], "--policy"),
                                          (["--input-size", "0x9"], "--input-size")])
def test_the_cli_refuses_bad_options_in_one_line_before_reading_the_file(
        tmp_path: Path, nothing_read: list[str], command: str, flags: list[str], words: str) -> None:
    path = stack_model(tmp_path / "m.safetensors")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(app, [command, str(path), *flags])
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("convmerge: error:") and words in lines[0], result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert nothing_read == [] and sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("policy", POLICIES)
def test_the_cli_and_the_api_plan_with_the_same_options(tmp_path: Path, policy: str) -> None:
    """The options each edge builds reach the plan: the CLI's report and the API's agree."""
    import json

    path = stack_model(tmp_path / "m.safetensors")
    result = CliRunner().invoke(app, ["check", str(path), "--policy", policy, "--input-size", "9x9", "--json"])
    assert result.exit_code == 0, result.stderr
    from_cli = json.loads(result.stdout)
    from_api = convmerge.check(path, policy=policy, input_size=[9, 9])
    assert (from_cli["policy"], from_cli["input_size"]) == (from_api["policy"], from_api["input_size"]) == (policy,
                                                                                                           [9, 9])
    assert from_cli["merges"] == from_api["merges"]
