"""IDX files (the MNIST format, also Fashion-MNIST, KMNIST, EMNIST), raw or gzip-compressed.

An IDX file is a 4-byte magic number `00 00 TT NN` (TT the element type, 0x08 for unsigned
bytes; NN the number of dimensions), NN big-endian uint32 sizes, then the elements in C order.
Images are `0x00000803` (N, rows, cols), labels `0x00000801` (N,).

A folder of IDX files holds the four files of a train/test split; names are matched by suffix so
that `train-images-idx3-ubyte.gz`, `train-images.idx3-ubyte` and EMNIST's
`emnist-letters-train-images-idx3-ubyte.gz` are all found. EMNIST stores each image transposed
(column-major); files whose name starts with `emnist` are transposed back so digits stand upright.
"""

from __future__ import annotations

import gzip
import re
import struct
import zlib
from pathlib import Path

import numpy as np

from vaelab import perf
from vaelab.data.dataset import Dataset
from vaelab.errors import DataError, one_line

_GZIP_MAGIC = b"\x1f\x8b"
_UBYTE = 0x08
_TYPE_NAMES = {0x08: "unsigned byte", 0x09: "signed byte", 0x0B: "int16", 0x0C: "int32",
               0x0D: "float32", 0x0E: "float64"}
_KINDS = {"images": 3, "labels": 1}  # number of dimensions of each kind
_CHUNK = 1 << 20

# `[prefix-]{train|t10k|test}-{images|labels}-idx{3|1}-ubyte[.gz]`, '-' or '.' between parts.
_NAME = re.compile(
    r"^(?P<prefix>(?:.*[-_.])?)(?P<split>train|t10k|test)[-_.](?P<kind>images|labels)"
    r"[-_.]idx(?P<ndim>[13])[-_.]ubyte(?P<gz>\.gz)?$"
)
_ROLES = (("train", "images"), ("train", "labels"), ("test", "images"), ("test", "labels"))


def read_idx(path: str | Path, kind: str) -> np.ndarray:
    """Read one IDX file of unsigned bytes.

    Args:
        path: the file, raw or gzip-compressed (recognised by its content, not its name).
        kind: "images" (3 dimensions: N, rows, cols) or "labels" (1 dimension: N).
    Returns:
        uint8 array (N, rows, cols) in [0, 255] for images, (N,) for labels.
    Raises:
        DataError: one line naming the file: missing, bad magic number, an element type other
            than unsigned byte, a truncated or over-long body, a corrupt gzip stream.
    """
    path = Path(path)
    ndim = _KINDS[kind]
    compressed = False
    try:
        with open(path, "rb") as raw:
            compressed = raw.read(2) == _GZIP_MAGIC
            raw.seek(0)
            stream = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
            header = stream.read(4)
            _check_magic(path, header, kind, ndim)
            dims = struct.unpack(f">{ndim}I", _read_up_to(stream, 4 * ndim, path, "header"))
            expected = int(np.prod(dims, dtype=object))  # Python ints: no overflow on huge dims
            too_much = perf.beyond_memory(expected)  # (a few kB of gzip can declare and hold gigabytes)
            if too_much:
                declared = perf.size_text(expected)
                raise DataError(f"IDX file {path}: header declares {declared} of data, {too_much}")
            body = _read_up_to(stream, expected + 1, path, "body")  # +1 detects trailing bytes
    except FileNotFoundError as e:
        raise DataError(f"IDX file {path}: no such file") from e
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        what = "gzip stream is corrupt or truncated" if compressed else "cannot be read"
        raise DataError(f"IDX file {path}: {what} ({one_line(e)})") from e
    shape = "x".join(str(d) for d in dims)
    if len(body) < expected:
        raise DataError(
            f"IDX file {path}: truncated: header declares {shape} = {expected:,} data bytes "
            f"but only {len(body):,} follow{' (after decompression)' if compressed else ''}"
        )
    if len(body) > expected:
        raise DataError(
            f"IDX file {path}: more data than its header declares ({shape} = {expected:,} bytes); "
            "the file is corrupt or its header is wrong"
        )
    try:
        return np.frombuffer(body, dtype=np.uint8).reshape(dims)
    except ValueError:  # e.g. a zero size beside sizes whose product no array can hold
        raise DataError(f"IDX file {path}: header declares an impossible shape {shape}") from None


def is_idx_name(name: str) -> bool:
    """True if a file name is one of the four IDX names (any prefix, '-' or '.', .gz or not)."""
    match = _NAME.match(name.lower())
    return bool(match) and _KINDS[match["kind"]] == int(match["ndim"])


