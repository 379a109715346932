"""The PyTorch example's VAE (pytorch/examples, vae/main.py), as its code does it, for side-by-side
numbers with vaelab's `pytorch-example` preset.

The example's algorithm on MNIST: 784-400-20 with ReLU, `fc21`/`fc22` heads, z always sampled,
a sigmoid decoder 20-400-784, loss = summed `binary_cross_entropy` + KL per batch, Adam 1e-3
(PyTorch's defaults), batch 128 for training and testing, both shuffled, 10 epochs, 64 samples
drawn from the prior after each epoch; the test loss is the summed loss over the test set
divided by its size. The random draws come in the example's order, so a seed gives the example's
run. What differs: vaelab's cached MNIST (`vaelab data fetch mnist`) as tensors in a
TensorDataset instead of torchvision's files (the same images, scaled to [0, 1] as ToTensor
does), and no images are written.

    python benchmarks/pytorch_example.py --seeds 1 2 3 4 5          # the example's default seed is 1
    python benchmarks/pytorch_example.py --vaelab --seeds 1 2 3 4 5  # vaelab's preset, same seeds

Prints one JSON line per run: the seed, the final test loss and the seconds per epoch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class VAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 400)
        self.fc21 = nn.Linear(400, 20)
        self.fc22 = nn.Linear(400, 20)
        self.fc3 = nn.Linear(20, 400)
        self.fc4 = nn.Linear(400, 784)

    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu, logvar):
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def decode(self, z):
        h3 = F.relu(self.fc3(z))
        return torch.sigmoid(self.fc4(h3))

    def forward(self, x):
        mu, logvar = self.encode(x.view(-1, 784))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


def loss_function(recon_x, x, mu, logvar):
    bce = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + kld


def run_example(seed: int, epochs: int) -> dict:
    from speed import load_mnist_tensors  # benchmarks/speed.py, beside this file

    torch.manual_seed(seed)
    x_train, x_test = load_mnist_tensors()
    train_loader = DataLoader(TensorDataset(x_train), batch_size=128, shuffle=True)
    test_loader = DataLoader(TensorDataset(x_test), batch_size=128, shuffle=True)  # as the example
    model = VAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    seconds = []
    for _ in range(epochs):
        started = time.perf_counter()
        model.train()
        for (data,) in train_loader:
            optimizer.zero_grad()
            recon_batch, mu, logvar = model(data)
            loss = loss_function(recon_batch, data, mu, logvar)
            loss.backward()
            optimizer.step()
        model.eval()
        test_loss = 0.0
        with torch.no_grad():
            for (data,) in test_loader:
                recon_batch, mu, logvar = model(data)
                test_loss += loss_function(recon_batch, data, mu, logvar).item()
        test_loss /= len(test_loader.dataset)
        seconds.append(time.perf_counter() - started)
        with torch.no_grad():  # the example's samples after each epoch (not saved): the same draws
            model.decode(torch.randn(64, 20))
    return {"seed": seed, "tool": "example", "test_loss": test_loss, "seconds": statistics.median(seconds)}


def run_vaelab(seed: int, epochs: int) -> dict:
    import vaelab
    from vaelab.config import merge

    config = merge(
        vaelab.preset("pytorch-example"), {"train": {"seed": seed, "epochs": epochs}}, where="benchmark"
    )
    with tempfile.TemporaryDirectory() as tmp:
        result = vaelab.train(config, Path(tmp) / "run")
    last = result.metrics[-1]
    seconds = statistics.median(m["seconds"] for m in result.metrics)
    return {"seed": seed, "tool": "vaelab", "test_loss": last["test_loss"], "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="one run per seed (default 1)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--vaelab", action="store_true", help="run vaelab's pytorch-example preset instead")
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error(f"option --epochs: must be at least 1, not {args.epochs}")
    losses = []
    for seed in args.seeds:
        r = (run_vaelab if args.vaelab else run_example)(seed, args.epochs)
        losses.append(r["test_loss"])
        print(json.dumps(r), flush=True)
    if len(losses) > 1:
        sd = statistics.stdev(losses)
        print(json.dumps({"mean": statistics.mean(losses), "sd": sd, "se": sd / len(losses) ** 0.5}))


if __name__ == "__main__":
    main()
