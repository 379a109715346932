"""The seed, the Keras MNIST VAE example, ported to Keras 3: the tool vaelab is measured against.

Not part of vaelab and not run by the tests. It needs Keras 3 and a backend in an environment of
their own (JAX does not belong in vaelab's environment, and Keras' torch backend would want its
own torch):

    python3.11 -m venv .venv-keras
    .venv-keras/bin/pip install keras==3.15.1 "jax[cpu]==0.10.2"   # torch==2.13.0 for --backend torch
    .venv-keras/bin/python benchmarks/keras_seed.py --seeds 0 1 2 3 4     # 50 epochs per seed
    python benchmarks/speed.py --keras-python .venv-keras/bin/python      # speed, side by side

The port keeps the example's model, loss and training: 784-256-2 with ReLU, z sampled with
epsilon_std 1 (in validation too), a sigmoid decoder, 784 * binary_crossentropy + closed-form KL
per image, `optimizer="rmsprop"`, Glorot-uniform weights, batch 100, shuffled, 50 epochs, the
test set as validation data. Keras 3 has no loss function that closes over the model's tensors,
so the KL enters with `add_loss` from a layer: the same sum. The example was written for Keras 1
(`nb_epoch`), whose RMSprop divided by sqrt(v) + 1e-8; Keras 3's divides by sqrt(v + 1e-7), and
so does vaelab's `seed` preset, whose targets come from this Keras 3 port. MNIST is vaelab's
cached copy (`vaelab data fetch mnist`; $VAELAB_HOME, default ~/.cache/vaelab) or --data, uint8
images scaled by 1/255 as the example does.

Prints one JSON line per epoch (`seed`, `epoch`, `seconds`, `loss`, `val_loss`; an epoch's
seconds include its validation pass), then one per seed with its final validation loss, its
median epoch (the first, which compiles, left out) and the process's peak memory so far (with
several seeds, that of the largest run up to then).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
import zipfile
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", default="jax", choices=("jax", "torch", "tensorflow"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed (default 0)")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--data", help="an .npz with x_train and x_test (default: vaelab's MNIST cache)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary line of each seed")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"option --epochs: must be at least 1, not {args.epochs}")
    if args.batch < 1:
        parser.error(f"option --batch: must be at least 1, not {args.batch}")
    return args


def fail(message: str) -> None:
    print(f"keras_seed.py: {message}", file=sys.stderr)
    sys.exit(2)


def load_mnist(path: str | None):
    import numpy as np

    home = Path(os.environ.get("VAELAB_HOME") or "~/.cache/vaelab").expanduser()
    p = Path(path) if path else home / "mnist.npz"
    if not p.is_file():
        fail(f"{p}: no such file" + ("" if path else " (fill it with: vaelab data fetch mnist)"))
    try:
        with np.load(p, allow_pickle=False) as d:
            missing = {"x_train", "x_test"} - set(d.files)
            if missing:
                fail(f"{p}: missing {', '.join(sorted(missing))}")
            x_train, x_test = d["x_train"], d["x_test"]
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        fail(f"{p}: not a readable .npz ({e})")
    if x_train.dtype != np.uint8 or x_test.dtype != np.uint8:
        fail(f"{p}: x_train and x_test must be uint8 images (0-255), not {x_train.dtype}, {x_test.dtype}")
    if x_train.ndim < 2 or x_test.shape[1:] != x_train.shape[1:]:
        fail(f"{p}: x_train {x_train.shape} and x_test {x_test.shape} are not images of one shape")
    # the example's preprocessing: floats in [0, 1], one row of 784 pixels per image
    x_train = x_train.reshape(len(x_train), -1).astype("float32") / 255.0
    x_test = x_test.reshape(len(x_test), -1).astype("float32") / 255.0
    return x_train, x_test


def run(seed: int, args: argparse.Namespace, x_train, x_test) -> dict:
    import keras
    from keras import layers, ops

    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    original_dim, intermediate_dim, latent_dim, epsilon_std = x_train.shape[1], 256, 2, 1.0

    class Sampling(layers.Layer):
        """The example's Lambda: z = z_mean + exp(z_log_var / 2) * epsilon, in training and test."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.seed_generator = keras.random.SeedGenerator(seed)

        def call(self, inputs):
            z_mean, z_log_var = inputs
            epsilon = keras.random.normal(ops.shape(z_mean), stddev=epsilon_std, seed=self.seed_generator)
            return z_mean + ops.exp(z_log_var / 2) * epsilon

    class KLLoss(layers.Layer):
        """The example's kl_loss, averaged over the batch like the example's total loss."""

        def call(self, inputs):
            z_mean, z_log_var = inputs
            kl = -0.5 * ops.sum(1 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var), axis=-1)
            self.add_loss(ops.mean(kl))
            return z_mean

    x = keras.Input(shape=(original_dim,))
    h = layers.Dense(intermediate_dim, activation="relu")(x)
    z_mean = layers.Dense(latent_dim)(h)
    z_log_var = layers.Dense(latent_dim)(h)
    z = Sampling()([KLLoss()([z_mean, z_log_var]), z_log_var])
    h_decoded = layers.Dense(intermediate_dim, activation="relu")(z)
    x_decoded_mean = layers.Dense(original_dim, activation="sigmoid")(h_decoded)
    vae = keras.Model(x, x_decoded_mean)

    def xent_loss(x, x_decoded_mean):
        return original_dim * keras.losses.binary_crossentropy(x, x_decoded_mean)

    vae.compile(optimizer="rmsprop", loss=xent_loss)

    rows = []

    class Log(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            row = {
                "seed": seed,
                "epoch": epoch + 1,
                "seconds": time.perf_counter() - self.started,
                "loss": float(logs["loss"]),
                "val_loss": float(logs["val_loss"]),
            }
            rows.append(row)
            if not args.quiet:
                print(json.dumps(row), flush=True)

    vae.fit(
        x_train,
        x_train,
        shuffle=True,
        epochs=args.epochs,
        batch_size=args.batch,
        validation_data=(x_test, x_test),
        verbose=0,
        callbacks=[Log()],
    )
    seconds = [r["seconds"] for r in rows]
    timed = seconds[1:] or seconds  # the first epoch compiles (XLA on jax)
    return {
        "seed": seed,
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "epochs": args.epochs,
        "batch": args.batch,
        "val_loss": rows[-1]["val_loss"],
        "seconds": statistics.median(timed),
        "per_epoch": seconds,
        "compile_s": max(0.0, seconds[0] - min(timed)),
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.backend  # before keras is imported
    x_train, x_test = load_mnist(args.data)
    try:
        import keras  # noqa: F401
    except ImportError as e:
        fail(f"needs Keras 3 and a backend ({e}); see the set-up in --help")
    for seed in args.seeds:
        print(json.dumps({"summary": run(seed, args, x_train, x_test)}), flush=True)


if __name__ == "__main__":
    main()