def find_idx_files(folder: str | Path) -> dict[tuple[str, str], Path]:
    """The IDX files of one data set in `folder`, keyed by (split, kind).

    Args:
        folder: a folder; files are matched by name (see the module docstring).
    Returns:
        {("train"|"test", "images"|"labels"): path} for the roles present; empty if the
        folder holds no IDX file. Where both a raw and a .gz copy exist, the raw one is used.
    Raises:
        DataError: the folder holds IDX files of more than one data set (different prefixes).
    """
    folder = Path(folder)
    sets: dict[str, dict[tuple[str, str], list[Path]]] = {}
    for path in sorted(folder.iterdir()):
        match = _NAME.match(path.name.lower())
        if not match or not path.is_file():
            continue
        if _KINDS[match["kind"]] != int(match["ndim"]):
            continue  # e.g. "train-labels-idx3-ubyte": not a name any publisher uses
        split = "train" if match["split"] == "train" else "test"  # t10k and test: the test split
        roles = sets.setdefault(match["prefix"].rstrip("-_."), {})
        roles.setdefault((split, match["kind"]), []).append(path)
    if len(sets) > 1:
        names = ", ".join(repr(p or "(no prefix)") for p in sorted(sets))
        raise DataError(
            f"IDX folder {folder}: holds several data sets ({names}); "
            "move one data set's four files into a folder of their own"
        )
    if not sets:
        return {}
    (roles,) = sets.values()
    # Raw before gzip: the same bytes, without decompressing.
    return {role: min(paths, key=lambda p: p.suffix == ".gz") for role, paths in roles.items()}


def load_idx_folder(folder: str | Path) -> Dataset:
    """Load the train and test images and labels from a folder of four IDX files.

    Args:
        folder: a folder with `train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`,
            `t10k-images-idx3-ubyte[.gz]` and `t10k-labels-idx1-ubyte[.gz]` (or a variant name).
    Returns:
        A Dataset named after the folder path: uint8 (N, rows, cols) images, int64 labels.
    Raises:
        DataError: a file is missing or bad, or images and labels differ in number.
    """
    folder = Path(folder)
    files = find_idx_files(folder)
    for split, kind in _ROLES:
        if (split, kind) not in files:
            stem = "train" if split == "train" else "t10k"
            raise DataError(
                f"IDX folder {folder}: missing {stem}-{kind}-idx{_KINDS[kind]}-ubyte[.gz] "
                f"({split} {kind})"
            )
    arrays = {}
    for split in ("train", "test"):
        images_path, labels_path = files[(split, "images")], files[(split, "labels")]
        images = read_idx(images_path, "images")
        labels = read_idx(labels_path, "labels")
        if len(images) != len(labels):
            raise DataError(
                f"IDX folder {folder}: {images_path.name} holds {len(images):,} images "
                f"but {labels_path.name} holds {len(labels):,} labels"
            )
        if images_path.name.lower().startswith("emnist"):
            images = np.ascontiguousarray(images.transpose(0, 2, 1))  # EMNIST is column-major
        arrays[f"x_{split}"], arrays[f"y_{split}"] = images, labels.astype(np.int64)
    return Dataset(name=str(folder), classes=None, **arrays)


def _check_magic(path: Path, header: bytes, kind: str, ndim: int) -> None:
    want = f"0x000008{ndim:02x} (unsigned-byte {kind}, {ndim} dimension{'s' * (ndim > 1)})"
    if len(header) < 4:
        raise DataError(
            f"IDX file {path}: too short for an IDX header ({len(header)} bytes); expected magic {want}"
        )
    found = "0x" + header.hex()
    if header[:2] != b"\0\0":
        raise DataError(f"IDX file {path}: bad magic number: expected {want}, found {found}")
    if header[2] != _UBYTE:
        type_name = _TYPE_NAMES.get(header[2], "unknown")
        raise DataError(
            f"IDX file {path}: element type code 0x{header[2]:02x} ({type_name}); "
            f"vaelab reads unsigned bytes (0x08): expected magic {want}, found {found}"
        )
    if header[3] != ndim:
        raise DataError(
            f"IDX file {path}: {header[3]} dimensions where {kind} have {ndim}: "
            f"expected magic {want}, found {found}"
        )


def _read_up_to(stream, n: int, path: Path, part: str) -> bytes:
    """Read at most n bytes in chunks, so a header declaring terabytes costs only what exists."""
    chunks, got = [], 0
    while got < n:
        chunk = stream.read(min(_CHUNK, n - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    data = b"".join(chunks)
    if part == "header" and len(data) < n:
        raise DataError(
            f"IDX file {path}: truncated header: {n} bytes of sizes expected, {len(data)} present"
        )
    return data
