"""The browser latent-space explorer: one self-contained HTML file generated from a run.

`write_explorer(run_dir)` writes `RUN/explorer.html`. The file embeds the encoder's and decoder's
weights (float32, base64) and decodes and encodes in plain JavaScript, so it works offline from
disk: no CDN, no network request (its Content-Security-Policy forbids any). It shows

- a square pad with the test set's latent means coloured by label (for a 2-D latent the axes are
  z[0] and z[1]; for more dimensions the two leading principal directions of those means) and a
  point that can be dragged or moved with the arrow keys; the decoded image follows it;
- one slider per latent dimension (the first 32), "random sample" and "reset";
- a drawing canvas whose drawing is preprocessed like an MNIST digit and encoded: the point moves
  to the posterior mean and the reconstruction is shown next to the drawing;
- an interpolation strip between two points set with "set A" and "set B".

Only MLP models (the seed's architecture) run in the page; other architectures raise ConfigError.
"""

from __future__ import annotations

import base64
import html
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaelab.errors import ConfigError, DataError, VaelabError
from vaelab.plots import principal_directions

MAX_SLIDERS = 32
MAX_POINTS = 2000
STRIP_FRAMES = 9
# matplotlib's tab10: the seed's scatter colours
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)


PAGE = "explorer.html"  # the page's name in a run directory


def write_explorer(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    dataset=None,
    max_points: int = MAX_POINTS,
) -> Path:
    """Write the run's interactive latent-space explorer as one offline HTML file.

    Args:
        run_dir: a folder written by `vaelab train`.
        out: the HTML file to write (default `RUN/explorer.html`); written atomically.
        dataset: a `vaelab.data.Dataset` whose test set gives the scatter of latent means;
            default: the run's own data source. Without one (data unavailable) the page works
            without the scatter and says so.
        max_points: how many test images to show in the scatter (a fixed random subset).
    Returns:
        The path of the written file.
    Raises:
        RunError: `run_dir` is not a trained run.
        ConfigError: the model is not an MLP (the only architecture the page runs).

    Example:
        >>> path = write_explorer("runs/seed")  # runs/seed/explorer.html; open it in a browser
    """
    import vaelab
    from vaelab.runs import atomic_write_text

    run_dir = Path(run_dir)
    model = vaelab.load(run_dir)
    check_supported(model)
    page = render_page(model, run_dir, dataset=dataset, max_points=max_points)
    path = Path(out) if out is not None else run_dir / PAGE
    atomic_write_text(path, page)
    return path


def check_supported(model) -> None:
    """Raise ConfigError unless the page can run `model` (MLP encoder and decoder, Bernoulli)."""
    from vaelab.models.mlp import MLPDecoder, MLPEncoder

    config = model.config
    if config.deep:
        raise ConfigError(
            "the explorer runs one-layer Gaussian models only; this run is a hierarchy, a VampPrior or a "
            "flow (use 'vaelab sample' and 'vaelab plot' for it)"
        )
    if config.architecture != "mlp" or not (
        isinstance(model.encoder, MLPEncoder) and isinstance(model.decoder, MLPDecoder)
    ):
        raise ConfigError(
            f"the explorer runs MLP models only; this run's architecture is {config.architecture!r} "
            "(use 'vaelab sample' or 'vaelab export --format onnx' for it)"
        )
    if config.conditional:
        raise ConfigError(
            "the explorer runs unconditional models only; this run is a conditional VAE "
            "(use 'vaelab sample RUN --label N')"
        )
    if config.likelihood != "bernoulli":
        raise ConfigError(
            f"the explorer runs Bernoulli decoders only; this run's likelihood is {config.likelihood!r}"
        )


