"""Speed of one seed epoch (train + test pass), side by side in one run.

Measures, each in its own process (so peak memory is its own):
  bound      the matrix products one epoch needs, timed alone at the model's shapes: the
             machine's lower bound for an epoch (everything else is overhead);
  vaelab     `vaelab.train` (fp32, fp32 with --compile, bf16): median seconds per epoch from
             metrics.jsonl (the compiled run's first epoch, which compiles, is left out of its
             median and reported apart);
  reference  the same model written the usual PyTorch way (below): DataLoader over a
             TensorDataset, per-batch loop, nn.Module, torch.optim.RMSprop, autograd;
  keras-jax  with --keras-python PY: the seed ported to Keras 3 (benchmarks/keras_seed.py) on
             its JAX backend, run by that interpreter (the first epoch, which compiles, is left
             out of its median, as for the compiled kind).
and prints each with its ratio to the bound and to the reference, and peak memory. Then the
evaluation: `vaelab.evaluate.evaluate` (K = 5000 importance samples) on the first --eval-images
test images against its own bound, the decoder's matrix products for those N * K samples timed
alone at the shapes the evaluator uses.

    python benchmarks/speed.py                    # batch 100 and 1000, 3 epochs, 2 rounds
    python benchmarks/speed.py --batch 100 --rounds 1 --eval-images 0 --json out.json
    python benchmarks/speed.py --kinds vaelab-fp32 vaelab-compiled --eval-images 0
    python benchmarks/speed.py --keras-python .venv-keras/bin/python  # + Keras 3 on JAX

Needs MNIST in the cache (`vaelab data fetch mnist`). Absolute seconds drift on shared machines;
the ratios, measured in the same run, are the result.
"""

from __future__ import annotations

import argparse
import json
import math
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


def bound(batch: int, hidden: int = 256, latent: int = 2, d: int = 784, n_train=60000, n_test=10000):
    """Seconds for the matrix products of one epoch, timed alone (2 repeats, the faster)."""
    b = torch.rand(batch, d)
    w1, w4 = torch.rand(hidden, d), torch.rand(d, hidden)
    h, dl = torch.rand(batch, hidden), torch.rand(batch, d)
    b1, b4 = torch.rand(hidden), torch.rand(d)
    g1, g4 = torch.empty(hidden, d), torch.empty(d, hidden)
    steps, test_batches = n_train // batch, n_test // 2000
    bt, ht = torch.rand(2000, d), torch.rand(2000, hidden)

    def epoch():
        for _ in range(steps):  # forward: 2 big products; backward: 3 (no gradient for x)
            torch.addmm(b1, b, w1.t())
            torch.addmm(b4, h, w4.t())
            torch.mm(dl.t(), h, out=g4)
            torch.mm(dl, w4)
            torch.mm(h.t(), b, out=g1)
        for _ in range(test_batches):
            torch.addmm(b1, bt, w1.t())
            torch.addmm(b4, ht, w4.t())

    epoch()
    times = []
    for _ in range(2):
        t = time.perf_counter()
        epoch()
        times.append(time.perf_counter() - t)
    seconds = min(times)
    flop = 2 * d * hidden * (5 * steps * batch + 2 * test_batches * 2000)
    return {"seconds": seconds, "gflop": flop / 1e9, "gflop_per_s": flop / seconds / 1e9}


def eval_bound(n_images: int, k: int, hidden: int = 256, latent: int = 2, d: int = 784):
    """Seconds for the decoder products of evaluating N images with K samples, timed alone."""
    from vaelab.evaluate import CHUNK_VALUES

    rows = CHUNK_VALUES["cpu"] // d
    z, w3, b3 = torch.randn(rows, latent), torch.randn(hidden, latent), torch.zeros(hidden)
    w4, b4 = torch.randn(d, hidden) * 0.05, torch.zeros(d)
    h, out = torch.empty(rows, hidden), torch.empty(rows, d)
    products = math.ceil(n_images * k / rows)
    torch.addmm(b4, torch.addmm(b3, z, w3.t(), out=h), w4.t(), out=out)
    t = time.perf_counter()
    for _ in range(products):
        torch.addmm(b3, z, w3.t(), out=h)
        torch.addmm(b4, h, w4.t(), out=out)
    seconds = (time.perf_counter() - t) * n_images * k / (products * rows)
    flop = 2 * n_images * k * (latent * hidden + hidden * d)
    return {"seconds": seconds, "gflop": flop / 1e9, "gflop_per_s": flop / seconds / 1e9}


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


def run_vaelab(batch: int, epochs: int, precision: str, compile: bool = False):
    import vaelab
    from vaelab.config import merge

    config = merge(
        vaelab.preset("seed"),
        {"train": {"epochs": epochs, "batch_size": batch, "precision": precision, "compile": compile}},
        where="benchmark",
    )
    with tempfile.TemporaryDirectory() as tmp:
        result = vaelab.train(config, Path(tmp) / "run")
    seconds = [r["seconds"] for r in result.metrics]
    timed = seconds[1:] if compile else seconds  # the first compiled epoch compiles
    out = {
        "seconds": statistics.median(timed),
        "per_epoch": seconds,
        "test_loss": result.metrics[-1]["test_loss"],
    }
    if compile:
        out["compile_s"] = seconds[0] - min(timed)
    return out


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
    return {"seconds": statistics.median(seconds), "per_epoch": seconds, "test_loss": test_loss}


# --- driver -------------------------------------------------------------------------------------


KINDS = ("bound", "vaelab-fp32", "vaelab-compiled", "vaelab-bf16", "reference", "keras-jax")


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
    return {k: r[k] for k in ("seconds", "per_epoch", "compile_s", "peak_mib")} | {"test_loss": r["val_loss"]}


