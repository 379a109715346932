"""The training loop: data in memory as tensors, one explicit loop, checkpoints and resume.

Read `train` top to bottom. The data stays as one float tensor; an epoch is a random permutation
cut into batches by indexing (no DataLoader, no per-sample Python work). One torch.Generator
drives everything random in training (order, binarization, noise), and its state is saved in every
checkpoint, so a resumed run continues the same random stream and ends with the same weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import math
import os
import shutil
import signal
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaelab import runs
from vaelab.config import MAX_CLASSES, RESUME_CHANGEABLE, RunConfig, TrainConfig
from vaelab.distributed import Context, DDPStep
from vaelab.errors import ConfigError, DataError, RunError, VaelabError
from vaelab.models import VAE, build_model
from vaelab.optim import RMSprop
from vaelab.perf import reuse_freed_memory
from vaelab.steps import FusedMLPStep, make_step

VALIDATION_SEED = 0  # the draw of the held-out validation images
EVAL_CHUNK = 2000  # images per test-pass batch; its noise is drawn batch by batch, and torch's normal
# draws depend on their sizes, so a change here changes the last digits of the test losses
CHECK_EVERY = 100  # steps between checks for a NaN/infinite loss (each check waits for the device)


class TrainingInterrupted(VaelabError):
    """SIGINT/SIGTERM arrived: a checkpoint was written; `exit_code` is 130 or 143."""

    is_error = False  # the user asked for the stop: the CLI prints no "error:"

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class NonFiniteLoss(VaelabError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    run_dir: Path
    model: VAE
    metrics: list[dict[str, Any]]
    seconds: float
    is_main: bool = True  # False on the other processes of a torchrun job (they write nothing)


@dataclass
class Tensors:
    """A dataset prepared for the model: flattened float32 (N, D) in [0, 1] and labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor | None
    x_test: torch.Tensor  # the test targets (binarized once if the run binarizes)
    y_test: torch.Tensor | None
    image_shape: tuple[int, int, int]  # (C, H, W)
    x_val: torch.Tensor | None = None  # held out from training (binarized once like the test set)
    y_val: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        ys = [y for y in (self.y_train, self.y_test, self.y_val) if y is not None and len(y)]
        return max(int(y.max()) for y in ys) + 1 if ys else 0


def _flat(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x.reshape(len(x), -1)).float().div_(255.0)  # (N, D) in [0, 1]


def test_targets(x_test: np.ndarray, binarize: str) -> torch.Tensor:
    """uint8 test images -> (N, D) float32 as training scores them: grey levels in [0, 1], or,
    for a binarizing run, binarized once with TEST_BINARIZE_SEED (the dynamic-binarization protocol).
    """
    from vaelab.data import TEST_BINARIZE_SEED, static_binarize

    if binarize in ("static", "dynamic"):
        return torch.from_numpy(static_binarize(x_test, TEST_BINARIZE_SEED).reshape(len(x_test), -1))
    return _flat(x_test)


