"""The report of a run: one self-contained HTML file, RUN/report.html.

Everything is inside the file: CSS inline, figures as base64 `data:` URIs, no scripts and no
request to anything outside it, so it can be mailed, archived or opened offline. Every string
that comes from the run (its name, paths, config values, metric names) is HTML-escaped.
"""

from __future__ import annotations

import base64
import datetime
import json
import math
import shlex
from html import escape
from pathlib import Path
from typing import Any

CAPTIONS = {
    "samples": "New images made by the decoder alone from random points z ~ N(0, I); the encoder "
    "plays no part. Look for digit-like shapes: blurry or mixed digits are typical of a small "
    "latent space or a short training run.",
    "reconstructions": "Top row: test images the model never trained on; bottom row: what the "
    "decoder makes of each image's latent mean. Close copies mean the code keeps the digit's "
    "identity; lost details show what the few latent numbers cannot hold.",
    "latent": "Each dot is one test image placed at its latent mean, coloured by its true label "
    "(which the model never saw). Digits of one class forming clusters means the encoder learned "
    "what distinguishes them without being told; the cloud should stay near a standard normal "
    "(mostly within ±3). With more than two latent dimensions the plot shows the first two "
    "principal components of the means.",
    "manifold": "The seed's picture of the latent space: images decoded on an even grid of "
    "Gaussian quantiles. Nearby points decode to similar digits and one digit morphs smoothly "
    "into another; the grid spans the central 90% of the prior along each axis (for more than "
    "two latent dimensions: along the two leading principal directions, other coordinates 0).",
    "interpolation": "Decodings of points on the straight line between the latent means of two "
    "test images of different classes. A smooth change with plausible digits on the way shows a "
    "continuous latent space without holes.",
    "curves": "Loss per epoch on the training set (averaged over the epoch) and the test set "
    "(after the epoch). The loss is the sum of reconstruction and KL. Test close to train means no "
    "over-fitting; a flat end means more epochs would gain little.",
    "kl_per_dim": "How many nats each latent dimension carries on average. Grey bars are "
    "inactive dimensions: their posterior means barely vary between images, so the model ignores "
    "them (posterior collapse).",
    "ring": "The seed's argument for a Gaussian prior: a fixed function g(z) = z/10 + z/‖z‖ "
    "turns a standard normal cloud (left) into a ring (right). Colour is each point's distance "
    "from 0, showing where it goes. A decoder learns such a map, from N(0, I) to digits.",
}

TITLES = {
    "samples": "Samples from the prior",
    "reconstructions": "Reconstructions",
    "latent": "The latent space",
    "manifold": "The manifold",
    "interpolation": "Interpolation",
    "curves": "Training curves",
    "kl_per_dim": "KL per latent dimension",
    "ring": "Why a Gaussian prior is enough",
}

# evaluation.json keys (vaelab.evaluate), in the order shown; other keys follow as they come
EVALUATION_LABELS = {
    "elbo": "ELBO (nats/image)",
    "elbo_stderr": "ELBO standard error",
    "nll": "negative log-likelihood bound, -IWAE_k (nats/image)",
    "nll_stderr": "its standard error",
    "log_px": "log-likelihood bound, IWAE_k (nats/image)",
    "bits_per_dim": "bits per dimension (from the IWAE bound)",
    "elbo_bits_per_dim": "bits per dimension (from the ELBO)",
    "loss": "negative ELBO (nats/image)",
    "recon": "reconstruction term (nats/image)",
    "kl": "KL term (nats/image)",
    "k": "importance samples per image (k)",
    "n_images": "test images",
    "binarization": "test images binarized as",
    "active_dims": "active latent dimensions",
    "active_threshold": "activity threshold (variance of the posterior mean)",
    "kl_per_dim": "KL per latent dimension (nats/image)",
    "posterior_mean_variance": "variance of each dimension's posterior mean",
    "seconds": "seconds",
}

