"""Runs side by side: `vaelab compare RUN RUN ...` writes one self-contained HTML page with the
settings that differ, each run's final and evaluated numbers with their standard errors, the test
loss curves overlaid, and the same figures of each run next to each other. `comparison` gives the
same numbers as a JSON-ready dict, and `markdown_table` as a table (benchmarks print it).

Like the report, the page is one file: CSS inline, figures and curves as `data:` URIs, no scripts,
no request; every string from a run (its name, paths, settings) is HTML-escaped.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from vaelab import runs
from vaelab.captions import CAPTIONS, TITLES
from vaelab.config import RunConfig
from vaelab.errors import ConfigError
from vaelab.report import STYLE, figure_paths, flatten, read_evaluation, value_text

GENERATOR = "vaelab compare"  # the page's <meta name="generator">: a page vaelab may write over
EXTRA_STYLE = """
.side{display:grid;gap:1em;grid-auto-flow:column;grid-auto-columns:minmax(300px,1fr);overflow-x:auto}
.side figure figcaption{font-weight:600}.warning{background:#fff4e5;border:1px solid #f0c36d;
padding:.4em .8em;border-radius:6px}
"""


@dataclass
class RunView:
    """What the page shows of one run, read from its folder."""

    run_dir: Path
    label: str  # the folder's name, or the path as given when names repeat
    config: RunConfig
    metrics: list[dict[str, Any]]
    evaluation: dict[str, Any] | str | None  # evaluation.json, an error line, or None
    figures: list[Path]


def read_runs(run_dirs: list[str | Path]) -> list[RunView]:
    """The runs to compare, each checked like any verb checks a run (one-line errors)."""
    paths = [Path(d) for d in run_dirs]
    if not paths:
        raise ConfigError("compare: give the runs to compare")
    seen: dict[Path, Path] = {}
    for path in paths:
        resolved = path.resolve()
        if resolved in seen:
            raise ConfigError(f"compare: {path}: the same run as {seen[resolved]}; give each run once")
        seen[resolved] = path
    names = [p.resolve().name or str(p) for p in paths]
    views = []
    for path, name in zip(paths, names, strict=True):
        config = runs.read_config(path)
        label = name if names.count(name) == 1 else str(path)
        views.append(RunView(path, label, config, runs.read_metrics(path), read_evaluation(path),
                             figure_paths(path / "figures")))
    return views


def differing_settings(views: list[RunView]) -> dict[str, list[Any]]:
    """`section.key` -> each run's value, for the settings that are not the same in every run."""
    tables = [dict(flatten(v.config.to_dict())) for v in views]
    keys = [k for k in tables[0] if k != "version"]
    keys += [k for t in tables[1:] for k in t if k not in keys and k != "version"]
    return {k: [t.get(k) for t in tables] for k in keys if len({json.dumps(t.get(k)) for t in tables}) > 1}


def _final(metrics: list[dict[str, Any]]) -> dict[str, Any] | None:
    keys = ("epoch", "test_loss", "test_recon", "test_kl")
    tested = [row for row in metrics if all(isinstance(row.get(k), int | float) for k in keys)]
    if not tested:
        return None
    return {k: tested[-1][k] for k in keys}


EVALUATION_KEYS = ("nll", "nll_stderr", "elbo", "elbo_stderr", "active_dims", "latent_dim", "k", "n_images")


def summary(view: RunView) -> dict[str, Any]:
    """One run's numbers: the final test pass, the evaluation (when evaluated) and the time."""
    evaluation = view.evaluation
    if isinstance(evaluation, dict):
        evaluated = {k: evaluation.get(k) for k in EVALUATION_KEYS}
        evaluated["binarized"] = evaluation.get("binarization") is not None
    else:
        evaluated = evaluation  # None, or the line saying why it could not be read
    return {
        "run_dir": str(view.run_dir),
        "label": view.label,
        "preset": view.config.preset,
        "epochs": len(view.metrics),
        "seconds": sum(row["seconds"] for row in view.metrics),
        "final": _final(view.metrics),
        "evaluation": evaluated,
    }


def comparison(run_dirs: list[str | Path]) -> dict[str, Any]:
    """The numbers of `vaelab compare`, JSON-ready: `runs` (each run's `summary`) and
    `settings_that_differ` (`section.key` -> each run's value), and `notes` on what is not
    comparable between them."""
    views = read_runs(run_dirs)
    return _comparison(views)


def _comparison(views: list[RunView]) -> dict[str, Any]:
    return {
        "runs": [summary(v) for v in views],
        "settings_that_differ": differing_settings(views),
        "notes": _notes(views),
    }


