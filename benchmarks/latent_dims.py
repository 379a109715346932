"""The readers' question: how many latent dimensions?

Trains the seed's model (MLP 784-256-latent, RMSprop, batch 100) with latent sizes 2, 5, 10, 20 and
50 on dynamically binarized MNIST under one fixed budget (the same number of epochs for each),
evaluates each with `vaelab.evaluate` (importance-weighted log p(x), K samples, on the binarized
test set, written to each run's evaluation.json), then puts the runs side by side with
`vaelab.compare`: its Markdown table (latent size, test NLL, ELBO, active dimensions, minutes) is
printed and its page written to OUT/compare.html. Also writes a plot of NLL and active dimensions
against latent size.

    python benchmarks/latent_dims.py                        # 30 epochs each, K = 5000
    python benchmarks/latent_dims.py --epochs 5 --k 500 --limit 2000 --out /tmp/ld   # a quick look

Needs MNIST in the cache (`vaelab data fetch mnist`). Runs one training at a time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import vaelab
from vaelab.compare import markdown_table, write_comparison
from vaelab.config import merge
from vaelab.data import load as load_data
from vaelab.evaluate import evaluate, write_evaluation


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
    rows, run_dirs = [], []
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
        if (run_dir / "model.safetensors").exists() and (run_dir / "config.json").exists():
            print(f"latent {size}: reusing {run_dir}")
        else:
            vaelab.train(config, run_dir, dataset=dataset, log=print)
        result = evaluate(vaelab.load(run_dir), dataset, k=args.k, limit=args.limit)
        write_evaluation(run_dir, result)
        run_dirs.append(run_dir)
        rows.append({"latent": size, "nll": result["nll"], "nll_stderr": result["nll_stderr"],
                     "active_dims": result["active_dims"], "eval_minutes": result["seconds"] / 60})
        print(json.dumps(rows[-1]))
    (out / "latent_dims.json").write_text(json.dumps(rows, indent=2))
    page, data = write_comparison(run_dirs, out / "compare.html")
    print(f"\n{args.epochs} epochs each, K = {args.k}, {result['n_images']} binarized test images "
          f"(evaluation: {sum(r['eval_minutes'] for r in rows):.1f} min in all)\n")
    print(markdown_table(data))
    plot(rows, out / "latent_dims.png", args.epochs)
    print(f"\nplot: {out / 'latent_dims.png'}; side by side: {page}")


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
