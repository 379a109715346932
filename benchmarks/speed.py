"""Speed of one epoch (train + test pass), side by side in one run, in a way that survives noise.

Measures, each in its own process (so peak memory is its own), in interleaved rounds:
  bound           the seed's matrix products of one epoch, timed alone at the model's shapes: the
                  machine's lower bound for an epoch (everything else is overhead);
  vaelab-fp32     `vaelab.train`, the seed preset (also vaelab-compiled: --compile; vaelab-bf16;
                  vaelab-pytorch: with VAELAB_NATIVE=0, the fused step without its native code);
  reference       the same model written the usual PyTorch way (below): DataLoader over a
                  TensorDataset, per-batch loop, nn.Module, torch.optim.RMSprop, autograd;
  keras-jax       with --keras-python PY: the seed ported to Keras 3 (benchmarks/keras_seed.py)
                  on its JAX backend, run by that interpreter;
  conv-bound      the conv preset's products of one epoch (its convolutions as the matrix
                  products they are: forward, backward to the input and to the weights; its
                  dense layers), timed alone;
                  (each product of a bound is timed by its faster route, MKL's `torch.mm` or
                  oneDNN's; "x MKL bound" is against the same products all through MKL, the
                  route PyTorch takes by default)
  vaelab-conv     `vaelab.train --preset conv`;
  reference-conv  the same convolutional model the usual PyTorch way.
Every kind's seconds per epoch are the median of its epochs after the first (which warms up, or
compiles). Each round runs every kind once, in a rotated order; the first table shows every round
and the median over rounds of the paired ratios: a kind against the bound and against each peer
measured in the same round, so a round where the machine was slow counts for both sides alike; the
second shows each round's paired ratios.

--busy N [N ...]: measure every kind with N other processes keeping cores busy (a plain arithmetic
loop) for the whole of its measurement; with several values (--busy 0 1) each round measures each
kind at each load, and the table adds each kind's slowdown (busy / quiet, paired per round).

Then, with --eval-images N: `vaelab.evaluate.evaluate` (K = 5000) on N test images against its own
bound (the decoder's matrix products for those N * K samples timed alone).

    python benchmarks/speed.py --keras-python .venv-keras/bin/python          # 5 rounds, batch 100
    python benchmarks/speed.py --keras-python .venv-keras/bin/python --busy 0 1
    python benchmarks/speed.py --kinds vaelab-conv --epochs 2 --rounds 3       # the conv preset
    python benchmarks/speed.py --batch 1000 --eval-images 1000 --json out.json

Needs MNIST in the cache (`vaelab data fetch mnist`). Absolute seconds drift on shared machines;
the ratios, measured in the same rounds, are the result.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

EVAL_K = 5000


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_mnist_tensors():
    from vaelab.data import load

    ds = load("mnist")
    x_train = torch.from_numpy(ds.x_train.reshape(len(ds.x_train), -1)).float() / 255
    x_test = torch.from_numpy(ds.x_test.reshape(len(ds.x_test), -1)).float() / 255
    return x_train, x_test


# --- the bound ----------------------------------------------------------------------------------


def product_seconds(m: int, k: int, n: int, repeats: int = 30) -> dict:
    """Seconds of one (m, k) x (k, n) float32 product, the faster of torch's two CPU routes: MKL
    (`torch.mm`, what PyTorch uses by default) and oneDNN (`torch.ops.mkldnn._linear_pointwise`,
    what vaelab's fused step uses for large products). Each timed as the fastest of 3 runs of
    `repeats` products, after a warm-up."""
    a, b, c = torch.rand(m, k), torch.rand(k, n), torch.empty(m, n)
    routes = {"mkl": lambda: torch.mm(a, b, out=c)}
    from vaelab import products

    if products.onednn_available():
        bt = b.t().contiguous()
        routes["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, bt, None, "none", [], "")
    best = {}
    for name, f in routes.items():
        for _ in range(5):
            f()
        runs = []
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(repeats):
                f()
            runs.append((time.perf_counter() - t) / repeats)
        best[name] = min(runs)
    route = min(best, key=best.get)
    return {"seconds": best[route], "route": route, **{f"{r}_s": v for r, v in best.items()}}


def products_bound(
    train: list[tuple[int, int, int]], test: list[tuple[int, int, int]], steps: int, chunks: int
):
    """An epoch's products timed alone: `steps` times the training step's, `chunks` times the test
    pass's, each product by its faster route. Also what MKL alone would give."""
    seconds = mkl = flop = 0.0
    routes = {}
    for shapes, count in ((train, steps), (test, chunks)):
        for m, k, n in shapes:
            r = product_seconds(m, k, n)
            seconds += count * r["seconds"]
            mkl += count * r["mkl_s"]
            flop += count * 2 * m * k * n
            routes[f"{m}x{k}x{n}"] = r["route"]
    return {
        "seconds": seconds,
        "mkl_seconds": mkl,
        "gflop": flop / 1e9,
        "gflop_per_s": flop / seconds / 1e9,
        "routes": routes,
    }


def seed_gemms(
    batch: int, training: bool = True, hidden: int = 256, d: int = 784
) -> list[tuple[int, int, int]]:
    """The seed's large products (rows, inner, columns): forward, the encoder's and decoder's 784 x
    256 layers; backward, both weight gradients and the decoder's input gradient (none for x). The
    latent heads' products (a few thousand multiply-adds) are left out."""
    forward = [(batch, d, hidden), (batch, hidden, d)]
    if not training:
        return forward
    return forward + [(d, batch, hidden), (batch, d, hidden), (hidden, batch, d)]


def bound(batch: int, n_train: int = 60000, n_test: int = 10000):
    """Seconds for the seed's matrix products of one epoch, timed alone (each by its faster route)."""
    return products_bound(
        seed_gemms(batch), seed_gemms(2000, training=False), n_train // batch, n_test // 2000
    )


def eval_bound(n_images: int, k: int, hidden: int = 256, latent: int = 2, d: int = 784):
    """Seconds for the decoder products of evaluating N images with K samples, timed alone (each
    product by its faster route), at the row count the evaluator uses per product."""
    from vaelab.evaluate import CHUNK_VALUES

    rows = CHUNK_VALUES["cpu"] // d
    products = math.ceil(n_images * k / rows)
    r = products_bound([(rows, latent, hidden), (rows, hidden, d)], [], products, 0)
    scale = n_images * k / (products * rows)  # the last product is partly full
    return {**r, "seconds": r["seconds"] * scale, "mkl_seconds": r["mkl_seconds"] * scale}


def run_evaluate(n_images: int, k: int):
    import vaelab
    from vaelab.data import load
    from vaelab.evaluate import evaluate
    from vaelab.models import build_model

    torch.manual_seed(0)
    model = build_model(vaelab.preset("seed").model)  # the seed's shapes; weights do not matter
    result = evaluate(model, load("mnist"), k=k, limit=n_images)
    return {"seconds": result["seconds"], "nll": result["nll"]}


# --- vaelab -----------------------------------------------------------------------------------


def timed(seconds: list[float]) -> dict:
    """Seconds per epoch: the median of the epochs after the first (which warms up or compiles)."""
    rest = seconds[1:] or seconds
    return {"seconds": statistics.median(rest), "per_epoch": seconds, "first_extra_s": seconds[0] - min(rest)}


def run_vaelab(batch: int, epochs: int, precision: str, compile: bool = False, preset: str = "seed"):
    import vaelab
    from vaelab.config import merge

    train = {"epochs": epochs, "precision": precision, "compile": compile}
    if preset == "seed":
        train["batch_size"] = batch
    config = merge(vaelab.preset(preset), {"train": train}, where="benchmark")
    with tempfile.TemporaryDirectory() as tmp:
        result = vaelab.train(config, Path(tmp) / "run")
    return timed([r["seconds"] for r in result.metrics]) | {"test_loss": result.metrics[-1]["test_loss"]}


# --- the reference: the usual PyTorch way -------------------------------------------------------


class ReferenceVAE(torch.nn.Module):
    def __init__(self, d=784, hidden=256, latent=2):
        super().__init__()
        self.fc1 = torch.nn.Linear(d, hidden)
        self.fc_mean = torch.nn.Linear(hidden, latent)
        self.fc_log_var = torch.nn.Linear(hidden, latent)
        self.fc3 = torch.nn.Linear(latent, hidden)
        self.fc4 = torch.nn.Linear(hidden, d)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        mean, log_var = self.fc_mean(h), self.fc_log_var(h)
        z = mean + torch.exp(0.5 * log_var) * torch.randn_like(mean)
        return self.fc4(torch.relu(self.fc3(z))), mean, log_var


def reference_loss(logits, x, mean, log_var):
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="sum")
    kl = -0.5 * torch.sum(1 + log_var - mean.pow(2) - log_var.exp())
    return (bce + kl) / len(x)


