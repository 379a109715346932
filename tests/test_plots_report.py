"""Figures and the HTML report, checked against independent expectations.

The manifold against decoding the quantile grid directly (quantiles from torch.distributions, not
the code's own), the scatter against the encoder's means, the PNGs by their signature and Pillow,
the report with html.parser.
"""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from conftest import synthetic_digits
from PIL import Image

import vaelab
from vaelab import plots
from vaelab.cli import main
from vaelab.config import ModelConfig, merge
from vaelab.data import load as load_data
from vaelab.models import build_model
from vaelab.report import write_report
from vaelab.train import prepare

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
XSS = "<script>alert(1)</script>"


def tiny_config(tiny_npz, latent_dim=2, binarize="none", preset="seed"):
    return merge(
        vaelab.preset("seed"),
        {
            "preset": preset,
            "data": {"source": str(tiny_npz), "binarize": binarize},
            "model": {"hidden": [32], "latent_dim": latent_dim},
            "train": {"epochs": 2, "batch_size": 100},
        },
        where="test",
    )


@pytest.fixture(scope="module")
def shared_npz(tmp_path_factory):
    """The conftest `tiny_npz` data set, written once for this module's shared run."""
    x_train, y_train = synthetic_digits(2000, seed=1)
    x_test, y_test = synthetic_digits(500, seed=2)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


@pytest.fixture(scope="module")
def tiny_run(shared_npz, tmp_path_factory):
    """A two-epoch run on the synthetic digits, shared by the tests that only read it."""
    run = tmp_path_factory.mktemp("runs") / "run"
    vaelab.train(tiny_config(shared_npz), run)
    return run


@pytest.fixture(scope="module")
def figures(tiny_run):
    """The shared run's figures, drawn once with seed 0."""
    return plots.write_figures(tiny_run, seed=0)


def quantiles(n):
    return torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, n, dtype=torch.float64))


def random_model(latent_dim, seed=0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(hidden=(16,), latent_dim=latent_dim)).eval()


# --- the data behind the figures ------------------------------------------------------------


def test_manifold_grid_is_the_seeds_quantile_grid_decoded():
    model = random_model(2)
    n = 5
    q = quantiles(n)
    # The seed: for i, yi in enumerate(grid_x): for j, xi in enumerate(grid_y): z = [[xi, yi]]
    expected = []
    with torch.no_grad():
        for i in range(n):
            for j in range(n):
                z = torch.tensor([[q[j], q[i]]], dtype=torch.float32)
                expected.append(torch.sigmoid(model.decode(z)).reshape(28, 28).numpy())
    grid = plots.manifold_grid(model, n=n)
    assert grid.shape == (n * n, 28, 28)
    np.testing.assert_allclose(grid, np.stack(expected), atol=1e-6)
    assert plots.manifold_grid(model).shape == (225, 28, 28)  # the seed's 15 x 15


def test_manifold_grid_along_given_directions_for_a_larger_latent_space():
    model = random_model(4)
    n = 4
    q = quantiles(n)
    directions, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((4, 2)))
    u1, u2 = (torch.from_numpy(directions[:, c]) for c in range(2))
    z = torch.stack([q[j] * u1 + q[i] * u2 for i in range(n) for j in range(n)]).float()
    with torch.no_grad():
        expected = torch.sigmoid(model.decode(z)).reshape(n * n, 28, 28).numpy()
    grid = plots.manifold_grid(model, n=n, directions=directions.T)
    np.testing.assert_allclose(grid, expected, atol=1e-6)


