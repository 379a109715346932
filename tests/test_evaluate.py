"""Evaluation against oracles: log p(x) by numerical integration over z, torch.distributions,
Jensen's inequality and the IWAE bound's monotonicity in K; the CLI end to end on a tiny run."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

import vaelab
from vaelab.cli import main
from vaelab.config import ModelConfig, merge
from vaelab.errors import ConfigError, DataError
from vaelab.evaluate import (
    EVAL_BINARIZE_SEED,
    bernoulli_log_px_rows,
    binarized_test_images,
    evaluate,
    image_bounds,
    log_weights,
    posterior,
    write_evaluation,
)
from vaelab.models import VAE
from vaelab.objectives import bernoulli_log_px

REQUIRED = ("elbo", "nll", "nll_stderr", "k", "n_images", "binarization")


def tiny_model(latent_dim: int, seed: int = 0, shape=(1, 4, 4), hidden: int = 8) -> VAE:
    """A small MLP VAE with a sharpened decoder, so that p(x|z) really depends on z."""
    torch.manual_seed(seed)
    model = VAE(ModelConfig(input_shape=shape, hidden=(hidden,), latent_dim=latent_dim))
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.mul_(2.0)
    return model.eval()


def model_images(model: VAE, n: int, seed: int = 0) -> torch.Tensor:
    """Binary images (n, D) drawn from the model itself: z ~ N(0, I), x ~ p(x|z)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z = torch.randn(n, model.latent_dim, generator=g)
        return torch.bernoulli(torch.sigmoid(model.decode(z)), generator=g)


def as_uint8(x: torch.Tensor, shape) -> np.ndarray:
    """0/1 images as uint8 0/255: the evaluation's binarization keeps them exactly."""
    return (x.numpy() * 255).astype(np.uint8).reshape(len(x), *shape)


def log_px_by_integration(model: VAE, x: torch.Tensor, axes: list[torch.Tensor]) -> torch.Tensor:
    """log p(x) = log sum_grid p(x|z) p(z) dz (rectangle rule over the grid), in float64."""
    m = copy.deepcopy(model).double()
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(axes))  # (G, L)
    cell = math.prod(float(a[1] - a[0]) for a in axes)
    with torch.no_grad():
        likelihood = torch.distributions.Bernoulli(logits=m.decode(grid))  # over (G, D)
        log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(grid).sum(-1)  # (G,)
        log_joint = [likelihood.log_prob(image).sum(-1) + log_prior for image in x.double()]  # (G,) each
        return torch.stack([torch.logsumexp(j, 0) for j in log_joint]) + math.log(cell)  # (N,)


