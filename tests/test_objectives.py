"""The objective against mathematics: closed forms vs Monte Carlo, the seed's formula, gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import central_difference

import vaelab
from vaelab import objectives
from vaelab.config import ModelConfig
from vaelab.models import build_model
from vaelab.objectives import (
    bernoulli_log_px,
    iwae_bound,
    kl_standard_normal,
    log_normal,
    log_standard_normal,
    negative_elbo,
)


def test_closed_form_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(8, 3, generator=g, dtype=torch.float64)
    log_var = torch.randn(8, 3, generator=g, dtype=torch.float64) * 0.5
    n = 200_000
    z = mean + torch.exp(0.5 * log_var) * torch.randn(n, 8, 3, generator=g, dtype=torch.float64)
    # KL = E_q[log q(z) - log p(z)], written with torch.distributions as the oracle
    q = torch.distributions.Normal(mean, torch.exp(0.5 * log_var))
    p = torch.distributions.Normal(torch.zeros(()), torch.ones(()))
    samples = (q.log_prob(z) - p.log_prob(z)).sum(-1)  # (n, 8)
    mc, stderr = samples.mean(0), samples.std(0) / n**0.5
    closed = kl_standard_normal(mean, log_var)
    assert torch.all((closed - mc).abs() < 4 * stderr), (closed, mc, stderr)


def test_log_densities_match_torch_distributions():
    g = torch.Generator().manual_seed(1)
    z, mean, log_var = (torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    oracle = torch.distributions.Normal(mean, torch.exp(0.5 * log_var)).log_prob(z).sum(-1)
    torch.testing.assert_close(log_normal(z, mean, log_var), oracle)
    std = torch.distributions.Normal(0.0, 1.0).log_prob(z.float()).sum(-1)
    torch.testing.assert_close(log_standard_normal(z.float()), std)
    x = torch.bernoulli(torch.full((5, 7), 0.3, dtype=torch.float64), generator=g)
    logits = torch.randn(5, 7, generator=g, dtype=torch.float64) * 3
    bern = torch.distributions.Bernoulli(logits=logits).log_prob(x).sum(-1)
    torch.testing.assert_close(bernoulli_log_px(x, logits), bern)


def keras_seed_loss(x, x_decoded_mean, z_mean, z_log_var):
    """The Keras example's vae_loss, in numpy, with Keras' clipping of probabilities at 1e-7."""
    p = np.clip(x_decoded_mean, 1e-7, 1 - 1e-7)
    bce = -(x * np.log(p) + (1 - x) * np.log(1 - p)).mean(-1)  # keras binary_crossentropy
    xent_loss = 784 * bce
    kl_loss = -0.5 * np.sum(1 + z_log_var - z_mean**2 - np.exp(z_log_var), axis=-1)
    return (xent_loss + kl_loss).mean()


@pytest.mark.parametrize("saturated", [False, True])
def test_training_loss_equals_the_seeds_formula(saturated):
    """The seed preset's loss (Keras' clipping at 1e-7 included) against the Keras formula; with
    `saturated` the decoder is scaled up so that many probabilities fall beyond the clip."""
    torch.manual_seed(0)
    model = build_model(vaelab.preset("seed").model).double()
    if saturated:
        with torch.no_grad():
            model.decoder.out.weight.mul_(60)
    x = torch.rand(64, 784, dtype=torch.float64)
    eps = torch.randn(64, 2, dtype=torch.float64)
    terms = model.terms(x, x, eps)
    ours = negative_elbo(terms.log_px_given_z, terms.kl).mean().item()
    with torch.no_grad():  # the seed's graph, op by op, from the same weights and noise
        z_mean, z_log_var = model.encode(x)
        z = z_mean + torch.exp(z_log_var / 2) * eps
        x_decoded_mean = torch.sigmoid(model.decode(z))
    theirs = keras_seed_loss(x.numpy(), x_decoded_mean.numpy(), z_mean.numpy(), z_log_var.numpy())
    assert abs(ours - theirs) < 1e-6 * abs(theirs)
    if saturated:  # the clip mattered: the exact loss differs
        exact = negative_elbo(objectives.bernoulli_log_px(x, model.decode(z)), terms.kl).mean().item()
        assert exact - ours > 1.0


def test_gradients_flow_through_the_reparameterized_sample():
    torch.manual_seed(0)
    model = build_model(ModelConfig(latent_dim=2, hidden=(16,))).double()
    x = torch.rand(4, 784, dtype=torch.float64)
    eps = torch.randn(4, 2, dtype=torch.float64)

    def recon_only() -> torch.Tensor:  # no KL: any encoder gradient must come through z
        return -model.terms(x, x, eps).log_px_given_z.sum()

    recon_only().backward()
    for head in (model.encoder.z_mean.weight, model.encoder.z_log_var.weight):
        assert head.grad is not None and head.grad.abs().sum() > 0
    # and the gradient is the true derivative: central finite difference on one weight
    w = model.encoder.z_log_var.weight
    analytic = w.grad[1, 3].item()
    assert abs(central_difference(recon_only, w, (1, 3)) - analytic) < 1e-5 * max(1.0, abs(analytic))


def test_iwae_bound_is_the_log_mean_of_the_weights_and_tightens_with_k():
    """log (1/K) sum_k w_k, checked against its definition and against the theorem it rests on:
    with weights whose mean is exactly 1 (so log p(x) = 0), the expected K-sample bound rises
    with K and stays below 0 (Burda et al., Theorem 1)."""
    g = torch.Generator().manual_seed(3)
    log_w = torch.randn(1, 6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(iwae_bound(log_w), log_w[0])  # K = 1: the ELBO estimate
    equal = torch.full((7, 3), -2.5, dtype=torch.float64)
    torch.testing.assert_close(iwae_bound(equal), equal[0])  # K equal weights: their own log
    log_w = torch.randn(50, 6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(iwae_bound(log_w), log_w.exp().mean(0).log())  # the definition
    torch.testing.assert_close(iwae_bound(log_w - 1000.0), log_w.exp().mean(0).log() - 1000.0)  # no underflow
    # log w ~ N(-s^2/2, s^2): E[w] = 1. E[IWAE_K] over 4,000 repetitions for K = 1, 4, 32, 256
    s, reps = 1.5, 4000
    means, errs = [], []
    for k in (1, 4, 32, 256):
        bounds = iwae_bound(torch.randn(k, reps, generator=g, dtype=torch.float64) * s - s * s / 2)
        means.append(bounds.mean().item())
        errs.append(bounds.std().item() / math.sqrt(reps))
    assert abs(means[0] - (-s * s / 2)) < 4 * errs[0]  # K = 1: E[log w] exactly
    for i in range(len(means) - 1):  # tighter with K, clearly
        assert means[i + 1] - means[i] > 4 * math.hypot(errs[i], errs[i + 1]), means
    assert means[-1] < 0, means  # and still a lower bound on log E[w] = 0


def test_likelihoods_match_torch_distributions():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(64, 30, generator=g, dtype=torch.float64) * 4
    logits[0, :5] = torch.tensor([0.0, 1e-5, -1e-4, 2e-3, -30.0], dtype=torch.float64)
    x = torch.rand(64, 30, generator=g, dtype=torch.float64)
    expected = torch.distributions.ContinuousBernoulli(logits=logits).log_prob(x).sum(-1)
    got = objectives.continuous_bernoulli_log_px(x, logits)
    assert torch.allclose(got, expected, atol=1e-6), (got - expected).abs().max()
    log_std = torch.randn(30, generator=g, dtype=torch.float64) * 0.5
    expected = torch.distributions.Normal(torch.sigmoid(logits), log_std.exp()).log_prob(x).sum(-1)
    assert torch.allclose(objectives.gaussian_log_px(x, logits, log_std), expected, atol=1e-9)
    expected = torch.distributions.Normal(torch.sigmoid(logits), 0.1).log_prob(x).sum(-1)
    assert torch.allclose(objectives.gaussian_log_px(x, logits, math.log(0.1)), expected, atol=1e-9)
    binary = (x > 0.5).double()
    expected = torch.distributions.Bernoulli(logits=logits).log_prob(binary).sum(-1)
    assert torch.allclose(objectives.bernoulli_log_px(binary, logits), expected, atol=1e-9)


def test_continuous_bernoulli_is_normalised():
    # integrate the density of one pixel over [0, 1] (trapezoid rule): 1 for every lambda
    x = torch.linspace(0, 1, 20001, dtype=torch.float64)[:, None]
    for logit in (-8.0, -1.0, 0.0, 1e-4, 0.5, 6.0):
        density = objectives.continuous_bernoulli_log_px(x, torch.full_like(x, logit)).exp()
        assert torch.trapezoid(density, x[:, 0]).item() == pytest.approx(1.0, abs=1e-6), logit


@pytest.mark.parametrize("name", ["seed", "pytorch-example"])
def test_presets_initialise_as_their_originals(name):
    """seed: Keras' Dense (Glorot-uniform, zero bias); pytorch-example: nn.Linear's default."""
    from vaelab.config import preset

    torch.manual_seed(0)
    model = build_model(preset(name).model)
    for layer in [m for m in model.modules() if isinstance(m, torch.nn.Linear)]:
        fan_out, fan_in = layer.weight.shape
        w, b = layer.weight.abs().max().item(), layer.bias.abs().max().item()
        if name == "seed":
            limit = math.sqrt(6 / (fan_in + fan_out))
            assert 0.9 * limit < w <= limit and b == 0
        else:
            limit = 1 / math.sqrt(fan_in)
            assert 0.9 * limit < w <= limit and 0 < b <= limit


def test_presets_hold_the_originals_settings():
    """Every setting of the two presets, written out from the originals: the Keras example
    (Keras 3's `optimizer="rmsprop"` defaults, `epsilon()` = 1e-7 for its clipping) and
    pytorch/examples vae/main.py (its argparse defaults, `optim.Adam(lr=1e-3)`, BCE summed)."""
    from vaelab.config import preset

    seed = preset("seed")
    assert (seed.model.architecture, seed.model.hidden, seed.model.latent_dim) == ("mlp", (256,), 2)
    assert (seed.model.activation, seed.model.epsilon_std, seed.model.init) == ("relu", 1.0, "glorot")
    assert (seed.model.likelihood, seed.model.bernoulli_clip) == ("bernoulli", 1e-7)
    assert not seed.model.conditional
    assert (seed.data.source, seed.data.binarize) == ("mnist", "none")
    t = seed.train
    assert (t.optimizer, t.lr, t.rmsprop_alpha, t.eps) == ("rmsprop", 1e-3, 0.9, 1e-7)
    assert (t.batch_size, t.epochs, t.reduction) == (100, 50, "mean")
    assert (t.objective, t.k, t.beta) == ("elbo", 1, 1.0)
    assert (t.lr_schedule, t.warmup_epochs, t.validation, t.eval_every) == ("constant", 0.0, 0, 1)

    pt = preset("pytorch-example")
    assert (pt.model.architecture, pt.model.hidden, pt.model.latent_dim) == ("mlp", (400,), 20)
    assert (pt.model.activation, pt.model.epsilon_std, pt.model.init) == ("relu", 1.0, "torch")
    assert (pt.model.likelihood, pt.model.bernoulli_clip) == ("bernoulli", 0.0)  # F.binary_cross_entropy
    assert (pt.data.source, pt.data.binarize) == ("mnist", "none")  # ToTensor(): grey levels
    t = pt.train
    assert (t.optimizer, t.lr, t.eps) == ("adam", 1e-3, 1e-8)
    assert (t.batch_size, t.epochs, t.reduction, t.objective, t.k, t.beta) == (128, 10, "sum", "elbo", 1, 1.0)
    assert (t.lr_schedule, t.validation, t.eval_every) == ("constant", 0, 1)
