"""A folder of images larger than a float copy would fit comfortably: 200,000 colour 64 x 64 PNG
files (synthetic: ellipses of random colours, sizes and places on random backgrounds), and one
epoch of the `conv` preset on it, reporting the peak memory against the images' own uint8 size
and the images per second of decoding and of training.

    python benchmarks/big_folder.py --out /tmp/big                 # make the folder (once), then train
    python benchmarks/big_folder.py --out /tmp/big --images 20000  # a quicker look

vaelab decodes the folder with a pool of threads into one uint8 array and keeps it so (a batch
is made float when it is used), so a run needs the images' own size, not four times it.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

SIZE = 64


def make_folder(folder: Path, images: int, seed: int = 0) -> None:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    spec = rng.random((images, 10))  # background and ellipse colour, centre, radii

    def draw(i: int) -> None:
        s = spec[i]
        img = Image.new("RGB", (SIZE, SIZE), tuple(int(v * 255) for v in s[:3]))
        cx, cy, rx, ry = s[6] * SIZE, s[7] * SIZE, 6 + s[8] * 20, 6 + s[9] * 20
        ImageDraw.Draw(img).ellipse(
            (cx - rx, cy - ry, cx + rx, cy + ry), fill=tuple(int(v * 255) for v in s[3:6])
        )
        img.save(folder / f"{i:06d}.png")

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(draw, range(images)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/vaelab-big-folder"))
    parser.add_argument("--images", type=int, default=200_000)
    args = parser.parse_args()
    folder = args.out / f"images-{args.images}"
    if not folder.is_dir():
        started = time.perf_counter()
        make_folder(folder, args.images)
        print(f"made {args.images:,} PNG files in {time.perf_counter() - started:.0f} s")

    import vaelab
    from vaelab.config import merge
    from vaelab.data import load

    started = time.perf_counter()
    dataset = load(folder, channels=3)
    decode_s = time.perf_counter() - started
    uint8_bytes = dataset.x_train.nbytes + dataset.x_test.nbytes
    after_decode = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    config = merge(
        vaelab.preset("conv"),
        {
            "data": {"source": str(folder), "binarize": "none", "channels": 3},
            "model": {"likelihood": "continuous-bernoulli"},
            "train": {"epochs": 1},
        },
        where="big_folder",
    )
    run = args.out / "run"
    result = vaelab.train(config, run, dataset=dataset, log=print)
    train_s = result.metrics[-1]["seconds"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params = sum(p.numel() for p in result.model.parameters()) * 4
    summary = {
        "images": args.images,
        "train_images": len(dataset.x_train),
        "uint8_mib": uint8_bytes / 2**20,
        "decode_s": decode_s,
        "decode_images_per_s": args.images / decode_s,
        "peak_mib_after_decoding": after_decode / 2**20,
        "peak_mib": peak / 2**20,
        "peak_over_uint8": peak / uint8_bytes,
        "model_mib": params / 2**20,
        "epoch_s": train_s,
        "train_images_per_s": len(dataset.x_train) / train_s,
        "test_loss": result.metrics[-1].get("test_loss"),
    }
    print(json.dumps(summary, indent=2))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
