"""Training end to end on tiny synthetic data: learning, reproducibility, resume."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import small_config
from safetensors.torch import load_file

import vaelab
from vaelab.config import merge
from vaelab.data import load as load_data


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_training_lowers_the_test_loss_and_writes_the_run(tiny_npz, tmp_path):
    result = vaelab.train(small_config(tiny_npz, epochs=4), tmp_path / "run")
    losses = [row["test_loss"] for row in result.metrics]
    assert losses[-1] < losses[0] - 5, losses
    run = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "model.safetensors", "checkpoint/state.pt"):
        assert (run / name).is_file(), name
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    for key in ("train_loss", "test_loss", "test_recon", "test_kl", "seconds"):
        assert all(key in r for r in rows)
    # the test loss is its parts' sum: distortion + rate
    for r in rows:
        assert r["test_loss"] == pytest.approx(r["test_recon"] + r["test_kl"])
    assert not (run / ".lock").exists()


def test_same_seed_same_metrics(tiny_npz, tmp_path):
    config = small_config(tiny_npz, epochs=2)
    vaelab.train(config, tmp_path / "a")
    vaelab.train(config, tmp_path / "b")

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    a, b = (strip(read_jsonl(tmp_path / d / "metrics.jsonl")) for d in "ab")
    assert a == b
    wa, wb = (load_file(tmp_path / d / "model.safetensors") for d in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_the_same_weights_give_the_same_file_bytes_in_every_process(tmp_path):
    """Not only equal tensors: equal files, so a checksum, git or DVC sees one version. (A dict of
    several metadata keys came out of safetensors in another order in another process.)"""
    import os
    import subprocess
    import sys

    script = (
        "import sys, torch, vaelab; from vaelab.models import build_model; "
        "from vaelab.runs import save_weights; torch.manual_seed(0); "
        "save_weights(build_model(vaelab.preset('seed').model), sys.argv[1])"
    )
    env = {**os.environ, "PYTHONHASHSEED": "random"}
    for i in range(4):
        path = tmp_path / f"{i}.safetensors"
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, env=env)
    files = {(tmp_path / f"{i}.safetensors").read_bytes() for i in range(4)}
    assert len(files) == 1


@pytest.mark.parametrize("binarize", ["none", "dynamic"])
def test_resume_after_k_epochs_gives_the_same_weights(tiny_npz, tmp_path, binarize):
    config = small_config(tiny_npz, epochs=3)
    config = merge(config, {"data": {"binarize": binarize}}, where="test")
    vaelab.train(config, tmp_path / "full")
    first = merge(config, {"train": {"epochs": 1}}, where="test")
    vaelab.train(first, tmp_path / "split")
    vaelab.train(config, tmp_path / "split", resume=True)
    wa, wb = (load_file(tmp_path / d / "model.safetensors") for d in ("full", "split"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ma = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    mb = read_jsonl(tmp_path / "split" / "metrics.jsonl")
    assert [r["test_loss"] for r in ma] == [r["test_loss"] for r in mb]


@pytest.mark.parametrize("binarize", ["none", "dynamic"])
def test_stop_in_the_middle_of_an_epoch_then_resume_gives_the_same_weights(
    tiny_npz, tmp_path, monkeypatch, binarize
):
    """SIGTERM raised during step 8 of epoch 2 (of 40): the step finishes, the checkpoint holds
    epoch 2, step 8 and the epoch's random stream; the resume ends with the uninterrupted run's
    weights and metrics, bit for bit (with dynamic binarization, the draws must go on where they
    stopped)."""
    import signal
    import sys

    from vaelab.train import TrainingInterrupted

    config = merge(small_config(tiny_npz, epochs=3), {"data": {"binarize": binarize}}, where="test")
    vaelab.train(config, tmp_path / "full")
    train_module = sys.modules["vaelab.train"]
    real = train_module.kl_weight

    def kl_weight(config, epoch, step, steps):  # called once per step, before it
        if (epoch, step) == (2, 7):
            signal.raise_signal(signal.SIGTERM)
        return real(config, epoch, step, steps)

    monkeypatch.setattr(train_module, "kl_weight", kl_weight)
    with pytest.raises(TrainingInterrupted, match="interrupted at epoch 2, step 8/40"):
        vaelab.train(config, tmp_path / "split")
    monkeypatch.setattr(train_module, "kl_weight", real)
    state = vaelab.runs.read_checkpoint(tmp_path / "split")
    assert (state["epoch"], state["step"]) == (2, 8)
    vaelab.train(config, tmp_path / "split", resume=True)
    wa, wb = (load_file(tmp_path / d / "model.safetensors") for d in ("full", "split"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = (read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("full", "split"))
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in ma] == [
        {k: v for k, v in r.items() if k != "seconds"} for r in mb
    ]


def test_resume_may_move_the_run_to_another_device_and_config_json_says_so(tiny_npz, tmp_path):
    """--epochs, --compile and --device may change on resume (no saved state depends on them);
    config.json then holds the settings the run went on with, so a later --resume needs no flags."""
    from vaelab.cli import main

    data = ["--data", str(tiny_npz), "--hidden", "64", "--batch-size", "50", "--no-figures"]
    assert main(["train", *data, "--epochs", "2", "--device", "cpu", "--out", str(tmp_path / "full")]) == 0
    assert main(["train", *data, "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "split")]) == 0
    run = str(tmp_path / "split")
    assert main(["train", "--resume", run, "--epochs", "2", "--device", "auto", "--no-figures"]) == 0
    saved = json.loads((tmp_path / "split" / "config.json").read_text())["train"]
    assert (saved["epochs"], saved["device"]) == (2, "auto")
    assert main(["train", "--resume", run, "--epochs", "3", "--no-figures"]) == 0  # goes on on "auto"
    assert json.loads((tmp_path / "split" / "config.json").read_text())["train"]["epochs"] == 3
    if not torch.cuda.is_available():  # auto is the CPU here: the same arithmetic as the full run
        rows = {d: read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("full", "split")}
        assert [r["test_loss"] for r in rows["split"][:2]] == [r["test_loss"] for r in rows["full"]]
    assert main(["train", "--resume", run, "--epochs", "4", "--lr", "0.1"]) == 2  # others may not change


def test_load_returns_the_trained_module(tiny_npz, tmp_path):
    result = vaelab.train(small_config(tiny_npz, epochs=1), tmp_path / "run")
    model = vaelab.load(tmp_path / "run")
    x = torch.from_numpy(load_data(tiny_npz).x_test[:7].reshape(7, -1)).float() / 255
    mean, log_var = model.encode(x)
    assert mean.shape == log_var.shape == (7, 2)
    logits = model.decode(mean)
    assert logits.shape == (7, 784)
    device = next(result.model.parameters()).device  # cuda where a GPU is present
    torch.testing.assert_close(logits, result.model.decode(mean.to(device)).cpu())
    images = model.sample(5, seed=0)
    assert images.shape == (5, 784) and images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images, model.sample(5, seed=0))


def test_a_second_run_in_the_same_directory_is_refused(tiny_npz, tmp_path):
    vaelab.train(small_config(tiny_npz, epochs=1), tmp_path / "run")
    with pytest.raises(vaelab.RunError, match="already holds a run"):
        vaelab.train(small_config(tiny_npz, epochs=1), tmp_path / "run")


def test_cli_end_to_end_train_sample_load(tiny_npz, tmp_path, capsys):
    """The command line on a tiny data set: train (with figures and report), sample, then load."""
    import subprocess
    import sys

    from PIL import Image

    from vaelab.cli import main

    run = tmp_path / "run"
    args = ["--data", str(tiny_npz), "--epochs", "2", "--hidden", "32", "--batch-size", "50"]
    assert main(["train", *args, "--out", str(run), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["run_dir"] == str(run) and summary["epochs"] == 2
    assert (run / "report.html").is_file() and len(list((run / "figures").glob("*.png"))) == 9

    assert main(["sample", str(run), "-n", "16", "--out", str(tmp_path / "s.png"), "--seed", "0"]) == 0
    with Image.open(tmp_path / "s.png") as image:
        assert image.size[0] > 28 and image.size[1] > 28

    model = vaelab.load(run)
    x = torch.rand(5, 784)
    mean, log_var = model.encode(x)
    assert mean.shape == log_var.shape == (5, 2)
    assert model.decode(mean).shape == (5, 784)  # logits
    images = model.sample(16, seed=0)
    assert images.shape == (16, 784) and 0 <= images.min() and images.max() <= 1
    assert torch.equal(images, model.sample(16, seed=0))

    # `python -m vaelab` is the same program
    out = subprocess.run([sys.executable, "-m", "vaelab", "sample", str(run), "-n", "4", "--out",
                          str(tmp_path / "m.png"), "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "m.png").is_file()


def _config_json(run) -> dict:
    return json.loads((run / "config.json").read_text())


def test_every_setting_of_the_seed_is_an_option_and_takes_effect(tiny_npz, tmp_path):
    """--rmsprop-alpha, --bernoulli-clip, --init, --binarize-seed, --checkpoint-every and
    --no-conditional reach config.json and the training, as their file keys do."""
    from vaelab.cli import main

    data = ["--data", str(tiny_npz), "--hidden", "32", "--batch-size", "50", "--epochs", "1"]
    data.append("--no-figures")
    assert main(["train", *data, "--out", str(tmp_path / "keras")]) == 0
    assert main(["train", *data, "--rmsprop-alpha", "0.8", "--bernoulli-clip", "0",
                 "--out", str(tmp_path / "alpha")]) == 0
    saved = _config_json(tmp_path / "alpha")
    assert (saved["train"]["rmsprop_alpha"], saved["model"]["bernoulli_clip"]) == (0.8, 0.0)
    keras, alpha = (load_file(str(tmp_path / r / "model.safetensors")) for r in ("keras", "alpha"))
    assert any(not torch.equal(keras[k], alpha[k]) for k in keras)
    cvae = ["--preset", "cvae", "--no-conditional", "--init", "torch"]
    static = ["--binarize", "static", "--binarize-seed", "3", "--checkpoint-every", "2"]
    assert main(["train", *data, *cvae, *static, "--out", str(tmp_path / "c")]) == 0
    saved = _config_json(tmp_path / "c")
    assert (saved["preset"], saved["model"]["conditional"]) == ("cvae", False)
    assert saved["model"]["init"] == "torch"
    assert (saved["data"]["binarize_seed"], saved["train"]["checkpoint_every"]) == (3, 2)
    assert not vaelab.load(tmp_path / "c").config.conditional


def test_preset_option_wins_over_the_files_preset(tiny_npz, tmp_path):
    """Preset, then the file, then options: --preset names the base and the run, whatever preset
    the file names; the file's other keys still apply."""
    from vaelab.cli import main

    (tmp_path / "c.toml").write_text('preset = "cvae"\n[train]\nepochs = 1\n')
    args = ["--config", str(tmp_path / "c.toml"), "--data", str(tiny_npz), "--no-figures"]
    assert main(["train", "--preset", "pytorch-example", *args, "--out", str(tmp_path / "pt")]) == 0
    saved = _config_json(tmp_path / "pt")
    assert (saved["preset"], saved["model"]["hidden"]) == ("pytorch-example", [400])
    assert not saved["model"]["conditional"]
    assert (saved["train"]["optimizer"], saved["train"]["epochs"]) == ("adam", 1)


