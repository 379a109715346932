"""Optimizers: RMSprop exactly as Keras defines it, written to stay fast late in training.

Keras' RMSprop (and PyTorch's, with alpha = rho):
    v <- rho * v + (1 - rho) * g^2
    p <- p - lr * g / (sqrt(v) + eps)

Measured on this project's CPUs: `sqrt` of an exact zero takes ~16x longer than of any other
number (a slow path in the vectorised kernel), and RMSprop's `v` is exactly zero for every weight
whose gradient has always been zero (MNIST's blank border pixels, dead ReLU units) or has decayed
below the float range. We take sqrt(v + 1e-30) instead: for v >= 1e-22 the sum rounds back to v in
float32, and below that sqrt(v) < 1e-11 is lost against eps = 1e-7 anyway, so the update is the
same to float precision while the kernel stays on its fast path.
"""

from __future__ import annotations

import torch

SQRT_FLOOR = 1e-30  # keeps sqrt's input away from exact zero (see above)


class RMSprop(torch.optim.Optimizer):
    """Keras/PyTorch RMSprop (no momentum, not centered) over all parameters at once (foreach).

    Args:
        params: parameters to optimise.
        lr: learning rate (Keras: 1e-3).
        alpha: decay of the squared-gradient average (Keras' rho: 0.9).
        eps: added to the root mean square (Keras: 1e-7).
    """

    def __init__(self, params, lr: float = 1e-3, alpha: float = 0.9, eps: float = 1e-7):
        super().__init__(params, {"lr": lr, "alpha": alpha, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            squares = []
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                squares.append(state["square_avg"])
            alpha, eps, lr = group["alpha"], group["eps"], group["lr"]
            torch._foreach_mul_(squares, alpha)
            torch._foreach_addcmul_(squares, grads, grads, value=1 - alpha)
            denominators = torch._foreach_add(squares, SQRT_FLOOR)
            torch._foreach_sqrt_(denominators)
            torch._foreach_add_(denominators, eps)
            torch._foreach_addcdiv_(params, grads, denominators, value=-lr)
        return None
