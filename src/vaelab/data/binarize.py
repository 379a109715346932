"""Bernoulli binarization of grey levels: each pixel is 1 with probability its intensity.

`binarize` draws afresh on each call (dynamic binarization, a new draw each epoch: the standard
for likelihood benchmarks); `static_binarize` draws once from a fixed seed, so a data set is
binarized the same way in every run.
"""

from __future__ import annotations

import numpy as np
import torch

from vaelab.errors import DataError

# The one binarization of a test set that every run's test loss and every evaluation score:
# drawn once with this fixed seed (the dynamic-binarization protocol), whatever the training data.
TEST_BINARIZE_SEED = 0


def binarize(x, generator=None):
    """Draw 0/1 pixels: each is 1 with probability equal to its value.

    Args:
        x: a float torch.Tensor or np.ndarray of probabilities in [0, 1], any shape.
        generator: a torch.Generator for a tensor, an np.random.Generator for an array;
            None uses torch's global generator / a fresh unseeded numpy generator.
    Returns:
        The same type, shape (and device) as `x`, holding 0.0 and 1.0: the tensor's own float
        dtype, float32 for a numpy array of a non-float dtype.
    Raises:
        DataError: values outside [0, 1] or NaN.
        TypeError: `x` or `generator` of another type.

    Example:
        >>> binarize(torch.full((2, 3), 0.5), torch.Generator().manual_seed(0))
    """
    if isinstance(x, torch.Tensor):
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"binarize: a tensor needs a torch.Generator, got {type(generator).__name__}")
        p = x if x.is_floating_point() else x.float()
        _check_probabilities(float(p.min()) if p.numel() else 0.0, float(p.max()) if p.numel() else 0.0)
        return torch.bernoulli(p, generator=generator)
    if isinstance(x, np.ndarray):
        if generator is None:
            generator = np.random.default_rng()
        if not isinstance(generator, np.random.Generator):
            raise TypeError(
                f"binarize: an array needs an np.random.Generator, got {type(generator).__name__}"
            )
        p = x if x.dtype.kind == "f" else x.astype(np.float32)
        _check_probabilities(float(p.min()) if p.size else 0.0, float(p.max()) if p.size else 0.0)
        # uniform in [0, 1) < p is 1 with probability exactly p (never for 0, always for 1).
        return (generator.random(p.shape) < p).astype(p.dtype)
    raise TypeError(f"binarize: expected a torch.Tensor or np.ndarray, got {type(x).__name__}")


def binarize_once(x: np.ndarray, seed: int) -> np.ndarray:
    """`static_binarize` as bool: one byte a pixel, the same draw."""
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8:
        kind = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
        raise TypeError(f"static_binarize: expected a uint8 np.ndarray, got {kind}")
    rng = np.random.Generator(np.random.PCG64(seed))
    # u uniform on {0, ..., 254}: P(u < k) = k/255 exactly, drawn as bytes (1/8 the memory of
    # float64 uniforms: 47 MB instead of 376 MB for MNIST's training set).
    return rng.integers(0, 255, size=x.shape, dtype=np.uint8) < x


def static_binarize(x: np.ndarray, seed: int) -> np.ndarray:
    """Binarize uint8 images once, reproducibly: pixel value k is 1 with probability k/255.

    Args:
        x: uint8 array of any shape, values in [0, 255].
        seed: the seed of `np.random.Generator(np.random.PCG64(seed))`; same seed, same draw.
    Returns:
        float32 array of 0.0 and 1.0, the shape of `x`.
    Raises:
        TypeError: `x` is not a uint8 array.
    """
    return binarize_once(x, seed).astype(np.float32)


def _check_probabilities(low: float, high: float) -> None:
    if not (0.0 <= low and high <= 1.0):  # written so that NaN fails too
        raise DataError(f"binarize: values must be probabilities in [0, 1], got range [{low:g}, {high:g}]")
