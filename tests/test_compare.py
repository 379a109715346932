"""`vaelab compare`: its numbers against each run's own files, read here with json; its page parsed
with html.parser and opened in a real browser."""

from __future__ import annotations

import base64
import json
import re
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest
from conftest import synthetic_digits

import vaelab
from vaelab import plots
from vaelab.cli import main
from vaelab.compare import comparison, markdown_table, write_comparison
from vaelab.config import merge
from vaelab.evaluate import evaluate, write_evaluation

XSS = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two runs of two epochs on synthetic digits, latent 2 and 3; the second evaluated, both drawn."""
    folder = tmp_path_factory.mktemp("compare")
    x_train, y_train = synthetic_digits(1000, seed=1)
    x_test, y_test = synthetic_digits(300, seed=2)
    data = folder / "tiny.npz"
    np.savez(data, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    runs = []
    for latent in (2, 3):
        config = merge(vaelab.preset("seed"), {
            "data": {"source": str(data)}, "model": {"hidden": [32], "latent_dim": latent},
            "train": {"epochs": 2, "batch_size": 100},
        }, where="test")
        run = folder / f"z{latent}"
        vaelab.train(config, run)
        plots.write_figures(run)
        runs.append(run)
    model = vaelab.load(runs[1])
    write_evaluation(runs[1], evaluate(model, vaelab.data.load(str(data)), k=20, limit=50))
    return runs


def read_json_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_the_numbers_are_each_runs_own(two_runs):
    a, b = two_runs
    data = comparison([a, b])
    assert data["settings_that_differ"] == {"model.latent_dim": [2, 3]}
    assert data["notes"] == []
    for run, row in zip(two_runs, data["runs"], strict=True):
        metrics = read_json_lines(run / "metrics.jsonl")
        last = metrics[-1]
        assert row["label"] == run.name and row["epochs"] == len(metrics) == 2
        assert row["final"] == {k: last[k] for k in ("epoch", "test_loss", "test_recon", "test_kl")}
        assert row["seconds"] == pytest.approx(sum(m["seconds"] for m in metrics))
    assert data["runs"][0]["evaluation"] is None
    saved = json.loads((b / "evaluation.json").read_text())
    evaluated = data["runs"][1]["evaluation"]
    for key in ("nll", "nll_stderr", "elbo", "elbo_stderr", "active_dims", "k", "n_images"):
        assert evaluated[key] == saved[key], key
    assert evaluated["binarized"] is True


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.starts, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.starts.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    page.close()
    return page


def test_the_page_is_one_file_with_every_figure_of_every_run(two_runs, tmp_path):
    out, data = write_comparison(two_runs, tmp_path / "page.html")
    text = out.read_text(encoding="utf-8")
    page = parse(text)
    tags = [tag for tag, _ in page.starts]
    assert "script" not in tags
    assert any(t == "meta" and a.get("name") == "generator" and a.get("content") == "vaelab compare"
               for t, a in page.starts)
    images = [a["src"] for t, a in page.starts if t == "img"]
    assert all(src.startswith("data:image/png;base64,") for src in images)
    embedded = {base64.b64decode(src.split(",", 1)[1]) for src in images}
    for run in two_runs:
        for name in plots.FIGURES:
            assert (run / "figures" / f"{name}.png").read_bytes() in embedded, (run, name)
    assert len(images) == 2 * len(plots.FIGURES) + 1  # and the overlaid curves
    assert not re.search(r"(src|href)\s*=\s*['\"]?\s*(https?:)?//", text, re.I)
    words = " ".join(page.text)
    assert "model.latent_dim" in words and "z2" in words and "z3" in words
    assert f"{data['runs'][1]['evaluation']['nll']:.2f}" in words
    assert "not evaluated" in words  # the first run


def test_every_string_from_a_run_is_escaped(two_runs, tmp_path):
    odd = tmp_path / f"{XSS}&run"
    shutil.copytree(two_runs[0], odd)
    config = json.loads((odd / "config.json").read_text())
    config["preset"] = XSS
    (odd / "config.json").write_text(json.dumps(config))
    text = write_comparison([odd, two_runs[1]], tmp_path / "page.html")[0].read_text()
    assert XSS not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "script" not in [tag for tag, _ in parse(text).starts]


def test_runs_that_score_different_things_are_said_to(two_runs, tmp_path):
    other = tmp_path / "binary"
    shutil.copytree(two_runs[0], other)
    config = json.loads((other / "config.json").read_text())
    config["data"]["binarize"] = "dynamic"
    (other / "config.json").write_text(json.dumps(config))
    data = comparison([two_runs[0], other])
    assert data["settings_that_differ"] == {"data.binarize": ["none", "dynamic"]}
    assert len(data["notes"]) == 1 and "BCE loss of grey levels" in data["notes"][0]


def test_the_command_prints_json_and_writes_over_its_own_page_only(two_runs, tmp_path, capsys):
    out = tmp_path / "page.html"
    assert main(["compare", *map(str, two_runs), "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["page"] == str(out) and out.is_file()
    expected = comparison(two_runs)
    assert {k: printed[k] for k in expected} == json.loads(json.dumps(expected))
    assert main(["compare", *map(str, two_runs), "--out", str(out)]) == 0  # its own page: replaced
    text = capsys.readouterr().out
    assert "model.latent_dim" in text and f"wrote {out}" in text


def test_the_markdown_table_has_a_row_per_run(two_runs):
    table = markdown_table(comparison(two_runs)).splitlines()
    assert table[0].startswith("| run | model.latent_dim |") and len(table) == 4
    assert table[2].startswith("| z2 | 2 |") and table[3].startswith("| z3 | 3 |")


@pytest.mark.browser
def test_the_page_in_a_browser_loads_every_image_and_asks_for_nothing(two_runs, tmp_path, open_static):
    out, _ = write_comparison(two_runs, tmp_path / "page.html")
    p = open_static(out)
    images = p.images()
    assert len(images) == 2 * len(plots.FIGURES) + 1
    assert all(i["complete"] and i["naturalWidth"] > 0 and i["width"] > 0 for i in images), images
    assert p.console == []
    assert p.requests == [p.url]



def test_a_metrics_line_with_half_a_test_pass_is_refused_in_one_line(two_runs, tmp_path, capsys):
    """A test row missing `test_kl` (someone trimmed the file) is refused by name, not a KeyError."""
    edited = tmp_path / "edited"
    shutil.copytree(two_runs[0], edited)
    rows = read_json_lines(edited / "metrics.jsonl")
    del [r for r in rows if "test_loss" in r][-1]["test_kl"]
    (edited / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for argv in (["compare", str(edited), str(two_runs[1]), "--out", str(tmp_path / "c.html")],
                 ["report", str(edited)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "metrics.jsonl" in err and "'test_kl'" in err, err
    assert not (tmp_path / "c.html").exists()