def _notes(views: list[RunView]) -> list[str]:
    """What makes the runs' numbers incomparable, if anything."""
    notes = []
    kinds = {_loss_kind(v.config) for v in views}
    if len(kinds) > 1:
        notes.append(
            "The runs' losses measure different things (" + ", ".join(sorted(kinds)) + "): compare "
            "their test losses with care; the evaluated NLLs of Bernoulli models are all of the same "
            "binarized test images and compare directly."
        )
    sources = {v.config.data.source for v in views}
    if len(sources) > 1:
        notes.append("The runs were trained on different data: their numbers are of different test sets.")
    return notes


def _loss_kind(config: RunConfig) -> str:
    if config.model.likelihood != "bernoulli":
        return f"a {config.model.likelihood} density of grey levels"
    if config.data.binarize == "none":
        return "a BCE loss of grey levels"
    return "a negative ELBO of binary images"


def write_comparison(run_dirs: list[str | Path], out: str | Path) -> tuple[Path, dict[str, Any]]:
    """Write the comparison page to `out`; returns its path and `comparison`'s numbers.

    `out` may be a new file or a page vaelab compare wrote before; anything else is refused (a
    user's own file is never replaced).

    Example:
        >>> write_comparison(["runs/z2", "runs/z10"], "compare.html")
    """
    out = Path(out)
    check_out(out)
    views = read_runs(run_dirs)
    data = _comparison(views)
    runs.atomic_write_text(out, render(views, data))
    return out, data


def check_out(out: Path) -> None:
    """Refuse an --out that is a folder, or a file that is not a page of vaelab compare."""
    if out.is_dir():
        raise ConfigError(f"option --out: {out} is a folder; give the page's file name")
    if out.exists():
        try:
            with out.open("rb") as f:
                head = f.read(4096).decode("utf-8", "replace")
        except OSError as e:
            raise ConfigError(f"option --out: {out} cannot be read ({e.strerror or e})") from None
        if f'<meta name="generator" content="{GENERATOR}">' not in head:
            raise ConfigError(
                f"option --out: {out} exists and is not a page vaelab compare wrote; give another --out"
            )


# --- the page ----------------------------------------------------------------------------------


def render(views: list[RunView], data: dict[str, Any]) -> str:
    """The comparison page's HTML text."""
    from vaelab.report import _now, _version

    title = "vaelab compare: " + ", ".join(v.label for v in views)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta name="generator" content="{GENERATOR}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title>",
        f"<style>{STYLE}{EXTRA_STYLE}</style>",
        "</head>",
        "<body>",
        f"<h1>Comparing {len(views)} runs</h1>",
        *(f'<p class="warning">{escape(note)}</p>' for note in data["notes"]),
        '<h2 id="numbers">Numbers</h2>',
        _numbers_table(data["runs"]),
        '<h2 id="settings">Settings that differ</h2>',
        _settings_table(views, data["settings_that_differ"]),
        '<h2 id="curves">Test loss per epoch</h2>',
        _curves_html(views),
        '<h2 id="figures">Figures side by side</h2>',
        *_figures_html(views),
        f'<p class="muted">Written {escape(_now())} by vaelab {escape(_version())} from: '
        + ", ".join(f"<code>{escape(str(v.run_dir))}</code>" for v in views) + ".</p>",
        "</body>",
        "</html>",
        "",
    ]
    return "\n".join(parts)


