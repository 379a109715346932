"""Convolutional encoder and decoder for any image size and channel count.

The encoder halves the image with each stride-2 convolution (3x3, padding 1: H -> ceil(H/2)),
flattens, and ends in dense layers and the posterior's two heads. The decoder mirrors it: dense
layers up to the encoder's last feature map, stride-2 transposed convolutions (4x4, padding 1:
doubling), and a crop to the image size (so odd sizes like 28 -> 14 -> 7 -> 14 -> 28, or
30 -> 15 -> 8 -> 16 -> 32 -> 30, work). The decoder returns pixel logits flattened to (B, C*H*W).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vaelab import products
from vaelab.models.mlp import ACTIVATIONS, dense, mlp


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """Feature maps in NHWC order on a CPU: oneDNN's convolutions there ran 2-10x faster on them
    than on NCHW (measured at the conv preset's shapes); elsewhere, and in an ONNX export, as they are."""
    if t.device.type != "cpu" or products._tracing():
        return t
    return t.contiguous(memory_format=torch.channels_last)


class _OneChannelTransposedConv(torch.autograd.Function):
    """A transposed convolution to one channel (a grey decoder's last layer) on a CPU: forward as
    one matrix product, input pixels (B*H*W, C_in) by the weight (C_in, k*k), then col2im
    (`F.fold`) adds each pixel's k x k patch into the output; backward as PyTorch's own. At the
    conv preset's last layer (32 channels, 14 x 14 to 28 x 28) oneDNN's forward took 1.2 ms for
    a batch of 100 and this one 0.4 (forward and backward: 1.6 against 0.85 ms); with 3 output
    channels it gained nothing, so only one channel takes it. Equal to `nn.ConvTranspose2d` to
    float32's rounding (tests/test_products.py)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride: int, padding: int):
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, padding)
        b, c_in, h, w = x.shape
        k = weight.shape[2]
        pixels = x.permute(0, 2, 3, 1).reshape(b * h * w, c_in)  # (a view of channels-last maps)
        cols = products.dense(pixels, weight.reshape(c_in, k * k).t(), None)  # (B*H*W, k*k)
        cols = cols.reshape(b, h * w, k * k).transpose(1, 2)
        size = ((h - 1) * stride - 2 * padding + k, (w - 1) * stride - 2 * padding + k)
        return F.fold(cols, size, k, stride=stride, padding=padding).add_(bias.view(1, 1, 1, 1))

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding = ctx.geometry
        dx, dw, db = torch.ops.aten.convolution_backward(
            grad, x, weight, [1], [stride] * 2, [padding] * 2, [1, 1], True, [0, 0], 1,
            list(ctx.needs_input_grad[:3]),
        )
        return dx, dw, db, None, None


def _transposed_conv(layer: nn.ConvTranspose2d, f: torch.Tensor) -> torch.Tensor:
    """`layer(f)`, through `_OneChannelTransposedConv` where that is faster and exact: one output
    channel, float32 on a CPU, outside autocast and tracing (an ONNX export keeps the layer)."""
    if (
        layer.out_channels == 1
        and layer.bias is not None
        and layer.groups == 1
        and layer.dilation == (1, 1)
        and layer.output_padding == (0, 0)
        and layer.stride[0] == layer.stride[1]
        and layer.padding[0] == layer.padding[1]
        and layer.kernel_size[0] == layer.kernel_size[1]
        and f.device.type == "cpu"
        and f.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not products._tracing()
    ):
        return _OneChannelTransposedConv.apply(f, layer.weight, layer.bias, layer.stride[0], layer.padding[0])
    return layer(f)


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
        for layer in self.deconvs:
            f = _transposed_conv(layer, f) if isinstance(layer, nn.ConvTranspose2d) else layer(f)
        _, h, w = self.output_shape
        return f[:, :, :h, :w].flatten(1)
