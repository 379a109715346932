"""ONNX export of a run's encoder and decoder, with a short model card.

    DIR/encoder.onnx   x (N, D) in [0, 1]  ->  mean (N, latent), log_var (N, latent)
    DIR/decoder.onnx   z (N, latent)       ->  logits (N, D)   (the image: see the card, per likelihood)
    DIR/model-card.md  data, preset, architecture, metrics, and how to call both

The batch size N is dynamic. Files are written to a temporary folder next to DIR and moved into
DIR only when all three exist, so a failed export leaves DIR as it was.
"""

from __future__ import annotations

import contextlib
import html
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vaelab import products
from vaelab.errors import ConfigError, RunError, VaelabError
from vaelab.report import flatten
from vaelab.runs import check_writable

FORMATS = ("onnx",)
FILES = ("encoder.onnx", "decoder.onnx", "model-card.md")


class _Encoder(nn.Module):
    """x (N, D) -> (mean, log_var): the VAE's `encode` as a graph with two outputs."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode(x)


class _Decoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(z)


def export(run_dir: str | Path, out_dir: str | Path, format: str = "onnx") -> dict[str, Any]:  # noqa: A002
    """Export a trained run's encoder and decoder.

    Args:
        run_dir: a folder written by `vaelab train`.
        out_dir: the folder to write (created if needed). Files of an earlier export there are
            replaced; other files of the same names are refused.
        format: "onnx" (the only format so far).
    Returns:
        A dict with the written paths (`encoder`, `decoder`, `card`) and the shapes.
    Raises:
        ConfigError: an unknown format, the ONNX packages are missing, or `out_dir` cannot take
            the files (not writable, a file in the way, files of the same names that an earlier
            export did not write); nothing is written then.
        RunError: `run_dir` is not a trained run.

    Example:
        >>> export("runs/seed", "exported")  # exported/encoder.onnx, decoder.onnx, model-card.md
    """
    import vaelab

    if format not in FORMATS:
        raise ConfigError(f"option --format: {format!r} is not one of {', '.join(FORMATS)}")
    try:
        import onnx  # noqa: F401  (torch.onnx needs it; onnxscript for the exporter)
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"ONNX export needs the '{e.name}' package: install the export extra "
            "(bash scripts/setup.sh export, or pip install -e '.[export]')"
        ) from None
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    _check_out(out_dir)
    model = vaelab.load(run_dir)
    config = model.config
    if config.conditional:
        raise ConfigError(f"{run_dir}: a conditional VAE cannot be exported yet (its graphs need the label)")
    if config.deep:
        raise ConfigError(
            f"{run_dir}: a hierarchy, VampPrior or flow cannot be exported yet (its graphs are not one "
            "encoder and one decoder)"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        d, k = config.input_dim, config.latent_dim
        _to_onnx(_Encoder(model), torch.rand(2, d), "x", ["mean", "log_var"], tmp / "encoder.onnx")
        _to_onnx(_Decoder(model), torch.randn(2, k), "z", ["logits"], tmp / "decoder.onnx")
        (tmp / "model-card.md").write_text(model_card(model, run_dir), encoding="utf-8")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "encoder": str(out_dir / "encoder.onnx"),
        "decoder": str(out_dir / "decoder.onnx"),
        "card": str(out_dir / "model-card.md"),
        "input_dim": config.input_dim,
        "latent_dim": config.latent_dim,
    }


def _check_out(out_dir: Path) -> None:
    """Refuse an --out whose files export would replace unless an earlier export wrote them."""
    probe = out_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"option --out: {probe} exists and is not a folder")
    try:
        check_writable(out_dir, "--out")
    except RunError as e:
        raise ConfigError(str(e)) from None
    if not out_dir.is_dir():
        return
    present = [name for name in FILES if (out_dir / name).exists() or (out_dir / name).is_symlink()]
    for name in present:
        if not (out_dir / name).is_file() or (out_dir / name).is_symlink():
            raise ConfigError(f"option --out: {out_dir / name} is not a plain file; export writes one there")
    if present and not _is_our_card(out_dir / "model-card.md"):
        raise ConfigError(
            f"option --out: {out_dir} already holds {', '.join(present)}, not from vaelab export "
            "(no vaelab model card beside it); export into a new or empty folder"
        )


def _is_our_card(path: Path) -> bool:
    """Whether `path` is a model card written by `model_card` (an earlier export, replaceable)."""
    try:
        with path.open(encoding="utf-8") as f:
            first = f.readline()
    except (OSError, UnicodeDecodeError):
        return False
    return first.startswith("# ") and first.rstrip("\n").endswith(": a vaelab VAE")


def _to_onnx(module: nn.Module, example: torch.Tensor, input_name: str, output_names: list[str],
             path: Path) -> None:
    """torch.onnx.export (the dynamo exporter) with a dynamic first axis, weights inside the file."""
    batch = torch.export.Dim("batch", min=1)
    quiet = io.StringIO()
    onnx_log = logging.getLogger("torch.onnx")  # its progress lines and torchvision notices
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            warnings.simplefilter("ignore")
            with products.plain_products():  # oneDNN's op has no ONNX form
                torch.onnx.export(
                    module.eval(),
                    (example,),
                    str(path),
                    input_names=[input_name],
                    output_names=output_names,
                    dynamic_shapes={input_name: {0: batch}},
                    dynamo=True,
                    external_data=False,
                    verbose=False,
                )
    except Exception as e:  # the exporter's own errors are long; keep one line and the log
        detail = " ".join(str(e).split())[:300]
        raise VaelabError(f"ONNX export of {path.name} failed: {detail}") from e
    finally:
        onnx_log.setLevel(level)
    if not path.is_file():
        raise VaelabError(f"ONNX export of {path.name} wrote no file")
    import onnx

    first = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
    if not first.dim_param:  # a model whose code fixed the batch size while being traced
        raise VaelabError(
            f"ONNX export of {path.name} fixed the batch size at {first.dim_value} (the model's code "
            "made it a constant); this is a bug in vaelab, please report it"
        )


def model_card(model, run_dir: Path) -> str:
    """The Markdown model card: data, preset, architecture, final metrics and usage."""
    from vaelab.runs import read_metrics

    config = model.config
    run_config = model.run_config
    c, h, w = config.input_shape
    arch = "-".join(str(n) for n in (config.input_dim, *config.hidden, config.latent_dim))
    lines = [
        f"# {_md(run_dir.resolve().name)}: a vaelab VAE",
        "",
        "| | |",
        "|---|---|",
        f"| data | `{_md_code(run_config.data.source)}` (binarization: {run_config.data.binarize}) |",
        f"| preset | {_md(run_config.preset)} |",
        f"| architecture | {config.architecture.upper()} {arch}, {config.activation}; "
        f"{config.likelihood} decoder (outputs logits) |",
        f"| image | {c}x{h}x{w} (C, H, W), flattened to {config.input_dim} values in [0, 1] |",
        f"| latent | {config.latent_dim} dimensions, prior N(0, I) |",
        f"| training | {run_config.train.optimizer}, lr {run_config.train.lr}, "
        f"batch {run_config.train.batch_size}, seed {run_config.train.seed} |",
        "",
    ]
    metrics = read_metrics(run_dir)
    if metrics:
        last = metrics[-1]
        lines += ["## Final metrics (metrics.jsonl, last epoch)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {_md(k)} | {_fmt(v)} |" for k, v in last.items()]
        lines.append("")
    evaluation = run_dir / "evaluation.json"
    if evaluation.is_file():
        try:
            ev = json.loads(evaluation.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RunError(f"{evaluation}: not valid JSON") from None
        if not isinstance(ev, dict):
            raise RunError(f"{evaluation}: must hold a JSON object")
        lines += ["## Evaluation (evaluation.json)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {_md(k)} | {_fmt(v)} |" for k, v in flatten(ev)]
        lines.append("")
    lines += [
        _losses_note(run_config),
        "",
        "## Files",
        "",
        f"- `encoder.onnx`: input `x` float32 [N, {config.input_dim}] in [0, 1] -> outputs `mean` "
        f"and `log_var`, float32 [N, {config.latent_dim}] (the posterior q(z|x) = N(mean, exp(log_var))).",
        f"- `decoder.onnx`: input `z` float32 [N, {config.latent_dim}] -> output `logits` float32 "
        f"[N, {config.input_dim}]; {_likelihood_note(config)}",
        "",
        "N, the batch size, is free.",
        "",
        "## Use with onnxruntime",
        "",
        "```python",
        "import numpy as np, onnxruntime as ort",
        'encoder = ort.InferenceSession("encoder.onnx")',
        'decoder = ort.InferenceSession("decoder.onnx")',
        f"x = np.random.rand(8, {config.input_dim}).astype(np.float32)  # images flattened, in [0, 1]",
        *MEAN_IMAGE_NUMPY[config.likelihood == "continuous-bernoulli"],
        'mean, log_var = encoder.run(None, {"x": x})',
        'logits, = decoder.run(None, {"z": mean})',
        f"images = mean_image(logits).reshape(-1, {c}, {h}, {w})",
        f"z = np.random.randn(16, {config.latent_dim}).astype(np.float32)  # from the prior N(0, I)",
        'samples = mean_image(decoder.run(None, {"z": z})[0])',
        "```",
        "",
        "## Use with vaelab",
        "",
        "```python",
        "import vaelab, torch",
        f"model = vaelab.load({str(run_dir)!r})  # the run, as the export was given it",
        f"mean, log_var = model.encode(torch.rand(8, {config.input_dim}))",
        "images = model.mean_image(model.decode(mean))  # E[x|z] of the model's likelihood",
        "samples = model.sample(16, seed=0)",
        "```",
        "",
    ]
    return "\n".join(lines)


def _likelihood_note(config) -> str:
    """What the decoder's logits mean under the model's likelihood (the card's file list)."""
    from vaelab.models.vae import LOG_STD_RANGE

    if config.likelihood == "gaussian":
        return f"the pixels' Gaussian means are sigmoid(logits), with a fixed std of {config.gaussian_std:g}."
    if config.likelihood == "gaussian-learned":
        low, high = LOG_STD_RANGE
        return (
            "the pixels' Gaussian means are sigmoid(logits); each pixel's learned std, "
            f"exp(log_std) with log_std clamped to [{low:g}, {high:g}], is not part of the graph: it "
            "is the tensor `log_std` in the run's model.safetensors."
        )
    if config.likelihood == "continuous-bernoulli":
        return (
            "the continuous Bernoulli's parameter is sigmoid(logits); its mean E[x|z], the image, is "
            "not sigmoid(logits) but sigmoid(l) / tanh(l / 2) - 1 / l (1/2 + l/12 near l = 0)."
        )
    return "the pixels' Bernoulli probabilities are sigmoid(logits)."


# the onnxruntime example's E[x|z] from logits: [sigmoid, continuous Bernoulli's mean]
MEAN_IMAGE_NUMPY = (
    ["def mean_image(logits):  # E[x|z]: the pixels' probabilities (Bernoulli) or means (Gaussian)",
     "    return 1 / (1 + np.exp(-logits))"],
    ["def mean_image(logits):  # E[x|z] of the continuous Bernoulli (not sigmoid(logits))",
     "    near = np.abs(logits) < 1e-2",
     "    safe = np.where(near, 1.0, logits)",
     "    far = 1 / (1 + np.exp(-safe)) / np.tanh(safe / 2) - 1 / safe",
     "    return np.clip(np.where(near, 0.5 + logits / 12, far), 0, 1)"],
)


def _losses_note(run_config) -> str:
    """What the losses in the tables are, for this run's likelihood, data and KL weight."""
    if run_config.model.likelihood != "bernoulli":
        note = (f"Losses are nats per image: negative ELBOs of a density on [0, 1] per pixel "
                f"({run_config.model.likelihood}); compare them only with runs of the same likelihood.")
    elif run_config.data.binarize == "none":
        note = ("Losses are nats per image. On grey levels (binarization none) they are the seed's BCE "
                "loss, not a log-likelihood.")
    else:
        note = "Losses are nats per image: negative ELBOs of binary images, upper bounds on -log p(x)."
    if run_config.train.beta != 1.0 or run_config.train.warmup_epochs:
        note += " The training loss weighs the KL by beta (and its warm-up); the test loss by 1."
    return note


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list | dict):
        return _md(json.dumps(v))[:200]
    return _md(str(v))


def _md_code(s: str) -> str:
    """Text for a code span that cannot end it or break a Markdown table row (HTML is not read
    inside a code span, so it stays as it is)."""
    return str(s).replace("|", "\\|").replace("`", "'").replace("\n", " ")


def _md(s: str) -> str:
    """Text that cannot break a Markdown table row or code span, nor be read as HTML by a viewer
    that renders HTML in Markdown."""
    return html.escape(_md_code(s), quote=False)


__all__ = ["export", "model_card", "FORMATS"]