def _numbers_table(rows: list[dict[str, Any]]) -> str:
    head = ["run", "preset", "epochs", "training time", "final test loss", "= recon + KL",
            "test NLL (IWAE bound)", "ELBO", "active dims"]
    body = []
    for r in rows:
        final, ev = r["final"], r["evaluation"]
        cells = [r["label"], r["preset"], str(r["epochs"]), f"{r['seconds']:.1f} s"]
        if final:
            cells += [f"{final['test_loss']:.2f}", f"{final['test_recon']:.2f} + {final['test_kl']:.2f}"]
        else:
            cells += ["", ""]
        if isinstance(ev, dict):
            cells += [_with_error(ev.get("nll"), ev.get("nll_stderr"), ev.get("k")),
                      _with_error(ev.get("elbo"), ev.get("elbo_stderr")),
                      f"{ev.get('active_dims')} / {ev.get('latent_dim')}"]
        else:
            cells += [ev or "not evaluated (vaelab evaluate RUN)", "", ""]
        body.append("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in cells) + "</tr>")
    return (
        '<p class="muted">Nats per image. The final test loss is the last test pass of training (one '
        "sampled z per image); the NLL and ELBO are from vaelab evaluate, with their standard errors "
        "over test images.</p>\n"
        '<div class="scroll"><table class="numbers">\n<tr>'
        + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>\n" + "\n".join(body) + "\n</table></div>"
    )


def _with_error(value, stderr, k=None) -> str:
    if not isinstance(value, int | float):
        return ""
    text = f"{value:.2f}" + (f" ± {stderr:.2f}" if isinstance(stderr, int | float) else "")
    return text + (f" (K = {k})" if k else "")


def _settings_table(views: list[RunView], differ: dict[str, list[Any]]) -> str:
    if not differ:
        return "<p>None: every setting is the same in these runs (they differ by chance alone).</p>"
    head = "<tr><th>setting</th>" + "".join(f"<th>{escape(v.label)}</th>" for v in views) + "</tr>"
    body = [
        f"<tr><th>{escape(key)}</th>" + "".join(f"<td>{escape(value_text(x))}</td>" for x in values) + "</tr>"
        for key, values in differ.items()
    ]
    rows = "\n".join(body)
    return f'<div class="scroll"><table class="settings">\n{head}\n{rows}\n</table></div>'


def _curves_html(views: list[RunView]) -> str:
    if not any(v.metrics for v in views):
        return "<p>No epochs recorded yet.</p>"
    from vaelab.drawing import png_bytes

    data = base64.b64encode(png_bytes(curves_figure(views))).decode("ascii")
    return (
        '<figure id="curves-overlaid">\n'
        f'<img src="data:image/png;base64,{data}" alt="Test loss per epoch of each run">\n'
        "<figcaption>Each run's test loss (solid) and training loss (dashed) per epoch, in nats per "
        "image.</figcaption>\n</figure>"
    )


def curves_figure(views: list[RunView]):
    """Every run's test loss (solid) and training loss (dashed) per epoch, overlaid."""
    from vaelab.drawing import new_axes, palette

    fig, ax = new_axes((11, 4.6))
    for view, colour in zip(views, palette(len(views)), strict=True):
        tested = [r for r in view.metrics if isinstance(r.get("test_loss"), int | float)]
        if tested:
            ax.plot([r["epoch"] for r in tested], [r["test_loss"] for r in tested], "-", color=colour,
                    label=f"{view.label} (test)")
        ax.plot([r["epoch"] for r in view.metrics], [r["train_loss"] for r in view.metrics], "--",
                color=colour, alpha=0.6, label=f"{view.label} (train)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (nats/image)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    return fig


def _figures_html(views: list[RunView]) -> list[str]:
    from vaelab.plots import FIGURES

    names = [n for n in FIGURES if any(p.stem == n for v in views for p in v.figures)]
    names += sorted({p.stem for v in views for p in v.figures} - set(names))
    if not names:
        return ["<p>No figures yet: run <code>vaelab plot RUN</code> on each run.</p>"]
    parts = []
    for name in names:
        title = TITLES.get(name, name.replace("_", " "))
        parts += [f'<h3 id="figure-{escape(name)}">{escape(title)}</h3>',
                  f'<p class="muted">{escape(CAPTIONS.get(name, ""))}</p>', '<div class="side">']
        for view in views:
            path = next((p for p in view.figures if p.stem == name), None)
            if path is None:
                parts.append(f"<figure><figcaption>{escape(view.label)}: not drawn</figcaption></figure>")
                continue
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            alt = escape(f"{title} of {view.label}")
            parts.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">'
                f"<figcaption>{escape(view.label)}</figcaption></figure>"
            )
        parts.append("</div>")
    return parts


# --- a table in Markdown ---------------------------------------------------------------------


def markdown_table(data: dict[str, Any]) -> str:
    """`comparison`'s numbers as a Markdown table: the settings that differ, then the numbers."""
    differ = data["settings_that_differ"]
    keys = [k for k in differ if k != "data.source"]
    head = ["run", *keys, "epochs", "final test loss", "test NLL", "ELBO", "active dims", "train min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(data["runs"]):
        ev = r["evaluation"] if isinstance(r["evaluation"], dict) else {}
        final = r["final"] or {}
        cells = [r["label"], *(value_text(differ[k][i]) for k in keys), str(r["epochs"]),
                 f"{final['test_loss']:.2f}" if final else "",
                 _with_error(ev.get("nll"), ev.get("nll_stderr")),
                 _with_error(ev.get("elbo"), ev.get("elbo_stderr")),
                 f"{ev['active_dims']} / {ev['latent_dim']}" if ev else "", f"{r['seconds'] / 60:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["comparison", "markdown_table", "write_comparison"]
