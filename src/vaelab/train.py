"""The training loop: data in memory as tensors, one explicit loop, checkpoints and resume.

Read it top to bottom: `train` checks the settings and the device; `_train` sets a run up (its
settings, data, model and folder), starts it or resumes it, and hands it to `_loop`, which runs
the epochs: `_train_epoch` takes the steps, `_end_epoch` scores and records the epoch, and
`_stops_after` applies the stopping rules. The data stays one float tensor; an epoch is a random
permutation cut into batches by indexing (no DataLoader, no per-sample Python work). One
torch.Generator drives everything random in training (order, binarization and noise), and its state
is saved in every checkpoint, so a resumed run continues the same random stream and ends with the
same weights.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vaelab import runs, session
from vaelab.checkpoints import EMPTY_PARTIAL
from vaelab.checkpoints import load_optimizer_state as _load_optimizer_state  # noqa: F401 (tests)
from vaelab.checkpoints import save_checkpoint as _save_checkpoint
from vaelab.config import RunConfig
from vaelab.data.tensors import Tensors, data_digest, input_rows, prepare, test_targets, validation_split  # noqa: F401
from vaelab.devices import autocast as _autocast
from vaelab.devices import compile_problem, flush_denormals, pick_device
from vaelab.distributed import Context, DDPStep
from vaelab.errors import ConfigError
from vaelab.models import VAE, build_model
from vaelab.optim import make_optimizer
from vaelab.perf import reuse_freed_memory
from vaelab.schedules import kl_weight, learning_rate
from vaelab.scoring import test_pass
from vaelab.session import Batches, Session
from vaelab.steps import FusedMLPStep, NativeMLPStep, make_step
from vaelab.stopping import (  # noqa: F401 (NonFiniteLoss, TrainingInterrupted: raised from here)
    NonFiniteLoss,
    StopFlag,
    TrainingInterrupted,
    check_finite,
    early_stopping_state,
    interrupted,
    signals_to_flag,
)
from vaelab.threads import scoring_threads, tuner_for

CHECK_EVERY = 100  # steps between checks for a NaN/infinite loss (each check waits for the device)


@dataclass
class TrainResult:
    run_dir: Path
    model: VAE
    metrics: list[dict[str, Any]]
    seconds: float
    is_main: bool = True  # False on the other processes of a torchrun job (they write nothing)


def train(
    config: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    dataset=None,
    log: Callable[[str], None] = lambda msg: None,
    progress: bool = False,
    on_epoch_end: Callable[[VAE, dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train a VAE and write its run directory.

    Args:
        config: the run's configuration (see `vaelab.config.preset`).
        run_dir: the folder to write: new or empty (hidden files aside), or the run to `resume`.
        resume: continue the run in `run_dir` from its last checkpoint (its config.json wins,
            except `train.epochs`, which may grow, and `train.time_limit`, `train.compile` and
            `train.device`, on which no saved state depends: `config.RESUME_CHANGEABLE`).
        dataset: a `vaelab.data.Dataset` to use instead of loading `config.data.source`.
        log: called with one line per epoch (and a few other messages).
        progress: show a progress bar per epoch (for terminals).
        on_epoch_end: called with the model and the epoch's metrics row after each epoch.

    Returns:
        A TrainResult with the trained model and its metrics.

    Example:
        >>> result = vaelab.train(vaelab.preset("seed"), "runs/seed")
    """
    run_dir = Path(run_dir)
    config = _typed(config).validate()
    if not resume and config.train.objective == "iwae" and config.train.warmup_epochs:  # new runs only:
        raise ConfigError(  # runs made before this check still open and resume
            "option --warmup-epochs: the iwae objective has no KL weight to warm up; use --objective elbo"
        )
    device = pick_device(config.train.device)
    ctx = Context.from_env(device)
    device = ctx.device(device)  # cuda:LOCAL_RANK under torchrun
    try:
        if config.train.compile:  # refused before any data is read or file written
            if ctx.active:
                raise ConfigError("option --compile: not supported under torchrun; train without it")
            if problem := compile_problem(device):
                raise ConfigError(f"option --compile: {problem}")
        if config.train.tensorboard:
            from vaelab.tensorboard import check_available

            check_available()
        say = log if ctx.is_main else _quiet  # only rank 0 of a torchrun job speaks
        result = _train(config, run_dir, resume, dataset, say, progress, on_epoch_end, ctx, device)
        ctx.barrier()  # every rank done before any tears the group down (gloo can abort otherwise)
        return result
    finally:
        ctx.close()


