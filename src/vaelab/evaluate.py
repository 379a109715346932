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
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from vaelab.config import MAX_SEED, is_whole
from vaelab.data.binarize import TEST_BINARIZE_SEED
from vaelab.errors import ConfigError, DataError
from vaelab.objectives import kl_per_dim, log_normal, log_standard_normal
from vaelab.perf import reuse_freed_memory

# the one static binarization of the test set every model is scored on
EVAL_BINARIZE_SEED = TEST_BINARIZE_SEED
ACTIVE_THRESHOLD = 0.01  # a latent dim is active if Var_x E_q[z_u] exceeds this (Burda et al.)
DEFAULT_K = 5000
DEFAULT_SEED = 0
SAMPLE_BLOCK = 1000  # samples drawn per call from an image's generator (part of the noise's definition)
CHUNK_VALUES = {"cpu": 2**22, "other": 2**27}  # decoder outputs (rows x pixels) per matrix product
EVALUATION = "evaluation.json"


class ImageBounds(NamedTuple):
    """Per-image results for a batch of images, each (B,) in nats unless noted."""

    log_px_given_z: torch.Tensor  # mean over the K samples of log p(x|z_k)
    kl: torch.Tensor  # closed-form KL(q(z|x) || p(z))
    kl_per_dim: torch.Tensor  # (B, latent) the KL of each latent dimension
    mean: torch.Tensor  # (B, latent) the posterior means
    mc_elbo: torch.Tensor  # mean_k log w_k: the Monte Carlo ELBO on the same samples as `iwae`
    iwae: torch.Tensor  # log (1/K) sum_k w_k: the importance-weighted bound on log p(x)

    @property
    def elbo(self) -> torch.Tensor:
        """mean_k log p(x|z_k) - KL (closed form): the lower-variance ELBO estimate."""
        return self.log_px_given_z - self.kl


# --- the pieces: posterior, log weights, per-image bounds ---------------------------------


def posterior(model, x: torch.Tensor, label=None) -> tuple[torch.Tensor, torch.Tensor]:
    """q(z|x) as sampled by `model.reparameterize`: (mean, log_var), each (B, latent).

    The log-variance includes the model's `epsilon_std` (the seed's is 1.0), so that it is the
    density the samples really come from. A conditional model also takes the labels (B,).
    """
    mean, log_var = model.encode(x, label)
    return mean, log_var + 2.0 * math.log(model.config.epsilon_std)


