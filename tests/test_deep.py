"""Hierarchies, VampPriors and flows against mathematics: log p(x) by numerical integration on
tiny models, the one-layer code where a model reduces to it, the flow's log-determinant against
autograd's Jacobian, the VampPrior against torch.distributions, the ladder's posterior against
the product of Gaussians, and training and evaluation through the real entry points."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import vaelab
from vaelab.bounds import image_bounds
from vaelab.config import ModelConfig, merge
from vaelab.models import DeepVAE, build_model
from vaelab.models.deep import IAFStep, _precision_weighted
from vaelab.objectives import log_normal

TINY = {"input_shape": (1, 1, 4), "hidden": (8,), "upper_hidden": (8,), "activation": "tanh"}


def tiny(**change) -> DeepVAE:
    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**TINY, "latent_dim": 1, **change})).double().eval()
    assert isinstance(model, DeepVAE)
    return model


def grid(lo, hi, n):
    z = torch.linspace(lo, hi, n, dtype=torch.float64)
    return z, z[1] - z[0]


def log_marginal_two_layers(model: DeepVAE, x: torch.Tensor) -> torch.Tensor:
    """log p(x) = log of the integral of p(x|z1) p(z1|z2) p(z2) over a fine grid (1-D layers)."""
    z2, d2 = grid(-8, 8, 801)
    z1, d1 = grid(-12, 12, 1201)
    with torch.no_grad():
        mean, log_var, _ = model.down[0](z2[:, None])  # p(z1|z2) for every z2: (801, 1)
        log_p1 = log_normal(z1[None, :, None], mean[:, None, :], log_var[:, None, :])  # (801, 1201)
        log_p2 = -0.5 * (math.log(2 * math.pi) + z2**2)  # (801,)
        logits = model._logits(z1[:, None])  # (1201, D)
        out = []
        for xi in x:
            log_px = -torch.nn.functional.binary_cross_entropy_with_logits(
                logits, xi.expand_as(logits), reduction="none"
            ).sum(-1)  # (1201,)
            joint = log_px[None, :] + log_p1 + log_p2[:, None]
            out.append(torch.logsumexp(joint.reshape(-1), 0) + torch.log(d1 * d2))
    return torch.stack(out)


def log_marginal_one_layer(model: DeepVAE, x: torch.Tensor) -> torch.Tensor:
    """log p(x) = log of the integral of p(x|z) p(z) over a grid (1-D latent, any prior)."""
    z, dz = grid(-12, 12, 4001)
    with torch.no_grad():
        log_prior = model._log_prior_top(z[:, None])
        logits = model._logits(z[:, None])
        return torch.stack(
            [
                torch.logsumexp(
                    log_prior
                    - torch.nn.functional.binary_cross_entropy_with_logits(
                        logits, xi.expand_as(logits), reduction="none"
                    ).sum(-1),
                    0,
                )
                + torch.log(dz)
                for xi in x
            ]
        )


X = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]], dtype=torch.float64)


def iwae(model, x, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(x), k, model.noise_dim, generator=g, dtype=torch.float64)
    return image_bounds(model, x, noise=noise, max_rows=50_000)


def weights_over_p(model, x: torch.Tensor, exact: torch.Tensor, n: int = 200_000):
    """The importance weights w = p(x, z) / q(z|x) of n samples, divided by the exact p(x): their
    mean is 1 exactly when log q is the density the samples come from (and log p the model's), so
    it tests the estimator without the log's bias; returns (mean, standard error) per image."""
    g = torch.Generator().manual_seed(7)
    means, errors = [], []
    with torch.no_grad():
        for xi, log_p in zip(x, exact, strict=True):
            rows = xi.expand(n, -1)
            eps = torch.randn(n, model.noise_dim, generator=g, dtype=torch.float64)
            w = torch.exp(model.sample_terms(rows, rows, eps).log_weight - log_p)
            means.append(w.mean())
            errors.append(w.std() / math.sqrt(n))
    return torch.stack(means), torch.stack(errors)


@pytest.mark.parametrize("inference", ["bottom-up", "ladder"])
def test_the_weights_of_two_layers_average_to_log_px_by_numerical_integration(inference):
    model = tiny(upper_latents=(1,), inference=inference)
    exact = log_marginal_two_layers(model, X)
    mean, se = weights_over_p(model, X, exact)
    assert torch.all((mean - 1).abs() < 4 * se + 1e-3), (mean, se)
    r = iwae(model, X, 20_000)  # the bound itself: close to log p(x) at this K, above the ELBO
    assert torch.all((r.iwae - exact).abs() < 0.06), (r.iwae, exact)
    assert torch.all(r.mc_elbo < r.iwae)


@pytest.mark.parametrize(
    "change", [{"prior": "vamp", "pseudo_inputs": 3}, {"flow_steps": 2, "flow_hidden": 6}]
)
def test_the_weights_of_a_vampprior_or_a_flow_average_to_log_px_by_numerical_integration(change):
    model = tiny(**change)
    exact = log_marginal_one_layer(model, X)
    mean, se = weights_over_p(model, X, exact)
    assert torch.all((mean - 1).abs() < 4 * se + 1e-3), (mean, se)
    r = iwae(model, X, 20_000)
    assert torch.all((r.iwae - exact).abs() < 0.06), (r.iwae, exact)


def test_the_bound_tightens_with_k():
    model = tiny(upper_latents=(1,))
    bounds = [iwae(model, X, k, seed=s).iwae.mean().item() for k, s in ((1, 1), (10, 2), (1000, 3))]
    assert bounds[0] < bounds[1] < bounds[2]


def test_a_deep_model_without_its_extras_is_the_one_layer_vae():
    """DeepVAE built from a classic config, given the classic VAE's weights: the same log weights."""
    config = ModelConfig(input_shape=(1, 3, 3), hidden=(7,), latent_dim=2, activation="tanh")
    torch.manual_seed(0)
    classic = build_model(config).double()
    deep = DeepVAE(config).double()
    mapping = {
        "up.0.body": "encoder.body",
        "up.0.mean": "encoder.z_mean",
        "up.0.log_var": "encoder.z_log_var",
        "decoder": "decoder.body",
        "out": "decoder.out",
    }
    state = {}
    for name in deep.state_dict():
        prefix = next(p for p in mapping if name.startswith(p))
        state[name] = classic.state_dict()[mapping[prefix] + name[len(prefix) :]]
    deep.load_state_dict(state)
    x = torch.bernoulli(torch.full((5, 9), 0.4, dtype=torch.float64))
    noise = torch.randn(5, 30, 2, dtype=torch.float64)
    a, b = image_bounds(classic, x, noise=noise), image_bounds(deep, x, noise=noise)
    torch.testing.assert_close(a.iwae, b.iwae)
    torch.testing.assert_close(a.mc_elbo, b.mc_elbo)
    torch.testing.assert_close(a.log_px_given_z, b.log_px_given_z)


def test_the_training_loss_clips_probabilities_as_keras_and_the_evaluation_does_not():
    """bernoulli_clip 0.1 keeps each pixel's probability in [0.1, 0.9] in the training terms: a
    binary image's log p(x|z) lies in [D log 0.1, D log 0.9]; the evaluation's sample is not clipped."""
    model = tiny(upper_latents=(1,), bernoulli_clip=0.1)
    with torch.no_grad():
        model.out.weight.mul_(100.0)  # confident logits, far outside the clip
        model.out.bias.fill_(20.0)
    x = torch.tensor([[1.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    eps = torch.randn(1, model.noise_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    clipped = model.terms(x, x, eps).log_px_given_z.item()
    assert 4 * math.log(0.1) - 1e-9 <= clipped <= 4 * math.log(0.9) + 1e-9
    assert clipped < 2 * math.log(0.9) + 2 * math.log(0.1) + 1e-6  # the two 0-pixels at 0.1 at best
    unclipped = model.sample_terms(x, x, eps).log_px_given_z.item()
    assert unclipped < 4 * math.log(0.1)  # bias 20: the 0-pixels cost about 20 nats each


def test_an_iaf_step_is_autoregressive_and_its_log_determinant_is_the_jacobians():
    torch.manual_seed(1)
    step = IAFStep(dim=5, hidden=12, context=3).double()
    z, context = torch.randn(5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda v: step(v[None], context[None])[0][0], z)
    assert torch.all(jacobian.triu(diagonal=1) == 0)  # output i depends on inputs <= i only
    _, log_det = step(z[None], context[None])
    torch.testing.assert_close(log_det[0], torch.logdet(jacobian))


def test_the_vampprior_is_the_mixture_of_the_pseudo_inputs_posteriors():
    model = tiny(latent_dim=3, prior="vamp", pseudo_inputs=4)
    mean, log_var = model._prior_components()
    mixture = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(torch.ones(4, dtype=torch.float64)),
        torch.distributions.Independent(torch.distributions.Normal(mean, torch.exp(0.5 * log_var)), 1),
    )
    z = torch.randn(6, 3, dtype=torch.float64)
    torch.testing.assert_close(model._log_prior_top(z), mixture.log_prob(z))


def test_the_vampprior_density_holds_in_float32_with_narrow_components():
    # the matrix-product form of the mixture's density cancels large terms: a float32 model whose
    # components have variances down to e^-10 must still match the float64 mixture at z near them
    model = tiny(latent_dim=3, prior="vamp", pseudo_inputs=4).float()
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(4, 3, generator=g) * 3
    log_var = torch.tensor([[-10.0, -9.0, -8.0], [-6.0, 0.0, 1.0], [-2.0, -10.0, 0.5], [0.0, 0.0, 0.0]])
    model._prior_components = lambda: (mean, log_var)
    z = mean.repeat(3, 1) + torch.randn(12, 3, generator=g) * torch.exp(0.5 * log_var).repeat(3, 1)
    mixture = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(torch.ones(4, dtype=torch.float64)),
        torch.distributions.Independent(
            torch.distributions.Normal(mean.double(), torch.exp(0.5 * log_var.double())), 1
        ),
    )
    got = model._log_prior_top(z)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), mixture.log_prob(z.double()), rtol=0, atol=1e-4)


def test_the_vampprior_gradient_reaches_the_pseudo_inputs():
    model = tiny(latent_dim=3, prior="vamp", pseudo_inputs=4)
    model._log_prior_top(torch.randn(5, 3, dtype=torch.float64)).sum().backward()
    assert model.pseudo_logits.grad is not None and model.pseudo_logits.grad.abs().sum() > 0


def test_the_ladders_posterior_is_the_normalised_product_of_two_gaussians():
    m1, v1, m2, v2 = (torch.randn(4, dtype=torch.float64) for _ in range(4))
    mean, log_var = _precision_weighted(m1, v1, m2, v2)
    z = torch.linspace(-3, 3, 7, dtype=torch.float64)[:, None]
    product = log_normal(z, m1, v1)[:, None] * 0  # per dimension below
    for d in range(4):
        log_prod = (-0.5 * ((z - m1[d]) ** 2 / v1[d].exp() + (z - m2[d]) ** 2 / v2[d].exp()))[:, 0]
        log_q = -0.5 * (z[:, 0] - mean[d]) ** 2 / log_var[d].exp()
        differences = log_prod - log_q  # the same shape: a constant difference
        torch.testing.assert_close(differences, differences[0].expand(7))
    assert product.shape == (7, 1)


def test_a_collapsed_conditional_prior_keeps_the_ladders_loss_and_gradients_finite():
    """A ladder whose prior p(z1 | z2) was driven to a log-variance of -100 (the way a real run
    collapsed on a dimension the posterior copies: -35 after 34 epochs, then NaN): in float32 the
    loss and every gradient stay finite, because the log-variance is floored and the product of
    Gaussians is computed from log-variances. The product is also finite at extreme inputs."""
    from vaelab.models.deep import LOG_VAR_FLOOR

    torch.manual_seed(0)
    config = ModelConfig(input_shape=(1, 1, 16), hidden=(8,), latent_dim=4, upper_latents=(2,),
                         upper_hidden=(8,), inference="ladder")
    model = build_model(config)
    with torch.no_grad():
        model.down[0].log_var.bias.fill_(-100.0)
        model.down[0].log_var.weight.zero_()
    x = torch.bernoulli(torch.full((32, 16), 0.5))
    terms = model.sample_terms(x, x, torch.randn(32, sum(model.sizes)))
    loss = -(terms.log_px_given_z + terms.log_p.sum(-1) - terms.log_q.sum(-1)).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.down[0](torch.zeros(1, 2))[1].min().item() == LOG_VAR_FLOOR
    big = torch.tensor([-200.0, 0.0, 200.0])
    mean, log_var = _precision_weighted(torch.ones(3), big, -torch.ones(3), big.flip(0))
    assert torch.isfinite(mean).all() and torch.isfinite(log_var).all()
    torch.testing.assert_close(mean, torch.tensor([1.0, 0.0, -1.0]))  # the sharper one wins


def test_free_bits_floor_each_layers_kl():
    model = tiny(upper_latents=(1,))
    x = X[:2]
    eps = torch.randn(2, model.noise_dim, dtype=torch.float64)
    loss, recon, kl = model.losses(x, x, eps, free_bits=50.0)  # far above any layer's KL
    torch.testing.assert_close(loss, recon + 50.0 * 2)  # two layers of one dimension: 50 each
    plain, _, _ = model.losses(x, x, eps)
    torch.testing.assert_close(plain, recon + kl)


@pytest.fixture(scope="module")
def deep_run(tmp_path_factory):
    from conftest import synthetic_digits

    folder = tmp_path_factory.mktemp("deep")
    x_train, y_train = synthetic_digits(600, seed=1)
    x_test, y_test = synthetic_digits(200, seed=2)
    np.savez(folder / "tiny.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    config = merge(
        vaelab.preset("seed"),
        {
            "data": {"source": str(folder / "tiny.npz"), "binarize": "dynamic"},
            "model": {
                "hidden": [64],
                "latent_dim": 8,
                "upper_latents": [4],
                "upper_hidden": [32],
                "prior": "vamp",
                "pseudo_inputs": 20,
                "inference": "ladder",
            },
            "train": {"epochs": 3, "optimizer": "adam", "objective": "iwae", "k": 3},
        },
        where="test",
    )
    vaelab.train(config, folder / "run")
    return folder / "run"


def test_a_hierarchy_trains_evaluates_draws_and_loads(deep_run, capsys):
    from vaelab.cli import main

    rows = [json.loads(line) for line in (deep_run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["test_loss"] < rows[0]["test_loss"]
    assert main(["evaluate", str(deep_run), "-k", "20", "--limit", "50", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["latent_sizes"] == [8, 4] and len(result["kl_per_layer"]) == 2
    assert len(result["active_dims_per_layer"]) == 2
    assert result["nll"] <= -result["elbo"] + 3 * result["elbo_stderr"]
    assert main(["plot", str(deep_run)]) == 0
    model = vaelab.load(deep_run)
    assert model.sample(4, seed=0).shape == (4, 784)
    mean, _ = model.encode(torch.rand(3, 784))
    assert mean.shape == (3, 4)  # the top layer


def test_combinations_that_do_not_exist_are_refused():
    for change, words in (
        ({"upper_latents": [5], "architecture": "conv"}, "MLP"),
        ({"flow_steps": 2, "upper_latents": [5]}, "one stochastic layer"),
        ({"inference": "ladder"}, "--upper-latents"),
        ({"prior": "vamp", "likelihood": "gaussian"}, "Bernoulli"),
    ):
        with pytest.raises(vaelab.ConfigError, match=words):
            merge(vaelab.preset("seed"), {"model": change}, where="test").validate()
    with pytest.raises(vaelab.ConfigError, match="--free-bits"):
        merge(vaelab.preset("seed"), {"train": {"free_bits": 0.5}}, where="test").validate()


def test_the_frontier_preset_is_the_measured_two_layer_family(tiny_npz, tmp_path, capsys):
    """`--preset frontier` is exactly what benchmarks/frontier.py trained as its two-layer family
    (the benchmark preset with the family's options and the epochs its pilot fitted to the hour),
    so the same-hour table's row is a measurement of the preset; one epoch of it trains, and its
    evaluation reports both layers."""
    import argparse
    import importlib.util
    from pathlib import Path

    from vaelab.cli import main
    from vaelab.cli.train_cmd import add_parser, build_config

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("frontier", root / "benchmarks" / "frontier.py")
    frontier = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(frontier)
    measured = json.loads((root / "benchmarks/results/frontier/two-layer/config.json").read_text())
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    pilot = json.loads((root / "benchmarks/results/frontier/pilot.json").read_text())
    assert measured["train"]["epochs"] == frontier.planned_epochs(pilot["two-layer"])  # the hour's fit
    epochs = str(measured["train"]["epochs"])
    args = parser.parse_args(["train", *frontier.options("two-layer"), "--epochs", epochs])
    family = json.loads(json.dumps(build_config(args).to_dict()))  # tuples as config.json's lists
    assert family == measured  # the committed run's config, as built today
    family["preset"] = "frontier"
    assert json.loads(json.dumps(vaelab.preset("frontier").to_dict())) == family

    argv = ["train", "--preset", "frontier", "--data", str(tiny_npz), "--epochs", "1", "--validation", "100",
            "--no-figures", "--out", str(tmp_path / "f")]
    assert main(argv) == 0
    capsys.readouterr()  # the training's own lines
    assert main(["evaluate", str(tmp_path / "f"), "-k", "5", "--limit", "20", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["latent_sizes"] == [64, 32] and len(result["active_dims_per_layer"]) == 2
