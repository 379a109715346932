"""Latent traversals, the picture the disentanglement literature draws: each row changes one
latent dimension of a test image's code, the others fixed, and shows what the decoder makes of it."""

from __future__ import annotations

import numpy as np
import torch

from vaelab.drawing import device_of, images_of, new_axes, tile_images
from vaelab.latent import LatentPoints, condition, test_inputs

MAX_ROWS = 10  # the most active dimensions shown
STEPS = 9
SPAN = 3.0  # each dimension from -SPAN to +SPAN (the prior's standard deviations)


@torch.no_grad()
def traversals_figure(model, dataset, points: LatentPoints, steps: int = STEPS):
    """Rows: the most active latent dimensions (largest variance of the posterior mean over the test
    images), each set to evenly spaced values in [-3, 3] around the first test image's code."""
    activity = points.means.var(axis=0)
    dims = np.argsort(-activity)[: min(MAX_ROWS, len(activity))]
    code = torch.from_numpy(points.means[0]).float()
    values = torch.linspace(-SPAN, SPAN, steps)
    z = code.repeat(len(dims) * steps, 1)  # (rows * steps, latent)
    for r, d in enumerate(dims):
        z[r * steps : (r + 1) * steps, d] = values
    label = None
    if points.labels is not None and model.config.conditional:
        label = condition(model, [points.labels[0]] * len(z))
    pictures = images_of(model, model.mean_image(model.decode(z.to(device_of(model)), label)))
    original = images_of(model, test_inputs(model, dataset, points.indices[:1]))
    fig, ax = new_axes((1.0 * (steps + 1) + 1.2, 0.95 * len(dims) + 1.0))
    rows = []
    for r in range(len(dims)):
        rows += [original[0], *pictures[r * steps : (r + 1) * steps]]
    tile_images(
        ax,
        np.stack(rows),
        cols=steps + 1,
        columns=["image", *(f"{v:+.1f}" for v in values.tolist())],
        rows=[f"z{d + 1}" for d in dims],
        gaps=(1,),
    )
    ax.set_title(
        f"Latent traversals: each row sets one dimension from -{SPAN:g} to +{SPAN:g} around the image's code "
        f"(the {len(dims)} most active dimensions, most active first)",
        fontsize=10,
    )
    fig.tight_layout()
    return fig
