"""Tests for numformer.safetensors (format read/write) and numformer.fileio
(atomic writes). The reader is fuzzed: a malformed file must raise
SafetensorsError, never any other exception, never read out of bounds."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from numformer import fileio
from numformer.safetensors import DTYPES, SafetensorsError, load_file, read_header, save_file

# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

WRITABLE_DTYPES = [
    np.float64, np.float32, np.float16,
    np.int64, np.int32, np.int16, np.int8,
    np.uint64, np.uint32, np.uint16, np.uint8,
    np.bool_,
]
SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 0, 4), (2, 3, 1, 2)]


def _sample(dtype, shape, seed=0) -> np.ndarray:
    """Deterministic values covering the dtype's range (incl. negatives)."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return (rng.standard_normal(shape) * 100).astype(dt)
    if dt.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max, shape, dtype=dt, endpoint=True)


def _raw_file(header: object, buffer: bytes = b"", *, header_bytes: bytes | None = None) -> bytes:
    """Assemble a safetensors file by hand (possibly an invalid one)."""
    hb = header_bytes if header_bytes is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(hb)) + hb + buffer


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _no_temp_files(directory) -> bool:
    return not [n for n in os.listdir(directory) if n.endswith(".tmp") or ".old." in n]


# --------------------------------------------------------------------------
# round trip
# --------------------------------------------------------------------------


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("dtype", WRITABLE_DTYPES, ids=lambda d: np.dtype(d).name)
def test_round_trip_all_dtypes_and_shapes(tmp_path, dtype, mmap):
    tensors = {f"t{i}": _sample(dtype, s, seed=i) for i, s in enumerate(SHAPES)}
    path = tmp_path / "x.safetensors"
    save_file(tensors, path)
    out = load_file(path, mmap=mmap)
    assert list(out) == sorted(tensors)
    for name, a in tensors.items():
        b = out[name]
        assert b.shape == a.shape and b.dtype == a.dtype, name
        np.testing.assert_array_equal(b, a)
        if mmap:
            assert not b.flags.writeable
        else:
            # a private, writable copy
            assert b.flags.writeable and b.flags.c_contiguous and b.flags.aligned
            b[...] = 0 if b.size else b
    if not mmap:
        # mutating the returned arrays did not touch the file
        again = load_file(path)
        for name, a in tensors.items():
            np.testing.assert_array_equal(again[name], a)


def test_mixed_dtypes_metadata_and_special_values(tmp_path):
    tensors = {
        "w": np.array([np.nan, np.inf, -np.inf, -0.0, 1e-45], np.float32),
        "h": np.array([65504, -65504, 6e-8], np.float16),
        "b": np.array([[True, False], [False, True]]),
        "i": np.array(-7, np.int64),
        "é unicode name ✓": np.arange(3, dtype=np.uint8),
    }
    meta = {"format": "np", "note": "ünïcode"}
    path = tmp_path / "m.safetensors"
    save_file(tensors, path, metadata=meta)
    header, got_meta = read_header(path)
    assert got_meta == meta
    assert header["w"] == {"dtype": "F32", "shape": [5], "data_offsets": header["w"]["data_offsets"]}
    out = load_file(path)
    for k, v in tensors.items():
        np.testing.assert_array_equal(out[k], v)
        # NaN payload and signed zero survive bit-for-bit
        assert out[k].tobytes() == v.astype(v.dtype.newbyteorder("<")).tobytes()


def test_big_endian_and_non_contiguous_inputs_are_converted(tmp_path):
    base = np.arange(24, dtype=np.float64).reshape(4, 6)
    tensors = {
        "be": np.arange(5, dtype=">i4"),
        "bef": np.array([1.5, -2.25], dtype=">f8"),
        "strided": base[:, ::2],
        "transposed": base.T,
        "fortran": np.asfortranarray(base),
    }
    path = tmp_path / "c.safetensors"
    save_file(tensors, path)
    header, _ = read_header(path)
    assert header["be"]["dtype"] == "I32" and header["transposed"]["shape"] == [6, 4]
    out = load_file(path)
    for k, v in tensors.items():
        np.testing.assert_array_equal(out[k], v)
        assert out[k].dtype.byteorder in ("<", "=", "|")