def run_reference(batch: int, epochs: int):
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    x_train, x_test = load_mnist_tensors()
    train_loader = DataLoader(TensorDataset(x_train), batch_size=batch, shuffle=True)
    test_loader = DataLoader(TensorDataset(x_test), batch_size=batch)
    model = ReferenceVAE()
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.9, eps=1e-7)
    seconds, test_loss = [], None
    for _ in range(epochs):
        t = time.perf_counter()
        model.train()
        for (x,) in train_loader:
            optimizer.zero_grad()
            logits, mean, log_var = model(x)
            loss = reference_loss(logits, x, mean, log_var)
            loss.backward()
            optimizer.step()
        model.eval()
        total = 0.0
        with torch.no_grad():
            for (x,) in test_loader:
                logits, mean, log_var = model(x)
                total += reference_loss(logits, x, mean, log_var).item() * len(x)
        test_loss = total / len(x_test)
        seconds.append(time.perf_counter() - t)
    return timed(seconds) | {"test_loss": test_loss}


# --- the conv preset: its products alone, and the usual PyTorch way -------------------------------


def conv_gemms(batch: int, training: bool = True) -> list[tuple[int, int, int]]:
    """The conv preset's convolutions and dense layers as matrix products (rows, inner, columns):
    a stride-2 convolution is (B*Ho*Wo, Cin*k*k) x (Cin*k*k, Cout) after im2col, a transposed one
    (B*Hi*Wi, Cin) x (Cin, Cout*k*k) before col2im; training adds the products of the backward
    pass to the input (not for the first layer) and to the weights, with the same arithmetic."""
    layers = [  # (M, K, N, needs the input's gradient)
        (batch * 14 * 14, 1 * 9, 32, False),  # conv 1 -> 32, 28 -> 14
        (batch * 7 * 7, 32 * 9, 64, True),  # conv 32 -> 64, 14 -> 7
        (batch, 64 * 7 * 7, 256, True),  # dense 3136 -> 256
        (batch, 256, 20, True),
        (batch, 256, 20, True),  # the posterior's heads
        (batch, 20, 256, True),  # dense 20 -> 256
        (batch, 256, 64 * 7 * 7, True),  # dense 256 -> 3136
        (batch * 7 * 7, 64, 32 * 16, True),  # transposed conv 64 -> 32, 7 -> 14
        (batch * 14 * 14, 32, 1 * 16, True),  # transposed conv 32 -> 1, 14 -> 28
    ]
    out = []
    for m, k, n, input_grad in layers:
        out.append((m, k, n))  # forward
        if training:
            out.append((k, m, n))  # to the weights
            if input_grad:
                out.append((m, n, k))  # to the input
    return out