def validation_split(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation) of a fixed draw of `size` of n training images (seed 0, so
    every run on the same data holds out the same images)."""
    order = np.random.Generator(np.random.PCG64(VALIDATION_SEED)).permutation(n)
    return np.sort(order[size:]), np.sort(order[:size])


def data_digest(dataset) -> str:
    """SHA-256 of a data set's images and labels, shapes and types included: a resumed run checks
    that it goes on with the data it began with."""
    h = hashlib.sha256()
    for name in ("x_train", "y_train", "x_test", "y_test"):
        array = getattr(dataset, name, None)
        h.update(name.encode())
        if array is not None:
            array = np.ascontiguousarray(array)
            h.update(f"{array.dtype.str}{array.shape}".encode())
            h.update(array.data)
    return h.hexdigest()


def prepare(dataset, config: RunConfig) -> Tensors:
    """uint8 images -> (N, D) float32 in [0, 1]; static binarization drawn once here; the
    validation images (`train.validation`) carved from the training set, never the test set."""
    from vaelab.data import static_binarize

    image_shape = dataset.chw_shape
    mode, seed = config.data.binarize, config.data.binarize_seed
    x_all, y_all = dataset.x_train, dataset.y_train
    x_val = y_val = None
    size = config.train.validation
    if size:
        if size >= len(x_all):
            raise ConfigError(
                f"option --validation: {size} images would leave none of the {len(x_all)} training images"
            )
        keep, held = validation_split(len(x_all), size)
        x_val = test_targets(x_all[held], mode)  # scored like the test set
        y_val = None if y_all is None else np.asarray(y_all)[held]
        x_all, y_all = x_all[keep], (None if y_all is None else np.asarray(y_all)[keep])
    if mode == "static":
        x_train = torch.from_numpy(static_binarize(x_all, seed).reshape(len(x_all), -1))
    else:
        x_train = _flat(x_all)
    x_test = test_targets(dataset.x_test, mode)

    def labels(y):
        return None if y is None else torch.from_numpy(np.asarray(y, dtype=np.int64))

    return Tensors(x_train, labels(y_all), x_test, labels(dataset.y_test), image_shape, x_val, labels(y_val))


def learning_rate(config: RunConfig, epoch: int) -> float:
    """The learning rate of `epoch` (1-based) under `train.lr_schedule`.

    constant: lr. exponential / cosine: from lr at epoch 1 to lr_final (default lr / 10) at the
    last epoch. iwae: Burda et al.'s 3^i passes at lr * 10^(-i/7), i = 0..7 (3,280 passes),
    with the stages shrunk or stretched in proportion to fit `train.epochs`.
    """
    t = config.train
    final = t.lr_final if t.lr_final is not None else t.lr / 10
    f = (epoch - 1) / max(t.epochs - 1, 1)  # 0 at the first epoch, 1 at the last
    if t.lr_schedule == "exponential":
        return t.lr * (final / t.lr) ** f
    if t.lr_schedule == "cosine":
        return final + (t.lr - final) * 0.5 * (1 + math.cos(math.pi * f))
    if t.lr_schedule == "iwae":
        done = (epoch - 1) / t.epochs * 3280  # where this epoch starts on the paper's scale
        stage = next(i for i in range(8) if done < (3 ** (i + 1) - 1) / 2)  # sum_{j<=i} 3^j
        return t.lr * 10 ** (-stage / 7)
    return t.lr


def kl_weight(config: RunConfig, epoch: int, step: int, steps: int) -> float:
    """beta, ramped linearly from 0 over `train.warmup_epochs` (counted in steps)."""
    t = config.train
    if t.warmup_epochs <= 0:
        return t.beta
    return t.beta * min(1.0, ((epoch - 1) + step / steps) / t.warmup_epochs)


def make_optimizer(params: list[torch.nn.Parameter], config: RunConfig) -> torch.optim.Optimizer:
    t = config.train
    if t.optimizer == "rmsprop":  # Keras' RMSprop: lr 1e-3, rho 0.9, epsilon 1e-7
        return RMSprop(params, lr=t.lr, alpha=t.rmsprop_alpha, eps=t.eps, compile=t.compile)
    fused = params[0].device.type in ("cpu", "cuda")  # one kernel for all weights
    return torch.optim.Adam(params, lr=t.lr, eps=t.eps, fused=fused)


def compile_problem(device: torch.device) -> str | None:
    """Why torch.compile cannot build its kernels for `device` on this machine, or None."""
    if device.type == "cpu":  # Inductor writes C++ kernels with Python bindings and builds them
        from torch._inductor import cpp_builder

        try:
            cpp_builder.get_cpp_compiler()
        except Exception:
            return "torch.compile on a CPU needs a C++ compiler (g++ or clang++, or $CXX); none was found"
    elif device.type == "cuda":  # Triton, which builds a small C launcher
        if importlib.util.find_spec("triton") is None:
            return "torch.compile on CUDA needs the triton package; it is not installed"
        if not any(shutil.which(c) for c in (os.environ.get("CC", "cc"), "gcc", "clang")):
            return "torch.compile on CUDA needs a C compiler (cc, gcc or clang, or $CC); none was found"
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not header.is_file():
        missing = f"{header} is missing (Debian: apt-get install python3-dev)"
        return f"torch.compile needs Python's C headers; {missing}"
    return None


def pick_device(name: str | torch.device, where: str = "option --device") -> torch.device:
    """`auto` (a GPU if there is one), or the device asked for if this machine has it; `where`
    names the option or argument in messages."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise RunError(f"{where}: {name!r} is not a device torch knows (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"{where}: cuda was asked for but no CUDA device is available")
    if device.type == "cuda" and (device.index or 0) >= (visible := torch.cuda.device_count()):
        raise RunError(f"{where}: {device} was asked for but {visible} CUDA devices are visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RunError(f"{where}: mps was asked for but MPS is not available")
    return device


@torch.no_grad()
def test_pass(
    model: VAE, x: torch.Tensor, seed: int, autocast, y: torch.Tensor | None = None, prefix: str = "test"
) -> dict[str, float]:
    """The stochastic negative ELBO on `x` (z sampled, as Keras does), in nats per image."""
    g = torch.Generator().manual_seed(seed)
    recon = kl = 0.0
    for i in range(0, len(x), EVAL_CHUNK):
        xb = x[i : i + EVAL_CHUNK]
        yb = y[i : i + EVAL_CHUNK] if y is not None and model.config.conditional else None
        eps = torch.randn(len(xb), model.latent_dim, generator=g).to(xb.device)
        with autocast():
            terms = model.terms(xb, xb, eps, yb)
        recon += -terms.log_px_given_z.float().sum().item()
        kl += terms.kl.float().sum().item()
    n = len(x)
    return {f"{prefix}_loss": (recon + kl) / n, f"{prefix}_recon": recon / n, f"{prefix}_kl": kl / n}


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
        say = log if ctx.is_main else _quiet  # only rank 0 of a torchrun job speaks
        return _train(config, run_dir, resume, dataset, say, progress, on_epoch_end, ctx, device)
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

    if resume:
        saved = runs.read_config(run_dir)  # only the settings in RESUME_CHANGEABLE may change
        runs.check_outputs(run_dir)
        changes = {name: getattr(config.train, name) for name in RESUME_CHANGEABLE}
        config = replace(saved, train=replace(saved.train, **changes))
    elif ctx.is_main:
        runs.check_new_run(run_dir, option=None)
    if ctx.is_main:
        runs.check_writable(run_dir)

    dataset = (
        dataset
        if dataset is not None
        else load_data(config.data.source, image_size=config.data.image_size, channels=config.data.channels)
    )
    tensors = prepare(dataset, config)
    digest = data_digest(dataset)
    source = config.data.source
    if not resume and source.lower() != "mnist" and Path(source).exists():  # usable from any folder
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
    config = replace(config, model=model_config)
    config.validate()
    t = config.train
    if config.model.likelihood == "bernoulli" and config.data.binarize == "none":
        log(
            "note: a Bernoulli likelihood on grey levels (the seed's binary cross-entropy): the loss "
            "is not a log-likelihood of these images; --binarize dynamic or --likelihood "
            "continuous-bernoulli give one"
        )

    if ctx.active:
        log(f"torchrun: {ctx.world} process{'es' if ctx.world > 1 else ''}, backend {ctx.backend}, {device}")
    if device.type == "cpu":
        reuse_freed_memory()  # a step's large temporaries are reused, not page-faulted back
        if t.precision == "bf16" and not _cpu_has_bf16():
            log(
                "note: this CPU has no bfloat16 matrix units (AVX-512 BF16 / AMX): --precision bf16 "
                "is emulated here and several times slower than fp32"
            )
    torch.manual_seed(t.seed)  # model initialisation
    model = build_model(config.model).to(device)
    # the step first: the fused MLP step puts all weights into one flat parameter to optimize
    step_fn = (
        None if ctx.active else make_step(model, t.precision, objective=t.objective, k=t.k, compile=t.compile)
    )
    params = [step_fn.flat] if isinstance(step_fn, FusedMLPStep) else list(model.parameters())
    optimizer = make_optimizer(params, config)
    g = torch.Generator().manual_seed(t.seed)  # order, binarization and noise of training
    start_epoch, start_step, metrics = 1, 0, []
    partial = {"sum_loss": 0.0, "sum_recon": 0.0, "sum_kl": 0.0, "seconds": 0.0}
    epoch_rng = None
    steps = math.ceil(len(tensors.x_train) / t.batch_size)  # per epoch
    kept = "the starting checkpoint"  # the last checkpoint written, for messages
    best = (math.inf, 0)  # (validation loss, epoch) of the weights in model.safetensors
    waited = 0  # evaluations since the best validation loss

    if ctx.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # the permission check passed, yet the system refuses (/proc, /sys)
            reason = e.strerror or type(e).__name__
            raise RunError(f"option --out: cannot create {run_dir} ({reason})") from None
    lock = runs.locked(run_dir) if ctx.is_main else contextlib.nullcontext()
    with lock, _signals_to_flag() as stop, _flush_denormals():
        if resume:
            state = _load_checkpoint(run_dir)
            if state.get("data_digest", digest) != digest:  # (checkpoints before the digest: not checked)
                raise DataError(
                    f"{config.data.source}: not the data {run_dir} was trained on (its images or labels "
                    "changed since); resume needs the same data"
                )
            start_epoch, start_step, partial = _checked_position(state, steps, run_dir / runs.CHECKPOINT)
            metrics = [r for r in runs.read_metrics(run_dir) if r["epoch"] < start_epoch]
            if [r["epoch"] for r in metrics] != list(range(1, start_epoch)):
                raise RunError(
                    f"{run_dir / runs.METRICS}: does not hold one row for each of the epochs 1 to "
                    f"{start_epoch - 1} that the checkpoint has trained"
                )
            epoch_rng = _restore(state, model, optimizer, g, run_dir)
            best, waited = _early_stopping_state(metrics)
            if t.patience and waited >= t.patience:
                raise RunError(
                    f"{run_dir}: stopped early at epoch {metrics[-1]['epoch']} (no better validation loss "
                    f"for {waited} evaluations); start a new run to train further"
                )
            if start_epoch > t.epochs:
                raise RunError(
                    f"{run_dir}: already trained for {start_epoch - 1} epochs; "
                    f"pass --epochs N with N > {start_epoch - 1} to train longer"
                )
            log(f"resuming {run_dir} at epoch {start_epoch}, step {start_step}")
            kept = f"the checkpoint at epoch {start_epoch}, step {start_step}"
            if ctx.is_main and config != saved:  # config.json holds the settings the run goes on with
                runs.atomic_write_text(run_dir / runs.CONFIG, config.to_json())
        elif ctx.is_main:
            runs.atomic_write_text(run_dir / runs.CONFIG, config.to_json())
            runs.write_metrics(run_dir, [])
            # the starting point: a run stopped in its first epoch can be resumed too
            _save_checkpoint(run_dir, model, optimizer, g, None, 1, 0, None, digest)
            kept = "the starting checkpoint"

        autocast = _autocast(t.precision, device)
        if ctx.active:
            step_fn = DDPStep(model, ctx, t.objective)
        x_train = tensors.x_train.to(device)
        x_test = tensors.x_test.to(device)
        conditional = config.model.conditional
        y_train = tensors.y_train.to(device) if conditional else None
        y_test = tensors.y_test.to(device) if conditional and tensors.y_test is not None else None
        x_val = tensors.x_val.to(device) if tensors.x_val is not None else None
        y_val = tensors.y_val.to(device) if conditional and tensors.y_val is not None else None
        eps_shape = (t.k,) if t.k > 1 else ()  # K samples per image: eps (K, B, latent)
        n, batch = len(x_train), t.batch_size
        binarize = config.data.binarize == "dynamic"
        acc = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        started = time.perf_counter()

        def passes(row: dict[str, Any], epoch: int) -> None:  # the validation and test passes, into row
            seed = t.seed * 100_003 + epoch
            if x_val is not None:
                row.update(test_pass(model, x_val, seed, autocast, y_val, prefix="val"))
            row.update(test_pass(model, x_test, seed, autocast, y_test))

        for epoch in range(start_epoch, t.epochs + 1):
            epoch_start = time.perf_counter()
            if start_step == 0 or epoch != start_epoch:
                epoch_rng = g.get_state()  # the permutation is redrawn from this on resume
                partial = {"sum_loss": 0.0, "sum_recon": 0.0, "sum_kl": 0.0, "seconds": 0.0}
                first_step = 0
            else:
                first_step = start_step
            resume_rng = g.get_state()
            g.set_state(epoch_rng)
            perm = torch.randperm(n, generator=g).to(device)
            if first_step:
                g.set_state(resume_rng)
            sums = torch.zeros(3, dtype=acc, device=device)  # loss, recon, kl
            lr = learning_rate(config, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_losses = torch.zeros(steps, dtype=acc, device=device)  # to find a NaN's step
            model.train()
            bar = _bar(steps, f"epoch {epoch}/{t.epochs}", progress, initial=first_step)
            for step in range(first_step, steps):
                idx = perm[step * batch : (step + 1) * batch]
                x = x_train.index_select(0, idx)  # (B, D) in [0, 1]; a row gather, faster than x_train[idx]
                if binarize:  # the encoder sees the binarized image too
                    x = torch.bernoulli(x.cpu(), generator=g).to(device)
                eps = torch.randn(*eps_shape, len(idx), config.model.latent_dim, generator=g).to(device)
                label = y_train.index_select(0, idx) if conditional else None
                # scale: the global batch's mean (or sum); DDP averages the processes' gradients
                scale = ctx.world / (len(idx) if t.reduction == "mean" else 1)
                x, label = ctx.shard(x), (ctx.shard(label) if conditional else None)
                eps = ctx.shard(eps) if t.k == 1 else eps[:, ctx.shard(torch.arange(len(idx)))]
                beta = kl_weight(config, epoch, step, steps)
                loss, recon, kl = step_fn(x, x, eps, beta, scale, autocast, label)  # nats
                optimizer.step()
                step_losses[step] = loss
                sums += torch.stack([loss, recon, kl])
                check = (step + 1) % CHECK_EVERY == 0 or step + 1 == steps
                if check:
                    _check_finite(step_losses, first_step, step + 1, epoch, steps, kept, t, ctx)
                if bar is not None and (step + 1) % 20 == 0:
                    bar.update(20)
                # processes agree on stopping at check steps; one process stops at the next step
                if (check or not ctx.active) and ctx.any(stop.signum is not None):
                    _add_partial(partial, ctx.all_sum(sums), time.perf_counter() - epoch_start)
                    if ctx.is_main:
                        _save_checkpoint(
                            run_dir, model, optimizer, g, epoch_rng, epoch, step + 1, partial, digest
                        )
                        runs.save_weights(model, run_dir / runs.WEIGHTS)
                    code = 128 + (stop.signum or signal.SIGTERM)
                    raise TrainingInterrupted(
                        f"interrupted at epoch {epoch}, step {step + 1}/{steps}: checkpoint written; "
                        f"continue with: vaelab train --resume {run_dir}",
                        code,
                    )
            if bar is not None:
                bar.close()
            _add_partial(partial, ctx.all_sum(sums), 0.0)
            seen = n
            model.eval()
            row = {
                "epoch": epoch,
                "train_loss": partial["sum_loss"] / seen,
                "train_recon": partial["sum_recon"] / seen,
                "train_kl": partial["sum_kl"] / seen,
            }
            if t.lr_schedule != "constant" or t.warmup_epochs:
                row.update(lr=lr, beta=kl_weight(config, epoch, steps, steps))
            evaluated = ctx.is_main and (epoch % t.eval_every == 0 or epoch == t.epochs)
            if evaluated:
                passes(row, epoch)
            before = sum(r["seconds"] for r in metrics)  # the run's training time, resumes included
            seconds = partial["seconds"] + time.perf_counter() - epoch_start
            out_of_time = t.time_limit is not None and epoch < t.epochs
            out_of_time = out_of_time and ctx.any(before + seconds >= 60 * t.time_limit)
            if out_of_time and ctx.is_main and not evaluated:  # the run's last epoch is always evaluated
                passes(row, epoch)
                seconds = partial["seconds"] + time.perf_counter() - epoch_start
            row["seconds"] = seconds
            trained = before + seconds
            metrics.append(row)
            best, waited = _early_stopping_state(metrics)
            if ctx.is_main:
                runs.write_metrics(run_dir, metrics)
                # with a validation set: the best-validation weights (the latest until the first)
                if x_val is None or best[1] in (0, epoch):
                    runs.save_weights(model, run_dir / runs.WEIGHTS)
                if epoch % t.checkpoint_every == 0 or epoch == t.epochs or out_of_time:
                    _save_checkpoint(run_dir, model, optimizer, g, None, epoch + 1, 0, None, digest)
                    kept = f"the checkpoint of epoch {epoch}"
            log(_summary(row, t.epochs))
            if on_epoch_end is not None and ctx.is_main:
                on_epoch_end(model, row)
            if out_of_time:
                log(f"time limit of {t.time_limit:g} minutes reached after epoch {epoch} ({trained:.0f} s)")
                break
            if t.patience and ctx.any(waited >= t.patience):
                log(
                    f"early stop after epoch {epoch}: no better validation loss for {waited} evaluations; "
                    f"{runs.WEIGHTS} holds epoch {best[1]} (validation loss {best[0]:.2f})"
                )
                break
            if epoch < t.epochs and ctx.any(stop.signum is not None):  # arrived after the last step
                if ctx.is_main and epoch % t.checkpoint_every != 0:
                    _save_checkpoint(run_dir, model, optimizer, g, None, epoch + 1, 0, None, digest)
                raise TrainingInterrupted(
                    f"interrupted at epoch {epoch + 1}, step 0/{steps}: checkpoint written; "
                    f"continue with: vaelab train --resume {run_dir}",
                    128 + (stop.signum or signal.SIGTERM),
                )
            start_step = 0

    if tensors.x_val is not None and ctx.is_main and best[1] != metrics[-1]["epoch"]:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(run_dir / runs.WEIGHTS)))  # the best, as saved
    return TrainResult(run_dir, model.eval(), metrics, time.perf_counter() - started, ctx.is_main)