def worker(kind: str, batch: int, epochs: int, eval_images: int = 0) -> dict:
    if kind == "eval-bound":
        out = eval_bound(eval_images, EVAL_K)
    elif kind == "evaluate":
        out = run_evaluate(eval_images, EVAL_K)
    elif kind == "bound":
        out = bound(batch)
    elif kind == "reference":
        out = run_reference(batch, epochs)
    elif kind == "vaelab-compiled":
        out = run_vaelab(batch, epochs, precision="fp32", compile=True)
    else:
        out = run_vaelab(batch, epochs, precision=kind.split("-")[1])
    out["peak_mib"] = peak_mib()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per measurement (bf16: at most 2)")
    parser.add_argument(
        "--rounds", type=int, default=2, help="interleaved rounds; each kind keeps its fastest"
    )
    parser.add_argument(
        "--eval-images", type=int, default=1000, help="test images for the evaluation timing (0: skip)"
    )
    parser.add_argument(
        "--kinds",
        nargs="+",
        default=[k for k in KINDS if k != "keras-jax"],
        choices=KINDS,
        help="what to time (the bound and the reference are always timed; keras-jax needs --keras-python)",
    )
    parser.add_argument(
        "--keras-python",
        metavar="PY",
        help="a Python with Keras 3 and JAX (see benchmarks/keras_seed.py): also time the Keras port",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # one measurement, asked for by the driver below (which checked the options)
        print(json.dumps(worker(args.worker, args.batch[0], args.epochs, args.eval_images)))
        return
    if args.keras_python and "keras-jax" not in args.kinds:
        args.kinds.append("keras-jax")
    if "keras-jax" in args.kinds and not args.keras_python:
        parser.error("--kinds keras-jax: needs --keras-python PY, a Python with Keras 3 and JAX")
    if args.keras_python:
        found = shutil.which(args.keras_python)
        if found is None:
            parser.error(f"--keras-python: {args.keras_python}: no such program")
        args.keras_python = found
    compiling = [k for k in ("vaelab-compiled", "keras-jax") if k in args.kinds]
    if compiling and args.epochs < 2:
        parser.error(f"--epochs: {compiling[0]} needs at least 2 (the first one compiles)")

    kinds = [k for k in KINDS if k in args.kinds or k in ("bound", "reference")]
    results = {}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.epochs} epochs each "
        f"(bf16: at most 2), fastest of {args.rounds} interleaved rounds"
    )
    # Rounds interleave the kinds, and each kind keeps its fastest round: the machine's speed
    # drifts, and a kind measured only while a neighbour was busy would be misjudged.
    for round_ in range(args.rounds):
        for batch in args.batch:
            for kind in kinds:
                epochs = min(args.epochs, 2) if kind == "vaelab-bf16" else args.epochs
                if kind == "keras-jax":
                    r = run_keras(args.keras_python, batch, epochs)
                else:
                    cmd = [sys.executable, __file__, "--worker", kind, "--batch", str(batch)]
                    out = subprocess.run(
                        cmd + ["--epochs", str(epochs)], check=True, capture_output=True, text=True
                    ).stdout
                    r = json.loads(out.strip().splitlines()[-1])
                old = results.get((batch, kind))
                if old is None or r["seconds"] < old["seconds"]:
                    results[(batch, kind)] = r
                if old is not None and "compile_s" in r:  # the slowest compile (a cold cache)
                    results[(batch, kind)]["compile_s"] = max(old["compile_s"], r["compile_s"])
                print(
                    f"  round {round_ + 1} batch {batch:>5} {kind:<12} {r['seconds']:.3f} s", file=sys.stderr
                )

    print()
    print("| batch | what | s / epoch | x bound | x faster than reference | test loss | peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for batch in args.batch:
        b = results[(batch, "bound")]["seconds"]
        ref = results[(batch, "reference")]["seconds"]
        for kind in kinds:
            r = results[(batch, kind)]
            loss = f"{r['test_loss']:.2f}" if "test_loss" in r else ""
            print(
                f"| {batch} | {kind} | {r['seconds']:.3f} | {r['seconds'] / b:.2f} | "
                f"{ref / r['seconds']:.2f} | {loss} | {r['peak_mib']:.0f} |"
            )
        for kind in ("vaelab-compiled", "keras-jax"):
            if kind in kinds:
                c = results[(batch, kind)]["compile_s"]
                what = f"{kind}: compile (the first epoch's extra, slowest round)"
                print(f"|  | {what} | {c:.1f} s |  |  |  |  |")
        print(
            f"|  | matmul throughput | {results[(batch, 'bound')]['gflop_per_s']:.0f} GFLOP/s |  |  |  |  |"
        )
    if args.eval_images:
        for kind in ("eval-bound", "evaluate"):
            cmd = [sys.executable, __file__, "--worker", kind, "--eval-images", str(args.eval_images)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[("eval", kind)] = json.loads(out.strip().splitlines()[-1])
        b, e = results[("eval", "eval-bound")], results[("eval", "evaluate")]
        print()
        print(f"| evaluate, K = {EVAL_K}, {args.eval_images} test images | seconds | x bound | peak MiB |")
        print("|---|---|---|---|")
        print(
            f"| bound (decoder products, {b['gflop_per_s']:.0f} GFLOP/s) | {b['seconds']:.1f} | 1.00 | "
            f"{b['peak_mib']:.0f} |"
        )
        print(
            f"| vaelab evaluate | {e['seconds']:.1f} | {e['seconds'] / b['seconds']:.2f} | "
            f"{e['peak_mib']:.0f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({f"{k[0]}/{k[1]}": v for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
