"""Shared fixtures: tiny data sets made in the test, never a download."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)  # tests are many and small; two cores are shared


def synthetic_digits(n: int, seed: int = 0, size: int = 28, classes: int = 10):
    """uint8 (n, size, size) images: one of `classes` random stroke patterns, shifted and noisy.

    Structured enough that a VAE can learn it in a few epochs, so losses must fall.
    """
    rng = np.random.default_rng(seed)
    protos = np.zeros((classes, size, size), dtype=np.float32)
    yy, xx = np.mgrid[:size, :size]
    for c in range(classes):
        for _ in range(3):  # three thick strokes per class
            x0, y0, x1, y1 = rng.uniform(6, size - 6, 4)
            t = np.linspace(0, 1, 40)[:, None, None]
            px, py = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
            d = np.min((xx - px) ** 2 + (yy - py) ** 2, axis=0)
            protos[c] = np.maximum(protos[c], np.exp(-d / 3.0))
    labels = rng.integers(0, classes, n)
    images = np.empty((n, size, size), dtype=np.float32)
    for i, y in enumerate(labels):
        dx, dy = rng.integers(-2, 3, 2)
        images[i] = np.roll(np.roll(protos[y], dx, axis=1), dy, axis=0)
    images = np.clip(images + rng.normal(0, 0.05, images.shape), 0, 1)
    return (images * 255).round().astype(np.uint8), labels.astype(np.int64)


def permissions_as_for_a_user(monkeypatch) -> None:
    """Root may write anywhere, so as root (CI's containers) make `os.access` read a folder's owner
    write bit the way the kernel does for everyone else: the permission checks still get tested."""
    if os.geteuid() != 0:
        return
    real = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and not os.stat(path).st_mode & stat.S_IWUSR:
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def central_difference(f, weight: torch.Tensor, index: tuple[int, ...], h: float = 1e-6) -> float:
    """(f(w + h) - f(w - h)) / 2h at weight[index], which is put back as it was: the derivative of
    the scalar f() with respect to that one weight, computed without autograd."""
    with torch.no_grad():
        weight[index] += h
        up = f().item()
        weight[index] -= 2 * h
        down = f().item()
        weight[index] += h
    return (up - down) / (2 * h)


def small_config(tiny_npz, **train):
    """The seed preset on `tiny_npz` with a 64-unit hidden layer, batch 50, 2 epochs; `train`
    overrides train settings (epochs, device, precision, ...)."""
    import vaelab
    from vaelab.config import merge

    return merge(
        vaelab.preset("seed"),
        {
            "data": {"source": str(tiny_npz)},
            "model": {"hidden": [64], "latent_dim": 2},
            "train": {"epochs": 2, "batch_size": 50, **train},
        },
        where="test",
    )


@pytest.fixture
def tiny_npz(tmp_path):
    """An .npz in Keras' mnist.npz layout: 2000 train and 500 test synthetic digits."""
    x_train, y_train = synthetic_digits(2000, seed=1)
    x_test, y_test = synthetic_digits(500, seed=2)
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


# --- the browser (Debian's chromium, driven by playwright) ---------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run",
]


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    playwright = sync_api.sync_playwright().start()
    try:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    except Exception as e:  # a broken chromium install: say so, do not fail every test
        playwright.stop()
        pytest.skip(f"chromium at {CHROMIUM} does not start: {str(e).splitlines()[0]}")
    yield browser
    browser.close()
    playwright.stop()


class StaticPage:
    """A page opened from file:// that records console messages, page errors and requests (for
    the report and the comparison page, which have no scripts)."""

    def __init__(self, browser, path: Path, width: int = 1280, height: int = 800):
        self.url = path.resolve().as_uri()
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.page = self.context.new_page()
        self.console: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.goto(self.url)
        self.page.wait_for_load_state("load")

    def images(self) -> list[dict]:
        """Every <img>: its alt text, whether it decoded, its size and where it is on the page."""
        return self.page.evaluate("""() => Array.from(document.images).map(img => {
            const box = img.getBoundingClientRect();
            return {alt: img.alt, complete: img.complete, naturalWidth: img.naturalWidth,
                    width: box.width, height: box.height, top: box.top + window.scrollY};
        })""")


@pytest.fixture
def open_static(browser):
    pages: list[StaticPage] = []

    def open_(path: Path, **kw) -> StaticPage:
        pages.append(StaticPage(browser, path, **kw))
        return pages[-1]

    yield open_
    for p in pages:
        p.context.close()
