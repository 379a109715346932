"""`vaelab report`: write a run's self-contained HTML report."""

from __future__ import annotations

import argparse

from vaelab.cli import add_json_flag, example, print_json, shown


def add_parser(sub) -> None:
    p = sub.add_parser(
        "report",
        help="write RUN/report.html, one self-contained page about a run",
        description="Write RUN/report.html: a headline of the run's numbers (final test loss, the "
        "evaluation from vaelab evaluate when run, training time), every figure with a caption "
        "saying what to look for, the training curves, and then, folded, the evaluation's every "
        "number, the configuration and the metrics per epoch. One file, no scripts, no network: "
        "figures are embedded. Missing figures are drawn first.",
        epilog=example("vaelab report runs/seed\nvaelab evaluate runs/seed && vaelab report runs/seed"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN", help="a run directory written by vaelab train")
    add_json_flag(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from vaelab.report import write_report

    path = write_report(args.run_dir)
    if args.json:
        print_json({"run_dir": str(args.run_dir), "report": str(path)})
    else:
        print(shown(path))
    return 0