def test_a_runs_config_json_goes_with_any_preset(tiny_npz, tmp_path):
    """A run's config.json holds every setting, used or not (lr_final null, the seed preset's
    Bernoulli clip beside a Gaussian likelihood): given with another --preset, none of them is
    refused as a setting with no effect."""
    from vaelab.cli import main

    data = ["--data", str(tiny_npz), "--hidden", "16", "--epochs", "1", "--no-figures"]
    assert main(["train", *data, "--likelihood", "gaussian", "--out", str(tmp_path / "g")]) == 0
    assert _config_json(tmp_path / "g")["model"]["bernoulli_clip"] == 1e-7  # the seed's, unused
    for name in ("benchmark", "pytorch-example"):
        argv = ["train", "--preset", name, "--config", str(tmp_path / "g" / "config.json"), "--no-figures"]
        assert main([*argv, "--out", str(tmp_path / name)]) == 0, name
        assert _config_json(tmp_path / name)["preset"] == name


def test_a_files_setting_an_option_switches_off_is_accepted(tiny_npz, tmp_path):
    """A file whose Gaussian likelihood uses its gaussian_std, run with --likelihood bernoulli:
    the option decides, nothing is refused (a file inconsistent by itself is: docs/bad-input.md)."""
    from vaelab.cli import main

    (tmp_path / "g.toml").write_text('[model]\nlikelihood = "gaussian"\ngaussian_std = 0.5\n')
    argv = ["train", "--config", str(tmp_path / "g.toml"), "--likelihood", "bernoulli", "--data",
            str(tiny_npz), "--hidden", "16", "--epochs", "1", "--no-figures", "--out", str(tmp_path / "b")]
    assert main(argv) == 0
    assert _config_json(tmp_path / "b")["model"]["likelihood"] == "bernoulli"


def test_a_run_stopped_by_its_time_limit_is_evaluated_and_goes_on_with_a_larger_one(
    tiny_npz, tmp_path, capsys
):
    """--eval-every 5 and a time limit reached after epoch 1: that last epoch still gets its test
    pass; --resume with a larger --time-limit trains on, and the run's last epoch is evaluated."""
    from vaelab.cli import main

    run = tmp_path / "t"
    data = ["--data", str(tiny_npz), "--hidden", "16", "--batch-size", "50", "--eval-every", "5"]
    data.append("--no-figures")
    assert main(["train", *data, "--epochs", "10", "--time-limit", "0.0001", "--out", str(run)]) == 0
    assert "time limit of 0.0001 minutes reached after epoch 1" in capsys.readouterr().out
    (row,) = vaelab.runs.read_metrics(run)
    assert {"test_loss", "test_recon", "test_kl"} <= set(row)
    assert main(["train", "--resume", str(run), "--epochs", "3", "--time-limit", "60", "--no-figures"]) == 0
    rows = vaelab.runs.read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert "test_loss" not in rows[1] and "test_loss" in rows[2]
    assert _config_json(run)["train"]["time_limit"] == 60
