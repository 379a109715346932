"""Convolutional encoder and decoder for any image size and channel count.

The encoder halves the image with each stride-2 convolution (3x3, padding 1: H -> ceil(H/2)),
flattens, and ends in dense layers and the posterior's two heads. The decoder mirrors it: dense
layers up to the encoder's last feature map, stride-2 transposed convolutions (4x4, padding 1:
doubling), and a crop to the image size (so odd sizes like 28 -> 14 -> 7 -> 14 -> 28, or
30 -> 15 -> 8 -> 16 -> 32 -> 30, work). The decoder returns pixel logits flattened to (B, C*H*W).
"""

from __future__ import annotations

import torch
from torch import nn

from vaelab import products
from vaelab.models.mlp import ACTIVATIONS, dense, mlp


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """Feature maps in NHWC order on a CPU: oneDNN's convolutions there ran 2-10x faster on them
    than on NCHW (measured at the conv preset's shapes); elsewhere, and in an ONNX export, as they are."""
    if t.device.type != "cpu" or products._tracing():
        return t
    return t.contiguous(memory_format=torch.channels_last)


def feature_sizes(size: int, layers: int) -> list[int]:
    """Spatial sizes after each stride-2 convolution: [size, ceil(size/2), ...]."""
    sizes = [size]
    for _ in range(layers):
        sizes.append((sizes[-1] - 1) // 2 + 1)
    return sizes


class ConvEncoder(nn.Module):
    """x (B, C*H*W) -> stride-2 convolutions -> dense `hidden` -> (mean, log_var), each (B, latent).

    A label's one-hot code (B, num_classes), if given, joins the flattened features.
    """

    def __init__(self, input_shape, channels, hidden, latent_dim, activation, num_classes=0, init="glorot"):
        super().__init__()
        c, h, w = input_shape
        self.input_shape = tuple(input_shape)
        layers: list[nn.Module] = []
        for c_in, c_out in zip([c, *channels[:-1]], channels, strict=True):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), ACTIVATIONS[activation]()]
        self.convs = nn.Sequential(*layers).to(memory_format=torch.channels_last)  # see channels_last
        n = channels[-1] * feature_sizes(h, len(channels))[-1] * feature_sizes(w, len(channels))[-1]
        self.body = mlp([n + num_classes, *hidden], activation, init)
        self.z_mean = dense(hidden[-1], latent_dim, init)
        self.z_log_var = dense(hidden[-1], latent_dim, init)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # flatten/unflatten keep the batch axis free (an ONNX export) and refuse a wrong image size
        f = self.convs(channels_last(x.flatten(1).unflatten(1, self.input_shape))).flatten(1)  # (B, C'H'W')
        if cond is not None:
            f = torch.cat([f, cond], dim=1)
        h = self.body(f)
        return self.z_mean(h), self.z_log_var(h)


class ConvDecoder(nn.Module):
    """z (B, latent) -> dense -> the last feature map -> stride-2 transposed convolutions -> logits."""

    def __init__(self, output_shape, channels, hidden, latent_dim, activation, num_classes=0, init="glorot"):
        super().__init__()
        c, h, w = output_shape
        self.output_shape = tuple(output_shape)
        hs, ws = feature_sizes(h, len(channels)), feature_sizes(w, len(channels))
        self.start = (channels[-1], hs[-1], ws[-1])
        n = channels[-1] * hs[-1] * ws[-1]
        self.body = mlp([latent_dim + num_classes, *reversed(hidden), n], activation, init)
        layers: list[nn.Module] = []
        outs = [*reversed(channels[:-1]), c]
        for i, (c_in, c_out) in enumerate(zip(reversed(channels), outs, strict=True)):
            layers.append(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1))
            if i < len(channels) - 1:
                layers.append(ACTIVATIONS[activation]())
        self.deconvs = nn.Sequential(*layers).to(memory_format=torch.channels_last)

    def forward(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is not None:
            z = torch.cat([z, cond], dim=1)
        f = channels_last(self.body(z).unflatten(1, self.start))
        _, h, w = self.output_shape
        return self.deconvs(f)[:, :, :h, :w].flatten(1)
