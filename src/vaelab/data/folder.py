"""A folder of images (PNG, JPEG, BMP, GIF, WEBP, read with Pillow) as a Dataset.

Layouts, checked in this order:
1. `train/` and `test/` subfolders, each either with one subfolder per class or flat;
2. one subfolder per class (`cat/*.png`, `dog/*.png`);
3. flat: images directly in the folder (no labels).
Class names are the subfolder names, sorted; label i is `classes[i]`. Subfolders without
images, hidden files and folders (name starting with '.') and files of other kinds are ignored.
A folder holding both images and class subfolders is refused as ambiguous.

Without `train/` and `test/`, the images are split deterministically: the files, sorted by their
path relative to the folder, are shuffled with `numpy.random.default_rng(SPLIT_SEED)` (seed 0)
and the first 10% (at least 1) become the test set; both sets keep sorted path order. The split
therefore depends only on the set of file names: adding or removing a file may reshuffle it.

Channels: `channels=1` converts to grey (Pillow "L"; 16-bit grey is scaled down to 8 bits),
`channels=3` to RGB; by default 1 if every image is greyscale (Pillow modes "1", "L", "LA",
"I", "I;16"..., and palette images, a GIF's, whose palette holds only greys), else 3. An alpha
channel is dropped. GIFs give their first frame; EXIF orientation is applied (photos stand
upright).
Size: `image_size=S` resizes every image to S x S (bilinear, antialiased; the aspect ratio is
not kept); by default all images must already have the same size.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vaelab import perf
from vaelab.data.dataset import Dataset
from vaelab.errors import DataError, one_line

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
SPLIT_SEED = 0
TEST_FRACTION = 0.1
_GREY_MODES = {"1", "L", "LA", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
_ORIENTATION = 0x0112  # EXIF tag; values 5-8 rotate by 90 degrees


@dataclass(frozen=True)
class _Entry:
    path: Path
    label: str | None  # class name, None for flat folders


@dataclass(frozen=True)
class _Probe:
    size: tuple[int, int]  # (width, height) after EXIF orientation
    grey: bool


def load_image_folder(
    folder: str | Path, *, image_size: int | None = None, channels: int | None = None
) -> Dataset:
    """Load a folder of images (see the module docstring for layouts, split and conversions).

    Args:
        folder: the folder.
        image_size: resize every image to this square size; None keeps sizes, which must agree.
        channels: 1 (grey) or 3 (colour); None picks 1 if all images are greyscale, else 3.
    Returns:
        A Dataset named after the folder path: uint8 (N, S, S) grey or (N, 3, S, S) colour;
        int64 labels and sorted class names for class subfolders, None for flat folders.
    Raises:
        DataError: no images, an ambiguous layout, an unreadable image (named), sizes that differ
            without `image_size`, or an invalid option.
    """
    folder = Path(folder)
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise DataError(f"image folder {folder}: image_size must be a positive integer, got {image_size!r}")
    if channels not in (None, 1, 3):
        raise DataError(f"image folder {folder}: channels must be 1 or 3, got {channels!r}")
    if not folder.is_dir():
        raise DataError(f"image folder {folder}: not a folder")

    train_dir, test_dir = folder / "train", folder / "test"
    if train_dir.is_dir() and test_dir.is_dir():
        train, test = _list_split(train_dir), _list_split(test_dir)
        if not train or not test:
            empty = train_dir if not train else test_dir
            raise DataError(f"image folder {empty}: no images ({_extensions()})")
        if (train[0].label is None) != (test[0].label is None):
            raise DataError(
                f"image folder {folder}: one of train/ and test/ has class subfolders and the "
                "other does not; use the same layout in both"
            )
    elif train_dir.is_dir() != test_dir.is_dir():
        have, lack = ("train", "test") if train_dir.is_dir() else ("test", "train")
        raise DataError(
            f"image folder {folder}: has {have}/ but no {lack}/; give both, or neither "
            "(then a fixed 10% of the images is held out for testing)"
        )
    else:
        entries = _list_split(folder)
        if not entries:
            raise DataError(f"image folder {folder}: no images ({_extensions()})")
        train, test = _split(folder, entries)

    probes = {e.path: _probe(e.path) for e in (*train, *test)}
    if channels is None:
        channels = 1 if all(p.grey for p in probes.values()) else 3
    if image_size is None:
        sizes = {}
        for path, p in probes.items():
            sizes.setdefault(p.size, path)
        if len(sizes) > 1:
            (s1, p1), (s2, p2) = list(sizes.items())[:2]
            raise DataError(
                f"image folder {folder}: images differ in size ({s1[0]}x{s1[1]} {p1.name}, "
                f"{s2[0]}x{s2[1]} {p2.name}); pass --image-size N (image_size=N) to resize all to NxN"
            )
    size = (image_size, image_size) if image_size is not None else None
    _refuse_beyond_memory(folder, len(probes), channels, size or next(iter(probes.values())).size)

    classes = sorted({e.label for e in (*train, *test) if e.label is not None}) or None
    index = {name: i for i, name in enumerate(classes or [])}

    shape = (size or next(iter(probes.values())).size)[::-1]  # (H, W)
    with _progress(len(probes), folder) as bar:
        x_train, y_train = _decode(train, channels, size, shape, index if classes else None, bar)
        x_test, y_test = _decode(test, channels, size, shape, index if classes else None, bar)
    return Dataset(str(folder), x_train, y_train, x_test, y_test, tuple(classes) if classes else None)


def _decode(entries: list[_Entry], channels: int, size, shape: tuple[int, int], index, bar):
    """Every image of `entries` decoded by a pool of threads (Pillow lets go of Python's lock
    while it decodes) straight into one preallocated uint8 array; labels from `index`."""
    x = np.empty((len(entries), *(() if channels == 1 else (3,)), *shape), dtype=np.uint8)

    def read(i: int) -> None:
        x[i] = _read(entries[i].path, channels, size)
        bar.update(1)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for done in pool.map(read, range(len(entries))):  # (an image's error is raised here)
            del done
    y = np.array([index[e.label] for e in entries], dtype=np.int64) if index is not None else None
    return x, y


class _NoBar:
    def update(self, n: int) -> None:
        pass


@contextlib.contextmanager
def _progress(total: int, folder: Path):
    """A progress bar of the decoding on a terminal, for folders of more than 1,000 images."""
    if total <= 1000 or not sys.stderr.isatty():
        yield _NoBar()
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=f"decoding {folder.name}", unit="img", leave=False, file=sys.stderr) as bar:
        yield bar


def _refuse_beyond_memory(folder: Path, n: int, channels: int, size: tuple[int, int]) -> None:
    """Refuse, before decoding, a folder whose images would not fit in memory together (they are
    decoded into one array; a little more is kept for the threads at work)."""
    needed = n * channels * size[0] * size[1]
    too_much = perf.beyond_memory(needed)
    if too_much:
        raise DataError(
            f"image folder {folder}: {n:,} images of {size[0]}x{size[1]} need {perf.size_text(needed)}, "
            f"{too_much}; pass --image-size N to make them smaller"
        )


def _list_split(folder: Path) -> list[_Entry]:
    """Images of one folder: flat, or one subfolder per class (sorted paths)."""
    images, classes = [], []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            found = _images_in(path)
            if found:
                classes.append((path.name, found))
        elif path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():  # (not a pipe: it would block)
            images.append(path)
    if images and classes:
        raise DataError(
            f"image folder {folder}: holds both images ({images[0].name}) and class subfolders "
            f"({classes[0][0]}/); put every image in a class subfolder, or none"
        )
    if classes:
        return [_Entry(p, name) for name, paths in classes for p in paths]
    return [_Entry(p, None) for p in images]


def _images_in(folder: Path) -> list[Path]:
    return [
        p for p in sorted(folder.iterdir())
        if not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    ]


def _split(folder: Path, entries: list[_Entry]) -> tuple[list[_Entry], list[_Entry]]:
    """The fixed-seed 90/10 split of the module docstring."""
    if len(entries) < 2:
        raise DataError(
            f"image folder {folder}: only {len(entries)} image; at least 2 are needed to hold one "
            "out for testing"
        )
    entries = sorted(entries, key=lambda e: e.path.relative_to(folder).as_posix())
    n_test = max(1, round(TEST_FRACTION * len(entries)))
    order = np.random.default_rng(SPLIT_SEED).permutation(len(entries))
    test_idx = set(order[:n_test].tolist())
    train = [e for i, e in enumerate(entries) if i not in test_idx]
    test = [e for i, e in enumerate(entries) if i in test_idx]
    return train, test


def _probe(path: Path) -> _Probe:
    """Size and mode from the header only (cheap); decoding errors surface in _read."""
    from PIL import Image

    try:
        with _bombs_refused(), Image.open(path) as img:
            width, height = img.size
            if img.getexif().get(_ORIENTATION) in (5, 6, 7, 8):
                width, height = height, width
            grey = img.mode in _GREY_MODES or (img.mode in ("P", "PA") and _grey_palette(img))
            return _Probe((width, height), grey)
    except Exception as e:  # Pillow raises many types on foreign bytes; all mean "unreadable"
        raise _unreadable(path, e) from e


def _grey_palette(img) -> bool:
    """Whether every colour of a palette image's palette is a grey (r == g == b)."""
    palette = img.getpalette() or []
    return all(palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette) - 2, 3))


