"""The test pass of training: the stochastic negative ELBO of a set of images, z sampled once per
image as Keras does, in nats per image. (`vaelab.evaluate` gives the tighter, importance-sampled
numbers with standard errors.)"""

from __future__ import annotations

import torch

from vaelab.data.tensors import inputs
from vaelab.models import VAE

EVAL_CHUNK = 2000  # images per test-pass batch; its noise is drawn batch by batch, and torch's normal
# draws depend on their sizes, so a change here changes the last digits of the test losses


@torch.no_grad()
def test_pass(
    model: VAE,
    x: torch.Tensor,
    seed: int,
    autocast,
    y: torch.Tensor | None = None,
    prefix: str = "test",
    sums=None,
) -> dict[str, float]:
    """The stochastic negative ELBO on `x` (N, D) (float in [0, 1], or compact: uint8 grey levels,
    bool pixels) with z sampled, as Keras does, in nats per image. sums: (x, eps) -> the batch's
    summed reconstruction loss and KL, computed faster (`NativeMLPStep.loss_sums`), or None:
    `model.terms`."""
    g = torch.Generator().manual_seed(seed)
    recon = kl = 0.0
    for i in range(0, len(x), EVAL_CHUNK):
        xb = inputs(x[i : i + EVAL_CHUNK])  # (a compact chunk made float here)
        yb = y[i : i + EVAL_CHUNK] if y is not None and model.config.conditional else None
        eps = torch.randn(len(xb), model.noise_dim, generator=g).to(xb.device)
        if sums is not None:
            r, k = sums(xb, eps)
            recon, kl = recon + r, kl + k
            continue
        with autocast():
            terms = model.terms(xb, xb, eps, yb)
        recon += -terms.log_px_given_z.float().sum().item()
        kl += terms.kl.float().sum().item()
    n = len(x)
    return {f"{prefix}_loss": (recon + kl) / n, f"{prefix}_recon": recon / n, f"{prefix}_kl": kl / n}
