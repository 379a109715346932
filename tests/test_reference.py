"""`vaelab.train` against a plain PyTorch loop written here from the Keras example's definition.

The loop below is what a reader of the seed would write: float32 tensors, autograd, the loss
`784 * mean binary cross-entropy(x, sigmoid(logits) clipped to [1e-7, 1 - 1e-7]) + KL`, Keras 3's
RMSprop (or Adam) written out, the learning-rate schedule and KL warm-up from their formulas.
It shares with vaelab only the starting weights and the order of the random draws (one
generator seeded with the run's seed: each epoch's permutation, then per step the binarization
and the noise; the test pass's noise from its own generator), which is what makes a run
reproducible. Everything vaelab adds for speed (the hand-derived step, the fused optimizer,
one flat weight buffer, the batched test pass) must give the same weights and metrics.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import small_config, synthetic_digits
from safetensors.torch import load_file

import vaelab
from vaelab.config import merge
from vaelab.data import TEST_BINARIZE_SEED, static_binarize
from vaelab.models import build_model

CLIP = 1e-7  # Keras' epsilon in binary_crossentropy


def forward(p, x, eps):
    """Per-image loss terms (recon, kl) of the seed's graph, op by op."""
    h = torch.relu(x @ p["encoder.body.0.weight"].T + p["encoder.body.0.bias"])
    z_mean = h @ p["encoder.z_mean.weight"].T + p["encoder.z_mean.bias"]
    z_log_var = h @ p["encoder.z_log_var.weight"].T + p["encoder.z_log_var.bias"]
    z = z_mean + torch.exp(z_log_var / 2) * eps
    h = torch.relu(z @ p["decoder.body.0.weight"].T + p["decoder.body.0.bias"])
    x_decoded_mean = torch.sigmoid(h @ p["decoder.out.weight"].T + p["decoder.out.bias"])
    q = x_decoded_mean.clamp(CLIP, 1 - CLIP)
    bce = -(x * torch.log(q) + (1 - x) * torch.log(1 - q)).mean(-1)  # Keras' binary_crossentropy
    kl = -0.5 * (1 + z_log_var - z_mean**2 - torch.exp(z_log_var)).sum(-1)
    return x.shape[1] * bce, kl


def reference_run(x_train_u8, x_test_u8, init, s):
    """Train as the settings `s` say; returns (weights, one dict of metrics per epoch)."""
    n = len(x_train_u8)
    x_train = torch.from_numpy(x_train_u8.reshape(n, -1)).float() / 255
    if s["binarize"] == "static":
        x_train = torch.from_numpy(static_binarize(x_train_u8, s["binarize_seed"]).reshape(n, -1))
    if s["binarize"] == "none":
        x_test = torch.from_numpy(x_test_u8.reshape(len(x_test_u8), -1)).float() / 255
    else:  # binarizing runs score one fixed binarization of the test set
        x_test = torch.from_numpy(static_binarize(x_test_u8, TEST_BINARIZE_SEED).reshape(len(x_test_u8), -1))
    # float32, as vaelab trains: in float64 the weights end up to 1e-2 elsewhere after 12 steps (RMSprop
    # divides each gradient by its own running scale, which amplifies the last bits of small ones)
    p = {k: v.detach().float().clone().requires_grad_() for k, v in init.items()}
    first = {k: torch.zeros_like(v) for k, v in p.items()}
    second = {k: torch.zeros_like(v) for k, v in p.items()}
    g = torch.Generator().manual_seed(s["seed"])
    epochs, batch = s["epochs"], s["batch_size"]
    steps, t, rows = math.ceil(n / batch), 0, []
    for epoch in range(1, epochs + 1):
        frac = (epoch - 1) / max(epochs - 1, 1)
        lr = s["lr"] * (s["lr_final"] / s["lr"]) ** frac if s["exponential"] else s["lr"]
        perm = torch.randperm(n, generator=g)
        total = recon_total = kl_total = 0.0
        for step in range(steps):
            idx = perm[step * batch : (step + 1) * batch]
            x = x_train[idx]
            if s["binarize"] == "dynamic":
                x = torch.bernoulli(x, generator=g)
            eps = torch.randn(len(idx), 2, generator=g)
            warm = s["warmup_epochs"]
            beta = s["beta"] * (min(1.0, (epoch - 1 + step / steps) / warm) if warm else 1.0)
            recon, kl = forward(p, x, eps)
            loss = recon + beta * kl
            objective = loss.mean() if s["reduction"] == "mean" else loss.sum()
            grads = torch.autograd.grad(objective, list(p.values()))
            t += 1
            with torch.no_grad():
                for (k, w), grad in zip(p.items(), grads, strict=True):
                    if s["optimizer"] == "rmsprop":  # Keras 3
                        second[k] = 0.9 * second[k] + 0.1 * grad**2
                        w -= lr * grad / torch.sqrt(second[k] + s["eps"])
                    else:  # Adam (Kingma & Ba), as torch.optim.Adam writes it
                        first[k] = 0.9 * first[k] + 0.1 * grad
                        second[k] = 0.999 * second[k] + 0.001 * grad**2
                        m_hat, v_hat = first[k] / (1 - 0.9**t), second[k] / (1 - 0.999**t)
                        w -= lr * m_hat / (torch.sqrt(v_hat) + s["eps"])
            total += loss.double().sum().item()
            recon_total += recon.double().sum().item()
            kl_total += kl.double().sum().item()
        with torch.no_grad():  # the test pass: z sampled, from the epoch's own generator
            test_noise = torch.Generator().manual_seed(s["seed"] * 100_003 + epoch)
            eps = torch.randn(len(x_test), 2, generator=test_noise)
            recon, kl = forward(p, x_test, eps)
        rows.append(
            {
                "train_loss": total / n,
                "train_recon": recon_total / n,
                "train_kl": kl_total / n,
                "test_loss": (recon + kl).double().mean().item(),
                "test_recon": recon.double().mean().item(),
                "test_kl": kl.double().mean().item(),
            }
        )
    return p, rows


