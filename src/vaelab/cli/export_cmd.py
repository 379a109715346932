"""`vaelab export`: the run's encoder and decoder as ONNX graphs, with a model card."""

from __future__ import annotations

import argparse

from vaelab.cli import add_json_flag, example, print_json, shown


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export the encoder and decoder (ONNX) with a model card",
        description="Write DIR/encoder.onnx (x [N, D] -> mean, log_var), DIR/decoder.onnx "
        "(z [N, latent] -> logits [N, D]) with a dynamic batch size, and DIR/model-card.md "
        "(data, preset, architecture, metrics, how to call them). Needs the onnx and onnxscript "
        "packages (bash scripts/setup.sh export).",
        epilog=example(
            "vaelab export runs/seed --format onnx --out exported/seed\n"
            "vaelab export runs/seed --out exported/seed --json"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN", help="a run directory written by vaelab train")
    p.add_argument("--format", default="onnx", help="export format: onnx (default, the only one)")
    p.add_argument("--out", metavar="DIR", required=True,
                   help="folder to write the files into (an earlier export there is replaced; other files "
                   "of the same names are refused)")
    add_json_flag(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from vaelab.export import export

    result = export(args.run_dir, args.out, format=args.format)
    if args.json:
        print_json(result)
    else:
        print(shown(f"wrote {result['encoder']}, {result['decoder']} and {result['card']}"))
    return 0