def conv_bound(batch: int = 100, n_train: int = 60000, n_test: int = 10000, test_chunk: int = 2000):
    """Seconds for the conv preset's matrix products of one epoch, timed alone (each by its faster route)."""
    steps, chunks = math.ceil(n_train / batch), math.ceil(n_test / test_chunk)
    return products_bound(conv_gemms(batch), conv_gemms(test_chunk, training=False), steps, chunks)


class ReferenceConvVAE(torch.nn.Module):
    """The conv preset's model, written with the usual layers."""

    def __init__(self, latent=20):
        super().__init__()
        nn = torch.nn
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 256),
            nn.ReLU(),
        )
        self.fc_mean, self.fc_log_var = nn.Linear(256, latent), nn.Linear(256, latent)
        self.decoder = nn.Sequential(
            nn.Linear(latent, 256),
            nn.ReLU(),
            nn.Linear(256, 64 * 7 * 7),
            nn.ReLU(),
            nn.Unflatten(1, (64, 7, 7)),
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(32, 1, 4, stride=2, padding=1),
            nn.Flatten(),
        )

    def forward(self, x):
        h = self.encoder(x)
        mean, log_var = self.fc_mean(h), self.fc_log_var(h)
        z = mean + torch.exp(0.5 * log_var) * torch.randn_like(mean)
        return self.decoder(z), mean, log_var


