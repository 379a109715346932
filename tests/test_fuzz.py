"""Fuzzing the IDX and .npz readers: any bytes either load or raise vaelab's DataError.

Inputs are valid files, then mutated the way real files go wrong (cut short, bytes flipped,
header fields rewritten, junk appended, gzip or zip wrappers damaged), plus plain random
bytes. Whatever the input, the reader returns well-formed arrays or a one-line `DataError` that
names the file; never a numpy, zip, gzip or struct exception, never a hang. Untouched valid
files must load and give back exactly what was written (the oracle for the "loads" side).
"""

from __future__ import annotations

import gzip
import io
import math
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vaelab.data import DataError, Dataset
from vaelab.data import load as load_data
from vaelab.data.idx import read_idx

# 1,000 + 200 IDX files and 1,000 + 200 .npz archives per run (2,400 inputs, each read by the
# reader and, where it is the whole path, by `vaelab.data.load`); VAELAB_FUZZ_EXAMPLES=20000 for
# a long hunt.
FUZZ = settings(
    max_examples=int(os.environ.get("VAELAB_FUZZ_EXAMPLES", 1000)),
    deadline=None,  # a loaded, shared machine: time limits would only make it flaky
    database=None,  # no .hypothesis/ folder in the checkout
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# --- mutations shared by both formats ------------------------------------------------------


@st.composite
def mutated(draw, data: bytes, header_size: int) -> tuple[bytes, bool]:
    """`data` with 0-3 mutations; header bytes are hit more often. Returns (bytes, untouched)."""
    out = bytearray(data)
    count = draw(st.integers(0, 3))
    for _ in range(count):
        op = draw(st.sampled_from(["truncate", "flip", "header", "append", "delete"]))
        if op == "truncate":
            out = out[: draw(st.integers(0, max(len(out) - 1, 0)))]
        elif op == "flip" and out:
            i = draw(st.integers(0, len(out) - 1))
            out[i] ^= draw(st.integers(1, 255))
        elif op == "header" and out:
            i = draw(st.integers(0, min(header_size, len(out)) - 1))
            out[i] = draw(st.integers(0, 255))
        elif op == "append":
            out += draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and out:
            i = draw(st.integers(0, len(out) - 1))
            del out[i : i + draw(st.integers(1, 8))]
    return bytes(out), count == 0


def one_line_naming(error: DataError, *names: str) -> None:
    message = str(error)
    assert "\n" not in message, message
    assert any(name in message for name in names), (names, message)


# --- IDX -----------------------------------------------------------------------------------


def idx_header(type_code: int, dims: list[int]) -> bytes:
    return bytes([0, 0, type_code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


@st.composite
def idx_files(draw):
    """(kind, file bytes, the array it must load as or None)."""
    kind = draw(st.sampled_from(["images", "labels"]))
    if draw(st.integers(0, 9)) == 0:  # plain random bytes, sometimes behind a gzip magic
        junk = draw(st.binary(max_size=64))
        return kind, (b"\x1f\x8b" + junk) if draw(st.booleans()) else junk, None
    dims = (
        draw(st.lists(st.integers(0, 5), min_size=3, max_size=3))
        if kind == "images" else [draw(st.integers(0, 40))]
    )
    if draw(st.integers(0, 4)) == 0:  # a header field rewritten to any 32-bit size
        dims[draw(st.integers(0, len(dims) - 1))] = draw(
            st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([2**31, 2**32 - 1, 65536])))
    size = math.prod(dims)
    # The body's values do not matter to the parser; drawing them byte by byte would be slow.
    body = np.random.default_rng(draw(st.integers(0, 2**16))).bytes(min(size, 200))
    header = idx_header(draw(st.sampled_from([0x08] * 6 + [0x09, 0x0B, 0x0D, 0x00])), dims)
    data, untouched = draw(mutated(header + body, len(header)))
    if draw(st.booleans()):
        data = gzip.compress(data, compresslevel=1, mtime=0)
        if draw(st.booleans()):  # damage the compressed stream too
            data, gz_untouched = draw(mutated(data, 10))
            untouched = untouched and gz_untouched
    valid = untouched and header[2] == 0x08 and size <= 200
    expected = np.frombuffer(body, np.uint8).reshape(dims) if valid else None
    return kind, data, expected


@FUZZ
@given(idx_files())
def test_idx_reader_loads_or_raises_data_error(work, case):
    kind, data, expected = case
    path = work / ("train-images-idx3-ubyte" if kind == "images" else "train-labels-idx1-ubyte")
    path.write_bytes(data)
    try:
        array = read_idx(path, kind)
    except DataError as e:
        assert expected is None, f"a valid file was refused: {e}"
        one_line_naming(e, str(path))
        return
    assert array.dtype == np.uint8 and array.ndim == (3 if kind == "images" else 1)
    if expected is not None:
        np.testing.assert_array_equal(array, expected)


def _valid_idx_folder(folder: Path) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(exist_ok=True)
    for name, shape in [("train-images-idx3-ubyte", (3, 4, 4)), ("train-labels-idx1-ubyte", (3,)),
                        ("t10k-images-idx3-ubyte", (2, 4, 4)), ("t10k-labels-idx1-ubyte", (2,))]:
        body = rng.integers(0, 10, shape, np.uint8).tobytes()
        (folder / name).write_bytes(idx_header(8, list(shape)) + body)


@pytest.fixture(scope="module")
def idx_folder(work) -> Path:
    folder = work / "idx-folder"
    _valid_idx_folder(folder)
    return folder


@settings(FUZZ, max_examples=max(FUZZ.max_examples // 5, 1))
@given(st.sampled_from(["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]), st.data())
def test_idx_folder_loads_or_raises_data_error(idx_folder, name, data):
    """The whole path a user takes (`vaelab.data.load(folder)`), one of four files damaged."""
    original = (idx_folder / name).read_bytes()
    damaged, untouched = data.draw(mutated(original, 16))
    (idx_folder / name).write_bytes(damaged)
    try:
        dataset = load_data(idx_folder)
    except DataError as e:
        assert not untouched, e
        one_line_naming(e, str(idx_folder))
        return
    finally:
        (idx_folder / name).write_bytes(original)
    assert isinstance(dataset, Dataset) and dataset.x_train.dtype == np.uint8
    assert len(dataset.x_train) == len(dataset.y_train) and len(dataset.x_test) == len(dataset.y_test)


# --- .npz ----------------------------------------------------------------------------------

DTYPES = [np.uint8, np.uint8, np.uint8, np.int8, np.int16, np.uint16, np.int64, np.float16, np.float32,
          np.float64, np.bool_, np.complex64, np.dtype("U1"), np.dtype("S2"), np.dtype("M8[s]")]
KEYS = ["x_train", "y_train", "x_test", "y_test"]


SPECIAL = np.array([np.nan, np.inf, -np.inf, -1, 0, 0.5, 1, 255, 256, 2**31, 1e30, -1e30])


@st.composite
def any_array(draw) -> np.ndarray:
    """Any dtype and shape (0-4 dimensions of 0-4), values from pixels to NaN and 1e30.

    Hypothesis picks the dtype, shape and kind of values; a seeded generator fills them in
    (drawing every element through Hypothesis is slow and buys nothing here).
    """
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=4)))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if dtype.kind in "USM":
        return np.zeros(shape, dtype)
    values = {
        "pixels": lambda: rng.integers(0, 256, shape),
        "unit": lambda: rng.random(shape),
        "labels": lambda: rng.integers(-1, 10, shape),
        "special": lambda: rng.choice(SPECIAL, shape),
    }[draw(st.sampled_from(["pixels", "unit", "labels", "special"]))]()
    with np.errstate(invalid="ignore", over="ignore"):
        return np.asarray(values).astype(dtype)


@st.composite
def valid_arrays(draw) -> dict[str, np.ndarray]:
    """A Keras-layout data set that must load: uint8 (N, H, W) images and matching labels."""
    h, w = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    arrays = {}
    for split in ("train", "test"):
        n = draw(st.integers(1, 4))
        arrays[f"x_{split}"] = rng.integers(0, 256, (n, h, w), dtype=np.uint8)
        arrays[f"y_{split}"] = rng.integers(0, 10, n).astype(np.int64)
    return arrays


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@st.composite
def npz_files(draw):
    """(file bytes, the arrays it must load as or None)."""
    if draw(st.integers(0, 9)) == 0:
        junk = draw(st.binary(max_size=96))
        return (b"PK\x03\x04" + junk) if draw(st.booleans()) else junk, None
    valid = draw(st.booleans())
    if valid:
        arrays = draw(valid_arrays())
    else:  # any subset of the keys, any dtype and shape, values including NaN and infinities
        keys = draw(st.lists(st.sampled_from([*KEYS, "extra"]), unique=True, max_size=5))
        arrays = {key: draw(any_array()) for key in keys}
    untouched = True
    members = {}
    for key, array in arrays.items():
        member = npy_bytes(array)
        if draw(st.integers(0, 3)) == 0:  # damage one .npy inside the archive (its header mostly)
            member, member_untouched = draw(mutated(member, 128))
            untouched = untouched and member_untouched
        members[f"{key}.npy"] = member
    compression = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, member in members.items():
            archive.writestr(zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0)), member, compression)
    data = buffer.getvalue()
    if draw(st.integers(0, 2)) == 0:  # damage the archive itself
        data, zip_untouched = draw(mutated(data, 64))
        untouched = untouched and zip_untouched
    return data, arrays if valid and untouched else None


def check_npz(path: Path, data: bytes, expected) -> None:
    path.write_bytes(data)
    try:
        dataset = load_data(path)  # the user's path: .npz reader, then Dataset's checks
    except DataError as e:
        assert expected is None, f"a valid file was refused: {e}"
        one_line_naming(e, str(path))
    else:
        assert isinstance(dataset, Dataset)
        for split in ("train", "test"):
            x, y = getattr(dataset, f"x_{split}"), getattr(dataset, f"y_{split}")
            assert x.dtype == np.uint8 and x.ndim in (3, 4) and len(x) > 0
            assert y is None or (y.dtype == np.int64 and len(y) == len(x) and (y >= 0).all())
            if expected is not None:
                np.testing.assert_array_equal(x, expected[f"x_{split}"])
                np.testing.assert_array_equal(y, expected[f"y_{split}"])


@FUZZ
@given(npz_files())
def test_npz_reader_loads_or_raises_data_error(work, case):
    data, expected = case
    check_npz(work / "fuzz.npz", data, expected)


@settings(FUZZ, max_examples=max(FUZZ.max_examples // 5, 1))
@given(st.dictionaries(st.sampled_from(KEYS), any_array(), min_size=2))
def test_npz_reader_on_arbitrary_arrays(work, arrays):
    """Undamaged archives of any dtype, shape and values (NaN, inf, negatives, huge)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    check_npz(work / "arrays.npz", buffer.getvalue(), None)