def test_numpy_scalar_is_saved_as_0d(tmp_path):
    save_file({"s": np.float32(2.5)}, tmp_path / "s.safetensors")
    out = load_file(tmp_path / "s.safetensors")
    assert out["s"].shape == () and out["s"] == np.float32(2.5)


def test_exact_bytes_of_a_tiny_file(tmp_path):
    """Pins the on-disk format: length prefix, compact JSON, space padding."""
    path = tmp_path / "tiny.safetensors"
    save_file({"a": np.array([1, 2], np.int8)}, path)
    header = b'{"a":{"dtype":"I8","shape":[2],"data_offsets":[0,2]}}'  # 53 bytes
    expected = b"\x38\x00\x00\x00\x00\x00\x00\x00" + header + b"   " + b"\x01\x02"
    assert path.read_bytes() == expected


def test_deterministic_bytes_and_aligned_buffer(tmp_path):
    rng = np.random.default_rng(1)
    t = {"b": rng.standard_normal(7).astype(np.float32), "a": rng.integers(0, 9, (2, 3)), "c": np.zeros(0)}
    p1, p2 = tmp_path / "1.st", tmp_path / "2.st"
    save_file(t, p1, metadata={"y": "1", "x": "2"})
    # different insertion order of both tensors and metadata
    save_file(dict(reversed(list(t.items()))), p2, metadata={"x": "2", "y": "1"})
    data = p1.read_bytes()
    assert data == p2.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    assert (8 + n) % 8 == 0
    header, _ = read_header(p1)
    assert list(header) == ["a", "b", "c"]  # laid out in sorted-name order
    ends = [header[k]["data_offsets"] for k in ("a", "b", "c")]
    assert ends[0][0] == 0 and ends[0][1] == ends[1][0] and ends[-1][1] == len(data) - 8 - n


def test_load_subset_and_missing_name(tmp_path):
    path = tmp_path / "s.st"
    save_file({"a": np.ones(2), "b": np.zeros(3, np.int32)}, path)
    for mmap in (False, True):
        out = load_file(path, names=["b"], mmap=mmap)
        assert list(out) == ["b"]
    with pytest.raises(SafetensorsError, match="no tensor named 'zz'"):
        load_file(path, names=["a", "zz"])
    with pytest.raises(TypeError):
        load_file(path, names="a")


def test_read_bf16_as_float32(tmp_path):
    vals = np.array([1.0, -2.5, 0.15625, 2.0**127, -0.0, np.inf], np.float32)  # exact in bf16
    bits = (vals.view(np.uint32) >> 16).astype("<u2")
    header = {"x": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}}
    path = _write(tmp_path / "bf.st", _raw_file(header, bits.tobytes()))
    for mmap in (False, True):
        out = load_file(path, mmap=mmap)["x"]
        assert out.dtype == np.float32 and out.shape == (2, 3)
        assert out.tobytes() == vals.reshape(2, 3).tobytes()


def test_reads_unpadded_header_and_gaps(tmp_path):
    """Other writers need not pad; gaps between tensors are tolerated."""
    buf = np.array([1.0, 2.0], "<f8").tobytes() + b"\xff" * 3 + np.array([7], "<i2").tobytes()
    header = {
        "a": {"dtype": "F64", "shape": [2], "data_offsets": [0, 16]},
        "b": {"dtype": "I16", "shape": [], "data_offsets": [19, 21]},
        "__metadata__": None,
    }
    path = _write(tmp_path / "g.st", _raw_file(header, buf))
    for mmap in (False, True):  # mmap=True: b sits at an unaligned offset
        out = load_file(path, mmap=mmap)
        np.testing.assert_array_equal(out["a"], [1.0, 2.0])
        assert out["b"] == 7


def test_empty_file_of_tensors(tmp_path):
    path = tmp_path / "e.st"
    save_file({}, path)
    assert load_file(path) == {} and load_file(path, mmap=True) == {}
    assert read_header(path) == ({}, {})


