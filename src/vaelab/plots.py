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

import io
import math
from pathlib import Path
from statistics import NormalDist
from typing import NamedTuple

import numpy as np
import torch

FIGURES = (
    "samples",
    "reconstructions",
    "latent",
    "manifold",
    "interpolation",
    "curves",
    "kl_per_dim",
    "ring",
)
SCATTER_LIMIT = 2000  # test images used by the scatter, PCA and KL figures
ACTIVE_THRESHOLD = 0.01  # a dim is active if Var over x of its posterior mean exceeds this
MANIFOLD_N = 15  # the seed's 15 x 15 grid
_CHUNK = 1000  # images per encoder call


class LatentPoints(NamedTuple):
    """The encoder's output on a subset of the test set."""

    means: np.ndarray  # (N, latent) posterior means
    log_vars: np.ndarray  # (N, latent) posterior log-variances
    labels: np.ndarray | None  # (N,) int64, None for unlabelled data
    indices: np.ndarray  # (N,) positions in dataset.x_test


# --- the data the figures show ----------------------------------------------------------------


def test_indices(n_test: int, limit: int = SCATTER_LIMIT, seed: int = 0) -> np.ndarray:
    """Sorted positions of at most `limit` test images, a random subset fixed by `seed`."""
    if n_test <= limit:
        return np.arange(n_test)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_test, size=limit, replace=False))


def test_inputs(model, dataset, indices: np.ndarray) -> torch.Tensor:
    """The test images at `indices` as the model saw them in training: (N, D) in [0, 1].

    Grey levels are uint8 / 255; a binarizing run's test set is binarized once with
    `TEST_BINARIZE_SEED`, the protocol of `vaelab.train.prepare`.
    """
    from vaelab.data.tensors import test_targets

    config = getattr(model, "run_config", None)
    return test_targets(dataset.x_test, config.data.binarize if config else "none")[indices]


@torch.no_grad()
def latent_points(model, dataset, limit: int = SCATTER_LIMIT, seed: int = 0) -> LatentPoints:
    """Encode at most `limit` test images (chosen by `seed`): the data of the latent scatter.

    Example:
        >>> points = latent_points(vaelab.load("runs/seed"), vaelab.data.load("mnist"), 500)
        >>> points.means.shape
        (500, 2)
    """
    indices = test_indices(len(dataset.x_test), limit, seed)
    x = test_inputs(model, dataset, indices)
    device = _device(model)
    means, log_vars = [], []
    labels = None if dataset.y_test is None else np.asarray(dataset.y_test)[indices]
    for i in range(0, len(x), _CHUNK):
        label = _condition(model, labels[i : i + _CHUNK] if labels is not None else None)
        mean, log_var = model.encode(x[i : i + _CHUNK].to(device), label)
        means.append(mean.float().cpu())
        log_vars.append(log_var.float().cpu())
    return LatentPoints(torch.cat(means).numpy(), torch.cat(log_vars).numpy(), labels, indices)


