"""The readers' question: how many latent dimensions?

Trains the seed's model (MLP 784-256-latent, RMSprop, batch 100) with latent sizes 2, 5, 10, 20 and
50 on dynamically binarized MNIST under one fixed budget (the same number of epochs for each),
evaluates each with `vaelab.evaluate` (importance-weighted log p(x), K samples, on the binarized
test set) and prints a markdown table: latent size, test NLL, ELBO, active dimensions, minutes.
Also writes a plot of NLL and active dimensions against latent size.

    python benchmarks/latent_dims.py                        # 30 epochs each, K = 5000
    python benchmarks/latent_dims.py --epochs 5 --k 500 --limit 2000 --out /tmp/ld   # a quick look

Needs MNIST in the cache (`vaelab data fetch mnist`). Runs one training at a time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import vaelab
from vaelab.config import merge
from vaelab.data import load as load_data
from vaelab.evaluate import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 5, 10, 20, 50])
    parser.add_argument("--epochs", type=int, default=30, help="the budget: epochs per model (default 30)")
    parser.add_argument("--k", type=int, default=5000, help="importance samples (default 5000)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N test images")
    parser.add_argument("--out", default="runs/latent-dims", help="folder for the runs and the plot")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = load_data("mnist")
    rows = []
    for size in args.sizes:
        config = merge(
            vaelab.preset("seed"),
            {
                "data": {"binarize": "dynamic"},
                "model": {"latent_dim": size},
                "train": {"epochs": args.epochs, "seed": 0},
            },
            where="benchmark",
        )
        run_dir = out / f"z{size}"
        started = time.perf_counter()
        if (run_dir / "model.safetensors").exists() and (run_dir / "config.json").exists():
            print(f"latent {size}: reusing {run_dir}")
        else:
            vaelab.train(config, run_dir, dataset=dataset, log=print)
        train_minutes = (time.perf_counter() - started) / 60
        model = vaelab.load(run_dir)
        result = evaluate(model, dataset, k=args.k, limit=args.limit)
        row = {
            "latent": size,
            "nll": result["nll"],
            "nll_stderr": result["nll_stderr"],
            "elbo": result["elbo"],
            "active_dims": result["active_dims"],
            "train_minutes": train_minutes,
            "eval_minutes": result["seconds"] / 60,
        }
        rows.append(row)
        print(json.dumps(row))
    (out / "latent_dims.json").write_text(json.dumps(rows, indent=2))

    print(f"\n{args.epochs} epochs each, K = {args.k}, {result['n_images']} binarized test images\n")
    print("| latent size | test NLL (nats) | ELBO (nats) | active dims | train min | eval min |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['latent']} | {r['nll']:.2f} ± {r['nll_stderr']:.2f} | {r['elbo']:.2f} | "
            f"{r['active_dims']} / {r['latent']} | {r['train_minutes']:.1f} | {r['eval_minutes']:.1f} |"
        )
    plot(rows, out / "latent_dims.png", args.epochs)
    print(f"\nplot: {out / 'latent_dims.png'}")


def plot(rows, path: Path, epochs: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["latent"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    a.errorbar(sizes, [r["nll"] for r in rows], yerr=[r["nll_stderr"] for r in rows], marker="o")
    a.set(xscale="log", xlabel="latent size", ylabel="test NLL (nats, lower is better)")
    a.set_title("importance-weighted -log p(x)")
    b.plot(sizes, [r["active_dims"] for r in rows], marker="o", label="active")
    b.plot(sizes, sizes, ls="--", color="grey", label="all")
    b.set(xscale="log", yscale="log", xlabel="latent size", ylabel="dimensions")
    b.set_title("active dimensions (Var E[z|x] > 0.01)")
    b.legend()
    for ax in (a, b):  # the latent sizes themselves as ticks, no log-scale minor labels
        ax.set_xticks(sizes, [str(v) for v in sizes])
        ax.minorticks_off()
    b.set_yticks(sizes, [str(v) for v in sizes])
    fig.suptitle(f"seed model, dynamically binarized MNIST, {epochs} epochs each")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
