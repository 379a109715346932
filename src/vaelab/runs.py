"""The run directory: create, lock, write atomically, load.

    runs/<name>/
      config.json          RunConfig.to_dict(): everything needed to rerun
      metrics.jsonl        one JSON object per epoch
      model.safetensors    weights, loadable without pickle
      checkpoint/state.pt  optimizer, RNG states, epoch and step (torch.load weights_only=True)
      figures/*.png, report.html, explorer.html, evaluation.json

Every file is written to a temporary file in the same folder, flushed, fsynced and renamed, so a
reader (or a crash) never sees half a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from vaelab.config import RunConfig
from vaelab.errors import ConfigError, DataError, RunError
from vaelab.files import atomic_torch_save, atomic_write_bytes, atomic_write_text  # noqa: F401
from vaelab.files import os_reason as _os_reason
from vaelab.locks import EMPTY_LOCK_SECONDS, LOCK, _pid_alive, locked  # noqa: F401

CONFIG = "config.json"
METRICS = "metrics.jsonl"
WEIGHTS = "model.safetensors"
CHECKPOINT = "checkpoint/state.pt"


def check_writable(run_dir: str | Path, option: str = "--out") -> None:
    """Refuse, before any work, a run directory that cannot be created or written.

    The nearest folder that exists decides: it must be a folder (not a file) and writable.
    Nothing is created. A full disk is only found when writing (see `atomic_write_bytes`).
    """
    run_dir = Path(run_dir)
    try:
        if run_dir.exists() and not run_dir.is_dir():
            raise RunError(f"option {option}: {run_dir} is a file, not a folder")
        probe = run_dir
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir():
            raise RunError(f"option {option}: cannot create {run_dir}: {probe} is a file, not a folder")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise RunError(f"option {option}: cannot write {run_dir}: no permission to write in {probe}")
    except OSError as e:
        raise RunError(f"option {option}: cannot write {run_dir} ({_os_reason(e)})") from None


def check_new_run(run_dir: str | Path, option: str | None = "--out") -> None:
    """Refuse to start a run in a folder that holds anything: a run (continue it with --resume),
    or files of the user's, which the run's own files (report.html, metrics.jsonl, ...) would
    replace. Hidden files (a stale lock, .gitkeep) do not count: a run writes none of those names.
    `option` names the command-line option in messages (None: from the Python API)."""
    run_dir = Path(run_dir)
    if (run_dir / CONFIG).exists():
        raise RunError(f"{run_dir}: already holds a run; pass --resume to continue it or another --out")
    where = f"option {option}: " if option else ""
    try:
        entries = run_dir.iterdir() if run_dir.is_dir() else []
        names = sorted(p.name for p in entries if not p.name.startswith("."))
    except OSError as e:
        raise RunError(f"{where}cannot read {run_dir} ({_os_reason(e)})") from None
    if names:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise RunError(
            f"{where}{run_dir} already holds files that are not a run ({shown}); "
            "a new run goes into a new or empty folder"
        )


def save_weights(model: torch.nn.Module, path: str | Path) -> None:
    """The model's parameters and buffers as safetensors, written atomically."""
    # copies: a model's weights may be views into one buffer, which safetensors refuses to save
    contiguous = torch.contiguous_format
    state = {k: v.detach().to("cpu").clone(memory_format=contiguous) for k, v in model.state_dict().items()}
    # one metadata key: safetensors writes a dict of several in an order that changes from process
    # to process, and the same weights must give the same bytes (a checksum, git, DVC)
    atomic_write_bytes(path, save(state, metadata={"format": "pt"}))


# --- metrics ---------------------------------------------------------------------------------


