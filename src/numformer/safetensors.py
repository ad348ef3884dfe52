"""Read and write the Hugging Face *safetensors* format in plain NumPy.

File layout (all integers little-endian)::

    bytes [0, 8)          N: u64, length of the header
    bytes [8, 8+N)        header: UTF-8 JSON object
    bytes [8+N, EOF)      the data buffer

The header maps each tensor name to ::

    {"dtype": "F32", "shape": [d0, d1, ...], "data_offsets": [begin, end]}

where ``begin``/``end`` are byte offsets *relative to the start of the data
buffer*, the tensor's bytes are little-endian in C order, and
``end - begin == prod(shape) * itemsize``. An optional ``"__metadata__"``
entry maps strings to strings.

The reader treats the file as untrusted input: every length, offset, type
and count is checked before any byte is interpreted, and every problem is a
:class:`SafetensorsError` naming the file, the tensor and (where it helps)
the byte offset. Nothing is read outside the file; no other exception type
escapes for a malformed file.

Deliberate leniencies (the reference Rust reader is stricter): gaps between
tensors and bytes after the last tensor are allowed, and unknown extra keys
in a tensor entry are ignored. Overlapping tensors are rejected.
"""

from __future__ import annotations

import json
import math
import mmap as _mmap
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from .fileio import atomic_open

__all__ = ["SafetensorsError", "save_file", "load_file", "read_header", "DTYPES"]

#: safetensors dtype code -> little-endian NumPy dtype used to *store* it.
#: BF16 has no NumPy dtype: it is stored as raw u16 and widened on load.
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}

# NumPy dtype (native or little-endian form) -> code, for writing. BF16 is
# read-only here: NumPy has no bfloat16 to write from.
_CODE_OF: dict[tuple[str, int], str] = {
    (np.dtype(v).kind, np.dtype(v).itemsize): k for k, v in DTYPES.items() if k != "BF16"
}

#: Headers larger than this are rejected before being read (real headers of
#: even huge models are a few MB; this bounds memory for hostile files).
MAX_HEADER_BYTES = 100 * 1024 * 1024

# NumPy accepts at most 32 dimensions in older and 64 in newer versions.
_MAX_NDIM = 32
# No single tensor may claim more bytes than an intp can index.
_MAX_BYTES = np.iinfo(np.intp).max


class SafetensorsError(ValueError):
    """A safetensors file (or a request to read one) is malformed."""


# --------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------


def _as_little_endian(name: str, arr: Any) -> tuple[str, np.ndarray]:
    """Return (dtype code, C-contiguous little-endian array) for one tensor."""
    if not isinstance(arr, np.ndarray):
        if isinstance(arr, np.generic):
            arr = np.asarray(arr)
        else:
            raise TypeError(f"tensor {name!r}: expected a numpy.ndarray, got {type(arr).__name__}")
    code = _CODE_OF.get((arr.dtype.kind, arr.dtype.itemsize))
    if code is None:
        raise TypeError(
            f"tensor {name!r}: dtype {arr.dtype} cannot be stored "
            f"(supported: {', '.join(k for k in DTYPES if k != 'BF16')})"
        )
    # astype(copy=False) only copies big-endian input; the C-order copy only
    # strided views. (Not np.ascontiguousarray: it turns 0-d arrays into 1-d.)
    arr = arr.astype(DTYPES[code], copy=False)
    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")
    return code, arr


