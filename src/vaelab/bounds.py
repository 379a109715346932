"""The importance-weighted estimator, per image: for each test image x, with K samples z_k ~ q(z|x),

    ELBO(x)   = mean_k log p(x|z_k) - KL(q(z|x) || p(z))                   (Kingma & Welling)
    IWAE_K(x) = log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x)  <=  log p(x)    (Burda et al., 2015)

in nats. The decoder runs on (images x samples) rows as one matrix product per chunk; log p(x|z)
of all rows comes from one batched matrix-vector product plus one softplus pass (no [N, K, D]
tensor ever exists: a running log-sum-exp per image carries the IWAE sum across sample chunks).
The samples of test image i come from its own torch.Generator seeded from (seed, i), so the
numbers depend on the seed only, not on chunk sizes or the device (up to floating-point rounding).
`vaelab.evaluate` runs this over a test set and sums it up.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F

from vaelab.errors import ConfigError
from vaelab.objectives import kl_per_dim, log_normal, log_standard_normal

DEFAULT_K = 5000
DEFAULT_SEED = 0
SAMPLE_BLOCK = 1000  # samples drawn per call from an image's generator (part of the noise's definition)


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
        blocks = sample_noise(seed, first_image, b, k, model.noise_dim, pin_memory=device.type == "cuda")
    if k < 1:
        raise ConfigError(f"option --importance-samples: must be at least 1, got {k}")
    if hasattr(model, "sample_terms"):  # a DeepVAE: every layer sampled, its KL a Monte Carlo mean
        return _deep_bounds(model, x, blocks, k, max_rows)
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


def _deep_bounds(model, x: torch.Tensor, blocks, k: int, max_rows: int) -> ImageBounds:
    """`image_bounds` of a DeepVAE: log w = log p(x|z_1) + sum_l log p(z_l|z_{l+1}) - log q(z|x)
    with every layer sampled from q; `kl` and `kl_per_dim` (here: per layer, (B, L)) are Monte
    Carlo means over the K samples, and `mean` is every layer's posterior mean, side by side."""
    b, device, acc = x.shape[0], x.device, _accumulator(x.device)
    layers = len(model.sizes)
    lse = torch.full((b,), -math.inf, dtype=x.dtype, device=device)
    sum_log_px = torch.zeros(b, dtype=acc, device=device)
    sum_log_w = torch.zeros(b, dtype=acc, device=device)
    sum_kl = torch.zeros(b, layers, dtype=acc, device=device)
    samples_per_piece = max(1, max_rows // b)
    for block in blocks:
        block = block.to(device=device, dtype=x.dtype, non_blocking=True)
        for eps in block.split(samples_per_piece, dim=1):  # (B, s, noise)
            s = eps.shape[1]
            rows = x.repeat_interleave(s, dim=0)  # (B * s, D): each image s times, as eps's rows
            t = model.sample_terms(rows, rows, eps.reshape(b * s, -1))
            log_w = t.log_weight.reshape(b, s)
            lse = torch.logaddexp(lse, torch.logsumexp(log_w, dim=1))
            sum_log_px += t.log_px_given_z.reshape(b, s).sum(1, dtype=acc)
            sum_log_w += log_w.sum(1, dtype=acc)
            sum_kl += t.kl.reshape(b, s, layers).sum(1, dtype=acc)
    means = torch.cat([m for m, _ in model.posterior_means(x)], dim=1)  # (B, sum of layer sizes)
    kl_layers = sum_kl / k
    return ImageBounds(
        log_px_given_z=sum_log_px / k,
        kl=kl_layers.sum(-1),
        kl_per_dim=kl_layers,
        mean=means,
        mc_elbo=sum_log_w / k,
        iwae=lse.to(acc) - math.log(k),
    )


def _accumulator(device: torch.device) -> torch.dtype:
    """float64 sums, except on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64