def run_reference_conv(epochs: int, batch: int = 100):
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    x_train, x_test = load_mnist_tensors()
    x_train, x_test = x_train.reshape(-1, 1, 28, 28), torch.bernoulli(x_test.reshape(-1, 1, 28, 28))
    train_loader = DataLoader(TensorDataset(x_train), batch_size=batch, shuffle=True)
    test_loader = DataLoader(TensorDataset(x_test), batch_size=batch)
    model = ReferenceConvVAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    seconds, test_loss = [], None
    for _ in range(epochs):
        t = time.perf_counter()
        model.train()
        for (x,) in train_loader:
            x = torch.bernoulli(x)  # dynamic binarization, as the preset
            optimizer.zero_grad()
            logits, mean, log_var = model(x)
            loss = reference_loss(logits, x.flatten(1), mean, log_var)
            loss.backward()
            optimizer.step()
        model.eval()
        total = 0.0
        with torch.no_grad():
            for (x,) in test_loader:
                logits, mean, log_var = model(x)
                total += reference_loss(logits, x.flatten(1), mean, log_var).item() * len(x)
        test_loss = total / len(x_test)
        seconds.append(time.perf_counter() - t)
    return timed(seconds) | {"test_loss": test_loss}


# --- driver -------------------------------------------------------------------------------------


SEED_KINDS = (
    "bound", "vaelab-fp32", "vaelab-pytorch", "vaelab-compiled", "vaelab-bf16", "reference", "keras-jax"
)
CONV_KINDS = ("conv-bound", "vaelab-conv", "reference-conv")
KINDS = SEED_KINDS + CONV_KINDS
BOUNDS = {"bound", "conv-bound"}
PEERS = {"reference", "keras-jax", "reference-conv", "vaelab-pytorch"}
BUSY_LOOP = "x = 1.0\nwhile True:\n    x = x * 1.0000001 + 1e-9\n"


def bound_of(kind: str) -> str:
    return "conv-bound" if kind in CONV_KINDS else "bound"


def peers_of(kind: str, kinds: list[str]) -> list[str]:
    family = CONV_KINDS if kind in CONV_KINDS else SEED_KINDS
    return [
        p
        for p in ("keras-jax", "reference", "reference-conv", "vaelab-pytorch")
        if p in family and p in kinds and p != kind and (p != "vaelab-pytorch" or kind == "vaelab-fp32")
    ]


def run_keras(python: str, batch: int, epochs: int) -> dict:
    """The Keras 3 port of the seed on JAX, in the interpreter that has Keras (its own venv)."""
    script = Path(__file__).with_name("keras_seed.py")
    cmd = [python, str(script), "--backend", "jax", "--epochs", str(epochs), "--batch", str(batch)]
    done = subprocess.run(cmd + ["--quiet"], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"speed.py: keras-jax failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    try:
        r = json.loads(done.stdout.strip().splitlines()[-1])["summary"]
    except (IndexError, ValueError, KeyError):
        sys.exit(f"speed.py: keras-jax: {script} printed no summary line (is it the repository's?)")
    return timed(r["per_epoch"]) | {"test_loss": r["val_loss"], "peak_mib": r["peak_mib"]}


def worker(kind: str, batch: int, epochs: int, eval_images: int = 0) -> dict:
    if kind == "eval-bound":
        out = eval_bound(eval_images, EVAL_K)
    elif kind == "evaluate":
        out = run_evaluate(eval_images, EVAL_K)
    elif kind == "bound":
        out = bound(batch)
    elif kind == "conv-bound":
        out = conv_bound()
    elif kind == "reference":
        out = run_reference(batch, epochs)
    elif kind == "reference-conv":
        out = run_reference_conv(epochs)
    elif kind == "vaelab-conv":
        out = run_vaelab(batch, epochs, precision="fp32", preset="conv")
    elif kind == "vaelab-compiled":
        out = run_vaelab(batch, epochs, precision="fp32", compile=True)
    elif kind == "vaelab-pytorch":  # (measure() sets VAELAB_NATIVE=0)
        out = run_vaelab(batch, epochs, precision="fp32")
    else:
        out = run_vaelab(batch, epochs, precision=kind.split("-")[1])
    out["peak_mib"] = peak_mib()
    return out


def measure(kind: str, args, busy: int) -> dict:
    """One measurement of `kind` in a process of its own, with `busy` processes loading the cores."""
    loads = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(busy)]
    try:
        epochs = args.conv_epochs if kind in CONV_KINDS else args.epochs
        if kind == "vaelab-bf16":
            epochs = min(epochs, 2)
        if kind == "keras-jax":
            return run_keras(args.keras_python, args.batch, epochs)
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            kind,
            "--batch",
            str(args.batch),
            "--epochs",
            str(epochs),
        ]
        env = {**os.environ, "VAELAB_NATIVE": "0"} if kind == "vaelab-pytorch" else None
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        return json.loads(out.strip().splitlines()[-1])
    finally:
        for p in loads:
            p.kill()
            p.wait()