def _early_stopping_state(metrics: list[dict[str, Any]]) -> tuple[tuple[float, int], int]:
    """(best validation loss, its epoch) and evaluations since, from the metrics rows."""
    best, waited = (math.inf, 0), 0
    for row in metrics:
        if "val_loss" in row:
            if row["val_loss"] < best[0]:
                best, waited = (row["val_loss"], row["epoch"]), 0
            else:
                waited += 1
    return best, waited


def _check_finite(step_losses, first, last, epoch, steps, kept, t: TrainConfig, ctx: Context) -> None:
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


def _save_checkpoint(run_dir, model, optimizer, g, epoch_rng, epoch, step, partial, digest) -> None:
    """Everything resume needs: epoch and step to start at, optimizer, RNG states, and the digest
    of the data the run trains on (`data_digest`)."""
    from vaelab import __version__

    runs.atomic_torch_save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": g.get_state(),
            "epoch_rng": epoch_rng if epoch_rng is not None else g.get_state(),
            "epoch": epoch,
            "step": step,
            "partial": partial or {"sum_loss": 0.0, "sum_recon": 0.0, "sum_kl": 0.0, "seconds": 0.0},
            "data_digest": digest,
            "vaelab_version": __version__,
            "torch_version": str(torch.__version__),
        },
        run_dir / runs.CHECKPOINT,
    )


