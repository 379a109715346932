"""The fused MLP step and vaelab's RMSprop against their oracles: autograd and torch.optim."""

from __future__ import annotations

import contextlib

import pytest
import torch

from vaelab.config import ModelConfig
from vaelab.models import build_model
from vaelab.optim import RMSprop
from vaelab.steps import FusedMLPStep, autograd_step


@pytest.mark.parametrize(
    "activation, hidden, latent, epsilon_std, beta",
    [("relu", (32,), 2, 1.0, 1.0), ("tanh", (24, 16), 3, 0.5, 0.3), ("elu", (16, 8), 1, 1.0, 2.0)],
)
def test_fused_step_equals_autograd(activation, hidden, latent, epsilon_std, beta):
    torch.manual_seed(0)
    config = ModelConfig(
        input_shape=(1, 6, 5),
        hidden=hidden,
        latent_dim=latent,
        activation=activation,
        epsilon_std=epsilon_std,
    )
    model = build_model(config).double()
    x = torch.rand(9, 30, dtype=torch.float64)
    target = torch.bernoulli(x)
    eps = torch.randn(9, latent, dtype=torch.float64)
    scale = 1 / 9
    recon_a, kl_a = autograd_step(model, x, target, eps, beta, scale, contextlib.nullcontext)
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    recon_f, kl_f = FusedMLPStep(model)(x, target, eps, beta, scale)
    torch.testing.assert_close(recon_f, recon_a)
    torch.testing.assert_close(kl_f, kl_a)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-10, atol=1e-12, msg=name)


def test_rmsprop_matches_torch_optim_rmsprop():
    torch.manual_seed(0)
    a = torch.nn.Linear(7, 5)
    b = torch.nn.Linear(7, 5)
    b.load_state_dict(a.state_dict())
    ours = RMSprop(a.parameters(), lr=1e-3, alpha=0.9, eps=1e-7)
    reference = torch.optim.RMSprop(b.parameters(), lr=1e-3, alpha=0.9, eps=1e-7)
    for _ in range(20):
        x = torch.randn(11, 7)
        x[:, 0] = 0  # weights of input 0 get exact-zero gradients
        for model, opt in ((a, ours), (b, reference)):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
    # the state dict has torch's layout, so checkpoints are interchangeable
    reference.load_state_dict(ours.state_dict())
