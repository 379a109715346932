"""One entry point for every data source: a dataset name, an .npz file or a folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from vaelab.config import MAX_IMAGE_SIZE
from vaelab.data import dsprites, fashion, folder, idx, mnist, npz
from vaelab.data.dataset import Dataset
from vaelab.errors import DataError

NAMES = ("mnist", "fashion-mnist", "dsprites")


def load(name_or_path: str | Path, *, image_size: int | None = None,
         channels: int | None = None) -> Dataset:
    """Load a data set by name or path.

    Args:
        name_or_path: "mnist", "fashion-mnist" or "dsprites" (any case; fetched or generated and
            cached on first use), or a path: an .npz
            file (Keras' mnist.npz layout), a folder of IDX files, or a folder of images. A local
            folder called "mnist" is reached as "./mnist".
        image_size: resize images to this square size (any source); None keeps the size (image
            folders then need all images the same size).
        channels: 1 (grey) or 3 (colour), converting if needed; None keeps what the data has.
    Returns:
        A Dataset: uint8 (N, H, W) or (N, C, H, W) images, int64 labels when known.
    Raises:
        DataError: one line naming the source and what is wrong.

    Example:
        >>> ds = load("mnist")
        >>> ds.x_train.shape, ds.x_train.dtype
        ((60000, 28, 28), dtype('uint8'))
    """
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or not 1 <= image_size <= MAX_IMAGE_SIZE):
        raise DataError(
            f"data '{name_or_path}': image_size must be a whole number in [1, {MAX_IMAGE_SIZE}], "
            f"got {image_size!r}"
        )
    if channels not in (None, 1, 3):
        raise DataError(f"data '{name_or_path}': channels must be 1 or 3, got {channels!r}")
    named = name_or_path.strip().lower() if isinstance(name_or_path, str) else None
    if named == "mnist":
        return _conform(mnist.load_mnist(), image_size, channels)
    if named == "fashion-mnist":
        return _conform(fashion.load_fashion_mnist(), image_size, channels)
    if named == "dsprites":
        return _conform(dsprites.load_dsprites(), image_size, channels)
    path = Path(name_or_path).expanduser()
    try:
        ds = _load_path(name_or_path, path, image_size, channels)
    except OSError as e:  # a folder that cannot be listed, a file that cannot be opened
        reason = e.strerror or " ".join(str(e).split()) or type(e).__name__
        where = f" {e.filename}" if e.filename and str(e.filename) != str(name_or_path) else ""
        raise DataError(f"data '{name_or_path}':{where} cannot be read ({reason})") from None
    if ds.x_train.ndim == 4 and ds.x_train.shape[1] not in (3, 4):  # grey is (N, H, W) by now
        raise DataError(
            f"data '{name_or_path}': images of shape {ds.x_train.shape[1:]} have {ds.x_train.shape[1]} "
            "channels; vaelab takes grey (N, H, W), colour (N, 3, H, W) or RGBA (N, 4, H, W) images "
            "(--channels 1 or 3 converts)"
        )
    return ds


def _load_path(name_or_path: str | Path, path: Path, image_size: int | None,
               channels: int | None) -> Dataset:
    """`load` for a path: an .npz file, a folder of IDX files or a folder of images."""
    if not path.exists():
        raise DataError(
            f"data '{name_or_path}': not a known dataset name ({', '.join(NAMES)}) "
            "and no such file or folder"
        )
    if path.is_file():
        if path.suffix.lower() == ".npz":
            return _conform(npz.load_npz(path), image_size, channels)
        if idx.is_idx_name(path.name):
            raise DataError(
                f"data '{name_or_path}': one IDX file; pass the folder that holds all four "
                f"({path.parent})"
            )
        raise DataError(
            f"data '{name_or_path}': a file that is not an .npz; expected an .npz file, "
            "a folder of IDX files, or a folder of images"
        )
    if not path.is_dir():
        raise DataError(f"data '{name_or_path}': neither a file nor a folder")
    if not any(p for p in path.iterdir() if not p.name.startswith(".")):
        raise DataError(
            f"data '{name_or_path}': empty folder; expected IDX files, or images (flat, one "
            "subfolder per class, or train/ and test/)"
        )
    if idx.find_idx_files(path):
        return _conform(idx.load_idx_folder(path), image_size, channels)
    return folder.load_image_folder(path, image_size=image_size, channels=channels)


def fetch(name: str) -> Path:
    """Download and verify a named data set into the cache ($VAELAB_HOME, default ~/.cache/vaelab).

    Args:
        name: "mnist", "fashion-mnist" (from Debian's package dataset-fashion-mnist or the mirrors)
            or "dsprites" (generated), any case.
    Returns:
        The path of the cache file.
    Raises:
        DataError: an unknown name, a corrupt cache, or every source failed.
    """
    named = name.strip().lower()
    if named == "mnist":
        return mnist.fetch_mnist()
    if named == "fashion-mnist":
        return fashion.fetch_fashion_mnist()
    if named == "dsprites":
        return dsprites.fetch_dsprites()
    raise DataError(
        f"data fetch '{name}': not a data set that can be fetched ({', '.join(NAMES)}); "
        "files and folders are read where they are"
    )


def info(dataset: Dataset) -> dict:
    """A JSON-ready summary of a data set.

    Args:
        dataset: any Dataset.
    Returns:
        {"name", "train", "test" (image counts), "image_shape", "dtype", "min", "max" (pixel values
        over both splits), "num_classes", "classes", "train_label_counts", "test_label_counts"}; the
        label counts map class name (or label) to count, None for unlabelled data.
    """

    def counts(y: np.ndarray | None) -> dict[str, int] | None:
        if y is None:
            return None
        values, n = np.unique(y, return_counts=True)
        found = dict(zip(values.tolist(), n.tolist(), strict=True))
        if dataset.classes is not None:
            return {name: found.get(i, 0) for i, name in enumerate(dataset.classes)}
        return {str(v): c for v, c in found.items()}

    x_train, x_test = dataset.x_train, dataset.x_test
    return {
        "name": dataset.name,
        "train": len(x_train),
        "test": len(x_test),
        "image_shape": list(dataset.image_shape),
        "dtype": str(x_train.dtype),
        "min": int(min(x_train.min(), x_test.min())),
        "max": int(max(x_train.max(), x_test.max())),
        "num_classes": dataset.num_classes,
        "classes": list(dataset.classes) if dataset.classes is not None else None,
        "train_label_counts": counts(dataset.y_train),
        "test_label_counts": counts(dataset.y_test),
    }


def _conform(ds: Dataset, image_size: int | None, channels: int | None) -> Dataset:
    """Resize and convert channels of an array source, as image folders do on reading."""
    x_train, x_test = ds.x_train, ds.x_test
    if channels is not None:
        x_train, x_test = _channels(x_train, channels), _channels(x_test, channels)
    if image_size is not None:
        x_train, x_test = _resize(x_train, image_size), _resize(x_test, image_size)
    if x_train is ds.x_train and x_test is ds.x_test:
        return ds
    return dataclasses.replace(ds, x_train=x_train, x_test=x_test)  # labels, classes, factors kept


def _channels(x: np.ndarray, channels: int) -> np.ndarray:
    """uint8 (N, H, W) | (N, C, H, W) -> (N, H, W) for 1 channel, (N, 3, H, W) for 3."""
    c = 1 if x.ndim == 3 else x.shape[1]
    if c == channels:
        return x if channels == 3 or x.ndim == 3 else x[:, 0]
    if channels == 3:
        grey = x if x.ndim == 3 else x[:, 0]
        if c in (1, 2):  # grey (+ alpha)
            return np.repeat(grey[:, None], 3, axis=1)
        return np.ascontiguousarray(x[:, :3])  # RGBA -> RGB: alpha dropped, as for image files
    if c in (1, 2):
        return x if x.ndim == 3 else x[:, 0]
    rgb = x[:, :3].astype(np.uint32)
    # ITU-R 601-2 luma, the weights Pillow's convert("L") uses, rounded as Pillow does.
    luma = (rgb[:, 0] * 19595 + rgb[:, 1] * 38470 + rgb[:, 2] * 7471 + 0x8000) >> 16
    return luma.astype(np.uint8)


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    """Bilinear (antialiased) resize of every channel plane to size x size, with Pillow."""
    from PIL import Image

    if x.shape[-2:] == (size, size):
        return x
    planes = x.reshape(-1, *x.shape[-2:])  # (N*C, H, W)
    out = np.stack([
        np.asarray(Image.fromarray(p).resize((size, size), Image.Resampling.BILINEAR))
        for p in planes
    ])
    return out.reshape(*x.shape[:-2], size, size)
