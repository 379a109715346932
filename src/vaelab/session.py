"""A training run being set up: its settings (a resumed run's own), fitted to the data it trains
on, its folder, the state `vaelab.train`'s loop carries from epoch to epoch, and resuming that
state from a checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from vaelab import runs
from vaelab.checkpoints import EMPTY_PARTIAL, checked_position, restore
from vaelab.config import MAX_CLASSES, RESUME_CHANGEABLE, RunConfig
from vaelab.data.tensors import Tensors
from vaelab.devices import cpu_has_bf16
from vaelab.distributed import Context
from vaelab.errors import ConfigError, DataError, RunError
from vaelab.models import VAE
from vaelab.stopping import StopFlag, early_stopping_state


@dataclass
class Batches:
    """The prepared data on the training device (labels only where the model takes them)."""

    x_train: torch.Tensor  # (N, D) compact: uint8 grey levels or bool pixels (data.tensors.inputs)
    x_test: torch.Tensor
    y_train: torch.Tensor | None
    y_test: torch.Tensor | None
    x_val: torch.Tensor | None
    y_val: torch.Tensor | None

    @staticmethod
    def on(device: torch.device, tensors: Tensors, conditional: bool) -> Batches:
        def moved(t, labels=False):
            return None if t is None or (labels and not conditional) else t.to(device)

        return Batches(
            moved(tensors.x_train), moved(tensors.x_test), moved(tensors.y_train, True),
            moved(tensors.y_test, True), moved(tensors.x_val), moved(tensors.y_val, True),
        )


@dataclass
class Session:
    """A run being trained: what `_loop` reads, and the state it carries from epoch to epoch."""

    config: RunConfig
    run_dir: Path
    ctx: Context
    device: torch.device
    model: VAE
    step_fn: Any
    optimizer: torch.optim.Optimizer
    g: torch.Generator  # order, binarization and noise of training
    digest: str  # of the data (a resume checks it)
    steps: int  # per epoch
    log: Callable[[str], None]
    progress: bool
    on_epoch_end: Callable[[VAE, dict[str, Any]], None] | None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    kept: str = "the starting checkpoint"  # the last checkpoint written, for messages
    start_epoch: int = 1
    start_step: int = 0
    partial: dict[str, float] = field(default_factory=lambda: dict(EMPTY_PARTIAL))  # sums of the epoch
    epoch_rng: torch.Tensor | None = None  # the generator's state the epoch's permutation came from
    data: Batches | None = None
    stop: StopFlag | None = None
    autocast: Any = None
    tuner: Any = None  # a vaelab.threads.ThreadTuner, where the step's numbers allow one



def settings(config: RunConfig, run_dir: Path, resume: bool, ctx: Context):
    """The settings the run trains with, and those its config.json held (None for a new run): a
    resumed run keeps its own, but for the ones in RESUME_CHANGEABLE. The run folder is checked."""
    saved = None
    if resume:
        saved = runs.read_config(run_dir)
        runs.check_outputs(run_dir)
        changes = {name: getattr(config.train, name) for name in RESUME_CHANGEABLE}
        config = replace(saved, train=replace(saved.train, **changes))
    elif ctx.is_main:
        runs.check_new_run(run_dir, option=None)
    if ctx.is_main:
        runs.check_writable(run_dir)
    return config, saved


def fitted_to_data(config: RunConfig, tensors: Tensors, resume: bool) -> RunConfig:
    """The config with what only the data tells: the images' shape, the number of classes of a
    conditional model, and a data path made absolute (so the run works from any folder)."""
    from vaelab.data.sources import NAMES

    source = config.data.source
    if not resume and source.strip().lower() not in NAMES and Path(source).exists():
        config = replace(config, data=replace(config.data, source=str(Path(source).resolve())))
    model_config = replace(config.model, input_shape=tensors.image_shape)
    if model_config.conditional and not resume:
        if tensors.y_train is None:
            raise ConfigError(f"option --conditional: the data {source} has no labels")
        if tensors.y_test is None:  # the test pass gives the model each image's label
            raise ConfigError(f"option --conditional: the data {source} has no test labels (y_test)")
        if tensors.num_classes > MAX_CLASSES:
            raise ConfigError(
                f"option --conditional: the labels of {source} go up to {tensors.num_classes - 1}; "
                f"a conditional VAE takes labels 0..{MAX_CLASSES - 1}"
            )
        model_config = replace(model_config, num_classes=tensors.num_classes)
    elif model_config.conditional and tensors.num_classes > model_config.num_classes:
        raise DataError(
            f"{source}: its labels go up to {tensors.num_classes - 1}, but the run's model knows "
            f"{model_config.num_classes} classes (0..{model_config.num_classes - 1}); did the data change?"
        )
    return replace(config, model=model_config).validate()


def notes(config: RunConfig, ctx: Context, device: torch.device, log) -> None:
    """What the user should know before the first epoch: a loss that is not a likelihood, the
    processes of a torchrun job, bf16 emulated on this CPU."""
    binary_data = config.data.source == "dsprites"  # its pixels are 0 or 1 already
    if config.model.likelihood == "bernoulli" and config.data.binarize == "none" and not binary_data:
        log(
            "note: a Bernoulli likelihood on grey levels (the seed's binary cross-entropy): the loss "
            "is not a log-likelihood of these images; --binarize dynamic or --likelihood "
            "continuous-bernoulli give one"
        )
    if ctx.active:
        log(f"torchrun: {ctx.world} process{'es' if ctx.world > 1 else ''}, backend {ctx.backend}, {device}")
    if device.type == "cpu" and config.train.precision == "bf16" and not cpu_has_bf16():
        log(
            "note: this CPU has no bfloat16 matrix units (AVX-512 BF16 / AMX): --precision bf16 "
            "is emulated here and several times slower than fp32"
        )


def native_note(step_fn, device: torch.device, log) -> None:
    """One line where the fused step would have run its native code but cannot (no compiler...)."""
    from vaelab import native
    from vaelab.steps import FusedMLPStep

    plain = type(step_fn) is FusedMLPStep and not step_fn.compiled and device.type == "cpu"
    if plain and step_fn.flat.dtype == torch.float32 and native.library() is None:
        log(f"note: the fused step runs as PyTorch operations, up to 1.8x slower ({native.reason()})")


def make_folder(run_dir: Path, ctx: Context) -> None:
    if ctx.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # the permission check passed, yet the system refuses (/proc, /sys)
            reason = e.strerror or type(e).__name__
            raise RunError(f"option --out: cannot create {run_dir} ({reason})") from None


def resume(run: Session, saved: RunConfig) -> None:
    """Restore the run from its checkpoint, after checking that the checkpoint, metrics.jsonl and
    the data belong together; config.json then records the settings the run goes on with."""
    run_dir, t = run.run_dir, run.config.train
    state = runs.read_checkpoint(run_dir)  # weights_only: never unpickles code
    if state.get("data_digest", run.digest) != run.digest:  # (checkpoints before the digest: not checked)
        raise DataError(
            f"{run.config.data.source}: not the data {run_dir} was trained on (its images or labels "
            "changed since); resume needs the same data"
        )
    position = checked_position(state, run.steps, run_dir / runs.CHECKPOINT)
    run.start_epoch, run.start_step, run.partial = position
    run.metrics = [r for r in runs.read_metrics(run_dir) if r["epoch"] < run.start_epoch]
    if [r["epoch"] for r in run.metrics] != list(range(1, run.start_epoch)):
        raise RunError(
            f"{run_dir / runs.METRICS}: does not hold one row for each of the epochs 1 to "
            f"{run.start_epoch - 1} that the checkpoint has trained"
        )
    run.epoch_rng = restore(state, run.model, run.optimizer, run.g, run_dir)
    _, waited = early_stopping_state(run.metrics)
    if t.patience and waited >= t.patience:
        raise RunError(
            f"{run_dir}: stopped early at epoch {run.metrics[-1]['epoch']} (no better validation loss "
            f"for {waited} evaluations); start a new run to train further"
        )
    if run.start_epoch > t.epochs:
        raise RunError(
            f"{run_dir}: already trained for {run.start_epoch - 1} epochs; "
            f"pass --epochs N with N > {run.start_epoch - 1} to train longer"
        )
    run.log(f"resuming {run_dir} at epoch {run.start_epoch}, step {run.start_step}")
    run.kept = f"the checkpoint at epoch {run.start_epoch}, step {run.start_step}"
    if run.ctx.is_main and run.config != saved:
        runs.atomic_write_text(run_dir / runs.CONFIG, run.config.to_json())


def epoch_callback(config: RunConfig, run_dir: Path, tensors: Tensors, on_epoch_end, ctx: Context):
    """What runs after each epoch: the caller's `on_epoch_end`, and the TensorBoard log when
    `train.tensorboard` asks for one (rank 0 only); the result has `close()`."""
    log = None
    if config.train.tensorboard and ctx.is_main:
        from vaelab.data.tensors import inputs
        from vaelab.tensorboard import EpochLog

        log = EpochLog(run_dir, inputs(tensors.x_test[:8]), seed=config.train.seed)

    def after_epoch(model, row):
        if on_epoch_end is not None:
            on_epoch_end(model, row)
        if log is not None:
            log(model, row)

    after_epoch.close = log.close if log is not None else (lambda: None)
    return after_epoch
