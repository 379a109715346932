"""The likelihood frontier on two CPU cores: each model family trained for the same hour, then
evaluated with K = 5000 importance samples on all 10,000 binarized test images.

Every family starts from the `benchmark` preset (dynamically binarized MNIST, 400 validation
images, MLP 784-512-256 with ReLU, Adam, batch 100, an exponential decay of the rate from 1e-3 to
1e-4, one hour of training) and changes what makes it that family. A family's `--epochs` is what
fits in the hour at the speed a short pilot measured (so the rate's decay ends with the hour):

    python benchmarks/frontier.py pilot --out runs/frontier          # 2 epochs each: seconds per epoch
    python benchmarks/frontier.py train vae iwae5 --out runs/frontier  # one hour each, one at a time
    python benchmarks/frontier.py evaluate --out runs/frontier        # K = 5000, all test images
    python benchmarks/frontier.py table --out runs/frontier           # the Markdown table

Needs MNIST in the cache (`vaelab data fetch mnist`). Runs one process at a time: the hour is the
machine's, and anything else running on it shortens what each family can do in it. `train` skips
a family whose run has ended and resumes one that was killed mid-hour (`vaelab train --resume`:
the time limit counts the seconds trained before).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

FAMILIES = {  # name -> (what it is, the options that make it, the published number for the family)
    "vae": ("VAE, one stochastic layer", [], "86.76 (Burda et al. 2015)"),
    "iwae5": ("IWAE, k = 5, one layer", ["--objective", "iwae", "--k", "5"], "85.54 (Burda et al. 2015)"),
    "vamp": (
        "VampPrior, one layer",
        ["--prior", "vamp", "--pseudo-inputs", "500"],
        "85.57 (Tomczak & Welling 2018)",
    ),
    "two-layer": (
        "two stochastic layers, bottom-up (64 and 32)",
        [
            "--latent-dim",
            "64",
            "--upper-latents",
            "32",
            "--upper-hidden",
            "128",
            "128",
            "--warmup-epochs",
            "10",
        ],
        "85.33 (VAE) / 82.90 (IWAE k = 50), Burda et al. 2015",
    ),
    "ladder": (
        "ladder, two layers (64 and 32)",
        [
            "--latent-dim",
            "64",
            "--upper-latents",
            "32",
            "--upper-hidden",
            "128",
            "128",
            "--inference",
            "ladder",
            "--warmup-epochs",
            "10",
        ],
        "81.74 (5 layers, Sønderby et al. 2016)",
    ),
    "iaf": (
        "IAF, 4 flow steps on one layer",
        ["--flow-steps", "4", "--flow-hidden", "256"],
        "79.10 (ResNet VAE, Kingma et al. 2016)",
    ),
}
FAMILIES["frontier"] = (  # the preset as a user runs it; its family's published numbers
    "the `frontier` preset (two layers, as above)", ["--preset", "frontier"], FAMILIES["two-layer"][2]
)
HOUR_S = 3600.0
SAFETY = 0.97  # the epochs planned fit in 97 % of the hour: the last epoch ends inside it


def vaelab(*args: str) -> list[str]:
    return [sys.executable, "-m", "vaelab", *args]


def options(name: str) -> list[str]:
    extra = FAMILIES[name][1]
    return extra if "--preset" in extra else ["--preset", "benchmark", *extra]


def pilot(out: Path, names: list[str]) -> None:
    """Two epochs of each family (no figures): its seconds per epoch, written to pilot.json."""
    found = json.loads((out / "pilot.json").read_text()) if (out / "pilot.json").exists() else {}
    for name in names:
        run = out / "pilot" / name
        if not (run / "metrics.jsonl").exists():
            subprocess.run(
                vaelab(
                    "train",
                    *options(name),
                    "--epochs",
                    "2",
                    "--time-limit",
                    "60",
                    "--no-figures",
                    "--out",
                    str(run),
                ),
                check=True,
            )
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        found[name] = rows[-1]["seconds"]  # the second epoch (the first warms up)
        print(f"{name}: {found[name]:.2f} s per epoch -> {planned_epochs(found[name])} epochs in the hour")
    (out / "pilot.json").write_text(json.dumps(found, indent=2) + "\n")


def planned_epochs(seconds_per_epoch: float) -> int:
    return max(1, int(SAFETY * HOUR_S / seconds_per_epoch))


def train(out: Path, names: list[str]) -> None:
    speeds = json.loads((out / "pilot.json").read_text())
    for name in names:
        run = out / name
        if (run / "report.html").exists():  # written when a run ends
            print(f"{name}: {run} has ended; skipped")
            continue
        if (run / "checkpoint").exists():  # a run killed mid-hour (the session ended): go on with it
            subprocess.run(vaelab("train", "--resume", str(run)), check=True)
            continue
        if name == "frontier":  # the preset as a user runs it: its own epochs and hour
            budget = []
        else:
            budget = ["--epochs", str(planned_epochs(speeds[name])), "--time-limit", "60"]
        subprocess.run(vaelab("train", *options(name), *budget, "--out", str(run)), check=True)


def evaluate(out: Path, names: list[str]) -> None:
    for name in names:
        run = out / name
        if (run / "model.safetensors").exists() and not (run / "evaluation.json").exists():
            subprocess.run(vaelab("evaluate", str(run)), check=True)


def table(out: Path, names: list[str]) -> str:
    head = "| family | test NLL (K = 5000) | ELBO | active units per layer | epochs | s / epoch | published |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for name in names:
        run = out / name
        if not (run / "evaluation.json").exists():
            continue
        e = json.loads((run / "evaluation.json").read_text())
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        seconds = sorted(r["seconds"] for r in rows)[len(rows) // 2]
        active = e.get("active_dims_per_layer") or [e["active_dims"]]
        sizes = e.get("latent_sizes") or [e["latent_dim"]]
        units = ", ".join(f"{a} / {s}" for a, s in zip(active, sizes, strict=True))
        lines.append(
            f"| {FAMILIES[name][0]} | {e['nll']:.2f} ± {e['nll_stderr']:.2f} | {e['elbo']:.2f} | {units} | "
            f"{len(rows)} | {seconds:.2f} | {FAMILIES[name][2]} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["pilot", "train", "evaluate", "table"])
    parser.add_argument("names", nargs="*", help=f"families (default: all): {', '.join(FAMILIES)}")
    parser.add_argument("--out", type=Path, default=Path("runs/frontier"))
    args = parser.parse_args()
    names = args.names or list(FAMILIES)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        parser.error(f"unknown family {unknown[0]!r} (known: {', '.join(FAMILIES)})")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.what == "table":
        print(table(args.out, names))
    else:
        {"pilot": pilot, "train": train, "evaluate": evaluate}[args.what](args.out, names)


if __name__ == "__main__":
    main()