def render_page(model, run_dir: Path, *, dataset=None, max_points: int = MAX_POINTS) -> str:
    """The explorer's HTML text for a loaded MLP `model` (see `write_explorer`)."""
    from vaelab.runs import read_metrics

    config = model.config
    run_config = getattr(model, "run_config", None)
    points, note = _test_points(model, run_config, dataset, max_points)
    payload = {
        "activation": config.activation,
        "imageShape": list(config.input_shape),  # (C, H, W)
        "latentDim": config.latent_dim,
        "maxSliders": MAX_SLIDERS,
        "stripFrames": STRIP_FRAMES,
        "palette": list(PALETTE),
        "encoder": {
            "body": [_layer(m) for m in model.encoder.body if isinstance(m, torch.nn.Linear)],
            "mean": _layer(model.encoder.z_mean),
            "logVar": _layer(model.encoder.z_log_var),
        },
        "decoder": {
            "body": [_layer(m) for m in model.decoder.body if isinstance(m, torch.nn.Linear)],
            "out": _layer(model.decoder.out),
        },
        **points,
    }
    k = config.latent_dim
    arch = "-".join(str(n) for n in (config.input_dim, *config.hidden, k))
    metrics = read_metrics(run_dir)
    facts = [f"MLP {arch}, {config.activation}"]
    if run_config is not None:
        facts.append(f"data {run_config.data.source}")
        facts.append(f"preset {run_config.preset}")
    if metrics:
        last = metrics[-1]
        facts.append(f"{last.get('epoch', len(metrics))} epochs")
        if "test_loss" in last:
            facts.append(f"test loss {last['test_loss']:.2f} nats")
    notes = [note] if note else []
    if k > MAX_SLIDERS:
        notes.append(
            f"The model has {k} latent dimensions; the sliders show the first {MAX_SLIDERS}. "
            "The others change with the pad, random sample, reset and drawing."
        )
    pad_help = (
        "Axes: z[0] across, z[1] up."
        if k == 2
        else "Axes: the two leading principal directions of the test set's latent means; dragging "
        "moves the point along them and leaves the other directions as they are."
    )
    values = {
        "TITLE": html.escape(f"vaelab explorer: {run_dir.resolve().name}"),
        "RUN_NAME": html.escape(run_dir.resolve().name),
        "FACTS": html.escape(" · ".join(facts)),
        "NOTES": "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes),
        "LEGEND": _legend(points),
        "PAD_HELP": html.escape(pad_help),
        "LAYOUT": "few-dims" if k <= 4 else "many-dims",
        "IMAGE_SIZE": html.escape(f"{config.input_shape[1]}x{config.input_shape[2]}"),
        "STYLE": _asset("explorer.css"),
        "SCRIPT": _asset("explorer.js"),
        "DATA": script_json(payload),
    }
    template = _asset("template.html")
    # one pass: text put in is never scanned for placeholders again
    return re.sub(r"\{\{([A-Z_]+)\}\}", lambda m: values[m.group(1)], template)


def script_json(obj: Any) -> str:
    """JSON that is safe inside <script>: no '<' (so no '</script' or '<!--'), '>' or '&' left."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


# --- payload pieces --------------------------------------------------------------------------


def _f32(x: np.ndarray | torch.Tensor) -> str:
    """Little-endian float32 bytes, base64 (JavaScript reads them into a Float32Array)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu").numpy()
    return base64.b64encode(np.ascontiguousarray(x, dtype="<f4").tobytes()).decode("ascii")


def _layer(linear: torch.nn.Linear) -> dict[str, Any]:
    n_out, n_in = linear.weight.shape
    return {"in": int(n_in), "out": int(n_out), "w": _f32(linear.weight), "b": _f32(linear.bias)}


