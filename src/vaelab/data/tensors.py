"""A data set as a model's inputs: uint8 images -> flattened (N, D) tensors, the validation
images carved from the training set, binarization drawn where the run asks for it.

Training keeps them compact (`prepare(..., compact=True)`): grey levels stay uint8 and images
binarized once are bool, one byte a pixel, and `inputs` turns a batch into float32 values in
[0, 1] when it is used (the same values a float copy would hold: k / 255, or 0 and 1). A float
copy of MNIST's training set is 188 MB; uint8 is 47 MB, and dSprites' 663,552 training images of
4096 pixels are 2.7 GB instead of 10.9 GB."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from vaelab import native
from vaelab.config import RunConfig
from vaelab.data.binarize import TEST_BINARIZE_SEED, binarize_once
from vaelab.errors import ConfigError

VALIDATION_SEED = 0  # the draw of the held-out validation images


_LEVELS: dict[torch.device, torch.Tensor] = {}  # k / 255 for k = 0..255, as the CPU divides, per device


def inputs(x: torch.Tensor) -> torch.Tensor:
    """A batch of compact images as the model's float32 inputs in [0, 1]: uint8 grey levels k
    become k / 255, bool pixels 0 and 1; float tensors are returned as they are. On a CPU the
    division is IEEE's, the same bits as a float copy made beforehand; elsewhere (a GPU divides
    by multiplying with 1/255, a bit off for half the levels) the 256 levels are looked up in a
    table the CPU computed."""
    if x.dtype == torch.uint8:
        if x.device.type == "cpu":
            return x.float().div_(255.0)
        levels = _LEVELS.get(x.device)
        if levels is None:
            levels = _LEVELS[x.device] = (torch.arange(256, dtype=torch.float32) / 255.0).to(x.device)
        return levels[x.long()]
    return x.float() if x.dtype == torch.bool else x


def input_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """`inputs(x.index_select(0, idx))`, the training loop's batch. For grey levels on a CPU the
    native library (vaelab.native) gathers and converts them in one pass, the same bits; a seed
    batch of 100 random MNIST images in about 0.6 of the time of the two PyTorch operations."""
    cpu = torch.device("cpu")
    if x.dtype == torch.uint8 and idx.dtype == torch.int64 and x.device == cpu and idx.device == cpu:
        lib = native.library()
        if lib is not None and x.dim() >= 1 and idx.dim() == 1 and x.is_contiguous() and idx.is_contiguous():
            out = torch.empty((idx.shape[0], *x.shape[1:]), dtype=torch.float32)
            n, d, rows = x.shape[0], math.prod(x.shape[1:]), idx.shape[0]
            if lib.gather_levels(x.data_ptr(), n, d, idx.data_ptr(), rows, out.data_ptr()) == 0:
                return out
    return inputs(x.index_select(0, idx))  # (an index out of range: index_select says so)


@dataclass
class Tensors:
    """A dataset prepared for the model: flattened (N, D) images, float32 in [0, 1] (or compact:
    uint8 grey levels and bool binary pixels, see `inputs`), and labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor | None
    x_test: torch.Tensor  # the test targets (binarized once if the run binarizes)
    y_test: torch.Tensor | None
    image_shape: tuple[int, int, int]  # (C, H, W)
    x_val: torch.Tensor | None = None  # held out from training (binarized once like the test set)
    y_val: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        ys = [y for y in (self.y_train, self.y_test, self.y_val) if y is not None and len(y)]
        return max(int(y.max()) for y in ys) + 1 if ys else 0


def _flat(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x.reshape(len(x), -1)).float().div_(255.0)  # (N, D) in [0, 1]


def test_targets(x_test: np.ndarray, binarize: str, compact: bool = False) -> torch.Tensor:
    """uint8 test images -> (N, D) as training scores them: grey levels in [0, 1], or, for a
    binarizing run, binarized once with TEST_BINARIZE_SEED (the dynamic-binarization protocol).
    compact: uint8 grey levels or bool pixels instead of float32 (see `inputs`)."""
    flat = x_test.reshape(len(x_test), -1)
    if binarize in ("static", "dynamic"):
        binary = torch.from_numpy(binarize_once(flat, TEST_BINARIZE_SEED))
        return binary if compact else binary.float()
    return torch.from_numpy(np.ascontiguousarray(flat)) if compact else _flat(x_test)


def validation_split(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation) of a fixed draw of `size` of n training images (seed 0, so
    every run on the same data holds out the same images)."""
    order = np.random.Generator(np.random.PCG64(VALIDATION_SEED)).permutation(n)
    return np.sort(order[size:]), np.sort(order[:size])


def data_digest(dataset) -> str:
    """SHA-256 of a data set's images and labels, shapes and types included: a resumed run checks
    that it goes on with the data it began with."""
    h = hashlib.sha256()
    for name in ("x_train", "y_train", "x_test", "y_test"):
        array = getattr(dataset, name, None)
        h.update(name.encode())
        if array is not None:
            array = np.ascontiguousarray(array)
            h.update(f"{array.dtype.str}{array.shape}".encode())
            h.update(array.data)
    return h.hexdigest()


def prepare(dataset, config: RunConfig, compact: bool = False) -> Tensors:
    """uint8 images -> (N, D) float32 in [0, 1] (compact: uint8 or bool, see `inputs`); static
    binarization drawn once here; the validation images (`train.validation`) carved from the
    training set, never the test set."""
    image_shape = dataset.chw_shape
    mode, seed = config.data.binarize, config.data.binarize_seed
    x_all, y_all = dataset.x_train, dataset.y_train
    x_val = y_val = None
    size = config.train.validation
    if size:
        if size >= len(x_all):
            raise ConfigError(
                f"option --validation: {size} images would leave none of the {len(x_all)} training images"
            )
        keep, held = validation_split(len(x_all), size)
        x_val = test_targets(x_all[held], mode, compact)  # scored like the test set
        y_val = None if y_all is None else np.asarray(y_all)[held]
        x_all, y_all = x_all[keep], (None if y_all is None else np.asarray(y_all)[keep])
    if mode == "static":
        binary = torch.from_numpy(binarize_once(x_all.reshape(len(x_all), -1), seed))
        x_train = binary if compact else binary.float()
    else:
        flat = np.ascontiguousarray(x_all.reshape(len(x_all), -1))
        x_train = torch.from_numpy(flat) if compact else _flat(x_all)
    x_test = test_targets(dataset.x_test, mode, compact)

    def labels(y):
        return None if y is None else torch.from_numpy(np.asarray(y, dtype=np.int64))

    return Tensors(x_train, labels(y_all), x_test, labels(dataset.y_test), image_shape, x_val, labels(y_val))