# --------------------------------------------------------------------------
# writer input validation
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tensors, err",
    [
        ({"c": np.zeros(2, np.complex64)}, TypeError),
        ({"o": np.array([object()])}, TypeError),
        ({"s": np.array(["x"])}, TypeError),
        ({"l": [1, 2, 3]}, TypeError),
        ({1: np.zeros(1)}, TypeError),
        ({"__metadata__": np.zeros(1)}, ValueError),
        ({"\ud800": np.zeros(1)}, ValueError),  # lone surrogate: not encodable
    ],
)
def test_save_rejects_bad_input(tmp_path, tensors, err):
    path = tmp_path / "bad.st"
    with pytest.raises(err):
        save_file(tensors, path)
    assert not path.exists() and _no_temp_files(tmp_path)


def test_save_rejects_bad_metadata(tmp_path):
    with pytest.raises(TypeError, match="str -> str"):
        save_file({"a": np.zeros(1)}, tmp_path / "m.st", metadata={"k": 1})


# --------------------------------------------------------------------------
# malformed files: each raises SafetensorsError naming file, tensor, problem
# --------------------------------------------------------------------------

GOOD = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
BUF16 = bytes(range(16))


def _entry(**kw):
    e = dict(GOOD["w"])
    e.update(kw)
    return {"w": e}