def test_latent_points_are_the_encoder_means_of_test_images(tiny_npz):
    model = random_model(3)
    dataset = load_data(tiny_npz)
    points = plots.latent_points(model, dataset, limit=120, seed=4)
    assert len(set(points.indices.tolist())) == 120
    x = torch.from_numpy(dataset.x_test[points.indices].reshape(120, -1)).float() / 255
    with torch.no_grad():
        mean, log_var = model.encode(x)
    np.testing.assert_allclose(points.means, mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(points.log_vars, log_var.numpy(), atol=1e-6)
    np.testing.assert_array_equal(points.labels, dataset.y_test[points.indices])
    again = plots.latent_points(model, dataset, limit=120, seed=4)
    np.testing.assert_array_equal(again.indices, points.indices)  # deterministic given the seed


def test_latent_points_of_a_binarized_run_see_the_training_test_set(tiny_npz):
    model = random_model(2)
    dataset = load_data(tiny_npz)
    config = tiny_config(tiny_npz, binarize="dynamic")
    model.run_config = config
    points = plots.latent_points(model, dataset, limit=50, seed=1)
    x = prepare(dataset, config).x_test[torch.from_numpy(points.indices)]  # what training tested on
    assert set(torch.unique(x).tolist()) <= {0.0, 1.0}
    with torch.no_grad():
        np.testing.assert_allclose(points.means, model.encode(x)[0].numpy(), atol=1e-6)


def test_principal_directions_find_the_axis_of_largest_variance():
    rng = np.random.default_rng(0)
    points = rng.standard_normal((2000, 3)) * np.array([0.1, 5.0, 1.0])
    directions, ratio = plots.principal_directions(points)
    assert abs(directions[0] @ np.array([0, 1, 0])) > 0.99
    assert abs(directions[1] @ np.array([0, 0, 1])) > 0.99
    assert ratio[0] > ratio[1] > 0


@pytest.mark.parametrize(("binarize", "label"), [("none", "BCE loss (nats/image)"),
                                                 ("dynamic", "negative ELBO (nats/image)")])
def test_curves_name_the_loss_by_the_data(tiny_npz, binarize, label):
    metrics = [{"epoch": 1, "train_loss": 200.0, "train_recon": 190.0, "train_kl": 10.0,
                "test_loss": 190.0, "test_recon": 181.0, "test_kl": 9.0}]
    fig = plots.curves_figure(metrics, tiny_config(tiny_npz, binarize=binarize))
    assert fig.axes[0].get_ylabel() == label
    assert all("nats/image" in ax.get_ylabel() for ax in fig.axes)
    assert [len(ax.lines) for ax in fig.axes] == [2, 2, 2]  # train and test in each panel


# --- files -----------------------------------------------------------------------------------


def test_write_figures_writes_every_figure_as_a_png(tiny_run, figures):
    paths = figures
    assert [p.name for p in paths] == [f"{name}.png" for name in plots.FIGURES]
    assert len(paths) == 9
    for path in paths:
        assert path.parent == tiny_run / "figures"
        assert path.read_bytes().startswith(PNG_SIGNATURE), path
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            assert img.width >= 400 and img.height >= 200, (path.name, img.size)
    assert not list((tiny_run / "figures").glob(".*.tmp"))  # no temporary files left


def test_figures_for_a_larger_latent_space(tiny_npz, tmp_path):
    config = tiny_config(tiny_npz, latent_dim=3)
    vaelab.train(merge(config, {"train": {"epochs": 1}}, where="test"), tmp_path / "run3")
    paths = plots.write_figures(tmp_path / "run3")
    assert all(p.read_bytes().startswith(PNG_SIGNATURE) for p in paths)


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.decls, self.starts, self.text = [], [], []

    def handle_decl(self, decl):
        self.decls.append(decl)

    def handle_starttag(self, tag, attrs):
        self.starts.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(text):
    page = _Page()
    page.feed(text)
    page.close()
    return page


def test_report_is_one_self_contained_html5_file(tiny_run, figures):
    path = write_report(tiny_run)
    assert path == tiny_run / "report.html"
    text = path.read_text(encoding="utf-8")
    page = parse(text)
    assert page.decls and page.decls[0].lower() == "doctype html"
    assert text.lstrip().lower().startswith("<!doctype html>")
    tags = [tag for tag, _ in page.starts]
    html_attrs = dict(page.starts[tags.index("html")][1])
    assert html_attrs.get("lang")
    assert any(tag == "meta" and attrs.get("charset", "").lower() == "utf-8" for tag, attrs in page.starts)
    assert "title" in tags and "script" not in tags
    # every figure is embedded, byte for byte
    images = [attrs["src"] for tag, attrs in page.starts if tag == "img"]
    assert len(images) == len(plots.FIGURES)
    embedded = {base64.b64decode(src.split(",", 1)[1]) for src in images}
    for name in plots.FIGURES:
        assert (tiny_run / "figures" / f"{name}.png").read_bytes() in embedded, name
    assert all(src.startswith("data:image/png;base64,") for src in images)
    # nothing outside the file is requested
    for _, attrs in page.starts:
        for key in ("src", "href", "srcset", "action", "data"):
            assert not re.match(r"\s*(https?:)?//", attrs.get(key) or ""), (key, attrs.get(key))
    assert not re.search(r"url\(\s*['\"]?\s*(https?:)?//", text, re.I)
    assert not re.search(r"(src|href)\s*=\s*['\"]?\s*(https?:)?//", text, re.I)
    words = " ".join(page.text)
    assert "vaelab evaluate" in words  # no evaluation.json yet: say how to get one
    assert "Configuration" in words and "latent_dim" in words


def test_report_draws_missing_figures_and_escapes_every_user_string(tiny_npz, tmp_path):
    run = tmp_path / "<b>run&'x\""
    config = merge(tiny_config(tiny_npz, preset=XSS), {"train": {"epochs": 1}}, where="test")
    vaelab.train(config, run)
    (run / "evaluation.json").write_text(json.dumps({"elbo": -150.5, "binarization": XSS, XSS: 1}))
    text = write_report(run).read_text(encoding="utf-8")
    assert sorted(p.stem for p in (run / "figures").glob("*.png")) == sorted(plots.FIGURES)
    assert XSS not in text and "<b>run" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&lt;b&gt;run&amp;" in text
    page = parse(text)
    assert [tag for tag, _ in page.starts].count("b") == 0
    assert "script" not in [tag for tag, _ in page.starts]
    assert "-150.5" in " ".join(page.text)  # the evaluation is shown when present


# --- the command line ------------------------------------------------------------------------


def test_cli_plot_redraws_the_same_files_and_report_prints_its_path(tiny_run, figures, capsys):
    first = {p.name: p.read_bytes() for p in figures}
    assert main(["plot", str(tiny_run), "--seed", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [p.rsplit("/", 1)[1] for p in out["figures"]] == [f"{n}.png" for n in plots.FIGURES]
    assert {p.name: p.read_bytes() for p in figures} == first  # same seed, same files
    assert main(["report", str(tiny_run)]) == 0
    assert capsys.readouterr().out.strip() == str(tiny_run / "report.html")


@pytest.mark.parametrize("verb", ["plot", "report"])
def test_cli_refuses_a_directory_that_is_not_a_run(verb, tmp_path, capsys):
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    assert main([verb, str(empty)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not a run directory" in err
    assert list(empty.iterdir()) == []  # nothing written


def test_the_report_says_when_the_training_loss_weighs_the_kl_by_beta():
    from vaelab.config import merge
    from vaelab.report import _units_note

    plain = vaelab.preset("seed").train
    weighted = merge(vaelab.preset("seed"), {"train": {"beta": 4.0, "warmup_epochs": 3}}, where="test").train
    assert "beta" not in _units_note(True, False, plain)
    note = _units_note(True, False, weighted)
    assert "weighs the KL by beta = 4, reached after a warm-up of 3 epochs" in note
    assert "differ by design" in note


def test_the_report_puts_the_headline_first_then_figures_then_curves_then_folded_tables(tiny_run, figures):
    """The order a learner reads in: the run's numbers, the pictures, the curves; the configuration
    and the per-epoch table folded at the end. The headline's numbers are the run's own (read
    here from metrics.jsonl and evaluation.json with json)."""
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    (tiny_run / "evaluation.json").write_text(json.dumps({"nll": 123.456, "nll_stderr": 0.789, "k": 50,
                                                           "n_images": 500, "elbo": -130.5,
                                                           "binarization": {"seed": 0}}))
    try:
        text = write_report(tiny_run).read_text(encoding="utf-8")
    finally:
        (tiny_run / "evaluation.json").unlink()
    order = [text.index(marker) for marker in (
        'class="headline"', 'id="samples"', 'id="ring"', 'id="curves"', '<details id="evaluation-details"',
        '<details id="configuration"', '<details id="metrics"')]
    assert order == sorted(order)
    headline = text[text.index('class="headline"'):text.index('id="samples"')]
    assert f"{rows[-1]['test_loss']:.2f}" in headline
    assert f"reconstruction {rows[-1]['test_recon']:.2f} + KL {rows[-1]['test_kl']:.2f}" in headline
    assert "123.46 ± 0.79" in headline and "K = 50" in headline and "-130.50" in headline
    assert '<details id="configuration" open' not in text and '<details id="metrics" open' not in text


@pytest.mark.browser
def test_the_report_in_a_browser_shows_every_figure_and_asks_for_nothing(tiny_run, figures, open_static):
    p = open_static(write_report(tiny_run), width=1280, height=800)
    images = p.images()
    assert len(images) == len(plots.FIGURES)
    assert all(i["complete"] and i["naturalWidth"] > 0 and i["width"] > 0 and i["height"] > 0 for i in images)
    assert p.console == [] and p.requests == [p.url]
    headline = p.page.locator(".headline").bounding_box()
    assert headline["y"] < images[0]["top"] < 800  # the first figure starts on the first screen
    assert images[-1]["alt"] == "Training curves"
    for anchor in ("configuration", "metrics"):  # folded, below every figure
        details = p.page.locator(f"details#{anchor}")
        assert details.get_attribute("open") is None
        assert details.bounding_box()["y"] > images[-1]["top"]
