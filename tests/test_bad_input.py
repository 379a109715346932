"""Every kind of bad input gets one line naming the file or option, exit code 2, and nothing written.

Each case builds its bad input under a fresh working directory (relative paths, so the messages
are the same on every machine), runs the real command line in-process, and checks:
- exit code 2 and exactly one line on stderr, no traceback, naming what is wrong;
- the whole temporary tree (inputs, working directory, `$VAELAB_HOME`) is unchanged: no run
  directory, no cache file, no half-written output;
- the message is the one `docs/bad-input.md` shows for that case.

Regenerate the table of docs/bad-input.md with `.venv/bin/python tests/test_bad_input.py`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import permissions_as_for_a_user

import vaelab
from vaelab.cli import VERBS, main
from vaelab.config import merge

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-input.md"


# --- inputs the cases start from -----------------------------------------------------------


def good_arrays(n_train: int = 20, n_test: int = 5, size: int = 28) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train).astype(np.int64),
        "x_test": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test).astype(np.int64),
    }


def write_npz(path: Path, **changes) -> Path:
    """A valid .npz in Keras' layout, with `changes` (None removes a key)."""
    arrays = {**good_arrays(), **changes}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def idx_bytes(array: np.ndarray, *, type_code: int = 0x08, dims: tuple[int, ...] | None = None) -> bytes:
    dims = array.shape if dims is None else dims
    header = bytes([0, 0, type_code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    return header + array.astype(np.uint8).tobytes()


def write_idx_folder(folder: Path, **replace: bytes) -> Path:
    """The four IDX files of a valid split; `replace` maps a role (train_images...) to raw bytes."""
    arrays = good_arrays()
    files = {
        "train_images": ("train-images-idx3-ubyte", arrays["x_train"]),
        "train_labels": ("train-labels-idx1-ubyte", arrays["y_train"]),
        "test_images": ("t10k-images-idx3-ubyte", arrays["x_test"]),
        "test_labels": ("t10k-labels-idx1-ubyte", arrays["y_test"]),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for role, (name, array) in files.items():
        data = replace.get(role, idx_bytes(array))
        if data is not None:
            (folder / name).write_bytes(data)
    return folder


def write_png(path: Path, size: tuple[int, int] = (28, 28)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(len(str(path))).integers(0, 256, size[::-1], dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A real run directory (1 epoch, tiny model) that cases copy and damage."""
    root = tmp_path_factory.mktemp("trained")
    data = write_npz(root / "data.npz", **good_arrays(n_train=100, n_test=20))
    config = merge(
        vaelab.preset("seed"),
        {"data": {"source": str(data)}, "model": {"hidden": [16]},
         "train": {"epochs": 1, "batch_size": 50}},
        where="test",
    )
    vaelab.train(config, root / "run")
    return root / "run"


def copy_run(trained: Path, cwd: Path, name: str = "runs/seed") -> Path:
    dest = cwd / name
    shutil.copytree(trained, dest)
    return dest


def _second_run(run: Path) -> None:
    shutil.copytree(run, run.parent / "other")


def malicious_checkpoint(path: Path) -> None:
    """A checkpoint whose unpickling would create the file PWNED (a stand-in for any code)."""

    class Payload:
        def __reduce__(self):  # shutil.copyfile: one global, named alike by every Python version
            return (shutil.copyfile, (os.devnull, "PWNED"))

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": Payload(), "epoch": 1, "step": 0}, path)


# --- the cases -----------------------------------------------------------------------------

Setup = Callable[[Path, Path], list[str]]  # (cwd, trained run) -> argv


@dataclass(frozen=True)
class Case:
    id: str
    what: str  # what is wrong, for the table
    setup: Setup
    needles: tuple[str, ...]  # words the message must hold (besides the doc's exact text)


def _user_files_in_out(cwd: Path) -> None:
    write_npz(cwd / "data.npz")
    (cwd / "mine").mkdir()
    for name in ("report.html", "metrics.jsonl", "model.safetensors"):  # names a run would write
        (cwd / "mine" / name).write_text("the user's own\n")


def _train(*extra: str) -> list[str]:
    return ["train", "--out", "out", *extra]


def _data(make: Callable[[Path], object], source: str, out: str = "out") -> Setup:
    def setup(cwd: Path, trained: Path) -> list[str]:
        make(cwd)
        return ["train", "--out", out, "--data", source]

    return setup


def _with_data(make: Callable[[Path], object], source: str, *extra: str) -> Setup:
    def setup(cwd: Path, trained: Path) -> list[str]:
        make(cwd)
        return ["train", "--out", "out", "--data", source, *extra]

    return setup


def _config(name: str, text: str) -> Setup:
    def setup(cwd: Path, trained: Path) -> list[str]:
        (cwd / name).write_text(text)
        return _train("--config", name)

    return setup


def _run(argv: list[str], damage: Callable[[Path], object] = lambda run: None, copy: bool = True) -> Setup:
    def setup(cwd: Path, trained: Path) -> list[str]:
        if copy:
            damage(copy_run(trained, cwd))
        else:
            damage(cwd)
        return list(argv)

    return setup


def _args(*argv: str) -> Setup:
    return lambda cwd, trained: list(argv)


def _edit_config(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        d = json.loads((run / "config.json").read_text())
        change(d)
        (run / "config.json").write_text(json.dumps(d))

    return damage


def _other_architecture(run: Path) -> None:
    from safetensors.torch import save_file

    from vaelab.config import ModelConfig
    from vaelab.models import build_model

    other = build_model(ModelConfig(hidden=(8,), latent_dim=3))
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, run / "model.safetensors")


def _corrupt_weights(run: Path) -> None:
    data = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(data[: len(data) // 2])


def _notes(cwd: Path) -> None:
    (cwd / "notes.txt").write_text("not a run\n")


def _nan_weights(run: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(run / "model.safetensors")
    state["decoder.out.bias"] = state["decoder.out.bias"] * float("nan")
    save_file(state, run / "model.safetensors")


def _damaged_metrics(run: Path) -> None:
    (run / "metrics.jsonl").write_text("[1, 2]\n")


def _mixed_sizes(cwd: Path) -> None:
    for i in range(4):
        write_png(cwd / "imgs" / f"{i}.png")
    write_png(cwd / "imgs" / "big.png", (32, 32))


def _unreadable_image(cwd: Path) -> None:
    for i in range(4):
        write_png(cwd / "imgs" / f"{i}.png")
    (cwd / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)


def _file_under_out(cwd: Path) -> None:
    (cwd / "notes.txt").write_text("not a folder\n")
    write_npz(cwd / "data.npz")


def _read_only_parent(cwd: Path) -> None:
    write_npz(cwd / "data.npz")
    (cwd / "locked").mkdir()
    (cwd / "locked").chmod(0o500)


def _lock_folder_in_out(cwd: Path) -> None:
    write_npz(cwd / "data.npz")
    (cwd / "busy" / ".lock").mkdir(parents=True)


def _users_lock_in_out(cwd: Path) -> None:
    write_npz(cwd / "data.npz")
    (cwd / "busy").mkdir()
    (cwd / "busy" / ".lock").write_text("my own notes\n")


def _link_for(name: str) -> Callable[[Path], None]:
    """The run's folder `name` replaced by a link to a folder of the user's beside the runs."""

    def damage(run: Path) -> None:
        mine = run.parent.parent / "mine"
        mine.mkdir()
        (mine / "notes.txt").write_text("my own notes\n")
        shutil.rmtree(run / name, ignore_errors=True)
        (run / name).symlink_to(mine.resolve())

    return damage


def _edit_metrics(text: Callable[[str], str]) -> Callable[[Path], None]:
    """Rewrite metrics.jsonl's text."""

    def damage(run: Path) -> None:
        (run / "metrics.jsonl").write_text(text((run / "metrics.jsonl").read_text()))

    return damage


def _folder_for(name: str) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        (run / name).unlink(missing_ok=True)
        (run / name).mkdir()

    return damage


def _data_resized(run: Path) -> None:
    """The run's data beside it (a path the table can show), and config.json asking for 14x14."""
    d = json.loads((run / "config.json").read_text())
    shutil.copy(d["data"]["source"], run.parent.parent / "data.npz")
    d["data"].update(source="data.npz", image_size=14)
    (run / "config.json").write_text(json.dumps(d))


def _overflowing_weights(run: Path) -> None:
    """Finite weights, 1e30 times too large: every product overflows."""
    from safetensors.torch import load_file, save_file

    state = load_file(run / "model.safetensors")
    save_file({k: v * 1e30 for k, v in state.items()}, run / "model.safetensors")


def _nan_in_checkpoint(part: str) -> Callable[[Path], None]:
    """A checkpoint whose weights (part "model") or optimizer state ("optimizer") hold a NaN."""

    def damage(run: Path) -> None:
        path = run / "checkpoint" / "state.pt"
        state = torch.load(path, weights_only=True)
        if part == "model":
            state["model"]["decoder.out.bias"][0] = float("nan")
        else:
            next(iter(state["optimizer"]["state"].values()))["square_avg"][0] = float("nan")
        torch.save(state, path)

    return damage


def _half_a_test_pass(text: str) -> str:  # a test row without its KL
    return text.replace('"test_kl": ', '"_": ', 1)


def _huge_test_loss(text: str) -> str:  # valid JSON: its integers have no limit
    return text.replace('"test_loss": ', f'"test_loss": {10**400}, "_": ', 1)


HUGE = "9" * 23  # beyond the 64-bit integers torch takes sizes as


CASES = [
    # options and presets
    Case("unknown-preset", "unknown preset", _args(*_train("--preset", "nope")), ("--preset", "'nope'")),
    Case("unknown-option", "unknown option", _args(*_train("--frobnicate")), ("--frobnicate",)),
    Case("negative-epochs", "negative epochs", _args(*_train("--epochs", "-1")), ("--epochs", "-1")),
    Case("zero-batch-size", "zero batch size", _args(*_train("--batch-size", "0")), ("--batch-size", "0")),
    Case("latent-size-0", "latent size 0", _args(*_train("--latent-dim", "0")), ("--latent-dim",)),
    Case("lr-zero", "learning rate 0", _args(*_train("--lr", "0")), ("--lr",)),
    Case("lr-nan", "learning rate NaN", _args(*_train("--lr", "nan")), ("--lr", "nan")),
    Case("lr-inf", "learning rate infinite", _args(*_train("--lr", "inf")), ("--lr", "inf")),
    Case("lr-not-a-number", "learning rate not a number", _args(*_train("--lr", "fast")), ("--lr", "fast")),
    Case("hidden-0", "a hidden size of 0", _args(*_train("--hidden", "256", "0")), ("--hidden", "[256, 0]")),
    Case("hidden-not-int", "a hidden size that is not an integer", _args(*_train("--hidden", "big")),
         ("--hidden", "big")),
    Case("binarize-unknown", "an unknown choice", _args(*_train("--binarize", "maybe")),
         ("--binarize", "maybe")),
    Case("image-size-0", "image size 0", _args(*_train("--image-size", "0")), ("--image-size",)),
    Case("eval-every-0", "test pass every 0 epochs", _args(*_train("--eval-every", "0")), ("--eval-every",)),
    Case("seed-negative", "negative seed", _args(*_train("--seed", "-1")), ("--seed", "-1")),
    Case("beta-negative", "negative beta", _args(*_train("--beta", "-0.5")), ("--beta",)),
    Case("k-0", "0 samples per image", _args(*_train("--k", "0")), ("--k",)),
    Case("patience-without-validation", "early stopping without a validation set",
         _args(*_train("--patience", "3")), ("--patience", "--validation")),
    Case("iwae-with-beta", "a KL weight with the iwae objective",
         _args(*_train("--objective", "iwae", "--beta", "2")), ("--beta", "iwae")),
    Case("warmup-with-iwae", "a KL warm-up with the iwae objective",
         _args(*_train("--objective", "iwae", "--warmup-epochs", "2")), ("--warmup-epochs", "iwae")),
    Case("gaussian-std-unused", "--gaussian-std with a Bernoulli likelihood",
         _args(*_train("--gaussian-std", "0.5")), ("--gaussian-std", "--likelihood gaussian")),
    Case("rmsprop-alpha-unused", "--rmsprop-alpha with Adam",
         _args(*_train("--optimizer", "adam", "--rmsprop-alpha", "0.8")),
         ("--rmsprop-alpha", "--optimizer rmsprop")),
    Case("rmsprop-alpha-out-of-range", "--rmsprop-alpha of 1 or more",
         _args(*_train("--rmsprop-alpha", "1.0")), ("--rmsprop-alpha", "(0, 1)")),
    Case("bernoulli-clip-out-of-range", "--bernoulli-clip of 0.5 or more",
         _args(*_train("--bernoulli-clip", "0.5")), ("--bernoulli-clip", "[0, 0.5)")),
    Case("bernoulli-clip-unused", "--bernoulli-clip with a Gaussian likelihood",
         _args(*_train("--likelihood", "gaussian", "--bernoulli-clip", "0.01")),
         ("--bernoulli-clip", "--likelihood bernoulli")),
    Case("binarize-seed-unused", "--binarize-seed without static binarization",
         _args(*_train("--binarize-seed", "3")), ("--binarize-seed", "--binarize static")),
    Case("checkpoint-every-zero", "--checkpoint-every 0", _args(*_train("--checkpoint-every", "0")),
         ("--checkpoint-every", "at least 1")),
    Case("lr-final-unused", "--lr-final with a constant rate", _args(*_train("--lr-final", "1e-4")),
         ("--lr-final", "--lr-schedule")),
    Case("conv-channels-unused", "--conv-channels of an MLP", _args(*_train("--conv-channels", "4", "8")),
         ("--conv-channels", "--architecture conv")),
    Case("out-empty", "--out ''", _args("train", "--out", ""), ("--out", "empty")),
    Case("time-limit-0", "time limit 0", _args(*_train("--time-limit", "0")), ("--time-limit",)),
    Case("abbreviated-option", "an abbreviated option (--epsilon for --epsilon-std)",
         _args(*_train("--epsilon", "0.5")), ("--epsilon",)),
    Case("validation-too-large", "a validation set as large as the training set",
         _with_data(lambda c: write_npz(c / "d.npz"), "d.npz", "--validation", "20"), ("--validation", "20")),
    Case("conditional-without-labels", "--conditional on data without labels",
         _with_data(lambda c: write_npz(c / "d.npz", y_train=None, y_test=None), "d.npz", "--conditional"),
         ("--conditional", "d.npz", "no labels")),
    # config files
    Case("config-missing", "--config file missing", _args(*_train("--config", "nope.toml")),
         ("--config", "nope.toml", "no such file")),
    Case("config-unparseable", "--config file unparseable", _config("bad.toml", "[train\nepochs = 3\n"),
         ("bad.toml", "not valid TOML")),
    Case("config-json-unparseable", "--config JSON file unparseable", _config("bad.json", "{epochs: 3}"),
         ("bad.json", "not valid JSON")),
    Case("config-unknown-key", "--config file with an unknown key", _config("c.toml", "[train]\nepoch = 3\n"),
         ("c.toml", "'train.epoch'")),
    Case("config-wrong-type", "--config file with a wrong type", _config("c.toml", '[train]\nepochs = "3"\n'),
         ("c.toml", "train.epochs", "integer")),
    Case("config-impossible-value", "--config file with an impossible value",
         _config("c.toml", "[train]\nepochs = 0\n"), ("c.toml", "--epochs")),
    Case("config-unknown-preset", "--config file naming an unknown preset",
         _config("c.toml", 'preset = "nope"\n'), ("c.toml", "'nope'")),
    Case("config-unknown-preset-beside-flag", "--config file naming an unknown preset, --preset given",
         lambda cwd, trained: [*_config("c.toml", 'preset = "nope"\n')(cwd, trained), "--preset", "seed"],
         ("c.toml", "'nope'")),
    Case("config-setting-unused", "--config file with a setting that has no effect",
         _config("c.toml", "[model]\ngaussian_std = 0.5\n"),
         ("c.toml", "model.gaussian_std", 'model.likelihood = "gaussian"')),
    Case("config-newer-version", "--config file from a newer vaelab", _config("c.toml", "version = 99\n"),
         ("c.toml", "newer")),
    Case("config-wrong-suffix", "--config file neither TOML nor JSON", _config("c.yaml", "epochs: 3\n"),
         ("c.yaml", ".toml or .json")),
    Case("config-not-object", "--config JSON that is not an object", _config("c.json", "[1, 2]"),
         ("c.json", "object")),
    # data paths
    Case("data-missing", "data path that does not exist", _args(*_train("--data", "nope.npz")),
         ("nope.npz", "no such file")),
    Case("data-empty-folder", "data folder that is empty", _data(lambda c: (c / "empty").mkdir(), "empty"),
         ("empty", "empty folder")),
    Case("data-file-not-folder", "a file where a data folder is expected",
         _data(lambda c: (c / "notes.txt").write_text("x"), "notes.txt"), ("notes.txt", "not an .npz")),
    Case("data-one-idx-file", "one IDX file instead of its folder",
         _data(lambda c: write_idx_folder(c / "idx"), "idx/train-images-idx3-ubyte"),
         ("train-images-idx3-ubyte", "folder")),
    # IDX
    Case("idx-wrong-magic", "IDX with a wrong magic number",
         _data(lambda c: write_idx_folder(c / "idx", train_images=b"\x1f\x00\x08\x03" + b"\0" * 12), "idx"),
         ("idx/train-images-idx3-ubyte", "bad magic number")),
    Case("idx-wrong-type", "IDX of int32 elements",
         _data(lambda c: write_idx_folder(
             c / "idx", test_labels=idx_bytes(good_arrays()["y_test"], type_code=0x0C)), "idx"),
         ("idx/t10k-labels-idx1-ubyte", "0x0c")),
    Case("idx-truncated", "IDX with a truncated body",
         _data(lambda c: write_idx_folder(c / "idx", train_images=idx_bytes(good_arrays()["x_train"])[:-100]),
               "idx"), ("idx/train-images-idx3-ubyte", "truncated")),
    Case("idx-truncated-gzip", "gzip-compressed IDX cut short",
         _data(lambda c: (write_idx_folder(c / "idx", train_images=None),
                          (c / "idx" / "train-images-idx3-ubyte.gz").write_bytes(
                              gzip.compress(idx_bytes(good_arrays()["x_train"]))[:-30])), "idx"),
         ("idx/train-images-idx3-ubyte.gz", "gzip")),
    Case("idx-wrong-sizes", "IDX declaring fewer images than it holds",
         _data(lambda c: write_idx_folder(
             c / "idx", train_images=idx_bytes(good_arrays()["x_train"], dims=(20, 28, 27))), "idx"),
         ("idx/train-images-idx3-ubyte", "more data than its header declares")),
    Case("idx-missing-file", "IDX folder lacking a file",
         _data(lambda c: write_idx_folder(c / "idx", test_labels=None), "idx"),
         ("idx", "missing t10k-labels")),
    Case("idx-label-count", "IDX labels not matching the images in number",
         _data(lambda c: write_idx_folder(
             c / "idx", train_labels=idx_bytes(good_arrays()["y_train"][:15])), "idx"),
         ("idx", "20 images", "15 labels")),
    # .npz
    Case("npz-missing-key", ".npz without x_test",
         _data(lambda c: write_npz(c / "d.npz", x_test=None, y_test=None), "d.npz"), ("d.npz", "'x_test'")),
    Case("npz-wrong-dtype", ".npz with text images",
         _data(lambda c: write_npz(c / "d.npz", x_test=np.full((5, 28, 28), "a")), "d.npz"),
         ("d.npz", "'x_test'", "dtype")),
    Case("npz-nan", ".npz with NaN pixels",
         _data(lambda c: write_npz(c / "d.npz", x_train=np.full((20, 28, 28), np.nan, np.float32)), "d.npz"),
         ("d.npz", "'x_train'", "NaN")),
    Case("npz-above-1", ".npz floats in [0, 1.5], not whole",
         _data(lambda c: write_npz(c / "d.npz", x_train=np.linspace(0, 1.5, 20 * 784, dtype=np.float32)
                                   .reshape(20, 28, 28)), "d.npz"), ("d.npz", "'x_train'", "[0, 1.5]")),
    Case("npz-above-255", ".npz integers above 255",
         _data(lambda c: write_npz(c / "d.npz", x_test=np.full((5, 28, 28), 300, np.int32)), "d.npz"),
         ("d.npz", "'x_test'", "[0, 255]")),
    Case("npz-negative", ".npz with negative pixels",
         _data(lambda c: write_npz(c / "d.npz", x_test=np.full((5, 28, 28), -1, np.int16)), "d.npz"),
         ("d.npz", "'x_test'", "-1")),
    Case("npz-label-count", ".npz labels not matching the images in number",
         _data(lambda c: write_npz(c / "d.npz", y_train=np.zeros(19, np.int64)), "d.npz"),
         ("d.npz", "'y_train'", "19 labels")),
    Case("npz-wrong-shape", ".npz images with 2 dimensions",
         _data(lambda c: write_npz(c / "d.npz", x_train=np.zeros((20, 784), np.uint8)), "d.npz"),
         ("d.npz", "'x_train'", "(20, 784)")),
    Case("npz-split-sizes", ".npz train 28x28 but test 32x32",
         _data(lambda c: write_npz(c / "d.npz", x_test=np.zeros((5, 32, 32), np.uint8)), "d.npz"),
         ("d.npz", "28x28", "32x32")),
    Case("npz-not-zip", ".npz that is not a zip archive",
         _data(lambda c: (c / "d.npz").write_bytes(b"PK\x03\x04 this is not a zip"), "d.npz"),
         ("d.npz", "not a readable .npz")),
    # image folders
    Case("images-mixed-sizes", "images of mixed sizes", _data(_mixed_sizes, "imgs"),
         ("imgs", "differ in size", "--image-size")),
    Case("image-unreadable", "an unreadable image file", _data(_unreadable_image, "imgs"),
         ("imgs/broken.png", "cannot be read")),
    # run directories
    Case("sample-not-a-run", "sample on a folder that is not a run",
         _run(["sample", "notarun"], lambda c: (c / "notarun").mkdir(), copy=False),
         ("notarun", "not a run directory")),
    Case("sample-no-such-run", "sample on a path that does not exist", _args("sample", "runs/nope"),
         ("runs/nope", "no such run")),
    Case("sample-corrupt-weights", "corrupt model.safetensors",
         _run(["sample", "runs/seed"], _corrupt_weights), ("runs/seed/model.safetensors", "safetensors")),
    Case("sample-nan-weights", "model.safetensors holding NaN", _run(["sample", "runs/seed"], _nan_weights),
         ("runs/seed/model.safetensors", "decoder.out.bias", "NaN")),
    Case("sample-n-too-many", "sample -n too many for one picture",
         _run(["sample", "runs/seed", "-n", "100000000"]), ("-n", "10000")),
    Case("sample-seed-too-large", "sample --seed beyond 32 bits",
         _run(["sample", "runs/seed", "--seed", "99999999999999999999"]), ("--seed",)),
    Case("plot-seed-negative", "plot --seed -1", _run(["plot", "runs/seed", "--seed", "-1"]), ("--seed",)),
    Case("plot-figure-is-a-folder", "plot where a figure's file is a folder",
         _run(["plot", "runs/seed"], lambda r: (r / "figures" / "manifold.png").mkdir(parents=True)),
         ("runs/seed/figures/manifold.png", "is a folder")),
    Case("explore-host-without-serve", "explore --host without --serve",
         _run(["explore", "runs/seed", "--host", "0.0.0.0"]), ("--host", "--serve")),
    Case("plot-damaged-metrics", "plot of a run whose metrics.jsonl is damaged",
         _run(["plot", "runs/seed"], _damaged_metrics), ("runs/seed/metrics.jsonl", "line 1")),
    Case("sample-pickle-as-weights", "model.safetensors that is a pickle",
         _run(["sample", "runs/seed"], lambda r: malicious_checkpoint(r / "model.safetensors")),
         ("runs/seed/model.safetensors", "safetensors")),
    Case("sample-other-architecture", "model.safetensors of another architecture",
         _run(["sample", "runs/seed"], _other_architecture),
         ("runs/seed/model.safetensors", "do not fit")),
    Case("sample-no-weights", "run without model.safetensors",
         _run(["sample", "runs/seed"], lambda r: (r / "model.safetensors").unlink()),
         ("runs/seed", "no model.safetensors")),
    Case("sample-newer-config", "config.json from a newer vaelab",
         _run(["sample", "runs/seed"], _edit_config(lambda d: d.update(version=99))),
         ("runs/seed/config.json", "newer")),
    Case("sample-config-not-json", "config.json that is not JSON",
         _run(["sample", "runs/seed"], lambda r: (r / "config.json").write_text("{")),
         ("runs/seed/config.json", "not valid JSON")),
    Case("sample-config-unknown-key", "config.json with an unknown key",
         _run(["sample", "runs/seed"], _edit_config(lambda d: d["model"].update(width=3))),
         ("runs/seed/config.json", "'model.width'")),
    Case("sample-config-no-model", "config.json without its model section",
         _run(["sample", "runs/seed"], _edit_config(lambda d: d.pop("model"))),
         ("runs/seed/config.json", "'model'")),
    Case("sample-run-is-a-file", "sample on a file, not a run",
         _run(["sample", "notes.txt"], _notes, copy=False),
         ("notes.txt", "is a file")),
    Case("explore-port-without-serve", "explore --port without --serve",
         _run(["explore", "runs/seed", "--port", "8000"]), ("--port", "--serve")),
    Case("sample-n-0", "sample -n 0", _run(["sample", "runs/seed", "-n", "0"]), ("-n", "0")),
    Case("sample-label-unconditional", "sample --label of a model without labels",
         _run(["sample", "runs/seed", "--label", "3"]), ("--label", "not a conditional")),
    Case("sample-out-not-png", "sample --out that is not .png",
         _run(["sample", "runs/seed", "--out", "s.jpg"]), ("--out", "s.jpg")),
    Case("sample-out-under-file", "sample --out inside a file",
         _run(["sample", "runs/seed", "--out", "runs/seed/config.json/s.png"]),
         ("--out", "runs/seed/config.json", "is a file")),
    Case("plot-not-a-run", "plot on a folder that is not a run",
         _run(["plot", "notarun"], lambda c: (c / "notarun").mkdir(), copy=False),
         ("notarun", "not a run directory")),
    Case("evaluate-not-a-run", "evaluate on a folder that is not a run",
         _run(["evaluate", "notarun"], lambda c: (c / "notarun").mkdir(), copy=False),
         ("notarun", "not a run directory")),
    Case("resume-finished", "--resume of a finished run", _run(["train", "--resume", "runs/seed"]),
         ("runs/seed", "already trained for 1 epoch;")),
    Case("resume-not-a-run", "--resume of a folder that is not a run",
         _run(["train", "--resume", "notarun"], lambda c: (c / "notarun").mkdir(), copy=False),
         ("notarun", "not a run directory")),
    Case("resume-missing", "--resume of a path that does not exist", _args("train", "--resume", "runs/nope"),
         ("runs/nope", "no such run")),
    Case("resume-newer-config", "--resume of a run from a newer vaelab",
         _run(["train", "--resume", "runs/seed", "--epochs", "2"],
              _edit_config(lambda d: d.update(version=2))),
         ("runs/seed/config.json", "newer")),
    Case("resume-no-checkpoint", "--resume of a run without a checkpoint",
         _run(["train", "--resume", "runs/seed", "--epochs", "2"], lambda r: shutil.rmtree(r / "checkpoint")),
         ("runs/seed", "nothing to resume")),
    Case("resume-malicious-checkpoint", "--resume of a run whose checkpoint is a malicious pickle",
         _run(["train", "--resume", "runs/seed", "--epochs", "2"],
              lambda r: malicious_checkpoint(r / "checkpoint" / "state.pt")),
         ("runs/seed/checkpoint/state.pt", "not a readable checkpoint")),
    Case("resume-nan-weights", "--resume of a checkpoint whose weights hold NaN",
         _run(["train", "--resume", "runs/seed", "--epochs", "2"], _nan_in_checkpoint("model")),
         ("runs/seed/checkpoint/state.pt", "decoder.out.bias", "NaN")),
    Case("resume-nan-optimizer", "--resume of a checkpoint whose optimizer state holds NaN",
         _run(["train", "--resume", "runs/seed", "--epochs", "2"], _nan_in_checkpoint("optimizer")),
         ("runs/seed/checkpoint/state.pt", "optimizer state", "NaN")),
    Case("resume-with-out", "--resume together with --out",
         _run(["train", "--resume", "runs/seed", "--out", "other"]), ("--resume", "--out")),
    Case("resume-changes-lr", "--resume with a changed setting",
         _run(["train", "--resume", "runs/seed", "--lr", "0.1"]), ("--lr", "config.json")),
    Case("out-holds-a-run", "--out that already holds a run", _run(["train", "--out", "runs/seed"]),
         ("runs/seed", "already holds a run")),
    Case("out-holds-user-files", "--out a folder of the user's files, not a run",
         _data(_user_files_in_out, "data.npz", out="mine"), ("--out", "mine", "report.html", "not a run")),
    Case("out-is-a-file", "--out that is a file",
         _data(_file_under_out, "data.npz", out="notes.txt"), ("--out", "notes.txt", "is a file")),
    Case("out-under-a-file", "--out unwritable (inside a file)",
         _data(_file_under_out, "data.npz", out="notes.txt/run"), ("--out", "notes.txt", "is a file")),
    Case("out-read-only", "--out unwritable (read-only folder)",
         _data(_read_only_parent, "data.npz", out="locked/run"), ("--out", "locked", "permission")),
    Case("device-cuda-missing", "--device cuda on a machine without a GPU",
         _with_data(lambda cwd: write_npz(cwd / "data.npz"), "data.npz", "--device", "cuda"),
         ("--device", "cuda")),
    Case("data-fetch-unknown", "data fetch of an unknown data set", _args("data", "fetch", "cifar"),
         ("cifar",)),
    Case("data-info-bad-npz", "data info on an .npz with NaN",
         _run(["data", "info", "d.npz"],
              lambda c: write_npz(c / "d.npz", x_test=np.full((5, 28, 28), np.nan)), copy=False),
         ("d.npz", "NaN")),
    Case("hidden-huge", "a hidden size beyond any machine", _args(*_train("--hidden", HUGE)),
         ("--hidden", "1,000,000")),
    Case("k-huge", "samples per image beyond any machine", _args(*_train("--k", HUGE)), ("--k", "1,000,000")),
    Case("data-info-image-size-huge", "data info with an image size beyond any machine",
         _run(["data", "info", "d.npz", "--image-size", HUGE], lambda c: write_npz(c / "d.npz"), copy=False),
         ("--image-size", "4096")),
    Case("data-info-empty", "data info of an empty name", _args("data", "info", ""),
         ("NAME_OR_PATH", "empty")),
    Case("compare-one-run", "compare with one run", _run(["compare", "runs/seed"]), ("two runs",)),
    Case("compare-the-same-run-twice", "compare a run with itself",
         _run(["compare", "runs/seed", "runs/../runs/seed"]), ("runs/seed", "the same run")),
    Case("compare-not-a-run", "compare with a folder that is not a run",
         _run(["compare", "runs/seed", "notarun"], lambda run: (run.parent.parent / "notarun").mkdir()),
         ("notarun", "not a run directory")),
    Case("compare-out-is-a-users-file", "compare --out naming a file of the user's",
         _run(["compare", "runs/seed", "runs/other", "--out", "notes.html"],
              lambda run: (_second_run(run), (run.parent.parent / "notes.html").write_text("mine"))),
         ("--out", "notes.html", "not a page vaelab compare wrote")),
    Case("compare-out-is-a-folder", "compare --out naming a folder",
         _run(["compare", "runs/seed", "runs/other", "--out", "runs"], _second_run), ("--out", "folder")),
    Case("evaluate-disentanglement-without-factors", "evaluate --disentanglement on data without factors",
         _run(["evaluate", "runs/seed", "-k", "2", "--limit", "3", "--disentanglement"]),
         ("--disentanglement", "factors")),
    Case("free-bits-one-layer", "--free-bits for a one-layer Gaussian model",
         _args(*_train("--free-bits", "0.5")), ("--free-bits", "one-layer")),
    Case("free-bits-iwae", "--free-bits with the iwae objective",
         _args(*_train("--upper-latents", "5", "--free-bits", "0.5", "--objective", "iwae")),
         ("--free-bits", "iwae")),
    Case("upper-hidden-alone", "--upper-hidden without --upper-latents",
         _args(*_train("--upper-hidden", "64")), ("--upper-hidden", "--upper-latents")),
    Case("flow-hidden-alone", "--flow-hidden without --flow-steps",
         _args(*_train("--flow-hidden", "64")), ("--flow-hidden", "--flow-steps")),
    Case("flow-with-layers", "--flow-steps with --upper-latents",
         _args(*_train("--flow-steps", "2", "--upper-latents", "5")),
         ("--flow-steps", "one stochastic layer")),
    Case("hierarchy-conv", "--upper-latents with --architecture conv",
         _args(*_train("--upper-latents", "5", "--architecture", "conv")), ("--upper-latents", "MLP")),
    Case("config-preset-not-a-name", "--config file whose preset is a list",
         _config("c.toml", 'preset = ["seed"]\n'), ("c.toml", "preset")),
    Case("config-binarize-seed-negative", "--config file with a negative binarization seed",
         _config("c.toml", '[data]\nbinarize = "static"\nbinarize_seed = -1\n'),
         ("c.toml", "--binarize-seed")),
    Case("conditional-without-test-labels", "--conditional on an .npz without y_test",
         _with_data(lambda cwd: write_npz(cwd / "d.npz", y_test=None), "d.npz", "--conditional"),
         ("--conditional", "y_test")),
    Case("npz-two-channels", "an .npz of 2-channel images",
         _data(lambda cwd: write_npz(cwd / "d.npz", x_train=np.zeros((20, 2, 28, 28), np.uint8),
                                     x_test=np.zeros((5, 2, 28, 28), np.uint8)), "d.npz"),
         ("d.npz", "2 channels")),
    Case("out-lock-is-a-folder", "--out holding a folder named .lock",
         _data(_lock_folder_in_out, "data.npz", out="busy"), ("busy/.lock", "not a lock file")),
    Case("out-lock-not-vaelabs", "--out holding a .lock file of the user's",
         _data(_users_lock_in_out, "data.npz", out="busy"), ("busy/.lock", "not a lock vaelab wrote")),
    Case("plot-figures-a-link", "plot a run whose figures folder is a link to another folder",
         _run(["plot", "runs/seed"], _link_for("figures")), ("runs/seed/figures", "is a link")),
    Case("resume-checkpoint-a-link", "--resume where the checkpoint folder is a link to another folder",
         _run(["train", "--resume", "runs/seed", "--epochs", "2"], _link_for("checkpoint")),
         ("runs/seed/checkpoint", "is a link")),
    Case("evaluate-result-a-folder", "evaluate a run where evaluation.json is a folder",
         _run(["evaluate", "runs/seed", "-k", "2"], _folder_for("evaluation.json")),
         ("runs/seed/evaluation.json", "not a file")),
    Case("export-out-empty", "export --out ''", _run(["export", "runs/seed", "--out", ""]),
         ("--out", "empty")),
    Case("resume-weights-a-folder", "--resume where model.safetensors is a folder",
         _run(["train", "--resume", "runs/seed", "--epochs", "2"], _folder_for("model.safetensors")),
         ("runs/seed/model.safetensors", "not a file")),
    Case("resume-report-a-folder", "--resume where report.html is a folder",
         _run(["train", "--resume", "runs/seed", "--epochs", "2"], _folder_for("report.html")),
         ("runs/seed/report.html", "not a file")),
    Case("plot-data-changed", "plot a run whose config.json now resizes the data",
         _run(["plot", "runs/seed"], _data_resized), ("data.npz", "1x14x14", "config.json")),
    Case("plot-metrics-huge-number", "plot a run whose metrics.jsonl holds 10**400",
         _run(["plot", "runs/seed"], _edit_metrics(_huge_test_loss)),
         ("metrics.jsonl", "line 1", "too large")),
    Case("plot-metrics-half-a-test-pass", "plot a run whose metrics.jsonl has a test loss without its KL",
         _run(["plot", "runs/seed"], _edit_metrics(_half_a_test_pass)), ("metrics.jsonl", "'test_kl'")),
    Case("evaluate-k-huge", "evaluate with more importance samples than could ever finish",
         _run(["evaluate", "runs/seed", "-k", HUGE]), ("--importance-samples", "1,000,000")),
    Case("plot-weights-overflow", "plot a run whose weights' products overflow",
         _run(["plot", "runs/seed"], _overflowing_weights), ("runs/seed/model.safetensors", "infinite")),
    Case("evaluate-weights-overflow", "evaluate a run whose weights' products overflow",
         _run(["evaluate", "runs/seed", "-k", "10", "--limit", "5"], _overflowing_weights),
         ("runs/seed/model.safetensors", "infinite")),
]
CASE_IDS = [c.id for c in CASES]
assert len(set(CASE_IDS)) == len(CASE_IDS)


def _skip_reason(case: Case) -> str | None:
    if case.id == "device-cuda-missing" and torch.cuda.is_available():
        return "this machine has a CUDA device"
    verb = case.id.split("-")[0]
    if verb in ("plot", "evaluate"):
        from vaelab.cli import _verb_module

        if verb not in VERBS or _verb_module(verb) is None:
            return f"the '{verb}' command is not part of this checkout yet"
    return None


# --- running and checking ------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, str]:
    """Every folder and file under root with its content hash (and mode): what 'nothing written' means."""
    tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            path = Path(dirpath, name)
            tree[str(path.relative_to(root)) + "/"] = oct(path.stat().st_mode)
        for name in filenames:
            path = Path(dirpath, name)
            tree[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return tree


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse errors exit from inside parse_args
        return e.code


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    """A working directory and an empty $VAELAB_HOME, both under tmp_path."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("VAELAB_HOME", str(home))
    monkeypatch.chdir(cwd)
    return cwd


def refusal(case: Case, root: Path, cwd: Path, trained: Path, capsys) -> str:
    """Run a case; check exit 2, one stderr line and an unchanged tree; return the message."""
    argv = case.setup(cwd, trained)
    capsys.readouterr()
    before = snapshot(root)
    code = run_cli(argv)
    out, err = capsys.readouterr()
    assert code == 2, (argv, code, out, err)
    lines = err.splitlines()
    assert len(lines) == 1, (argv, err)
    assert "Traceback" not in err
    for needle in case.needles:
        assert needle in lines[0], (needle, lines[0])
    assert snapshot(root) == before, f"{argv} wrote or changed files"
    assert not (cwd / "out").exists()
    assert not (cwd / "PWNED").exists(), "a pickle was loaded"
    return lines[0]


def documented_messages() -> dict[str, str]:
    """{case id: message} from the table in docs/bad-input.md."""
    rows = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`") and cells[0] != "`id`":
            rows[cells[0].strip("`")] = cells[3].strip("`")
    return rows


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_bad_input_is_refused_with_one_line_and_nothing_written(
    case, workspace, trained_run, capsys, monkeypatch
):
    reason = _skip_reason(case)
    if reason:
        pytest.skip(reason)
    if case.id == "out-read-only":
        permissions_as_for_a_user(monkeypatch)
    message = refusal(case, workspace.parent, workspace, trained_run, capsys)
    documented = documented_messages()
    assert case.id in documented, f"docs/bad-input.md has no row for {case.id}"
    assert message == documented[case.id], (
        "docs/bad-input.md shows another message; if the new one is right, regenerate the table "
        "with `.venv/bin/python tests/test_bad_input.py`")


@pytest.mark.parametrize("verb", ["sample", "explore", "export", "train-config"])
def test_a_file_name_too_long_is_one_line(verb, workspace, trained_run, capsys):
    """A name over the 255 bytes a file name may have: the system's reason in one line, exit 2."""
    run = copy_run(trained_run, workspace)
    name = "a" * 300
    argv = {
        "sample": ["sample", str(run), "--out", name + ".png"],
        "explore": ["explore", str(run), "--out", name + ".html"],
        "export": ["export", str(run), "--out", name],
        "train-config": ["train", "--out", "out", "--config", name + ".toml"],
    }[verb]
    before = snapshot(workspace.parent)
    capsys.readouterr()
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert name in err and "too long" in err, err
    assert snapshot(workspace.parent) == before


def test_the_table_covers_every_kind_the_issue_names():
    assert len(CASES) >= 24
    assert set(documented_messages()) == set(CASE_IDS)


def test_mnist_cache_untouched_when_options_are_bad(workspace, capsys):
    """With the default data (MNIST) a bad option is refused before anything is fetched."""
    home = Path(os.environ["VAELAB_HOME"])
    for argv in (["train", "--epochs", "0"], ["train", "--out", "x", "--hidden", "0"],
                 ["train", "--resume", "nowhere"]):
        assert run_cli(argv) == 2
    assert list(home.iterdir()) == []
    assert list(workspace.iterdir()) == []


def test_bad_input_through_a_real_process(tmp_path):
    """`python -m vaelab` behaves the same: exit 2, one line, no traceback, nothing written."""
    import subprocess

    env = {**os.environ, "VAELAB_HOME": str(tmp_path / "home")}
    argv = ["train", "--out", "out", "--data", "missing.npz"]
    done = subprocess.run([sys.executable, "-m", "vaelab", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done
    assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --- the table of docs/bad-input.md --------------------------------------------------------


# Messages of cases that cannot run on every machine (a verb not yet in this checkout): what a
# user gets, written by hand.
DOC_ONLY = {
    "evaluate-not-a-run": "vaelab evaluate: error: notarun: not a run directory (no config.json)",
}


def _markdown_table() -> str:
    """Run every case and print the table rows (used to write docs/bad-input.md)."""
    import contextlib
    import io
    import shlex
    import tempfile

    rows = ["| id | what is wrong | command | message (stderr, exit code 2) | exit |",
            "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trained = tmp / "trained"
        trained.mkdir()
        data = write_npz(trained / "data.npz", **good_arrays(n_train=100, n_test=20))
        config = merge(vaelab.preset("seed"), {"data": {"source": str(data)}, "model": {"hidden": [16]},
                                               "train": {"epochs": 1, "batch_size": 50}}, where="doc")
        vaelab.train(config, trained / "run")
        for case in CASES:
            cwd = tmp / case.id / "cwd"
            cwd.mkdir(parents=True)
            os.environ["VAELAB_HOME"] = str(tmp / case.id / "home")
            os.chdir(cwd)
            argv = case.setup(cwd, trained / "run")
            if case.id in DOC_ONLY and _skip_reason(case):
                message, code = DOC_ONLY[case.id], 2  # cannot be produced here; what a user sees
            else:
                err = io.StringIO()
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
                        pytest.MonkeyPatch.context() as patch:
                    if case.id == "out-read-only":
                        permissions_as_for_a_user(patch)
                    code = run_cli(argv)
                message = err.getvalue().strip()
            rows.append(f"| `{case.id}` | {case.what} | `vaelab {shlex.join(argv)}` | `{message}` | {code} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(_markdown_table())