MALFORMED = {
    "empty file": (b"", "too short"),
    "7 bytes": (b"\x00" * 7, "too short"),
    "huge N": (struct.pack("<Q", 2**63) + b"{}", "exceeds"),
    "N past EOF": (struct.pack("<Q", 100) + b"{}", "past the end"),
    "N over 100MB": (struct.pack("<Q", 100 * 1024 * 1024 + 1) + b"{}", "exceeds"),
    "bad utf8": (_raw_file(None, header_bytes=b'{"\xff":1}'), "UTF-8"),
    "bad json": (_raw_file(None, header_bytes=b'{"w": '), "not valid JSON"),
    "deep json": (_raw_file(None, header_bytes=b"[" * 100000 + b"]" * 100000), "not valid JSON"),
    "huge int": (_raw_file(None, header_bytes=b'{"w":' + b"9" * 5000 + b"}"), "not valid JSON"),
    "not object": (_raw_file([1, 2]), "must be a JSON object"),
    "duplicate": (_raw_file(None, header_bytes=b'{"a":{},"a":{}}'), "duplicate key 'a'"),
    "entry not object": (_raw_file({"w": [1]}), "'w': entry must be an object"),
    "missing dtype": (_raw_file({"w": {"shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "missing 'dtype'"),
    "missing shape": (_raw_file({"w": {"dtype": "F32", "data_offsets": [0, 4]}}, b"\0" * 4), "missing 'shape'"),
    "missing offsets": (_raw_file({"w": {"dtype": "F32", "shape": [1]}}, b"\0" * 4), "missing 'data_offsets'"),
    "unknown dtype": (_raw_file(_entry(dtype="F8_E4M3"), BUF16), "unknown dtype"),
    "dtype not str": (_raw_file(_entry(dtype=4), BUF16), "unknown dtype"),
    "negative dim": (_raw_file(_entry(shape=[-2, -2]), BUF16), "invalid dimension -2"),
    "float dim": (_raw_file(_entry(shape=[2.0, 2]), BUF16), "invalid dimension 2.0"),
    "bool dim": (_raw_file(_entry(shape=[True, 4]), BUF16), "invalid dimension True"),
    "shape not list": (_raw_file(_entry(shape=4), BUF16), "shape must be a list"),
    "too many dims": (_raw_file(_entry(shape=[1] * 40), BUF16), "dimensions"),
    "zero-size huge shape": (
        _raw_file({"w": {"dtype": "F32", "shape": [0, 2**62, 2**62], "data_offsets": [0, 0]}}),
        "too large",
    ),
    "offsets wrong len": (_raw_file(_entry(data_offsets=[0]), BUF16), "[begin, end]"),
    "offsets not int": (_raw_file(_entry(data_offsets=[0, 16.0]), BUF16), "[begin, end]"),
    "offsets not list": (_raw_file(_entry(data_offsets="0,16"), BUF16), "[begin, end]"),
    "negative begin": (_raw_file(_entry(data_offsets=[-4, 12]), BUF16), "outside the data buffer"),
    "end < begin": (_raw_file(_entry(data_offsets=[16, 0]), BUF16), "outside the data buffer"),
    "end past buffer": (_raw_file(_entry(data_offsets=[4, 20]), BUF16), "outside the data buffer of 16 bytes"),
    "size mismatch": (_raw_file(_entry(data_offsets=[0, 12]), BUF16), "needs 16"),
    "shape overflow": (_raw_file(_entry(shape=[2**40, 2**40, 2**40]), BUF16), "needs"),
    "overlap": (
        _raw_file(
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            BUF16,
        ),
        "'a' [0, 8] and 'b' [4, 12] overlap",
    ),
    "metadata not object": (_raw_file({"__metadata__": ["x"]}), "'__metadata__' must be an object"),
    "metadata value not str": (_raw_file({"__metadata__": {"k": 1}}), "value for 'k' must be a string"),
    "bool byte 2": (
        _raw_file({"w": {"dtype": "BOOL", "shape": [3], "data_offsets": [0, 3]}}, b"\x01\x02\x00"),
        "not 0 or 1",
    ),
}


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("case", list(MALFORMED), ids=lambda c: c.replace(" ", "-"))
def test_malformed_files_raise_safetensors_error(tmp_path, case, mmap):
    data, needle = MALFORMED[case]
    path = _write(tmp_path / "bad.safetensors", data)
    with pytest.raises(SafetensorsError) as info:
        load_file(path, mmap=mmap)
    msg = str(info.value)
    assert str(path) in msg and needle in msg, msg
    assert isinstance(info.value, ValueError)


def test_errors_name_tensor_and_byte_offset(tmp_path):
    path = _write(tmp_path / "o.st", _raw_file(_entry(data_offsets=[0, 12]), BUF16))
    with pytest.raises(SafetensorsError, match=r"tensor 'w'.*byte offset \d+"):
        load_file(path)
    # header-only problems are found by read_header too
    with pytest.raises(SafetensorsError, match="tensor 'w'"):
        read_header(path)


def test_json_error_reports_file_byte_offset(tmp_path):
    hb = '{"é":1,'.encode()  # 'é' is 2 bytes: the char and byte offsets differ
    path = _write(tmp_path / "j.st", _raw_file(None, header_bytes=hb))
    with pytest.raises(SafetensorsError, match=rf"byte offset {8 + len(hb)}"):
        load_file(path)


def test_trailing_bytes_after_last_tensor_are_ignored(tmp_path):
    path = _write(tmp_path / "t.st", _raw_file(GOOD, BUF16 + b"junk"))
    assert load_file(path)["w"].shape == (2, 2)


# --------------------------------------------------------------------------
# fuzzing: anything goes in, only arrays or SafetensorsError come out
# --------------------------------------------------------------------------


def _valid_file_bytes() -> bytes:
    """A small valid file with every interesting feature, as bytes."""
    import tempfile

    tensors = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.array([True, False, True]),
        "c": np.arange(4, dtype=np.int64),
        "d": np.zeros((0, 3), np.float16),
        "e": np.array(1.5),
    }
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "v.st")
        save_file(tensors, p, metadata={"k": "v"})
        with open(p, "rb") as f:
            return f.read()


VALID = _valid_file_bytes()
VALID_N = struct.unpack("<Q", VALID[:8])[0]


@pytest.fixture(scope="module")
def fuzz_path(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "f.safetensors"


def _load_must_not_crash(path, data: bytes) -> None:
    path.write_bytes(data)
    for mmap in (False, True):
        try:
            out = load_file(path, mmap=mmap)
        except SafetensorsError:
            continue
        assert isinstance(out, dict)
        header, _ = read_header(path)  # consistent with load_file
        for name, arr in out.items():
            assert isinstance(arr, np.ndarray)
            assert list(arr.shape) == header[name]["shape"]


FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, VALID_N + 7), st.integers(0, 255)), min_size=1, max_size=8))
def test_fuzz_mutated_header_bytes(fuzz_path, edits):
    data = bytearray(VALID)
    for pos, byte in edits:
        data[pos] = byte
    _load_must_not_crash(fuzz_path, bytes(data))


