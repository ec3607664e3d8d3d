"""Safetensors I/O: validated headers, lazy tensor reads and atomic streamed writes.

Every model file is treated as hostile: the header is parsed and checked here,
byte by byte, before any tensor is touched, so a bad file always ends in one
``ModelFileError`` whose message names the file and the field at fault, never
in a crash, a hang on a huge allocation, or a library error whose text changes
between versions.  Data is read with plain reads (no mmap: a file truncated
under a mapping kills the process with SIGBUS), and outputs are written to a
temporary file that is renamed into place only once complete.

Long because the checks of a hostile header and the atomic, signal-safe writer are each exhaustive.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import signal
import secrets
import shutil
import stat
import struct
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch

from . import strictjson
from .errors import ConvmergeError, Kind

__all__ = [
    "Header",
    "LazyTensor",
    "ModelFileError",
    "OutputExists",
    "Source",
    "check_outputs",
    "TensorInfo",
    "dtype_name",
    "publish",
    "read_header",
    "read_tensor",
    "staging_folder",
    "torch_dtype",
    "write_bytes",
    "write_counterexamples",
    "write_in_folder",
    "write_model",
]

MAX_HEADER_BYTES = 100_000_000
"""Same cap as the safetensors library; a longer header is rejected unread."""

_MAX_DEPTH = 64
_MAX_RANK = 64
_MAX_BYTES = 2**63 - 1
_CHUNK = 16 * 1024 * 1024
_FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})

_DTYPE_ATTRS = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "C64": "complex64",
}
_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr) for name, attr in _DTYPE_ATTRS.items() if hasattr(torch, attr)
}
_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in _DTYPES.items()}



class ModelFileError(ConvmergeError, ValueError):
    """A model file we cannot use; ``str(e)`` is one line naming the file and the problem."""

    kind = Kind.BAD_INPUT


class OutputExists(ModelFileError):
    """An output file exists and ``force`` was not given; ``shown`` is its path as messages print it.

    The message names the keyword (``force=True``); the command line words it as its own flag.
    """

    def __init__(self, shown: str) -> None:
        super().__init__(f"{shown}: exists; pass force=True to overwrite")
        self.shown = shown


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a file; absolute offsets so reads need no header arithmetic."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in the file."""
        return self.end - self.start

    @property
    def is_float(self) -> bool:
        """True for F16/BF16/F32/F64: the only dtypes whose weights may be merged (never F8)."""
        return self.dtype in _FLOAT_DTYPES


@dataclass(frozen=True)
class Header:
    """A validated safetensors header: every tensor range lies inside the file, no overlaps, no holes."""

    path: str
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    data_offset: int


@dataclass(frozen=True)
class LazyTensor:
    """A tensor computed only when the writer reaches it, so a merged model never sits in memory whole."""

    dtype: str
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]


Source = torch.Tensor | TensorInfo | LazyTensor
"""What write_model stores: a tensor's values, or raw bytes copied from ``src``."""


