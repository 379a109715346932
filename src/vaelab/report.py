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

from vaelab.captions import CAPTIONS, DEEP_CAPTIONS, DEEP_TITLES, EVALUATION_LABELS, TITLES

STYLE = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;
max-width:1200px;padding:1em 1.5em;color:#1d1d1f;background:#fff}
h1{font-size:1.5em;margin:.2em 0}h2{margin-top:1.6em;border-bottom:1px solid #ddd;
padding-bottom:.2em}.muted{color:#666}code{font:13px ui-monospace,Menlo,Consolas,monospace;
background:#f3f3f3;padding:0 .25em;border-radius:3px}
.headline{display:flex;flex-wrap:wrap;gap:.6em;margin:.6em 0}.card{border:1px solid #ddd;
border-radius:6px;padding:.35em .8em;min-width:9em}.card .label{color:#555;font-size:13px}
.card .value{font-size:1.35em;font-weight:600;font-variant-numeric:tabular-nums}
.card .detail{color:#555;font-size:13px}
.figures{display:grid;grid-template-columns:repeat(auto-fill,minmax(430px,1fr));gap:1.2em 1.6em;
align-items:start}
figure{margin:0;padding:0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#333;margin-top:.3em;font-size:14px}
details{margin:.8em 0}summary{cursor:pointer;font-weight:600;font-size:1.1em}
table{border-collapse:collapse;margin:.5em 0;font-size:14px}th,td{border:1px solid #ddd;
padding:.25em .6em;text-align:left;vertical-align:top}td.num{text-align:right;
font-variant-numeric:tabular-nums}th{background:#f6f6f6}.scroll{overflow-x:auto}
@media (max-width:500px){.figures{grid-template-columns:1fr}}
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
    figures = figure_paths(figures_dir)
    if any(figures_dir / f"{name}.png" not in figures for name in plots.FIGURES):
        plots.write_figures(run_dir)
        figures = figure_paths(figures_dir)
    metrics = runs.read_metrics(run_dir)
    html = render(run_dir, config, metrics, read_evaluation(run_dir), figures)
    path = run_dir / "report.html"
    runs.atomic_write_text(path, html)
    return path


def render(run_dir: Path, config, metrics: list[dict], evaluation: dict | str | None,
           figures: list[Path]) -> str:
    """The report's HTML text (see `write_report`): a headline of the run's numbers, the figures
    with their captions, the training curves, then the evaluation, configuration and per-epoch
    metrics folded away; `evaluation` is a dict, an error line or None."""
    name = run_dir.resolve().name or str(run_dir)
    density = config.model.likelihood != "bernoulli"
    grey = config.data.binarize == "none" and not density
    loss_name = "BCE loss" if grey else "negative ELBO"
    curves = [p for p in figures if p.stem == "curves"]
    pictures = [p for p in figures if p.stem != "curves"]
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
        _headline(run_dir, config, metrics, evaluation, loss_name),
        _units_note(grey, density and config.model.likelihood, config.train),
        '<h2 id="figures-heading">Figures</h2>',
    ]
    if pictures:
        deep = config.model.deep
        parts += ['<div class="figures">', *(_figure_html(p, deep) for p in pictures), "</div>"]
    else:
        parts.append(f"<p>No figures yet: run <code>{escape(f'vaelab plot {quoted(run_dir)}')}</code>.</p>")
    if curves:
        parts += ['<h2 id="curves-heading">Training curves</h2>', *(_figure_html(p) for p in curves)]
    parts += [
        _folded("evaluation-details", "Evaluation: every number", _evaluation_section(evaluation, run_dir),
                open_=isinstance(evaluation, str)),
        _folded("configuration", f"Configuration ({len(flatten(config.to_dict()))} settings)",
                _config_table(config.to_dict())),
        _folded("metrics", f"Metrics per epoch ({len(metrics)} epochs)", _metrics_table(metrics, loss_name)),
        f'<p class="muted">Run directory <code>{escape(str(run_dir))}</code>; written {escape(_now())} '
        f"by vaelab {escape(_version())}.</p>",
        "</body>",
        "</html>",
        "",
    ]
    return "\n".join(parts)


def _headline(run_dir: Path, config, metrics: list[dict], evaluation, loss_name: str) -> str:
    """The run at a glance: what it is, its final test loss, its evaluation, its time."""
    tested = [row for row in metrics if _numbers(row, ("epoch", "test_loss", "test_recon", "test_kl"))]
    epochs, planned = len(metrics), config.train.epochs
    data = Path(config.data.source).name or config.data.source
    latent = config.model.latent_dim
    what = (
        f"Preset {config.preset}, {config.model.architecture} with {latent} latent "
        f"dimension{'s' * (latent != 1)}, on {data}; {epochs} of {planned} epoch{'s' * (planned != 1)} "
        "trained."
    )
    cards = []
    if tested:
        last = tested[-1]
        cards.append(_card(
            f"test {loss_name} (epoch {last['epoch']})", f"{last['test_loss']:.2f}",
            f"reconstruction {last['test_recon']:.2f} + KL {last['test_kl']:.2f} nats/image",
        ))
    if isinstance(evaluation, dict) and isinstance(evaluation.get("nll"), int | float):
        stderr = evaluation.get("nll_stderr")
        error = f" ± {stderr:.2f}" if isinstance(stderr, int | float) else ""
        binary = evaluation.get("binarization") is not None
        scored = "binarized test images" if binary else "grey levels (a density)"
        bound = "test NLL" if binary else "negative log-density bound"
        cards.append(_card(
            f"{bound}, K = {evaluation.get('k', '?')}", f"{evaluation['nll']:.2f}{error}",
            f"nats/image on {evaluation.get('n_images', '?')} {scored}",
        ))
        if isinstance(evaluation.get("elbo"), int | float):
            cards.append(_card("ELBO", f"{evaluation['elbo']:.2f}", "nats/image (vaelab evaluate)"))
    elif evaluation is None:
        command = f"vaelab evaluate {quoted(run_dir)}"
        cards.append(_card("evaluation", "not yet", f"run {command} for log p(x)"))
    if metrics:
        seconds = sum(row["seconds"] for row in metrics)
        cards.append(_card("training time", _duration(seconds), f"{seconds / epochs:.2f} s per epoch"))
    return f'<p class="summary">{escape(what)}</p>\n<div class="headline">' + "".join(cards) + "</div>"


def _numbers(row: dict[str, Any], keys: tuple[str, ...]) -> bool:
    """Whether every key holds a number (a hand-edited metrics line may lack one)."""
    return all(isinstance(row.get(k), int | float) and not isinstance(row.get(k), bool) for k in keys)


def _card(label: str, value: str, detail: str) -> str:
    return (
        f'<div class="card"><div class="label">{escape(label)}</div>'
        f'<div class="value">{escape(value)}</div><div class="detail">{escape(detail)}</div></div>'
    )


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {rest} s" if minutes else f"{seconds:.1f} s"


def _folded(anchor: str, title: str, body: str, open_: bool = False) -> str:
    """A section closed by default (`<details>`), opened by its title."""
    opened = " open" if open_ else ""
    return f'<details id="{anchor}"{opened}><summary>{escape(title)}</summary>\n{body}\n</details>'


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
        rows.append(f"<tr><th>{escape(key)}</th><td>{escape(value_text(value))}</td></tr>")
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
        cells = "".join(f'<td class="num">{escape(value_text(row.get(k, ""), 2))}</td>' for k, _ in columns)
        body.append(f"<tr>{cells}</tr>")
    return (
        '<p class="muted">Losses in nats per image; test columns are blank in epochs without a '
        "test pass.</p>\n"
        f'<div class="scroll"><table class="metrics">\n<tr>{head}</tr>\n' + "\n".join(body)
        + "\n</table></div>"
    )


def read_evaluation(run_dir: Path) -> dict | str | None:
    path = run_dir / "evaluation.json"
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"{path} is not readable JSON; write it again with: vaelab evaluate {quoted(run_dir)}"
    if not isinstance(d, dict):
        return f"{path} does not hold a JSON object; write it again with: vaelab evaluate {quoted(run_dir)}"
    return d


def quoted(run_dir: Path) -> str:
    """The run's path as a shell would need it in a command the reader copies."""
    return shlex.quote(str(run_dir))


def _evaluation_section(evaluation: dict | str | None, run_dir: Path) -> str:
    if evaluation is None:
        return (
            "<p>Not evaluated yet. For the ELBO and an importance-sampled log-likelihood with "
            f"standard errors, run <code>{escape(f'vaelab evaluate {quoted(run_dir)}')}</code>, then "
            f"<code>{escape(f'vaelab report {quoted(run_dir)}')}</code> again.</p>"
        )
    if isinstance(evaluation, str):
        return f"<p>{escape(evaluation)}</p>"
    keys = [k for k in EVALUATION_LABELS if k in evaluation]
    keys += [k for k in evaluation if k not in EVALUATION_LABELS]
    binary = evaluation.get("binarization") is not None
    rows = []
    for key in keys:
        label, value = EVALUATION_LABELS.get(key, str(key)), value_text(evaluation[key])
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


def figure_paths(figures_dir: Path) -> list[Path]:
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


def _figure_html(path: Path, deep: bool = False) -> str:
    """A figure with its title and caption (a hierarchy's, VampPrior's or flow's where it differs)."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    titles, captions = TITLES, CAPTIONS
    if deep:
        titles, captions = {**TITLES, **DEEP_TITLES}, {**CAPTIONS, **DEEP_CAPTIONS}
    title = titles.get(path.stem, path.stem.replace("_", " "))
    caption = captions.get(path.stem, "")
    return (
        f'<figure id="{escape(path.stem)}">\n'
        f'<img src="data:image/png;base64,{data}" alt="{escape(title)}">\n'
        f"<figcaption><strong>{escape(title)}.</strong> {escape(caption)}</figcaption>\n"
        "</figure>"
    )


def value_text(value: Any, decimals: int = 4) -> str:
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
        return ", ".join(value_text(v, min(decimals, 3)) for v in value) if value else "none"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {value_text(v, decimals)}" for k, v in value.items()) or "none"
    return str(value)


def _now() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def _version() -> str:
    from vaelab.version import __version__

    return __version__