@FUZZ
@given(cut=st.integers(0, len(VALID)))
def test_fuzz_truncated(fuzz_path, cut):
    _load_must_not_crash(fuzz_path, VALID[:cut])


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=20,
)
DIMS = st.integers(-3, 6) | st.sampled_from([0, 2**31, 2**63, 2**64 + 1]) | JSONISH
OFFSET = st.integers(-5, 80) | st.sampled_from([2**32, 2**63 - 1, 2**64]) | JSONISH
ENTRY = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(sorted(DTYPES) + ["F8", "", "f32"]) | JSONISH,
        "shape": st.lists(DIMS, max_size=4) | JSONISH,
        "data_offsets": st.lists(OFFSET, min_size=0, max_size=3) | JSONISH,
    },
)
HEADER = st.dictionaries(
    st.sampled_from(["a", "b", "c", "__metadata__", "é"]) | st.text(max_size=4),
    ENTRY | JSONISH | st.dictionaries(st.text(max_size=3), st.text(max_size=3) | JSONISH, max_size=3),
    max_size=4,
)


@FUZZ
@given(header=HEADER | JSONISH, buf=st.binary(max_size=96))
def test_fuzz_random_headers(fuzz_path, header, buf):
    try:
        hb = json.dumps(header).encode()  # may contain NaN/Infinity literals: also fuzz
    except (ValueError, RecursionError):
        return
    _load_must_not_crash(fuzz_path, _raw_file(None, buf, header_bytes=hb))


@FUZZ
@given(
    offsets=st.lists(st.tuples(st.integers(-4, 70), st.integers(-4, 70)), min_size=5, max_size=5),
    n_override=st.none() | st.integers(0, 2**64 - 1),
)
def test_fuzz_random_offsets_and_lengths(fuzz_path, offsets, n_override):
    header = json.loads(VALID[8 : 8 + VALID_N])
    for name, (b, e) in zip(["a", "b", "c", "d", "e"], offsets):
        header[name]["data_offsets"] = [b, e]
    hb = json.dumps(header).encode()
    data = _raw_file(None, VALID[8 + VALID_N :], header_bytes=hb)
    if n_override is not None:
        data = struct.pack("<Q", n_override) + data[8:]
    _load_must_not_crash(fuzz_path, data)


# --------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------