def principal_directions(points: np.ndarray, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The `k` leading principal directions of `points` (N, D) and their variance fractions.

    Returns ((k, D) unit rows, (k,) explained-variance ratios). Each direction's sign is fixed
    (its largest-magnitude component is positive), so the same points give the same axes.
    """
    centred = points - points.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    directions = vt[:k].copy()
    for row in directions:
        if row[np.argmax(np.abs(row))] < 0:
            row *= -1
    variance = s**2
    ratio = variance[:k] / variance.sum() if variance.sum() > 0 else np.zeros(k)
    return directions, ratio


def gaussian_quantiles(n: int = MANIFOLD_N) -> np.ndarray:
    """The seed's grid coordinates: Phi^-1(linspace(0.05, 0.95, n)) of a standard normal."""
    normal = NormalDist()
    return np.array([normal.inv_cdf(p) for p in np.linspace(0.05, 0.95, n)])


def _condition(model, labels) -> torch.Tensor | None:
    """The labels to give a conditional model (as a tensor on its device); None otherwise."""
    if not model.config.conditional:
        return None
    if labels is None:
        raise ValueError("a conditional model needs labels: the data has none")
    return torch.as_tensor(np.asarray(labels), device=_device(model)).long()


@torch.no_grad()
def manifold_grid(
    model, n: int = MANIFOLD_N, directions: np.ndarray | None = None, label: int | None = None
) -> np.ndarray:
    """Decode the seed's n x n grid of Gaussian quantiles: probabilities (n*n, H, W).

    With q = `gaussian_quantiles(n)`, image `i * n + j` (row i, column j of the picture) decodes
    z = q[j] * u1 + q[i] * u2, where (u1, u2) are the rows of `directions` (2, latent). This is
    the seed's ordering: `for i, yi in enumerate(grid_x): for j, xi in enumerate(grid_y):
    z_sample = [[xi, yi]]`, drawn with imshow, so the first coordinate grows left to right and
    the second top to bottom. `directions=None` takes the first two latent axes (other
    coordinates 0); a 1-D latent space gives one row of n images, z = q[j].
    Colour models give (n*n, C, H, W). A conditional model draws the digit `label` (default 0).
    """
    k = model.latent_dim
    if directions is None:
        directions = np.eye(k)[: min(k, 2)]
    directions = np.asarray(directions, dtype=np.float64)
    if directions.ndim != 2 or directions.shape[1] != k or len(directions) not in (1, 2):
        raise ValueError(f"manifold_grid: directions must be (2, {k}), got {directions.shape}")
    q = gaussian_quantiles(n)
    if len(directions) == 1:
        coords = q[:, None]  # (n, 1)
    else:
        row, col = np.meshgrid(q, q, indexing="ij")  # row[i, j] = q[i], col[i, j] = q[j]
        coords = np.stack([col.ravel(), row.ravel()], axis=1)  # (n*n, 2): [q[j], q[i]]
    z = torch.from_numpy(coords @ directions).float().to(_device(model))  # (n*n, latent)
    label = (label or 0) if model.config.conditional else None
    return _images(model, model.mean_image(model.decode(z, label)))


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
        "interpolation": lambda: interpolation_figure(model, dataset, points),
        "curves": lambda: curves_figure(metrics, config),
        "kl_per_dim": lambda: kl_per_dim_figure(points),
        "ring": lambda: ring_figure(seed),
    }
    pngs = {name: _png(figures[name]()) for name in FIGURES}  # all drawn before any is written
    for name, path in zip(FIGURES, paths, strict=True):
        runs.atomic_write_bytes(path, pngs[name])
    return paths


