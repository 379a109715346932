"""The in-memory data set every source returns: uint8 images, optional integer labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vaelab.errors import DataError


@dataclass(frozen=True, eq=False)  # eq=False: comparing arrays with == has no single truth value
class Dataset:
    """Train and test images of one data set, validated on construction.

    Images are uint8 in [0, 255]: (N, H, W) for grey, (N, C, H, W) for colour. Labels, when known,
    are int64 (N,) and non-negative; `classes` names them (label i is `classes[i]`).

    Example:
        >>> ds = vaelab.data.load("mnist")
        >>> ds.x_train.shape, ds.image_shape, ds.num_classes
        ((60000, 28, 28), (28, 28), 10)
    """

    name: str
    x_train: np.ndarray  # uint8 (N, H, W) or (N, C, H, W)
    y_train: np.ndarray | None  # int64 (N,)
    x_test: np.ndarray
    y_test: np.ndarray | None
    classes: tuple[str, ...] | None = None
    # Known generative factors (dSprites): their names, each image's factor indices (N, F) int,
    # and each factor's values (index i of factor f is factor_values[f][i])
    factor_names: tuple[str, ...] | None = None
    factors_train: np.ndarray | None = None
    factors_test: np.ndarray | None = None
    factor_values: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self) -> None:
        where = f"dataset '{self.name}'"
        for split in ("train", "test"):
            x = getattr(self, f"x_{split}")
            if not isinstance(x, np.ndarray):
                raise DataError(f"{where}: {split} images are a {type(x).__name__}, not an array")
            if x.dtype != np.uint8:
                raise DataError(f"{where}: {split} images have dtype {x.dtype}, expected uint8")
            if x.ndim not in (3, 4):
                raise DataError(
                    f"{where}: {split} images have shape {x.shape}, "
                    "expected (N, H, W) or (N, C, H, W)"
                )
            if len(x) == 0 or 0 in x.shape[1:]:
                raise DataError(f"{where}: {split} images are empty (shape {x.shape})")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(
                f"{where}: train images are {_dims(self.x_train.shape[1:])} "
                f"but test images are {_dims(self.x_test.shape[1:])}"
            )
        for split in ("train", "test"):
            y = getattr(self, f"y_{split}")
            if y is None:
                continue
            y = self._checked_labels(split, y, len(getattr(self, f"x_{split}")))
            object.__setattr__(self, f"y_{split}", y)  # normalised to int64 once, here
        if self.classes is not None:
            classes = tuple(self.classes)
            if not classes or not all(isinstance(c, str) for c in classes):
                raise DataError(f"{where}: classes must be a non-empty tuple of names")
            top = max((int(y.max()) for y in (self.y_train, self.y_test) if y is not None and len(y)),
                      default=-1)
            if top >= len(classes):
                raise DataError(f"{where}: label {top} has no name among the {len(classes)} classes")
            object.__setattr__(self, "classes", classes)
        if self.factor_names is not None:
            self._check_factors(where)

    def _check_factors(self, where: str) -> None:
        names = tuple(self.factor_names)
        values = self.factor_values
        if values is None or len(values) != len(names):
            raise DataError(f"{where}: {len(names)} factor names but no values for each")
        for split in ("train", "test"):
            f = getattr(self, f"factors_{split}")
            n = len(getattr(self, f"x_{split}"))
            if not isinstance(f, np.ndarray) or f.shape != (n, len(names)) or f.dtype.kind not in "iu":
                raise DataError(f"{where}: {split} factors must be integers ({n}, {len(names)})")
            if len(f) and (f.max(axis=0) >= np.array([len(v) for v in values])).any():
                raise DataError(f"{where}: {split} factors index past their values")

    def _checked_labels(self, split: str, y, count: int) -> np.ndarray:
        where = f"dataset '{self.name}'"
        if not isinstance(y, np.ndarray) or y.dtype.kind not in "iu":
            kind = y.dtype if isinstance(y, np.ndarray) else type(y).__name__
            raise DataError(f"{where}: {split} labels have type {kind}, expected integers")
        if y.ndim != 1:
            raise DataError(f"{where}: {split} labels have shape {y.shape}, expected (N,)")
        if len(y) != count:
            raise DataError(f"{where}: {count} {split} images but {len(y)} {split} labels")
        if len(y) and y.min() < 0:
            raise DataError(f"{where}: {split} labels include {int(y.min())}; labels must be >= 0")
        return y.astype(np.int64, copy=False)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """(H, W) for grey images, (C, H, W) for colour."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def chw_shape(self) -> tuple[int, int, int]:
        """(C, H, W), grey images as one channel: the input shape of a model of this data."""
        shape = self.image_shape
        return (1, *shape) if len(shape) == 2 else shape

    @property
    def num_pixels(self) -> int:
        """Values per image: H*W, or C*H*W."""
        return int(np.prod(self.image_shape))

    @property
    def num_classes(self) -> int | None:
        """len(classes) if named, else the largest label + 1, else None (unlabelled)."""
        if self.classes is not None:
            return len(self.classes)
        labels = [y for y in (self.y_train, self.y_test) if y is not None and len(y)]
        return max(int(y.max()) for y in labels) + 1 if labels else None

    def __repr__(self) -> str:
        labelled = "labelled" if self.y_train is not None else "unlabelled"
        factors = f", factors={self.factor_names}" if self.factor_names else ""
        return (
            f"Dataset(name={self.name!r}, train={len(self.x_train)}, test={len(self.x_test)}, "
            f"image_shape={self.image_shape}, {labelled}, num_classes={self.num_classes}{factors})"
        )


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)
