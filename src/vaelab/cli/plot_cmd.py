"""`vaelab plot`: draw every figure of a run into RUN/figures/."""

from __future__ import annotations

import argparse

from vaelab.cli import add_json_flag, example, print_json, seed, shown


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plot",
        help="draw a run's figures into RUN/figures/",
        description="Draw the figures of a trained run as PNG files in RUN/figures/: samples, "
        "reconstructions, the latent scatter, the seed's 15x15 manifold, an interpolation, "
        "training curves, KL per latent dimension and the seed's ring illustration.",
        epilog=example("vaelab plot runs/seed\nvaelab plot runs/seed --seed 1 --json"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN", help="a run directory written by vaelab train")
    p.add_argument("--seed", type=seed, default=0,
                   help="fixes the samples, test subset and interpolation pair (default 0)")
    add_json_flag(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from vaelab.plots import write_figures

    paths = write_figures(args.run_dir, seed=args.seed)
    if args.json:
        print_json({"run_dir": str(args.run_dir), "seed": args.seed, "figures": [str(p) for p in paths]})
    else:
        for path in paths:
            print(shown(path))
    return 0
