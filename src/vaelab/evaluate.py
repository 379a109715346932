"""Evaluation on the test set: the ELBO and the importance-weighted bound on log p(x).

For each test image x, with K samples z_k ~ q(z|x):

    ELBO(x)   = mean_k log p(x|z_k) - KL(q(z|x) || p(z))                   (Kingma & Welling)
    IWAE_K(x) = log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x)  <=  log p(x)    (Burda et al., 2015)

Both are log-likelihood bounds in nats per image; `nll` is -IWAE_K (an upper bound on the
negative log-likelihood), with standard errors over images and bits per dimension
nll / (D ln 2). Log-likelihoods of Bernoulli models are of *binarized* images: every such
model, whatever it was trained on, is scored on the test set binarized once with
`EVAL_BINARIZE_SEED` (recorded in the result), and its encoder sees those binarized images.
Models with a density likelihood (continuous Bernoulli, Gaussian) are scored on the grey levels
themselves; their nats are of a density and not comparable with a Bernoulli model's.

Speed and memory: the decoder runs on (images x samples) rows as one matrix product per chunk,
log p(x|z) of all rows comes from one batched matrix-vector product plus one softplus pass
(no [N, K, D] tensor ever exists: a running log-sum-exp per image carries the IWAE sum across
sample chunks). Reproducibility: the samples of test image i come from its own torch.Generator
seeded from (seed, i), so the numbers depend on the seed only, not on chunk sizes, `limit` or
the device (up to floating-point rounding).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaelab.bounds import (  # noqa: F401 (the estimator's pieces, importable from here too)
    DEFAULT_K,
    DEFAULT_SEED,
    SAMPLE_BLOCK,
    ImageBounds,
    _accumulator,
    bernoulli_log_px_rows,
    image_bounds,
    log_weights,
    posterior,
    sample_noise,
)
from vaelab.config import MAX_SEED, is_whole
from vaelab.data.binarize import TEST_BINARIZE_SEED
from vaelab.errors import ConfigError, DataError
from vaelab.perf import reuse_freed_memory

# the one static binarization of the test set every model is scored on
EVAL_BINARIZE_SEED = TEST_BINARIZE_SEED
ACTIVE_THRESHOLD = 0.01  # a latent dim is active if Var_x E_q[z_u] exceeds this (Burda et al.)
CHUNK_VALUES = {"cpu": 2**22, "other": 2**27}  # decoder outputs (rows x pixels) per matrix product
EVALUATION = "evaluation.json"


# --- the test set ----------------------------------------------------------------------------


def binarized_test_images(dataset, limit: int | None = None) -> torch.Tensor:
    """The test images binarized once with EVAL_BINARIZE_SEED: float32 (N, D) of 0s and 1s.

    Args:
        dataset: a `vaelab.data.Dataset`, or a uint8 array of test images (N, ...).
        limit: keep the first `limit` images (binarized as part of the whole set, so image i is
            the same whatever the limit).
    """
    from vaelab.data import static_binarize

    images = _uint8_test_images(dataset)
    flat = static_binarize(images, EVAL_BINARIZE_SEED).reshape(len(images), -1)
    if limit is not None:
        flat = flat[:limit]
    return torch.from_numpy(flat)


def grey_test_images(dataset, limit: int | None = None) -> torch.Tensor:
    """The test images as grey levels: float32 (N, D) in [0, 1] (for density likelihoods)."""
    from vaelab.data.tensors import test_targets

    images = _uint8_test_images(dataset)
    return test_targets(images[:limit] if limit is not None else images, "none")


def _uint8_test_images(dataset) -> np.ndarray:
    images = getattr(dataset, "x_test", dataset)
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim < 2:
        kind = images.dtype if isinstance(images, np.ndarray) else type(images).__name__
        raise DataError(f"evaluate: expected uint8 test images (N, ...), got {kind}")
    return images


def evaluate(
    model,
    dataset,
    k: int = DEFAULT_K,
    limit: int | None = None,
    seed: int = DEFAULT_SEED,
    progress: Callable[[int], None] | None = None,
    *,
    chunk_values: int | None = None,
) -> dict[str, Any]:
    """Score a model on the test set: ELBO, IWAE bound on log p(x), active dims.

    A Bernoulli model is scored on the binarized test set, others on the grey levels; a
    conditional model with the test labels.

    Args:
        model: a VAE (e.g. from `vaelab.load`); it is evaluated where its weights are.
        dataset: a `vaelab.data.Dataset` (its test split is used) or uint8 test images (N, ...).
        k: importance samples per image (Burda et al. use 5000).
        limit: evaluate only the first `limit` test images.
        seed: seed of the importance samples (image i draws from its own generator).
        progress: called with the number of images finished since the previous call.
        chunk_values: decoder outputs (images x samples x pixels) per matrix product; None: a
            size that suits the device. It changes speed and memory, never the numbers.
    Returns:
        A JSON-ready dict. Nats per image: `elbo` = -(`recon` + `kl`) (<= 0 for a Bernoulli model;
        a density's can be positive), `loss` = -elbo,
        `nll` = -IWAE_K bound (>= the true NLL), their `*_stderr` over images, `bits_per_dim`,
        `active_dims`, `kl_per_dim`, and what was measured: `k`, `n_images`, `seed`,
        `binarization`, `seconds`.

    Example:
        >>> result = evaluate(vaelab.load("runs/seed"), vaelab.data.load("mnist"), k=5000)
        >>> print(f"NLL {result['nll']:.2f} +- {result['nll_stderr']:.2f} nats")
    """
    k, limit, seed = _checked_arguments(k, limit, seed, chunk_values)
    started = time.perf_counter()
    binary = model.config.likelihood == "bernoulli"
    x, labels = _scored_images(model, dataset, limit, binary)
    d = x.shape[1]
    param = next(model.parameters())
    device = param.device
    budget = chunk_values or CHUNK_VALUES["cpu" if device.type == "cpu" else "other"]
    rows = max(1, budget // d)  # (image, sample) rows per matrix product
    if device.type == "cpu":
        reuse_freed_memory()
    was_training = model.training
    model.eval()
    torch.set_flush_denormal(True)  # tiny probabilities must not slow the softplus
    try:
        with torch.inference_mode():
            sums = _bounds_of_all(model, x, labels, k, seed, rows, progress)
    finally:
        torch.set_flush_denormal(False)  # the default (torch cannot report the previous mode)
        model.train(was_training)
    result = _result(model, sums, k, seed, binary)
    return {**result, "device": str(device), "seconds": time.perf_counter() - started}


def _result(model, sums, k: int, seed: int, binary: bool) -> dict[str, Any]:
    """The evaluation's numbers from `_bounds_of_all`'s sums (see `evaluate` for the keys)."""
    iwae, elbo, recon, kl, mean_sum, mean_sq_sum, kl_dim_sum = (t.cpu() for t in sums)
    n, d = len(iwae), model.config.input_dim
    # Var over images of each dim's posterior mean (the IWAE paper's activity statistic)
    mean_var = (mean_sq_sum - mean_sum.pow(2) / n) / max(n - 1, 1)
    nll = -iwae.mean().item()
    result = {
        "elbo": elbo.mean().item(),
        "elbo_stderr": _stderr(elbo),
        "loss": -elbo.mean().item(),
        "recon": recon.mean().item(),
        "kl": kl.mean().item(),
        "log_px": -nll,
        "nll": nll,
        "nll_stderr": _stderr(iwae),
        "bits_per_dim": nll / (d * math.log(2)),
        "elbo_bits_per_dim": -elbo.mean().item() / (d * math.log(2)),
        "k": k,
        "n_images": n,
        "num_pixels": d,
        "latent_dim": model.latent_dim,
        "active_dims": int((mean_var > ACTIVE_THRESHOLD).sum()) if n > 1 else None,  # a variance over images
        "active_threshold": ACTIVE_THRESHOLD,
        "posterior_mean_variance": mean_var.tolist(),
        "kl_per_dim": (kl_dim_sum / n).tolist(),
        "seed": seed,
        "likelihood": model.config.likelihood,
        "binarization": (
            {"method": "static", "seed": EVAL_BINARIZE_SEED, "encoder_input": "binarized"}
            if binary
            else None  # grey levels: nats of a density on [0, 1]^D, not comparable with Bernoulli NLLs
        ),
    }
    if hasattr(model, "sizes"):  # a DeepVAE: its KL is a Monte Carlo mean, per layer; activity per layer
        active = (mean_var > ACTIVE_THRESHOLD).tolist()
        edges = [sum(model.sizes[:i]) for i in range(len(model.sizes) + 1)]
        result.update(
            latent_dim=sum(model.sizes),
            latent_sizes=list(model.sizes),
            active_dims_per_layer=[sum(active[a:b]) for a, b in zip(edges, edges[1:], strict=False)]
            if n > 1
            else None,
            kl_per_layer=result.pop("kl_per_dim"),
            kl_estimate="monte carlo",
        )
    return result


def _checked_arguments(k, limit, seed, chunk_values) -> tuple[int, int | None, int]:
    """k, limit and seed as Python integers, each refused in one line when it is not one."""
    if not is_whole(k) or k < 1:
        raise ConfigError(f"option --importance-samples: must be a whole number >= 1, got {k!r}")
    if limit is not None and (not is_whole(limit) or limit < 1):
        raise ConfigError(f"option --limit: must be a whole number >= 1, got {limit!r}")
    if not is_whole(seed) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"option --seed: must be a whole number in [0, {MAX_SEED}], got {seed!r}")
    if chunk_values is not None and chunk_values < 1:
        raise ConfigError(f"evaluate: chunk_values must be positive, got {chunk_values}")
    return int(k), (None if limit is None else int(limit)), int(seed)


def _scored_images(model, dataset, limit: int | None, binary: bool):
    """The test images the model is scored on, (N, D) float32: binarized for a Bernoulli model,
    grey levels for a density; and their labels (N,) for a conditional model, else None."""
    if binary:
        x = binarized_test_images(dataset, limit)  # (N, D) in {0, 1}
    else:  # a density of grey levels scores the grey levels themselves
        x = grey_test_images(dataset, limit)
    labels = None
    if model.config.conditional:
        y = getattr(dataset, "y_test", None)
        if y is None:
            raise DataError("evaluate: this conditional model needs the test labels, and the data has none")
        labels = torch.from_numpy(np.asarray(y, dtype=np.int64)[: len(x)])
        classes = model.config.num_classes
        if len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < classes):
            raise DataError(
                f"evaluate: the test labels run from {int(labels.min())} to {int(labels.max())}, but "
                f"this conditional model knows {classes} classes (0..{classes - 1}); did the data change?"
            )
    if x.shape[1] != model.config.input_dim:
        raise DataError(
            f"evaluate: the test images have {x.shape[1]} values each but the model expects "
            f"{model.config.input_dim} (input shape {tuple(model.image_shape)})"
        )
    return x, labels


def _bounds_of_all(model, x, labels, k: int, seed: int, rows: int, progress) -> tuple[torch.Tensor, ...]:
    """`image_bounds` over every image, chunk by chunk: per image the IWAE bound, ELBO,
    reconstruction and KL (N,), and over images the sums of the posterior means, of their squares
    and of the KL per dimension (latent,)."""
    param = next(model.parameters())
    device, dtype, acc = param.device, param.dtype, _accumulator(param.device)
    n = len(x)
    latent = sum(model.sizes) if hasattr(model, "sizes") else model.latent_dim  # every layer's means
    per = len(model.sizes) if hasattr(model, "sizes") else model.latent_dim  # KL per dim, or per layer
    iwae, elbo, recon, kl = (torch.empty(n, dtype=acc, device=device) for _ in range(4))
    mean_sum, mean_sq_sum = (torch.zeros(latent, dtype=acc, device=device) for _ in range(2))
    kl_dim_sum = torch.zeros(per, dtype=acc, device=device)
    images_per_chunk = max(1, rows // min(k, SAMPLE_BLOCK))
    for start in range(0, n, images_per_chunk):
        xb = x[start : start + images_per_chunk].to(device=device, dtype=dtype)  # (B, D)
        yb = None if labels is None else labels[start : start + len(xb)].to(device)
        r = image_bounds(model, xb, k, seed=seed, first_image=start, max_rows=rows, label=yb)
        end = start + len(xb)
        iwae[start:end], elbo[start:end] = r.iwae, r.elbo
        recon[start:end], kl[start:end] = -r.log_px_given_z, r.kl
        mean_sum += r.mean.to(acc).sum(0)
        mean_sq_sum += r.mean.to(acc).pow(2).sum(0)
        kl_dim_sum += r.kl_per_dim.to(acc).sum(0)
        if progress is not None:
            progress(len(xb))
    return iwae, elbo, recon, kl, mean_sum, mean_sq_sum, kl_dim_sum


def _stderr(values: torch.Tensor) -> float | None:
    """Standard error of the mean over images (None for a single image)."""
    if len(values) < 2:
        return None
    return values.std(unbiased=True).item() / math.sqrt(len(values))


def write_evaluation(run_dir: str | Path, result: dict[str, Any]) -> Path:
    """Write `result` to RUN/evaluation.json atomically; returns the path."""
    import json

    from vaelab.runs import atomic_write_text

    path = Path(run_dir) / EVALUATION
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    return path


__all__ = [
    "EVAL_BINARIZE_SEED",
    "ImageBounds",
    "bernoulli_log_px_rows",
    "binarized_test_images",
    "evaluate",
    "image_bounds",
    "log_weights",
    "posterior",
    "sample_noise",
    "write_evaluation",
]
