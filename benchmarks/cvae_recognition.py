"""Does a conditional VAE draw the digit it is asked for?

Trains a classifier of MNIST digits independently of any VAE (an MLP 784-256-10 on the 60,000
training images, grey levels), reports its own test accuracy, then asks a cVAE run for N samples
of each label and prints, per label, the fraction the classifier recognises as that label.

    python benchmarks/cvae_recognition.py runs/cvae            # 1000 samples per label
    python benchmarks/cvae_recognition.py runs/cvae --n 200 --json

Needs MNIST in the cache (`vaelab data fetch mnist`) and a run trained with --conditional
(`vaelab train --preset cvae --out runs/cvae`).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

import vaelab
from vaelab.data import load as load_data


def train_classifier(x: torch.Tensor, y: torch.Tensor, epochs: int = 5, seed: int = 0) -> torch.nn.Module:
    """An MLP 784-256-10 trained with Adam on grey-level digits (N, 784) in [0, 1]."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(128):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net.eval()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", help="a conditional run directory")
    parser.add_argument("--n", type=int, default=1000, help="samples per label (default 1000)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    model = vaelab.load(args.run)
    if not model.config.conditional:
        raise SystemExit(f"{args.run}: not a conditional VAE (train with --conditional)")
    mnist = load_data("mnist")
    x = torch.from_numpy(mnist.x_train.reshape(-1, 784)).float() / 255
    y = torch.from_numpy(mnist.y_train.astype(np.int64))
    classifier = train_classifier(x, y)
    x_test = torch.from_numpy(mnist.x_test.reshape(-1, 784)).float() / 255
    y_test = torch.from_numpy(mnist.y_test.astype(np.int64))
    with torch.no_grad():
        accuracy = (classifier(x_test).argmax(1) == y_test).float().mean().item()
        rates = {}
        for label in range(model.config.num_classes):
            predicted = classifier(model.sample(args.n, seed=label, label=label)).argmax(1)
            rates[label] = (predicted == label).float().mean().item()
    result = {
        "run": args.run,
        "classifier_test_accuracy": accuracy,
        "samples_per_label": args.n,
        "recognised": rates,
        "mean": float(np.mean(list(rates.values()))),
        "min": min(rates.values()),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"classifier (MLP 784-256-10, trained on MNIST's 60,000): test accuracy {accuracy:.4f}")
    print("| label | " + " | ".join(str(k) for k in rates) + " | mean |")
    print("|---|" + "---|" * (len(rates) + 1))
    print("| recognised | " + " | ".join(f"{v:.1%}" for v in rates.values()) + f" | {result['mean']:.1%} |")


if __name__ == "__main__":
    main()
