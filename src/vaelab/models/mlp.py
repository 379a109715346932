"""The seed's networks: dense layers with an activation (Keras `Dense`, Glorot-uniform, zero bias)."""

from __future__ import annotations

import torch
from torch import nn

from vaelab import products

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU}


class Dense(nn.Linear):
    """nn.Linear whose large CPU products go through oneDNN (`vaelab.products.dense`): the same
    weights, state dict and results to float32 rounding, about twice as fast on CPUs where
    PyTorch's MKL takes its AVX2 path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return products.dense(x, self.weight, self.bias)


def dense(n_in: int, n_out: int, init: str = "glorot") -> nn.Linear:
    """A Linear layer initialised as Keras' Dense (glorot: Glorot-uniform weights, zero biases)
    or as PyTorch's nn.Linear (torch: uniform in +-1/sqrt(n_in) for weights and biases)."""
    layer = Dense(n_in, n_out)
    if init == "glorot":
        nn.init.xavier_uniform_(layer.weight)
        nn.init.zeros_(layer.bias)
    return layer


def mlp(sizes: list[int], activation: str, init: str = "glorot") -> nn.Sequential:
    """Dense layers through `sizes`, each followed by the activation."""
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [dense(n_in, n_out, init), ACTIVATIONS[activation]()]
    return nn.Sequential(*layers)


class MLPEncoder(nn.Module):
    """x (B, D) -> hidden -> the posterior's `z_mean` and `z_log_var` heads, each (B, latent)."""

    def __init__(self, input_dim, hidden, latent_dim, activation, init="glorot"):
        super().__init__()
        self.body = mlp([input_dim, *hidden], activation, init)
        self.z_mean = dense(hidden[-1], latent_dim, init)
        self.z_log_var = dense(hidden[-1], latent_dim, init)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if cond is not None:  # a conditional VAE: the label's one-hot code joins the input
            x = torch.cat([x, cond], dim=1)
        h = self.body(x)  # (B, hidden[-1])
        return self.z_mean(h), self.z_log_var(h)


class MLPDecoder(nn.Module):
    """z (B, latent) -> hidden (mirrored) -> logits of every pixel (B, D)."""

    def __init__(self, latent_dim, hidden, output_dim, activation, init="glorot"):
        super().__init__()
        self.body = mlp([latent_dim, *reversed(hidden)], activation, init)
        self.out = dense(hidden[0], output_dim, init)

    def forward(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is not None:
            z = torch.cat([z, cond], dim=1)
        return self.out(self.body(z))
