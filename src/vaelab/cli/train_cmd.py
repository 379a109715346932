"""`vaelab train`: train a VAE and write its run directory."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from vaelab.cli import add_json_flag, example, is_terminal, out_of_memory, print_json, shown
from vaelab.cli.options import add_options, option_for, options
from vaelab.settings import holds


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
        help="named settings: seed (default), pytorch-example, benchmark, frontier, conv, cvae",
    )
    p.add_argument("--config", metavar="FILE", help="TOML or JSON file with [data] [model] [train] keys")
    p.add_argument("--out", metavar="DIR",
                   help="run directory, new or empty (default: runs/PRESET, numbered if taken)")
    p.add_argument(
        "--resume",
        metavar="RUN",
        help="continue RUN from its last checkpoint, with its config.json (only --epochs, --time-limit, "
        "--compile, --device and --tensorboard may change)",
    )
    add_options(p)
    p.add_argument("--no-figures", action="store_true", help="skip figures and report at the end")
    add_json_flag(p)
    p.set_defaults(run=run)


def build_config(args: argparse.Namespace):
    """preset, then --config file, then the flags given on the command line."""
    from vaelab.config import PRESETS, merge, preset, read_config_file
    from vaelab.errors import ConfigError

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
    overrides: dict = {}
    for option in options():
        value = getattr(args, option.dest)
        if value is not None:
            value = list(value) if isinstance(value, list) else value
            overrides.setdefault(option.section, {})[option.key] = value
    if overrides:
        config = merge(config, overrides, where="option")
    try:
        config.validate()
    except ConfigError as e:
        if file_values and _same_error(from_file, e):  # the bad value came from the file: name it
            raise ConfigError(f"{args.config}: {e}") from None
        raise
    _refuse_settings_for_nothing(args, config, from_file, file_values, base)
    return config


def _refuse_settings_for_nothing(args, config, from_file, file_values: dict, base) -> None:
    """A setting that has no effect (`gaussian_std` without the Gaussian likelihood) is a mistake,
    not a no-op: refused as an option, and from the file too, unless it is unset or what a preset
    would hold anyway (a run's config.json holds every setting, used or not, and names its
    preset), or the file's own settings use it and an option switched them off."""
    from vaelab.config import PRESETS, RunConfig
    from vaelab.errors import ConfigError

    usual = [base, RunConfig(), PRESETS[file_values.get("preset", "seed")]]
    for option in options():
        if option.spec.applies is None:
            continue
        other, values = option_for(option.section, option.spec.applies[0]), option.spec.applies[1]
        if holds(other.value(config), values):
            continue
        if getattr(args, option.dest) is not None:
            needs = other.flag + ("" if values is None else " " + " or ".join(values))
            raise ConfigError(f"option {option.flag}: has no effect without {needs}")
        value = option.value(from_file)
        in_file = option.key in file_values.get(option.section, {})
        if in_file and not holds(other.value(from_file), values) and value is not None:
            if all(value != option.value(c) for c in usual):
                needs = f"{other.section}.{other.key}"
                if values is not None:
                    needs += " = " + " or ".join(f'"{v}"' for v in values)
                key = f"{option.section}.{option.key}"
                raise ConfigError(f"{args.config}: {key}: has no effect without {needs}")


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
    dests = ("preset", "config", *(o.dest for o in options()))
    given = [f for f in dests if getattr(args, f) is not None]
    changed = [f for f in given if f not in RESUME_CHANGEABLE]
    if changed:
        raise ConfigError(
            f"option --{changed[0].replace('_', '-')}: cannot be changed when resuming "
            f"({Path(args.resume) / runs.CONFIG} holds the run's settings; {_resume_changeable()})"
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


def _resume_changeable() -> str:
    """What a resume may change, in words, from the settings declared `resume=True`."""
    from vaelab.config import RESUME_CHANGEABLE

    flags = [f"{o.flag}/--no-{o.spec.option}" if o.type is bool else o.flag
             for o in options() if o.section == "train" and o.key in RESUME_CHANGEABLE and o.key != "epochs"]
    return f"only --epochs may grow, and {', '.join(flags[:-1])} and {flags[-1]} may change"


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
