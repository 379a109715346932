"""The encoder's view of the test set, as the figures and the explorer show it: the posterior
means of a fixed subset of test images, their principal directions, and the seed's manifold grid
of latent points at Gaussian quantiles."""

from __future__ import annotations

from statistics import NormalDist
from typing import NamedTuple

import numpy as np
import torch

from vaelab.drawing import device_of, images_of

SCATTER_LIMIT = 2000  # test images used by the scatter, PCA and KL figures
MANIFOLD_N = 15  # the seed's 15 x 15 grid
_CHUNK = 1000  # images per encoder call


class LatentPoints(NamedTuple):
    """The encoder's output on a subset of the test set."""

    means: np.ndarray  # (N, latent) posterior means
    log_vars: np.ndarray  # (N, latent) posterior log-variances
    labels: np.ndarray | None  # (N,) int64, None for unlabelled data
    indices: np.ndarray  # (N,) positions in dataset.x_test


def test_indices(n_test: int, limit: int = SCATTER_LIMIT, seed: int = 0) -> np.ndarray:
    """Sorted positions of at most `limit` test images, a random subset fixed by `seed`."""
    if n_test <= limit:
        return np.arange(n_test)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_test, size=limit, replace=False))


def test_inputs(model, dataset, indices: np.ndarray) -> torch.Tensor:
    """The test images at `indices` as the model saw them in training: (N, D) in [0, 1].

    Grey levels are uint8 / 255; a binarizing run's test set is binarized once with
    `TEST_BINARIZE_SEED`, the protocol of `vaelab.train.prepare`.
    """
    from vaelab.data.tensors import test_targets

    config = getattr(model, "run_config", None)
    return test_targets(dataset.x_test, config.data.binarize if config else "none")[indices]


@torch.no_grad()
def latent_points(model, dataset, limit: int = SCATTER_LIMIT, seed: int = 0) -> LatentPoints:
    """Encode at most `limit` test images (chosen by `seed`): the data of the latent scatter.

    Example:
        >>> points = latent_points(vaelab.load("runs/seed"), vaelab.data.load("mnist"), 500)
        >>> points.means.shape
        (500, 2)
    """
    indices = test_indices(len(dataset.x_test), limit, seed)
    x = test_inputs(model, dataset, indices)
    device = device_of(model)
    means, log_vars = [], []
    labels = None if dataset.y_test is None else np.asarray(dataset.y_test)[indices]
    for i in range(0, len(x), _CHUNK):
        label = condition(model, labels[i : i + _CHUNK] if labels is not None else None)
        mean, log_var = model.encode(x[i : i + _CHUNK].to(device), label)
        means.append(mean.float().cpu())
        log_vars.append(log_var.float().cpu())
    return LatentPoints(torch.cat(means).numpy(), torch.cat(log_vars).numpy(), labels, indices)


def principal_directions(points: np.ndarray, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The `k` leading principal directions of `points` (N, D) and their variance fractions.

    Returns ((k, D) unit rows, (k,) explained-variance ratios). Each direction's sign is fixed
    (its largest-magnitude component is positive), so the same points give the same axes.
    """
    centred = points - points.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    directions = vt[:k].copy()
    for row in directions:
        if row[np.argmax(np.abs(row))] < 0:
            row *= -1
    variance = s**2
    ratio = variance[:k] / variance.sum() if variance.sum() > 0 else np.zeros(k)
    return directions, ratio


def gaussian_quantiles(n: int = MANIFOLD_N) -> np.ndarray:
    """The seed's grid coordinates: Phi^-1(linspace(0.05, 0.95, n)) of a standard normal."""
    normal = NormalDist()
    return np.array([normal.inv_cdf(p) for p in np.linspace(0.05, 0.95, n)])


def condition(model, labels) -> torch.Tensor | None:
    """The labels to give a conditional model (as a tensor on its device); None otherwise."""
    if not model.config.conditional:
        return None
    if labels is None:
        raise ValueError("a conditional model needs labels: the data has none")
    return torch.as_tensor(np.asarray(labels), device=device_of(model)).long()


@torch.no_grad()
def manifold_grid(
    model, n: int = MANIFOLD_N, directions: np.ndarray | None = None, label: int | None = None
) -> np.ndarray:
    """Decode the seed's n x n grid of Gaussian quantiles: probabilities (n*n, H, W).

    With q = `gaussian_quantiles(n)`, image `i * n + j` (row i, column j of the picture) decodes
    z = q[j] * u1 + q[i] * u2, where (u1, u2) are the rows of `directions` (2, latent). This is
    the seed's ordering: `for i, yi in enumerate(grid_x): for j, xi in enumerate(grid_y):
    z_sample = [[xi, yi]]`, drawn with imshow, so the first coordinate grows left to right and
    the second top to bottom. `directions=None` takes the first two latent axes (other
    coordinates 0); a 1-D latent space gives one row of n images, z = q[j].
    Colour models give (n*n, C, H, W). A conditional model draws the digit `label` (default 0).
    """
    k = model.latent_dim
    if directions is None:
        directions = np.eye(k)[: min(k, 2)]
    directions = np.asarray(directions, dtype=np.float64)
    if directions.ndim != 2 or directions.shape[1] != k or len(directions) not in (1, 2):
        raise ValueError(f"manifold_grid: directions must be (2, {k}), got {directions.shape}")
    q = gaussian_quantiles(n)
    if len(directions) == 1:
        coords = q[:, None]  # (n, 1)
    else:
        row, col = np.meshgrid(q, q, indexing="ij")  # row[i, j] = q[i], col[i, j] = q[j]
        coords = np.stack([col.ravel(), row.ravel()], axis=1)  # (n*n, 2): [q[j], q[i]]
    z = torch.from_numpy(coords @ directions).float().to(device_of(model))  # (n*n, latent)
    label = (label or 0) if model.config.conditional else None
    return images_of(model, model.mean_image(model.decode(z, label)))
