"""The package's promises about itself: the Python versions it runs on."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vaelab.config import tomllib  # tomli on Python 3.10

ROOT = Path(__file__).resolve().parent.parent


def test_the_source_needs_no_python_newer_than_pyproject_says():
    """pyproject.toml promises Python 3.10; vermin reads every module's syntax, imports and calls
    and names the oldest Python that has them all (tomllib, 3.11 only, is why tomli is a
    dependency on 3.10). The suite itself is run on 3.10 only by hand (the README says when)."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["requires-python"] == ">=3.10"
    assert "tomli>=1.1; python_version < '3.11'" in meta["dependencies"]
    vermin = shutil.which("vermin", path=str(Path(sys.executable).parent))
    if vermin is None:
        pytest.fail("vermin is missing: install the test extras (pip install -e '.[test]')")
    out = subprocess.run(
        [vermin, "--no-tips", "--no-parse-comments", "-t=3.10-", "--violations", "--eval-annotations",
         str(ROOT / "src" / "vaelab")],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"Minimum required versions: 3\.(\d+)", out.stdout).group(1) in ("0", "10")
