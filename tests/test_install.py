"""vaelab installs into an environment that already has torch: the wheel is built from this checkout,
pip installs it into a new virtual environment that already holds torch and leaves that torch in
place, and the installed command trains and writes the explorer, whose page's assets come from the
wheel. (`-m slow` adds the same with torch installed into the new environment itself.)"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_digits

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.install


def run(argv, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{argv}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # no build isolation: the test extras hold setuptools, so no download is needed
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out, ROOT])
    (built,) = out.glob("vaelab-*.whl")
    return built


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    x_train, y_train = synthetic_digits(300, seed=1)
    x_test, y_test = synthetic_digits(100, seed=2)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def test_the_wheel_holds_the_package_its_pages_and_a_range_of_torch(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("vaelab/__init__.py", "vaelab/cli/__init__.py", "vaelab/explorer/template.html",
                   "vaelab/explorer/explorer.js"):
        assert needed in names, needed
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    requires = [line for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
                if line.startswith("Requires-Dist: torch")]
    assert requires == ["Requires-Dist: torch<2.15,>=2.13"]


def site_packages(venv: Path) -> Path:
    (found,) = venv.glob("lib/python*/site-packages")
    return found


def quiet_pip_env(**extra) -> dict[str, str]:
    """pip with no configuration file and no local wheel folders: only what the test gives it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}


def test_pip_keeps_the_torch_an_environment_holds_and_the_installed_command_works(
    wheel, tiny_data, tmp_path
):
    """A new environment that sees this one's packages (torch among them) through a .pth file, as a
    researcher's environment holds its own torch: pip, given no index at all, must install vaelab
    with what is there, and leave torch where and as it was."""
    venv = tmp_path / "env"
    run([sys.executable, "-m", "venv", venv])
    python = venv / "bin" / "python"
    # (Python 3.11's venv brings an old setuptools of its own, which would hide the one torch needs)
    run([python, "-m", "pip", "uninstall", "-q", "-y", "setuptools"], env=quiet_pip_env())
    (site_packages(venv) / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    probe = "import torch; print(torch.__version__, torch.__file__)"
    before = run([python, "-c", probe]).stdout
    env = quiet_pip_env()
    done = run([python, "-m", "pip", "install", "--no-index", wheel], env=env)
    assert "Requirement already satisfied: torch" in done.stdout
    assert run([python, "-c", probe]).stdout == before
    assert not list(site_packages(venv).glob("torch*"))  # no second torch in the new environment
    where = run([python, "-c", "import vaelab; print(vaelab.__file__)"]).stdout.strip()
    assert where.startswith(str(site_packages(venv))), where  # the wheel's vaelab, not this checkout's

    vaelab = venv / "bin" / "vaelab"
    run([vaelab, "train", "--data", tiny_data, "--epochs", "1", "--hidden", "16", "--out", "run",
         "--no-figures"], cwd=tmp_path)
    assert (tmp_path / "run" / "model.safetensors").is_file()
    run([vaelab, "explore", "run", "--out", "page.html"], cwd=tmp_path)
    page = (tmp_path / "page.html").read_text()
    assert "Content-Security-Policy" in page and "vaelab" in page


@pytest.mark.slow
def test_a_new_environment_with_its_own_torch_keeps_it(wheel, tiny_data, tmp_path):
    """torch installed into the new environment first (pinned as constraints.txt pins it), then the
    wheel with its other dependencies from the package index: torch stays as it was."""
    venv = tmp_path / "env"
    run([sys.executable, "-m", "venv", venv])
    python = venv / "bin" / "python"
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    pinned = next(line for line in lines if line.startswith("torch=="))
    run([python, "-m", "pip", "install", "-q", pinned], timeout=1800)
    probe = "import torch; print(torch.__version__, torch.__file__)"
    before = run([python, "-c", probe]).stdout
    run([python, "-m", "pip", "install", "-q", wheel], timeout=1800)
    assert run([python, "-c", probe]).stdout == before
    run([venv / "bin" / "vaelab", "train", "--data", tiny_data, "--epochs", "1", "--hidden", "16",
         "--out", "run", "--no-figures"], cwd=tmp_path)
    assert (tmp_path / "run" / "model.safetensors").is_file()
