"""The figure that takes the place of "KL per latent dimension" for hierarchies, VampPriors and
flows (`vaelab.models.deep`), whose KL has no closed form: how active each dimension of each
stochastic layer is, the statistic the IWAE paper counts active units by."""

from __future__ import annotations

import numpy as np
import torch

from vaelab.drawing import new_axes
from vaelab.latent import test_indices, test_inputs

ACTIVE_THRESHOLD = 0.01


@torch.no_grad()
def layer_activity_figure(
    model, dataset, limit: int = 2000, seed: int = 0, threshold: float = ACTIVE_THRESHOLD
):
    """For each layer, bottom to top, the variance over test images of each dimension's posterior
    mean (every layer at its posterior mean), on a log scale, the activity threshold drawn."""
    x = test_inputs(model, dataset, test_indices(len(dataset.x_test), limit, seed))
    device = next(model.parameters()).device
    layers = [m.float().cpu().numpy() for m, _ in model.posterior_means(x.to(device))]
    activity = [layer.var(axis=0) for layer in layers]
    total = sum(len(a) for a in activity)
    fig, ax = new_axes((max(7.0, 0.3 * total + 3), 5))
    start, ticks, names = 1, [], []
    for level, values in enumerate(activity, 1):
        dims = np.arange(start, start + len(values))
        active = values > threshold
        ax.bar(
            dims,
            np.maximum(values, 1e-6),
            color=np.where(active, f"C{level - 1}", "lightgray"),
            edgecolor="dimgray",
            linewidth=0.3,
            label=f"layer {level} (z{level}): {int(active.sum())} of {len(values)} active",
        )
        ticks.append(dims.mean())
        names.append(f"z{level}")
        start += len(values) + 1
    ax.axhline(threshold, color="black", linestyle="--", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(ticks, names)
    ax.set_xlabel("latent dimensions, layer by layer (bottom to top)")
    ax.set_ylabel("variance of E[z_d|x] over test images")
    ax.set_title(
        f"Activity of each latent dimension, {len(x)} test images\n"
        f"active: variance above {threshold:g} (dashed); grey: inactive"
    )
    ax.legend(fontsize=9, loc="upper right")
    fig.tight_layout()
    return fig
