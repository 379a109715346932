"""torchrun with 2 processes (gloo on 127.0.0.1) against one process: same losses, same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ARGS = ["--epochs", "2", "--batch-size", "50", "--hidden", "64", "--binarize", "dynamic", "--no-figures"]
ARGS += ["--device", "cpu"]  # gloo, also where GPUs are present


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_gloo_processes_match_one_process(tiny_npz, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside this Python")
    common = ["--data", str(tiny_npz), *ARGS]
    run([sys.executable, "-m", "vaelab", "train", *common, "--out", "one"], tmp_path)
    two = run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "vaelab",
            "train",
            *common,
            "--out",
            "two",
        ],
        tmp_path,
    )
    # rank 0 alone speaks and writes
    assert two.stdout.count("done in") == 1
    assert "torchrun: 2 processes, backend gloo, cpu" in two.stdout
    one_rows, two_rows = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert [r["epoch"] for r in two_rows] == [1, 2]
    for a, b in zip(one_rows, two_rows, strict=True):
        for key in ("train_loss", "train_recon", "train_kl", "test_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-4), key
    w1, w2 = (
        load_file(tmp_path / "one" / "model.safetensors"),
        load_file(tmp_path / "two" / "model.safetensors"),
    )
    assert w1.keys() == w2.keys()
    largest = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert largest < 1e-4, largest
    assert torch.isfinite(torch.cat([v.flatten() for v in w2.values()])).all()


def test_more_processes_than_gpus_is_refused_in_one_line(monkeypatch):
    """torchrun --nproc_per_node 2 on a machine with one GPU: a clear error in every process,
    before any of them waits for the others (instead of an invalid-device traceback in one)."""
    from vaelab.distributed import Context
    from vaelab.errors import RunError

    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    refused = r"started 2 processes .* but 1 CUDA device is visible .*--nproc_per_node 1"
    with pytest.raises(RunError, match=refused):
        Context.from_env(torch.device("cuda"))
