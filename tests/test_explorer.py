"""The explorer page: generated from tiny runs, checked in a real headless Chromium against PyTorch.

The oracle for the page's JavaScript networks is the Python model itself: decoded pixels are
sigmoid(model.decode(z)) and encoded means model.encode(x)[0] on the very pixels the page made.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic_digits

import vaelab
from vaelab.cli import main
from vaelab.config import merge
from vaelab.explorer import MAX_SLIDERS, script_json, write_explorer

# --- tiny runs (trained once per module: 1 epoch on synthetic digits) -------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The conftest `tiny_npz` data set, written once for this module's runs."""
    folder = tmp_path_factory.mktemp("data")
    x_train, y_train = synthetic_digits(2000, seed=1)
    x_test, y_test = synthetic_digits(500, seed=2)
    np.savez(folder / "tiny.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return folder


def train_tiny(data: Path, out: Path, latent_dim: int, hidden=(256,), activation="relu") -> Path:
    config = merge(
        vaelab.preset("seed"),
        {
            "data": {"source": str(data)},
            "model": {"latent_dim": latent_dim, "hidden": list(hidden), "activation": activation},
            "train": {"epochs": 1},
        },
        where="test",
    )
    vaelab.train(config, out)
    return out


@pytest.fixture(scope="module")
def run2d(data_dir, tmp_path_factory):
    run = train_tiny(data_dir / "tiny.npz", tmp_path_factory.mktemp("runs") / "two", 2)
    write_explorer(run)
    return run


@pytest.fixture(scope="module")
def run5d(data_dir, tmp_path_factory):
    # tanh: the page's other activations are checked too (relu in the 2-D run)
    run = train_tiny(data_dir / "tiny.npz", tmp_path_factory.mktemp("runs") / "five", 5, activation="tanh")
    write_explorer(run)
    return run


# --- the browser --------------------------------------------------------------------------------


class Page:
    """A page opened from file:// that records console messages, page errors and requests."""

    def __init__(self, browser, path: Path, width: int = 1100, height: int = 900):
        self.url = path.resolve().as_uri()
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.page = self.context.new_page()
        self.console: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.goto(self.url)
        self.page.wait_for_function("window.vaelab !== undefined")

    def js(self, expression: str, arg=None):
        return self.page.evaluate(expression, arg)

    def point(self) -> np.ndarray:
        return np.array(self.js("window.vaelab.getPoint()"))

    def image(self) -> np.ndarray:
        return np.array(self.js("Array.from(window.vaelab.getImage())"))


@pytest.fixture
def open_page(browser):
    pages: list[Page] = []

    def open_(path: Path, **kw) -> Page:
        pages.append(Page(browser, path, **kw))
        return pages[-1]

    yield open_
    for p in pages:
        p.context.close()


def python_decode(model, z: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.sigmoid(model.decode(torch.tensor(z, dtype=torch.float32))).numpy()


def python_mean(model, pixels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.encode(torch.tensor(pixels, dtype=torch.float32)[None])[0][0].numpy()


def draw_with_mouse(p: Page, stroke: list[tuple[float, float]]) -> None:
    """Draw a polyline given in fractions of the drawing canvas, with the (real) mouse."""
    box = p.page.locator("#draw").bounding_box()

    def at(u, v):
        return box["x"] + u * box["width"], box["y"] + v * box["height"]

    p.page.mouse.move(*at(*stroke[0]))
    p.page.mouse.down()
    for u, v in stroke[1:]:
        p.page.mouse.move(*at(u, v), steps=8)
    p.page.mouse.up()


TOUCH_STROKE_JS = """(points) => {
  const el = document.getElementById("draw");
  const r = el.getBoundingClientRect();
  const send = (type, [u, v]) => el.dispatchEvent(new PointerEvent(type, {
    pointerId: 7, pointerType: "touch", isPrimary: true, bubbles: true, cancelable: true,
    clientX: r.left + u * r.width, clientY: r.top + v * r.height, button: 0, buttons: 1,
  }));
  send("pointerdown", points[0]);
  for (const q of points.slice(1)) send("pointermove", q);
  send("pointerup", points[points.length - 1]);
}"""


# --- in the browser -----------------------------------------------------------------------------


@pytest.mark.browser
def test_page_works_offline_with_no_error_and_no_request(open_page, run2d):
    p = open_page(run2d / "explorer.html")
    # use everything once, then look at what the page asked for
    p.page.click("#random")
    p.page.click("#set-a")
    p.page.click("#reset")
    p.page.click("#set-b")
    p.page.locator("#strip button").nth(3).click()
    draw_with_mouse(p, [(0.3, 0.3), (0.7, 0.3), (0.5, 0.8)])
    p.page.click("#clear")
    p.page.focus("#pad")
    p.page.keyboard.press("ArrowUp")
    assert p.console == []
    assert p.requests == [p.url]  # the file itself, nothing else: no CDN, no fetch, no favicon
    csp = p.page.locator('meta[http-equiv="Content-Security-Policy"]').get_attribute("content")
    assert "default-src 'none'" in csp


@pytest.mark.browser
@pytest.mark.parametrize("which", ["run2d", "run5d"])
def test_page_decoder_equals_the_python_decoder(open_page, which, request):
    run = request.getfixturevalue(which)
    model = vaelab.load(run)
    z = np.random.default_rng(0).normal(0, 1.5, (20, model.latent_dim))
    p = open_page(run / "explorer.html")
    pixels = np.array(p.js("zs => zs.map(z => Array.from(window.vaelab.decode(z)))", z.tolist()))
    assert pixels.shape == (20, 784)
    np.testing.assert_allclose(pixels, python_decode(model, z), atol=1e-4, rtol=0)
    # the image on show is the decoding of the point on show
    p.js("z => window.vaelab.setPoint(z)", z[3].tolist())
    np.testing.assert_allclose(p.image(), python_decode(model, z[3:4])[0], atol=1e-4, rtol=0)


@pytest.mark.browser
def test_page_encoder_equals_the_python_encoder(open_page, run5d):
    model = vaelab.load(run5d)
    x = np.random.default_rng(1).random((5, 784))
    p = open_page(run5d / "explorer.html")
    got = np.array(p.js("xs => xs.map(x => window.vaelab.encode(x))", x.tolist()))
    for i in range(5):
        np.testing.assert_allclose(got[i], python_mean(model, x[i]), atol=1e-4, rtol=0)


@pytest.mark.browser
def test_dragging_the_point_moves_it_and_changes_the_image(open_page, run2d):
    model = vaelab.load(run2d)
    p = open_page(run2d / "explorer.html")
    before_z, before_image = p.point(), p.image()
    start = p.js("window.vaelab.markerPosition()")
    mouse = p.page.mouse
    mouse.move(start["x"], start["y"])
    mouse.down()
    mouse.move(start["x"] + 90, start["y"] - 70, steps=10)
    mouse.up()
    after_z, after_image = p.point(), p.image()
    assert after_z[0] > before_z[0] and after_z[1] > before_z[1]  # right is +z[0], up is +z[1]
    assert np.abs(after_image - before_image).max() > 1e-3
    np.testing.assert_allclose(after_image, python_decode(model, after_z[None])[0], atol=1e-4, rtol=0)
    end = p.js("window.vaelab.markerPosition()")  # the marker is where the mouse let go
    assert abs(end["x"] - start["x"] - 90) < 1.5 and abs(end["y"] - start["y"] + 70) < 1.5


@pytest.mark.browser
def test_a_mouse_drawing_is_encoded_to_the_python_mean(open_page, run2d):
    model = vaelab.load(run2d)
    p = open_page(run2d / "explorer.html")
    assert p.js("window.vaelab.getDrawing()") is None
    draw_with_mouse(p, [(0.25, 0.2), (0.75, 0.2), (0.45, 0.85)])  # a 7
    pixels = np.array(p.js("Array.from(window.vaelab.getDrawing())"))
    mean = np.array(p.js("window.vaelab.getDrawingMean()"))
    np.testing.assert_allclose(mean, python_mean(model, pixels), atol=1e-4, rtol=0)
    np.testing.assert_allclose(p.point(), mean, atol=1e-12)  # the point moved to the mean
    assert_mnist_like(pixels)


@pytest.mark.browser
def test_a_finger_drawing_is_encoded_to_the_python_mean(open_page, run5d):
    model = vaelab.load(run5d)
    p = open_page(run5d / "explorer.html", width=390, height=844)
    t = np.linspace(0, 2 * np.pi, 40)
    zero = np.stack([0.5 + 0.22 * np.sin(t), 0.5 - 0.35 * np.cos(t)], axis=1)  # a 0, tall
    p.page.locator("#draw").scroll_into_view_if_needed()
    p.js(TOUCH_STROKE_JS, zero.tolist())
    pixels = np.array(p.js("Array.from(window.vaelab.getDrawing())"))
    mean = np.array(p.js("window.vaelab.getDrawingMean()"))
    np.testing.assert_allclose(mean, python_mean(model, pixels), atol=1e-4, rtol=0)
    np.testing.assert_allclose(p.point(), mean, atol=1e-12)
    assert_mnist_like(pixels)
    p.page.click("#clear")
    assert p.js("window.vaelab.getDrawing()") is None


def assert_mnist_like(pixels: np.ndarray) -> None:
    """The preprocessing the page documents: 20-pixel box, centre of mass at the centre, [0, 1]."""
    img = pixels.reshape(28, 28)
    assert img.min() >= 0 and img.max() <= 1 and img.max() > 0.9
    rows, cols = np.nonzero(img > 0.05)
    side = max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
    assert 19 <= side <= 22, side
    ys, xs = np.mgrid[:28, :28]
    com = ((ys * img).sum() / img.sum(), (xs * img).sum() / img.sum())
    np.testing.assert_allclose(com, (13.5, 13.5), atol=0.6)  # pixel centres: 13.5 is the middle


@pytest.mark.browser
def test_sliders_buttons_and_keyboard_move_the_point(open_page, run5d):
    p = open_page(run5d / "explorer.html")
    assert p.page.locator("#sliders input[type=range]").count() == 5
    image0 = p.image()
    p.page.focus("#z2")
    for _ in range(3):
        p.page.keyboard.press("ArrowRight")
    np.testing.assert_allclose(p.point(), [0, 0, 0.03, 0, 0], atol=1e-9)
    p.page.keyboard.press("End")
    top = float(p.page.locator("#z2").get_attribute("max"))
    assert p.point()[2] == pytest.approx(top) and top >= 3
    assert np.abs(p.image() - image0).max() > 1e-3
    assert p.page.locator("#z2-value").text_content() == f"{top:.2f}"
    # the pad: the arrows move the point along the pad's axes and back
    p.page.focus("#pad")
    before = p.point()
    p.page.keyboard.press("ArrowRight")
    moved = p.point()
    step = 0.02 * p.js("window.vaelab.info.extent")
    assert np.linalg.norm(moved - before) == pytest.approx(step, rel=1e-6)
    p.page.keyboard.press("ArrowLeft")
    np.testing.assert_allclose(p.point(), before, atol=1e-9)
    p.page.keyboard.press("Shift+ArrowDown")
    assert np.linalg.norm(p.point() - before) == pytest.approx(5 * step, rel=1e-6)
    # sliders follow the point, whatever moved it
    p.js("z => window.vaelab.setPoint(z)", [0.5, -1.25, 0, 1, 2])
    assert p.page.locator("#z1").input_value() == "-1.25"
    # buttons
    p.page.click("#random")
    assert np.abs(p.point()).sum() > 0
    p.page.click("#set-a")
    a = p.point()
    p.page.click("#reset")
    np.testing.assert_array_equal(p.point(), np.zeros(5))
    p.page.click("#set-b")
    ends = p.js("window.vaelab.getEnds()")
    np.testing.assert_allclose(ends["a"], a)
    np.testing.assert_allclose(ends["b"], np.zeros(5))
    p.page.locator("#strip button").nth(2).click()  # 2/8 of the way from A to B
    np.testing.assert_allclose(p.point(), a * 0.75, atol=1e-9)


@pytest.mark.browser
def test_keyboard_arrows_on_a_2d_pad_move_z_along_its_axes(open_page, run2d):
    p = open_page(run2d / "explorer.html")
    step = 0.02 * p.js("window.vaelab.info.extent")
    p.page.focus("#pad")
    p.page.keyboard.press("ArrowRight")
    np.testing.assert_allclose(p.point(), [step, 0], atol=1e-9)
    p.page.keyboard.press("ArrowUp")
    p.page.keyboard.press("ArrowUp")
    np.testing.assert_allclose(p.point(), [step, 2 * step], atol=1e-9)
    assert "z[0]" in p.page.locator("#pad").get_attribute("aria-valuetext")


@pytest.mark.browser
def test_phone_width_has_no_sideways_scroll_and_every_control_is_labelled(open_page, run2d):
    p = open_page(run2d / "explorer.html", width=360, height=740)
    assert p.js("document.documentElement.scrollWidth") <= 360
    pad = p.page.locator("#pad").bounding_box()
    assert 250 < pad["width"] <= 340 and abs(pad["width"] - pad["height"]) < 1
    unlabelled = p.js("""() => [...document.querySelectorAll("input, button, [tabindex], canvas#draw")]
        .filter(el => !(el.labels && el.labels.length) && !el.getAttribute("aria-label")
                      && !el.textContent.trim())
        .map(el => el.outerHTML.slice(0, 80))""")
    assert unlabelled == []


@pytest.mark.browser
def test_more_than_32_dimensions_show_32_sliders_and_say_so(open_page, data_dir, tmp_path):
    run = train_tiny(data_dir / "tiny.npz", tmp_path / "forty", 40, hidden=(32,))
    model = vaelab.load(run)
    path = write_explorer(run)
    assert f"the sliders show the first {MAX_SLIDERS}" in path.read_text()
    p = open_page(path)
    assert p.page.locator("#sliders input[type=range]").count() == MAX_SLIDERS
    z = np.random.default_rng(2).normal(size=(3, 40))
    pixels = np.array(p.js("zs => zs.map(z => Array.from(window.vaelab.decode(z)))", z.tolist()))
    np.testing.assert_allclose(pixels, python_decode(model, z), atol=1e-4, rtol=0)
    assert p.console == []


# --- the file itself (no browser) ---------------------------------------------------------------


def test_script_json_cannot_close_the_script_or_open_a_comment():
    hostile = {"s": "</script><script>alert(1)</script><!-- & -->", "n": [1.5, 2]}
    text = script_json(hostile)
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == hostile


def test_user_strings_are_escaped(data_dir, tmp_path):
    import shutil

    folder = tmp_path / "<img src=x onerror=alert(1)>"
    folder.mkdir()
    shutil.copy(data_dir / "tiny.npz", folder / "tiny.npz")
    run = train_tiny(folder / "tiny.npz", tmp_path / "<i>run&", 2, hidden=(16,))
    page = write_explorer(run).read_text()
    assert "<i>run" not in page and "&lt;i&gt;run&amp;" in page
    assert "<img" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    # exactly the page's own two scripts, the JSON one holding no '<' at all
    assert len(re.findall(r"<script\b", page)) == 2
    data = re.search(r'<script type="application/json" id="vaelab-data">(.*?)</script>', page, re.S)
    assert data and "<" not in data.group(1)


def test_the_page_works_without_the_test_set_and_says_so(data_dir, tmp_path):
    import shutil

    shutil.copy(data_dir / "tiny.npz", tmp_path / "gone.npz")
    run = train_tiny(tmp_path / "gone.npz", tmp_path / "run", 2, hidden=(16,))
    (tmp_path / "gone.npz").unlink()
    out = write_explorer(run, tmp_path / "elsewhere.html")
    assert out == tmp_path / "elsewhere.html" and not (run / "explorer.html").exists()
    assert "No scatter: the test set could not be loaded" in out.read_text()


def test_other_architectures_are_refused_clearly(run2d, monkeypatch, tmp_path):
    model = vaelab.load(run2d)
    model.config = replace(model.config, architecture="conv")
    monkeypatch.setattr(vaelab, "load", lambda run_dir: model)
    with pytest.raises(vaelab.ConfigError, match="MLP models only.*'conv'"):
        write_explorer(run2d, tmp_path / "x.html")
    assert not (tmp_path / "x.html").exists()


def test_explore_command_writes_the_page_and_prints_its_path(run2d, tmp_path, capsys):
    out = tmp_path / "page.html"
    assert main(["explore", str(run2d), "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["out"] == str(out) and result["bytes"] == out.stat().st_size
    assert main(["explore", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["explore", str(run2d), "--out", str(tmp_path / "page.txt")]) == 2


def test_explore_serve_on_a_port_in_use_is_refused_before_the_page_is_written(run2d, tmp_path, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = tmp_path / "page.html"
        assert main(["explore", str(run2d), "--serve", "--port", str(port), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"cannot serve on 127.0.0.1:{port}" in err
    assert list(tmp_path.iterdir()) == []


def test_explore_serve_serves_only_the_page_and_stops_on_ctrl_c(run2d):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vaelab", "explore", str(run2d), "--serve", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        url = None
        timer = threading.Timer(120, proc.kill)  # never hang the suite
        timer.start()
        for line in proc.stdout:
            m = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
            if m:
                url = m.group(1)
                break
        timer.cancel()
        assert url, proc.stderr.read()
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
            assert b"window.vaelab" in r.read()
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url + "config.json", timeout=10)
        assert err.value.code == 404
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)  # drains stderr while waiting: never a full pipe
        assert proc.returncode == 0, err
        assert "stopped" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
