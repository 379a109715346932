"""Every figure of a run, drawn with matplotlib's Agg canvas and written atomically to RUN/figures/.

    samples.png          new digits: decode z ~ N(0, I) (the seed's generator)
    reconstructions.png  test digits above the decoding of their latent means
    latent.png           the test set's latent means coloured by label (PCA for > 2 dims)
    manifold.png         the seed's 15 x 15 grid decoded at Gaussian quantiles
    interpolation.png    decodings along the straight line between two test digits' latent means
    curves.png           train and test loss, reconstruction and KL per epoch (metrics.jsonl)
    kl_per_dim.png       the average KL of each latent dimension, active dimensions marked
    ring.png             the seed's illustration: g(z) = z/10 + z/||z|| turns N(0, I) into a ring

Figures that look at the test set use at most `SCATTER_LIMIT` images, chosen by `seed`, so the
whole set takes seconds; the same seed gives the same files. Nothing here touches pyplot's global
state: each figure is a `matplotlib.figure.Figure` on its own Agg canvas.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from vaelab.drawing import (
    device_of,
    images_of,
    label_name,
    new_axes,
    new_figure,
    one_per_label,
    palette,
    png_bytes,
    show_image,
    tile_images,
)
from vaelab.hierarchy_plots import layer_activity_figure
from vaelab.latent import (  # noqa: F401 (the figures' data, importable from here too)
    MANIFOLD_N,
    SCATTER_LIMIT,
    LatentPoints,
    condition,
    gaussian_quantiles,
    latent_points,
    manifold_grid,
    principal_directions,
    test_indices,
    test_inputs,
)
from vaelab.traversals import traversals_figure

FIGURES = (
    "samples",
    "reconstructions",
    "latent",
    "manifold",
    "traversals",
    "interpolation",
    "curves",
    "kl_per_dim",
    "ring",
)
ACTIVE_THRESHOLD = 0.01  # a dim is active if Var over x of its posterior mean exceeds this


# --- the figures ------------------------------------------------------------------------------


def check_figure_paths(run_dir: Path) -> list[Path]:
    """The paths of the run's figures; refuses a file where their folder goes or a folder where a
    figure goes."""
    from vaelab.errors import RunError
    from vaelab.runs import check_own_folder

    figures_dir = Path(run_dir) / "figures"
    paths = [figures_dir / f"{name}.png" for name in FIGURES]
    check_own_folder(figures_dir, "writes", "figures", "into")
    in_the_way = next((p for p in paths if p.exists() and not p.is_file()), None)
    if in_the_way is not None:
        raise RunError(f"{in_the_way}: is a folder, where vaelab writes a figure")
    return paths


def write_figures(run_dir: str | Path, model=None, dataset=None, seed: int = 0) -> list[Path]:
    """Draw every figure of a run into RUN/figures/ (see the module docstring for the list).

    Args:
        run_dir: a run directory written by `vaelab train`.
        model: the trained model; None loads it with `vaelab.load(run_dir)`.
        dataset: the run's data set; None loads the source named in config.json.
        seed: fixes the test subset, the samples and the interpolation pair.
    Returns:
        The paths written, in the order of `FIGURES`.
    Raises:
        RunError: `run_dir` is not a run directory (nothing is written then).

    Example:
        >>> paths = write_figures("runs/seed")
    """
    from vaelab import runs
    from vaelab.errors import RunError

    run_dir = Path(run_dir)
    config = runs.read_config(run_dir)  # refuses a non-run directory before anything is written
    metrics = runs.read_metrics(run_dir)  # and a damaged metrics.jsonl
    paths = check_figure_paths(run_dir)  # and anything in the figures' way, before one is written
    if model is None:
        model = runs.load(run_dir)
    if getattr(model, "run_config", None) is None:
        model.run_config = config
    model.eval()
    if dataset is None:
        dataset = runs.load_run_data(model, run_dir)
    points = latent_points(model, dataset, SCATTER_LIMIT, seed)
    if not (np.isfinite(points.means).all() and np.isfinite(points.log_vars).all()):
        weights = run_dir / runs.WEIGHTS
        raise RunError(f"{weights}: the encoder gives infinite or NaN values on the test images")
    figures = {
        "samples": lambda: samples_figure(model, seed),
        "reconstructions": lambda: reconstructions_figure(model, dataset, points),
        "latent": lambda: latent_figure(points, model.latent_dim, dataset.classes),
        "manifold": lambda: manifold_figure(model, points),
        "traversals": lambda: traversals_figure(model, dataset, points),
        "interpolation": lambda: interpolation_figure(model, dataset, points),
        "curves": lambda: curves_figure(metrics, config),
        "kl_per_dim": lambda: (
            layer_activity_figure(model, dataset) if hasattr(model, "sizes") else kl_per_dim_figure(points)
        ),
        "ring": lambda: ring_figure(seed),
    }
    pngs = {name: png_bytes(figures[name]()) for name in FIGURES}  # all drawn before any is written
    for name, path in zip(FIGURES, paths, strict=True):
        runs.atomic_write_bytes(path, pngs[name])
    return paths


def samples_figure(model, seed: int = 0, n: int = 100):
    """`n` digits decoded from z ~ N(0, I): the VAE as a generator (a conditional one: a row
    of samples per label)."""
    from vaelab.images import grid

    fig, ax = new_axes((7.5, 7.8))
    if model.config.conditional:
        classes = model.config.num_classes
        per = max(1, n // classes)
        labels = torch.arange(classes).repeat_interleave(per)  # row i: label i
        images = images_of(model, model.sample(len(labels), seed=seed, label=labels))
        show_image(ax, grid(images, cols=per))
        ax.set_title(f"new images per label (row i: label i), z ~ N(0, I) (seed {seed})")
    else:
        images = images_of(model, model.sample(n, seed=seed))
        show_image(ax, grid(images, cols=math.ceil(math.sqrt(n))))
        ax.set_title(f"{n} new images: decoded from z ~ N(0, I), the encoder is not used (seed {seed})")
    fig.tight_layout()
    return fig


@torch.no_grad()
def reconstructions_figure(model, dataset, points: LatentPoints, n: int = 10):
    """Test images (top row) above the decoding of their latent means (bottom row)."""
    chosen = one_per_label(points, n)
    x = test_inputs(model, dataset, points.indices[chosen])
    mean = torch.from_numpy(points.means[chosen]).to(device_of(model))
    label = condition(model, points.labels[chosen] if points.labels is not None else None)
    recons = images_of(model, model.mean_image(model.decode(mean, label)))
    images = np.concatenate([images_of(model, x), recons])  # row 1 originals, row 2 reconstructions
    fig, ax = new_axes((1.0 * len(chosen) + 1.6, 3.3))
    columns = [""] * len(chosen)
    if points.labels is not None:
        columns = [label_name(dataset.classes, points.labels[i]) for i in chosen]
    tile_images(ax, images, cols=len(chosen), columns=columns, rows=["test image", "reconstruction"])
    what = "one per label, " if points.labels is not None else ""
    ax.set_title(f"Test images ({what}top) and their reconstructions (bottom): decoder(mean of q(z|x))",
                 fontsize=11)
    fig.tight_layout()
    return fig


def latent_figure(points: LatentPoints, latent_dim: int, classes=None):
    """The seed's scatter of the test set's latent means, coloured by digit label."""
    from matplotlib.colors import BoundaryNorm, ListedColormap

    means = points.means
    fig, ax = new_axes((8, 7))
    n = len(means)
    if latent_dim == 1:
        rng = np.random.default_rng(0)
        height = points.labels if points.labels is not None else np.zeros(n)
        xy = np.stack([means[:, 0], height + rng.uniform(-0.3, 0.3, n)], axis=1)
        title = f"Latent means of {n} test images (1-D latent space)"
        ax.set_xlabel("z1 (posterior mean)")
        ax.set_ylabel("label (spread vertically to separate the dots)" if points.labels is not None
                      else "random vertical spread (no meaning)")
    elif latent_dim == 2:
        xy = means
        title = f"Latent means of {n} test images, coloured by label"
        ax.set_xlabel("z1 (posterior mean)")
        ax.set_ylabel("z2 (posterior mean)")
    else:
        directions, ratio = principal_directions(means)
        xy = (means - means.mean(axis=0)) @ directions.T
        title = (
            f"Latent means of {n} test images: first two principal components\n"
            f"of the {latent_dim}-D latent space ({ratio[0]:.0%} and {ratio[1]:.0%} of the variance)"
        )
        ax.set_xlabel("principal component 1")
        ax.set_ylabel("principal component 2")
    if points.labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=5, alpha=0.6, color="tab:blue", linewidths=0)
        title += ", unlabelled"
    else:
        k = max(int(points.labels.max()) + 1, len(classes) if classes else 0)
        cmap = ListedColormap(palette(k))
        norm = BoundaryNorm(np.arange(-0.5, k + 0.5), cmap.N)
        dots = ax.scatter(xy[:, 0], xy[:, 1], c=points.labels, cmap=cmap, norm=norm, s=6, alpha=0.8,
                          linewidths=0)
        bar = fig.colorbar(dots, ax=ax, ticks=np.arange(k))
        bar.ax.set_yticklabels([label_name(classes, c) for c in range(k)])
        bar.set_label("label")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if latent_dim >= 2:
        ax.set_aspect("equal", adjustable="datalim")
    fig.tight_layout()
    return fig


def manifold_figure(model, points: LatentPoints, n: int = MANIFOLD_N):
    """The seed's manifold: an n x n grid of decodings at Gaussian quantiles, axes in z units."""
    from vaelab.images import grid

    k = model.latent_dim
    directions = None
    if k > 2:
        directions, _ = principal_directions(points.means)
    images = manifold_grid(model, n, directions)
    rows = len(images) // n
    fig, ax = new_axes((9, 9.6) if rows > 1 else (11, 2.6))
    tile = grid(images, cols=n, pad=0)
    ax.imshow(tile, cmap="gray" if tile.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
    size_y, size_x = tile.shape[0] / rows, tile.shape[1] / n
    ticks = [f"{round(v, 2) + 0.0:.2f}" for v in gaussian_quantiles(n)]  # + 0.0: no "-0.00"
    ax.set_xticks((np.arange(n) + 0.5) * size_x, ticks, rotation=90, fontsize=8)
    if rows > 1:
        ax.set_yticks((np.arange(n) + 0.5) * size_y, ticks, fontsize=8)
    else:
        ax.set_yticks([])
    if k == 1:
        ax.set_xlabel("z1")
        title = f"Decodings of z1 at {n} Gaussian quantiles (5% to 95%)"
    elif k == 2:
        ax.set_xlabel("z1 (left to right)")
        ax.set_ylabel("z2 (top to bottom)")
        title = f"Manifold: digits decoded on a {n} x {n} grid of Gaussian quantiles (5% to 95%) of z"
    else:
        ax.set_xlabel("coordinate along principal direction 1 of the test latent means")
        ax.set_ylabel("coordinate along principal direction 2")
        title = (
            f"Manifold: decodings on a {n} x {n} grid of Gaussian quantiles (5% to 95%)\n"
            f"along the two leading principal directions of the {k}-D latent space (through z = 0)"
        )
    if model.config.conditional:
        title += "\n(a conditional model: every image is drawn as label 0; z is the style)"
    ax.set_title(title)
    fig.tight_layout()
    return fig


@torch.no_grad()
def interpolation_figure(model, dataset, points: LatentPoints, steps: int = 10):
    """Decodings on the straight line between the latent means of two test images of different labels."""
    a = 0
    b = 1 if len(points.means) > 1 else 0
    if points.labels is not None:
        others = np.flatnonzero(points.labels != points.labels[a])
        b = int(others[0]) if len(others) else b
    ends = images_of(model, test_inputs(model, dataset, points.indices[[a, b]]))
    t = torch.linspace(0, 1, steps)[:, None]  # (steps, 1)
    mean_a, mean_b = (torch.from_numpy(points.means[i]) for i in (a, b))
    z = (1 - t) * mean_a + t * mean_b  # (steps, latent)
    # a conditional model draws the whole line as A's label
    label = condition(model, [points.labels[a]] * steps if points.labels is not None else None)
    line = images_of(model, model.mean_image(model.decode(z.to(device_of(model)), label)))
    images = np.concatenate([ends[:1], line, ends[1:]])  # A, the line, B
    names = ["A", "B"]
    if points.labels is not None:
        names = [f"a test '{label_name(dataset.classes, points.labels[i])}'" for i in (a, b)]
    fig, ax = new_axes((1.0 * (steps + 2) + 0.6, 2.5))
    columns = ["image A", *(f"t={v:.2f}" for v in t[:, 0].tolist()), "image B"]
    tile_images(ax, images, cols=steps + 2, columns=columns, gaps=(1, steps + 1))
    ax.set_title(
        f"Interpolation from {names[0]} (A, left) to {names[1]} (B, right): "
        "decoder((1 - t) * mean_A + t * mean_B)",
        fontsize=11,
    )
    fig.tight_layout()
    return fig


def curves_figure(metrics: list[dict], config):
    """Train and test loss, reconstruction and KL per epoch, in nats per image."""
    grey = config.data.binarize == "none"
    beta = config.train.beta
    loss_name = "BCE loss" if grey else "negative ELBO"
    if beta != 1 or config.train.warmup_epochs:
        loss_name = f"train: recon + {beta:g} x KL, test: recon + KL"
    panels = [
        ("loss", f"{loss_name} (nats/image)", "loss"),
        ("recon", ("BCE reconstruction" if grey else "-log p(x|z)") + " (nats/image)", "reconstruction"),
        ("kl", "KL(q(z|x) || p(z)) (nats/image)", "KL divergence"),
    ]
    fig = new_figure((14, 4.4))
    axes = fig.subplots(1, 3)
    for ax, (key, ylabel, title) in zip(axes, panels, strict=True):
        for split, style in (("train", "-o"), ("test", "--s")):
            rows = [r for r in metrics if isinstance(r.get(f"{split}_{key}"), int | float)]
            if rows:
                ax.plot([r["epoch"] for r in rows], [r[f"{split}_{key}"] for r in rows], style,
                        markersize=3, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
            ax.xaxis.get_major_locator().set_params(integer=True)
        else:
            ax.text(0.5, 0.5, "no epochs recorded yet", ha="center", va="center", transform=ax.transAxes)
    what = "grey levels: the seed's BCE loss" if grey else f"{config.data.binarize} binarization"
    fig.suptitle(f"Training curves per epoch ({what}; test: one sampled z per image)")
    fig.tight_layout()
    return fig


def kl_per_dim_figure(points: LatentPoints, threshold: float = ACTIVE_THRESHOLD):
    """The average KL of each latent dimension on the test subset; active dimensions marked."""
    from matplotlib.patches import Patch

    from vaelab.objectives import kl_per_dim

    kl = kl_per_dim(torch.from_numpy(points.means), torch.from_numpy(points.log_vars)).mean(0).numpy()
    active = points.means.var(axis=0) > threshold
    k = len(kl)
    fig, ax = new_axes((max(7.0, 0.35 * k + 3), 5))
    dims = np.arange(1, k + 1)
    colours = np.where(active, "tab:blue", "lightgray")
    ax.bar(dims, kl, color=colours, edgecolor="dimgray", linewidth=0.5)
    ax.set_xticks(dims, [f"z{d}" for d in dims], rotation=90 if k > 20 else 0)
    ax.set_xlabel("latent dimension")
    ax.set_ylabel("average KL(q(z_d|x) || N(0, 1)) (nats/image)")
    ax.set_title(
        f"KL per latent dimension, averaged over {len(points.means)} test images\n"
        f"{int(active.sum())} of {k} dimensions active; total {kl.sum():.2f} nats/image"
    )
    ax.legend(
        handles=[
            Patch(color="tab:blue", label=f"active: variance of E[z_d|x] over test images > {threshold:g}"),
            Patch(facecolor="lightgray", edgecolor="dimgray",
                  label=f"inactive: variance of E[z_d|x] <= {threshold:g}"),
        ],
        fontsize=9,
        loc="upper right",
    )
    ax.set_ylim(0, max(float(kl.max()), 1e-3) * 1.25)  # room for the legend above the bars
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def ring_figure(seed: int = 0, n: int = 5000):
    """The seed's example: samples of a 2-D standard normal and their image under g."""
    z = np.random.default_rng(seed).standard_normal((n, 2))
    radius = np.linalg.norm(z, axis=1)
    g = z / 10 + z / radius[:, None]
    fig = new_figure((12, 5.6))
    axes = fig.subplots(1, 2)
    for ax, pts, title, (xl, yl) in (
        (axes[0], z, f"{n} samples z ~ N(0, I)", ("z1", "z2")),
        (axes[1], g, "their images g(z) = z/10 + z/||z||: a ring", ("g(z)1", "g(z)2")),
    ):
        dots = ax.scatter(pts[:, 0], pts[:, 1], c=radius, cmap="viridis", s=3, vmin=0, vmax=3.5)
        ax.set_title(title)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.set_xlim(-4, 4)
        ax.set_ylim(-4, 4)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
    fig.colorbar(dots, ax=axes, label="||z|| (the sample's distance from 0)", shrink=0.9)
    fig.suptitle("A fixed function turns Gaussian noise into another shape: the decoder's job, "
                 "learned from data")
    return fig