def _typed(config: RunConfig) -> RunConfig:
    """`config` rebuilt through `RunConfig.from_dict`, which checks every field's type: a config
    made in Python holds whatever it was given ("False" for a bool, 1.5 epochs), which would fail
    mid-run or write a config.json that no verb could open again."""
    if not isinstance(config, RunConfig):
        kind = type(config).__name__
        raise ConfigError(f"train: config must be a RunConfig (e.g. vaelab.preset('seed')), got {kind}")
    d = config.to_dict()
    if isinstance(d["data"]["source"], os.PathLike):  # a Path is as good as its string
        d["data"]["source"] = os.fspath(d["data"]["source"])
    return RunConfig.from_dict(d, where="config")


def _quiet(msg: str) -> None:
    pass


def _train(
    config, run_dir, resume, dataset, log, progress, on_epoch_end, ctx: Context, device: torch.device
) -> TrainResult:
    from vaelab.data import load as load_data

    config, saved = session.settings(config, run_dir, resume, ctx)
    if dataset is None:
        d = config.data
        dataset = load_data(d.source, image_size=d.image_size, channels=d.channels)
    tensors = prepare(dataset, config, compact=True)  # uint8 or bool: a batch is made float when used
    digest = data_digest(dataset)
    config = session.fitted_to_data(config, tensors, resume)
    session.notes(config, ctx, device, log)
    if device.type == "cpu":
        reuse_freed_memory()  # a step's large temporaries are reused, not page-faulted back
    model, step_fn, optimizer = _build(config, device, ctx)
    session.native_note(step_fn, device, log if ctx.is_main else lambda _: None)
    scored = tuple(len(x) for x in (tensors.x_val, tensors.x_test) if x is not None)
    tuner = tuner_for(step_fn, config, device, len(tensors.x_train), scored)
    steps = math.ceil(len(tensors.x_train) / config.train.batch_size)
    g = torch.Generator().manual_seed(config.train.seed)
    run = Session(
        config, run_dir, ctx, device, model, step_fn, optimizer, g, digest, steps, log, progress, on_epoch_end
    )
    run.tuner = tuner
    session.make_folder(run_dir, ctx)
    lock = runs.locked(run_dir) if ctx.is_main else contextlib.nullcontext()
    with lock, signals_to_flag() as run.stop, flush_denormals():
        if resume:
            session.resume(run, saved)
        elif ctx.is_main:
            _start(run)
        # after the lock and the run's first files: a refused run writes no TensorBoard events
        run.on_epoch_end = session.epoch_callback(config, run_dir, tensors, on_epoch_end, ctx)
        run.autocast = _autocast(config.train.precision, device)
        if ctx.active:
            run.step_fn = DDPStep(model, ctx, config.train.objective, config.train.free_bits)
        run.data = Batches.on(device, tensors, config.model.conditional)
        started = time.perf_counter()
        try:
            _loop(run)
        finally:
            run.on_epoch_end.close()
            if run.tuner is not None:
                run.tuner.rest()
    best, _ = early_stopping_state(run.metrics)
    if tensors.x_val is not None and ctx.is_main and best[1] != run.metrics[-1]["epoch"]:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(run_dir / runs.WEIGHTS)))  # the best, as saved
    return TrainResult(run_dir, model.eval(), run.metrics, time.perf_counter() - started, ctx.is_main)


# --- setting a run up ------------------------------------------------------------------------


def _build(config: RunConfig, device: torch.device, ctx: Context):
    """The model (initialised from the seed), its training step and its optimizer."""
    t = config.train
    torch.manual_seed(t.seed)  # model initialisation
    model = build_model(config.model).to(device)
    # the step first: the fused MLP step puts all weights into one flat parameter to optimize
    step_fn = None
    if not ctx.active:  # (under torchrun: DDP's step, made once the weights are final)
        step_fn = make_step(model, t.precision, objective=t.objective, k=t.k, compile=t.compile,
                            free_bits=t.free_bits)
    params = [step_fn.flat] if isinstance(step_fn, FusedMLPStep) else list(model.parameters())
    return model, step_fn, make_optimizer(params, config)


def _start(run: Session) -> None:
    """A new run's first files: config.json, an empty metrics.jsonl and a checkpoint from before
    the first step (so a run stopped in its first epoch can be resumed too)."""
    runs.atomic_write_text(run.run_dir / runs.CONFIG, run.config.to_json())
    runs.write_metrics(run.run_dir, [])
    _checkpoint(run, None, 1, 0, None)
    run.kept = "the starting checkpoint"


# --- the epochs --------------------------------------------------------------------------------


