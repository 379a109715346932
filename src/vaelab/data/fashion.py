"""Fashion-MNIST by name, as MNIST is: `--data fashion-mnist`, cached as uint8 .npz under
$VAELAB_HOME, with its class names ("Sneaker", not 7).

Sources, tried in order; the first that works fills the cache:
1. the cache, `$VAELAB_HOME/fashion-mnist.npz`, checked for shapes and label counts;
2. Debian's package `dataset-fashion-mnist`, which installs the original IDX files under
   /usr/share/datasets/fashion-mnist/ (`$VAELAB_FASHION_MNIST_DIR` names another such folder);
3. the canonical mirrors.
Every IDX file is checked against the SHA-256 of its *decompressed* bytes: Debian's package holds
the original files compressed anew, so their .gz files differ from the mirrors' while their
content is the same. Without any source: one line naming the Debian package.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vaelab.data import idx
from vaelab.data.dataset import Dataset
from vaelab.data.mnist import _download_url, _write_atomically, cache_dir
from vaelab.data.npz import numpy_load_reason
from vaelab.errors import DataError, one_line

NAME = "fashion-mnist"
CACHE_NAME = "fashion-mnist.npz"
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FOLDER_ENV = "VAELAB_FASHION_MNIST_DIR"
MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
# SHA-256 of each file's decompressed bytes (the same from Debian's package and the mirrors)
RAW_SHA256 = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
SHAPES = {"x_train": (60_000, 28, 28), "y_train": (60_000,), "x_test": (10_000, 28, 28), "y_test": (10_000,)}
PER_CLASS = {"y_train": 6000, "y_test": 1000}  # balanced: every class alike
HOW = (
    f"install Debian's package {DEBIAN_PACKAGE} (apt-get install {DEBIAN_PACKAGE}), or pass a folder "
    "of its IDX files with --data PATH"
)


def cache_path() -> Path:
    return cache_dir() / CACHE_NAME


def load_fashion_mnist(*, download: Callable[[str, Path], None] | None = None) -> Dataset:
    """Fashion-MNIST: train 60,000 / test 10,000 uint8 28 x 28 images, labels 0-9, class names.

    Raises:
        DataError: one line, naming the Debian package, when no source has it.
    """
    arrays = read_cache(cache_path()) if cache_path().exists() else _fetch_into(cache_path(), download)
    return Dataset(NAME, arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], CLASSES)


def fetch_fashion_mnist(*, download: Callable[[str, Path], None] | None = None) -> Path:
    """Fill the cache if needed (verifying what is there); returns its path."""
    path = cache_path()
    if path.exists():
        read_cache(path)
    else:
        _fetch_into(path, download)
    return path


def read_cache(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in SHAPES}
    except Exception as e:  # our own file unreadable: corrupt, whatever numpy says
        raise DataError(f"Fashion-MNIST cache {path} is corrupt ({numpy_load_reason(e)}); delete it") from e
    problem = _layout_problem(arrays)
    if problem:
        raise DataError(f"Fashion-MNIST cache {path} is corrupt ({problem}); delete it")
    return arrays


def _layout_problem(arrays: dict[str, np.ndarray]) -> str | None:
    for key, shape in SHAPES.items():
        arr = arrays[key]
        dtype_ok = arr.dtype == np.uint8 if key.startswith("x") else arr.dtype.kind in "iu"
        if arr.shape != shape or not dtype_ok:
            return f"{key} is {arr.dtype} {arr.shape}, expected {shape}"
    for key, per_class in PER_CLASS.items():
        if np.bincount(arrays[key], minlength=10).tolist() != [per_class] * 10:
            return f"{key} does not have Fashion-MNIST's label counts"
    return None


def _fetch_into(path: Path, download) -> dict[str, np.ndarray]:
    failures = []
    folder = Path(os.environ.get(FOLDER_ENV) or DEBIAN_DIR)
    try:
        arrays = _from_folder(folder, f"{folder}")
    except DataError as e:
        failures.append(str(e))
        try:
            arrays = _from_mirrors(download or _download_url)
        except DataError as e:
            failures.append(f"the mirrors: {e}")
            raise DataError(
                f"data 'fashion-mnist': not in the cache and no source has it ({failures[0]}); {HOW}"
            ) from None
    problem = _layout_problem(arrays)
    if problem:
        raise DataError(f"Fashion-MNIST: the data found does not look like Fashion-MNIST ({problem})")
    _write_atomically(path, arrays, "Fashion-MNIST")
    return arrays


def _from_folder(folder: Path, where: str) -> dict[str, np.ndarray]:
    """The four IDX files of a folder, each checked by the SHA-256 of its decompressed bytes."""
    missing = [name for name in RAW_SHA256 if not (folder / name).is_file()]
    if missing:
        why = "no such folder" if not folder.is_dir() else f"no {missing[0]}"
        raise DataError(f"{where}: {why}")
    for name, sha256 in RAW_SHA256.items():
        _verify_raw(folder / name, sha256)
    return {
        "x_train": idx.read_idx(folder / "train-images-idx3-ubyte.gz", "images"),
        "y_train": idx.read_idx(folder / "train-labels-idx1-ubyte.gz", "labels").astype(np.int64),
        "x_test": idx.read_idx(folder / "t10k-images-idx3-ubyte.gz", "images"),
        "y_test": idx.read_idx(folder / "t10k-labels-idx1-ubyte.gz", "labels").astype(np.int64),
    }


def _verify_raw(path: Path, sha256: str) -> None:
    digest = hashlib.sha256()
    try:
        with gzip.open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable gzip file ({one_line(e)})") from None
    if digest.hexdigest() != sha256:
        raise DataError(f"{path}: its content's SHA-256 is not Fashion-MNIST's (a different or damaged file)")


def _from_mirrors(download: Callable[[str, Path], None]) -> dict[str, np.ndarray]:
    if not MIRRORS:
        raise DataError("none configured")
    with tempfile.TemporaryDirectory(prefix="vaelab-fashion-") as tmp:
        folder = Path(tmp)
        for name in RAW_SHA256:
            reasons = []
            for mirror in MIRRORS:
                try:
                    download(mirror + name, folder / name)
                    _verify_raw(folder / name, RAW_SHA256[name])
                    break
                except (DataError, OSError, ValueError, http.client.HTTPException) as e:
                    reasons.append(f"{mirror}{name}: {one_line(e)}")
                    with contextlib.suppress(OSError):
                        (folder / name).unlink()
            else:
                raise DataError(reasons[-1])
        return _from_folder(folder, "the downloaded files")