def torch_dtype(dtype: str) -> torch.dtype:
    """Map a safetensors dtype string to torch; ValueError for dtypes we do not handle."""
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unsupported safetensors dtype {_quote(dtype)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """Map a torch dtype to its safetensors string; ValueError when safetensors cannot store it."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(f"cannot store {dtype} in safetensors") from None


def read_header(path: str | os.PathLike[str]) -> Header:
    """Read and validate only the header; any defect raises ModelFileError before data is touched."""
    shown = _show(path)
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        if not stat.S_ISREG(mode):
            raise ModelFileError(f"{shown}: not a regular file")
        with open(path, "rb", buffering=0) as f:
            try:
                return _parse_file(f, os.fsdecode(path), shown)
            except ModelFileError:
                kind = _other_format(f)
                if kind is None:
                    raise
                raise ModelFileError(
                    f"{shown}: not a safetensors file but {kind}; in Python, load the model and write it with "
                    "convmerge.save(net, 'model.safetensors') (weights and graph description), or save its state "
                    "dict with safetensors.torch.save_file and pass --arch MODULE:CALLABLE") from None
    except OSError as e:
        raise ModelFileError(f"{shown}: cannot read: {e.strerror or e}") from None


def read_tensor(header: Header, name: str) -> torch.Tensor:
    """Read one tensor into fresh writable memory; KeyError if ``name`` is not in the header."""
    info = header.tensors[name]
    dtype = _DTYPES[info.dtype]
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    buf = bytearray(info.nbytes)
    with _open_source(header.path) as f:
        _read_tensor_bytes(f, memoryview(buf), info.start, name)
    raw = torch.frombuffer(buf, dtype=torch.uint8)
    if dtype == torch.bool and bool((raw > 1).any()):
        raise ModelFileError(f"{_show(header.path)}: tensor {_quote(name)}: BOOL data holds a byte other than 0 or 1")
    return raw.view(dtype).reshape(info.shape)


def write_model(
    out: str | os.PathLike[str],
    tensors: Sequence[tuple[str, Source]],
    metadata: dict[str, str],
    *,
    src: Header | None = None,
    force: bool = False,
    alongside: Callable[[], None] | None = None,
) -> None:
    """Write a safetensors file atomically: ``out`` is either untouched or complete, never partial.

    Tensors are laid out in the given order.  A ``TensorInfo`` source is copied
    byte for byte from ``src.path`` (in the kernel where it can), so huge unchanged
    tensors never sit in memory; a second thread copies them while this one runs
    ``alongside()`` and then makes and writes the other tensors, so what they cost
    overlaps the copy.  What ``alongside`` raises abandons the write.  ``out`` may
    not be the input file, and an existing ``out`` is only replaced with ``force``.
    """
    out_path = os.fsdecode(out)
    shown = _show(out_path)
    plan = _plan(tensors, src)
    head = _encode_header(plan, metadata)
    _check_target(out_path, shown, src, force)
    _write_atomic(out_path, shown, force, lambda fd: _stream(fd, head, plan, src, alongside))


def write_bytes(out: str | os.PathLike[str], data: bytes, *, force: bool = False) -> None:
    """Write a small file (a JSON report, an exported program) with the same all-or-nothing guarantee."""
    out_path = os.fsdecode(out)
    shown = _show(out_path)
    _check_target(out_path, shown, None, force)
    _write_atomic(out_path, shown, force, lambda fd: _write_at(fd, memoryview(data), 0))


@contextmanager
def staging_folder(out: str | os.PathLike[str]) -> Iterator[str]:
    """A new hidden folder beside ``out``, removed with all it holds on the way out (``kill -TERM`` included):
    files are written there under their final names, checked, then moved into place by `publish`, a rename
    on the same filesystem (no second copy of the bytes)."""
    out_path = os.fsdecode(out)
    directory = os.path.dirname(out_path) or "."
    with _terminating_as_interrupt():
        try:
            folder = tempfile.mkdtemp(prefix=f".{os.path.basename(out_path)[:64]}.tmp-", dir=directory)
        except OSError as e:
            raise ModelFileError(f"cannot write {_show(out_path)}: {e.strerror or e}") from None
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def publish(staged: str, out: str | os.PathLike[str], *, force: bool = False) -> None:
    """Move a file written and fsynced in `staging_folder` into place; without ``force`` never over an existing
    file (`OutputExists`)."""
    out_path = os.fsdecode(out)
    shown = _show(out_path)
    try:
        _publish(staged, out_path, shown, force)
        _fsync_dir(os.path.dirname(out_path) or ".")
    except OSError as e:
        raise ModelFileError(f"cannot write {shown}: {e.strerror or e}") from None


def write_in_folder(
    folder: str | os.PathLike[str],
    items: Iterable[tuple[str, Sequence[tuple[str, Source]], dict[str, str]]],
    *,
    force: bool = True,
) -> list[str]:
    """Write one safetensors file per ``(stem, tensors, metadata)`` item into ``folder`` (created if needed).

    Stems come from hostile places (layer names in a description), so each becomes a plain file
    name inside ``folder``: only ``[A-Za-z0-9_.-]``, no leading dot, at most 120 characters, and
    distinct from the other items' names even on a case-insensitive filesystem (``-2``, ``-3``...).
    Keep the original stem in ``metadata`` to tell the files apart. ``force`` (the default)
    replaces files a previous run left; a link there is replaced, never followed. Returns the paths.
    """
    where = os.fsdecode(folder)
    try:
        os.makedirs(where, exist_ok=True)
    except OSError as e:
        raise ModelFileError(f"{_show(where)}: cannot create the folder: {e.strerror or e}") from None
    written: list[str] = []
    taken: set[str] = set()
    for stem, tensors, metadata in items:
        name = _file_name(stem, taken)
        path = os.path.join(where, name + ".safetensors")
        write_model(path, tensors, metadata, force=force)
        written.append(path)
    return written


def write_counterexamples(folder: str | os.PathLike[str], pairs: Iterable[Any]) -> list[str]:
    """One file per pair that has a counterexample: tensors ``input``, ``pair_output``, ``candidate_output``.

    ``pairs`` are report entries (``.first``, ``.second``, ``.counterexample`` with ``.input``,
    ``.pair_output``, ``.candidate_output`` and ``.index``); the metadata keeps the layer names
    (``first``, ``second``) and the ``output_index`` (JSON) where the two outputs differ.
    """
    items = []
    for p in pairs:
        ce = p.counterexample
        if ce is None:
            continue
        tensors = [("input", ce.input.contiguous()), ("pair_output", ce.pair_output.contiguous()),
                   ("candidate_output", ce.candidate_output.contiguous())]
        meta = {"first": p.first, "second": p.second, "output_index": json.dumps(list(ce.index))}
        items.append((f"{p.first}__{p.second}", tensors, meta))
    return write_in_folder(folder, items)


_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def _file_name(stem: str, taken: set[str]) -> str:
    """A safe, new name for ``stem`` (see write_in_folder); ``taken`` holds the lower-cased names used."""
    base = _UNSAFE.sub("_", stem)[:120] or "_"
    if base.startswith("."):
        base = "_" + base[1:]
    name, k = base, 1
    while name.lower() in taken:
        k += 1
        name = f"{base}-{k}"
    taken.add(name.lower())
    return name


def _write_atomic(out_path: str, shown: str, force: bool, fill: Callable[[int], None]) -> None:
    """Temp file in the target folder, fsync, normal permissions, then publish; no temp file survives."""
    directory = os.path.dirname(out_path) or "."
    with _terminating_as_interrupt():
        fd, tmp = -1, ""
        try:
            # Named before it exists (not mkstemp), so an interrupt landing right after os.open still finds
            # the name to remove; a FileExistsError from os.open means the name was taken: not ours to remove.
            tmp = os.path.join(directory, f".{os.path.basename(out_path)[:64]}.tmp-{secrets.token_hex(8)}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            fill(fd)
            os.fsync(fd)
            os.fchmod(fd, 0o666 & ~_umask())
            os.close(fd)
            fd = -1
            _publish(tmp, out_path, shown, force)
            _fsync_dir(directory)
        except BaseException as e:
            if fd >= 0:
                with suppress(OSError):
                    os.close(fd)
            if tmp and not (fd < 0 and isinstance(e, FileExistsError)):
                with suppress(OSError):  # absent, or a read-only folder (EROFS): nothing of ours to remove
                    os.unlink(tmp)
            if isinstance(e, OSError):
                raise ModelFileError(f"cannot write {shown}: {e.strerror or e}") from None
            raise


@contextmanager
def _terminating_as_interrupt() -> Iterator[None]:
    """Let ``kill -TERM`` unwind like Ctrl-C, so write_model removes its temp file.

    Only replaces the default action (which kills without cleanup), only in the
    main thread (the only place Python may install handlers), and restores it.
    A handler the application installed, or SIG_IGN, is left alone.
    """
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _parse_file(f: BinaryIO, path: str, shown: str) -> Header:
    size = os.fstat(f.fileno()).st_size
    if size < 8:
        raise ModelFileError(f"{shown}: file is {size} bytes, too short for the 8-byte header length")
    (length,) = struct.unpack("<Q", _read_header_bytes(f, 0, 8, shown))
    if length == 0:
        raise ModelFileError(f"{shown}: header length is 0")
    if length > MAX_HEADER_BYTES:
        raise ModelFileError(f"{shown}: header length {length} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if length > size - 8:
        raise ModelFileError(f"{shown}: header length {length} runs past the end of the file ({size} bytes)")
    raw = _read_header_bytes(f, 8, length, shown)
    data_offset = 8 + length
    metadata, entries = _decode_json(raw, shown)
    tensors = {name: _tensor_info(name, entry, data_offset, shown) for name, entry in entries.items()}
    _check_layout(tensors, size - data_offset, data_offset, shown)
    return Header(path=path, metadata=metadata, tensors=tensors, data_offset=data_offset)


_TORCH_LEGACY = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
"""How torch.save's legacy format begins: pickle protocol 2, then its magic number."""


def _other_format(f: BinaryIO) -> str | None:
    """What a file that failed as safetensors looks like, where a PyTorch user may have passed it: a zip
    archive (torch.save, the first entry named '<archive>/data.pkl') or a pickle (torch.save's legacy format)."""
    head = os.pread(f.fileno(), 512, 0)
    if head.startswith(b"PK\x03\x04"):
        name_length = int.from_bytes(head[26:28], "little")
        torch_zip = head[30:30 + name_length].endswith(b"/data.pkl")
        return "a zip archive: a PyTorch checkpoint (torch.save)" if torch_zip else "a zip archive"
    if head.startswith(_TORCH_LEGACY):
        return "a PyTorch checkpoint in torch.save's legacy (pickle) format"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a Python pickle (as torch.save's legacy format writes)"
    return None


def _decode_json(raw: bytes, shown: str) -> tuple[dict[str, str], dict[str, Any]]:
    """Decode the header to (metadata, entries), refusing deep nesting before the recursive parser sees it."""
    where = f"{shown}: header"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelFileError(f"{where} is not valid UTF-8 (byte {e.start})") from None
    try:
        obj = strictjson.loads(text, _MAX_DEPTH)
    except strictjson.TooDeep:
        raise ModelFileError(f"{where} is nested more than {_MAX_DEPTH} levels deep") from None
    except ValueError as e:
        raise ModelFileError(f"{where} is not valid JSON ({_one_line(str(e))})") from None
    if not isinstance(obj, dict):
        raise ModelFileError(f"{where} is a JSON {type(obj).__name__}, not an object")
    for key in obj:
        if not _utf8_ok(key):
            raise ModelFileError(f"{where}: key {_quote(key)} is not encodable as UTF-8")
    metadata = obj.pop("__metadata__", {})
    if not isinstance(metadata, dict):
        raise ModelFileError(f"{where}: __metadata__ is not an object")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise ModelFileError(f"{where}: __metadata__ {_quote(key)} is not a string")
        if not (_utf8_ok(key) and _utf8_ok(value)):
            raise ModelFileError(f"{where}: __metadata__ {_quote(key)} is not encodable as UTF-8")
    return metadata, obj


def _tensor_info(name: str, entry: Any, data_offset: int, shown: str) -> TensorInfo:
    where = f"{shown}: header: tensor {_quote(name)}"
    if not isinstance(entry, dict):
        raise ModelFileError(f"{where}: entry is not an object")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in entry:
            raise ModelFileError(f"{where}: missing '{field}'")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        raise ModelFileError(f"{where}: dtype is not a string")
    if dtype not in _DTYPES:
        raise ModelFileError(f"{where}: unknown dtype {_quote(dtype)}")
    if not isinstance(shape, list):
        raise ModelFileError(f"{where}: shape is not a list")
    if len(shape) > _MAX_RANK:
        raise ModelFileError(f"{where}: shape has {len(shape)} dimensions (at most {_MAX_RANK})")
    if not all(type(d) is int for d in shape):
        raise ModelFileError(f"{where}: shape {_brief(shape)} holds a non-integer")
    if any(d < 0 for d in shape):
        raise ModelFileError(f"{where}: shape {_brief(shape)} holds a negative dimension")
    itemsize = _DTYPES[dtype].itemsize
    nbytes = itemsize
    for d in shape:
        nbytes *= d
        if nbytes > _MAX_BYTES:
            raise ModelFileError(f"{where}: shape {_brief(shape)} is absurdly large")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise ModelFileError(f"{where}: data_offsets {_brief(offsets)} is not a list of two integers")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise ModelFileError(f"{where}: data_offsets {_brief(offsets)} are not 0 <= begin <= end")
    if end - begin != nbytes:
        raise ModelFileError(
            f"{where}: offsets {_brief(offsets)} do not match shape {_brief(shape)} of {dtype} ({nbytes} bytes)"
        )
    return TensorInfo(name, dtype, tuple(shape), data_offset + begin, data_offset + end)


def _check_layout(tensors: dict[str, TensorInfo], data_len: int, data_offset: int, shown: str) -> None:
    """Tensors must tile the data region exactly, as the safetensors format requires."""
    where = f"{shown}: header"
    covered, previous = 0, None
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        begin, end = info.start - data_offset, info.end - data_offset
        if end > data_len:
            raise ModelFileError(
                f"{where}: tensor {_quote(info.name)}: offsets [{begin}, {end}] run past the end of the "
                f"data region ({data_len} bytes)"
            )
        if begin < covered:
            raise ModelFileError(f"{where}: tensors {_quote(previous)} and {_quote(info.name)} overlap")
        if begin > covered:
            raise ModelFileError(f"{where}: bytes {covered}..{begin} of the data region belong to no tensor")
        covered, previous = end, info.name
    if covered != data_len:
        raise ModelFileError(f"{where}: bytes {covered}..{data_len} of the data region belong to no tensor")


def _read_header_bytes(f: BinaryIO, offset: int, length: int, shown: str) -> bytes:
    buf = bytearray(length)
    if not _read_exact(f, memoryview(buf), offset):
        raise ModelFileError(f"{shown}: file changed or truncated while reading the header")
    return bytes(buf)


def _read_exact(f: BinaryIO, view: memoryview, offset: int) -> bool:
    """Fill ``view`` from ``offset``; False when the file ends first (it shrank since the header was read)."""
    f.seek(offset)
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            return False
        done += n
    return True


_Plan = list[tuple[str, str, tuple[int, ...], int, Source]]
_Placed = tuple[str, str, tuple[int, ...], int, Source, int]
"""A planned tensor and the offset in the output file where it goes."""


def _plan(tensors: Sequence[tuple[str, Source]], src: Header | None) -> _Plan:
    """Check the caller's tensors and fix (name, dtype, shape, nbytes, source) for each, in order."""
    plan: _Plan = []
    seen: set[str] = set()
    for name, source in tensors:
        if not isinstance(name, str) or not _utf8_ok(name) or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        if name in seen:
            raise ValueError(f"duplicate tensor name {_quote(name)}")
        seen.add(name)
        if isinstance(source, TensorInfo):
            if src is None:
                raise ValueError(f"tensor {_quote(name)} copies bytes from a file, but no src header was given")
            expected = torch_dtype(source.dtype).itemsize
            for d in source.shape:
                expected *= d
            if source.nbytes != expected or source.start < src.data_offset:
                raise ValueError(f"tensor {_quote(name)}: TensorInfo range does not fit its dtype and shape")
            plan.append((name, source.dtype, tuple(source.shape), source.nbytes, source))
        elif isinstance(source, LazyTensor):
            nbytes = torch_dtype(source.dtype).itemsize * math.prod(source.shape)
            plan.append((name, source.dtype, tuple(source.shape), nbytes, source))
        elif isinstance(source, torch.Tensor):
            if source.layout != torch.strided:
                raise ValueError(f"tensor {_quote(name)}: cannot store a {source.layout} tensor")
            nbytes = source.numel() * source.element_size()
            plan.append((name, dtype_name(source.dtype), tuple(source.shape), nbytes, source))
        else:
            raise TypeError(f"tensor {_quote(name)}: source must be a torch.Tensor, TensorInfo or LazyTensor")
    return plan


def _encode_header(plan: _Plan, metadata: dict[str, str]) -> bytes:
    """Length prefix plus JSON, space-padded so the data starts 8-byte aligned (as safetensors does)."""
    for key, value in metadata.items():
        if not (isinstance(key, str) and isinstance(value, str) and _utf8_ok(key) and _utf8_ok(value)):
            raise ValueError(f"metadata must map str to str, got {key!r}: {type(value).__name__}")
    obj: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape, nbytes, _ in plan:
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    if len(raw) > MAX_HEADER_BYTES:
        raise ValueError(f"header would be {len(raw)} bytes, over the {MAX_HEADER_BYTES}-byte limit")
    return struct.pack("<Q", len(raw)) + raw


def check_outputs(outputs: Sequence[str | os.PathLike[str]], inputs: Sequence[str | os.PathLike[str]],
                  force: bool) -> None:
    """Refuse, before any work, outputs that would replace an input, each other, or (without force) a file."""
    seen: list[str] = []
    for out in outputs:
        out_path = os.fsdecode(out)
        shown = _show(out_path)
        for other in list(inputs) + seen:
            if _same_file(out_path, os.fsdecode(other)):
                what = "the input file" if other not in seen else "named twice as an output"
                raise ModelFileError(f"{shown}: is {what}; write it elsewhere")
        _check_target(out_path, shown, None, force)
        directory = os.path.dirname(out_path) or "."
        if not os.path.isdir(directory):
            raise ModelFileError(f"{shown}: folder {directory} does not exist")
        seen.append(out_path)


def _same_file(a: str, b: str) -> bool:
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def _check_target(out: str, shown: str, src: Header | None, force: bool) -> None:
    """Refuse to replace the input (it is never modified) or, without force, any existing file."""
    if src is not None and _same_file(out, src.path):
        raise ModelFileError(f"{shown}: is the input file; write the output elsewhere")
    if os.path.isdir(out):
        raise ModelFileError(f"{shown}: is a directory")
    if out.endswith(("/", os.sep)):
        raise ModelFileError(f"{shown}: names a folder, not a file; give the output's file name")
    if os.path.lexists(out) and not force:
        raise OutputExists(shown)


def _stream(fd: int, head: bytes, plan: _Plan, src: Header | None,
            alongside: Callable[[], None] | None) -> None:
    """Header, then each tensor at its own offset: the copied ones from a second thread (`_Copier`), the
    others from this one once `alongside` has run; each thread stages through one bounded buffer."""
    _write_at(fd, memoryview(head), 0)
    copies: list[_Placed] = []
    made: list[_Placed] = []
    at = len(head)
    for name, dtype, shape, nbytes, source in plan:
        (copies if isinstance(source, TensorInfo) else made).append((name, dtype, shape, nbytes, source, at))
        at += nbytes
    with _open_source(src.path) if copies and src is not None else nullcontext() as f:
        copier = _Copier(f, fd, copies)
        copier.start()
        try:
            if alongside is not None:
                alongside()
            _write_made(fd, made)
        except BaseException:
            copier.stop.set()
            copier.join()
            raise
        copier.join()
        if copier.error is not None:
            raise copier.error


def _start_writeback() -> Callable[[int, int, int], None]:
    """`sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)` where libc has it (Linux): the disk writes
    the bytes just copied while the next are copied, so the final fsync waits for little (1 GiB: copy and
    fsync 0.69 s -> 0.41-0.57 s, benchmarks/README.md). A hint only: fsync still makes the file durable,
    and a filesystem that refuses it changes nothing."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            call = ctypes.CDLL(None, use_errno=True).sync_file_range
            call.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
        except (OSError, AttributeError):
            return lambda fd, offset, nbytes: None

        def writeback(fd: int, offset: int, nbytes: int) -> None:
            call(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE; the result is not needed

        return writeback
    return lambda fd, offset, nbytes: None


_writeback = _start_writeback()


def _write_made(fd: int, made: list[_Placed]) -> None:
    """Tensors given as values or computed now (LazyTensor), each written at its offset."""
    biggest = max((nbytes for *_, nbytes, _, _ in made), default=0)
    buf = bytearray(max(1, min(_CHUNK, biggest)))
    view = memoryview(buf)
    staging = torch.frombuffer(buf, dtype=torch.uint8)
    for name, dtype, shape, nbytes, source, at in made:
        if isinstance(source, LazyTensor):
            source = source.make()
            if dtype_name(source.dtype) != dtype or tuple(source.shape) != shape:
                raise ValueError(f"tensor {_quote(name)}: computed {list(source.shape)} {source.dtype}, "
                                 f"announced {list(shape)} {dtype}")
        if not nbytes:
            continue
        flat = source.detach().cpu().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)
        for lo in range(0, nbytes, len(buf)):
            chunk = view[: min(len(buf), nbytes - lo)]
            staging[: len(chunk)].copy_(flat[lo : lo + len(chunk)])
            _write_at(fd, chunk, at + lo)
        _writeback(fd, at, nbytes)


class _Copier(threading.Thread):
    """Copies untouched tensors from the source file to their offsets in the output, beside the caller's
    work; it stops between steps once `stop` is set, and keeps what it raised for the caller."""

    def __init__(self, f: BinaryIO | None, fd: int, copies: list[_Placed]) -> None:
        super().__init__(name="convmerge-copy", daemon=True)
        self.f, self.fd, self.copies = f, fd, copies
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._copy()
        except BaseException as e:  # raised again in the caller's thread
            self.error = e

    def _copy(self) -> None:
        in_kernel, view = hasattr(os, "copy_file_range"), None
        for name, _, _, nbytes, info, at in self.copies:
            assert self.f is not None and isinstance(info, TensorInfo)
            if in_kernel:
                in_kernel = _copy_in_kernel(self.f, self.fd, info.start, at, nbytes, name, self.stop)
                if in_kernel:
                    continue
            if view is None:
                view = memoryview(bytearray(max(1, min(_CHUNK, max(c[3] for c in self.copies)))))
            for lo in range(0, nbytes, len(view)):
                if self.stop.is_set():
                    return
                chunk = view[: min(len(view), nbytes - lo)]
                _read_tensor_bytes(self.f, chunk, info.start + lo, name)
                _write_at(self.fd, chunk, at + lo)
                _writeback(self.fd, at + lo, len(chunk))


_NO_KERNEL_COPY = {errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF, errno.EPERM}
_KERNEL_STEP = 64 << 20
"""Bytes per copy_file_range call: a stop request waits for one step at most."""


def _copy_in_kernel(f: BinaryIO, fd: int, offset: int, at: int, nbytes: int, name: str,
                    stop: threading.Event) -> bool:
    """Copy an untouched tensor file-to-file in the kernel (3x faster than through a buffer), to offset
    ``at`` of ``fd`` (its file position is left alone).

    False, having copied nothing, where the filesystem cannot: the caller falls back to reading
    and writing. A source that ends early is the same truncation error as on the slow path.
    """
    done = 0
    while done < nbytes and not stop.is_set():
        try:
            n = os.copy_file_range(f.fileno(), fd, min(_KERNEL_STEP, nbytes - done), offset + done, at + done)
        except OSError as e:
            if done == 0 and e.errno in _NO_KERNEL_COPY:
                return False
            raise
        if n == 0:
            raise ModelFileError(f"{_show(f.name)}: file changed or truncated while reading tensor {_quote(name)}")
        _writeback(fd, at + done, n)
        done += n
    return True


def _open_source(path: str) -> BinaryIO:
    try:
        return open(path, "rb", buffering=0)
    except OSError as e:
        raise ModelFileError(f"{_show(path)}: cannot read: {e.strerror or e}") from None


def _read_tensor_bytes(f: BinaryIO, view: memoryview, offset: int, name: str) -> None:
    """Fill ``view`` with (part of) tensor ``name``; a short read means the file shrank under us."""
    shown = _show(f.name)
    try:
        complete = _read_exact(f, view, offset)
    except OSError as e:
        raise ModelFileError(f"{shown}: cannot read tensor {_quote(name)}: {e.strerror or e}") from None
    if not complete:
        raise ModelFileError(f"{shown}: file changed or truncated while reading tensor {_quote(name)}")


def _write_at(fd: int, view: memoryview, offset: int) -> None:
    """All of ``view`` at ``offset`` (positional: the two writer threads share no file position)."""
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        view, offset = view[n:], offset + n


def _publish(tmp: str, out: str, shown: str, force: bool) -> None:
    """Move the finished temp file into place; without force, a hard link makes 'do not clobber' race-free."""
    if force:
        os.replace(tmp, out)
        return
    try:
        os.link(tmp, out)
    except FileExistsError:
        raise OutputExists(shown) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
            raise
        os.replace(tmp, out)
        return
    os.unlink(tmp)


def _fsync_dir(directory: str) -> None:
    """Make the rename durable; some filesystems cannot fsync a directory, which is fine."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask: the temp file is created 0600, but users expect the usual 0644 (0666 & ~umask)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _utf8_ok(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _quote(value: object) -> str:
    """repr() keeps hostile names on one line; long ones are cut so messages stay readable."""
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _brief(value: object) -> str:
    text = repr(value[:17] if isinstance(value, list) else value)
    return text if len(text) <= 80 else text[:77] + "..."


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _show(path: str | os.PathLike[str]) -> str:
    text = os.fsdecode(path)
    return text if text.isprintable() else repr(text)