def _loop(run: Session) -> None:
    """Every epoch from where the run starts: the steps, then the epoch's end, then the stopping rules."""
    for epoch in range(run.start_epoch, run.config.train.epochs + 1):
        epoch_start = time.perf_counter()
        first_step = run.start_step if epoch == run.start_epoch else 0
        if first_step == 0:
            run.epoch_rng = run.g.get_state()  # the permutation is redrawn from this on resume
            run.partial = dict(EMPTY_PARTIAL)
        resume_rng = run.g.get_state()
        run.g.set_state(run.epoch_rng)
        perm = torch.randperm(len(run.data.x_train), generator=run.g).to(run.device)
        if first_step:
            run.g.set_state(resume_rng)
        sums = _train_epoch(run, epoch, perm, first_step, epoch_start)
        _add_partial(run.partial, run.ctx.all_sum(sums), 0.0)
        row, out_of_time = _end_epoch(run, epoch, epoch_start)
        if _stops_after(run, epoch, row, out_of_time):
            break


def _train_epoch(
    run: Session, epoch: int, perm: torch.Tensor, first_step: int, epoch_start: float
) -> torch.Tensor:
    """The steps of one epoch from `first_step`; returns the sums of (loss, recon, kl) in nats.
    A signal stops it at a step, with a checkpoint of the epoch so far."""
    config, ctx, data, g, t = run.config, run.ctx, run.data, run.g, run.config.train
    acc = torch.float32 if run.device.type == "mps" else torch.float64  # MPS has no float64
    sums = torch.zeros(3, dtype=acc, device=run.device)  # loss, recon, kl
    lr = learning_rate(config, epoch)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    step_losses = torch.zeros(run.steps, dtype=acc, device=run.device)  # to find a NaN's step
    run.model.train()
    bar = _bar(run.steps, f"epoch {epoch}/{t.epochs}", run.progress, initial=first_step)
    eps_shape = (t.k,) if t.k > 1 else ()  # K samples per image: eps (K, B, latent)
    for step in range(first_step, run.steps):
        idx = perm[step * t.batch_size : (step + 1) * t.batch_size]
        x = input_rows(data.x_train, idx)  # (B, D) in [0, 1]: a row gather, then float
        if config.data.binarize == "dynamic":  # the encoder sees the binarized image too
            x = torch.bernoulli(x.cpu(), generator=g).to(run.device)
        eps = torch.randn(*eps_shape, len(idx), run.model.noise_dim, generator=g).to(run.device)
        label = data.y_train.index_select(0, idx) if config.model.conditional else None
        # scale: the global batch's mean (or sum); DDP averages the processes' gradients
        scale = ctx.world / (len(idx) if t.reduction == "mean" else 1)
        x, label = ctx.shard(x), (ctx.shard(label) if label is not None else None)
        eps = ctx.shard(eps) if t.k == 1 else eps[:, ctx.shard(torch.arange(len(idx)))]
        beta = kl_weight(config, epoch, step, run.steps)
        if run.tuner is not None:
            run.tuner.step_started()
        loss, recon, kl = run.step_fn(x, x, eps, beta, scale, run.autocast, label)  # nats
        run.optimizer.step()
        if run.tuner is not None:
            run.tuner.step_done()
        step_losses[step] = loss
        sums += torch.stack([loss, recon, kl])
        check = (step + 1) % CHECK_EVERY == 0 or step + 1 == run.steps
        if check:
            check_finite(step_losses, first_step, step + 1, epoch, run.steps, run.kept, t, ctx)
        if bar is not None and (step + 1) % 20 == 0:
            bar.update(20)
        # processes agree on stopping at check steps; one process stops at the next step
        if (check or not ctx.active) and ctx.any(run.stop.signum is not None):
            _add_partial(run.partial, ctx.all_sum(sums), time.perf_counter() - epoch_start)
            if ctx.is_main:
                _checkpoint(run, run.epoch_rng, epoch, step + 1, run.partial)
                runs.save_weights(run.model, run.run_dir / runs.WEIGHTS)
            raise interrupted(run.run_dir, epoch, step + 1, run.steps, run.stop.signum)
    if bar is not None:
        bar.close()
    if run.tuner is not None:
        run.tuner.rest()  # all threads between the epochs' steps
    return sums


