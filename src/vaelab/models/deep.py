"""Beyond one Gaussian layer under N(0, I): hierarchies of stochastic layers, the VampPrior and
inverse autoregressive flows, as one composable model (the classic VAE stays `models.vae.VAE`).

Layers z_1 (the bottom, `latent_dim`) ... z_L (`upper_latents`, bottom to top). The generative path
is top-down: p(z_L) p(z_{L-1}|z_L) ... p(z_1|z_2) p(x|z_1), each conditional a diagonal Gaussian (a
Bernoulli for x) from an MLP. p(z_L) is N(0, I), or a VampPrior: the mixture (1/K) sum_k q(z_L|u_k)
of the posterior at K learned pseudo-inputs u_k (Tomczak & Welling, 2018). Inference is
  bottom-up: q(z_1|x) q(z_2|z_1) ... q(z_L|z_{L-1}) (the IWAE paper's two-layer model), or
  ladder: a deterministic bottom-up pass gives each layer a Gaussian (m_l, v_l); then top-down,
    q(z_L|x) = N(m_L, v_L) and q(z_l|z_{l+1}, x) is the precision-weighted product of N(m_l, v_l)
    and the prior's p(z_l|z_{l+1}) (Sønderby et al., 2016).
A one-layer model may add T inverse autoregressive flow steps to its Gaussian posterior (Kingma et
al., 2016): z <- sigma * z + (1 - sigma) * mu with (mu, sigma) from a masked (MADE) network of z and
the encoder's last hidden layer, log q falling by sum log sigma each step.

Everything is per sample: `sample_terms` gives log p(x|z_1), the log-density of each layer under the
prior and the posterior, from noise eps (N, noise_dim) laid out [z_1 | z_2 | ... | z_L]. The ELBO
and the importance-weighted bound of any of these models are sums of those terms; their KL is a
Monte Carlo estimate (log q - log p at the sample), as no closed form exists.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vaelab.config import MAX_SEED, OBJECTIVES, ModelConfig, is_whole
from vaelab.models.mlp import dense, mlp
from vaelab.models.vae import Terms, clip_logit
from vaelab.objectives import LOG_2PI, bernoulli_log_px, iwae_bound, log_normal, log_standard_normal

# The least log-variance a layer's Gaussian may have (a standard deviation of 0.0067). Without a
# floor, a ladder's conditional prior p(z_l | z_l+1) on a dimension the posterior copies can
# shrink without bound (log-variance -35 after 34 epochs), until float32 rounding of z = mean +
# std * eps makes the loss NaN. Trained models stay far above it (-6.3 at the lowest in the
# two-layer runs of benchmarks/results/frontier), where the clamp changes nothing.
LOG_VAR_FLOOR = -10.0


class GaussianNet(nn.Module):
    """An MLP from n_in through `hidden` to a diagonal Gaussian's (mean, log_var) of n_out dims,
    the log-variance floored at LOG_VAR_FLOOR; also returns its last hidden layer (the flow's
    context)."""

    def __init__(self, n_in: int, hidden, n_out: int, activation: str, init: str):
        super().__init__()
        self.body = mlp([n_in, *hidden], activation, init) if hidden else nn.Identity()
        last = hidden[-1] if hidden else n_in
        self.mean, self.log_var = dense(last, n_out, init), dense(last, n_out, init)

    def forward(self, x: torch.Tensor):
        h = self.body(x)
        return self.mean(h), self.log_var(h).clamp(min=LOG_VAR_FLOOR), h


class MaskedLinear(nn.Linear):
    def __init__(self, n_in: int, n_out: int, mask: torch.Tensor):
        super().__init__(n_in, n_out)
        self.register_buffer("mask", mask)

    def forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)


class IAFStep(nn.Module):
    """One inverse autoregressive flow step: a MADE network gives (mu, s) with mu_d and s_d depending
    on z_{<d} only (and on the context), z <- sigmoid(s) * z + (1 - sigmoid(s)) * mu."""

    def __init__(self, dim: int, hidden: int, context: int):
        super().__init__()
        degrees_in = torch.arange(1, dim + 1)
        degrees_hidden = torch.arange(hidden) % max(dim - 1, 1) + 1
        self.inner = MaskedLinear(dim, hidden, (degrees_hidden[:, None] >= degrees_in[None, :]).float())
        out_mask = (degrees_in[:, None] > degrees_hidden[None, :]).float()
        self.mu, self.s = MaskedLinear(hidden, dim, out_mask), MaskedLinear(hidden, dim, out_mask)
        self.context = nn.Linear(context, hidden)
        nn.init.constant_(self.s.bias, 2.0)  # sigmoid(2) = 0.88: close to the identity at first

    def forward(self, z: torch.Tensor, context: torch.Tensor):
        h = F.elu(self.inner(z) + self.context(context))
        gate = torch.sigmoid(self.s(h))
        return gate * z + (1 - gate) * self.mu(h), F.logsigmoid(self.s(h)).sum(-1)  # z, log det


class SampleTerms(NamedTuple):
    """Per sample, each (N,) nats unless noted."""

    log_px_given_z: torch.Tensor  # log p(x|z_1)
    log_p: torch.Tensor  # (N, L) log p(z_l|z_{l+1}) of each layer (log p(z_L) for the top)
    log_q: torch.Tensor  # (N, L) log q of each layer's sample (the top's flow included)

    @property
    def kl(self) -> torch.Tensor:  # (N, L) the Monte Carlo KL of each layer: log q - log p
        return self.log_q - self.log_p

    @property
    def log_weight(self) -> torch.Tensor:
        return self.log_px_given_z + self.log_p.sum(-1) - self.log_q.sum(-1)


class DeepVAE(nn.Module):
    """A VAE with stochastic layers above z (or a VampPrior, or a flow posterior); see the module.

    `encode(x)` gives the top layer's posterior (mean, log_var) (before a flow), `decode(z)` the
    pixel logits of a top-layer z (lower layers at their prior means), `sample(n)` images drawn
    ancestrally from the prior: the same interface as `VAE`, for the top layer."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        d, act, init = config.input_dim, config.activation, config.init
        self.sizes = (config.latent_dim, *config.upper_latents)  # z_1 .. z_L
        below = (d, *self.sizes[:-1])  # the input of each layer's inference network
        hidden = [config.hidden] + [config.upper_hidden] * (len(self.sizes) - 1)
        if config.inference == "ladder":  # deterministic bottom-up networks, then a Gaussian head each
            nets, n_in = [], d
            for h, size in zip(hidden, self.sizes, strict=True):
                nets.append(GaussianNet(n_in, h, size, act, init))
                n_in = h[-1]
            self.up = nn.ModuleList(nets)
        else:
            self.up = nn.ModuleList(
                GaussianNet(n_in, h, size, act, init)
                for n_in, h, size in zip(below, hidden, self.sizes, strict=True)
            )
        # p(z_l | z_{l+1}) for l = 1..L-1, mirrored networks
        self.down = nn.ModuleList(
            GaussianNet(self.sizes[i + 1], tuple(reversed(config.upper_hidden)), self.sizes[i], act, init)
            for i in range(len(self.sizes) - 1)
        )
        self.decoder = mlp([self.sizes[0], *reversed(config.hidden)], act, init)
        self.out = dense(config.hidden[0], d, init)
        if config.prior == "vamp":  # pseudo-inputs in [0, 1] (a sigmoid of learned logits), from N(0, 0.1)
            self.pseudo_logits = nn.Parameter(torch.randn(config.pseudo_inputs, d) * 0.1)
        self.flows = nn.ModuleList(
            IAFStep(self.sizes[0], config.flow_hidden, config.hidden[-1]) for _ in range(config.flow_steps)
        )

    # --- the interface of VAE ------------------------------------------------------------------

    @property
    def latent_dim(self) -> int:
        return self.sizes[-1]

    @property
    def noise_dim(self) -> int:
        return sum(self.sizes)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return self.config.input_shape

    def encode(self, x: torch.Tensor, label=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The top layer's posterior (mean, log_var), each (B, top), lower layers at their means."""
        if label is not None:
            raise ValueError("this model is not conditional: it takes no label")
        if not x.is_floating_point():  # raw uint8 pixels are the likely mistake
            raise TypeError(f"encode: images must be floating point in [0, 1] (pixels / 255), got {x.dtype}")
        x = x.flatten(1).to(self.out.weight.dtype)
        return self.posterior_means(x)[-1]

    def decode(self, z: torch.Tensor, label=None) -> torch.Tensor:
        """Pixel logits (B, D) of a top-layer z (B, top), the layers below at their prior means."""
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"decode: z must be (B, {self.latent_dim}), got shape {tuple(z.shape)}")
        z = z.to(self.out.weight.dtype)
        for net in reversed(self.down):
            z = net(z)[0]
        return self._logits(z)

    def mean_image(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)

    def log_px(self, target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return bernoulli_log_px(target, logits)

    @torch.no_grad()
    def sample(self, n: int, seed: int | None = None, label=None) -> torch.Tensor:
        """Images (n, D) in [0, 1]: z_L from the prior, each layer below drawn from p(z_l|z_{l+1})."""
        if not is_whole(n) or n < 0:
            raise ValueError(f"sample: n must be a whole number >= 0, got {n!r}")
        if seed is not None and (not is_whole(seed) or not 0 <= seed <= MAX_SEED):
            raise ValueError(f"sample: seed must be None or a whole number in [0, {MAX_SEED}], got {seed!r}")
        g = torch.Generator()
        if seed is None:
            g.seed()
        else:
            g.manual_seed(int(seed))
        weight = self.out.weight
        z = torch.randn(int(n), self.latent_dim, generator=g).to(weight.device, weight.dtype)
        if self.config.prior == "vamp":
            mean, log_var = self._prior_components()
            k = torch.randint(len(mean), (int(n),), generator=g).to(weight.device)
            z = mean[k] + torch.exp(0.5 * log_var[k]) * z
        for net in reversed(self.down):
            mean, log_var, _ = net(z)
            z = mean + torch.exp(0.5 * log_var) * torch.randn(z.shape[0], mean.shape[1], generator=g).to(z)
        return torch.sigmoid(self._logits(z))

    # --- the pieces ------------------------------------------------------------------------------

    def _logits(self, z1: torch.Tensor) -> torch.Tensor:
        return self.out(self.decoder(z1))

    def _up(self, x: torch.Tensor, sample) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The bottom-up pass: each layer's (mean, log_var, hidden). `sample(l, mean, log_var)` gives
        the z_l fed to the next layer (bottom-up inference); a ladder feeds its hidden layer."""
        out, h = [], x
        for level, net in enumerate(self.up):
            mean, log_var, hidden = net(h)
            out.append((mean, log_var, hidden))
            h = hidden if self.config.inference == "ladder" else sample(level, mean, log_var)
        return out

    def posterior_means(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's posterior (mean, log_var) with every sample at its mean, bottom to top."""
        up = self._up(x, lambda level, mean, log_var: mean)
        if self.config.inference != "ladder":
            return [(m, v) for m, v, _ in up]
        out = [None] * len(up)
        mean, log_var = up[-1][0], up[-1][1]
        out[-1] = (mean, log_var)
        z = mean
        for level in reversed(range(len(up) - 1)):
            mean, log_var = _precision_weighted(up[level][0], up[level][1], *self.down[level](z)[:2])
            out[level] = (mean, log_var)
            z = mean
        return out

    def _prior_components(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The VampPrior's components: the top layer's posterior at each pseudo-input (K, top)."""
        return self.posterior_means(torch.sigmoid(self.pseudo_logits))[-1]

    def _log_prior_top(self, z: torch.Tensor) -> torch.Tensor:
        if self.config.prior != "vamp":
            return log_standard_normal(z)
        mean, log_var = self._prior_components()  # (K, top)
        if z.device.type == "mps":  # no float64 there (see below): the elementwise form
            log_each = log_normal(z[:, None, :], mean[None], log_var[None])  # (N, K)
            return torch.logsumexp(log_each, dim=1) - math.log(len(mean))
        # log N(z; m_k, v_k) for every row and component as two matrix products rather than an
        # (N, K, top) elementwise pass: -0.5 * (z^2 @ (1/v_k) - 2 z @ (m_k/v_k) + c_k). In float64,
        # since the expanded terms cancel (with a variance of e^-10 each is about 1e5 times their
        # sum; float32 was off by 0.05 nats in a test). `vaelab evaluate`'s 5,000 samples per image
        # then cost seconds per thousand images rather than minutes
        zw, mean, log_var = z.double(), mean.double(), log_var.double()
        precision = torch.exp(-log_var)  # (K, top)
        const = (LOG_2PI + log_var + mean * mean * precision).sum(-1)  # (K,)
        quad = (zw * zw) @ precision.t() - 2.0 * (zw @ (mean * precision).t())  # (N, K)
        log_each = -0.5 * (quad + const)
        return (torch.logsumexp(log_each, dim=1) - math.log(len(mean))).to(z.dtype)

    def sample_terms(
        self, x: torch.Tensor, target: torch.Tensor, eps: torch.Tensor, clip: bool = False
    ) -> SampleTerms:
        """One sample of every layer for each row: x, target (N, D), eps (N, noise_dim) -> terms.
        clip: the training loss's Keras clipping of probabilities (`bernoulli_clip`); the
        evaluation never clips."""
        noise = list(eps.split(self.sizes, dim=-1))
        std = self.config.epsilon_std
        zs: list[torch.Tensor | None] = [None] * len(self.sizes)
        log_q = [None] * len(self.sizes)

        def draw(level, mean, log_var):
            log_var = log_var + 2.0 * math.log(std)  # q's real variance (epsilon_std 1: as it is)
            z = mean + torch.exp(0.5 * log_var) * noise[level]
            zs[level], log_q[level] = z, log_normal(z, mean, log_var)
            return z

        up = self._up(x, draw)
        if self.config.inference == "ladder":  # top-down: the top from its own head, then combined
            draw(len(up) - 1, up[-1][0], up[-1][1])
            for level in reversed(range(len(up) - 1)):
                p_mean, p_log_var, _ = self.down[level](zs[level + 1])
                draw(level, *_precision_weighted(up[level][0], up[level][1], p_mean, p_log_var))
        if self.flows:  # one layer: the flow moves z_1 and lowers log q by each step's log det
            z, context = zs[0], up[0][2]
            for i, step in enumerate(self.flows):
                z, log_det = step(z if i % 2 == 0 else z.flip(-1), context)
                z = z if i % 2 == 0 else z.flip(-1)
                log_q[0] = log_q[0] - log_det
            zs[0] = z
        log_p = [log_normal(zs[level], *self.down[level](zs[level + 1])[:2]) for level in range(len(zs) - 1)]
        log_p.append(self._log_prior_top(zs[-1]))
        logits = self._logits(zs[0])
        if clip and self.config.bernoulli_clip:
            bound = clip_logit(self.config.bernoulli_clip)
            logits = logits.clamp(-bound, bound)
        log_px = bernoulli_log_px(target, logits)
        return SampleTerms(log_px, torch.stack(log_p, -1), torch.stack(log_q, -1))

    def terms(self, x: torch.Tensor, target: torch.Tensor, eps: torch.Tensor, label=None):
        """One stochastic pass, as `VAE.terms`: (log p(x|z), KL) each (B,), the KL a Monte Carlo sum."""
        t = self.sample_terms(x.flatten(1), target.reshape(len(x), -1), eps, clip=True)
        return Terms(t.log_px_given_z, t.kl.sum(-1))

    def losses(
        self, x, target, eps, label=None, objective: str = "elbo", beta: float = 1.0, free_bits: float = 0.0
    ):
        """The training objective with K samples per image, as `VAE.losses`: eps (K, B, noise) or
        (B, noise) -> (loss, recon, kl), each (B,) nats. Free bits: each layer's KL counts as at
        least free_bits nats per dimension while its batch mean is below that."""
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        if eps.dim() not in (2, 3) or eps.shape[-2] != len(x) or eps.shape[-1] != self.noise_dim:
            raise ValueError(
                f"eps must be (B, {self.noise_dim}) or (K, B, {self.noise_dim}) with B = {len(x)}, "
                f"got {tuple(eps.shape)}"
            )
        eps = eps.reshape(-1, len(x), eps.shape[-1])  # (K, B, noise)
        k, b, _ = eps.shape
        flat_x = x.flatten(1).repeat(k, 1)
        t = self.sample_terms(flat_x, target.reshape(b, -1).repeat(k, 1), eps.reshape(k * b, -1), clip=True)
        recon = -t.log_px_given_z.reshape(k, b).mean(0)
        kl_layers = t.kl.reshape(k, b, -1)  # (K, B, L)
        kl = kl_layers.sum(-1).mean(0)
        if objective == "iwae":
            return -iwae_bound(t.log_weight.reshape(k, b)), recon, kl
        if free_bits:
            floor = free_bits * torch.tensor(self.sizes, dtype=kl_layers.dtype, device=kl_layers.device)
            below = kl_layers.mean((0, 1)) < floor  # (L,) a layer whose batch mean is under its floor
            kl_layers = torch.where(below, floor.expand_as(kl_layers), kl_layers)  # counts as the floor
        return recon + beta * kl_layers.sum(-1).mean(0), recon, kl


def _precision_weighted(m_up, log_var_up, m_prior, log_var_prior):
    """The product of two diagonal Gaussians, renormalised: (mean, log_var). Computed from the
    log-variances (logaddexp and sigmoid weights), so no precision overflows."""
    log_var = -torch.logaddexp(-log_var_up, -log_var_prior)
    weight_up = torch.sigmoid(log_var_prior - log_var_up)  # precision_up / (sum of precisions)
    return weight_up * m_up + torch.sigmoid(log_var_up - log_var_prior) * m_prior, log_var


__all__ = ["DeepVAE", "SampleTerms"]
