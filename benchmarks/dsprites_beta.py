"""beta-VAE on dSprites: the trade-off its users want to see, in numbers and in a figure.

Trains the same model with beta = 1, 4 and 16 (the KL weight warmed up from 0 over the first
epoch), then scores each: reconstruction (the test pass's -log p(x|z), nats per image) and KL,
and disentanglement (MIG and the FactorVAE score, `vaelab.disentanglement`). Prints a Markdown
table, writes results.json, and puts the runs' latent traversals side by side in one PNG.

    vaelab data fetch dsprites                                  # generated once, a few seconds
    python benchmarks/dsprites_beta.py --out runs/dsprites-beta # about 10 minutes a beta here

The model: MLP 4096-512-256-10 with ReLU, Bernoulli pixels (dSprites is binary), Adam 5e-4, batch
64, 3 epochs (the beta-VAE paper's MLP is 1200-1200, trained far longer).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import vaelab
from vaelab.config import merge
from vaelab.data import load
from vaelab.disentanglement import disentanglement
from vaelab.plots import write_figures

BETAS = (1.0, 4.0, 16.0)


def config(beta: float, epochs: int):
    return merge(
        vaelab.preset("seed"),
        {
            "data": {"source": "dsprites", "binarize": "none"},
            "model": {"hidden": [512, 256], "latent_dim": 10, "bernoulli_clip": 0.0},
            "train": {
                "epochs": epochs,
                "batch_size": 64,
                "optimizer": "adam",
                "lr": 5e-4,
                "eps": 1e-8,
                "beta": beta,
                "warmup_epochs": 1.0,
                "eval_every": epochs,
            },
        },
        where="dsprites_beta",
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/dsprites-beta"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--betas", type=float, nargs="+", default=list(BETAS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dataset = load("dsprites")
    rows = []
    for beta in args.betas:
        run = args.out / f"beta{beta:g}"
        if not (run / "model.safetensors").exists():
            vaelab.train(config(beta, args.epochs), run, dataset=dataset, log=print)
        model = vaelab.load(run)
        write_figures(run, model=model, dataset=dataset)
        last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
        d = disentanglement(model, dataset)
        rows.append(
            {
                "beta": beta,
                "test_recon": last["test_recon"],
                "test_kl": last["test_kl"],
                "mig": d["mig"]["mig"],
                "factorvae": d["factorvae"]["factorvae"],
                "mig_per_factor": d["mig"]["per_factor"],
                "seconds": sum(
                    json.loads(line)["seconds"] for line in (run / "metrics.jsonl").read_text().splitlines()
                ),
            }
        )
        print(json.dumps(rows[-1]))
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(
        "\n| beta | reconstruction (nats/image) | KL (nats/image) | MIG | FactorVAE score "
        "| training and test min |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['beta']:g} | {r['test_recon']:.1f} | {r['test_kl']:.1f} | {r['mig']:.3f} | "
            f"{r['factorvae']:.3f} | {r['seconds'] / 60:.1f} |"
        )
    side_by_side(
        [args.out / f"beta{b:g}" / "figures" / "traversals.png" for b in args.betas],
        [f"beta = {b:g}" for b in args.betas],
        args.out / "traversals.png",
    )
    print(f"\ntraversals: {args.out / 'traversals.png'}")


def side_by_side(paths: list[Path], titles: list[str], out: Path) -> None:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=40)
    images = [Image.open(p).convert("RGB") for p in paths]
    width, height = sum(i.width for i in images), max(i.height for i in images) + 60
    canvas = Image.new("RGB", (width, height), "white")
    x = 0
    for image, title in zip(images, titles, strict=True):
        canvas.paste(image, (x, 60))
        ImageDraw.Draw(canvas).text((x + image.width // 2, 8), title, fill="black", font=font, anchor="ma")
        x += image.width
    canvas.save(out)


if __name__ == "__main__":
    main()
