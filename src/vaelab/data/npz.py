"""`.npz` archives in the layout of Keras' `mnist.npz`: `x_train, y_train, x_test, y_test`.

Always read with `allow_pickle=False`: an .npz can carry pickled objects, and unpickling runs code.
`x_train` and `x_test` are required, the labels optional. Images may be
- uint8: used as they are;
- other integers: values must lie in [0, 255];
- floats: in [0, 1] they are scaled by 255 and rounded; otherwise they must be whole numbers in
  [0, 255] (NaN and infinities are refused);
- bool: False -> 0, True -> 255.
Shapes (N, H, W) and (N, C, H, W) are accepted; (N, H, W, C) with C in {1, 3, 4} is recognised
(channels last, as Keras stores CIFAR) and transposed; a single channel is squeezed to (N, H, W).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vaelab import perf
from vaelab.data.dataset import Dataset
from vaelab.errors import DataError, one_line

IMAGE_KEYS = ("x_train", "x_test")
LABEL_KEYS = ("y_train", "y_test")
MAX_LABEL = 2**31 - 1  # class indices; anything larger is a corrupt or misread array
_CHANNELS = (1, 3, 4)


def load_npz(path: str | Path) -> Dataset:
    """Load train and test images (and labels, if present) from an .npz file.

    Args:
        path: an .npz with arrays `x_train`, `x_test` and optionally `y_train`, `y_test`.
    Returns:
        A Dataset named after the path: uint8 (N, H, W) or (N, C, H, W) images, int64 labels.
    Raises:
        DataError: one line naming the file and the key: unreadable archive, missing key,
            non-numeric dtype, wrong number of dimensions, NaN or infinite values, values out of
            range, labels that are not whole non-negative numbers or differ in number from the
            images.
    """
    path = Path(path)
    arrays = _read_arrays(path)
    x = {key: _to_uint8(path, key, _image_layout(path, key, arrays[key])) for key in IMAGE_KEYS}
    y = {}
    for key, image_key in zip(LABEL_KEYS, IMAGE_KEYS, strict=True):
        y[key] = None if key not in arrays else _labels(path, key, arrays[key], len(x[image_key]))
    return Dataset(name=str(path), classes=None, **x, **y)


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError as e:
        raise DataError(f"npz file {path}: no such file") from e
    except IsADirectoryError as e:
        raise DataError(f"npz file {path}: is a folder, not a file") from e
    # Anything np.load raises on foreign bytes (zip, format, pickle refusal) means "not an
    # .npz we can read"; it is turned into one line here instead of a traceback from numpy.
    except Exception as e:
        raise DataError(f"npz file {path}: not a readable .npz archive ({numpy_load_reason(e)})") from e
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(
            f"npz file {path}: holds a single array (an .npy file); expected an .npz archive "
            "with x_train and x_test (np.savez(path, x_train=..., x_test=...))"
        )
    with loaded:
        missing = [key for key in IMAGE_KEYS if key not in loaded.files]
        if missing:
            present = ", ".join(loaded.files) or "none"
            raise DataError(
                f"npz file {path}: missing key {', '.join(map(repr, missing))} (keys present: {present})"
            )
        arrays = {}
        for key in (*IMAGE_KEYS, *[k for k in LABEL_KEYS if k in loaded.files]):
            _refuse_beyond_memory(path, key, loaded)
            try:
                arrays[key] = loaded[key]
            except Exception as e:  # a corrupt member: same reasoning as above
                raise DataError(f"npz file {path}: key '{key}' cannot be read ({one_line(e)})") from e
            if not isinstance(arrays[key], np.ndarray):  # numpy hands back a non-.npy member's bytes
                raise DataError(f"npz file {path}: key '{key}' is not a .npy array (no NumPy header)")
    return arrays


def _refuse_beyond_memory(path: Path, key: str, loaded: np.lib.npyio.NpzFile) -> None:
    """Refuse a member that would not fit in memory once decompressed (a few kB of zip can
    declare gigabytes of zeros), before numpy reads it, rather than be killed for memory."""
    try:
        size = loaded.zip.getinfo(f"{key}.npy").file_size  # the uncompressed size in the zip
    except (KeyError, AttributeError):  # (a member named without .npy: numpy's read reports it)
        return
    too_much = perf.beyond_memory(size)
    if too_much:
        held = perf.size_text(size)
        raise DataError(f"npz file {path}: key '{key}' holds {held} once decompressed, {too_much}")


def _image_layout(path: Path, key: str, arr: np.ndarray) -> np.ndarray:
    """Check dtype and shape; return (N, H, W) or (N, C, H, W)."""
    if arr.dtype.kind not in "biuf":
        raise DataError(f"npz file {path}: key '{key}' has dtype {arr.dtype}, not a real number type")
    if arr.ndim not in (3, 4):
        raise DataError(
            f"npz file {path}: key '{key}' has shape {arr.shape}, expected (N, H, W) or (N, C, H, W)"
        )
    if arr.size == 0:
        raise DataError(f"npz file {path}: key '{key}' is empty (shape {arr.shape})")
    if arr.ndim == 4 and arr.shape[1] not in _CHANNELS and arr.shape[3] in _CHANNELS:
        arr = arr.transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]  # grey is (N, H, W) everywhere in vaelab
    return arr


def _to_uint8(path: Path, key: str, arr: np.ndarray) -> np.ndarray:
    """(N, ...) of any accepted dtype -> uint8 in [0, 255]."""
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype.kind == "b":
        return arr.astype(np.uint8) * np.uint8(255)
    if arr.dtype.kind == "f":
        finite = np.isfinite(arr)
        if not finite.all():
            nan = int(np.isnan(arr).sum())
            raise DataError(
                f"npz file {path}: key '{key}' holds {nan:,} NaN and "
                f"{int((~finite).sum()) - nan:,} infinite values"
            )
    low, high = arr.min(), arr.max()
    if arr.dtype.kind == "f" and low >= 0 and high <= 1:
        wide = arr if arr.dtype.itemsize >= 4 else arr.astype(np.float32)  # float16 is too coarse
        return np.rint(wide * wide.dtype.type(255)).astype(np.uint8)
    if low < 0 or high > 255:
        raise DataError(
            f"npz file {path}: key '{key}' has values in [{low:g}, {high:g}]; "
            "expected [0, 1] (floats) or [0, 255]"
        )
    if arr.dtype.kind == "f" and not np.array_equal(arr, np.rint(arr)):
        raise DataError(
            f"npz file {path}: key '{key}' has values in [{low:g}, {high:g}] that are not whole "
            "numbers; expected floats in [0, 1] or whole numbers in [0, 255]"
        )
    return arr.astype(np.uint8)


def _labels(path: Path, key: str, arr: np.ndarray, count: int) -> np.ndarray:
    """Labels (N,) or (N, 1) of whole non-negative numbers -> int64 (N,)."""
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]  # Keras' CIFAR stores labels as (N, 1)
    if arr.ndim != 1:
        raise DataError(f"npz file {path}: key '{key}' has shape {arr.shape}, expected (N,)")
    if arr.dtype.kind not in "iuf":
        raise DataError(f"npz file {path}: key '{key}' has dtype {arr.dtype}, expected integers")
    image_key = "x" + key[1:]
    if len(arr) != count:
        raise DataError(
            f"npz file {path}: key '{key}' has {len(arr):,} labels but '{image_key}' has "
            f"{count:,} images"
        )
    if len(arr) == 0:
        return arr.astype(np.int64)
    if arr.dtype.kind == "f" and not (np.isfinite(arr).all() and np.array_equal(arr, np.rint(arr))):
        raise DataError(f"npz file {path}: key '{key}' holds labels that are not whole numbers")
    if arr.min() < 0 or arr.max() > MAX_LABEL:
        raise DataError(
            f"npz file {path}: key '{key}' holds labels in [{arr.min():g}, {arr.max():g}]; "
            f"labels must be whole numbers in [0, {MAX_LABEL}]"
        )
    return arr.astype(np.int64)


def numpy_load_reason(e: BaseException) -> str:
    """np.load's complaint in one line, without its advice to load a pickle unsafely."""
    return one_line(e).split(" If you trust the file")[0]
