"""What ends a training run before its last epoch: a signal (Ctrl-C, SIGTERM), a NaN or infinite
loss, and early stopping on the validation loss. The time limit is one comparison in the loop."""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from typing import Any

import torch

from vaelab.config import TrainConfig
from vaelab.distributed import Context
from vaelab.errors import VaelabError


class TrainingInterrupted(VaelabError):
    """SIGINT/SIGTERM arrived: a checkpoint was written; `exit_code` is 130 or 143."""

    is_error = False  # the user asked for the stop: the CLI prints no "error:"

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class NonFiniteLoss(VaelabError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def early_stopping_state(metrics: list[dict[str, Any]]) -> tuple[tuple[float, int], int]:
    """(best validation loss, its epoch) and evaluations since, from the metrics rows."""
    best, waited = (math.inf, 0), 0
    for row in metrics:
        if "val_loss" in row:
            if row["val_loss"] < best[0]:
                best, waited = (row["val_loss"], row["epoch"]), 0
            else:
                waited += 1
    return best, waited


def check_finite(step_losses, first, last, epoch, steps, kept, t: TrainConfig, ctx: Context) -> None:
    """Stop at a NaN or infinite loss among steps [first, last), naming the first bad step."""
    bad = ~torch.isfinite(step_losses[first:last])
    if not ctx.any(bool(bad.any())):
        return
    where = first + int(bad.nonzero()[0, 0]) + 1 if bad.any() else last
    value = step_losses[where - 1].item()
    raise NonFiniteLoss(
        f"the training loss became NaN or infinite ({value}) at epoch {epoch}, step {where}/{steps}: "
        f"stopped; {kept} is kept. Try a lower --lr (now {t.lr:g})"
        + (f" or --beta (now {t.beta:g})" if t.beta > 1 else "")
        + (" or --precision fp32" if t.precision == "bf16" else "")
    )


def interrupted(run_dir, epoch: int, step: int, steps: int, signum: int | None) -> TrainingInterrupted:
    """The stop a signal asked for, at `step` of `epoch`, with how to go on and its exit code."""
    return TrainingInterrupted(
        f"interrupted at epoch {epoch}, step {step}/{steps}: checkpoint written; "
        f"continue with: vaelab train --resume {run_dir}",
        128 + (signum or signal.SIGTERM),
    )


class StopFlag:
    signum: int | None = None


@contextlib.contextmanager
def signals_to_flag():
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step (main thread only)."""
    flag = StopFlag()

    def handler(signum, frame):
        flag.signum = signum

    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)
