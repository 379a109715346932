"""`vaelab compare`: put runs side by side in one self-contained HTML page."""

from __future__ import annotations

import argparse

from vaelab.cli import add_json_flag, example, print_json, shown


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="put runs side by side in one self-contained HTML page",
        description="Write one self-contained HTML page comparing runs: the settings that differ, "
        "each run's final test loss and evaluated NLL and ELBO with standard errors (from vaelab "
        "evaluate, where run), the loss curves overlaid, and the same figures of each run next to "
        "each other. --out may name a new file or a page vaelab compare wrote before; any other "
        "file is left alone.",
        epilog=example(
            "vaelab compare runs/seed runs/pt\n"
            "vaelab compare runs/z2 runs/z5 runs/z10 --out latent-sizes.html --json"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dirs", metavar="RUN", nargs="+", help="two or more run directories")
    p.add_argument("--out", metavar="FILE", default="compare.html", help="the page to write (compare.html)")
    add_json_flag(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from vaelab.compare import write_comparison
    from vaelab.errors import ConfigError

    if len(args.run_dirs) < 2:
        raise ConfigError("give at least two runs to compare")
    path, data = write_comparison(args.run_dirs, args.out)
    if args.json:
        print_json({**data, "page": str(path)})
        return 0
    for note in data["notes"]:
        print(shown(f"note: {note}"))
    differ = data["settings_that_differ"]
    print(shown(f"settings that differ: {', '.join(differ) if differ else 'none'}"))
    for r in data["runs"]:
        final = f"final test loss {r['final']['test_loss']:.2f}" if r["final"] else "no test pass yet"
        ev = r["evaluation"]
        if isinstance(ev, dict) and isinstance(ev.get("nll"), int | float):
            stderr = ev.get("nll_stderr")
            nll = f", NLL {ev['nll']:.2f}" + (f" ± {stderr:.2f}" if isinstance(stderr, int | float) else "")
        else:
            nll = ", not evaluated"
        print(shown(f"  {r['label']}: {r['epochs']} epochs, {final}{nll}"))
    print(shown(f"wrote {path}"))
    return 0