def save_file(
    tensors: Mapping[str, np.ndarray],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` to ``path`` as a safetensors file, atomically.

    Parameters
    ----------
    tensors : mapping name -> array. Supported dtypes: float64/32/16,
        int64/32/16/8, uint64/32/16/8, bool. Big-endian and non-contiguous
        arrays are converted; 0-d and zero-size arrays are fine.
    path : destination; replaced atomically (temp file + fsync + rename), so
        a crash never leaves a half-written file.
    metadata : optional str -> str mapping stored under ``"__metadata__"``.

    The output is deterministic: tensors are laid out in sorted-name order,
    the JSON is compact with a fixed key order, and the header is padded with
    spaces so the data buffer starts at a multiple of 8 bytes.
    """
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of name -> array, got {type(tensors).__name__}")
    header: dict[str, Any] = {}
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a mapping of str -> str, got {type(metadata).__name__}")
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"metadata must map str -> str; got {k!r}: {v!r}")
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}

    arrays: list[np.ndarray] = []
    offset = 0
    for name in sorted(tensors):
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r}")
        if name == "__metadata__":
            raise ValueError("'__metadata__' is reserved and cannot be a tensor name")
        code, arr = _as_little_endian(name, tensors[name])
        header[name] = {
            "dtype": code,
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
        arrays.append(arr)

    try:
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates in a name
        raise ValueError(f"tensor name or metadata is not valid Unicode: {e}") from None
    raw += b" " * (-len(raw) % 8)  # pad so the data buffer is 8-byte aligned

    with atomic_open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for arr in arrays:
            # A uint8 view of the contiguous array: written without a copy.
            f.write(arr.reshape(-1).view(np.uint8).data)


# --------------------------------------------------------------------------
# reading: header validation
# --------------------------------------------------------------------------


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: a repeated key is ambiguous (which one wins?)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _is_int(x: Any) -> bool:
    # bool is an int subclass in Python; `true` is not a valid dimension.
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_header(raw: bytes, where: str) -> dict[str, Any]:
    """Decode the header bytes into a JSON object (no semantic checks yet)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SafetensorsError(f"{where}: header is not valid UTF-8 (byte offset {8 + e.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise SafetensorsError(f"{where}: header has duplicate key {e.args[0]!r}") from None
    except json.JSONDecodeError as e:
        # e.pos counts characters; report the byte offset in the file.
        byte = 8 + len(text[: e.pos].encode("utf-8"))
        raise SafetensorsError(f"{where}: header is not valid JSON: {e.msg} (byte offset {byte})") from None
    except (ValueError, RecursionError) as e:
        # ValueError: e.g. an integer with too many digits; RecursionError:
        # pathologically deep nesting.
        raise SafetensorsError(f"{where}: header is not valid JSON: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise SafetensorsError(f"{where}: header must be a JSON object, got {type(obj).__name__}")
    return obj


def _check_metadata(meta: Any, where: str) -> dict[str, str]:
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise SafetensorsError(f"{where}: '__metadata__' must be an object of strings, got {type(meta).__name__}")
    for k, v in meta.items():
        if not isinstance(v, str):
            raise SafetensorsError(f"{where}: '__metadata__' value for {k!r} must be a string, got {type(v).__name__}")
    return dict(meta)


def _check_entry(name: str, entry: Any, buffer_size: int, data_start: int, where: str) -> dict[str, Any]:
    """Validate one tensor entry; return {"dtype", "shape", "data_offsets"}."""
    t = f"{where}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise SafetensorsError(f"{t}: entry must be an object, got {type(entry).__name__}")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise SafetensorsError(f"{t}: entry is missing {key!r}")

    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise SafetensorsError(f"{t}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")

    shape = entry["shape"]
    if not isinstance(shape, list):
        raise SafetensorsError(f"{t}: shape must be a list of integers, got {type(shape).__name__}")
    if len(shape) > _MAX_NDIM:
        raise SafetensorsError(f"{t}: shape has {len(shape)} dimensions (at most {_MAX_NDIM} supported)")
    for d in shape:
        if not _is_int(d) or d < 0:
            raise SafetensorsError(f"{t}: shape {shape} has an invalid dimension {d!r} (need integers >= 0)")

    offsets = entry["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise SafetensorsError(f"{t}: data_offsets must be [begin, end] integers, got {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= buffer_size:
        raise SafetensorsError(
            f"{t}: data_offsets [{begin}, {end}] outside the data buffer of {buffer_size} bytes "
            f"(buffer starts at byte offset {data_start}); need 0 <= begin <= end <= {buffer_size}"
        )

    # Python ints: no overflow however large the claimed shape is.
    itemsize = DTYPES[dtype].itemsize
    nbytes = math.prod(shape) * itemsize
    if end - begin != nbytes:
        raise SafetensorsError(
            f"{t}: data_offsets [{begin}, {end}] span {end - begin} bytes but shape {shape} "
            f"of {dtype} needs {nbytes} (at byte offset {data_start + begin})"
        )
    # A zero-size shape like [0, 10**30] passes the byte check; NumPy would
    # still refuse it, so bound the product of the non-zero dimensions too.
    if math.prod(d for d in shape if d) * itemsize > _MAX_BYTES:
        raise SafetensorsError(f"{t}: shape {shape} is too large to represent")
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


def _check_overlaps(entries: dict[str, dict[str, Any]], data_start: int, where: str) -> None:
    """Reject tensors whose byte ranges overlap (empty ranges overlap nothing)."""
    spans = sorted((*e["data_offsets"], n) for n, e in entries.items() if e["data_offsets"][0] < e["data_offsets"][1])
    # Sorted by begin, ranges are disjoint iff each begins after the previous ends.
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise SafetensorsError(
                f"{where}: tensors {n0!r} [{b0}, {e0}] and {n1!r} [{b1}, {e1}] overlap "
                f"(at byte offset {data_start + b1})"
            )


def _read_header_from(f: Any, file_size: int, where: str) -> tuple[dict[str, dict[str, Any]], dict[str, str], int]:
    """Read and validate the header; return (entries, metadata, data_start)."""
    if file_size < 8:
        raise SafetensorsError(f"{where}: file is {file_size} bytes, too short for the 8-byte header length")
    prefix = f.read(8)
    if len(prefix) != 8:
        raise SafetensorsError(f"{where}: could not read the 8-byte header length (file shrank?)")
    n = int.from_bytes(prefix, "little")
    if n > MAX_HEADER_BYTES:
        raise SafetensorsError(f"{where}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if n > file_size - 8:
        raise SafetensorsError(
            f"{where}: header length {n} runs past the end of the file "
            f"({file_size} bytes; header would end at byte offset {8 + n})"
        )
    raw = f.read(n)
    if len(raw) != n:
        raise SafetensorsError(f"{where}: header truncated: read {len(raw)} of {n} bytes")
    obj = _parse_header(raw, where)

    data_start = 8 + n
    buffer_size = file_size - data_start
    metadata = _check_metadata(obj.get("__metadata__"), where)
    entries = {
        name: _check_entry(name, entry, buffer_size, data_start, where)
        for name, entry in obj.items()
        if name != "__metadata__"
    }
    _check_overlaps(entries, data_start, where)
    return entries, metadata, data_start


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Read and validate only the header of a safetensors file.

    Returns
    -------
    header : dict name -> {"dtype": str, "shape": list[int], "data_offsets": [begin, end]}
        in file order, ``"__metadata__"`` excluded.
    metadata : dict str -> str (empty when the file has none).

    Raises :class:`SafetensorsError` for any malformed header (see module
    docstring) and ``OSError`` if the file cannot be opened.
    """
    where = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        entries, metadata, _ = _read_header_from(f, size, where)
    return entries, metadata


# --------------------------------------------------------------------------
# reading: data
# --------------------------------------------------------------------------


def _finish(raw: np.ndarray, entry: dict[str, Any], name: str, where: str, at: int) -> np.ndarray:
    """Turn a tensor's raw uint8 bytes (from file byte ``at``) into an array
    of its dtype and shape."""
    code = entry["dtype"]
    arr = raw.view(DTYPES[code]).reshape(entry["shape"])
    if code == "BF16":
        # bfloat16 is the top half of a float32: widen by shifting 16 bits.
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    elif code == "BOOL":
        # Bytes other than 0/1 are not valid bools; NumPy would accept them
        # silently and produce odd comparisons, so refuse them.
        if raw.size and raw.max() > 1:
            bad = int(np.argmax(raw > 1))
            raise SafetensorsError(
                f"{where}: tensor {name!r}: BOOL byte {int(raw[bad])} is not 0 or 1 "
                f"(at byte offset {at + bad})"
            )
    return arr


def load_file(
    path: str | os.PathLike[str],
    names: Iterable[str] | None = None,
    mmap: bool = False,
) -> dict[str, np.ndarray]:
    """Load tensors from a safetensors file.

    Parameters
    ----------
    path : the file.
    names : load only these tensors (all when None); a name that is not in
        the file raises :class:`SafetensorsError`.
    mmap : if False (default) each tensor is read into a fresh, writable,
        aligned array. If True, arrays are read-only views of a memory map
        (no copy; pages load on first touch) -- except BF16, which is always
        converted to a float32 copy. Truncating the file while such views
        are alive is undefined (the OS may kill the process).

    Returns
    -------
    dict name -> ndarray, in file order. Dtypes are the little-endian NumPy
    equivalents of the file's; BF16 comes back as float32.
    """
    where = os.fspath(path)
    if isinstance(names, (str, bytes)):
        raise TypeError("names must be a list of tensor names, not a single string")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        entries, _, data_start = _read_header_from(f, size, where)
        if names is None:
            wanted = list(entries)
        else:
            wanted = list(dict.fromkeys(names))  # dedupe, keep order
            missing = [n for n in wanted if n not in entries]
            if missing:
                raise SafetensorsError(f"{where}: no tensor named {', '.join(map(repr, missing))} in the file")
        if mmap:
            return _load_mmap(f, entries, wanted, data_start, size, where)

        out: dict[str, np.ndarray] = {}
        for name in wanted:
            e = entries[name]
            begin, end = e["data_offsets"]
            at = data_start + begin
            raw = np.empty(end - begin, dtype=np.uint8)
            f.seek(at)
            got = f.readinto(memoryview(raw)) if raw.size else 0
            if got != raw.size:
                raise SafetensorsError(
                    f"{where}: tensor {name!r}: short read, {got} of {raw.size} bytes "
                    f"at byte offset {at} (file changed while reading?)"
                )
            out[name] = _finish(raw, e, name, where, at)
        return out


def _load_mmap(
    f: Any, entries: dict[str, dict[str, Any]], wanted: list[str], data_start: int, size: int, where: str
) -> dict[str, np.ndarray]:
    """mmap variant of :func:`load_file`: read-only views into the file."""
    # Map the whole file once; views keep the mapping alive after close.
    mm = _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_READ)
    if len(mm) != size:
        raise SafetensorsError(f"{where}: file size changed while reading ({size} -> {len(mm)} bytes)")
    buf = np.frombuffer(mm, dtype=np.uint8)
    out: dict[str, np.ndarray] = {}
    for name in wanted:
        e = entries[name]
        begin, end = e["data_offsets"]
        out[name] = _finish(buf[data_start + begin : data_start + end], e, name, where, data_start + begin)
    return out
