"""What changes from epoch to epoch and step to step: the learning rate and the KL weight."""

from __future__ import annotations

import math

from vaelab.config import RunConfig


def learning_rate(config: RunConfig, epoch: int) -> float:
    """The learning rate of `epoch` (1-based) under `train.lr_schedule`.

    constant: lr. exponential / cosine: from lr at epoch 1 to lr_final (default lr / 10) at the
    last epoch. iwae: Burda et al.'s 3^i passes at lr * 10^(-i/7), i = 0..7 (3,280 passes),
    with the stages shrunk or stretched in proportion to fit `train.epochs`.
    """
    t = config.train
    final = t.lr_final if t.lr_final is not None else t.lr / 10
    f = (epoch - 1) / max(t.epochs - 1, 1)  # 0 at the first epoch, 1 at the last
    if t.lr_schedule == "exponential":
        return t.lr * (final / t.lr) ** f
    if t.lr_schedule == "cosine":
        return final + (t.lr - final) * 0.5 * (1 + math.cos(math.pi * f))
    if t.lr_schedule == "iwae":
        done = (epoch - 1) / t.epochs * 3280  # where this epoch starts on the paper's scale
        stage = next(i for i in range(8) if done < (3 ** (i + 1) - 1) / 2)  # sum_{j<=i} 3^j
        return t.lr * 10 ** (-stage / 7)
    return t.lr


def kl_weight(config: RunConfig, epoch: int, step: int, steps: int) -> float:
    """beta, ramped linearly from 0 over `train.warmup_epochs` (counted in steps)."""
    t = config.train
    if t.warmup_epochs <= 0:
        return t.beta
    return t.beta * min(1.0, ((epoch - 1) + step / steps) / t.warmup_epochs)