def _load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any], where: str) -> None:
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


def _checked_position(state: dict[str, Any], steps: int, path: Path) -> tuple[int, int, dict[str, float]]:
    """The checkpoint's (epoch, step, partial sums), refused with one line if they are not ones
    `_save_checkpoint` could have written (a damaged or edited file; `runs.read_checkpoint` has
    checked that epoch and step are whole numbers of at least 1 and 0)."""
    epoch, step, partial = state["epoch"], state["step"], state.get("partial")
    if step > steps:  # (step == steps: stopped after an epoch's last step; the epoch's end is left)
        raise RunError(f"{path}: damaged: its step is {step}, but an epoch of this run has {steps} steps")
    keys = ("sum_loss", "sum_recon", "sum_kl", "seconds")
    if not isinstance(partial, dict) or not all(isinstance(partial.get(k), float | int) for k in keys):
        raise RunError(f"{path}: damaged: its partial epoch sums are not numbers")
    return epoch, step, {k: float(partial[k]) for k in keys}


def _restore(state: dict[str, Any], model, optimizer, g: torch.Generator, run_dir: Path):
    """Load the checkpoint's weights, optimizer and random-number states; returns the state the
    epoch's permutation was drawn from. A part that does not fit is refused with one line."""
    path = run_dir / runs.CHECKPOINT
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AttributeError):
        raise RunError(f"{path}: its weights do not fit the model in {runs.CONFIG}") from None
    try:
        _load_optimizer_state(optimizer, state["optimizer"], str(run_dir))
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


def _load_checkpoint(run_dir: Path) -> dict[str, Any]:
    return runs.read_checkpoint(run_dir)  # weights_only: never unpickles code


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _bar(total: int, desc: str, enabled: bool, initial: int = 0):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, initial=initial, leave=False, file=sys.stderr, unit="batch")


@contextlib.contextmanager
def _flush_denormals():
    """Tiny gradients late in training become denormal floats, which slow every step ~2x."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)  # the default (torch cannot report the previous mode)


class _StopFlag:
    signum: int | None = None


@contextlib.contextmanager
def _signals_to_flag():
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step (main thread only)."""
    flag = _StopFlag()

    def handler(signum, frame):
        flag.signum = signum

    import threading

    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)
