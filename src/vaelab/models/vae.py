"""The VAE as a composition: encoder -> diagonal Gaussian q(z|x) -> reparameterized z -> decoder
-> likelihood p(x|z), against a standard normal prior p(z) = N(0, I).

Inputs are images flattened to (B, D) with D = C*H*W, values in [0, 1]. The decoder returns
logits; the likelihood (`ModelConfig.likelihood`) turns them into a density of the pixels, and
their sigmoid is the mean image (the seed's `x_decoded_mean`). The encoder and decoder are an MLP
(the seed) or convolutions; a conditional VAE gives both the label's one-hot code.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vaelab.config import MAX_SEED, OBJECTIVES, ModelConfig, is_whole
from vaelab.models.conv import ConvDecoder, ConvEncoder
from vaelab.models.mlp import MLPDecoder, MLPEncoder
from vaelab.objectives import (
    bernoulli_log_px,
    continuous_bernoulli_log_px,
    gaussian_log_px,
    iwae_bound,
    kl_standard_normal,
    log_normal,
    log_standard_normal,
)


def clip_logit(clip: float) -> float:
    """The logit of 1 - clip: clipping probabilities to [clip, 1 - clip] clamps logits to +-this."""
    return math.log((1 - clip) / clip)


# a learned per-pixel std stays in [e^-5, e^2]: a pixel that is always 0 (MNIST's border) would
# otherwise drive its std to 0 and the likelihood to infinity
LOG_STD_RANGE = (-5.0, 2.0)


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
        config.validate()  # an unknown activation or likelihood is one line here, not a KeyError later
        if config.conditional and config.num_classes < 2:
            from vaelab.errors import ConfigError

            raise ConfigError(
                f"option --conditional: needs labels of at least 2 classes, got {config.num_classes}"
            )
        self.config = config
        d, h, k, act = config.input_dim, config.hidden, config.latent_dim, config.activation
        c = config.num_classes if config.conditional else 0
        if config.architecture == "conv":
            ch = config.conv_channels
            self.encoder = ConvEncoder(config.input_shape, ch, h, k, act, c, config.init)
            self.decoder = ConvDecoder(config.input_shape, ch, h, k, act, c, config.init)
        else:
            self.encoder = MLPEncoder(d + c, h, k, act, config.init)
            self.decoder = MLPDecoder(k + c, h, d, act, config.init)
        if config.likelihood == "gaussian-learned":
            self.log_std = nn.Parameter(torch.full((d,), math.log(0.1)))  # one std per pixel

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @property
    def noise_dim(self) -> int:
        """Standard-normal numbers one sample of z takes (DeepVAE: one per dimension of each layer)."""
        return self.config.latent_dim

    @property
    def image_shape(self) -> tuple[int, ...]:
        return self.config.input_shape

    def _cond(self, label, like: torch.Tensor) -> torch.Tensor | None:
        """The one-hot code (n, num_classes) of `label` (an int or n ints) for a conditional VAE,
        n = len(like), in like's dtype and device; None for an unconditional one."""
        if not self.config.conditional:
            if label is not None:
                raise ValueError("this model is not conditional: it takes no label")
            return None  # (the batch size is not read here: ONNX export keeps it dynamic)
        n, device = len(like), like.device
        if label is None:
            raise ValueError(f"this conditional model needs a label (0..{self.config.num_classes - 1})")
        label = torch.as_tensor(label, device=device)
        if label.is_floating_point() or label.is_complex() or label.dtype == torch.bool or label.dim() > 1:
            raise TypeError(
                f"labels must be an int or a 1-D tensor of ints, got {label.dtype} {tuple(label.shape)}"
            )
        label = label.long().reshape(-1)
        if label.numel() == 1:
            label = label.expand(n)
        if len(label) != n or (n and (label.min() < 0 or label.max() >= self.config.num_classes)):
            raise ValueError(f"labels must be {n} values in 0..{self.config.num_classes - 1}")
        return F.one_hot(label, self.config.num_classes).to(like.dtype)

    def encode(self, x: torch.Tensor, label=None) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z|x): images (B, D) in [0, 1] (or (B, C, H, W)) -> (mean, log_var), each (B, latent).

        A conditional model also takes the labels (an int or B ints). Floating-point images of
        another dtype (float64 from numpy's `pixels / 255`) are cast to the model's."""
        if not x.is_floating_point():  # raw uint8 pixels are the likely mistake
            raise TypeError(f"encode: images must be floating point in [0, 1] (pixels / 255), got {x.dtype}")
        if x.dim() < 2:
            raise ValueError(f"encode: images must be a batch (B, D) or (B, C, H, W), got {tuple(x.shape)}")
        x = x.flatten(1).to(self._dtype())
        if x.shape[1] != self.config.input_dim:
            raise ValueError(
                f"encode: images of {x.shape[1]} values each; this model takes {self.config.input_dim} "
                f"(input shape {tuple(self.config.input_shape)})"
            )
        return self.encoder(x, self._cond(label, x))

    def reparameterize(self, mean: torch.Tensor, log_var: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """z = mean + exp(log_var / 2) * epsilon_std * eps, eps ~ N(0, I): differentiable in both."""
        return mean + torch.exp(0.5 * log_var) * (self.config.epsilon_std * eps)

    def decode(self, z: torch.Tensor, label=None) -> torch.Tensor:
        """p(x|z): latent codes (B, latent) -> pixel logits (B, D) (a conditional model: and labels).

        A z of another floating-point dtype is cast to the model's."""
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"decode: z must be (B, {self.latent_dim}), got shape {tuple(z.shape)}")
        if not z.is_floating_point():
            raise TypeError(f"decode: z must be floating point, got {z.dtype}")
        z = z.to(self._dtype())
        return self.decoder(z, self._cond(label, z))

    def _dtype(self) -> torch.dtype:
        """The weights' dtype (float32 unless the model was converted)."""
        return next(self.parameters()).dtype

    def log_px(self, target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """log p(target|z) under the model's likelihood, summed over pixels: (...) nats."""
        kind = self.config.likelihood
        if kind == "bernoulli":
            if self.config.bernoulli_clip:  # Keras' clipped probabilities (the seed's loss)
                bound = clip_logit(self.config.bernoulli_clip)
                logits = logits.clamp(-bound, bound)
            return bernoulli_log_px(target, logits)
        if kind == "continuous-bernoulli":
            return continuous_bernoulli_log_px(target, logits)
        if kind == "gaussian":
            return gaussian_log_px(target, logits, math.log(self.config.gaussian_std))
        return gaussian_log_px(target, logits, self.log_std.clamp(*LOG_STD_RANGE))

    def mean_image(self, logits: torch.Tensor) -> torch.Tensor:
        """E[x|z] in [0, 1] from the decoder's logits: sigmoid(logits) for the Bernoulli and the
        Gaussians; for the continuous Bernoulli its mean lambda / (2 lambda - 1) + 1 / (2 atanh(1 - 2
        lambda)), lambda = sigmoid(logits), which in logits is lambda / tanh(l / 2) - 1 / l."""
        probabilities = torch.sigmoid(logits)
        if self.config.likelihood != "continuous-bernoulli":
            return probabilities
        near = logits.abs() < 1e-2  # the series 1/2 + l/12 - l^3/720 there (the formula is 0/0 at 0)
        safe = torch.where(near, torch.ones_like(logits), logits)
        far = probabilities / torch.tanh(safe / 2) - 1 / safe
        return torch.where(near, 0.5 + logits / 12 - logits**3 / 720, far).clamp(0, 1)

    def terms(self, x: torch.Tensor, target: torch.Tensor, eps: torch.Tensor, label=None) -> Terms:
        """One stochastic pass: encode `x`, sample z with noise `eps` (B, latent), score `target`."""
        mean, log_var = self.encode(x, label)
        logits = self.decode(self.reparameterize(mean, log_var, eps), label)
        return Terms(self.log_px(target.reshape(len(logits), -1), logits), kl_standard_normal(mean, log_var))

    def losses(
        self, x, target, eps, label=None, objective: str = "elbo", beta: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The training objective with K samples per image: eps (K, B, latent) or, for one sample,
        (B, latent) -> (loss, recon, kl).

        Each is (B,) nats. elbo: loss = mean_k -log p(x|z_k) + beta * KL (closed form);
        iwae: loss = -log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x) (Burda et al.). `recon` is
        mean_k -log p(x|z_k) and `kl` the closed-form KL either way (for the logs).
        """
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        if eps.dim() not in (2, 3) or eps.shape[-2] != len(x):
            raise ValueError(
                f"eps must be (B, latent) or (K, B, latent) with B = {len(x)}, got {tuple(eps.shape)}"
            )
        eps = eps.reshape(-1, len(x), eps.shape[-1])  # (K, B, latent)
        k, b, latent = eps.shape
        mean, log_var = self.encode(x, label)
        z = self.reparameterize(mean, log_var, eps)  # (K, B, L)
        if label is not None:  # each image's label (one for all, or B), for each of the K samples
            label = torch.as_tensor(label, device=x.device).reshape(-1).expand(b).repeat(k)
        logits = self.decode(z.reshape(k * b, latent), label).reshape(k, b, -1)
        log_px = self.log_px(target.reshape(b, -1).expand_as(logits), logits)  # (K, B)
        kl = kl_standard_normal(mean, log_var)
        recon = -log_px.mean(0)
        if objective == "iwae":
            q_log_var = log_var + 2.0 * math.log(self.config.epsilon_std)  # q's real variance
            log_w = log_px + log_standard_normal(z) - log_normal(z, mean, q_log_var)  # (K, B)
            return -iwae_bound(log_w), recon, kl
        return recon + beta * kl, recon, kl

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None, label=None) -> torch.Tensor:
        """Reconstruction logits (B, D) through a sampled z (eps drawn if not given)."""
        mean, log_var = self.encode(x, label)
        if eps is None:
            eps = torch.randn_like(mean)
        return self.decode(self.reparameterize(mean, log_var, eps), label)

    @torch.no_grad()
    def sample(self, n: int, seed: int | None = None, label=None) -> torch.Tensor:
        """The seed's generator: decode z ~ N(0, I), return mean images E[x|z] (n, D) in [0, 1].

        seed: the same seed gives the same images; None draws a fresh seed (torch.manual_seed does
        not fix it). A conditional model draws the digits of `label` (an int or n ints); without
        one, labels cycle 0, 1, ..., num_classes - 1. The output has the layout of `encode`'s input
        (so an unconditional model's `encode(sample(n))` works); reshape with `image_shape` for
        pictures. No gradient is kept (decode z yourself for that).
        """
        if not is_whole(n) or n < 0:
            raise ValueError(f"sample: n must be a whole number >= 0, got {n!r}")
        if seed is not None and (not is_whole(seed) or not 0 <= seed <= MAX_SEED):
            raise ValueError(f"sample: seed must be None or a whole number in [0, {MAX_SEED}], got {seed!r}")
        weight = next(self.parameters())
        g = torch.Generator(device="cpu")
        if seed is None:
            g.seed()
        else:
            g.manual_seed(int(seed))
        z = torch.randn(int(n), self.latent_dim, generator=g).to(weight.device, weight.dtype)
        if self.config.conditional and label is None:
            label = torch.arange(n) % self.config.num_classes
        return self.mean_image(self.decode(z, label))
