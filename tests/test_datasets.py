"""Data sets by name: Fashion-MNIST from Debian's package (or a folder like it, or the mirrors),
its checksums and class names, and the one-line refusal when no source has it; dSprites' factor
grid and rendering; TensorBoard's event files read back with TensorBoard's own reader."""

from __future__ import annotations

import gzip
import hashlib
import json

import numpy as np
import pytest
import torch
from conftest import synthetic_digits

import vaelab
from vaelab.cli import main
from vaelab.config import merge
from vaelab.data import dsprites, fashion
from vaelab.errors import DataError


def idx_file(array: np.ndarray) -> bytes:
    dims = array.shape
    header = bytes([0, 0, 0x08, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def tiny_fashion(tmp_path, monkeypatch):
    """A folder laid out as Debian's package, of 20 + 10 images, with vaelab pointed at it and its
    checksums and counts patched in (the real files are checked in the next test)."""
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (20, 28, 28)),
        "y_train": np.arange(20) % 10,
        "x_test": rng.integers(0, 256, (10, 28, 28)),
        "y_test": np.arange(10) % 10,
    }
    names = dict(zip(arrays, fashion.RAW_SHA256, strict=True))
    folder = tmp_path / "debian"
    folder.mkdir()
    sums = {}
    for key, name in names.items():
        raw = idx_file(arrays[key])
        (folder / name).write_bytes(gzip.compress(raw))
        sums[name] = hashlib.sha256(raw).hexdigest()
    monkeypatch.setenv("VAELAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(fashion.FOLDER_ENV, str(folder))
    monkeypatch.setattr(fashion, "RAW_SHA256", sums)
    monkeypatch.setattr(fashion, "SHAPES", {k: v.shape for k, v in arrays.items()})
    monkeypatch.setattr(fashion, "PER_CLASS", {"y_train": 2, "y_test": 1})
    monkeypatch.setattr(fashion, "MIRRORS", ())
    return folder


def test_fashion_mnist_comes_from_debians_folder_with_its_class_names(tiny_fashion, capsys):
    ds = vaelab.data.load("fashion-mnist")
    assert ds.x_train.shape == (20, 28, 28) and ds.classes[7] == "Sneaker"
    assert fashion.cache_path().is_file()  # cached: the next load reads the cache
    assert main(["data", "info", "fashion-mnist", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["classes"][9] == "Ankle boot" and info["train_label_counts"]["Sneaker"] == 2


def test_a_changed_file_in_the_folder_is_refused(tiny_fashion):
    name = "t10k-labels-idx1-ubyte.gz"
    (tiny_fashion / name).write_bytes(gzip.compress(idx_file(np.zeros(10))))
    with pytest.raises(DataError, match="not Fashion-MNIST's"):
        vaelab.data.load("fashion-mnist")


def test_without_any_source_one_line_names_the_debian_package(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    monkeypatch.setenv("VAELAB_HOME", str(home))
    monkeypatch.setenv(fashion.FOLDER_ENV, str(tmp_path / "nowhere"))
    monkeypatch.setattr(fashion, "MIRRORS", ("http://127.0.0.1:9/",))  # nothing listens there
    before = sorted(home.rglob("*")) if home.exists() else []
    assert main(["train", "--data", "fashion-mnist", "--epochs", "1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "apt-get install dataset-fashion-mnist" in err
    assert not (tmp_path / "run").exists()
    assert (sorted(home.rglob("*")) if home.exists() else []) == before


@pytest.mark.skipif(
    not fashion.DEBIAN_DIR.is_dir(),
    reason="Debian's package dataset-fashion-mnist is not installed (apt-get install it)",
)
def test_the_real_fashion_mnist_from_debians_package(tmp_path, monkeypatch):
    monkeypatch.setenv("VAELAB_HOME", str(tmp_path))
    monkeypatch.delenv(fashion.FOLDER_ENV, raising=False)
    ds = vaelab.data.load("fashion-mnist")
    assert ds.x_train.shape == (60_000, 28, 28) and ds.x_test.shape == (10_000, 28, 28)
    assert np.bincount(ds.y_test).tolist() == [1000] * 10 and ds.classes[0] == "T-shirt/top"


def test_the_dsprites_grid_has_one_image_per_combination_and_even_counts():
    f = dsprites.factor_indices()
    assert len(f) == dsprites.COUNT == 737_280
    assert len(np.unique(f, axis=0)) == dsprites.COUNT  # every combination once
    for k, size in enumerate(dsprites.FACTOR_SIZES):
        assert np.bincount(f[:, k]).tolist() == [dsprites.COUNT // size] * size
    assert f[:3, 4].tolist() == [0, 1, 2] and f[32, 3] == 1  # the last factor fastest


def test_sprites_grow_with_scale_turn_with_orientation_and_are_the_same_every_time():
    for shape in range(3):
        areas = [dsprites.sprite(shape, s, 0.3).sum() for s in dsprites.SCALES]
        assert all(a < b for a, b in zip(areas, areas[1:], strict=False))
        assert np.array_equal(dsprites.sprite(shape, 0.8, 1.0), dsprites.sprite(shape, 0.8, 1.0))
    ellipse = dsprites.sprite(1, 1.0, 0.0)
    turned = dsprites.sprite(1, 1.0, np.pi / 2)
    assert (turned != ellipse.T).sum() <= 4  # a quarter turn of a centred ellipse: its transpose
    assert ellipse.sum(axis=1).max() > ellipse.sum(axis=0).max()  # wide, not tall
    assert dsprites.centre(0.0) == 11 and dsprites.centre(1.0) == 52


@pytest.mark.slow
def test_dsprites_is_generated_whole_and_loads_with_its_factors(tmp_path, monkeypatch):
    monkeypatch.setenv("VAELAB_HOME", str(tmp_path))
    packed, factors = dsprites.generate()
    assert (
        hashlib.sha256(packed.tobytes()).hexdigest()
        == hashlib.sha256(dsprites.generate()[0].tobytes()).hexdigest()
    )
    ds = vaelab.data.load("dsprites")
    assert len(ds.x_train) + len(ds.x_test) == dsprites.COUNT and len(ds.x_test) == 73_728
    assert set(np.unique(ds.x_train[:100])) <= {0, 255} and ds.factors_train.shape[1] == 5
    i = 12345
    assert np.array_equal(
        ds.x_test[i] > 0,
        np.unpackbits(packed[np.flatnonzero((factors == ds.factors_test[i]).all(1))[0]]).reshape(64, 64) > 0,
    )


def test_tensorboard_logs_are_read_back_by_tensorboards_own_reader(tiny_npz, tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name, model in (("flat", {}), ("deep", {"upper_latents": [2], "upper_hidden": [8]})):
        config = merge(
            vaelab.preset("seed"),
            {
                "data": {"source": str(tiny_npz)},
                "model": {"hidden": [16], **model},
                "train": {"epochs": 2, "tensorboard": True},
            },
            where="test",
        )
        vaelab.train(config, tmp_path / name)
        events = EventAccumulator(str(tmp_path / name / "tensorboard"))
        events.Reload()
        tags = events.Tags()
        assert {"loss/train", "loss/test", "kl/test", "seconds"} <= set(tags["scalars"])
        assert {"samples", "reconstructions"} <= set(tags["images"])
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        logged = [e.value for e in events.Scalars("loss/test")]
        assert logged == pytest.approx([r["test_loss"] for r in rows], rel=1e-6)
        if model:
            assert "kl per layer/z2" in tags["scalars"]


def test_tensorboard_refused_in_one_line_where_its_package_is_missing(
    tiny_npz, tmp_path, monkeypatch, capsys
):
    import builtins

    real = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard") or name == "tensorboard":
            raise ImportError("no tensorboard")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    argv = [
        "train",
        "--data",
        str(tiny_npz),
        "--epochs",
        "1",
        "--tensorboard",
        "--out",
        str(tmp_path / "run"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--tensorboard" in err
    assert not (tmp_path / "run").exists()


def test_a_model_is_scored_for_disentanglement_on_data_with_factors():
    from vaelab.data import Dataset
    from vaelab.disentanglement import disentanglement
    from vaelab.models import build_model

    x_train, y_train = synthetic_digits(300, seed=1)
    x_test, y_test = synthetic_digits(50, seed=2)
    factors = np.stack([y_train, y_train % 2], axis=1)
    ds = Dataset(
        "tiny",
        x_train,
        y_train,
        x_test,
        y_test,
        factor_names=("digit", "parity"),
        factors_train=factors,
        factors_test=np.stack([y_test, y_test % 2], axis=1),
        factor_values=(tuple(range(10)), (0, 1)),
    )
    model = build_model(
        merge(vaelab.preset("seed"), {"model": {"hidden": [16], "latent_dim": 3}}, where="test").model
    )
    result = disentanglement(model, ds)
    assert 0 <= result["mig"]["mig"] <= 1 and 0 <= result["factorvae"]["factorvae"] <= 1
    assert result["mig"]["bins"] == 20 and result["factors"] == ["digit", "parity"]


def test_a_conditional_model_is_not_scored_for_disentanglement(tmp_path, capsys):
    """Its codes are read given the label, so a factor score would say nothing about them."""
    x_train, y_train = synthetic_digits(200, seed=1)
    x_test, y_test = synthetic_digits(50, seed=2)
    data = tmp_path / "tiny.npz"
    np.savez(data, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    config = merge(vaelab.preset("cvae"), {
        "data": {"source": str(data)}, "model": {"hidden": [16]}, "train": {"epochs": 1},
    }, where="test")
    vaelab.train(config, tmp_path / "run")
    assert main(["evaluate", str(tmp_path / "run"), "-k", "2", "--limit", "3", "--disentanglement"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--disentanglement" in err and "conditional" in err
    assert not (tmp_path / "run" / "evaluation.json").exists()


def test_binary_dsprites_gets_no_note_about_grey_levels_but_mnist_does():
    from vaelab.distributed import Context
    from vaelab.session import notes

    def said(source):
        config = merge(vaelab.preset("seed"), {"data": {"source": source}}, where="test")
        lines = []
        notes(config, Context(), torch.device("cpu"), lines.append)
        return " ".join(lines)

    assert "grey levels" in said("mnist")
    assert "grey levels" not in said("dsprites")
