"""Image grids as PNG files (Pillow), written atomically."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np


def grid(images: np.ndarray, cols: int, pad: int = 1) -> np.ndarray:
    """Tile (N, C, H, W) or (N, H, W) images in [0, 1] into one uint8 (H', W') or (H', W', 3)."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 3:
        x = x[:, None]
    n, c, h, w = x.shape
    rows = -(-n // cols)
    out = np.ones((c, rows * (h + pad) + pad, cols * (w + pad) + pad), dtype=np.float32)
    for i in range(n):
        r, k = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + k * (w + pad)
        out[:, top : top + h, left : left + w] = x[i]
    out = (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
    return out[0] if c == 1 else out.transpose(1, 2, 0)


def save_grid(images: np.ndarray, path: str | Path, cols: int, scale: int = 2) -> Path:
    """Write a grid of images to a PNG (each pixel drawn `scale` x `scale`)."""
    from PIL import Image

    from vaelab.files import atomic_write_bytes

    pixels = grid(images, cols)
    img = Image.fromarray(pixels)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)