def paired(results, kind: str, other: str, busy: int, invert: bool = False) -> list[float]:
    """Per round: other / kind (how many times faster `kind` is), or kind / other with `invert`."""
    pairs = zip(results[(kind, busy)], results[(other, busy)], strict=True)
    return [(a["seconds"] / b["seconds"]) if invert else (b["seconds"] / a["seconds"]) for a, b in pairs]


def report(results, kinds: list[str], busy_levels: list[int]) -> None:
    rounds = len(results[(kinds[0], busy_levels[0])])
    for busy in busy_levels:
        print(
            f"\n{'quiet' if busy == 0 else f'with {busy} busy process' + 'es' * (busy > 1)}: seconds per "
            "epoch in each round, their median, and the medians of the paired ratios\n"
        )
        round_heads = " | ".join(f"round {r + 1}" for r in range(rounds))
        columns = "median s/epoch | x bound | x MKL bound | x faster than peers | test loss | peak MiB"
        print(f"| kind | {round_heads} | {columns} |")
        print("|---|" + "---|" * rounds + "---|---|---|---|---|---|")
        for kind in kinds:
            rows = results[(kind, busy)]
            cells = " | ".join(f"{r['seconds']:.3f}" for r in rows)
            med = statistics.median(r["seconds"] for r in rows)
            x_bound = x_mkl = ""
            if kind not in BOUNDS:
                x_bound = f"{statistics.median(paired(results, kind, bound_of(kind), busy, True)):.2f}"
                pairs = zip(rows, results[(bound_of(kind), busy)], strict=True)
                x_mkl = f"{statistics.median(a['seconds'] / b['mkl_seconds'] for a, b in pairs):.2f}"
            elif "mkl_seconds" in rows[0]:
                x_mkl = f"MKL alone: {statistics.median(r['mkl_seconds'] for r in rows):.3f} s"
            faster = (
                ""
                if kind in PEERS | BOUNDS
                else ", ".join(
                    f"{statistics.median(paired(results, kind, p, busy)):.2f} vs {p}"
                    for p in peers_of(kind, kinds)
                )
            )
            loss = f"{rows[-1]['test_loss']:.2f}" if "test_loss" in rows[-1] else ""
            peak = max(r["peak_mib"] for r in rows) if all("peak_mib" in r for r in rows) else float("nan")
            print(f"| {kind} | {cells} | {med:.3f} | {x_bound} | {x_mkl} | {faster} | {loss} | {peak:.0f} |")
    for busy in busy_levels:
        print(
            f"\n{'quiet' if busy == 0 else f'with {busy} busy'}: the paired ratios of each round "
            "(x bound: the kind's seconds over its bound's; vs a peer: the peer's over the kind's)\n"
        )
        print("| kind | against | " + " | ".join(f"round {r + 1}" for r in range(rounds)) + " | median |")
        print("|---|---|" + "---|" * rounds + "---|")
        for kind in (k for k in kinds if k not in PEERS | BOUNDS):
            against = [("x bound", paired(results, kind, bound_of(kind), busy, True))]
            against += [(f"vs {p}", paired(results, kind, p, busy)) for p in peers_of(kind, kinds)]
            for name, ratios in against:
                cells = " | ".join(f"{x:.2f}" for x in ratios)
                print(f"| {kind} | {name} | {cells} | {statistics.median(ratios):.2f} |")
    if len(busy_levels) > 1 and 0 in busy_levels:
        print("\nslowdown under load: busy / quiet seconds per epoch, paired per round\n")
        for busy in (b for b in busy_levels if b):
            print(
                f"| kind (busy {busy}) | "
                + " | ".join(f"round {r + 1}" for r in range(rounds))
                + " | median |"
            )
            print("|---|" + "---|" * rounds + "---|")
            for kind in kinds:
                ratios = [
                    a["seconds"] / b["seconds"]
                    for a, b in zip(results[(kind, busy)], results[(kind, 0)], strict=True)
                ]
                print(
                    f"| {kind} | "
                    + " | ".join(f"{x:.2f}" for x in ratios)
                    + f" | {statistics.median(ratios):.2f} |"
                )