def _test_points(model, run_config, dataset, max_points: int) -> tuple[dict[str, Any], str | None]:
    """The pad's frame (centre, two directions, extent), slider ranges, the scatter and A/B."""
    k = model.config.latent_dim
    means, labels, classes, note = None, None, None, None
    try:
        means, labels, classes = _test_means(model, run_config, dataset)
    except VaelabError as e:
        note = f"No scatter: {e}."
    if means is None:
        center = np.zeros(k)
        dirs = np.eye(2, k)  # z[0], z[1] (a zero row for a 1-D latent)
        explained = None
        coords = np.zeros((0, 2))
        extent = 3.0
        slider = np.full(k, 4.0)
    else:
        centered = means - means.mean(axis=0)
        if k == 2:  # the seed's scatter: z itself
            center, dirs = np.zeros(2), np.eye(2)
        else:
            center = means.mean(axis=0)
            leading, _ = principal_directions(means, 2)
            dirs = np.zeros((2, k))  # a zero row for a 1-D latent
            dirs[: len(leading)] = leading
        total = max(float((centered**2).sum()), 1e-12)
        explained = [float(((centered @ d) ** 2).sum() / total) for d in dirs]
        all_coords = (means - center) @ dirs.T  # (N, 2)
        extent = max(2.5, 1.1 * float(np.quantile(np.abs(all_coords), 0.995)))
        slider = np.maximum(3.0, np.ceil(2.2 * np.quantile(np.abs(means), 0.995, axis=0)) / 2)
        rng = np.random.default_rng(0)
        keep = np.sort(rng.permutation(len(means))[:max_points])
        coords, means = all_coords[keep], means[keep]
        labels = labels[keep] if labels is not None else None
    a, b = _default_ends(means, labels, center, dirs)
    points: dict[str, Any] = {
        "center": center.tolist(),
        "dirs": dirs.tolist(),
        "explained": explained,
        "extent": extent,
        "sliderRange": slider.tolist(),
        "points": {"n": len(coords), "xy": _f32(coords)},
        "classes": classes,
        "a": a,
        "b": b,
    }
    if labels is not None:
        points["points"]["labels"] = base64.b64encode(labels.astype(np.uint8).tobytes()).decode("ascii")
    return points, note


def _test_means(model, run_config, dataset):
    """Posterior means (N, latent) of the test images as the run saw them, labels, class names."""
    from vaelab import runs
    from vaelab.data.tensors import test_targets

    if run_config is None:
        raise DataError("the test set could not be loaded (the model carries no run configuration)")
    try:
        if dataset is None:
            dataset = runs.load_run_data(model)
        else:
            runs.check_run_data(model, dataset)
    except VaelabError as e:
        raise DataError(f"the test set could not be loaded ({e})") from None
    x_test = test_targets(dataset.x_test, run_config.data.binarize)
    with torch.no_grad():
        means = torch.cat([model.encode(x)[0] for x in x_test.split(1000)])
    if not bool(torch.isfinite(means).all()):
        where = getattr(model, "run_dir", None)
        weights = f" in {Path(where) / 'model.safetensors'}" if where is not None else ""
        raise DataError(f"the encoder gives infinite or NaN values on the test images (weights{weights}?)")
    labels = None
    classes = None
    y_test = None if dataset.y_test is None else np.asarray(dataset.y_test, dtype=np.int64)
    if y_test is not None and int(y_test.max()) < 256:
        labels = y_test
        n = int(labels.max()) + 1
        named = dataset.classes
        classes = list(named) if named is not None else [str(i) for i in range(n)]
    return means.double().numpy(), labels, classes


def _default_ends(means, labels, center, dirs) -> tuple[list[float], list[float]]:
    """Interpolation ends to start with: two test images of different labels (or two points)."""
    if means is not None and len(means) >= 2:
        i, j = 0, 1
        if labels is not None:
            other = np.flatnonzero(labels != labels[0])
            j = int(other[0]) if len(other) else 1
        return means[i].tolist(), means[j].tolist()
    return (center - dirs[0]).tolist(), (center + dirs[0]).tolist()


def _legend(points: dict[str, Any]) -> str:
    classes = points.get("classes")
    if not classes or "labels" not in points["points"]:
        return ""
    items = "".join(
        f'<li><span class="swatch" style="background:{PALETTE[i % len(PALETTE)]}" aria-hidden="true">'
        f"</span>{html.escape(str(name))}</li>"
        for i, name in enumerate(classes)
    )
    return f'<ul class="legend" aria-label="Scatter colours by label">{items}</ul>'


def _asset(name: str) -> str:
    text = resources.files("vaelab.explorer").joinpath(name).read_text(encoding="utf-8")
    if name != "template.html" and re.search(r"</(script|style)", text, re.IGNORECASE):
        raise AssertionError(f"{name} must not contain a closing script/style tag")  # a bug here
    return text


__all__ = ["write_explorer", "render_page", "check_supported", "script_json"]