def samples_figure(model, seed: int = 0, n: int = 100):
    """`n` digits decoded from z ~ N(0, I): the VAE as a generator (a conditional one: a row
    of samples per label)."""
    from vaelab.images import grid

    fig, ax = _figure((7.5, 7.8))
    if model.config.conditional:
        classes = model.config.num_classes
        per = max(1, n // classes)
        labels = torch.arange(classes).repeat_interleave(per)  # row i: label i
        images = _images(model, model.sample(len(labels), seed=seed, label=labels))
        _show(ax, grid(images, cols=per))
        ax.set_title(f"new images per label (row i: label i), z ~ N(0, I) (seed {seed})")
    else:
        images = _images(model, model.sample(n, seed=seed))
        _show(ax, grid(images, cols=math.ceil(math.sqrt(n))))
        ax.set_title(f"{n} new images: decoded from z ~ N(0, I), the encoder is not used (seed {seed})")
    fig.tight_layout()
    return fig


@torch.no_grad()
def reconstructions_figure(model, dataset, points: LatentPoints, n: int = 10):
    """Test images (top row) above the decoding of their latent means (bottom row)."""
    chosen = _one_per_label(points, n)
    x = test_inputs(model, dataset, points.indices[chosen])
    mean = torch.from_numpy(points.means[chosen]).to(_device(model))
    label = _condition(model, points.labels[chosen] if points.labels is not None else None)
    recons = _images(model, model.mean_image(model.decode(mean, label)))
    images = np.concatenate([_images(model, x), recons])  # row 1 originals, row 2 reconstructions
    fig, ax = _figure((1.0 * len(chosen) + 1.6, 3.3))
    columns = [""] * len(chosen)
    if points.labels is not None:
        columns = [_label_name(dataset.classes, points.labels[i]) for i in chosen]
    _tile(ax, images, cols=len(chosen), columns=columns, rows=["test image", "reconstruction"])
    what = "one per label, " if points.labels is not None else ""
    ax.set_title(f"Test images ({what}top) and their reconstructions (bottom): decoder(mean of q(z|x))",
                 fontsize=11)
    fig.tight_layout()
    return fig


def latent_figure(points: LatentPoints, latent_dim: int, classes=None):
    """The seed's scatter of the test set's latent means, coloured by digit label."""
    from matplotlib.colors import BoundaryNorm, ListedColormap

    means = points.means
    fig, ax = _figure((8, 7))
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
        palette = _palette(k)
        cmap = ListedColormap(palette)
        norm = BoundaryNorm(np.arange(-0.5, k + 0.5), cmap.N)
        dots = ax.scatter(xy[:, 0], xy[:, 1], c=points.labels, cmap=cmap, norm=norm, s=6, alpha=0.8,
                          linewidths=0)
        bar = fig.colorbar(dots, ax=ax, ticks=np.arange(k))
        bar.ax.set_yticklabels([_label_name(classes, c) for c in range(k)])
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
    fig, ax = _figure((9, 9.6) if rows > 1 else (11, 2.6))
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
    ends = _images(model, test_inputs(model, dataset, points.indices[[a, b]]))
    t = torch.linspace(0, 1, steps)[:, None]  # (steps, 1)
    mean_a, mean_b = (torch.from_numpy(points.means[i]) for i in (a, b))
    z = (1 - t) * mean_a + t * mean_b  # (steps, latent)
    # a conditional model draws the whole line as A's label
    label = _condition(model, [points.labels[a]] * steps if points.labels is not None else None)
    line = _images(model, model.mean_image(model.decode(z.to(_device(model)), label)))
    images = np.concatenate([ends[:1], line, ends[1:]])  # A, the line, B
    names = ["A", "B"]
    if points.labels is not None:
        names = [f"a test '{_label_name(dataset.classes, points.labels[i])}'" for i in (a, b)]
    fig, ax = _figure((1.0 * (steps + 2) + 0.6, 2.5))
    columns = ["image A", *(f"t={v:.2f}" for v in t[:, 0].tolist()), "image B"]
    _tile(ax, images, cols=steps + 2, columns=columns, gaps=(1, steps + 1))
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
    fig = _new_figure((14, 4.4))
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
    fig, ax = _figure((max(7.0, 0.35 * k + 3), 5))
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
    fig = _new_figure((12, 5.6))
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


# --- helpers ----------------------------------------------------------------------------------


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _images(model, probabilities: torch.Tensor) -> np.ndarray:
    """(N, D) probabilities -> (N, H, W) grey or (N, C, H, W) colour, float in [0, 1]."""
    c, h, w = model.image_shape
    x = probabilities.detach().float().cpu().numpy().reshape(len(probabilities), c, h, w)
    return x[:, 0] if c == 1 else x


def _show(ax, image: np.ndarray) -> None:
    """One image (H, W) or (C, H, W) in [0, 1], or a uint8 tile, without axis ticks."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] in (1, 3):
        image = image.transpose(1, 2, 0)
    top = 255 if image.dtype == np.uint8 else 1
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=top, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _tile(ax, images: np.ndarray, cols: int, columns=(), rows=(), gaps=()) -> None:
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


def _one_per_label(points: LatentPoints, n: int) -> list[int]:
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


def _label_name(classes, label) -> str:
    label = int(label)
    if classes is not None and label < len(classes):
        return str(classes[label]).replace("$", r"\$")  # a folder name is text, not mathtext
    return str(label)


def _palette(k: int) -> list:
    from matplotlib import colormaps

    if k <= 10:
        return [colormaps["tab10"](i) for i in range(k)]
    if k <= 20:
        return [colormaps["tab20"](i) for i in range(k)]
    return [colormaps["viridis"](i / max(k - 1, 1)) for i in range(k)]


def _new_figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _figure(size: tuple[float, float]):
    fig = _new_figure(size)
    return fig, fig.subplots()


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()
