"""Disentanglement on data whose generative factors are known (dSprites): the mutual information
gap (MIG, Chen et al. 2018) and the FactorVAE score (Kim & Mnih 2018), from an encoder's codes.

MIG: each code dimension is cut into `bins` equal-width bins over its range; for each factor with
more than one value, the mutual information between every code dimension and the factor, in
nats, from their joint counts; the gap between the largest and the second largest, over the
factor's entropy; the mean of those over the factors. 1: each factor is captured by exactly one
dimension; 0: none is, or two equally.

FactorVAE score: each code dimension is divided by its standard deviation over `std_images`
images (dimensions whose deviation is below `collapsed` are left out: they carry nothing). Each
vote fixes one factor at a random value, encodes `batch` images that share it (the others
random), and votes (the dimension of least variance, the factor). A majority-vote classifier
(each dimension predicts its most frequent factor) is fit on `votes` votes and scored on `votes`
others: the score is its accuracy. 1: every factor has a dimension that varies with nothing
else; 1 / (factors): chance.

Both take an `encode(images) -> codes` function (float images (n, D) in [0, 1] -> (n, L)), so
they can be checked on encoders whose answer is known (tests/test_disentanglement.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

MIG_BINS = 20
MIG_IMAGES = 10_000
VOTE_BATCH = 64
VOTES = 800
STD_IMAGES = 10_000
COLLAPSED = 0.05  # a code dimension's standard deviation below this: collapsed, left out (Kim & Mnih)


def discretize(codes: np.ndarray, bins: int = MIG_BINS) -> np.ndarray:
    """Each column of codes (N, L) cut into `bins` equal-width bins over its range: ints (N, L)."""
    out = np.zeros(codes.shape, dtype=np.int64)
    for j in range(codes.shape[1]):
        edges = np.histogram_bin_edges(codes[:, j], bins=bins)
        out[:, j] = np.digitize(codes[:, j], edges[1:-1])
    return out


def mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """I(a; b) in nats of two discrete variables (N,) of non-negative ints, from joint counts."""
    joint = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(joint, (a, b), 1.0)
    joint /= joint.sum()
    pa, pb = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / (pa @ pb)[nz])).sum())


def entropy(a: np.ndarray) -> float:
    p = np.bincount(a) / len(a)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def mig(codes: np.ndarray, factors: np.ndarray, bins: int = MIG_BINS) -> dict[str, Any]:
    """The mutual information gap of codes (N, L) and factor indices (N, F) (see the module)."""
    binned = discretize(codes, bins)
    gaps = []
    for k in range(factors.shape[1]):
        h = entropy(factors[:, k])
        if h <= 0:  # a factor with one value tells nothing
            gaps.append(None)
            continue
        mi = sorted(
            (mutual_information(binned[:, j], factors[:, k]) for j in range(codes.shape[1])), reverse=True
        )
        second = mi[1] if len(mi) > 1 else 0.0
        gaps.append((mi[0] - second) / h)
    scored = [g for g in gaps if g is not None]
    return {"mig": float(np.mean(scored)), "per_factor": gaps, "bins": bins, "images": len(codes)}


def factorvae_score(
    encode: Callable[[np.ndarray], np.ndarray],
    images: Callable[[np.ndarray], np.ndarray],
    factors: np.ndarray,
    *,
    rng: np.random.Generator,
    batch: int = VOTE_BATCH,
    votes: int = VOTES,
    std_images: int = STD_IMAGES,
) -> dict[str, Any]:
    """The FactorVAE score (see the module). `images(indices)` gives float images of those rows of
    `factors` (N, F); `encode` codes them."""
    n = len(factors)
    std = encode(images(rng.choice(n, min(std_images, n), replace=False))).std(axis=0)
    active = np.flatnonzero(std >= COLLAPSED)
    varying = [k for k in range(factors.shape[1]) if len(np.unique(factors[:, k])) > 1]
    if len(active) == 0:
        return {"factorvae": 0.0, "active_dims": 0, "votes": votes, "batch": batch}
    rows_by_value = {
        (k, v): np.flatnonzero(factors[:, k] == v) for k in varying for v in np.unique(factors[:, k])
    }

    def vote() -> tuple[int, int]:
        k = varying[rng.integers(len(varying))]
        values = np.unique(factors[:, k])
        rows = rows_by_value[(k, values[rng.integers(len(values))])]
        codes = encode(images(rng.choice(rows, batch, replace=len(rows) < batch))) / std
        return int(active[np.argmin(codes[:, active].var(axis=0))]), k

    train = np.array([vote() for _ in range(votes)])
    test = np.array([vote() for _ in range(votes)])
    counts = np.zeros((len(std), factors.shape[1]), dtype=np.int64)
    np.add.at(counts, (train[:, 0], train[:, 1]), 1)
    predicted = counts.argmax(axis=1)  # each dimension's majority factor
    accuracy = float((predicted[test[:, 0]] == test[:, 1]).mean())
    return {
        "factorvae": accuracy,
        "active_dims": int(len(active)),
        "code_dims": len(std),
        "votes": votes,
        "batch": batch,
        "collapsed_below": COLLAPSED,
        "std_images": min(std_images, n),
    }


def disentanglement(model, dataset, seed: int = 0, *, mig_images: int = MIG_IMAGES) -> dict[str, Any]:
    """MIG and the FactorVAE score of a trained model's posterior means on a data set with known
    factors (its training split, as the literature does), with the estimator's choices."""
    import torch

    from vaelab.errors import DataError

    if dataset.factor_names is None:
        raise DataError(f"data '{dataset.name}': has no known factors (dSprites has: --data dsprites)")
    x, factors = dataset.x_train, dataset.factors_train
    device = next(model.parameters()).device
    rng = np.random.default_rng(seed)

    def images(rows: np.ndarray) -> np.ndarray:
        return x[rows].reshape(len(rows), -1)  # uint8 (n, D)

    @torch.no_grad()
    def encode(pixels: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(pixels), 2000):
            chunk = torch.from_numpy(pixels[i : i + 2000]).to(device).float().div_(255.0)
            out.append(model.encode(chunk)[0].float().cpu().numpy())
        return np.concatenate(out)

    rows = rng.choice(len(x), min(mig_images, len(x)), replace=False)
    result = {
        "factors": list(dataset.factor_names),
        "mig": mig(encode(images(rows)), factors[rows]),
        "factorvae": factorvae_score(encode, images, factors, rng=rng),
        "seed": seed,
        "codes": "posterior means (the top layer's for a hierarchy)",
    }
    return result