def iwae_with_stderr(model: VAE, x: torch.Tensor, k: int, seed: int):
    """IWAE_K per image from log_weights, and its Monte Carlo standard error (delta method)."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(len(x), k, model.latent_dim, generator=g)
    with torch.no_grad():
        _, log_w = log_weights(model, x, eps)  # (N, K)
    log_w = log_w.double()
    w = torch.exp(log_w - log_w.max(1, keepdim=True).values)  # scaled weights
    iwae = torch.logsumexp(log_w, 1) - math.log(k)
    stderr = w.std(1) / (w.mean(1) * math.sqrt(k))  # sd of log(mean w) ~ sd(w) / (sqrt(K) E w)
    return iwae, stderr


@pytest.mark.parametrize(
    ("latent_dim", "axes"),
    [
        (1, [torch.linspace(-8, 8, 4000, dtype=torch.float64)]),
        (2, [torch.linspace(-8, 8, 400, dtype=torch.float64)] * 2),
    ],
)
def test_importance_sampling_matches_numerical_integration(latent_dim, axes):
    model = tiny_model(latent_dim)
    x = model_images(model, 6, seed=latent_dim)
    oracle = log_px_by_integration(model, x, axes)
    k = 20_000
    iwae, stderr = iwae_with_stderr(model, x, k, seed=1)
    tol = 4 * stderr + 2e-4
    assert torch.all((iwae - oracle).abs() < tol), (iwae, oracle, stderr)
    # the seeded path through image_bounds and evaluate() agree with the oracle too
    with torch.inference_mode():
        bounds = image_bounds(model, x, k, seed=3)
    assert torch.all((bounds.iwae - oracle).abs() < tol), (bounds.iwae, oracle)
    result = evaluate(model, as_uint8(x, model.image_shape), k=k, seed=3)
    assert result["log_px"] == pytest.approx(oracle.mean().item(), abs=4 * stderr.max().item() + 2e-4)
    # the bound never exceeds log p(x) by more than the noise
    assert -result["nll"] <= oracle.mean().item() + 4 * stderr.max().item() + 2e-4


def test_bound_is_never_below_the_elbo_on_the_same_samples():
    model = tiny_model(2, seed=5)
    x = model_images(model, 64, seed=5)
    for k in (2, 10, 300):
        with torch.inference_mode():
            r = image_bounds(model, x, k, seed=k)
        assert torch.all(r.iwae >= r.mc_elbo - 1e-5), k  # Jensen: log mean w >= mean log w


def test_bound_grows_with_k_on_average():
    model = tiny_model(2, seed=7)
    x = model_images(model, 300, seed=7)
    means, stderrs = [], []
    previous = None
    for k in (1, 10, 100, 1000):
        with torch.inference_mode():
            iwae = image_bounds(model, x, k, seed=11).iwae
        means.append(iwae.mean().item())
        if previous is not None:  # the per-image increase, with its standard error over images
            diff = iwae - previous
            stderrs.append((diff.std() / math.sqrt(len(diff))).item())
            assert diff.mean() > -2 * stderrs[-1], (k, means)
        previous = iwae
    assert means == sorted(means), means


def test_k_equal_one_is_the_elbo_estimate_on_the_same_noise():
    model = tiny_model(3, seed=2, hidden=16)
    x = model_images(model, 10, seed=2)
    eps = torch.randn(10, 1, 3, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        log_px, log_w = log_weights(model, x, eps)
        r = image_bounds(model, x, noise=eps)
        # the oracle: the model's own training terms plus torch.distributions densities
        terms = model.terms(x, x, eps[:, 0])
        mean, log_var = model.encode(x)
        z = model.reparameterize(mean, log_var, eps[:, 0])
        log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_qz = torch.distributions.Normal(mean, torch.exp(0.5 * log_var)).log_prob(z).sum(-1)
    one_sample_elbo = terms.log_px_given_z + log_pz - log_qz
    torch.testing.assert_close(log_px[:, 0], terms.log_px_given_z)
    torch.testing.assert_close(log_w[:, 0], one_sample_elbo)
    torch.testing.assert_close(r.iwae.float(), one_sample_elbo)
    torch.testing.assert_close(r.mc_elbo.float(), one_sample_elbo)
    torch.testing.assert_close(r.elbo.float(), terms.log_px_given_z - terms.kl)  # closed-form KL


def test_epsilon_std_is_part_of_the_proposal():
    torch.manual_seed(0)
    model = VAE(ModelConfig(input_shape=(1, 2, 2), hidden=(4,), latent_dim=1, epsilon_std=0.5)).eval()
    x = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    eps = torch.randn(1, 5, 1)
    with torch.no_grad():
        _, log_w = log_weights(model, x, eps)
        mean, log_var = model.encode(x)
        z = model.reparameterize(mean, log_var, eps[0])  # (5, 1): the samples the model draws
        q = torch.distributions.Normal(mean, 0.5 * torch.exp(0.5 * log_var))
        oracle = (
            torch.distributions.Bernoulli(logits=model.decode(z)).log_prob(x).sum(-1)
            + torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
            - q.log_prob(z).sum(-1)
        )
        assert posterior(model, x)[1].item() == pytest.approx(log_var.item() + 2 * math.log(0.5))
    torch.testing.assert_close(log_w[0], oracle)


@pytest.mark.parametrize("n_images", [3, 40])  # both ways of taking the x . logits term
def test_bernoulli_rows_match_torch_distributions(n_images):
    g = torch.Generator().manual_seed(n_images)
    x = torch.bernoulli(torch.full((n_images, 9), 0.4), generator=g)
    logits = torch.randn(n_images, 5, 9, generator=g) * 6
    rows = bernoulli_log_px_rows(x, logits)
    oracle = torch.distributions.Bernoulli(logits=logits).log_prob(x[:, None, :]).sum(-1)
    torch.testing.assert_close(rows, oracle)
    torch.testing.assert_close(rows, bernoulli_log_px(x[:, None, :].expand_as(logits), logits))


def test_blocks_and_chunks_do_not_change_the_numbers():
    model = tiny_model(2, seed=3)
    x = model_images(model, 7, seed=3)
    eps = torch.randn(7, 2345, 2, generator=torch.Generator().manual_seed(0))  # 3 sample blocks
    with torch.inference_mode():
        _, log_w = log_weights(model, x, eps)
        whole = torch.logsumexp(log_w.double(), 1) - math.log(2345)
        for max_rows in (5, 64, 100_000):
            pieces = image_bounds(model, x, noise=eps, max_rows=max_rows)
            torch.testing.assert_close(pieces.iwae, whole, rtol=0, atol=1e-4)
            torch.testing.assert_close(pieces.mc_elbo, log_w.double().mean(1), rtol=0, atol=1e-4)
    images = as_uint8(x, model.image_shape)
    a = evaluate(model, images, k=1500, seed=9)
    b = evaluate(model, images, k=1500, seed=9, chunk_values=16 * 37)  # 37 rows per product
    c = evaluate(model, images, k=1500, seed=9, limit=3)  # image i's samples do not depend on limit
    for key in ("elbo", "nll", "recon", "kl"):
        assert a[key] == pytest.approx(b[key], abs=1e-5)
    with torch.inference_mode():
        first = image_bounds(model, x[:3], 1500, seed=9)
    assert c["nll"] == pytest.approx(-first.iwae.mean().item(), abs=1e-5)


def test_evaluate_reports_and_writes_the_required_keys(tmp_path):
    model = tiny_model(3, seed=4, shape=(3, 5, 7), hidden=16)  # colour, non-square
    with torch.no_grad():
        model.encoder.z_mean.weight[2].zero_()  # posterior mean of dim 2: constant -> inactive
        model.encoder.z_mean.bias[2].zero_()
    images = np.random.default_rng(0).integers(0, 256, (30, 3, 5, 7), dtype=np.uint8)
    calls = []
    result = evaluate(model, images, k=50, limit=20, seed=1, progress=calls.append)
    assert sum(calls) == 20
    assert result["n_images"] == 20 and result["k"] == 50 and result["seed"] == 1
    assert result["binarization"]["seed"] == EVAL_BINARIZE_SEED
    assert result["elbo"] == pytest.approx(-(result["recon"] + result["kl"]))
    assert result["loss"] == pytest.approx(-result["elbo"])
    assert result["nll"] <= -result["elbo"] + 1e-6  # the IWAE bound is the tighter one
    assert result["bits_per_dim"] == pytest.approx(result["nll"] / (105 * math.log(2)))
    assert len(result["kl_per_dim"]) == 3 and sum(result["kl_per_dim"]) == pytest.approx(result["kl"])
    assert result["active_dims"] == 2
    assert result["nll_stderr"] > 0 and result["elbo_stderr"] > 0
    again = evaluate(model, images, k=50, limit=20, seed=1)
    other = evaluate(model, images, k=50, limit=20, seed=2)
    assert {k: v for k, v in again.items() if k != "seconds"} == {
        k: v for k, v in result.items() if k != "seconds"
    }
    assert other["nll"] != result["nll"]

    path = write_evaluation(tmp_path, result)
    assert path == tmp_path / "evaluation.json"
    saved = json.loads(path.read_text())
    assert all(key in saved for key in REQUIRED)
    assert saved["nll"] == result["nll"]
    assert [p.name for p in tmp_path.iterdir()] == ["evaluation.json"]  # no temporary file left


def test_activity_and_standard_errors_follow_their_definitions():
    """The activity statistic is the variance over images of each posterior mean (unbiased, so a
    shifted mean changes nothing), a dimension active above 0.01; the standard errors are the
    standard deviation over images (n - 1) divided by the square root of n. Written out here from
    the encoder's means and each image's own bounds."""
    from vaelab.evaluate import sample_noise

    torch.manual_seed(0)
    config = ModelConfig(input_shape=(1, 4, 4), hidden=(8,), latent_dim=3, likelihood="continuous-bernoulli")
    model = VAE(config).eval()
    with torch.no_grad():
        model.encoder.z_mean.weight[1].mul_(0.02)  # dim 1: a small spread of means -> inactive
    images = np.random.default_rng(1).integers(0, 256, (40, 4, 4), dtype=np.uint8)
    x = torch.from_numpy(images.reshape(40, -1).astype(np.float32) / 255)  # grey levels: no binarization
    result = evaluate(model, images, k=20, seed=3, chunk_values=16 * 20 * 7)
    with torch.no_grad():
        means = model.encode(x)[0].double()
    variance = means.var(0, unbiased=True)
    assert result["posterior_mean_variance"] == pytest.approx(variance.tolist(), rel=1e-5)
    assert result["active_dims"] == int((variance > 0.01).sum()) == 2
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        shifted.encoder.z_mean.bias.add_(5.0)
    moved = evaluate(shifted, images, k=20, seed=3)["posterior_mean_variance"]
    assert moved == pytest.approx(result["posterior_mean_variance"], rel=1e-4)
    with torch.no_grad():
        each = [image_bounds(model, x[i : i + 1], 20, seed=3, first_image=i) for i in range(40)]
    iwae = np.array([b.iwae.item() for b in each])
    elbo = np.array([b.elbo.item() for b in each])
    assert result["nll_stderr"] == pytest.approx(iwae.std(ddof=1) / math.sqrt(40), rel=1e-5)
    assert result["elbo_stderr"] == pytest.approx(elbo.std(ddof=1) / math.sqrt(40), rel=1e-5)
    # each image its own noise, the same whichever images come with it
    together = next(sample_noise(3, 10, 4, 20, 3))  # images 10..13
    alone = next(sample_noise(3, 12, 1, 20, 3))  # image 12
    assert torch.equal(together[2], alone[0])
    assert not torch.equal(together[0], together[1])


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous-bernoulli"])
def test_evaluate_scores_the_documented_test_images(likelihood):
    """A Bernoulli model is scored on the whole test set binarized once (numpy's PCG64 with seed
    EVAL_BINARIZE_SEED = 0, pixel value v is 1 when a byte drawn uniformly from 0..254 is below v),
    image i the same whatever --limit; a density model on the grey levels / 255. Written out here
    and scored image by image: `evaluate` must give the same numbers through its chunks."""
    torch.manual_seed(0)
    model = VAE(ModelConfig(input_shape=(1, 4, 4), hidden=(8,), latent_dim=2, likelihood=likelihood)).eval()
    images = np.random.default_rng(5).integers(0, 256, (12, 4, 4), dtype=np.uint8)
    result = evaluate(model, images, k=20, limit=9, seed=3, chunk_values=16 * 20 * 2)  # 2 images a chunk
    if likelihood == "bernoulli":
        u = np.random.Generator(np.random.PCG64(0)).integers(0, 255, size=images.shape, dtype=np.uint8)
        x = torch.from_numpy((u < images).reshape(12, -1).astype(np.float32))
        assert result["binarization"] == {"method": "static", "seed": 0, "encoder_input": "binarized"}
    else:
        x = torch.from_numpy(images.reshape(12, -1).astype(np.float32) / 255)
        assert result["binarization"] is None
    iwae = [image_bounds(model, x[i : i + 1], 20, seed=3, first_image=i).iwae.item() for i in range(9)]
    assert result["nll"] == pytest.approx(-np.mean(iwae), rel=1e-6)
    assert result["n_images"] == 9


def test_evaluate_gives_a_conditional_model_each_images_own_label():
    torch.manual_seed(0)
    config = ModelConfig(input_shape=(1, 4, 4), hidden=(8,), latent_dim=2, conditional=True, num_classes=3)
    model = VAE(config).eval()
    with torch.no_grad():  # labels that matter: a large weight on the label's input
        model.decoder.body[0].weight[:, 2:].mul_(30)
    images = np.random.default_rng(5).integers(0, 256, (7, 4, 4), dtype=np.uint8)
    labels = np.array([2, 0, 1, 1, 2, 0, 2])

    class Data:
        x_test, y_test = images, labels

    result = evaluate(model, Data, k=10, seed=1, chunk_values=16 * 10 * 3)  # 3 images a chunk
    x = binarized_test_images(images)

    def bound(i, label):  # image i alone, with the given label
        one = image_bounds(model, x[i : i + 1], 10, seed=1, first_image=i, label=torch.tensor([label]))
        return one.iwae.item()

    iwae = [bound(i, labels[i]) for i in range(7)]
    assert result["nll"] == pytest.approx(-np.mean(iwae), rel=1e-6)
    shifted = [bound(i, labels[i - 1]) for i in range(7)]
    assert abs(np.mean(shifted) - np.mean(iwae)) > 1e-3  # the labels do change the numbers


def test_evaluate_refuses_bad_input():
    model = tiny_model(2)
    images = np.zeros((4, 4, 4), dtype=np.uint8)
    with pytest.raises(ConfigError, match="--importance-samples"):
        evaluate(model, images, k=0)
    with pytest.raises(ConfigError, match="--limit"):
        evaluate(model, images, k=5, limit=0)
    with pytest.raises(DataError, match="model expects 16"):
        evaluate(model, np.zeros((4, 5, 5), dtype=np.uint8), k=5)
    with pytest.raises(DataError, match="uint8"):
        evaluate(model, np.zeros((4, 4, 4), dtype=np.float32), k=5)


# --- the command line ---------------------------------------------------------------------


@pytest.fixture
def tiny_run(tiny_npz, tmp_path):
    config = merge(
        vaelab.preset("seed"),
        {
            "data": {"source": str(tiny_npz)},
            "model": {"hidden": [32], "latent_dim": 2},
            "train": {"epochs": 1, "batch_size": 100},
        },
        where="test",
    )
    vaelab.train(config, tmp_path / "run")
    return tmp_path / "run"


def test_a_run_that_cannot_take_the_result_is_refused_before_the_work(tiny_run, capsys, monkeypatch):
    from conftest import permissions_as_for_a_user

    def never(*args, **kwargs):
        raise AssertionError("evaluate ran before the run was checked")

    monkeypatch.setattr("vaelab.evaluate.evaluate", never)
    (tiny_run / "evaluation.json").mkdir()
    assert main(["evaluate", str(tiny_run), "-k", "2"]) == 2
    assert "evaluation.json: is not a file" in capsys.readouterr().err
    (tiny_run / "evaluation.json").rmdir()
    permissions_as_for_a_user(monkeypatch)
    tiny_run.chmod(0o500)
    try:
        assert main(["evaluate", str(tiny_run), "-k", "2"]) == 2
    finally:
        tiny_run.chmod(0o700)
    err = capsys.readouterr().err
    want = f"{tiny_run}: no permission to write in it, where vaelab writes evaluation.json"
    assert err == f"vaelab evaluate: error: {want}\n"


def test_the_numbers_are_shown_when_evaluation_json_cannot_be_written(tiny_run, capsys, monkeypatch):
    from vaelab.errors import RunError

    def full_disk(run_dir, result):
        raise RunError(f"{run_dir}/evaluation.json: cannot be written (No space left on device)")

    monkeypatch.setattr("vaelab.evaluate.write_evaluation", full_disk)
    assert main(["evaluate", str(tiny_run), "-k", "5", "--limit", "3"]) == 2
    err = capsys.readouterr().err
    assert "NLL" in err and "ELBO" in err and "No space left on device" in err and "wrote" not in err


def test_cli_prints_json_and_writes_evaluation(tiny_run, capsys):
    code = main(["evaluate", str(tiny_run), "--importance-samples", "20", "--limit", "12", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(out)
    assert all(key in result for key in REQUIRED)
    assert result["k"] == 20 and result["n_images"] == 12
    saved = json.loads((tiny_run / "evaluation.json").read_text())
    assert saved == result

    code = main(["evaluate", str(tiny_run), "-k", "5", "--limit", "3", "--seed", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "ELBO" in out and "NLL" in out and "bits/dim" in out and "active latent dims" in out

    # one image has no variance over images: no count of active dimensions, no standard errors
    code = main(["evaluate", str(tiny_run), "-k", "5", "--limit", "1"])
    assert code == 0 and "active latent dims: not measured" in capsys.readouterr().out
    saved = json.loads((tiny_run / "evaluation.json").read_text())
    assert saved["active_dims"] is None and saved["nll_stderr"] is None


@pytest.mark.parametrize("likelihood", ["continuous-bernoulli", "gaussian"])
def test_cli_text_and_report_of_a_density_model_say_grey_levels(tiny_npz, tmp_path, capsys, likelihood):
    """A density likelihood is scored on the grey levels: the summary and the report say so, and
    neither calls its numbers likelihoods of binarized images (the summary once crashed here)."""
    config = merge(
        vaelab.preset("seed"),
        {
            "data": {"source": str(tiny_npz)},
            "model": {"hidden": [32], "latent_dim": 2, "likelihood": likelihood},
            "train": {"epochs": 1, "batch_size": 100},
        },
        where="test",
    )
    run = tmp_path / "run"
    vaelab.train(config, run)
    code = main(["evaluate", str(run), "-k", "5", "--limit", "3"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"grey levels ({likelihood} likelihood" in out and "binarized" not in out
    assert json.loads((run / "evaluation.json").read_text())["binarization"] is None

    assert main(["report", str(run)]) == 0
    html = (run / "report.html").read_text()
    assert "binarized test images" not in html and "test images binarized as" not in html
    assert "grey levels (not binarized)" in html and f"this {likelihood} likelihood" in html


@pytest.mark.parametrize(
    "args",
    [["--importance-samples", "0"], ["--limit", "0"], ["--importance-samples", "-3"]],
)
def test_cli_bad_options_exit_2_with_one_line_and_write_nothing(tiny_run, capsys, args):
    before = sorted(p.name for p in tiny_run.iterdir())
    code = main(["evaluate", str(tiny_run), *args])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1
    assert sorted(p.name for p in tiny_run.iterdir()) == before
    assert not (tiny_run / "evaluation.json").exists()


def test_cli_not_a_run_directory(tmp_path, capsys):
    folder = tmp_path / "not-a-run"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    code = main(["evaluate", str(folder)])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "not a run directory" in err[0]
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
