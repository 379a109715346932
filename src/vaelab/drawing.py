"""Drawing helpers shared by the figures: images out of a model, tiles of images in one axes,
label names and colours, and figures on their own Agg canvas (pyplot's global state untouched)."""

from __future__ import annotations

import io

import numpy as np
import torch


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def images_of(model, probabilities: torch.Tensor) -> np.ndarray:
    """(N, D) probabilities -> (N, H, W) grey or (N, C, H, W) colour, float in [0, 1]."""
    c, h, w = model.image_shape
    x = probabilities.detach().float().cpu().numpy().reshape(len(probabilities), c, h, w)
    return x[:, 0] if c == 1 else x


def show_image(ax, image: np.ndarray) -> None:
    """One image (H, W) or (C, H, W) in [0, 1], or a uint8 tile, without axis ticks."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] in (1, 3):
        image = image.transpose(1, 2, 0)
    top = 255 if image.dtype == np.uint8 else 1
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=top, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def tile_images(ax, images: np.ndarray, cols: int, columns=(), rows=(), gaps=()) -> None:
    """Images in one grid drawn in one axes (fast), with column labels on top and row labels left.

    `gaps`: column positions before which a wider white gap separates groups.
    """
    from vaelab.images import grid

    tile = grid(images, cols=cols, pad=2)
    if gaps:  # widen the padding before the given columns
        w = images.shape[-1] + 2
        parts = np.split(tile, [g * w for g in gaps], axis=1)
        white = np.full((tile.shape[0], 6, *tile.shape[2:]), 255, dtype=tile.dtype)
        tile = np.concatenate([p for part in parts for p in (white, part)][1:], axis=1)
        offsets = [sum(6 for g in gaps if g <= c) for c in range(cols)]
    else:
        offsets = [0] * cols
    ax.imshow(tile, cmap="gray" if tile.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
    h, w = images.shape[-2] + 2, images.shape[-1] + 2
    ax.set_xticks([c * w + w / 2 + offsets[c] for c in range(len(columns))], list(columns), fontsize=9)
    ax.xaxis.tick_top()
    ax.set_yticks([r * h + h / 2 for r in range(len(rows))], list(rows), fontsize=9)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)


def one_per_label(points, n: int) -> list[int]:
    """Positions in `points` of n test images: the first of each label, then the next ones."""
    chosen: list[int] = []
    if points.labels is not None:
        for label in np.unique(points.labels):
            chosen.append(int(np.flatnonzero(points.labels == label)[0]))
    chosen = chosen[:n]  # label order: 0, 1, 2, ...
    rest = (i for i in range(len(points.means)) if i not in chosen)
    while len(chosen) < min(n, len(points.means)):
        chosen.append(next(rest))
    return chosen


def label_name(classes, label) -> str:
    label = int(label)
    if classes is not None and label < len(classes):
        return str(classes[label]).replace("$", r"\$")  # a folder name is text, not mathtext
    return str(label)


def palette(k: int) -> list:
    from matplotlib import colormaps

    if k <= 10:
        return [colormaps["tab10"](i) for i in range(k)]
    if k <= 20:
        return [colormaps["tab20"](i) for i in range(k)]
    return [colormaps["viridis"](i / max(k - 1, 1)) for i in range(k)]


def new_figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def new_axes(size: tuple[float, float]):
    fig = new_figure(size)
    return fig, fig.subplots()


def png_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()
