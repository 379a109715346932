"""Losses as pure functions of tensors: per example, in nats, reduced by the caller.

Signs are in the names: `log_px_given_z` is a log-likelihood (<= 0 for Bernoulli),
`recon_nats` is its negation (the "reconstruction loss"), `kl_nats` is the KL divergence.

References:
    Kingma & Welling, Auto-Encoding Variational Bayes, 2014 (ELBO, Appendix B closed-form KL).
    Burda, Grosse & Salakhutdinov, Importance Weighted Autoencoders, 2015 (the IWAE bound).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)


def bernoulli_log_px(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """log p(x|z) under independent Bernoulli pixels, summed over pixels.

    Args:
        x: targets (..., D) in [0, 1] (grey levels give the seed's "BCE loss", not a likelihood).
        logits: decoder outputs (..., D).
    Returns:
        (...) log-probabilities in nats. Computed from logits: equals Keras'
        `784 * binary_crossentropy(x, sigmoid(logits))` (negated) without its 1e-7 clipping.
    """
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)


def continuous_bernoulli_log_px(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """log p(x|z) under independent continuous Bernoulli pixels (Loaiza-Ganem & Cunningham, 2019).

    The correctly normalised density for grey levels x in [0, 1]: the Bernoulli's term plus
    log C(lambda), C(lambda) = 2 atanh(1 - 2 lambda) / (1 - 2 lambda), lambda = sigmoid(logits).
    In logits, C = logits / tanh(logits / 2), which tends to 2 at logits = 0 (a Taylor series
    there keeps it stable). Summed over pixels: (...).
    """
    a = logits.abs().clamp_min(1e-3)
    log_c_far = torch.log(a) - torch.log(torch.tanh(a / 2))
    l2 = logits * logits
    log_c_near = math.log(2.0) + l2 / 12 - l2 * l2 / 1440
    log_c = torch.where(logits.abs() < 1e-3, log_c_near, log_c_far)
    return (log_c - F.binary_cross_entropy_with_logits(logits, x, reduction="none")).sum(-1)


def gaussian_log_px(x: torch.Tensor, logits: torch.Tensor, log_std: torch.Tensor | float) -> torch.Tensor:
    """log p(x|z) under independent Gaussian pixels N(x; sigmoid(logits), std^2), summed: (...).

    The seed's "mean squared error" option with its variance made explicit: a fixed std gives
    MSE * D / (2 std^2) plus a constant; `log_std` may also be a learned tensor (per pixel).
    """
    log_std = torch.as_tensor(log_std, dtype=logits.dtype, device=logits.device)
    mean = torch.sigmoid(logits)
    return (-0.5 * LOG_2PI - log_std - 0.5 * ((x - mean) * torch.exp(-log_std)).pow(2)).sum(-1)


def kl_standard_normal(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(log_var)) || N(0, I)) in closed form, summed over latent dims: (...,)."""
    return -0.5 * (1 + log_var - mean.pow(2) - log_var.exp()).sum(-1)


def kl_per_dim(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """The closed-form KL of each latent dimension separately: (..., latent_dim)."""
    return -0.5 * (1 + log_var - mean.pow(2) - log_var.exp())


def log_normal(z: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, diag(exp(log_var))), summed over the last dim."""
    return -0.5 * (LOG_2PI + log_var + (z - mean).pow(2) * torch.exp(-log_var)).sum(-1)


def log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I), summed over the last dim."""
    return -0.5 * (LOG_2PI + z.pow(2)).sum(-1)


def negative_elbo(log_px_given_z: torch.Tensor, kl_nats: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """The per-example loss -log p(x|z) + beta * KL (beta = 1: the negative ELBO), in nats."""
    return -log_px_given_z + beta * kl_nats


def iwae_bound(log_weights: torch.Tensor) -> torch.Tensor:
    """The importance-weighted bound log (1/K) sum_k w_k from log weights (K, ...) -> (...).

    log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x), z_k ~ q(z|x). K = 1 gives the ELBO
    estimate; the bound never decreases in expectation as K grows (Burda et al., Theorem 1).
    """
    k = log_weights.shape[0]
    return torch.logsumexp(log_weights, dim=0) - math.log(k)