STYLE = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;
max-width:1100px;padding:1.5em;color:#1d1d1f;background:#fff}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:2em;border-bottom:1px solid #ddd;
padding-bottom:.2em}.muted{color:#666}code{font:13px ui-monospace,Menlo,Consolas,monospace;
background:#f3f3f3;padding:0 .25em;border-radius:3px}
table{border-collapse:collapse;margin:.5em 0;font-size:14px}th,td{border:1px solid #ddd;
padding:.25em .6em;text-align:left;vertical-align:top}td.num{text-align:right;
font-variant-numeric:tabular-nums}th{background:#f6f6f6}.scroll{overflow-x:auto}
figure{margin:1.5em 0;padding:0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#333;margin-top:.3em;max-width:60em}
"""


def write_report(run_dir: str | Path) -> Path:
    """Write RUN/report.html: configuration, metrics, evaluation and every figure, in one file.

    Figures are drawn first (`vaelab.plots.write_figures`) when any is missing; the evaluation
    comes from RUN/evaluation.json when `vaelab evaluate RUN` has written it. Of RUN/figures/,
    only PNG files that are plain files are embedded: a link, a pipe or a file without PNG's
    signature is left out (a report is meant to be sent around, so it holds nothing else).

    Args:
        run_dir: a run directory written by `vaelab train`.
    Returns:
        The path of the report.
    Raises:
        RunError: `run_dir` is not a run directory (nothing is written then).

    Example:
        >>> write_report("runs/seed")
        PosixPath('runs/seed/report.html')
    """
    from vaelab import plots, runs

    run_dir = Path(run_dir)
    config = runs.read_config(run_dir)
    figures_dir = run_dir / "figures"
    figures = _figure_paths(figures_dir)
    if any(figures_dir / f"{name}.png" not in figures for name in plots.FIGURES):
        plots.write_figures(run_dir)
        figures = _figure_paths(figures_dir)
    metrics = runs.read_metrics(run_dir)
    html = render(run_dir, config, metrics, _read_evaluation(run_dir), figures)
    path = run_dir / "report.html"
    runs.atomic_write_text(path, html)
    return path


def render(run_dir: Path, config, metrics: list[dict], evaluation: dict | str | None,
           figures: list[Path]) -> str:
    """The report's HTML text (see `write_report`); `evaluation` a dict, an error line or None."""
    name = run_dir.resolve().name or str(run_dir)
    density = config.model.likelihood != "bernoulli"
    grey = config.data.binarize == "none" and not density
    loss_name = "BCE loss" if grey else "negative ELBO"
    last = metrics[-1] if metrics else {}
    summary = [
        f"{len(metrics)} epoch{'s' if len(metrics) != 1 else ''} trained",
        f"data {config.data.source}",
        f"latent dimensions {config.model.latent_dim}",
    ]
    if "test_loss" in last:
        summary.append(f"final test {loss_name} {last['test_loss']:.2f} nats/image")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>vaelab report: {escape(name)}</title>",
        f"<style>{STYLE}</style>",
        "</head>",
        "<body>",
        f"<h1>vaelab report: {escape(name)}</h1>",
        f'<p class="muted">Run directory <code>{escape(str(run_dir))}</code>; '
        f"written {escape(_now())} by vaelab {escape(_version())}.</p>",
        f"<p>{escape('; '.join(summary))}.</p>",
        _units_note(grey, density and config.model.likelihood, config.train),
        "<h2>Configuration</h2>",
        _config_table(config.to_dict()),
        "<h2>Metrics per epoch</h2>",
        _metrics_table(metrics, loss_name),
        "<h2>Evaluation</h2>",
        _evaluation_section(evaluation, run_dir),
        "<h2>Figures</h2>",
    ]
    if figures:
        parts.extend(_figure_html(p) for p in figures)
    else:
        parts.append("<p>No figures yet: run <code>vaelab plot RUN</code>.</p>")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def _units_note(grey: bool, density: str | bool = False, train=None) -> str:
    if density:
        text = (
            f"Numbers are nats per image. The likelihood is {density}, a density of grey levels in "
            "[0, 1], so the loss is a negative ELBO in nats of a density (it can be negative): "
            "compare it only with runs of the same likelihood."
        )
    elif grey:
        text = (
            "Numbers are nats per image. A Bernoulli likelihood on grey levels in [0, 1], as in the "
            "seed, so the loss is the seed's BCE loss (reconstruction cross-entropy + KL), not a "
            "log-likelihood: compare it only with other grey-level runs."
        )
    else:
        text = (
            "Numbers are nats per image. The data are binarized, so the loss is the negative ELBO: "
            "an upper bound on the negative log-likelihood of the test images."
        )
    if train is not None and (train.beta != 1.0 or train.warmup_epochs):
        warmup = f", reached after a warm-up of {train.warmup_epochs:g} epochs" if train.warmup_epochs else ""
        text += (
            f" The training loss weighs the KL by beta = {train.beta:g}{warmup}; the test loss is "
            "reconstruction + KL, so the two differ by design."
        )
    return f"<p>{escape(text)}</p>"


def _config_table(d: dict[str, Any]) -> str:
    rows = []
    for key, value in flatten(d):
        rows.append(f"<tr><th>{escape(key)}</th><td>{escape(_value(value))}</td></tr>")
    return '<table class="config">\n' + "\n".join(rows) + "\n</table>"


def flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts as (dotted.key, value) pairs."""
    out = []
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.extend(flatten(value, name + "."))
        else:
            out.append((name, value))
    return out


METRIC_COLUMNS = [
    ("epoch", "epoch"),
    ("train_loss", "train {loss}"),
    ("train_recon", "train reconstruction"),
    ("train_kl", "train KL"),
    ("test_loss", "test {loss}"),
    ("test_recon", "test reconstruction"),
    ("test_kl", "test KL"),
    ("seconds", "seconds"),
]


def _metrics_table(metrics: list[dict], loss_name: str) -> str:
    if not metrics:
        return "<p>No epochs recorded yet (metrics.jsonl is empty or missing).</p>"
    known = [key for key, _ in METRIC_COLUMNS]
    extra = sorted({k for row in metrics for k in row} - set(known))
    columns = [(k, h.format(loss=loss_name)) for k, h in METRIC_COLUMNS] + [(k, k) for k in extra]
    columns = [(k, h) for k, h in columns if any(k in row for row in metrics)]
    head = "".join(f"<th>{escape(h)}</th>" for _, h in columns)
    body = []
    for row in metrics:
        cells = "".join(f'<td class="num">{escape(_value(row.get(k, ""), 2))}</td>' for k, _ in columns)
        body.append(f"<tr>{cells}</tr>")
    return (
        '<p class="muted">Losses in nats per image; test columns are blank in epochs without a '
        "test pass.</p>\n"
        f'<div class="scroll"><table class="metrics">\n<tr>{head}</tr>\n' + "\n".join(body)
        + "\n</table></div>"
    )


def _read_evaluation(run_dir: Path) -> dict | str | None:
    path = run_dir / "evaluation.json"
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"{path} is not readable JSON; write it again with: vaelab evaluate {_quoted(run_dir)}"
    if not isinstance(d, dict):
        return f"{path} does not hold a JSON object; write it again with: vaelab evaluate {_quoted(run_dir)}"
    return d


def _quoted(run_dir: Path) -> str:
    """The run's path as a shell would need it in a command the reader copies."""
    return shlex.quote(str(run_dir))


def _evaluation_section(evaluation: dict | str | None, run_dir: Path) -> str:
    if evaluation is None:
        return (
            "<p>Not evaluated yet. For the ELBO and an importance-sampled log-likelihood with "
            f"standard errors, run <code>{escape(f'vaelab evaluate {_quoted(run_dir)}')}</code>, then "
            f"<code>{escape(f'vaelab report {_quoted(run_dir)}')}</code> again.</p>"
        )
    if isinstance(evaluation, str):
        return f"<p>{escape(evaluation)}</p>"
    keys = [k for k in EVALUATION_LABELS if k in evaluation]
    keys += [k for k in evaluation if k not in EVALUATION_LABELS]
    binary = evaluation.get("binarization") is not None
    rows = []
    for key in keys:
        label, value = EVALUATION_LABELS.get(key, str(key)), _value(evaluation[key])
        if key == "binarization" and not binary:
            label, value = "test images", "grey levels (not binarized)"
        if key == "active_dims" and evaluation[key] is None:
            value = "not measured (one image)"
        rows.append(f'<tr><th>{escape(label)}</th><td class="num">{escape(value)}</td></tr>')
    if binary:
        note = (
            "From evaluation.json (vaelab evaluate). The ELBO and the importance-weighted (IWAE) "
            "bound are log-likelihood bounds of binarized test images, comparable between runs; "
            "the IWAE bound is the tighter one."
        )
    else:
        note = (
            "From evaluation.json (vaelab evaluate). The ELBO and the importance-weighted (IWAE) "
            "bound are bounds on the log-density of the grey-level test images under this "
            f"{evaluation.get('likelihood', 'density')} likelihood: compare them only with runs of "
            "the same likelihood, never with a Bernoulli model's; the IWAE bound is the tighter one."
        )
    return f"<p>{escape(note)}</p>\n" + '<table class="evaluation">\n' + "\n".join(rows) + "\n</table>"


def _figure_paths(figures_dir: Path) -> list[Path]:
    from vaelab.plots import FIGURES

    if not figures_dir.is_dir():
        return []
    known = [figures_dir / f"{name}.png" for name in FIGURES]
    others = sorted(p for p in figures_dir.glob("*.png") if p not in known)
    return [p for p in known + others if _is_png(p)]


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    """A plain file (not a link, a pipe or a device) that starts like a PNG."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with path.open("rb") as f:
            return f.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
    except OSError:
        return False


def _figure_html(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    title = TITLES.get(path.stem, path.stem.replace("_", " "))
    caption = CAPTIONS.get(path.stem, "")
    return (
        f'<figure id="{escape(path.stem)}">\n'
        f'<img src="data:image/png;base64,{data}" alt="{escape(title)}">\n'
        f"<figcaption><strong>{escape(title)}.</strong> {escape(caption)}</figcaption>\n"
        "</figure>"
    )


def _value(value: Any, decimals: int = 4) -> str:
    """A config, metric or evaluation value as short text (floats to `decimals` places)."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and abs(value) < 10**-decimals:
            return f"{value:.3g}"
        text = f"{value:.{decimals}f}"
        return text.rstrip("0").rstrip(".") if decimals > 2 else text
    if isinstance(value, list | tuple):
        return ", ".join(_value(v, min(decimals, 3)) for v in value) if value else "none"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_value(v, decimals)}" for k, v in value.items()) or "none"
    return str(value)


def _now() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def _version() -> str:
    from vaelab import __version__

    return __version__
