"""`vaelab sample`: new digits decoded from z ~ N(0, I) (the seed's generator)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from vaelab.cli import add_json_flag, example, print_json, seed, shown

MAX_SAMPLES = 10_000  # a 100 x 100 grid; more is no picture anyone looks at


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="draw new images from a trained model",
        description="Decode z ~ N(0, I) with the run's decoder (the encoder is not used) and "
        "write the images as one PNG grid.",
        epilog=example(
            "vaelab sample runs/seed -n 100 --out samples.png --seed 0\n"
            "vaelab sample runs/cvae --label 7 -n 25 --out sevens.png"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN", help="a run directory written by vaelab train")
    p.add_argument("-n", type=int, default=100, help=f"number of images (default 100, at most {MAX_SAMPLES})")
    p.add_argument("--out", default="samples.png", help="PNG file to write (default samples.png)")
    p.add_argument("--seed", type=seed, default=None, help="seed of z (default: random)")
    p.add_argument("--label", type=int, help="a conditional run: draw this label (default: all in turn)")
    add_json_flag(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import vaelab
    from vaelab import runs
    from vaelab.errors import ConfigError, RunError
    from vaelab.images import save_grid

    if not 1 <= args.n <= MAX_SAMPLES:
        raise ConfigError(f"option -n: must be in 1..{MAX_SAMPLES} (one grid image), got {args.n}")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"option --out: {out} must end in .png")
    if out.is_dir():
        raise ConfigError(f"option --out: {out} is a folder; give a .png file name")
    runs.check_writable(out.parent, "--out")
    model = vaelab.load(args.run_dir)
    if args.label is not None:
        classes = model.config.num_classes
        if not model.config.conditional:
            raise ConfigError(
                f"option --label: {args.run_dir} is not a conditional VAE (train with --conditional)"
            )
        if not 0 <= args.label < classes:
            raise ConfigError(f"option --label: must be in 0..{classes - 1}, got {args.label}")
    images = model.sample(args.n, seed=args.seed, label=args.label).reshape(args.n, *model.image_shape)
    if not bool(images.isfinite().all()):
        raise RunError(f"{args.run_dir}/{runs.WEIGHTS}: the decoder gives NaN or infinite values")
    cols = math.ceil(math.sqrt(args.n))
    save_grid(images.numpy(), out, cols=cols)
    if args.json:
        print_json({"out": str(out), "n": args.n, "seed": args.seed, "label": args.label})
    else:
        print(shown(f"wrote {args.n} samples to {out}"))
    return 0
