"""Tests for convmerge.io: round trips, agreement with safetensors, a hostile-file corpus, fuzzing and write faults."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from convmerge.io import (
    Header,
    LazyTensor,
    ModelFileError,
    OutputExists,
    TensorInfo,
    _terminating_as_interrupt,
    dtype_name,
    read_header,
    read_tensor,
    torch_dtype,
    write_in_folder,
    write_model,
)

ROOT = Path(__file__).resolve().parents[1]
SAFETENSORS_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "U32", "U64",
                      "F8_E4M3", "F8_E5M2"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a tensor, so NaNs, -0.0 and bf16 compare exactly."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(raw_bytes(a), raw_bytes(b))


def small_model(path: Path, metadata: dict[str, str] | None = None) -> Path:
    save_file(
        {
            "conv1.weight": torch.arange(24, dtype=torch.float32).reshape(2, 3, 2, 2),
            "conv1.bias": torch.tensor([0.5, -0.0], dtype=torch.float16),
            "mask": torch.tensor([True, False, True]),
            "empty": torch.zeros(0, 4),
        },
        str(path),
        metadata=metadata,
    )
    return path


def craft(path: Path, header: Any, data: bytes = b"", *, length: int | None = None) -> Path:
    """Write a file with an arbitrary header (object, text or bytes) and data region."""
    if isinstance(header, bytes):
        raw = header
    elif isinstance(header, str):
        raw = header.encode("utf-8", "surrogatepass")
    else:
        raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def entry(dtype: Any = "F32", shape: Any = (2,), offsets: Any = (0, 8)) -> dict[str, Any]:
    """One header entry; any field may be given malformed on purpose."""
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}


def write_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def check_message(error: ModelFileError, path: Path) -> str:
    message = str(error)
    assert "\n" not in message and "\r" not in message
    assert path.name in message
    return message


def assert_rejected(path: Path, *fragments: str) -> str:
    """read_header must raise ModelFileError (nothing else), with a one-line message, leaving the file alone."""
    before = sha256(path) if path.is_file() else None
    with pytest.raises(ModelFileError) as info:
        read_header(path)
    message = check_message(info.value, path)
    for fragment in fragments:
        assert fragment in message
    if before is not None:
        assert sha256(path) == before
    return message


def read_all_or_reject(path: Path) -> bool:
    """Either the file is rejected cleanly, or its header is valid and every tensor reads or is rejected cleanly."""
    before = sha256(path)
    try:
        header = read_header(path)
    except ModelFileError as e:
        check_message(e, path)
        return False
    for name, info in header.tensors.items():
        try:
            tensor = read_tensor(header, name)
        except ModelFileError as e:
            check_message(e, path)
            continue
        assert tensor.shape == info.shape and tensor.dtype == torch_dtype(info.dtype)
    assert sha256(path) == before
    return True


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


# --- dtypes and round trips ---------------------------------------------------------------------------------------


def test_dtype_tables_are_inverse() -> None:
    for name in SAFETENSORS_DTYPES:
        assert dtype_name(torch_dtype(name)) == name
    with pytest.raises(ValueError):
        torch_dtype("F4")
    with pytest.raises(ValueError):
        dtype_name(torch.quint8)


def test_is_float_only_for_mergeable_dtypes() -> None:
    floats = {name for name in SAFETENSORS_DTYPES if TensorInfo("t", name, (1,), 0, 1).is_float}
    assert floats == {"F16", "BF16", "F32", "F64"}
    assert TensorInfo("t", "F32", (2, 3), 8, 32).nbytes == 24


def awkward_floats(dtype: torch.dtype) -> torch.Tensor:
    values = [0.0, -0.0, 1.0, -2.5, math.inf, -math.inf, math.nan, 1e-40, 3.0e38, 65504.0]
    return torch.tensor(values, dtype=torch.float64).to(dtype).reshape(2, 5)


def test_round_trip_mixed_sources(tmp_path: Path) -> None:
    source_tensors = {
        "copy.f64": awkward_floats(torch.float64),
        "copy.bf16": awkward_floats(torch.bfloat16),
        "copy.bool": torch.tensor([[True, False], [False, True]]),
        "copy.empty": torch.zeros(3, 0, dtype=torch.int64),
        "copy.f8": torch.tensor([1.0, -2.0, 448.0]).to(torch.float8_e4m3fn),
    }
    src_path = tmp_path / "src.safetensors"
    save_file(source_tensors, str(src_path))
    src = read_header(src_path)
    made = {
        "new.f32": awkward_floats(torch.float32),
        "new.f16": awkward_floats(torch.float16),
        "new.bf16.transposed": awkward_floats(torch.bfloat16).T,
        "new.i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "new.i64": torch.tensor([-(2**63), 2**63 - 1]),
        "new.bool": torch.tensor([False, True, True]),
        "new.scalar": torch.tensor(7.25),
        "new.empty": torch.zeros(0, 5, dtype=torch.float16),
    }
    order = ["new.f32", "copy.f64", "new.f16", "new.bf16.transposed", "copy.bf16", "new.i8", "copy.bool",
             "new.i64", "copy.empty", "new.bool", "new.scalar", "copy.f8", "new.empty", "renamed"]
    sources: dict[str, torch.Tensor | TensorInfo] = {**src.tensors, **made, "renamed": src.tensors["copy.f64"]}
    items = [(name, sources[name]) for name in order]
    metadata = {"format": "pt", "note": "dérivé ☃", "empty": ""}
    out = tmp_path / "out.safetensors"
    src_sha = sha256(src_path)

    old = os.umask(0o022)
    try:
        write_model(out, items, metadata, src=src)
    finally:
        os.umask(old)

    assert sha256(src_path) == src_sha
    assert out.stat().st_mode & 0o777 == 0o644
    loaded = load_file(str(out))
    expected = {**source_tensors, **made, "renamed": source_tensors["copy.f64"]}
    assert set(loaded) == set(order)
    for name in order:
        assert_same_bits(loaded[name], expected[name])
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == metadata
    header = read_header(out)
    assert list(header.tensors) == order
    assert header.metadata == metadata
    assert header.data_offset % 8 == 0
    assert leftovers(tmp_path) == []


def test_write_without_metadata_and_without_tensors(tmp_path: Path) -> None:
    out = tmp_path / "empty.safetensors"
    write_model(out, [], {})
    assert load_file(str(out)) == {}
    assert read_header(out).metadata == {}
    assert b"__metadata__" not in out.read_bytes()


def test_read_agrees_with_safetensors(tmp_path: Path) -> None:
    path = small_model(tmp_path / "model.safetensors", metadata={"format": "pt", "author": "me"})
    before = sha256(path)
    header = read_header(path)
    expected = load_file(str(path))
    assert header.metadata == {"format": "pt", "author": "me"}
    assert set(header.tensors) == set(expected)
    for name, tensor in expected.items():
        info = header.tensors[name]
        assert info.name == name and info.shape == tuple(tensor.shape) and torch_dtype(info.dtype) == tensor.dtype
        assert_same_bits(read_tensor(header, name), tensor)
    assert sha256(path) == before


def test_read_tensor_is_fresh_and_writable(tmp_path: Path) -> None:
    header = read_header(small_model(tmp_path / "model.safetensors"))
    first = read_tensor(header, "conv1.weight")
    first.add_(1)
    assert torch.equal(read_tensor(header, "conv1.weight"), torch.arange(24.0).reshape(2, 3, 2, 2))
    with pytest.raises(KeyError):
        read_tensor(header, "missing")


def test_read_tensor_after_truncation(tmp_path: Path) -> None:
    path = small_model(tmp_path / "model.safetensors")
    header = read_header(path)
    os.truncate(path, header.tensors["conv1.weight"].end - 1)
    message = ""
    for name in header.tensors:
        try:
            read_tensor(header, name)
        except ModelFileError as e:
            message = check_message(e, path)
    assert "file changed or truncated while reading tensor" in message
    path.unlink()
    with pytest.raises(ModelFileError, match="No such file"):
        read_tensor(header, "conv1.weight")


def test_bool_bytes_other_than_0_or_1_are_rejected(tmp_path: Path) -> None:
    path = craft(tmp_path / "b.safetensors", {"m": entry(dtype="BOOL", shape=(2,), offsets=(0, 2))}, b"\x01\x02")
    header = read_header(path)
    with pytest.raises(ModelFileError, match="BOOL"):
        read_tensor(header, "m")


# --- hostile headers ---------------------------------------------------------------------------------------------


HOSTILE: list[tuple[str, Any, bytes, str]] = [
    ("not_json", "{not json", b"", "not valid JSON"),
    ("bad_utf8", b'{"\xff": 1}', b"", "not valid UTF-8"),
    ("bom", "\ufeff{}", b"", "not valid JSON"),
    ("array", [1, 2], b"", "not an object"),
    ("string", '"x"', b"", "not an object"),
    ("deep_array", "[" * 100000, b"", "nested"),
    ("deep_object", '{"a":' * 5000 + "1" + "}" * 5000, b"", "nested"),
    ("deep_in_metadata", '{"__metadata__": {"k": ' + "[" * 65 + "]" * 65 + "}}", b"", "nested"),
    ("nan", '{"t": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 0]}}', b"", "NaN"),
    ("huge_int_literal", '{"t": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 0]}}', b"", "JSON"),
    ("duplicate_tensor", '{"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
                         '"t": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}', b"..", "duplicate key 't'"),
    ("lone_surrogate_name", '{"\\ud800": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', b".", "UTF-8"),
    ("metadata_not_object", {"__metadata__": ["a"]}, b"", "__metadata__ is not an object"),
    ("metadata_value_int", {"__metadata__": {"k": 1}}, b"", "__metadata__ 'k' is not a string"),
    ("metadata_value_null", {"__metadata__": {"k": None}}, b"", "not a string"),
    ("entry_not_object", {"t": [1, 2]}, b"", "tensor 't': entry is not an object"),
    ("missing_dtype", {"t": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "missing 'dtype'"),
    ("missing_shape", {"t": {"dtype": "F32", "data_offsets": [0, 8]}}, b"\0" * 8, "missing 'shape'"),
    ("missing_offsets", {"t": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "missing 'data_offsets'"),
    ("dtype_not_string", {"t": entry(dtype=4)}, b"\0" * 8, "dtype is not a string"),
    ("unknown_dtype", {"t": entry(dtype="F128")}, b"\0" * 8, "unknown dtype 'F128'"),
    ("lowercase_dtype", {"t": entry(dtype="f32")}, b"\0" * 8, "unknown dtype"),
    ("shape_not_list", {"t": entry(shape=2)}, b"\0" * 8, "shape is not a list"),
    ("negative_shape", {"t": entry(shape=(-2,))}, b"\0" * 8, "negative"),
    ("negative_pair", {"t": entry(shape=(-1, -2), offsets=(0, 8))}, b"\0" * 8, "negative"),
    ("float_in_shape", {"t": entry(shape=[2.0])}, b"\0" * 8, "non-integer"),
    ("bool_in_shape", {"t": entry(dtype="U8", shape=[True], offsets=(0, 1))}, b"\0", "non-integer"),
    ("string_in_shape", {"t": entry(shape=["2"])}, b"\0" * 8, "non-integer"),
    ("huge_dims", {"t": entry(shape=(2**62, 2**62))}, b"\0" * 8, "absurdly large"),
    ("huge_single_dim", {"t": entry(dtype="F64", shape=(2**62,), offsets=(0, 2**65))}, b"", "absurdly large"),
    ("too_many_dims", {"t": entry(shape=[1] * 65 + [2])}, b"\0" * 8, "dimensions"),
    ("offsets_not_list", {"t": entry(offsets="0-8")}, b"\0" * 8, "not a list of two integers"),
    ("offsets_three", {"t": entry(offsets=(0, 4, 8))}, b"\0" * 8, "not a list of two integers"),
    ("offsets_float", {"t": entry(offsets=(0, 8.0))}, b"\0" * 8, "not a list of two integers"),
    ("offsets_bool", {"t": entry(dtype="U8", shape=(1,), offsets=(False, True))}, b"\0", "not a list of two integers"),
    ("offsets_negative", {"t": entry(offsets=(-8, 0))}, b"\0" * 8, "0 <= begin <= end"),
    ("offsets_reversed", {"t": entry(offsets=(8, 0))}, b"\0" * 8, "0 <= begin <= end"),
    ("size_mismatch", {"t": entry(shape=(3,))}, b"\0" * 8, "do not match shape [3] of F32 (12 bytes)"),
    ("out_of_range", {"t": entry(offsets=(8, 16))}, b"\0" * 8, "run past the end of the data region (8 bytes)"),
    ("far_out_of_range", {"t": entry(dtype="U8", shape=(2**40,), offsets=(2**50, 2**50 + 2**40))}, b"",
     "run past the end"),
    ("overlap", {"a": entry(), "b": entry(shape=(3,), offsets=(4, 16))}, b"\0" * 16, "tensors 'a' and 'b' overlap"),
    ("identical_ranges", {"a": entry(), "b": entry()}, b"\0" * 8, "overlap"),
    ("empty_inside_other", {"a": entry(), "z": entry(shape=(0,), offsets=(4, 4))}, b"\0" * 8, "overlap"),
    ("hole", {"a": entry(), "b": entry(offsets=(16, 24))}, b"\0" * 24,
     "bytes 8..16 of the data region belong to no tensor"),
    ("leading_hole", {"a": entry(offsets=(8, 16))}, b"\0" * 16, "bytes 0..8 of the data region belong to no tensor"),
    ("trailing_bytes", {"a": entry()}, b"\0" * 12, "bytes 8..12 of the data region belong to no tensor"),
    ("data_without_tensors", {}, b"\0", "bytes 0..1 of the data region belong to no tensor"),
    ("newline_in_name", {"evil\nname": entry(dtype=7)}, b"\0" * 8, "'evil\\nname'"),
]


@pytest.mark.parametrize(("header", "data", "fragment"), [case[1:] for case in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_hostile_header(tmp_path: Path, header: Any, data: bytes, fragment: str) -> None:
    assert_rejected(craft(tmp_path / "hostile.safetensors", header, data), fragment)


def test_example_message_format(tmp_path: Path) -> None:
    path = craft(tmp_path / "model.safetensors",
                 {"conv1.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 40]}}, b"\0" * 40)
    message = assert_rejected(path)
    assert message == (f"{path}: header: tensor 'conv1.weight': offsets [0, 40] do not match shape [2, 3] "
                       "of F32 (24 bytes)")


@pytest.mark.parametrize(
    ("length", "fragment"),
    [(0, "header length is 0"), (2**63, "exceeds"), (2**64 - 1, "exceeds"), (100_000_001, "exceeds"),
     (11, "runs past the end of the file")],
)
def test_hostile_header_length(tmp_path: Path, length: int, fragment: str) -> None:
    assert_rejected(craft(tmp_path / "len.safetensors", b"{}", b"", length=length), fragment)


def test_valid_edge_cases_are_accepted(tmp_path: Path) -> None:
    long_value = "x" * 5_000_000
    header_obj = {"__metadata__": {"blob": long_value}, "e": entry(shape=(0, 3), offsets=(0, 0)),
                  "t": entry(dtype="U8", shape=(), offsets=(0, 1))}
    path = craft(tmp_path / "long.safetensors", header_obj, b"\x07")
    header = read_header(path)
    assert header.metadata["blob"] == long_value
    assert read_tensor(header, "t").item() == 7
    assert read_tensor(header, "e").shape == (0, 3)
    shared = craft(tmp_path / "shared.safetensors",
                   {"a": entry(), "z1": entry(shape=(0,), offsets=(8, 8)), "z0": entry(shape=(0,), offsets=(0, 0))},
                   b"\0" * 8)
    assert list(read_header(shared).tensors) == ["a", "z1", "z0"]
    assert read_header(craft(tmp_path / "nothing.safetensors", b"{}      ")).tensors == {}


def test_short_missing_and_special_files(tmp_path: Path) -> None:
    for size in range(8):
        assert_rejected(write_file(tmp_path / "short.safetensors", b"\x01" * size), "too short")
    assert_rejected(tmp_path / "missing.safetensors", "No such file or directory")
    (tmp_path / "dir.safetensors").mkdir()
    assert_rejected(tmp_path / "dir.safetensors", "Is a directory")
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    assert_rejected(fifo, "not a regular file")
    if os.geteuid() != 0:
        locked = small_model(tmp_path / "locked.safetensors")
        locked.chmod(0)
        assert_rejected(locked, "Permission denied")


def test_every_truncation_is_rejected(tmp_path: Path) -> None:
    full = small_model(tmp_path / "model.safetensors", metadata={"k": "v"}).read_bytes()
    cut = tmp_path / "cut.safetensors"
    for size in range(len(full)):
        assert_rejected(write_file(cut, full[:size]))
    assert read_all_or_reject(write_file(cut, full))


def test_every_header_byte_flip(tmp_path: Path) -> None:
    full = small_model(tmp_path / "model.safetensors", metadata={"k": "v"}).read_bytes()
    header_end = 8 + struct.unpack("<Q", full[:8])[0]
    path = tmp_path / "flipped.safetensors"
    accepted = 0
    for position in range(header_end):
        for mask in (0x01, 0x20, 0x80, 0xFF):
            mutated = bytearray(full)
            mutated[position] ^= mask
            accepted += read_all_or_reject(write_file(path, bytes(mutated)))
    assert accepted < header_end * 4


# --- fuzzing -----------------------------------------------------------------------------------------------------

EDITS = st.lists(
    st.tuples(st.sampled_from(["flip", "insert", "delete", "overwrite", "truncate"]),
              st.integers(min_value=0, max_value=2**16), st.binary(min_size=1, max_size=8)),
    min_size=1, max_size=4,
)


def apply_edits(data: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
    buf = bytearray(data)
    for kind, position, payload in edits:
        at = position % (len(buf) + 1)
        if kind == "flip" and at < len(buf):
            buf[at] ^= payload[0] or 1
        elif kind == "insert":
            buf[at:at] = payload
        elif kind == "delete":
            del buf[at : at + len(payload)]
        elif kind == "overwrite":
            buf[at : at + len(payload)] = payload
        elif kind == "truncate":
            del buf[at:]
    return bytes(buf)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=EDITS)
def test_fuzz_byte_mutations(tmp_path: Path, edits: list[tuple[str, int, bytes]]) -> None:
    model = tmp_path / "model.safetensors"
    if not model.exists():
        small_model(model)
    read_all_or_reject(write_file(tmp_path / "fuzz.safetensors", apply_edits(model.read_bytes(), edits)))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tensor=st.sampled_from(["conv1.weight", "conv1.bias", "mask", "empty", "__metadata__"]),
       field=st.sampled_from(["dtype", "shape", "data_offsets", None]), value=JSON_VALUES)
def test_fuzz_header_fields(tmp_path: Path, tensor: str, field: str | None, value: Any) -> None:
    """Replace one field (or a whole entry) of a valid header with arbitrary JSON."""
    model = tmp_path / "model.safetensors"
    if not model.exists():
        small_model(model, metadata={"k": "v"})
    data = model.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    if field is None or tensor == "__metadata__":
        header[tensor] = value
    else:
        header[tensor][field] = value
    read_all_or_reject(craft(tmp_path / "fuzz.safetensors", json.dumps(header), data[8 + length :]))


# --- write_model: refusals and faults ----------------------------------------------------------------------------


def test_refuses_existing_output_without_force(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(OutputExists, match="exists; pass force=True to overwrite") as info:
        write_model(out, [("t", torch.ones(2))], {})
    check_message(info.value, out)
    assert "--force" not in str(info.value) and info.value.shown == str(out)
    assert out.read_bytes() == b"precious"
    write_model(out, [("t", torch.ones(2))], {}, force=True)
    assert torch.equal(load_file(str(out))["t"], torch.ones(2))
    assert leftovers(tmp_path) == []


def test_refuses_to_write_over_the_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = small_model(tmp_path / "model.safetensors")
    before = sha256(path)
    src = read_header(path)
    items = [(name, info) for name, info in src.tensors.items()]
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.safetensors").symlink_to(path)
    os.link(path, tmp_path / "hard.safetensors")
    monkeypatch.chdir(tmp_path / "sub")
    for out in [path, "../model.safetensors", tmp_path / "sub" / ".." / "model.safetensors",
                tmp_path / "link.safetensors", "../hard.safetensors"]:
        with pytest.raises(ModelFileError, match="is the input file"):
            write_model(out, items, {}, src=src, force=True)
    relative_src = read_header("../model.safetensors")
    with pytest.raises(ModelFileError, match="is the input file"):
        write_model(path, items, {}, src=relative_src, force=True)
    assert sha256(path) == before
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "sub") == []


def test_bad_targets_and_arguments(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="cannot write .*No such file or directory"):
        write_model(tmp_path / "no" / "such" / "dir.safetensors", [("t", torch.ones(1))], {})
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(ModelFileError, match="is a directory"):
        write_model(tmp_path / "d.safetensors", [], {}, force=True)
    src = read_header(small_model(tmp_path / "model.safetensors"))
    out = tmp_path / "out.safetensors"
    with pytest.raises(ValueError, match="no src header"):
        write_model(out, [("t", src.tensors["mask"])], {})
    with pytest.raises(ValueError, match="duplicate"):
        write_model(out, [("t", torch.ones(1)), ("t", torch.ones(1))], {})
    with pytest.raises(ValueError):
        write_model(out, [("__metadata__", torch.ones(1))], {})
    with pytest.raises(ValueError):
        write_model(out, [("t", torch.ones(1, dtype=torch.complex128))], {})
    with pytest.raises(ValueError):
        write_model(out, [], {"k": 1})  # type: ignore[dict-item]
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_path_ending_in_a_separator_names_a_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for out in ("nodir/", f"{tmp_path}/"):
        with pytest.raises(ModelFileError, match="folder|directory"):
            write_model(out, [("t", torch.ones(1))], {}, force=True)
    assert sorted(os.listdir(tmp_path)) == []


HOSTILE_STEMS = ["../../escaped", "a/b", "a_b", "A_B", ".hidden", "..", ".", "back\\slash", "nul\x00byte",
                 "new\nline", "x" * 300, "ünïcode", "CON", "a b", ""]


def test_write_in_folder_confines_and_separates_hostile_names(tmp_path: Path) -> None:
    folder = tmp_path / "deep" / "ce"
    items = [(stem, [("t", torch.full((2,), float(i)))], {"stem": stem}) for i, stem in enumerate(HOSTILE_STEMS)]
    written = write_in_folder(folder, items)
    assert len(written) == len(items)
    names = sorted(os.listdir(folder))
    assert sorted(os.path.basename(w) for w in written) == names
    assert len({n.lower() for n in names}) == len(items), names
    for path, (stem, _, _) in zip(written, items):
        assert os.path.dirname(os.path.abspath(path)) == str(folder)
        name = os.path.basename(path)
        assert name.endswith(".safetensors") and not name.startswith(".") and len(name.encode()) <= 200
        assert name.isprintable() and "/" not in name and "\\" not in name
        with safe_open(path, framework="pt") as f:
            assert f.metadata()["stem"] == stem
    assert sorted(os.listdir(tmp_path)) == ["deep"] and os.listdir(tmp_path / "deep") == ["ce"]


def test_write_in_folder_replaces_its_own_files_only_inside(tmp_path: Path) -> None:
    folder = tmp_path / "ce"
    outside = tmp_path / "target.safetensors"
    outside.write_bytes(b"precious")
    folder.mkdir()
    (folder / "a.safetensors").symlink_to(outside)
    (written,) = write_in_folder(folder, [("a", [("t", torch.ones(1))], {})])
    assert outside.read_bytes() == b"precious"
    assert not os.path.islink(written)
    write_in_folder(folder, [("a", [("t", torch.zeros(1))], {})])  # a second run replaces its own file
    assert torch.equal(load_file(written)["t"], torch.zeros(1))


def test_write_in_folder_refuses_a_file_as_folder(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ModelFileError, match="folder"):
        write_in_folder(tmp_path / "f", [("a", [("t", torch.ones(1))], {})])


def test_unwritable_folder_is_a_model_file_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EROFS when creating the temp file, and again when removing it, is still one ModelFileError."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, flags, *a: refuse() if flags & os.O_CREAT else real_open(p, flags, *a))
    monkeypatch.setattr(os, "unlink", refuse)
    with pytest.raises(ModelFileError, match="Read-only file system"):
        write_model(tmp_path / "out.safetensors", [("t", torch.ones(1))], {})


def test_source_truncated_during_copy(tmp_path: Path) -> None:
    path = small_model(tmp_path / "model.safetensors")
    src = read_header(path)
    os.truncate(path, src.tensors["conv1.weight"].start + 4)
    with pytest.raises(ModelFileError, match="file changed or truncated while reading tensor"):
        write_model(tmp_path / "out.safetensors", list(src.tensors.items()), {}, src=src)
    assert not (tmp_path / "out.safetensors").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("fail_after", [0, 5, 100, 3000])
@pytest.mark.parametrize("fault", ["enospc", "interrupt"])
def test_write_fault_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str,
                                           fail_after: int) -> None:
    src = read_header(small_model(tmp_path / "model.safetensors"))
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old output")
    real_pwrite = os.pwrite
    written = 0

    def failing_write(fd: int, data: Any, offset: int) -> int:
        nonlocal written
        if written >= fail_after:
            if fault == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise KeyboardInterrupt
        n = real_pwrite(fd, bytes(data[:7]), offset)  # short writes exercise the retry loop too
        written += n
        return n

    items = [("big", torch.arange(1000, dtype=torch.float32))] + list(src.tensors.items())
    monkeypatch.setattr(os, "pwrite", failing_write)
    monkeypatch.delattr(os, "copy_file_range", raising=False)  # the copied tensors through os.pwrite too
    if fault == "enospc":
        with pytest.raises(ModelFileError) as info:
            write_model(out, items, {}, src=src, force=True)
        assert str(info.value) == f"cannot write {out}: No space left on device"
    else:
        with pytest.raises(KeyboardInterrupt):
            write_model(out, items, {}, src=src, force=True)
    monkeypatch.undo()
    assert out.read_bytes() == b"old output"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("step", ["fsync", "replace", "fchmod"])
def test_late_fault_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old output")

    def broken(*args: Any) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, step, broken)
    with pytest.raises(ModelFileError, match="Input/output error"):
        write_model(out, [("t", torch.ones(3))], {}, force=True)
    monkeypatch.undo()
    assert out.read_bytes() == b"old output"
    assert leftovers(tmp_path) == []


def test_short_writes_still_produce_a_complete_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_pwrite = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: real_pwrite(fd, bytes(data[:3]), offset))
    out = tmp_path / "out.safetensors"
    tensor = torch.randn(5, 7, dtype=torch.float64)
    write_model(out, [("t", tensor)], {"k": "v"})
    monkeypatch.undo()
    assert_same_bits(load_file(str(out))["t"], tensor)


def test_sigterm_handler_is_scoped() -> None:
    if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        pytest.skip("a plugin owns SIGTERM; write_model leaves such handlers alone")
    with _terminating_as_interrupt():
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

    errors: list[BaseException] = []

    def in_thread() -> None:
        try:
            with _terminating_as_interrupt():
                pass
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert errors == []


# --- processes ---------------------------------------------------------------------------------------------------

CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def test_sigterm_mid_write_leaves_no_partial_file(tmp_path: Path) -> None:
    src_path = tmp_path / "big.safetensors"
    save_file({"a": torch.ones(25_000_000), "b": torch.full((25_000_000,), 2.0)}, str(src_path))
    out = tmp_path / "out.safetensors"
    script = textwrap.dedent("""
        import sys
        from convmerge.io import read_header, write_model
        src = read_header(sys.argv[1])
        write_model(sys.argv[2], list(src.tensors.items()), {}, src=src)
    """)
    child = subprocess.Popen([sys.executable, "-c", script, str(src_path), str(out)], env=CHILD_ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not leftovers(tmp_path) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.0005)
    if child.poll() is not None:
        child.wait()
        pytest.skip("the child finished before it could be interrupted")
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=60)
    if out.exists():  # the signal came after the rename: the output must then be whole
        assert_same_bits(load_file(str(out))["b"], torch.full((25_000_000,), 2.0))
    else:  # interrupted mid-write: cleaned up rather than killed outright
        assert b"KeyboardInterrupt" in stderr, stderr
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("force", [True, False])
def test_concurrent_writers(tmp_path: Path, force: bool) -> None:
    out = tmp_path / "out.safetensors"
    go = tmp_path / "go"
    script = textwrap.dedent("""
        import os, sys, time, torch
        from convmerge.io import ModelFileError, write_model
        value, out, go, force = float(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "1"
        tensor = torch.full((4_000_000,), value)
        while not os.path.exists(go):
            time.sleep(0.001)
        try:
            for _ in range(3 if force else 1):
                write_model(out, [("t", tensor)], {"writer": sys.argv[1]}, force=force)
        except ModelFileError as e:
            print(e)
            sys.exit(3)
    """)
    children = [subprocess.Popen([sys.executable, "-c", script, str(v), str(out), str(go), "1" if force else "0"],
                                 env=CHILD_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for v in (1.0, 2.0)]
    time.sleep(0.05)
    go.touch()
    results = [(child.wait(timeout=60), *child.communicate()) for child in children]
    codes = sorted(code for code, _, _ in results)
    if force:
        assert codes == [0, 0], results
    else:
        assert codes == [0, 3], results
        assert any(b"exists; pass force=True to overwrite" in stdout for _, stdout, _ in results)
    loaded = load_file(str(out))["t"]
    with safe_open(str(out), "pt") as f:
        value = float(f.metadata()["writer"])
    assert value in (1.0, 2.0) and torch.equal(loaded, torch.full((4_000_000,), value))
    assert leftovers(tmp_path) == []


def test_header_type_is_plain_data(tmp_path: Path) -> None:
    header = read_header(small_model(tmp_path / "model.safetensors"))
    assert isinstance(header, Header) and header.path == str(tmp_path / "model.safetensors")
    info = header.tensors["conv1.weight"]
    assert info.start >= header.data_offset and info.nbytes == 96 and info.is_float
    assert not header.tensors["mask"].is_float


@pytest.mark.parametrize("fault", ["enospc", "unsupported"])
def test_kernel_copy_faults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    """Untouched tensors are copied with copy_file_range: a full disk there is a clean error, and a
    filesystem without it falls back to the buffered copy with the same bytes."""
    if not hasattr(os, "copy_file_range"):
        pytest.skip("no copy_file_range on this platform")
    src_path = tmp_path / "src.safetensors"
    tensors = {"a": torch.randn(64, 64), "b": torch.arange(100, dtype=torch.int64)}
    save_file(tensors, str(src_path))
    src = read_header(src_path)
    out = tmp_path / "out.safetensors"

    def broken(*args: Any) -> int:
        code = errno.ENOSPC if fault == "enospc" else errno.EXDEV
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "copy_file_range", broken)
    items = list(src.tensors.items())
    if fault == "enospc":
        with pytest.raises(ModelFileError, match="No space left on device"):
            write_model(out, items, {}, src=src)
        assert not out.exists() and leftovers(tmp_path) == []
    else:
        write_model(out, items, {}, src=src)
        loaded = load_file(str(out))
        for k, v in tensors.items():
            assert torch.equal(loaded[k], v)


@pytest.mark.parametrize("in_kernel", [True, False], ids=["copy_file_range", "buffered"])
def test_alongside_runs_while_untouched_tensors_are_copied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           in_kernel: bool) -> None:
    """`alongside` (fuse's verification) runs in the caller's thread while a second one copies the untouched
    tensors; tensors the caller makes are made only after it returns, and the file holds every byte."""
    if not in_kernel:
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    tensors = {f"t{i}": torch.randn(300 + i, 7) for i in range(5)}
    save_file(tensors, str(tmp_path / "src.safetensors"))
    src = read_header(tmp_path / "src.safetensors")
    events: list[str] = []
    made = torch.arange(12, dtype=torch.float64).reshape(3, 4)

    def make() -> torch.Tensor:
        events.append("made")
        return made

    def alongside() -> None:
        events.append("alongside in " + threading.current_thread().name)

    items: list[tuple[str, Any]] = [("new", LazyTensor("F64", (3, 4), make))]
    items[1:1] = [(k, src.tensors[k]) for k in sorted(src.tensors)]
    out = tmp_path / "out.safetensors"
    write_model(out, items, {"k": "v"}, src=src, alongside=alongside)
    assert events == ["alongside in " + threading.main_thread().name, "made"]
    loaded = load_file(str(out))
    assert torch.equal(loaded["new"], made) and all(torch.equal(loaded[k], v) for k, v in tensors.items())
    starts = [read_header(out).tensors[name].start for name, _ in items]
    assert starts == sorted(starts)  # laid out in the order given


@pytest.mark.parametrize("fault", [KeyboardInterrupt, ValueError])
def test_what_alongside_raises_abandons_the_write(tmp_path: Path, fault: type) -> None:
    """A verification that fails beside the copy stops it: the error as raised, no output, no temp file, the
    copying thread gone."""
    save_file({"big": torch.randn(1 << 20)}, str(tmp_path / "src.safetensors"))
    src = read_header(tmp_path / "src.safetensors")
    out = tmp_path / "out.safetensors"

    def alongside() -> None:
        raise fault("stop")

    with pytest.raises(fault, match="stop"):
        write_model(out, list(src.tensors.items()), {}, src=src, alongside=alongside)
    assert not out.exists() and leftovers(tmp_path) == []
    assert not [t for t in threading.enumerate() if t.name == "convmerge-copy"]