def _end_epoch(run: Session, epoch: int, epoch_start: float) -> tuple[dict[str, Any], bool]:
    """The epoch's row of metrics (its test pass when due, and always when the time limit ends the
    run), written with the weights and, when due, a checkpoint; returns the row and whether the
    time limit is reached."""
    config, ctx, t, n = run.config, run.ctx, run.config.train, len(run.data.x_train)
    run.model.eval()
    row = {
        "epoch": epoch,
        "train_loss": run.partial["sum_loss"] / n,
        "train_recon": run.partial["sum_recon"] / n,
        "train_kl": run.partial["sum_kl"] / n,
    }
    if t.lr_schedule != "constant" or t.warmup_epochs:
        row.update(lr=learning_rate(config, epoch), beta=kl_weight(config, epoch, run.steps, run.steps))
    evaluated = ctx.is_main and (epoch % t.eval_every == 0 or epoch == t.epochs)
    if evaluated:
        _score(run, row, epoch)
    before = sum(r["seconds"] for r in run.metrics)  # the run's training time, resumes included
    seconds = run.partial["seconds"] + time.perf_counter() - epoch_start
    out_of_time = t.time_limit is not None and epoch < t.epochs
    out_of_time = out_of_time and ctx.any(before + seconds >= 60 * t.time_limit)
    if out_of_time and ctx.is_main and not evaluated:  # the run's last epoch is always evaluated
        _score(run, row, epoch)
        seconds = run.partial["seconds"] + time.perf_counter() - epoch_start
    row["seconds"] = seconds
    run.metrics.append(row)
    if ctx.is_main:
        runs.write_metrics(run.run_dir, run.metrics)
        best, _ = early_stopping_state(run.metrics)
        # with a validation set: the best-validation weights (the latest until the first)
        if run.data.x_val is None or best[1] in (0, epoch):
            runs.save_weights(run.model, run.run_dir / runs.WEIGHTS)
        if epoch % t.checkpoint_every == 0 or epoch == t.epochs or out_of_time:
            _checkpoint(run, None, epoch + 1, 0, None)
            run.kept = f"the checkpoint of epoch {epoch}"
    return row, out_of_time


def _score(run: Session, row: dict[str, Any], epoch: int) -> None:
    """The validation and test passes, into `row` (z drawn from a seed of the run and epoch)."""
    seed = run.config.train.seed * 100_003 + epoch
    data, step, model = run.data, run.step_fn, run.model
    sums = step.loss_sums if isinstance(step, NativeMLPStep) else None  # the native forward, its rounding
    with scoring_threads(run.tuner):  # the steps' thread count where the numbers cannot depend on it
        if data.x_val is not None:
            row.update(test_pass(model, data.x_val, seed, run.autocast, data.y_val, prefix="val", sums=sums))
        row.update(test_pass(model, data.x_test, seed, run.autocast, data.y_test, sums=sums))


def _stops_after(run: Session, epoch: int, row: dict[str, Any], out_of_time: bool) -> bool:
    """Log the epoch, call back, and apply the stopping rules: the time limit, early stopping, and
    a signal that arrived after the epoch's last step (raised, with a checkpoint)."""
    t, ctx = run.config.train, run.ctx
    run.log(_summary(row, t.epochs) + (run.tuner.epoch_note() if run.tuner is not None else ""))
    if ctx.is_main:
        run.on_epoch_end(run.model, row)
    if out_of_time:
        trained = sum(r["seconds"] for r in run.metrics)
        run.log(f"time limit of {t.time_limit:g} minutes reached after epoch {epoch} ({trained:.0f} s)")
        return True
    best, waited = early_stopping_state(run.metrics)
    if t.patience and ctx.any(waited >= t.patience):
        run.log(
            f"early stop after epoch {epoch}: no better validation loss for {waited} evaluations; "
            f"{runs.WEIGHTS} holds epoch {best[1]} (validation loss {best[0]:.2f})"
        )
        return True
    if epoch < t.epochs and ctx.any(run.stop.signum is not None):  # arrived after the last step
        if ctx.is_main and epoch % t.checkpoint_every != 0:
            _checkpoint(run, None, epoch + 1, 0, None)
        raise interrupted(run.run_dir, epoch + 1, 0, run.steps, run.stop.signum)
    return False


def _checkpoint(run: Session, epoch_rng, epoch: int, step: int, partial: dict[str, float] | None) -> None:
    """Write the run's checkpoint: the next step to take is `step` of `epoch`."""
    model, optimizer = run.model, run.optimizer
    _save_checkpoint(run.run_dir, model, optimizer, run.g, epoch_rng, epoch, step, partial, run.digest)


def _add_partial(partial: dict[str, float], sums: torch.Tensor, seconds: float) -> None:
    loss, recon, kl = sums.tolist()
    partial["sum_loss"] += loss
    partial["sum_recon"] += recon
    partial["sum_kl"] += kl
    partial["seconds"] += seconds


def _summary(row: dict[str, Any], epochs: int) -> str:
    s = f"epoch {row['epoch']:>3}/{epochs}  train {row['train_loss']:8.2f}"
    if "val_loss" in row:
        s += f"  val {row['val_loss']:8.2f}"
    if "test_loss" in row:
        s += (
            f"  test {row['test_loss']:8.2f} = recon {row['test_recon']:7.2f} + kl {row['test_kl']:6.2f} nats"
        )
    return s + f"  {row['seconds']:.2f}s"


def _bar(total: int, desc: str, enabled: bool, initial: int = 0):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, initial=initial, leave=False, file=sys.stderr, unit="batch")