def bernoulli_log_px_rows(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """log p(x|z) for many z per image: x (B, D) in {0, 1}, logits (B, S, D) -> (B, S) nats.

    sum_d x_d l_d - softplus(l_d): the x-term is a matrix-vector product per image, so the
    targets are never expanded to (B, S, D). Equals `objectives.bernoulli_log_px` (tested).
    """
    x = x.to(logits.dtype)
    if logits.device.type == "cpu" and len(x) <= 16:  # BLAS gemv: ~3x faster than bmm here
        x_dot_logits = torch.stack([torch.mv(rows, image) for rows, image in zip(logits, x, strict=True)])
    else:
        x_dot_logits = torch.bmm(logits, x.unsqueeze(-1)).squeeze(-1)  # (B, S)
    return x_dot_logits - F.softplus(logits).sum(-1)


def _log_weights(model, x, mean, log_var, eps, label=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(x|z), log w) at z = mean + std * eps; x (B, D), mean (B, L), eps (B, S, L)."""
    b, s, latent = eps.shape
    mean, log_var = mean.unsqueeze(1), log_var.unsqueeze(1)  # (B, 1, L)
    z = mean + torch.exp(0.5 * log_var) * eps  # = model.reparameterize(encoder's mean, log_var, eps)
    rows = None if label is None else label.repeat_interleave(s)  # each image's label, S times
    logits = model.decode(z.reshape(b * s, latent), rows).reshape(b, s, -1)  # (B, S, D)
    if model.config.likelihood == "bernoulli":
        log_px = bernoulli_log_px_rows(x, logits)  # (B, S)
    else:
        log_px = model.log_px(x.to(logits.dtype).unsqueeze(1).expand_as(logits), logits)
    log_w = log_px + log_standard_normal(z) - log_normal(z, mean, log_var)
    return log_px, log_w


def log_weights(model, x: torch.Tensor, eps: torch.Tensor, label=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance log weights of given standard-normal noise.

    Args:
        model: a VAE (encode / reparameterize / decode).
        x: binary images (B, D) (or (B, C, H, W)).
        eps: standard-normal noise (B, S, latent); z = mean + std * eps under q(z|x).
    Returns:
        (log p(x|z), log w), each (B, S) in nats, log w = log p(x|z) + log p(z) - log q(z|x).
    """
    x = x.reshape(x.shape[0], -1)
    mean, log_var = posterior(model, x, label)
    return _log_weights(model, x, mean, log_var, eps, label)


def sample_noise(
    seed: int, first_image: int, n_images: int, k: int, latent_dim: int, *, pin_memory: bool = False
) -> Iterator[torch.Tensor]:
    """The standard-normal noise of images first_image, first_image + 1, ... in blocks.

    Image i's K samples come from its own torch.Generator seeded from (seed, i), SAMPLE_BLOCK
    at a time, so they do not depend on which other images are evaluated alongside.
    Yields (n_images, <= SAMPLE_BLOCK, latent_dim) float32 CPU tensors (page-locked if
    `pin_memory`, for an asynchronous copy to a GPU), K samples in all.
    """
    gens = [
        torch.Generator().manual_seed(_image_seed(seed, i))
        for i in range(first_image, first_image + n_images)
    ]
    for start in range(0, k, SAMPLE_BLOCK):
        s = min(SAMPLE_BLOCK, k - start)
        block = torch.empty(n_images, s, latent_dim, pin_memory=pin_memory)  # (B, s, L)
        for row, g in zip(block, gens, strict=True):
            torch.randn(s, latent_dim, generator=g, out=row)
        yield block


def _image_seed(seed: int, i: int) -> int:
    # torch's CPU generator keeps 32 bits of a seed: this is one-to-one in i for a given seed.
    return (seed * 0x9E3779B1 + i) % 2**32


@torch.no_grad()
def image_bounds(
    model,
    x: torch.Tensor,
    k: int = DEFAULT_K,
    *,
    seed: int = DEFAULT_SEED,
    first_image: int = 0,
    noise: torch.Tensor | None = None,
    max_rows: int = 4096,
    label: torch.Tensor | None = None,
) -> ImageBounds:
    """ELBO and IWAE bound of each image in a batch, with K importance samples each.

    Args:
        model: a VAE in eval mode.
        x: binary images (B, D) (or (B, C, H, W)), on the model's device.
        k: importance samples per image (taken from `noise` when that is given).
        seed, first_image: the per-image noise streams (see `sample_noise`); x[j] is test
            image first_image + j.
        noise: explicit standard-normal noise (B, K, latent) instead of the seeded streams.
        max_rows: at most this many (image, sample) rows are decoded at once (memory: about
            3 * max_rows * D values); the results do not depend on it.
        label: the images' labels (B,), for a conditional model.
    Returns:
        ImageBounds (per image, on x's device).
    """
    x = x.reshape(x.shape[0], -1)  # (B, D)
    b, device = x.shape[0], x.device
    if noise is not None:
        k = noise.shape[1]
        blocks: Iterable[torch.Tensor] = noise.split(SAMPLE_BLOCK, dim=1)
    else:
        blocks = sample_noise(seed, first_image, b, k, model.latent_dim, pin_memory=device.type == "cuda")
    if k < 1:
        raise ConfigError(f"option --importance-samples: must be at least 1, got {k}")
    mean, log_var = posterior(model, x, label)  # (B, L) each
    lse = torch.full((b,), -math.inf, dtype=mean.dtype, device=device)  # running log sum_k w_k
    sum_log_px = torch.zeros(b, dtype=_accumulator(device), device=device)
    sum_log_w = torch.zeros(b, dtype=_accumulator(device), device=device)
    samples_per_piece = max(1, max_rows // b)
    for block in blocks:
        block = block.to(device=device, dtype=mean.dtype, non_blocking=True)  # overlaps GPU work
        for eps in block.split(samples_per_piece, dim=1):  # (B, s, L)
            log_px, log_w = _log_weights(model, x, mean, log_var, eps, label)  # (B, s) each
            lse = torch.logaddexp(lse, torch.logsumexp(log_w, dim=1))
            sum_log_px += log_px.sum(1, dtype=_accumulator(device))
            sum_log_w += log_w.sum(1, dtype=_accumulator(device))
    per_dim = kl_per_dim(mean, log_var)  # (B, L)
    return ImageBounds(
        log_px_given_z=sum_log_px / k,
        kl=per_dim.sum(-1).to(_accumulator(device)),
        kl_per_dim=per_dim,
        mean=mean,
        mc_elbo=sum_log_w / k,
        iwae=lse.to(_accumulator(device)) - math.log(k),
    )


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
    if not is_whole(k) or k < 1:
        raise ConfigError(f"option --importance-samples: must be a whole number >= 1, got {k!r}")
    if limit is not None and (not is_whole(limit) or limit < 1):
        raise ConfigError(f"option --limit: must be a whole number >= 1, got {limit!r}")
    if not is_whole(seed) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"option --seed: must be a whole number in [0, {MAX_SEED}], got {seed!r}")
    k, limit, seed = int(k), (None if limit is None else int(limit)), int(seed)
    if chunk_values is not None and chunk_values < 1:
        raise ConfigError(f"evaluate: chunk_values must be positive, got {chunk_values}")
    started = time.perf_counter()
    binary = model.config.likelihood == "bernoulli"
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
    n, d = x.shape
    if d != model.config.input_dim:
        raise DataError(
            f"evaluate: the test images have {d} values each but the model expects "
            f"{model.config.input_dim} (input shape {tuple(model.image_shape)})"
        )
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    budget = chunk_values or CHUNK_VALUES["cpu" if device.type == "cpu" else "other"]
    rows = max(1, budget // d)  # (image, sample) rows per matrix product
    images_per_chunk = max(1, rows // min(k, SAMPLE_BLOCK))
    if device.type == "cpu":
        reuse_freed_memory()

    latent = model.latent_dim
    iwae = torch.empty(n, dtype=_accumulator(device), device=device)
    elbo = torch.empty(n, dtype=_accumulator(device), device=device)
    recon = torch.empty(n, dtype=_accumulator(device), device=device)
    kl = torch.empty(n, dtype=_accumulator(device), device=device)
    mean_sum = torch.zeros(latent, dtype=_accumulator(device), device=device)
    mean_sq_sum = torch.zeros(latent, dtype=_accumulator(device), device=device)
    kl_dim_sum = torch.zeros(latent, dtype=_accumulator(device), device=device)

    was_training = model.training
    model.eval()
    torch.set_flush_denormal(True)  # tiny probabilities must not slow the softplus
    try:
        with torch.inference_mode():
            for start in range(0, n, images_per_chunk):
                xb = x[start : start + images_per_chunk].to(device=device, dtype=dtype)  # (B, D)
                yb = None if labels is None else labels[start : start + len(xb)].to(device)
                r = image_bounds(model, xb, k, seed=seed, first_image=start, max_rows=rows, label=yb)
                end = start + len(xb)
                iwae[start:end], elbo[start:end] = r.iwae, r.elbo
                recon[start:end], kl[start:end] = -r.log_px_given_z, r.kl
                mean_sum += r.mean.to(_accumulator(device)).sum(0)
                mean_sq_sum += r.mean.to(_accumulator(device)).pow(2).sum(0)
                kl_dim_sum += r.kl_per_dim.to(_accumulator(device)).sum(0)
                if progress is not None:
                    progress(len(xb))
    finally:
        torch.set_flush_denormal(False)  # the default (torch cannot report the previous mode)
        model.train(was_training)

    iwae, elbo, recon, kl = (t.cpu() for t in (iwae, elbo, recon, kl))
    mean_sum, mean_sq_sum, kl_dim_sum = (t.cpu() for t in (mean_sum, mean_sq_sum, kl_dim_sum))
    # Var over images of each dim's posterior mean (the IWAE paper's activity statistic)
    mean_var = (mean_sq_sum - mean_sum.pow(2) / n) / max(n - 1, 1)
    nll = -iwae.mean().item()
    return {
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
        "latent_dim": latent,
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
        "device": str(device),
        "seconds": time.perf_counter() - started,
    }


def _accumulator(device: torch.device) -> torch.dtype:
    """float64 sums, except on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


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
