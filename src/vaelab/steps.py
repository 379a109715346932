"""One training step's forward and backward pass: the plain autograd way, and a fused MLP way.

Both compute the gradient of  scale * sum_b [ -log p(x_b|z_b) + beta * KL_b ]  into each
parameter's `.grad` and return the batch's summed loss, reconstruction and KL (nats, detached).
The autograd step also covers every other model: conv, conditional, other likelihoods, K samples
and the IWAE objective.

`autograd_step` is the reference: the model's `terms`, `.backward()`. `FusedMLPStep`
(vaelab.fused) computes the same gradients by hand for the MLP encoder/decoder with a Bernoulli
likelihood, and `NativeMLPStep` (vaelab.native.mlp) runs the work between its matrix products as
native code. tests/test_steps.py and tests/test_native.py check them against autograd.
"""

from __future__ import annotations

import functools

import torch

from vaelab.fused import FusedMLPStep
from vaelab.models import VAE
from vaelab.native.mlp import NativeMLPStep

__all__ = ["FusedMLPStep", "NativeMLPStep", "autograd_step", "make_step"]


def autograd_step(
    model: VAE,
    x: torch.Tensor,
    target: torch.Tensor,
    eps: torch.Tensor,
    beta: float,
    scale: float,
    autocast,
    label: torch.Tensor | None = None,
    objective: str = "elbo",
    losses=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference step: forward through the model, loss, `backward()`.

    eps is (B, latent), or (K, B, latent) for K samples per image (the IWAE bound, or an ELBO
    averaged over K samples). losses: `model.losses`, or a compiled version of it. Returns the
    batch's summed loss, reconstruction and KL (detached).
    """
    for p in model.parameters():
        p.grad = None
    with autocast():
        loss, recon, kl = (losses or model.losses)(x, target, eps, label, objective, beta)
    # (B,) nats; losses in float32 (at least) even under bf16 autocast
    dtype = torch.promote_types(kl.dtype, torch.float32)
    loss, recon, kl = loss.to(dtype), recon.to(dtype), kl.to(dtype)
    (loss.sum() * scale).backward()
    return loss.detach().sum(), recon.detach().sum(), kl.detach().sum()


def make_step(
    model: VAE,
    precision: str,
    fused: bool = True,
    objective: str = "elbo",
    k: int = 1,
    compile: bool = False,
    free_bits: float = 0.0,
):
    """The fastest step for this model, precision and objective (fused MLP, else autograd).

    compile: run the step's arithmetic through torch.compile (the fused pass, or the model's
    losses with autograd through the compiled graph); it compiles on the first step.
    free_bits: a DeepVAE's floor on each layer's KL (nats per dimension).
    """
    if fused and objective == "elbo" and k == 1 and FusedMLPStep.supports(model, precision):
        if not compile and NativeMLPStep.usable(model):
            return NativeMLPStep(model)
        return FusedMLPStep(model, compile=compile)
    losses = functools.partial(model.losses, free_bits=free_bits) if free_bits else model.losses
    losses = torch.compile(losses) if compile else losses

    def step(x, target, eps, beta, scale, autocast, label=None):
        return autograd_step(model, x, target, eps, beta, scale, autocast, label, objective, losses)

    return step