SETTINGS = {  # vaelab settings -> the reference's
    "seed": {},
    "adam-sum-dynamic": {
        "train": {"optimizer": "adam", "eps": 1e-8, "reduction": "sum", "batch_size": 70},  # last: 40
        "data": {"binarize": "dynamic"},
    },
    "schedule-warmup-static": {
        "train": {
            "lr_schedule": "exponential",
            "lr_final": 2e-4,
            "warmup_epochs": 1.5,
            "beta": 2.0,
            "epochs": 3,
            "batch_size": 64,  # 600 images: a last batch of 24, its mean over 24
        },
        "data": {"binarize": "static", "binarize_seed": 5},
    },
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_training_equals_a_plain_loop_written_from_the_definition(tmp_path, name):
    x, y = synthetic_digits(800, seed=1)
    x_train, x_test = x[:600], x[600:]
    data = tmp_path / "data.npz"
    np.savez(data, x_train=x_train, y_train=y[:600], x_test=x_test, y_test=y[600:])
    config = merge(small_config(data, seed=3), SETTINGS[name], where="test")
    result = vaelab.train(config, tmp_path / "run")

    torch.manual_seed(config.train.seed)  # the starting weights, as vaelab.train draws them
    init = build_model(replace(config.model, input_shape=(1, 28, 28))).state_dict()
    tr, d = config.train, config.data
    weights, expected = reference_run(
        x_train,
        x_test,
        init,
        {
            "seed": tr.seed,
            "epochs": tr.epochs,
            "batch_size": tr.batch_size,
            "optimizer": tr.optimizer,
            "lr": tr.lr,
            "eps": tr.eps,
            "exponential": tr.lr_schedule == "exponential",
            "lr_final": tr.lr_final,
            "warmup_epochs": tr.warmup_epochs,
            "beta": tr.beta,
            "reduction": tr.reduction,
            "binarize": d.binarize,
            "binarize_seed": d.binarize_seed,
        },
    )
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))
    for key, w in weights.items():
        torch.testing.assert_close(saved[key], w.detach(), rtol=1e-4, atol=2e-5, msg=key)
    assert len(result.metrics) == len(expected) == tr.epochs
    for got, want in zip(result.metrics, expected, strict=True):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-5), (key, got, want)
    moved = max((saved[k] - init[k]).abs().max().item() for k in saved)
    assert moved > 1e-2  # the weights did move: the comparison is not of two starting points
