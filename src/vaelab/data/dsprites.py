"""dSprites by name (`--data dsprites`), generated here: no registry serves it.

The factor grid is the original's exactly: 3 shapes (square, ellipse, heart) x 6 scales (0.5 to
1) x 40 orientations (0 to 2 pi) x 32 x 32 positions (0 to 1 across the image) = 737,280 binary
64 x 64 images, one per combination, in the original's order (the last factor fastest). Each
image's five factor values travel with it (`Dataset.factors_*`), for disentanglement metrics.

The rendering is vaelab's own, deterministic and documented, not a copy of the original file:
- a sprite is drawn on pixel centres (a pixel is on when its centre lies inside the shape), with
  its centre on whole pixels, 11 + round(position * 41) on each axis (the original places sprites
  at sub-pixel positions through its own renderer);
- at scale 1 a square has a half-side of 8 pixels, an ellipse half-axes of 10 and 5 pixels, and a
  heart is the curve (x^2 + y^2 - 1)^3 = x^2 y^3 scaled to about 10 pixels; other scales shrink
  them linearly; the rotation turns the shape about its centre (the original's shapes and sizes
  differ in detail).
Generated once into `$VAELAB_HOME/dsprites.npz` as packed bits (377 MB) with the factor indices;
generation holds the packed images and one shape-and-scale block of 40,960 images unpacked
(168 MB) at a time. Loading unpacks into uint8 images of 0 and 255 (3 GB), 10 % of them (a fixed
draw) as the test set.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from vaelab.data.dataset import Dataset
from vaelab.errors import DataError

NAME = "dsprites"
CACHE_NAME = "dsprites.npz"
SIZE = 64
SHAPES = ("square", "ellipse", "heart")
SCALES = np.linspace(0.5, 1.0, 6)
ORIENTATIONS = np.linspace(0.0, 2 * np.pi, 40)
POSITIONS = np.linspace(0.0, 1.0, 32)
FACTOR_NAMES = ("shape", "scale", "orientation", "position x", "position y")
FACTOR_SIZES = (len(SHAPES), len(SCALES), len(ORIENTATIONS), len(POSITIONS), len(POSITIONS))
COUNT = int(np.prod(FACTOR_SIZES))  # 737,280
TEST_FRACTION = 0.1
SPLIT_SEED = 0
HALF = 15  # a sprite's canvas is (2 * HALF + 1) pixels a side, centred on its centre pixel
PIXELS_PER_UNIT = 10.0  # a shape's unit at scale 1, in pixels


def centre(position: float) -> int:
    """The pixel a sprite's centre falls on, for a position in [0, 1]."""
    return 11 + int(round(position * 41))


def sprite(shape: int, scale: float, orientation: float) -> np.ndarray:
    """One shape, scaled and turned, on a (2 HALF + 1)^2 canvas centred on its middle pixel: bool."""
    d = np.arange(-HALF, HALF + 1, dtype=np.float64)
    x, y = np.meshgrid(d, d)  # pixel centres, y growing downwards as image rows do
    c, s = np.cos(orientation), np.sin(orientation)
    u = (c * x + s * y) / (PIXELS_PER_UNIT * scale)  # the shape's own frame (rotated back)
    v = (-s * x + c * y) / (PIXELS_PER_UNIT * scale)
    if SHAPES[shape] == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if SHAPES[shape] == "ellipse":
        return u**2 + (v / 0.5) ** 2 <= 1.0
    hx, hy = u * 1.2, -v * 1.2  # the heart's curve, upright
    return (hx**2 + hy**2 - 1) ** 3 - hx**2 * hy**3 <= 0


def factor_indices() -> np.ndarray:
    """(COUNT, 5) uint8: every combination of the factors' indices, the last factor fastest."""
    grids = np.meshgrid(*(np.arange(n) for n in FACTOR_SIZES), indexing="ij")
    return np.stack([g.reshape(-1) for g in grids], axis=1).astype(np.uint8)


