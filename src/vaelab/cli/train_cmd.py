"""`vaelab train`: train a VAE and write its run directory."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from vaelab.cli import add_json_flag, example, is_terminal, out_of_memory, print_json, shown

# flag -> (section, key): the flags that override a preset or --config file
FLAGS = {
    "data": ("data", "source"),
    "binarize": ("data", "binarize"),
    "image_size": ("data", "image_size"),
    "channels": ("data", "channels"),
    "latent_dim": ("model", "latent_dim"),
    "hidden": ("model", "hidden"),
    "activation": ("model", "activation"),
    "epsilon_std": ("model", "epsilon_std"),
    "architecture": ("model", "architecture"),
    "conv_channels": ("model", "conv_channels"),
    "likelihood": ("model", "likelihood"),
    "gaussian_std": ("model", "gaussian_std"),
    "conditional": ("model", "conditional"),
    "init": ("model", "init"),
    "bernoulli_clip": ("model", "bernoulli_clip"),
    "binarize_seed": ("data", "binarize_seed"),
    "epochs": ("train", "epochs"),
    "batch_size": ("train", "batch_size"),
    "optimizer": ("train", "optimizer"),
    "lr": ("train", "lr"),
    "rmsprop_alpha": ("train", "rmsprop_alpha"),
    "eps": ("train", "eps"),
    "lr_schedule": ("train", "lr_schedule"),
    "lr_final": ("train", "lr_final"),
    "objective": ("train", "objective"),
    "k": ("train", "k"),
    "beta": ("train", "beta"),
    "warmup_epochs": ("train", "warmup_epochs"),
    "validation": ("train", "validation"),
    "patience": ("train", "patience"),
    "time_limit": ("train", "time_limit"),
    "reduction": ("train", "reduction"),
    "seed": ("train", "seed"),
    "precision": ("train", "precision"),
    "compile": ("train", "compile"),
    "device": ("train", "device"),
    "eval_every": ("train", "eval_every"),
    "checkpoint_every": ("train", "checkpoint_every"),
}


# settings that only mean something when another one has one of some values: flag -> (flag, values)
APPLIES = {
    "gaussian_std": ("likelihood", ("gaussian",)),
    "conv_channels": ("architecture", ("conv",)),
    "lr_final": ("lr_schedule", ("exponential", "cosine")),
    "rmsprop_alpha": ("optimizer", ("rmsprop",)),
    "bernoulli_clip": ("likelihood", ("bernoulli",)),
    "binarize_seed": ("binarize", ("static",)),
}


def _setting(config, flag: str):
    section, key = FLAGS[flag]
    return getattr(getattr(config, section), key)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a VAE (default: the seed's Keras example on MNIST)",
        description="Train a VAE and write runs/NAME/ (config.json, metrics.jsonl, "
        "model.safetensors, checkpoint/, figures/, report.html). With no options: the Keras "
        "example exactly (preset 'seed': MLP 784-256-2, RMSprop, batch 100, 50 epochs, MNIST).",
        epilog=example(
            "vaelab train\n"
            "vaelab train --preset pytorch-example --out runs/pt\n"
            "vaelab train --latent-dim 10 --hidden 512 256 --epochs 20 --binarize dynamic --out runs/z10\n"
            "vaelab train --resume runs/seed --epochs 80"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--preset",
        default=None,
        help="named settings: seed (default), pytorch-example, benchmark, conv, cvae",
    )
    p.add_argument("--config", metavar="FILE", help="TOML or JSON file with [data] [model] [train] keys")
    p.add_argument("--out", metavar="DIR",
                   help="run directory, new or empty (default: runs/PRESET, numbered if taken)")
    p.add_argument(
        "--resume",
        metavar="RUN",
        help="continue RUN from its last checkpoint, with its config.json (only --epochs, "
        "--time-limit, --compile and --device may change)",
    )
    p.add_argument("--data", metavar="NAME_OR_PATH", help="mnist, an IDX folder, an .npz or an image folder")
    p.add_argument(
        "--binarize", choices=["none", "dynamic", "static"], help="pixel binarization (seed: none)"
    )
    p.add_argument(
        "--binarize-seed", type=int, metavar="SEED", help="the seed of --binarize static's draw (0)"
    )
    p.add_argument("--image-size", type=int, help="resize image folders to this square size")
    p.add_argument("--channels", type=int, choices=[1, 3], help="1 grey or 3 colour (image folders)")
    p.add_argument("--latent-dim", type=int, help="latent dimensions (seed: 2)")
    p.add_argument("--hidden", type=int, nargs="+", metavar="N", help="hidden sizes (seed: 256)")
    p.add_argument("--activation", choices=["relu", "tanh", "elu"], help="hidden activation (seed: relu)")
    p.add_argument("--epsilon-std", type=float, help="std of the reparameterization noise (seed: 1.0)")
    p.add_argument("--architecture", choices=["mlp", "conv"], help="encoder/decoder networks (seed: mlp)")
    p.add_argument(
        "--conv-channels", type=int, nargs="+", metavar="N", help="conv: channels per stride-2 layer (32 64)"
    )
    p.add_argument(
        "--likelihood",
        choices=["bernoulli", "continuous-bernoulli", "gaussian", "gaussian-learned"],
        help="p(x|z) (seed: bernoulli, its binary cross-entropy)",
    )
    p.add_argument("--gaussian-std", type=float, help="the fixed std of --likelihood gaussian (0.1)")
    p.add_argument(
        "--conditional",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a conditional VAE: encoder and decoder see the label (preset cvae; "
        "--no-conditional makes it unconditional)",
    )
    p.add_argument(
        "--init",
        choices=["glorot", "torch"],
        help="weight initialisation: glorot (seed; Keras' Dense: uniform, zero biases) or torch "
        "(nn.Linear's default; pytorch-example)",
    )
    p.add_argument(
        "--bernoulli-clip",
        type=float,
        metavar="P",
        help="clip probabilities to [P, 1-P] in the training loss, as Keras does (seed: 1e-7; 0: exact)",
    )
    p.add_argument("--epochs", type=int, help="passes over the training set (seed: 50)")
    p.add_argument("--batch-size", type=int, help="images per step (seed: 100)")
    p.add_argument("--optimizer", choices=["rmsprop", "adam"], help="seed: rmsprop (Keras settings)")
    p.add_argument("--lr", type=float, help="learning rate (seed: 1e-3)")
    p.add_argument("--eps", type=float, help="the optimizer's epsilon (seed: 1e-7, Keras' RMSprop)")
    p.add_argument(
        "--rmsprop-alpha", type=float, metavar="RHO", help="RMSprop's decay rate (seed: 0.9, Keras' rho)"
    )
    p.add_argument(
        "--lr-schedule",
        choices=["constant", "exponential", "cosine", "iwae"],
        help="per-epoch learning rate: constant (seed); exponential or cosine from --lr to --lr-final; "
        "iwae: Burda et al.'s 3^i stages fitted to --epochs",
    )
    p.add_argument("--lr-final", type=float, help="the last epoch's rate (exponential/cosine; default lr/10)")
    p.add_argument(
        "--objective", choices=["elbo", "iwae"], help="elbo (seed) or the importance-weighted bound"
    )
    p.add_argument("--k", type=int, help="samples of z per image (iwae: importance samples; seed: 1)")
    p.add_argument("--beta", type=float, help="weight of the KL term (1: the ELBO)")
    p.add_argument("--warmup-epochs", type=float, help="raise the KL weight linearly from 0 over N epochs")
    p.add_argument(
        "--validation", type=int, metavar="N", help="hold out N training images as a validation set"
    )
    p.add_argument(
        "--patience",
        type=int,
        metavar="N",
        help="early stopping: stop after N evaluations without a better "
        "validation loss (model.safetensors keeps the best)",
    )
    p.add_argument(
        "--reduction",
        choices=["mean", "sum"],
        help="batch loss: mean over images (seed) or sum (pytorch-example)",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        metavar="MINUTES",
        help="stop after the epoch that reaches this training time (the run's, resumes included; "
        "may be raised when resuming)",
    )
    p.add_argument("--seed", type=int, help="random seed (same seed, same machine: same numbers)")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="fp32 (default) or bf16 autocast")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the training step (0-20%% faster epochs at batch 100 here, after about 10 s of "
        "compiling on the first step; needs a C++ compiler on a CPU; numbers differ from an "
        "uncompiled run in the last digits; may be switched when resuming)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="where to train (auto)")
    p.add_argument(
        "--eval-every",
        type=int,
        metavar="N",
        help="test-set pass every N epochs and after the last one (seed: 1)",
    )
    p.add_argument(
        "--checkpoint-every", type=int, metavar="N", help="write checkpoint/ every N epochs (1)"
    )
    p.add_argument("--no-figures", action="store_true", help="skip figures and report at the end")
    add_json_flag(p)
    p.set_defaults(run=run)


def build_config(args: argparse.Namespace):
    """preset, then --config file, then the flags given on the command line."""
    from vaelab.config import PRESETS, RunConfig, merge, preset, read_config_file
    from vaelab.errors import ConfigError

    overrides: dict = {}
    file_values: dict = {}
    if args.config:
        file_values = read_config_file(args.config)
    if "preset" in file_values:  # checked even when --preset wins over it
        named = file_values["preset"]
        if not isinstance(named, str) or named not in PRESETS:
            known = ", ".join(PRESETS)
            raise ConfigError(f"{args.config}: preset: unknown preset {named!r} (known: {known})")
    name = args.preset if args.preset is not None else file_values.get("preset", "seed")
    base = config = preset(name)
    if file_values:
        config = merge(config, {k: v for k, v in file_values.items() if k != "preset"}, where=args.config)
    from_file = config
    for flag, (section, key) in FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides.setdefault(section, {})[key] = list(value) if isinstance(value, list) else value
    if overrides:
        config = merge(config, overrides, where="option")
    try:
        config.validate()
    except ConfigError as e:
        if file_values and _same_error(from_file, e):  # the bad value came from the file: name it
            raise ConfigError(f"{args.config}: {e}") from None
        raise
    # A value the file sets for nothing is refused too, unless it is unset or what a preset would
    # hold anyway (a run's config.json holds every setting, used or not, and names its preset), or
    # the file's own settings use it and an option switched them off.
    usual = [base, RunConfig(), PRESETS[file_values.get("preset", "seed")]]
    for flag, (other, values) in APPLIES.items():  # a setting for nothing is a mistake, not a no-op
        if _setting(config, other) in values:
            continue
        if getattr(args, flag) is not None:
            needs = f"--{other.replace('_', '-')} " + " or ".join(values)
            raise ConfigError(f"option --{flag.replace('_', '-')}: has no effect without {needs}")
        section, key = FLAGS[flag]
        value = _setting(from_file, flag)
        set_for_nothing = key in file_values.get(section, {}) and _setting(from_file, other) not in values
        if set_for_nothing and value is not None and all(value != _setting(c, flag) for c in usual):
            needs = f"{'.'.join(FLAGS[other])} = " + " or ".join(f'"{v}"' for v in values)
            raise ConfigError(f"{args.config}: {section}.{key}: has no effect without {needs}")
    return config


def _same_error(config, error: Exception) -> bool:
    from vaelab.errors import ConfigError

    try:
        config.validate()
    except ConfigError as e:
        return str(e) == str(error)
    return False


def resume_config(args: argparse.Namespace):
    """The config of the run to resume: its own config.json; only --epochs, --time-limit, --compile
    and --device may change."""
    from vaelab import runs
    from vaelab.config import RESUME_CHANGEABLE, merge
    from vaelab.errors import ConfigError, RunError

    if args.out:
        raise ConfigError("options --resume and --out: give one (resume writes into RUN)")
    given = [f for f in ("preset", "config", *FLAGS) if getattr(args, f) is not None]
    changed = [f for f in given if f not in RESUME_CHANGEABLE]
    if changed:
        raise ConfigError(
            f"option --{changed[0].replace('_', '-')}: cannot be changed when resuming "
            f"({Path(args.resume) / runs.CONFIG} holds the run's settings; only --epochs may grow, "
            "and --time-limit, --compile/--no-compile and --device may change)"
        )
    config = runs.read_config(args.resume)
    runs.check_outputs(args.resume)  # (a link in place of checkpoint/ before its state is read)
    changes = {k: getattr(args, k) for k in RESUME_CHANGEABLE if getattr(args, k) is not None}
    if changes:
        config = merge(config, {"train": changes}, where="option").validate()
    if not (Path(args.resume) / runs.CHECKPOINT).is_file():
        return config  # training decides what a run without a checkpoint means
    state = runs.read_checkpoint(args.resume)  # a corrupt or crafted checkpoint is refused now
    done = state["epoch"] - 1  # whole epochs behind it
    if state["epoch"] > config.train.epochs:
        raise RunError(
            f"{args.resume}: already trained for {done} epoch{'s' * (done != 1)}; "
            f"pass --epochs N with N > {done} to train longer"
        )
    return config


def _remove_new_run(out: Path, before: set[str] | None) -> None:
    """Remove what a new run wrote into `out`; a folder the user made stays, with what it held."""
    if before is None:
        shutil.rmtree(out, ignore_errors=True)
        return
    for path in out.iterdir():
        if path.name not in before:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def default_out(preset_name: str) -> Path:
    base = Path("runs") / preset_name
    out, i = base, 2
    while out.exists():
        out, i = Path(f"{base}-{i}"), i + 1
    return out


def run(args: argparse.Namespace) -> int:
    from vaelab import runs
    from vaelab.devices import pick_device
    from vaelab.errors import ConfigError
    from vaelab.train import train

    # Everything that can be checked is checked here, before any data is read or file written.
    for option, value in (("--out", args.out), ("--resume", args.resume)):
        if value is not None and not value.strip():
            raise ConfigError(f"option {option}: is empty; give a folder")
    if args.resume:
        config = resume_config(args)
        out = Path(args.resume)
    else:
        config = build_config(args)
        out = Path(args.out) if args.out else default_out(config.preset)
    runs.check_writable(out, "--resume" if args.resume else "--out")
    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 alone writes the run
    if not args.resume and main_process:
        runs.check_new_run(out)
    pick_device(config.train.device)  # a missing GPU is refused before the first line is printed

    def log(msg: str) -> None:
        print(shown(msg, lines=True), file=sys.stderr if args.json else sys.stdout, flush=True)

    if args.resume and not args.no_figures and main_process:  # found after training: an epoch lost
        _check_figure_paths(out)
    if main_process:
        log(f"training {config.preset!r} on {config.data.source} -> {out}")
    fresh = not args.resume and main_process
    before = {p.name for p in out.iterdir()} if fresh and out.is_dir() else None  # hidden files kept
    try:
        result = train(config, out, resume=bool(args.resume), log=log, progress=is_terminal())
    except (MemoryError, RuntimeError) as e:
        # a run that ran out of memory before its first epoch ended is no run: take it away again
        metrics = out / runs.METRICS
        if fresh and out_of_memory(e) and (not metrics.exists() or metrics.stat().st_size == 0):
            _remove_new_run(out, before)
        raise
    if not result.is_main:  # another process of a torchrun job: rank 0 reports and draws
        return 0
    last = result.metrics[-1] if result.metrics else {}
    if not args.no_figures:
        _figures_and_report(out, log)
    summary = {
        "run_dir": str(out),
        "epochs": len(result.metrics),
        "seconds": round(result.seconds, 2),
        "peak_mib": round(_peak_mib(), 1),
        **{k: last[k] for k in ("train_loss", "test_loss", "test_recon", "test_kl") if k in last},
    }
    if args.json:
        print_json(summary)
    else:
        test = f", test loss {last['test_loss']:.2f} nats" if "test_loss" in last else ""
        print(shown(
            f"done in {result.seconds:.1f}s{test}; peak memory {summary['peak_mib']:.0f} MiB; "
            f"run directory: {out}"
        ))
    return 0


def _check_figure_paths(run_dir: Path) -> None:
    """Refuse a resume whose figures or report would have something else in their place."""
    from vaelab import runs

    try:
        from vaelab.plots import check_figure_paths
    except ImportError:
        return
    check_figure_paths(run_dir)
    runs.refuse_if_not_a_file(run_dir / "report.html", "report")


def _figures_and_report(run_dir: Path, log) -> None:
    """Figures and report, when those parts of vaelab are installed."""
    try:
        from vaelab.plots import write_figures
        from vaelab.report import write_report
    except ImportError:
        return
    figures = write_figures(run_dir)
    report = write_report(run_dir)
    log(f"wrote {len(figures)} figures to {run_dir / 'figures'} and {report}")


def _peak_mib() -> float:
    """This process's peak resident memory (Linux reports KiB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