def test_failed_replace_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    save_file({"old": np.ones(3)}, path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk on fire")

    monkeypatch.setattr(fileio.os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        save_file({"new": np.zeros(1000)}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["w.safetensors"]


def test_failure_mid_write_keeps_old_file(tmp_path, monkeypatch):
    """The writer dies after writing part of the data (e.g. disk full)."""
    path = tmp_path / "w.safetensors"
    save_file({"old": np.ones(3)}, path)
    before = path.read_bytes()
    real_fsync = fileio.os.fsync

    def fsync_fails(fd):
        raise OSError("ENOSPC")

    monkeypatch.setattr(fileio.os, "fsync", fsync_fails)
    with pytest.raises(OSError, match="ENOSPC"):
        save_file({"new": np.zeros(1000)}, path)
    monkeypatch.setattr(fileio.os, "fsync", real_fsync)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["w.safetensors"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_open_exception_in_block(tmp_path, exc):
    path = tmp_path / "a.txt"
    fileio.atomic_write_text(path, "old\n")
    with pytest.raises(exc):
        with fileio.atomic_open(path, "wb") as f:
            f.write(b"half")
            raise exc()
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["a.txt"]


def test_atomic_write_helpers(tmp_path):
    fileio.atomic_write_bytes(tmp_path / "b", b"\x00\x01")
    fileio.atomic_write_text(tmp_path / "t", "héllo\r\nworld")
    fileio.atomic_write_json(tmp_path / "j.json", {"b": [1, 2], "a": "é"})
    assert (tmp_path / "b").read_bytes() == b"\x00\x01"
    assert (tmp_path / "t").read_bytes() == "héllo\r\nworld".encode()  # no newline translation
    assert json.loads((tmp_path / "j.json").read_text("utf-8")) == {"b": [1, 2], "a": "é"}
    # permissions follow the umask like a normal open(), not mkstemp's 0600
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o666 & ~fileio._UMASK
    with pytest.raises(TypeError):
        fileio.atomic_write_json(tmp_path / "j.json", {"x": object()})
    with pytest.raises(ValueError):
        fileio.atomic_write_json(tmp_path / "j.json", {"x": float("nan")})
    assert json.loads((tmp_path / "j.json").read_text("utf-8"))["a"] == "é"  # untouched
    with pytest.raises(ValueError):
        with fileio.atomic_open(tmp_path / "r", "rb"):
            pass
    assert _no_temp_files(tmp_path)


def test_atomic_directory_create_replace_and_fail(tmp_path):
    final = tmp_path / "ckpt"
    with fileio.atomic_directory(final) as d:
        assert os.path.dirname(d) == str(tmp_path) and not final.exists()
        save_file({"w": np.ones(2)}, os.path.join(d, "model.safetensors"))
        os.mkdir(os.path.join(d, "sub"))
        fileio.atomic_write_text(os.path.join(d, "sub", "x.txt"), "1")
    assert sorted(os.listdir(final)) == ["model.safetensors", "sub"]

    # replace an existing directory
    with fileio.atomic_directory(final) as d:
        fileio.atomic_write_text(os.path.join(d, "new.txt"), "2")
    assert os.listdir(final) == ["new.txt"]
    assert os.listdir(tmp_path) == ["ckpt"]  # the old one is gone, no leftovers

    # an exception while building leaves the old checkpoint intact
    with pytest.raises(RuntimeError):
        with fileio.atomic_directory(final) as d:
            fileio.atomic_write_text(os.path.join(d, "half.txt"), "3")
            raise RuntimeError("crash while saving")
    assert os.listdir(final) == ["new.txt"] and os.listdir(tmp_path) == ["ckpt"]


def test_atomic_directory_second_rename_fails_restores_old(tmp_path, monkeypatch):
    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "old.txt").write_text("old")
    real_rename = os.rename
    calls = []

    def flaky_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # old moved aside; moving the new one in fails
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(fileio.os, "rename", flaky_rename)
    with pytest.raises(OSError, match="rename failed"):
        with fileio.atomic_directory(final) as d:
            fileio.atomic_write_text(os.path.join(d, "new.txt"), "new")
    assert (final / "old.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["ckpt"]


def test_atomic_directory_refuses_to_replace_a_file(tmp_path):
    f = tmp_path / "out"
    f.write_text("not a dir")
    with pytest.raises(FileExistsError):
        with fileio.atomic_directory(f):
            pass
    assert f.read_text() == "not a dir" and os.listdir(tmp_path) == ["out"]


# --------------------------------------------------------------------------
# cross-check with the reference implementation, when installed (optional)
# --------------------------------------------------------------------------


def test_cross_check_with_reference_safetensors(tmp_path):
    st_numpy = pytest.importorskip("safetensors.numpy")
    tensors = {f"{np.dtype(d).name}": _sample(d, (3, 2), seed=3) for d in WRITABLE_DTYPES}
    tensors["scalar"] = np.array(2.0, np.float32)
    tensors["empty"] = np.zeros((0, 5), np.float32)
    ours = tmp_path / "ours.st"
    theirs = tmp_path / "theirs.st"
    save_file(tensors, ours, metadata={"k": "v"})
    st_numpy.save_file(tensors, str(theirs), metadata={"k": "v"})
    for a, b in ((st_numpy.load_file(str(ours)), tensors), (load_file(theirs), tensors)):
        assert set(a) == set(b)
        for k in b:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
            np.testing.assert_array_equal(a[k], b[k])


def test_same_bytes_as_reference_safetensors(tmp_path):
    """With one dtype (so the reference's alignment-first ordering is plain
    name order) and no metadata, both writers produce identical files."""
    st_numpy = pytest.importorskip("safetensors.numpy")
    tensors = {"b": np.ones((2, 3), np.float32), "a": np.arange(4, dtype=np.float32),
               "z": np.zeros((0, 2), np.float32), "s": np.array(1.0, np.float32)}
    save_file(tensors, tmp_path / "ours.st")
    st_numpy.save_file(tensors, str(tmp_path / "theirs.st"))
    assert (tmp_path / "ours.st").read_bytes() == (tmp_path / "theirs.st").read_bytes()


def test_reads_bf16_written_by_torch(tmp_path):
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    st_torch.save_file({"x": x, "y": torch.arange(6, dtype=torch.int64)}, str(tmp_path / "t.st"))
    out = load_file(tmp_path / "t.st")
    assert out["x"].dtype == np.float32
    np.testing.assert_array_equal(out["x"], x.float().numpy())
    np.testing.assert_array_equal(out["y"], np.arange(6))
