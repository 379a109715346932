"""The Python API refuses what a researcher could plausibly pass wrong, with a clear exception
naming the argument, before anything is written, instead of an error deep inside torch or a
silently wrong result."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import small_config

import vaelab
from vaelab.config import ModelConfig
from vaelab.errors import ConfigError
from vaelab.models import VAE, build_model


@pytest.mark.parametrize(
    "section, change, message",
    [
        ("model", {"conditional": "False"}, "model.conditional: must be true or false, got 'False'"),
        ("train", {"epochs": 1.5}, "train.epochs: must be an integer, got 1.5"),
        ("train", {"seed": None}, "train.seed: must be an integer, got None"),
        ("model", {"hidden": 64}, "model.hidden: must be a list, got 64"),
    ],
)
def test_train_checks_the_types_of_a_config_made_in_python(tiny_npz, tmp_path, section, change, message):
    config = small_config(tiny_npz, epochs=1)
    config = dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **change)})
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        vaelab.train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_train_takes_a_path_as_the_data_source(tiny_npz, tmp_path):
    config = small_config(tiny_npz, epochs=1)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, source=tiny_npz))
    vaelab.train(config, tmp_path / "run")
    assert vaelab.load(tmp_path / "run").run_config.data.source == str(tiny_npz)


def test_encode_and_decode_take_float64_as_numpy_gives_it():
    """numpy's pixels / 255 is float64: encode and decode cast it to the model's float32, and
    give what the float32 input gives; integer z is refused by name."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden=(8,), latent_dim=2)).eval()
    pixels = np.random.default_rng(0).integers(0, 256, size=(3, 784), dtype=np.uint8)
    x64 = torch.from_numpy(pixels / 255)
    assert x64.dtype == torch.float64
    mean, log_var = model.encode(x64)
    assert mean.dtype == torch.float32
    torch.testing.assert_close(mean, model.encode(x64.float())[0], rtol=0, atol=0)
    torch.testing.assert_close(log_var, model.encode(x64.float())[1], rtol=0, atol=0)
    z64 = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model.decode(z64), model.decode(z64.float()), rtol=0, atol=0)
    with pytest.raises(TypeError, match="z must be floating point"):
        model.decode(torch.zeros(2, 2, dtype=torch.long))
    double = build_model(ModelConfig(hidden=(8,), latent_dim=2)).double().eval()
    assert double.encode(x64.float())[0].dtype == torch.float64  # a converted model: its dtype


def test_encode_decode_and_sample_refuse_wrong_inputs_by_name():
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden=(8,), latent_dim=2)).eval()
    with pytest.raises(TypeError, match="floating point in"):
        model.encode(torch.zeros(2, 784, dtype=torch.uint8))  # raw pixels
    with pytest.raises(ValueError, match="a batch"):
        model.encode(torch.zeros(784))
    with pytest.raises(ValueError, match="100 values each; this model takes 784"):
        model.encode(torch.zeros(2, 100))
    assert model.encode(torch.zeros(0, 784))[0].shape == (0, 2)
    x = torch.rand(3, 784, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model.encode(x)[0], model.encode(x.reshape(3, 1, 28, 28))[0])
    with pytest.raises(ValueError, match=r"z must be \(B, 2\)"):
        model.decode(torch.zeros(2))
    for n in (-1, 2.0, True):
        with pytest.raises(ValueError, match="n must be a whole number"):
            model.sample(n)
    for seed in (-1, 1.5, 2**32):
        with pytest.raises(ValueError, match="seed must be None or a whole number"):
            model.sample(2, seed=seed)
    torch.testing.assert_close(model.sample(2, seed=np.int64(3)), model.sample(2, seed=3))
    assert model.double().sample(2, seed=0).dtype == torch.float64  # z in the model's dtype
    with pytest.raises(ValueError, match="objective must be one of elbo, iwae"):
        model.float().losses(torch.rand(8, 784), torch.rand(8, 784), torch.randn(8, 2), objective="IWAE")
    with pytest.raises(ValueError, match="with B = 8"):
        model.losses(torch.rand(8, 784), torch.rand(8, 784), torch.randn(16, 2))  # not K = 2


def test_a_conditional_model_refuses_labels_that_are_not_integers():
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden=(8,), latent_dim=2, conditional=True, num_classes=10)).eval()
    z = torch.zeros(4, 2)
    for label in (3.7, True, torch.tensor([2.9, 1.0, 0.0, 1.0]), torch.zeros(2, 2, dtype=torch.long)):
        with pytest.raises(TypeError, match="labels must be an int or a 1-D tensor of ints"):
            model.decode(z, label)
    assert model.sample(0).shape == (0, 784)
    with pytest.raises(ValueError, match="0..9"):
        model.decode(z, 10)


def test_a_vae_made_directly_checks_its_config():
    with pytest.raises(ConfigError, match="activation"):
        VAE(ModelConfig(activation="gelu"))
    with pytest.raises(ConfigError, match="at least 2 classes"):
        VAE(ModelConfig(conditional=True, num_classes=0))


def test_evaluate_takes_numpy_integers_and_refuses_a_missing_seed():
    from vaelab.evaluate import evaluate

    torch.manual_seed(0)
    model = build_model(ModelConfig(input_shape=(1, 4, 4), hidden=(8,), latent_dim=2)).eval()
    images = np.random.default_rng(0).integers(0, 256, (6, 4, 4), dtype=np.uint8)
    a = evaluate(model, images, k=np.int64(4), limit=np.int32(3), seed=np.uint32(1))
    b = evaluate(model, images, k=4, limit=3, seed=1)
    assert a["nll"] == b["nll"] and a["k"] == 4
    with pytest.raises(ConfigError, match="option --seed"):
        evaluate(model, images, k=4, seed=None)