METRIC_KEYS = ("epoch", "train_loss", "train_recon", "train_kl", "seconds")  # in every row
PASS_KEYS = (("val_loss", "val_recon", "val_kl"), ("test_loss", "test_recon", "test_kl"))  # all or none


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of `metrics.jsonl` (empty if the run has none yet), each a dict with an integer
    `epoch`; anything else is refused with one line naming the file and line."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RunError(f"{path}: not text (UTF-8)") from None
    except OSError as e:
        raise RunError(f"{path}: cannot be read ({_os_reason(e)})") from None
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise RunError(f"{path}: line {i} is not valid JSON") from None
            epoch = row.get("epoch") if isinstance(row, dict) else None
            if isinstance(epoch, bool) or not isinstance(epoch, int):
                raise RunError(f"{path}: line {i} is not a row of metrics (an object with an integer epoch)")
            missing = next((k for k in METRIC_KEYS if k not in row), None)
            for keys in PASS_KEYS:
                if missing is None and any(k in row for k in keys):
                    missing = next((k for k in keys if k not in row), None)
            if missing:
                raise RunError(f"{path}: line {i} has no {missing!r}")
            bad = next((k for k, v in row.items() if not _is_number(v)), None)
            if bad:
                value = repr(row[bad]) if len(repr(row[bad])) <= 40 else f"{repr(row[bad])[:40]}..."
                huge = isinstance(row[bad], int) and not isinstance(row[bad], bool)
                what = "a number too large for a float" if huge else "not a number"
                raise RunError(f"{path}: line {i}: {bad!r} is {value}, {what}")
            rows.append(row)
    return rows


def _is_number(v: Any) -> bool:
    """A JSON number that fits a float (JSON's integers have no limit: 10**400 does not)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return False
    try:
        float(v)
    except OverflowError:
        return False
    return True


def write_metrics(run_dir: str | Path, rows: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    atomic_write_text(Path(run_dir) / METRICS, text)


def check_outputs(run_dir: str | Path) -> None:
    """Refuse, before any work, a run where something else stands in place of the files training
    rewrites (a folder named model.safetensors, a file named checkpoint): found only after an
    epoch, it would cost that epoch."""
    run_dir = Path(run_dir)
    check_own_folder(run_dir / Path(CHECKPOINT).parent, "keeps", "checkpoint", "in")
    for name in (CONFIG, METRICS, WEIGHTS, CHECKPOINT):
        refuse_if_not_a_file(run_dir / name, name)


def check_own_folder(folder: Path, verb: str, what: str, preposition: str) -> None:
    """Refuse a link (what vaelab writes would replace files wherever it points) or a file where
    the run's own folder `folder` goes: "vaelab {verb} a run's {what} only {preposition} ..."."""
    if folder.is_symlink():
        raise RunError(
            f"{folder}: is a link; vaelab {verb} a run's {what} only {preposition} the run's own folder "
            "(remove the link, or copy the run)"
        )
    if folder.exists() and not folder.is_dir():
        raise RunError(f"{folder}: is a file, where vaelab {verb} the run's {what}")


def refuse_if_not_a_file(path: Path, what: str) -> None:
    """Refuse something other than a file (a folder) where vaelab writes the run's `what`."""
    if path.exists() and not path.is_file():
        raise RunError(f"{path}: is not a file (a folder?), where vaelab writes the run's {what}")


# --- loading ---------------------------------------------------------------------------------


def read_config(run_dir: str | Path) -> RunConfig:
    """The `RunConfig` of a run directory, with one-line errors for anything that is off."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"{run_dir}: is a file, not a run directory")
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run directory")
    path = run_dir / CONFIG
    if not path.is_file():
        raise RunError(f"{run_dir}: not a run directory (no {CONFIG})")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RunError(f"{path}: not valid JSON") from None
    except OSError as e:
        raise RunError(f"{path}: cannot be read ({_os_reason(e)})") from None
    missing = [k for k in ("data", "model", "train") if not isinstance(d, dict) or k not in d]
    if missing:
        raise RunError(f"{path}: no {missing[0]!r} section (not a config.json written by vaelab train)")
    try:
        return RunConfig.from_dict(d, where=str(path)).validate()
    except ConfigError as e:
        message = str(e)
        raise RunError(message if str(path) in message else f"{path}: {message}") from None


CHECKPOINT_KEYS = ("model", "optimizer", "rng", "epoch", "step")


def read_checkpoint(run_dir: str | Path) -> dict[str, Any]:
    """The resume state in `run_dir/checkpoint/state.pt`, read without unpickling any code.

    `torch.load(weights_only=True)` builds tensors and plain containers only; a file that asks
    for anything else (a crafted pickle) is refused before any of it runs.

    Raises:
        RunError: no checkpoint, a corrupt or foreign file, or one that is not vaelab's.
    """
    run_dir = Path(run_dir)
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise RunError(f"{run_dir}: nothing to resume (no {CHECKPOINT})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated or crafted: one line, never a traceback
        raise RunError(f"{path}: not a readable checkpoint ({_torch_load_reason(e)})") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise RunError(f"{path}: not a vaelab checkpoint (no {missing[0]!r})")
    for name, low in (("epoch", 1), ("step", 0)):  # the epoch and step to start at
        value = state[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise RunError(f"{path}: damaged: its {name} is {value!r}, not a whole number of at least {low}")
    return state


def _torch_load_reason(e: Exception) -> str:
    """The useful part of torch.load's long, multi-line and ANSI-coloured messages."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", text, re.S)
    if found:
        return f"refused by the safe loader: {' '.join(found.group(1).split())}"
    return _one_line(Exception(text.strip().splitlines()[0] if text.strip() else type(e).__name__))