def evaluation_report(eval_images: int) -> dict:
    results = {}
    for kind in ("eval-bound", "evaluate"):
        cmd = [sys.executable, __file__, "--worker", kind, "--eval-images", str(eval_images)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[kind] = json.loads(out.strip().splitlines()[-1])
    b, e = results["eval-bound"], results["evaluate"]
    print(f"\n| evaluate, K = {EVAL_K}, {eval_images} test images | seconds | x bound | peak MiB |")
    print("|---|---|---|---|")
    what = f"bound (decoder products, {b['gflop_per_s']:.0f} GFLOP/s)"
    print(f"| {what} | {b['seconds']:.1f} | 1.00 | {b['peak_mib']:.0f} |")
    print(
        f"| vaelab evaluate | {e['seconds']:.1f} | {e['seconds'] / b['seconds']:.2f} | {e['peak_mib']:.0f} |"
    )
    return results


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=100, help="the seed kinds' batch size (default 100)")
    parser.add_argument(
        "--epochs", type=int, default=3, help="epochs per seed measurement, the first left out"
    )
    parser.add_argument("--conv-epochs", type=int, default=2, help="epochs per conv measurement (default 2)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument(
        "--busy",
        type=int,
        nargs="+",
        default=[0],
        metavar="N",
        help="processes keeping cores busy during each measurement (default 0)",
    )
    parser.add_argument("--eval-images", type=int, default=0, help="test images for the evaluation timing")
    parser.add_argument(
        "--kinds",
        nargs="+",
        default=["vaelab-fp32"],
        choices=KINDS,
        help="what to time besides the bounds and peers (default vaelab-fp32)",
    )
    parser.add_argument(
        "--keras-python",
        metavar="PY",
        help="a Python with Keras 3 and JAX (see benchmarks/keras_seed.py): time the Keras port too",
    )
    parser.add_argument("--json", metavar="FILE", help="also write every round's results as JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return args
    if args.keras_python:
        found = shutil.which(args.keras_python)
        if found is None:
            parser.error(f"--keras-python: {args.keras_python}: no such program")
        args.keras_python = found
    if "keras-jax" in args.kinds and not args.keras_python:
        parser.error("--kinds keras-jax: needs --keras-python PY, a Python with Keras 3 and JAX")
    if min(args.epochs, args.conv_epochs) < 2:
        parser.error("--epochs and --conv-epochs: at least 2 (the first epoch is left out)")
    if args.rounds < 1 or min(args.busy) < 0:
        parser.error("--rounds: at least 1; --busy: at least 0")
    return args


def main() -> None:
    args = parse_args()
    if args.worker:  # one measurement, asked for by the driver (which checked the options)
        print(json.dumps(worker(args.worker, args.batch, args.epochs, args.eval_images)))
        return
    chosen = set(args.kinds) | ({"keras-jax"} if args.keras_python else set())
    if chosen & set(SEED_KINDS):
        chosen |= {"bound", "reference"}
    if chosen & set(CONV_KINDS):
        chosen |= {"conv-bound", "reference-conv"}
    kinds = [k for k in KINDS if k in chosen]
    busy_levels = sorted(set(args.busy))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch}; {args.epochs} "
        f"epochs per seed measurement, {args.conv_epochs} per conv one (the first left out); {args.rounds} "
        f"rounds; busy processes: {', '.join(map(str, busy_levels))}"
    )
    results: dict[tuple[str, int], list[dict]] = {(k, b): [] for k in kinds for b in busy_levels}
    for round_ in range(args.rounds):
        shift = round_ % len(kinds)  # a rotated order: no kind always runs first, or after another
        for kind in kinds[shift:] + kinds[:shift]:
            for busy in busy_levels:
                r = measure(kind, args, busy)
                results[(kind, busy)].append(r)
                print(
                    f"  round {round_ + 1} busy {busy} {kind:<15} {r['seconds']:.3f} s",
                    file=sys.stderr,
                    flush=True,
                )
    report(results, kinds, busy_levels)
    evaluation = evaluation_report(args.eval_images) if args.eval_images else {}
    if args.json:
        out = {f"{k}/busy{b}": v for (k, b), v in results.items()} | {
            f"eval/{k}": v for k, v in evaluation.items()
        }
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
