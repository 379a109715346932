"""ONNX export: onnxruntime runs the exported graphs to PyTorch's numbers; bad input writes nothing."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch

import vaelab
from vaelab.cli import main
from vaelab.config import merge

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'vaelab[export]')")
pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install 'vaelab[export]')")


def _exported(root, **model):
    """A tiny 5-D run (1 epoch on the conftest synthetic digits), exported once with the CLI."""
    from conftest import synthetic_digits

    x_train, y_train = synthetic_digits(2000, seed=1)
    x_test, y_test = synthetic_digits(500, seed=2)
    np.savez(root / "tiny.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    config = merge(
        vaelab.preset("seed"),
        {"data": {"source": str(root / "tiny.npz")}, "model": {"latent_dim": 5, **model},
         "train": {"epochs": 1}},
        where="test",
    )
    vaelab.train(config, root / "run")
    assert main(["export", str(root / "run"), "--format", "onnx", "--out", str(root / "out")]) == 0
    return root / "run", root / "out"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The seed's MLP with 5 latent dimensions, trained for an epoch and exported."""
    return _exported(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def exported_conv(tmp_path_factory):
    """A small convolutional model, trained for an epoch and exported (its code must not fix the
    batch size while the exporter traces it)."""
    return _exported(tmp_path_factory.mktemp("export-conv"), architecture="conv", conv_channels=[4, 8])


@pytest.mark.parametrize("batch", [1, 13])
@pytest.mark.parametrize("architecture", ["mlp", "conv"])
def test_onnxruntime_equals_pytorch(architecture, batch, request):
    run, out = request.getfixturevalue("exported" if architecture == "mlp" else "exported_conv")
    model = vaelab.load(run)
    rng = np.random.default_rng(batch)
    x = rng.random((batch, 784), dtype=np.float32)
    z = rng.normal(0, 2, (batch, 5)).astype(np.float32)
    encoder = ort.InferenceSession(str(out / "encoder.onnx"), providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(out / "decoder.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in encoder.get_inputs()] == ["x"]
    assert [o.name for o in encoder.get_outputs()] == ["mean", "log_var"]
    assert [i.name for i in decoder.get_inputs()] == ["z"]
    assert [o.name for o in decoder.get_outputs()] == ["logits"]
    mean, log_var = encoder.run(None, {"x": x})
    (logits,) = decoder.run(None, {"z": z})
    with torch.no_grad():
        want_mean, want_log_var = model.encode(torch.from_numpy(x))
        want_logits = model.decode(torch.from_numpy(z))
    # 1e-5 absolute, and float32's rounding (1e-6 relative) where values reach tens of nats
    np.testing.assert_allclose(mean, want_mean.numpy(), atol=1e-5, rtol=1e-6)
    np.testing.assert_allclose(log_var, want_log_var.numpy(), atol=1e-5, rtol=1e-6)
    np.testing.assert_allclose(logits, want_logits.numpy(), atol=1e-5, rtol=1e-6)
    assert logits.shape == (batch, 784)


def test_the_model_card_describes_the_run_and_its_example_runs(exported, monkeypatch):
    run, out = exported
    card = (out / "model-card.md").read_text()
    for text in ("tiny.npz", "| preset | seed |", "MLP 784-256-5", "test_loss", "onnxruntime", "vaelab.load"):
        assert text in card, text
    # the onnxruntime example in the card runs as written, next to the files
    code = re.search(r"## Use with onnxruntime\s+```python\n(.*?)```", card, re.S).group(1)
    monkeypatch.chdir(out)
    scope: dict = {}
    exec(code, scope)  # noqa: S102 (our own generated example)
    assert scope["images"].shape == (8, 1, 28, 28) and scope["samples"].shape == (16, 784)


def test_evaluation_json_goes_into_the_card(exported, tmp_path):
    import json
    import shutil

    from vaelab.export import model_card

    run, _ = exported
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "evaluation.json").write_text(json.dumps({"elbo": {"mean": -101.5, "stderr": 0.25}}))
    card = model_card(vaelab.load(copy), copy)
    assert "## Evaluation (evaluation.json)" in card and "| elbo.mean | -101.5 |" in card


def test_bad_input_exits_2_and_writes_nothing(exported, tmp_path, capsys):
    run, _ = exported
    assert main(["export", str(run), "--format", "tflite", "--out", str(tmp_path / "a")]) == 2
    assert "'tflite' is not one of onnx" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no DIR, no temporary folder left


def test_an_earlier_export_is_replaced_but_other_files_are_refused(exported, tmp_path, capsys):
    """Re-exporting into the same folder replaces that export; a folder whose files export
    did not write is refused, whole, and so is a folder where a file should go."""
    run, out = exported
    again = tmp_path / "again"
    shutil.copytree(out, again)
    assert main(["export", str(run), "--out", str(again)]) == 0
    assert (again / "model-card.md").read_text() == (out / "model-card.md").read_text()

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "encoder.onnx").write_text("the user's own\n")
    (mine / "notes.md").write_text("mine too\n")
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "encoder.onnx" in err and "not from vaelab export" in err
    assert (mine / "encoder.onnx").read_text() == "the user's own\n"
    assert sorted(p.name for p in mine.iterdir()) == ["encoder.onnx", "notes.md"]

    blocked = tmp_path / "blocked"
    shutil.copytree(out, blocked)
    (blocked / "decoder.onnx").unlink()
    (blocked / "decoder.onnx").mkdir()
    before = {p.name: p.stat().st_mtime_ns for p in blocked.iterdir()}
    assert main(["export", str(run), "--out", str(blocked)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "decoder.onnx is not a plain file" in err
    assert {p.name: p.stat().st_mtime_ns for p in blocked.iterdir()} == before

    (tmp_path / "f").write_text("a file\n")
    assert main(["export", str(run), "--out", str(tmp_path / "f" / "ex")]) == 2
    assert "f exists and is not a folder" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folders


def test_the_card_of_a_gaussian_model_gives_its_std(exported, tmp_path):
    from vaelab.config import merge
    from vaelab.export import model_card

    run, _ = exported
    source = vaelab.load(run).run_config.data.source
    cases = (("gaussian", "with a fixed std of 0.3"), ("gaussian-learned", "log_std clamped"))
    for likelihood, words in cases:
        model = {"latent_dim": 2, "hidden": [16], "likelihood": likelihood}
        if likelihood == "gaussian":
            model["gaussian_std"] = 0.3
        config = merge(vaelab.preset("seed"), {"data": {"source": source}, "model": model,
                                               "train": {"epochs": 1}}, where="test")
        vaelab.train(config, tmp_path / likelihood)
        card = model_card(vaelab.load(tmp_path / likelihood), tmp_path / likelihood)
        assert words in card and "sigmoid(logits)" in card and "BCE" not in card


def test_the_card_of_a_continuous_bernoulli_model_draws_its_mean_image(exported, tmp_path, monkeypatch):
    """The card's numpy example gives E[x|z] of the run's likelihood (for the continuous Bernoulli
    not sigmoid(logits)), equal to vaelab's `mean_image`; its text says what the losses are."""
    from vaelab.config import merge

    run, _ = exported
    source = vaelab.load(run).run_config.data.source
    config = merge(
        vaelab.preset("seed"),
        {"data": {"source": source},
         "model": {"latent_dim": 3, "hidden": [32], "likelihood": "continuous-bernoulli"},
         "train": {"epochs": 1, "beta": 2.0}},
        where="test",
    )
    vaelab.train(config, tmp_path / "cb")
    assert main(["export", str(tmp_path / "cb"), "--out", str(tmp_path / "out")]) == 0
    card = (tmp_path / "out" / "model-card.md").read_text()
    assert "BCE" not in card and "negative ELBOs of a density" in card and "weighs the KL by beta" in card
    assert "is not sigmoid(logits)" in card
    code = re.search(r"## Use with onnxruntime\s+```python\n(.*?)```", card, re.S).group(1)
    monkeypatch.chdir(tmp_path / "out")
    scope: dict = {}
    exec(code, scope)  # noqa: S102 (our own generated example)
    model = vaelab.load(tmp_path / "cb")
    with torch.no_grad():
        expected = model.mean_image(model.decode(model.encode(torch.from_numpy(scope["x"]))[0]))
    np.testing.assert_allclose(scope["images"].reshape(8, -1), expected.numpy(), atol=1e-5)
    with torch.no_grad():
        sigmoid = torch.sigmoid(model.decode(model.encode(torch.from_numpy(scope["x"]))[0])).numpy()
    assert np.abs(scope["images"].reshape(8, -1) - sigmoid).max() > 1e-3  # the mean is not the sigmoid