def load(run_dir: str | Path, device: str | torch.device = "cpu"):
    """Load a trained model from a run directory, ready for inference.

    Args:
        run_dir: a folder written by `vaelab train`.
        device: where to put the model: cpu, cuda, cuda:N, mps, or auto (a GPU if there is one).
    Returns:
        A `vaelab.VAE` in eval mode with `encode(x) -> (mean, log_var)`, `decode(z) -> logits`
        and `sample(n, seed=None) -> images in [0, 1]`; its `config` is the run's ModelConfig
        and `run_config` the whole RunConfig.

    Example:
        >>> model = vaelab.load("runs/seed")
        >>> digits = model.sample(16, seed=0).reshape(16, 28, 28)
    """
    from vaelab.devices import pick_device
    from vaelab.models import build_model

    device = pick_device(device, where="device")
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    weights = run_dir / WEIGHTS
    if weights.exists() and not weights.is_file():
        raise RunError(f"{weights}: is not a file")
    if not weights.is_file():
        raise RunError(f"{run_dir}: no {WEIGHTS} yet (has training written its first epoch?)")
    try:
        state = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise RunError(f"{weights}: not a readable safetensors file ({_one_line(e)})") from None
    for name, tensor in state.items():  # a model that would draw garbage is refused, not used
        if not tensor.is_floating_point():
            kind = str(tensor.dtype).removeprefix("torch.")
            raise RunError(f"{weights}: {name} holds {kind} values, not floating-point weights")
        if not bool(torch.isfinite(tensor).all()):
            raise RunError(f"{weights}: {name} holds NaN or infinite values")
    with torch.device("meta"):  # the shapes the architecture asks for, without allocating them
        wanted = {k: tuple(v.shape) for k, v in build_model(config.model).state_dict().items()}
    if wanted != {k: tuple(v.shape) for k, v in state.items()}:  # (before a config.json that asks
        raise RunError(                                           # for huge layers allocates them)
            f"{weights}: weights do not fit the architecture in {CONFIG} "
            f"(hidden {list(config.model.hidden)}, latent {config.model.latent_dim})"
        )
    model = build_model(config.model)
    model.load_state_dict(state, strict=True)
    for name, tensor in model.state_dict().items():  # float64 values beyond float32's range
        if not bool(torch.isfinite(tensor).all()):
            raise RunError(f"{weights}: {name} holds values beyond the range of float32, the model's type")
    model.run_config = config
    model.run_dir = run_dir
    return model.to(device).eval()


def load_run_data(model, run_dir: str | Path | None = None):
    """The data a loaded run was trained on, as its config.json says, refused with one line when
    its images no longer fit the model (the data file was replaced, or config.json edited).
    run_dir: the run's folder, for the message (default: the one `load` noted on the model)."""
    from vaelab.data import load as load_data

    d = model.run_config.data
    dataset = load_data(d.source, image_size=d.image_size, channels=d.channels)
    check_run_data(model, dataset, run_dir)
    return dataset


def check_run_data(model, dataset, run_dir: str | Path | None = None) -> None:
    """Refuse, in one line, a data set whose images do not fit a loaded run's model."""
    image_shape = dataset.chw_shape
    if image_shape != tuple(model.config.input_shape):
        config = Path(run_dir or getattr(model, "run_dir", ".")) / CONFIG
        got, wanted = ("x".join(map(str, shape)) for shape in (image_shape, model.config.input_shape))
        source = model.run_config.data.source
        raise DataError(
            f"{source}: its images are {got} (channels x height x width) but the model takes "
            f"{wanted}; did the data or {config} change?"
        )


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:200]