def _read(path: Path, channels: int, size: tuple[int, int] | None) -> np.ndarray:
    """One image -> uint8 (H, W) for channels=1, (3, H, W) for channels=3."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:  # (_probe refused it already if it has too many pixels)
            img = ImageOps.exif_transpose(img)
            if img.mode.startswith("I") and img.mode != "I;8":
                img = _sixteen_bit_to_l(img)
            img = img.convert("L" if channels == 1 else "RGB")
            if size is not None and img.size != size:
                img = img.resize(size, Image.Resampling.BILINEAR)
            pixels = np.asarray(img, dtype=np.uint8)
    except Exception as e:
        raise _unreadable(path, e) from e
    return pixels if channels == 1 else pixels.transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def _sixteen_bit_to_l(img):
    """Pillow's convert("L") clips 16-bit grey at 255; scale it down instead."""
    from PIL import Image

    values = np.asarray(img).astype(np.int64)
    if values.size and values.max() > 255:
        values = values >> 8
    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))  # 2-D uint8: mode "L"


@contextlib.contextmanager
def _bombs_refused():
    """Pillow only warns (two lines on stderr) about an image of over 89 million pixels, which a
    few kB of PNG can declare: here it is refused like any unreadable image."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _unreadable(path: Path, e: BaseException) -> DataError:
    reason = one_line(e)
    return DataError(f"image {path}: cannot be read as an image ({reason})")


def _extensions() -> str:
    return ", ".join(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