def factor_values() -> tuple[tuple[float, ...], ...]:
    """Each factor's values, indexed as `factor_indices` (shape: 0, 1, 2)."""
    return (
        tuple(float(i) for i in range(len(SHAPES))),
        tuple(SCALES.tolist()),
        tuple(ORIENTATIONS.tolist()),
        tuple(POSITIONS.tolist()),
        tuple(POSITIONS.tolist()),
    )


def generate() -> tuple[np.ndarray, np.ndarray]:
    """Every image, as packed bits (COUNT, SIZE * SIZE / 8) uint8, and `factor_indices()`."""
    packed = np.empty((COUNT, SIZE * SIZE // 8), dtype=np.uint8)
    block = len(ORIENTATIONS) * len(POSITIONS) ** 2  # one shape and scale: 40,960 images
    padded = np.zeros((SIZE + 2 * HALF, SIZE + 2 * HALF), dtype=bool)  # a canvas with margins
    centres = [centre(p) for p in POSITIONS]
    first = 0
    for shape in range(len(SHAPES)):
        for scale in SCALES:
            images = np.zeros((block, SIZE, SIZE), dtype=bool)
            n = 0
            for orientation in ORIENTATIONS:
                drawn = sprite(shape, scale, orientation)
                for cx in centres:
                    for cy in centres:
                        padded[:] = False
                        padded[cy : cy + 2 * HALF + 1, cx : cx + 2 * HALF + 1] = drawn
                        images[n] = padded[HALF : HALF + SIZE, HALF : HALF + SIZE]
                        n += 1
            packed[first : first + block] = np.packbits(images.reshape(block, -1), axis=1)
            first += block
    return packed, factor_indices()


def cache_path() -> Path:
    from vaelab.data.mnist import cache_dir

    return cache_dir() / CACHE_NAME


def fetch_dsprites() -> Path:
    """Generate the cache if it is not there (seconds); returns its path."""
    path = cache_path()
    if not path.exists():
        packed, factors = generate()
        buffer = io.BytesIO()
        np.savez(buffer, images_packed=packed, factors=factors)
        from vaelab.files import atomic_write_bytes

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buffer.getvalue())
    return path


def load_dsprites() -> Dataset:
    """dSprites as a Dataset: uint8 images of 0 and 255, labels = shape (3 classes), factors."""
    path = fetch_dsprites()
    try:
        with np.load(path, allow_pickle=False) as data:
            packed, factors = data["images_packed"], data["factors"]
    except Exception as e:
        raise DataError(
            f"dSprites cache {path} is unreadable ({type(e).__name__}); delete it to generate it anew"
        ) from e
    if packed.shape != (COUNT, SIZE * SIZE // 8) or factors.shape != (COUNT, len(FACTOR_SIZES)):
        raise DataError(
            f"dSprites cache {path} is damaged (shapes {packed.shape}, {factors.shape}); delete it"
        )
    order = np.random.Generator(np.random.PCG64(SPLIT_SEED)).permutation(COUNT)
    n_test = int(COUNT * TEST_FRACTION)
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    x_train, x_test = _unpack(packed, train), _unpack(packed, test)
    classes = SHAPES
    return Dataset(
        NAME,
        x_train,
        factors[train, 0].astype(np.int64),
        x_test,
        factors[test, 0].astype(np.int64),
        classes,
        factor_names=FACTOR_NAMES,
        factors_train=factors[train],
        factors_test=factors[test],
        factor_values=factor_values(),
    )


def _unpack(packed: np.ndarray, rows: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """uint8 images (len(rows), SIZE, SIZE) of 0 and 255 from packed bits, a chunk at a time."""
    out = np.empty((len(rows), SIZE, SIZE), dtype=np.uint8)
    for start in range(0, len(rows), chunk):
        bits = np.unpackbits(packed[rows[start : start + chunk]], axis=1)
        out[start : start + chunk] = bits.reshape(-1, SIZE, SIZE) * np.uint8(255)
    return out
