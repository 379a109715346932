"""The resume state of a run, RUN/checkpoint/state.pt: written after epochs and at interruptions,
checked and restored by `vaelab train --resume`. Reading the file safely is `runs.read_checkpoint`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vaelab import runs
from vaelab.errors import RunError
from vaelab.version import __version__

EMPTY_PARTIAL = {"sum_loss": 0.0, "sum_recon": 0.0, "sum_kl": 0.0, "seconds": 0.0}


def save_checkpoint(run_dir, model, optimizer, g, epoch_rng, epoch, step, partial, digest) -> None:
    """Everything resume needs: epoch and step to start at, optimizer, RNG states, and the digest
    of the data the run trains on (`data.tensors.data_digest`)."""
    runs.atomic_torch_save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": g.get_state(),
            "epoch_rng": epoch_rng if epoch_rng is not None else g.get_state(),
            "epoch": epoch,
            "step": step,
            "partial": partial or dict(EMPTY_PARTIAL),
            "data_digest": digest,
            "vaelab_version": __version__,
            "torch_version": str(torch.__version__),
        },
        run_dir / runs.CHECKPOINT,
    )


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any], where: str) -> None:
    """Load an optimizer's state, also across its two layouts: one flat parameter (the fused MLP
    step) and one state per weight (the other steps, torchrun, and checkpoints written before the
    flat parameter). States are concatenated or split in the model's parameter order."""
    params = optimizer.param_groups[0]["params"]
    ids = saved["param_groups"][0]["params"]
    if len(params) != len(ids) and 1 in (len(params), len(ids)):
        states = [saved["state"][i] for i in ids if i in saved["state"]]
        sizes = [p.numel() for p in params]
        if states and len(states) != len(ids):
            raise RunError(f"{where}: the checkpoint's optimizer state covers only some weights")
        layout = []
        for key, first in states[0].items() if states else []:
            if first.dim() == 0:  # the step counter, the same for every weight (one tensor each)
                layout.append((key, [first.clone() for _ in params]))
                continue
            flat = torch.cat([state[key].reshape(-1) for state in states])
            if flat.numel() != sum(sizes):
                raise RunError(
                    f"{where}: the checkpoint's optimizer state holds {flat.numel()} values for "
                    f"{sum(sizes)} weights"
                )
            layout.append((key, [v.view_as(p) for v, p in zip(flat.split(sizes), params, strict=True)]))
        state = {i: {key: values[i] for key, values in layout} for i in range(len(params))}
        saved = {
            "state": state if layout else {},
            "param_groups": [{**saved["param_groups"][0], "params": list(range(len(params)))}],
        }
    optimizer.load_state_dict(saved)


def checked_position(state: dict[str, Any], steps: int, path: Path) -> tuple[int, int, dict[str, float]]:
    """The checkpoint's (epoch, step, partial sums), refused with one line if they are not ones
    `save_checkpoint` could have written (a damaged or edited file; `runs.read_checkpoint` has
    checked that epoch and step are whole numbers of at least 1 and 0)."""
    epoch, step, partial = state["epoch"], state["step"], state.get("partial")
    if step > steps:  # (step == steps: stopped after an epoch's last step; the epoch's end is left)
        raise RunError(f"{path}: damaged: its step is {step}, but an epoch of this run has {steps} steps")
    keys = tuple(EMPTY_PARTIAL)
    if not isinstance(partial, dict) or not all(isinstance(partial.get(k), float | int) for k in keys):
        raise RunError(f"{path}: damaged: its partial epoch sums are not numbers")
    return epoch, step, {k: float(partial[k]) for k in keys}


def restore(state: dict[str, Any], model, optimizer, g: torch.Generator, run_dir: Path):
    """Load the checkpoint's weights, optimizer and random-number states; returns the state the
    epoch's permutation was drawn from. A part that does not fit is refused with one line."""
    path = run_dir / runs.CHECKPOINT
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AttributeError):
        raise RunError(f"{path}: its weights do not fit the model in {runs.CONFIG}") from None
    try:
        load_optimizer_state(optimizer, state["optimizer"], str(run_dir))
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError):
        raise RunError(f"{path}: its optimizer state does not fit the model in {runs.CONFIG}") from None
    tensors = [(f"weight {name}", p) for name, p in model.state_dict().items()]
    tensors += [(f"optimizer state {key}", v) for s in optimizer.state.values() for key, v in s.items()]
    bad = next((name for name, v in tensors if torch.is_tensor(v) and not bool(v.isfinite().all())), None)
    if bad is not None:  # resumed, it would stop at the first check with a NaN loss and the wrong advice
        raise RunError(f"{path}: damaged: its {bad} holds NaN or infinite values")
    try:
        g.set_state(state["rng"])
        epoch_rng = state["epoch_rng"]
        torch.Generator().set_state(epoch_rng)
    except (KeyError, RuntimeError, TypeError):
        raise RunError(f"{path}: damaged: its random-number states are not a generator's") from None
    return epoch_rng
