"""The VAE as a composition: encoder -> diagonal Gaussian q(z|x) -> reparameterized z -> decoder
-> Bernoulli p(x|z), against a standard normal prior p(z) = N(0, I).

Inputs are images flattened to (B, D) with D = C*H*W, values in [0, 1]. The decoder returns
logits; probabilities (the seed's `x_decoded_mean`) are their sigmoid.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from vaelab.config import ModelConfig
from vaelab.models.mlp import MLPDecoder, MLPEncoder
from vaelab.objectives import bernoulli_log_px, kl_standard_normal


class Terms(NamedTuple):
    """Per-example terms of one stochastic pass, each (B,) in nats."""

    log_px_given_z: torch.Tensor  # log p(x|z) at the sampled z (minus the "reconstruction loss")
    kl: torch.Tensor  # closed-form KL(q(z|x) || p(z))


class VAE(nn.Module):
    """A variational autoencoder built from a `ModelConfig`.

    Example:
        >>> model = VAE(ModelConfig(latent_dim=2))
        >>> mean, log_var = model.encode(torch.rand(5, 784))
        >>> images = model.sample(16, seed=0)  # (16, 784) in [0, 1]
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d, h, k, act = config.input_dim, config.hidden, config.latent_dim, config.activation
        self.encoder = MLPEncoder(d, h, k, act, config.init)
        self.decoder = MLPDecoder(k, h, d, act, config.init)

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @property
    def image_shape(self) -> tuple[int, ...]:
        return self.config.input_shape

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z|x): images (B, D) in [0, 1] (or (B, C, H, W)) -> (mean, log_var), each (B, latent)."""
        return self.encoder(x.reshape(x.shape[0], -1))

    def reparameterize(self, mean: torch.Tensor, log_var: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """z = mean + exp(log_var / 2) * epsilon_std * eps, eps ~ N(0, I): differentiable in both."""
        return mean + torch.exp(0.5 * log_var) * (self.config.epsilon_std * eps)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """p(x|z): latent codes (B, latent) -> pixel logits (B, D)."""
        return self.decoder(z)

    def terms(self, x: torch.Tensor, target: torch.Tensor, eps: torch.Tensor) -> Terms:
        """One stochastic pass: encode `x`, sample z with noise `eps` (B, latent), score `target`."""
        mean, log_var = self.encode(x)
        logits = self.decode(self.reparameterize(mean, log_var, eps))
        return Terms(bernoulli_log_px(target, logits), kl_standard_normal(mean, log_var))

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction logits (B, D) through a sampled z (eps drawn if not given)."""
        mean, log_var = self.encode(x)
        if eps is None:
            eps = torch.randn_like(mean)
        return self.decode(self.reparameterize(mean, log_var, eps))

    @torch.no_grad()
    def sample(self, n: int, seed: int | None = None) -> torch.Tensor:
        """The seed's generator: decode z ~ N(0, I), return probabilities (n, D) in [0, 1].

        The output has the layout of `encode`'s input, so `encode(sample(n))` works; reshape
        with `image_shape` for pictures.
        """
        device = next(self.parameters()).device
        g = torch.Generator(device="cpu")
        if seed is None:
            g.seed()
        else:
            g.manual_seed(seed)
        z = torch.randn(n, self.latent_dim, generator=g).to(device)
        return torch.sigmoid(self.decode(z))


def build_model(config: ModelConfig) -> VAE:
    """A freshly initialised VAE for `config` (uses torch's global RNG: seed it first)."""
    config.validate()
    return VAE(config)
