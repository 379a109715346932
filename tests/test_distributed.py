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


def torchrun_env(monkeypatch, rank: int, world: int, local_rank: int, local_world: int, gpus: int) -> None:
    """The variables torchrun sets for one process, on a machine with `gpus` visible GPUs."""
    for name, value in {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": local_rank}.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)


def test_more_processes_than_gpus_is_refused_in_one_line(monkeypatch, tmp_path, capsys):
    """torchrun --nproc_per_node 2 on a machine with one GPU (2 nodes: world 4): every process,
    the first too, refuses in one line with exit 2 before it joins the group (instead of an
    invalid-device traceback in one process while the others wait); nothing is written."""
    from vaelab.cli import main

    for rank, local_rank in ((0, 0), (3, 1)):
        torchrun_env(monkeypatch, rank, world=4, local_rank=local_rank, local_world=2, gpus=1)
        argv = ["train", "--device", "cuda", "--epochs", "1", "--out", str(tmp_path / "run")]
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines == [
            "vaelab train: error: torchrun started 2 processes on this machine but 1 CUDA device is "
            "visible (one per process): pass --nproc_per_node 1, or --device cpu"
        ]
        assert not (tmp_path / "run").exists()


def test_one_process_per_gpu_is_accepted(monkeypatch):
    """Two processes per machine, two GPUs, two machines (world 4): the check lets each through,
    on cuda:LOCAL_RANK (the process group itself is not joined here: no GPUs in CI)."""
    import torch.distributed as dist

    from vaelab.distributed import Context

    torchrun_env(monkeypatch, rank=3, world=4, local_rank=1, local_world=2, gpus=2)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # as if the group were joined
    ctx = Context.from_env(torch.device("cuda"))
    assert (ctx.rank, ctx.world, ctx.local_rank) == (3, 4, 1)
    assert ctx.device(torch.device("cuda")) == torch.device("cuda", 1)


@pytest.mark.parametrize("joined", [False, True])
def test_command_ends_a_torchrun_process_with_os_exit(monkeypatch, capsys, joined):
    """`vaelab` (and `python -m vaelab`) exits with main's code; a process that joined a torchrun
    group skips the interpreter's shutdown (os._exit, after flushing), where gloo's worker threads,
    kept alive by DDP past destroy_process_group, could abort it (1 run in about 10 under load)."""
    import vaelab.cli as cli
    from vaelab import distributed

    exits = []

    def fake_exit(code):
        exits.append(code)
        raise SystemExit(f"os._exit({code})")

    def fake_main():
        print("last line", end="")  # unflushed output must reach the terminal
        return 3

    monkeypatch.setattr(cli, "main", fake_main)
    monkeypatch.setattr(distributed, "_joined", joined)
    monkeypatch.setattr(os, "_exit", fake_exit)
    with pytest.raises(SystemExit) as stop:
        cli.command()
    assert capsys.readouterr().out == "last line"
    if joined:
        assert exits == [3]
    else:
        assert exits == [] and stop.value.code == 3


def test_joining_a_group_is_recorded(monkeypatch):
    """`Context.from_env` marks the process once it joins a group (what `command` checks)."""
    import torch.distributed as dist

    from vaelab import distributed
    from vaelab.distributed import Context

    monkeypatch.setattr(distributed, "_joined", False)
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert not Context.from_env(torch.device("cpu")).active
    assert distributed.joined_a_group() is False
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: None)
    assert Context.from_env(torch.device("cpu")).active
    assert distributed.joined_a_group() is True
